//! Every socket in a teardown state *now*, in every network namespace,
//! with its owner and age: what a host already holds when twtrace starts
//! (a TIME_WAIT pile-up, a CLOSE_WAIT leak), not only what happens after.
//!
//! The kernel's socket diagnostics list the sockets of one namespace; the
//! owner of a full socket is the process holding its inode (as `ss -p`
//! finds it). A mini-socket (TIME_WAIT, or an orphaned FIN_WAIT2) or an
//! orphaned full socket has no process: a server-side one is attributed to
//! the owner of the listener on its local port, flagged as such.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    net::SocketAddr,
    time::Instant,
};

use twtrace_common::TIME_WAIT_LEN_SECS;

use crate::{
    event::{Comm, Owner, TcpState},
    netns::{self, Namespace},
    sockdiag::{self, DiagSocket},
};

/// Where a socket's owner comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerSource {
    /// The process holds the socket (its inode is among the process's fds),
    /// or the kernel saw the process use it.
    Process,
    /// No process holds it (a mini-socket, or orphaned after `close()`); the
    /// process listening on its local port does.
    Listener,
    Unknown,
}

/// One socket in a teardown state now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketNow {
    pub state: TcpState,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub owner: Option<Owner>,
    pub owner_source: OwnerSource,
    /// The network namespace's inode (as `ip netns identify` shows it).
    pub netns: u64,
    /// How long it has been in `state`.
    pub age_ns: u64,
    /// Mini-sockets: exact to a timer tick (from the time left on the
    /// timer). Full sockets: an upper bound (time since data last moved;
    /// the state began then or later).
    pub age_exact: bool,
    /// Mini-sockets: time left before the kernel frees it.
    pub remaining_ns: Option<u64>,
    /// A listener owns its local port: the server's end of a connection.
    pub server_side: bool,
    /// Kernel monotonic time when the kernel described it: the age is as
    /// of then.
    pub seen_at_ns: u64,
}

/// A listening socket now, and the process that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerNow {
    pub netns: u64,
    pub addr: SocketAddr,
    pub owner: Owner,
}

/// A whole snapshot, and what it could not see.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub sockets: Vec<SocketNow>,
    /// Listeners whose holder is known: the tracer learns a listener's
    /// owner at `listen()`, which it never saw for those older than it.
    pub listeners: Vec<ListenerNow>,
    pub namespaces: usize,
    /// Namespaces that could not be entered (no CAP_SYS_ADMIN, or gone),
    /// with the reason: their sockets are missing.
    pub unreadable: Vec<String>,
    pub took_ns: u64,
}

/// What one namespace gives: its sockets and the sysctl that sets an
/// orphaned FIN_WAIT2's timer.
struct NamespaceDump {
    sockets: Vec<DiagSocket>,
    fin_timeout_secs: u64,
    seen_at_ns: u64,
}

/// Takes the snapshot of every namespace on the host.
#[must_use]
pub fn take() -> Snapshot {
    let started = Instant::now();
    let namespaces = netns::all();
    let processes = ProcessSockets::scan();
    let mut snapshot = Snapshot {
        namespaces: namespaces.len(),
        ..Snapshot::default()
    };
    for ns in &namespaces {
        match netns::read_in(ns, dump_here) {
            Ok(Ok(dump)) => {
                snapshot.sockets.reserve(dump.sockets.len());
                snapshot
                    .sockets
                    .extend(describe(ns.inode, &dump, &processes));
                snapshot
                    .listeners
                    .extend(
                        owned_listeners(&dump.sockets, &processes).map(|(addr, owner)| {
                            ListenerNow {
                                netns: ns.inode,
                                addr,
                                owner,
                            }
                        }),
                    );
            }
            Ok(Err(e)) => snapshot
                .unreadable
                .push(format!("{}: {e:#}", ns.path.display())),
            Err(e) => snapshot
                .unreadable
                .push(format!("{}: {e}", ns.path.display())),
        }
    }
    if namespaces.is_empty() {
        // No /proc to walk: at least our own namespace.
        if let (Ok(dump), Ok(inode)) = (dump_here(), netns::own()) {
            snapshot.sockets.extend(describe(inode, &dump, &processes));
        }
    }
    snapshot.took_ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    snapshot
}

