//! What `twtrace sockets` prints: the groups (owner, namespace, state,
//! count, oldest age, top remotes) and, in JSON or with `--list`, each
//! socket.

use std::io::{self, Write};

use serde::Serialize;

use crate::{
    snapshot::{OwnerSource, Snapshot, SocketGroup, SocketNow},
    units,
};

pub const SCHEMA: &str = "twtrace-sockets/1";

#[derive(Serialize)]
struct SocketJson {
    state: &'static str,
    pid: Option<u32>,
    comm: Option<String>,
    owner_source: OwnerSource,
    netns: u64,
    src: String,
    dst: String,
    age_ns: u64,
    age_exact: bool,
    remaining_ns: Option<u64>,
}

impl From<&SocketNow> for SocketJson {
    fn from(s: &SocketNow) -> Self {
        Self {
            state: s.state.name(),
            pid: s.owner.map(|o| o.pid),
            comm: s.owner.map(|o| o.comm.to_string()),
            owner_source: s.owner_source,
            netns: s.netns,
            src: s.src.to_string(),
            dst: s.dst.to_string(),
            age_ns: s.age_ns,
            age_exact: s.age_exact,
            remaining_ns: s.remaining_ns,
        }
    }
}

#[derive(Serialize)]
struct GroupJson {
    pid: Option<u32>,
    comm: Option<String>,
    netns: u64,
    state: &'static str,
    count: u64,
    oldest_age_ns: u64,
    top_remotes: Vec<RemoteJson>,
}

#[derive(Serialize)]
struct RemoteJson {
    remote: String,
    count: u64,
}

impl From<&SocketGroup> for GroupJson {
    fn from(g: &SocketGroup) -> Self {
        Self {
            pid: g.owner.map(|o| o.pid),
            comm: g.owner.map(|o| o.comm.to_string()),
            netns: g.netns,
            state: g.state.name(),
            count: g.count,
            oldest_age_ns: g.oldest_age_ns,
            top_remotes: g
                .top_remotes
                .iter()
                .map(|(remote, count)| RemoteJson {
                    remote: remote.clone(),
                    count: *count,
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct Report {
    schema: &'static str,
    namespaces: usize,
    /// Namespaces whose sockets are missing, with why.
    unreadable_namespaces: Vec<String>,
    took_ns: u64,
    sockets: Vec<SocketJson>,
    groups: Vec<GroupJson>,
}

pub fn write_json(
    out: &mut impl Write,
    taken: &Snapshot,
    groups: &[SocketGroup],
) -> io::Result<()> {
    let report = Report {
        schema: SCHEMA,
        namespaces: taken.namespaces,
        unreadable_namespaces: taken.unreadable.clone(),
        took_ns: taken.took_ns,
        sockets: taken.sockets.iter().map(SocketJson::from).collect(),
        groups: groups.iter().map(GroupJson::from).collect(),
    };
    serde_json::to_writer_pretty(&mut *out, &report)?;
    writeln!(out)
}

pub fn write_text(
    out: &mut impl Write,
    taken: &Snapshot,
    groups: &[SocketGroup],
    list: bool,
) -> io::Result<()> {
    writeln!(
        out,
        "{} sockets in teardown states, {} network namespaces (taken in {})",
        taken.sockets.len(),
        taken.namespaces,
        units::duration(taken.took_ns)
    )?;
    writeln!(
        out,
        "{:<8} {:<16} {:<11} {:<11} {:>7} {:>9}  TOP REMOTES",
        "PID", "COMM", "NETNS", "STATE", "COUNT", "OLDEST"
    )?;
    for g in groups {
        let (pid, comm) = owner_columns(g.owner);
        let remotes: Vec<String> = g
            .top_remotes
            .iter()
            .map(|(remote, count)| format!("{remote} ({count})"))
            .collect();
        writeln!(
            out,
            "{pid:<8} {comm:<16} {:<11} {:<11} {:>7} {:>9}  {}",
            g.netns,
            g.state.name(),
            g.count,
            units::duration(g.oldest_age_ns),
            remotes.join(", ")
        )?;
    }
    if list {
        writeln!(out)?;
        writeln!(
            out,
            "{:<8} {:<16} {:<11} {:<11} {:<40} {:<40} AGE",
            "PID", "COMM", "NETNS", "STATE", "SRC", "DST"
        )?;
        for s in &taken.sockets {
            let (pid, comm) = owner_columns(s.owner);
            let bound = if s.age_exact { "" } else { "≤" };
            let via = if s.owner_source == OwnerSource::Listener {
                " (listener)"
            } else {
                ""
            };
            writeln!(
                out,
                "{pid:<8} {:<16} {:<11} {:<11} {:<40} {:<40} {bound}{}",
                format!("{comm}{via}"),
                s.netns,
                s.state.name(),
                s.src.to_string(),
                s.dst.to_string(),
                units::duration(s.age_ns)
            )?;
        }
    }
    writeln!(
        out,
        "Ages of mini-sockets (TIME_WAIT, orphaned FIN_WAIT2) are exact; of full sockets an upper bound (time since data last moved)."
    )
}

fn owner_columns(owner: Option<crate::event::Owner>) -> (String, String) {
    owner.map_or_else(
        || ("0".to_owned(), "-".to_owned()),
        |o| (o.pid.to_string(), o.comm.to_string()),
    )
}
