//! Groups users think in — a process, a command, a systemd unit, a
//! container, a pod, a network namespace, a cgroup — made after the fact
//! from what twtrace counts per owner (pid, command, cgroup) and per
//! namespace, so nothing extra runs per event and every group is an exact
//! union of those counts. Pure: the cgroup names come from the caller.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::{
    census::{CensusNow, InStateNow},
    cgroup::Workload,
    event::TcpState,
    histogram::{OwnerKey, OwnerStats, StateStats, TeardownStats},
};

/// What the sockets are grouped by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// Each process (pid and command).
    #[default]
    Pid,
    /// Each command name, over all its processes.
    Comm,
    /// Each systemd unit (`nginx.service`).
    Unit,
    /// Each container (docker, containerd, CRI-O, podman).
    Container,
    /// Each Kubernetes pod.
    Pod,
    /// Each network namespace.
    Netns,
    /// Each cgroup (v2 path).
    Cgroup,
}

impl GroupBy {
    /// In the order the live view's key cycles through them.
    pub const ALL: [Self; 7] = [
        Self::Pid,
        Self::Comm,
        Self::Unit,
        Self::Container,
        Self::Pod,
        Self::Netns,
        Self::Cgroup,
    ];

    /// The next grouping, for a key that cycles them.
    #[must_use]
    pub fn next(self) -> Self {
        let at = Self::ALL.iter().position(|&b| b == self).unwrap_or(0);
        Self::ALL[(at + 1) % Self::ALL.len()]
    }

    /// As a heading says it: "CLOSES BY POD".
    #[must_use]
    pub fn title(self) -> &'static str {
        match self {
            Self::Pid => "PROCESS",
            Self::Comm => "COMMAND",
            Self::Unit => "UNIT",
            Self::Container => "CONTAINER",
            Self::Pod => "POD",
            Self::Netns => "NETWORK NAMESPACE",
            Self::Cgroup => "CGROUP",
        }
    }

    /// Whether an owner's group is named from its cgroup (so the cgroup is
    /// worth looking up).
    #[must_use]
    pub fn names_by_cgroup(self) -> bool {
        matches!(
            self,
            Self::Unit | Self::Container | Self::Pod | Self::Cgroup
        )
    }

    /// The name column's title.
    #[must_use]
    pub fn column(self) -> &'static str {
        match self {
            Self::Pid => "PID COMM",
            Self::Comm => "COMM",
            Self::Netns => "NETNS",
            other => other.title(),
        }
    }
}

/// A group's name in text is cut to this (JSON has it whole).
pub const MAX_NAME_WIDTH: usize = 48;

/// The name of sockets whose owner twtrace never learnt.
pub const UNKNOWN: &str = "?";
/// The name of sockets whose owner is in no group of the kind asked
/// (a host process under `--by pod`).
pub const NONE: &str = "-";

/// One group's counts.
#[derive(Clone, Debug, Default)]
pub struct Group {
    pub name: String,
    /// What the cgroup says, when the group is one cgroup's kind.
    pub workload: Option<Workload>,
    /// The namespace's inode, under `--by netns`.
    pub netns: Option<u64>,
    pub stats: OwnerStats,
    pub now: BTreeMap<TcpState, InStateNow>,
}

impl Group {
    /// Nothing closed, entered, left or held now: not worth a row.
    fn is_empty(&self) -> bool {
        self.stats.active_closes + self.stats.passive_closes == 0
            && self.stats.states.is_empty()
            && self.now.values().all(|n| n.count == 0)
    }

    /// Per-state statistics with the sockets in each state now.
    #[must_use]
    pub fn states(&self) -> Vec<StateStats> {
        self.stats
            .states
            .stats_with_now(|state| self.now.get(&state).copied().unwrap_or_default())
    }
}