/// The snapshot of one namespace only.
pub fn take_in(ns: &Namespace) -> anyhow::Result<Vec<SocketNow>> {
    let processes = ProcessSockets::scan();
    let dump = netns::read_in(ns, dump_here)??;
    Ok(describe(ns.inode, &dump, &processes))
}

fn dump_here() -> anyhow::Result<NamespaceDump> {
    let sockets = sockdiag::dump(&sockdiag::teardown_and_listen())?;
    let fin_timeout_secs =
        crate::sys::read_sysctl_u64("/proc/sys/net/ipv4/tcp_fin_timeout").unwrap_or(60);
    Ok(NamespaceDump {
        sockets,
        fin_timeout_secs,
        seen_at_ns: crate::sys::monotonic_ns(),
    })
}

/// The listeners among `sockets` whose holder `processes` knows.
fn owned_listeners<'a>(
    sockets: &'a [DiagSocket],
    processes: &'a ProcessSockets,
) -> impl Iterator<Item = (SocketAddr, Owner)> + 'a {
    sockets
        .iter()
        .filter(|s| s.state == TcpState::Listen)
        .filter_map(|s| Some((s.src, processes.owner_of(s.inode)?)))
}

/// When each of these mini-sockets — (namespace inode, local, remote) —
/// entered TIME_WAIT, in kernel monotonic time, if the kernel says it is
/// there now. Asked one by one (a few among many), inside each namespace;
/// namespace 0 (unknown) is looked for in twtrace's own.
#[must_use]
pub fn time_wait_since(
    queries: &[(u32, SocketAddr, SocketAddr)],
    budget: Option<std::time::Duration>,
) -> Vec<Option<u64>> {
    let deadline = budget.map(|b| Instant::now() + b);
    let in_time = || deadline.is_none_or(|d| Instant::now() < d);
    let mut answers = vec![None; queries.len()];
    let mut by_netns: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, (netns, _, _)) in queries.iter().enumerate() {
        by_netns.entry(*netns).or_default().push(i);
    }
    let own = netns::own().ok();
    let namespaces: HashMap<u64, Namespace> = if by_netns
        .keys()
        .any(|n| Some(u64::from(*n)) != own && *n != 0)
    {
        netns::all().into_iter().map(|ns| (ns.inode, ns)).collect()
    } else {
        HashMap::new()
    };
    for (netns, indices) in by_netns {
        let ask = || -> Vec<(usize, Option<u64>)> {
            let Ok(lookup) = sockdiag::Lookup::new() else {
                return Vec::new();
            };
            indices
                .iter()
                .take_while(|_| in_time())
                .map(|&i| (i, began_time_wait(&lookup, queries[i].1, queries[i].2)))
                .collect()
        };
        let found = if netns == 0 || Some(u64::from(netns)) == own {
            ask()
        } else if let Some(ns) = namespaces.get(&u64::from(netns)) {
            netns::read_in(ns, ask).unwrap_or_default()
        } else {
            // The namespace is gone (and with it, its mini-sockets).
            Vec::new()
        };
        for (i, answer) in found {
            answers[i] = answer;
        }
    }
    answers
}

/// A mini-socket in TIME_WAIT was armed for `TIME_WAIT_LEN_SECS` when it
/// entered it: the time left says when.
fn began_time_wait(lookup: &sockdiag::Lookup, src: SocketAddr, dst: SocketAddr) -> Option<u64> {
    let found = lookup.find(src, dst).ok()??;
    let remaining = found.mini_socket_remaining_ms.map(ms_to_ns)?;
    let now = crate::sys::monotonic_ns();
    (found.state == TcpState::TimeWait)
        .then(|| now.saturating_sub((TIME_WAIT_LEN_SECS * NS_PER_SEC).saturating_sub(remaining)))
}

