//! What `twtrace sockets` prints: the groups (owner, namespace, state,
//! count, oldest age, top remotes) and, in JSON or with `--list`, each
//! socket.

use std::{
    collections::HashMap,
    io::{self, Write},
};

use serde::Serialize;

use crate::{
    cgroup::Workload,
    grouping::{self, GroupBy},
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
    /// The owner's cgroup and what it names (unit, container, pod).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    workload: Option<Workload>,
}

impl SocketJson {
    fn of<S: std::hash::BuildHasher>(s: &SocketNow, workloads: &HashMap<u64, Workload, S>) -> Self {
        Self {
            workload: s.owner.and_then(|o| workloads.get(&o.cgroup)).cloned(),
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
    /// The group's name under `--by` other than pid.
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
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
            name: g.name.clone(),
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
    /// What `groups` groups by (`--by`): pid groups by owner and namespace.
    by: GroupBy,
    groups: Vec<GroupJson>,
}

pub fn write_json<S: std::hash::BuildHasher>(
    out: &mut impl Write,
    taken: &Snapshot,
    by: GroupBy,
    groups: &[SocketGroup],
    workloads: &HashMap<u64, Workload, S>,
) -> io::Result<()> {
    let report = Report {
        schema: SCHEMA,
        namespaces: taken.namespaces,
        unreadable_namespaces: taken.unreadable.clone(),
        took_ns: taken.took_ns,
        sockets: taken
            .sockets
            .iter()
            .map(|s| SocketJson::of(s, workloads))
            .collect(),
        by,
        groups: groups.iter().map(GroupJson::from).collect(),
    };
    serde_json::to_writer_pretty(&mut *out, &report)?;
    writeln!(out)
}

pub fn write_text(
    out: &mut impl Write,
    taken: &Snapshot,
    by: GroupBy,
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
    // Pid: who and where; any other grouping: its name.
    let width = groups
        .iter()
        .filter_map(|g| g.name.as_ref().map(|n| n.chars().count()))
        .max()
        .unwrap_or(0)
        .clamp(by.column().len(), grouping::MAX_NAME_WIDTH);
    let who = |g: Option<&SocketGroup>| match (by, g) {
        (GroupBy::Pid, None) => format!("{:<8} {:<16} {:<11}", "PID", "COMM", "NETNS"),
        (GroupBy::Pid, Some(g)) => {
            let (pid, comm) = owner_columns(g.owner);
            format!("{pid:<8} {comm:<16} {:<11}", g.netns)
        }
        (_, None) => format!("{:<width$}", by.column()),
        (_, Some(g)) => format!(
            "{:<width$}",
            units::clip(g.name.as_deref().unwrap_or("?"), width)
        ),
    };
    writeln!(
        out,
        "{} {:<11} {:>7} {:>9}  TOP REMOTES",
        who(None),
        "STATE",
        "COUNT",
        "OLDEST"
    )?;
    for g in groups {
        let remotes: Vec<String> = g
            .top_remotes
            .iter()
            .map(|(remote, count)| format!("{remote} ({count})"))
            .collect();
        writeln!(
            out,
            "{} {:<11} {:>7} {:>9}  {}",
            who(Some(g)),
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
