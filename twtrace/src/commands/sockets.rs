//! `twtrace sockets`: every socket in a teardown state now, grouped by
//! owner and state, with ages; exit 4 when `--older-than` finds any, so a
//! cron job or an alert can call it.

use std::io::{self, Write};

use std::collections::HashMap;

use crate::{
    cgroup::{Workload, Workloads},
    cli::SocketsArgs,
    commands::Outcome,
    grouping::{self, GroupBy},
    histogram::OwnerKey,
    output::{Format, sockets as report},
    snapshot::{self, SocketFilter, SocketNow},
};

/// `--older-than` found sockets.
pub const EXIT_FOUND_OLD: u8 = 4;

pub fn run(args: &SocketsArgs) -> anyhow::Result<Outcome> {
    let filter = SocketFilter {
        pids: args.filter.pids.clone(),
        ports: args.filter.ports.clone(),
        ipv4: args.filter.family().map(|f| f == crate::loader::Family::V4),
        states: args.states.clone(),
        older_than_ns: args
            .older_than
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        netns: args
            .filter
            .netns
            .as_deref()
            .map(crate::netns::resolve)
            .transpose()?,
    };
    let mut taken = snapshot::take();
    if taken.sockets.is_empty()
        && !taken.unreadable.is_empty()
        && taken.namespaces == taken.unreadable.len()
    {
        anyhow::bail!(
            "could not read any network namespace's sockets ({}); run as root",
            taken.unreadable[0]
        );
    }
    for unreadable in &taken.unreadable {
        eprintln!("twtrace: sockets of {unreadable} are not included");
    }
    taken.sockets.retain(|s| filter.matches(s));
    let by = args.group.by;
    let workloads = workloads_of(&taken.sockets);
    let groups = snapshot::group(&taken.sockets, group_namer(by, &workloads));
    let mut out = io::stdout().lock();
    match args.output {
        Format::Json => report::write_json(&mut out, &taken, by, &groups, &workloads)?,
        Format::Text => report::write_text(&mut out, &taken, by, &groups, args.list)?,
    }
    out.flush()?;
    let found_old = args.older_than.is_some() && !taken.sockets.is_empty();
    Ok(Outcome::Exit(if found_old { EXIT_FOUND_OLD } else { 0 }))
}

/// What each owner's cgroup is, looked up once per cgroup.
fn workloads_of(sockets: &[SocketNow]) -> HashMap<u64, Workload> {
    let mut workloads = Workloads::new();
    let mut out = HashMap::new();
    for cgroup in sockets.iter().filter_map(|s| Some(s.owner?.cgroup)) {
        if let std::collections::hash_map::Entry::Vacant(e) = out.entry(cgroup)
            && let Some(w) = workloads.get(cgroup)
        {
            e.insert(w.clone());
        }
    }
    out
}

/// Each socket's group under `--by` (none for pid: by owner and namespace).
fn group_namer(
    by: GroupBy,
    workloads: &HashMap<u64, Workload>,
) -> impl FnMut(&SocketNow) -> Option<String> {
    let namespaces = if by == GroupBy::Netns {
        crate::netns::all()
    } else {
        Vec::new()
    };
    move |s| match by {
        GroupBy::Pid => None,
        GroupBy::Netns => Some(grouping::netns_label(
            s.netns,
            crate::netns::name_of(s.netns, &namespaces),
        )),
        _ => {
            let key = OwnerKey::of_owner(s.owner);
            Some(grouping::name_of(by, &key, workloads.get(&key.cgroup)).0)
        }
    }
}
