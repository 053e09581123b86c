//! Sockets in each teardown state *now*: seeded by the snapshot taken when
//! tracing starts (what the host already held), then kept by every
//! transition. Pure: fed sockets, transitions and the kernel clock.
//!
//! A socket is one end of a connection: its (local, remote) addresses.
//! Mini-sockets born before tracing began end with no event the kernel
//! program can tie to them (it holds no record of them), so they leave at
//! the moment their timer says; one that ends early (port reuse, its
//! namespace deleted) stays until then.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
};

use rustc_hash::FxHashMap;

use crate::{
    event::{Owner, TcpState, Transition},
    histogram::{OwnerKey, TEARDOWN_STATES},
    snapshot::SocketNow,
};

/// One socket in the census. Compact: a host may hold a few hundred
/// thousand sockets in TIME_WAIT.
#[derive(Clone, Copy, Debug)]
struct Resident {
    /// Kernel monotonic time the state began.
    since_ns: u64,
    /// Seeded mini-sockets: when the kernel frees it; 0 for the others.
    ends_ns: u64,
    owner: Option<Owner>,
    /// Its network namespace's inode; 0 when unknown.
    netns: u32,
    state: TcpState,
    since_exact: bool,
}

/// One end of a connection: namespace, local and remote address, packed
/// (IPv4 as IPv4-mapped IPv6) into 40 bytes rather than 72.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SocketKey {
    netns: u32,
    src_port: u16,
    dst_port: u16,
    src: [u8; 16],
    dst: [u8; 16],
}

impl SocketKey {
    fn new(netns: u32, src: SocketAddr, dst: SocketAddr) -> Self {
        let octets = |ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        Self {
            netns,
            src_port: src.port(),
            dst_port: dst.port(),
            src: octets(src.ip()),
            dst: octets(dst.ip()),
        }
    }
}

/// How many sockets sit in one state now, and the oldest one's age.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InStateNow {
    pub count: u64,
    pub oldest_age_ns: u64,
    /// Whether that age is exact (else an upper bound).
    pub oldest_exact: bool,
}

impl InStateNow {
    fn add(&mut self, age_ns: u64, exact: bool) {
        self.count += 1;
        if age_ns >= self.oldest_age_ns {
            self.oldest_age_ns = age_ns;
            self.oldest_exact = exact;
        }
    }

    /// Counts `other`'s sockets too.
    pub fn merge(&mut self, other: &Self) {
        self.count += other.count;
        if other.count > 0 && other.oldest_age_ns >= self.oldest_age_ns {
            self.oldest_age_ns = other.oldest_age_ns;
            self.oldest_exact = other.oldest_exact;
        }
    }
}

/// The census at one moment: per state, overall and per owner pid.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CensusNow {
    pub states: BTreeMap<TcpState, InStateNow>,
    pub by_owner: HashMap<OwnerKey, BTreeMap<TcpState, InStateNow>>,
    pub by_netns: BTreeMap<u64, BTreeMap<TcpState, InStateNow>>,
    /// Sockets older than the threshold the census was asked with, per state.
    pub older_than: BTreeMap<TcpState, u64>,
}

impl CensusNow {
    #[must_use]
    pub fn state(&self, state: TcpState) -> InStateNow {
        self.states.get(&state).copied().unwrap_or_default()
    }

    #[must_use]
    pub fn of_owner(&self, owner: &OwnerKey, state: TcpState) -> InStateNow {
        self.by_owner
            .get(owner)
            .and_then(|states| states.get(&state))
            .copied()
            .unwrap_or_default()
    }

    #[must_use]
    pub fn of_netns(&self, netns: u64, state: TcpState) -> InStateNow {
        self.by_netns
            .get(&netns)
            .and_then(|states| states.get(&state))
            .copied()
            .unwrap_or_default()
    }

    /// The same, for whichever command name the pid had.
    #[must_use]
    pub fn of_pid(&self, pid: u32, state: TcpState) -> InStateNow {
        let mut total = InStateNow::default();
        for (_, states) in self.by_owner.iter().filter(|(o, _)| o.pid == pid) {
            if let Some(s) = states.get(&state) {
                total.merge(s);
            }
        }
        total
    }
}