/// Turns one namespace's diagnostics into sockets with owners and ages.
fn describe(netns: u64, dump: &NamespaceDump, processes: &ProcessSockets) -> Vec<SocketNow> {
    let NamespaceDump {
        sockets,
        fin_timeout_secs,
        seen_at_ns,
    } = dump;
    let (fin_timeout_secs, seen_at_ns) = (*fin_timeout_secs, *seen_at_ns);
    let listeners: Vec<(SocketAddr, Owner)> = owned_listeners(sockets, processes).collect();
    sockets
        .iter()
        .filter(|s| s.state != TcpState::Listen)
        .map(|s| {
            let (owner, owner_source) = match processes.owner_of(s.inode) {
                Some(owner) => (Some(owner), OwnerSource::Process),
                None => match listener_of(&listeners, s.src) {
                    Some(owner) => (Some(owner), OwnerSource::Listener),
                    None => (None, OwnerSource::Unknown),
                },
            };
            let (age_ns, age_exact) = age(s, fin_timeout_secs);
            SocketNow {
                state: s.state,
                src: s.src,
                dst: s.dst,
                owner,
                owner_source,
                netns,
                age_ns,
                age_exact,
                remaining_ns: s.mini_socket_remaining_ms.map(ms_to_ns),
                server_side: listeners
                    .iter()
                    .any(|(addr, _)| addr.port() == s.src.port()),
                seen_at_ns,
            }
        })
        .collect()
}

fn listener_of(listeners: &[(SocketAddr, Owner)], local: SocketAddr) -> Option<Owner> {
    let on_port = || {
        listeners
            .iter()
            .filter(|(addr, _)| addr.port() == local.port())
    };
    // An exact address first, then a wildcard listener.
    on_port()
        .find(|(addr, _)| addr.ip() == local.ip())
        .or_else(|| on_port().find(|(addr, _)| addr.ip().is_unspecified()))
        .map(|(_, owner)| *owner)
}

/// How long the socket has been in its state, and whether that is exact.
///
/// A mini-socket's timer was armed when its substate began: for TIME_WAIT
/// with `TIME_WAIT_LEN_SECS`; for an orphaned FIN_WAIT2 with the
/// namespace's `tcp_fin_timeout` (the kernel keeps the full socket for the
/// part beyond 60 s, so then only the last 60 s are timed). A full socket
/// only tells when data last moved.
fn age(s: &DiagSocket, fin_timeout_secs: u64) -> (u64, bool) {
    if let Some(remaining_ms) = s.mini_socket_remaining_ms {
        let remaining = ms_to_ns(remaining_ms);
        return match s.state {
            TcpState::FinWait2 => {
                let armed = fin_timeout_secs.min(TIME_WAIT_LEN_SECS);
                let before = fin_timeout_secs - armed;
                let age = (armed * NS_PER_SEC).saturating_sub(remaining) + before * NS_PER_SEC;
                (age, before == 0)
            }
            _ => (
                (TIME_WAIT_LEN_SECS * NS_PER_SEC).saturating_sub(remaining),
                true,
            ),
        };
    }
    let recv = s.last_data_recv_ms.map(ms_to_ns);
    let sent = s.last_data_sent_ms.map(ms_to_ns);
    let age = match s.state {
        // The peer's FIN came with or after the last data received.
        TcpState::CloseWait => recv,
        _ => match (recv, sent) {
            (Some(r), Some(s)) => Some(r.min(s)),
            (r, s) => r.or(s),
        },
    };
    (age.unwrap_or(0), false)
}

const NS_PER_SEC: u64 = 1_000_000_000;

fn ms_to_ns(ms: u32) -> u64 {
    u64::from(ms) * 1_000_000
}

/// Which process holds each socket inode, from every `/proc/PID/fd`.
#[derive(Debug, Default)]
pub struct ProcessSockets {
    by_inode: HashMap<u64, Owner>,
}

impl ProcessSockets {
    /// Walks `/proc`; processes that exit meanwhile are skipped. When a
    /// socket is shared (after fork), the lowest pid — usually the parent
    /// — is its owner.
    #[must_use]
    pub fn scan() -> Self {
        let mut pids: Vec<u32> = fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        let mut by_inode = HashMap::new();
        let cgroups = crate::cgroup::v2_root();
        for pid in pids {
            let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            let mut owner = None;
            for fd in fds.flatten() {
                let Some(inode) = fs::read_link(fd.path())
                    .ok()
                    .and_then(|target| socket_inode(target.to_str()?))
                else {
                    continue;
                };
                let owner = *owner.get_or_insert_with(|| Owner {
                    pid,
                    comm: read_comm(pid),
                    cgroup: cgroups
                        .as_deref()
                        .and_then(|root| crate::cgroup::id_of_process(root, pid))
                        .unwrap_or(0),
                });
                by_inode.entry(inode).or_insert(owner);
            }
        }
        Self { by_inode }
    }

    #[must_use]
    pub fn owner_of(&self, inode: u32) -> Option<Owner> {
        (inode != 0)
            .then(|| self.by_inode.get(&u64::from(inode)).copied())
            .flatten()
    }
}

fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn read_comm(pid: u32) -> Comm {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_or(Comm::UNKNOWN, |c| Comm::from(c.trim_end()))
}

/// Which sockets a command shows: the same filters as tracing, plus state
/// and age.
#[derive(Clone, Debug, Default)]
pub struct SocketFilter {
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    /// `Some(true)`: IPv4 only; `Some(false)`: IPv6 only.
    pub ipv4: Option<bool>,
    pub states: Vec<TcpState>,
    pub older_than_ns: Option<u64>,
    pub netns: Option<u64>,
}

impl SocketFilter {
    #[must_use]
    pub fn matches(&self, s: &SocketNow) -> bool {
        let pid = s.owner.map(|o| o.pid);
        (self.pids.is_empty() || pid.is_some_and(|p| self.pids.contains(&p)))
            && (self.ports.is_empty()
                || self.ports.contains(&s.src.port())
                || self.ports.contains(&s.dst.port()))
            && self.ipv4.is_none_or(|v4| s.src.is_ipv4() == v4)
            && (self.states.is_empty() || self.states.contains(&s.state))
            && self.older_than_ns.is_none_or(|limit| s.age_ns > limit)
            && self.netns.is_none_or(|netns| s.netns == netns)
    }
}

/// Sockets grouped by owner, namespace and state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketGroup {
    /// The group's name under `--by` other than pid (then `owner` and
    /// `netns` are the first socket's).
    pub name: Option<String>,
    pub owner: Option<Owner>,
    pub netns: u64,
    pub state: TcpState,
    pub count: u64,
    pub oldest_age_ns: u64,
    /// The remote ends most sockets point to, most first (at most 3): the
    /// client's address for a server's sockets (its ports all differ),
    /// else the address and port.
    pub top_remotes: Vec<(String, u64)>,
}