/// Every group with closes or sockets now, busiest closers first.
/// `workload` names a cgroup id; `netns_name` a namespace inode.
pub fn groups(
    stats: &TeardownStats,
    now: &CensusNow,
    by: GroupBy,
    mut workload: impl FnMut(u64) -> Option<Workload>,
    netns_name: impl Fn(u64) -> Option<String>,
) -> Vec<Group> {
    let mut out: HashMap<String, Group> = HashMap::new();
    if by == GroupBy::Netns {
        for (inode, s) in &stats.namespaces {
            let group = netns_group(&mut out, *inode, &netns_name);
            group.stats.merge(s);
        }
        for (inode, states) in &now.by_netns {
            let group = netns_group(&mut out, *inode, &netns_name);
            merge_now(&mut group.now, states);
        }
    } else {
        let mut named: HashMap<u64, Option<Workload>> = HashMap::new();
        // The owner's group, made on first sight; each cgroup named once,
        // and only where the grouping needs it.
        let mut group_of = |key: &OwnerKey| {
            let w = if by.names_by_cgroup() {
                named
                    .entry(key.cgroup)
                    .or_insert_with(|| workload(key.cgroup))
                    .as_ref()
            } else {
                None
            };
            name_of(by, key, w)
        };
        for (key, s) in &stats.owners {
            let (name, w) = group_of(key);
            new_group(&mut out, name, w).stats.merge(s);
        }
        for (key, states) in &now.by_owner {
            let (name, w) = group_of(key);
            merge_now(&mut new_group(&mut out, name, w).now, states);
        }
    }
    let mut groups: Vec<Group> = out.into_values().filter(|g| !g.is_empty()).collect();
    groups.sort_by(|a, b| {
        b.stats
            .active_closes
            .cmp(&a.stats.active_closes)
            .then(b.stats.passive_closes.cmp(&a.stats.passive_closes))
            .then_with(|| a.name.cmp(&b.name))
    });
    groups
}

/// The group named `name`, made with what its cgroup says if new.
fn new_group(
    out: &mut HashMap<String, Group>,
    name: String,
    workload: Option<Workload>,
) -> &mut Group {
    out.entry(name.clone()).or_insert_with(|| Group {
        name,
        workload,
        ..Group::default()
    })
}

fn netns_group<'a>(
    out: &'a mut HashMap<String, Group>,
    inode: u64,
    netns_name: &impl Fn(u64) -> Option<String>,
) -> &'a mut Group {
    let name = netns_label(inode, netns_name(inode));
    out.entry(name.clone()).or_insert_with(|| Group {
        name,
        netns: Some(inode),
        ..Group::default()
    })
}

/// A namespace's group name: its inode, and the name users know it by.
#[must_use]
pub fn netns_label(inode: u64, name: Option<String>) -> String {
    match (inode, name) {
        (0, _) => UNKNOWN.to_owned(),
        (_, Some(name)) => format!("{inode} ({name})"),
        (_, None) => inode.to_string(),
    }
}

/// The group an owner falls in (not for `Netns`: a socket's namespace is
/// its own, not its owner's), and what its cgroup says where the grouping
/// is one of the cgroup's kinds.
#[must_use]
pub fn name_of(by: GroupBy, key: &OwnerKey, w: Option<&Workload>) -> (String, Option<Workload>) {
    if key.pid == 0 {
        return (UNKNOWN.to_owned(), None);
    }
    let part = |part: Option<String>| part.unwrap_or_else(|| NONE.to_owned());
    match by {
        GroupBy::Pid => (format!("{} {}", key.pid, key.comm), None),
        GroupBy::Comm => (key.comm.to_string(), None),
        // The cgroup's own kinds: none known (no v2 hierarchy, or the
        // cgroup is gone) reads as unknown, not as "in no group".
        _ if w.is_none() => (UNKNOWN.to_owned(), None),
        GroupBy::Unit => (part(w.and_then(|w| w.unit.clone())), w.map(unit_of)),
        GroupBy::Container => (
            part(w.and_then(|w| w.container.clone())),
            w.map(container_of),
        ),
        GroupBy::Pod => (part(w.and_then(Workload::pod_name)), w.map(pod_of)),
        GroupBy::Cgroup => (part(w.map(|w| w.cgroup.clone())), w.cloned()),
        GroupBy::Netns => (UNKNOWN.to_owned(), None),
    }
}

// What a group shares of its members' cgroups: a pod's containers share
// the pod, not a container id or a cgroup path.

fn unit_of(w: &Workload) -> Workload {
    Workload {
        unit: w.unit.clone(),
        ..Workload::default()
    }
}

fn pod_of(w: &Workload) -> Workload {
    Workload {
        pod_uid: w.pod_uid.clone(),
        pod: w.pod.clone(),
        k8s_namespace: w.k8s_namespace.clone(),
        qos: w.qos.clone(),
        ..Workload::default()
    }
}

fn container_of(w: &Workload) -> Workload {
    Workload {
        container: w.container.clone(),
        container_name: w.container_name.clone(),
        ..pod_of(w)
    }
}