#[derive(Debug, Default)]
pub struct Census {
    // Fx: a hash per transition on the hot path; the keys are the
    // kernel's addresses, not input an attacker picks to collide.
    sockets: FxHashMap<SocketKey, Resident>,
    /// Whether transitions carry their namespace; if not, sockets are told
    /// apart by their addresses alone.
    namespaces_known: bool,
    /// While a snapshot is being taken: the sockets that changed since it
    /// began. The snapshot may have seen them before the change, so it
    /// must not overwrite what the transitions said.
    changed_during_snapshot: Option<HashSet<SocketKey>>,
}

impl Census {
    #[must_use]
    pub fn new(namespaces_known: bool) -> Self {
        Self {
            namespaces_known,
            ..Self::default()
        }
    }

    fn key(&self, netns: u32, src: SocketAddr, dst: SocketAddr) -> SocketKey {
        SocketKey::new(if self.namespaces_known { netns } else { 0 }, src, dst)
    }

    /// A snapshot is about to be taken (after tracing began).
    pub fn begin_snapshot(&mut self) {
        self.changed_during_snapshot = Some(HashSet::new());
    }

    /// Adds what the host held, as the snapshot saw it.
    pub fn seed<'a>(&mut self, sockets: impl IntoIterator<Item = &'a SocketNow>) {
        let changed = self.changed_during_snapshot.take().unwrap_or_default();
        for s in sockets {
            let netns = u32::try_from(s.netns).unwrap_or(0);
            let key = self.key(netns, s.src, s.dst);
            // A transition seen since the snapshot began is fresher.
            if changed.contains(&key) {
                continue;
            }
            let resident = Resident {
                state: s.state,
                owner: s.owner,
                netns,
                since_ns: s.seen_at_ns.saturating_sub(s.age_ns),
                since_exact: s.age_exact,
                ends_ns: s
                    .remaining_ns
                    .map_or(0, |r| s.seen_at_ns.saturating_add(r).max(1)),
            };
            self.sockets.insert(key, resident);
        }
    }

    /// Follows one transition: into a teardown state it stays, anywhere
    /// else (CLOSE above all) it leaves.
    pub fn record(&mut self, t: &Transition) {
        let key = self.key(t.netns, t.src, t.dst);
        if let Some(changed) = &mut self.changed_during_snapshot {
            changed.insert(key);
        }
        if !TEARDOWN_STATES.contains(&t.new) {
            self.sockets.remove(&key);
            return;
        }
        let owner = t
            .owner
            .or_else(|| self.sockets.get(&key).and_then(|r| r.owner));
        self.sockets.insert(
            key,
            Resident {
                state: t.new,
                owner,
                netns: t.netns,
                since_ns: t.ts_ns,
                since_exact: true,
                ends_ns: 0,
            },
        );
    }

    /// Lets seeded mini-sockets whose timer ran out go.
    pub fn expire(&mut self, now_ns: u64) {
        self.sockets
            .retain(|_, r| r.ends_ns == 0 || r.ends_ns > now_ns);
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Counts and oldest ages at `now_ns`; `threshold_ns` sets what
    /// `older_than` counts.
    #[must_use]
    pub fn now(&self, now_ns: u64, threshold_ns: u64) -> CensusNow {
        let mut out = CensusNow::default();
        for r in self.sockets.values() {
            let age = now_ns.saturating_sub(r.since_ns);
            let count = |states: &mut BTreeMap<TcpState, InStateNow>| {
                states.entry(r.state).or_default().add(age, r.since_exact);
            };
            count(&mut out.states);
            count(out.by_netns.entry(u64::from(r.netns)).or_default());
            count(out.by_owner.entry(OwnerKey::of_owner(r.owner)).or_default());
            if age > threshold_ns {
                *out.older_than.entry(r.state).or_default() += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{event::Comm, snapshot::OwnerSource};

    const S: u64 = 1_000_000_000;

    /// Seen by the snapshot at 1000 s.
    fn seeded(state: TcpState, src: &str, age_s: u64, remaining_s: Option<u64>) -> SocketNow {
        SocketNow {
            state,
            src: src.parse().unwrap(),
            dst: "10.0.0.2:80".parse().unwrap(),
            owner: Some(Owner {
                pid: 9,
                comm: Comm::from("leaky"),
                cgroup: 0,
            }),
            owner_source: OwnerSource::Process,
            netns: 1,
            age_ns: age_s * S,
            age_exact: remaining_s.is_some(),
            remaining_ns: remaining_s.map(|r| r * S),
            server_side: false,
            seen_at_ns: 1000 * S,
        }
    }

    fn transition(src: &str, old: TcpState, new: TcpState, ts_s: u64) -> Transition {
        Transition {
            ts_ns: ts_s * S,
            sock_id: 1,
            owner: None,
            src: src.parse().unwrap(),
            dst: "10.0.0.2:80".parse().unwrap(),
            old,
            new,
            in_state_ns: None,
            end: None,
            netns: 0,
            accepted: false,
            ending: None,
        }
    }

    #[test]
    fn seeded_sockets_count_from_the_start_and_keep_ageing() {
        let mut census = Census::default();
        census.seed(&[
            seeded(TcpState::CloseWait, "10.0.0.1:1", 100, None),
            seeded(TcpState::CloseWait, "10.0.0.1:2", 30, None),
            seeded(TcpState::TimeWait, "10.0.0.1:3", 50, Some(10)),
        ]);
        let now = census.now(1005 * S, 60 * S);
        let cw = now.state(TcpState::CloseWait);
        assert_eq!(
            (cw.count, cw.oldest_age_ns, cw.oldest_exact),
            (2, 105 * S, false)
        );
        assert_eq!(now.of_pid(9, TcpState::TimeWait).count, 1);
        assert_eq!(now.older_than[&TcpState::CloseWait], 1);
        // The seeded TIME_WAIT's timer runs out 10 s after the snapshot.
        census.expire(1011 * S);
        assert_eq!(
            census.now(1011 * S, 60 * S).state(TcpState::TimeWait).count,
            0
        );
    }

    #[test]
    fn transitions_move_sockets_between_states_and_keep_a_known_owner() {
        let mut census = Census::default();
        census.seed(&[seeded(TcpState::CloseWait, "10.0.0.1:1", 100, None)]);
        census.record(&transition(
            "10.0.0.1:1",
            TcpState::CloseWait,
            TcpState::LastAck,
            1001,
        ));
        let now = census.now(1002 * S, 60 * S);
        assert_eq!(now.state(TcpState::CloseWait).count, 0);
        let last_ack = now.of_pid(9, TcpState::LastAck);
        assert_eq!((last_ack.count, last_ack.oldest_age_ns), (1, S));
        census.record(&transition(
            "10.0.0.1:1",
            TcpState::LastAck,
            TcpState::Close,
            1003,
        ));
        assert!(census.is_empty());
    }

    #[test]
    fn a_socket_that_changed_while_the_snapshot_was_taken_is_not_overwritten() {
        let mut census = Census::default();
        census.begin_snapshot();
        // The dump saw both in CLOSE_WAIT; meanwhile one closed and the
        // other moved on.
        census.record(&transition(
            "10.0.0.1:1",
            TcpState::LastAck,
            TcpState::Close,
            999,
        ));
        census.record(&transition(
            "10.0.0.1:2",
            TcpState::CloseWait,
            TcpState::LastAck,
            999,
        ));
        census.seed(&[
            seeded(TcpState::CloseWait, "10.0.0.1:1", 5, None),
            seeded(TcpState::CloseWait, "10.0.0.1:2", 5, None),
            seeded(TcpState::CloseWait, "10.0.0.1:3", 5, None),
        ]);
        let now = census.now(1000 * S, 60 * S);
        assert_eq!(now.state(TcpState::CloseWait).count, 1);
        assert_eq!(now.state(TcpState::LastAck).count, 1);
        // Later transitions are not held against a finished snapshot.
        census.record(&transition(
            "10.0.0.1:3",
            TcpState::CloseWait,
            TcpState::LastAck,
            1001,
        ));
        assert_eq!(
            census.now(1002 * S, 60 * S).state(TcpState::LastAck).count,
            2
        );
    }
}