/// Groups sockets by (owner pid, namespace, state), or by (`name`,
/// state) where `name` names a socket's group: biggest group first.
#[must_use]
pub fn group(
    sockets: &[SocketNow],
    mut name: impl FnMut(&SocketNow) -> Option<String>,
) -> Vec<SocketGroup> {
    type Key = (Option<String>, u32, u64, TcpState);
    let mut groups: BTreeMap<Key, (SocketGroup, HashMap<String, u64>)> = BTreeMap::new();
    for s in sockets {
        let named = name(s);
        let key = match named {
            Some(_) => (named.clone(), 0, 0, s.state),
            None => (None, s.owner.map_or(0, |o| o.pid), s.netns, s.state),
        };
        let (group, remotes) = groups.entry(key).or_insert_with(|| {
            let group = SocketGroup {
                name: named,
                owner: s.owner,
                netns: s.netns,
                state: s.state,
                count: 0,
                oldest_age_ns: 0,
                top_remotes: Vec::new(),
            };
            (group, HashMap::new())
        });
        group.count += 1;
        group.oldest_age_ns = group.oldest_age_ns.max(s.age_ns);
        let remote = if s.server_side {
            s.dst.ip().to_string()
        } else {
            s.dst.to_string()
        };
        *remotes.entry(remote).or_default() += 1;
    }
    let mut out: Vec<SocketGroup> = groups
        .into_values()
        .map(|(mut group, remotes)| {
            let mut remotes: Vec<(String, u64)> = remotes.into_iter().collect();
            remotes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            remotes.truncate(3);
            group.top_remotes = remotes;
            group
        })
        .collect();
    out.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(b.oldest_age_ns.cmp(&a.oldest_age_ns))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(state: TcpState, src: &str, inode: u32, remaining_ms: Option<u32>) -> DiagSocket {
        DiagSocket {
            state,
            src: src.parse().unwrap(),
            dst: "10.0.0.9:5000".parse().unwrap(),
            inode,
            mini_socket_remaining_ms: remaining_ms,
            last_data_recv_ms: (inode != 0).then_some(30_000),
            last_data_sent_ms: (inode != 0).then_some(40_000),
        }
    }

    fn dump(sockets: &[DiagSocket], fin_timeout_secs: u64) -> NamespaceDump {
        NamespaceDump {
            sockets: sockets.to_vec(),
            fin_timeout_secs,
            seen_at_ns: 0,
        }
    }

    fn processes(pairs: &[(u64, u32, &str)]) -> ProcessSockets {
        ProcessSockets {
            by_inode: pairs
                .iter()
                .map(|&(inode, pid, comm)| {
                    let comm = Comm::from(comm);
                    (
                        inode,
                        Owner {
                            pid,
                            comm,
                            cgroup: 0,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn mini_sockets_are_aged_from_their_timer_and_owned_by_the_listener() {
        let sockets = [
            diag(TcpState::Listen, "0.0.0.0:80", 11, None),
            diag(TcpState::TimeWait, "10.0.0.1:80", 0, Some(45_000)),
            diag(TcpState::FinWait2, "10.0.0.1:80", 0, Some(50_000)),
            diag(TcpState::TimeWait, "10.0.0.1:40000", 0, Some(1_000)),
        ];
        let got = describe(7, &dump(&sockets, 60), &processes(&[(11, 100, "nginx")]));
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].age_ns, 15 * NS_PER_SEC);
        assert!(got[0].age_exact);
        assert_eq!(got[0].owner.unwrap().pid, 100);
        assert_eq!(got[0].owner_source, OwnerSource::Listener);
        assert_eq!(got[1].age_ns, 10 * NS_PER_SEC);
        assert_eq!(got[1].remaining_ns, Some(50 * NS_PER_SEC));
        // A client-side mini-socket: no listener on its port.
        assert_eq!(got[2].owner, None);
        assert_eq!(got[2].owner_source, OwnerSource::Unknown);
        assert_eq!(got[2].age_ns, 59 * NS_PER_SEC);
        assert_eq!(got[2].netns, 7);
    }

    #[test]
    fn fin_wait2_beyond_sixty_seconds_is_an_estimate() {
        let s = diag(TcpState::FinWait2, "10.0.0.1:40000", 0, Some(20_000));
        assert_eq!(age(&s, 90), (70 * NS_PER_SEC, false));
        assert_eq!(age(&s, 30), (10 * NS_PER_SEC, true));
    }

    #[test]
    fn full_sockets_are_owned_by_their_process_and_aged_as_an_upper_bound() {
        let sockets = [
            diag(TcpState::CloseWait, "10.0.0.1:80", 21, None),
            diag(TcpState::LastAck, "10.0.0.1:80", 22, None),
        ];
        let got = describe(
            7,
            &dump(&sockets, 60),
            &processes(&[(21, 5, "leaky"), (22, 6, "ok")]),
        );
        assert_eq!(
            (got[0].owner.unwrap().pid, got[0].age_ns),
            (5, 30 * NS_PER_SEC)
        );
        assert!(!got[0].age_exact);
        assert_eq!(got[0].owner_source, OwnerSource::Process);
        // Neither side's data moved for 30 s: the state began within them.
        assert_eq!(got[1].age_ns, 30 * NS_PER_SEC);
    }

    #[test]
    fn groups_count_and_age_per_owner_namespace_and_state() {
        let mut sockets = describe(
            7,
            &dump(
                &[
                    diag(TcpState::Listen, "0.0.0.0:80", 11, None),
                    diag(TcpState::CloseWait, "10.0.0.1:80", 21, None),
                    diag(TcpState::CloseWait, "10.0.0.1:80", 22, None),
                    diag(TcpState::TimeWait, "10.0.0.1:40000", 0, Some(1_000)),
                ],
                60,
            ),
            &processes(&[(21, 5, "leaky"), (22, 5, "leaky"), (11, 5, "leaky")]),
        );
        sockets[1].age_ns = 99;
        let groups = group(&sockets, |_| None);
        assert_eq!(groups.len(), 2);
        assert_eq!((groups[0].state, groups[0].count), (TcpState::CloseWait, 2));
        assert_eq!(groups[0].oldest_age_ns, 30 * NS_PER_SEC);
        // The server's sockets: grouped by the client's address.
        assert_eq!(groups[0].top_remotes, vec![("10.0.0.9".to_owned(), 2)]);
        assert_eq!(groups[1].owner, None);
        // Named groups (`--by`): one per name and state, whoever owns them.
        let named = group(&sockets, |s| Some(format!("pod-{}", s.owner.is_some())));
        assert_eq!(named.len(), 2);
        assert_eq!(
            (named[0].name.as_deref(), named[0].count),
            (Some("pod-true"), 2)
        );
    }

    #[test]
    fn socket_links_are_told_from_other_fds() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("pipe:[12345]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }
}