fn merge_now(into: &mut BTreeMap<TcpState, InStateNow>, from: &BTreeMap<TcpState, InStateNow>) {
    for (state, n) in from {
        into.entry(*state).or_default().merge(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cgroup,
        event::{Comm, Owner, Transition},
    };

    const POD_A: &str = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poda1b2c3d4_0000_4000_8000_000000000001.slice";
    const POD_B: &str = "/kubepods.slice/kubepods-pod0f0e0d0c_0000_4000_8000_000000000002.slice";

    fn container(pod: &str, n: u8) -> String {
        format!(
            "{pod}/cri-containerd-{}.scope",
            format!("{n:02x}").repeat(32)
        )
    }

    /// cgroup ids 1, 2: two containers of pod A; 3: pod B's; 4: a service.
    fn cgroups(id: u64) -> Option<Workload> {
        let path = match id {
            1 => container(POD_A, 1),
            2 => container(POD_A, 2),
            3 => container(POD_B, 3),
            4 => "/system.slice/nginx.service".to_owned(),
            _ => return None,
        };
        Some(cgroup::parse(&path))
    }

    fn close(
        stats: &mut TeardownStats,
        pid: u32,
        comm: &str,
        cgroup: u64,
        netns: u32,
        active: bool,
    ) {
        let (new, time) = if active {
            (TcpState::FinWait1, None)
        } else {
            (TcpState::CloseWait, None)
        };
        stats.record(&Transition {
            ts_ns: 0,
            sock_id: 0,
            owner: (pid != 0).then(|| Owner {
                pid,
                comm: Comm::from(comm),
                cgroup,
            }),
            src: "127.0.0.1:1".parse().unwrap(),
            dst: "127.0.0.1:2".parse().unwrap(),
            old: TcpState::Established,
            new,
            in_state_ns: time,
            end: None,
            netns,
            accepted: false,
            ending: None,
        });
    }

    fn stats() -> TeardownStats {
        let mut stats = TeardownStats::default();
        close(&mut stats, 10, "client", 1, 7, true);
        close(&mut stats, 10, "client", 1, 7, true);
        close(&mut stats, 11, "client", 2, 7, true);
        close(&mut stats, 20, "server", 3, 8, false);
        close(&mut stats, 30, "nginx", 4, 9, true);
        close(&mut stats, 0, "", 0, 9, false);
        stats
    }

    fn by(by: GroupBy) -> Vec<(String, u64, u64)> {
        groups(&stats(), &CensusNow::default(), by, cgroups, |inode| {
            (inode == 7).then(|| "blue".to_owned())
        })
        .into_iter()
        .map(|g| (g.name, g.stats.active_closes, g.stats.passive_closes))
        .collect()
    }

    fn row(name: &str, active: u64, passive: u64) -> (String, u64, u64) {
        (name.to_owned(), active, passive)
    }

    #[test]
    fn a_pods_containers_count_as_one_pod_and_host_processes_as_none() {
        assert_eq!(
            by(GroupBy::Pod),
            [
                row("a1b2c3d4-0000-4000-8000-000000000001", 3, 0),
                row("-", 1, 0),
                row("0f0e0d0c-0000-4000-8000-000000000002", 0, 1),
                row("?", 0, 1),
            ]
        );
    }

    #[test]
    fn each_container_unit_command_and_namespace_is_a_group() {
        let id = |n: u8| format!("{n:02x}").repeat(32);
        assert_eq!(
            by(GroupBy::Container),
            [
                row(&id(1), 2, 0),
                row("-", 1, 0),
                row(&id(2), 1, 0),
                row(&id(3), 0, 1),
                row("?", 0, 1)
            ]
        );
        assert_eq!(
            by(GroupBy::Unit),
            [row("-", 3, 1), row("nginx.service", 1, 0), row("?", 0, 1)]
        );
        assert_eq!(
            by(GroupBy::Comm),
            [
                row("client", 3, 0),
                row("nginx", 1, 0),
                row("?", 0, 1),
                row("server", 0, 1)
            ]
        );
        assert_eq!(
            by(GroupBy::Netns),
            [row("7 (blue)", 3, 0), row("9", 1, 1), row("8", 0, 1)]
        );
        assert_eq!(by(GroupBy::Pid)[0], row("10 client", 2, 0));
    }

    #[test]
    fn a_pod_group_keeps_what_its_containers_share_only() {
        let pods = groups(
            &stats(),
            &CensusNow::default(),
            GroupBy::Pod,
            cgroups,
            |_| None,
        );
        let w = pods[0].workload.as_ref().unwrap();
        assert_eq!(w.qos.as_deref(), Some("besteffort"));
        assert_eq!(w.container, None);
        assert_eq!(w.cgroup, "");
    }

    #[test]
    fn the_key_cycles_through_every_grouping() {
        let mut by = GroupBy::Pid;
        for expected in GroupBy::ALL.iter().skip(1).chain([&GroupBy::Pid]) {
            by = by.next();
            assert_eq!(by, *expected);
        }
    }
}
