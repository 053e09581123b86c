//! Time-in-state distributions, overall and per owner process, and who
//! closed first. Pure: fed transitions, read as snapshots.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{
    census::InStateNow,
    ends::EndCounts,
    event::{CloseSide, Comm, Owner, TcpState, Transition},
};

/// 1 µs .. 10 min at 3 significant digits, in nanoseconds.
const LOWEST_NS: u64 = 1_000;
const HIGHEST_NS: u64 = 600_000_000_000;
const SIGFIG: u8 = 3;

/// The states whose duration twtrace measures, in teardown order.
pub const TEARDOWN_STATES: [TcpState; 6] = [
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::Closing,
    TcpState::TimeWait,
    TcpState::CloseWait,
    TcpState::LastAck,
];

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(LOWEST_NS, HIGHEST_NS, SIGFIG).expect("constant bounds are valid")
}

/// One histogram per teardown state (the time of each socket that left
/// it), and how many sockets entered each.
#[derive(Clone, Debug)]
pub struct StateHistograms {
    by_state: BTreeMap<TcpState, Histogram<u64>>,
    entered: BTreeMap<TcpState, u64>,
}

impl Default for StateHistograms {
    fn default() -> Self {
        Self {
            by_state: TEARDOWN_STATES
                .iter()
                .map(|&s| (s, new_histogram()))
                .collect(),
            entered: BTreeMap::new(),
        }
    }
}

impl StateHistograms {
    /// Records `ns` spent in `state`; other states are ignored. Values
    /// past 10 min are clamped to it rather than lost.
    pub fn record(&mut self, state: TcpState, ns: u64) {
        if let Some(h) = self.by_state.get_mut(&state) {
            h.saturating_record(ns.clamp(LOWEST_NS, HIGHEST_NS));
        }
    }

    /// A socket entered `state`.
    pub fn enter(&mut self, state: TcpState) {
        if TEARDOWN_STATES.contains(&state) {
            *self.entered.entry(state).or_default() += 1;
        }
    }

    /// No socket entered or left any state.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entered.values().all(|&n| n == 0) && self.by_state.values().all(Histogram::is_empty)
    }

    /// Adds everything `other` counted.
    pub fn merge(&mut self, other: &Self) {
        for (state, h) in &other.by_state {
            if let Some(mine) = self.by_state.get_mut(state) {
                // Both share the same bounds, so adding cannot fail.
                let _ = mine.add(h);
            }
        }
        for (state, n) in &other.entered {
            *self.entered.entry(*state).or_default() += n;
        }
    }

    #[must_use]
    pub fn entered(&self, state: TcpState) -> u64 {
        self.entered.get(&state).copied().unwrap_or(0)
    }

    #[must_use]
    pub fn get(&self, state: TcpState) -> Option<&Histogram<u64>> {
        self.by_state.get(&state)
    }

    /// Per-state statistics, only for states with data.
    #[must_use]
    pub fn stats(&self) -> Vec<StateStats> {
        self.stats_with_now(|_| InStateNow::default())
    }

    /// Per-state statistics with the sockets in each state now, for every
    /// state that any socket entered, left or sits in.
    #[must_use]
    pub fn stats_with_now(&self, now: impl Fn(TcpState) -> InStateNow) -> Vec<StateStats> {
        TEARDOWN_STATES
            .iter()
            .filter_map(|&state| {
                let h = &self.by_state[&state];
                let stats = StateStats::of(state, h, self.entered(state), now(state));
                (stats.entered > 0 || stats.count > 0 || stats.now > 0).then_some(stats)
            })
            .collect()
    }
}

/// One state: sockets that entered it, left it (`count`, with the
/// percentiles of their time in it, in nanoseconds) and sit in it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StateStats {
    pub state: &'static str,
    pub entered: u64,
    /// Sockets that left the state (the distribution is over these).
    pub count: u64,
    /// Sockets in the state now (those the host held at start included),
    /// and how long the oldest has been in it.
    pub now: u64,
    pub oldest_now_ns: u64,
    /// Whether that age is exact (else an upper bound).
    pub oldest_now_exact: bool,
    pub min_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

impl StateStats {
    fn of(state: TcpState, h: &Histogram<u64>, entered: u64, now: InStateNow) -> Self {
        // HDR reports percentiles as the highest equivalent value of their
        // bucket (within 0.1 % at 3 significant digits); the minimum is
        // reported the same way so that min <= p50 always reads right.
        Self {
            state: state.name(),
            entered,
            count: h.len(),
            now: now.count,
            oldest_now_ns: now.oldest_age_ns,
            oldest_now_exact: now.oldest_exact,
            min_ns: if h.is_empty() {
                0
            } else {
                h.highest_equivalent(h.min())
            },
            p50_ns: h.value_at_quantile(0.50),
            p90_ns: h.value_at_quantile(0.90),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
        }
    }
}

impl StateStats {
    /// The row every table of states prints: state, entered, left, now,
    /// the oldest's age (`≤`: an upper bound), then min, p50, p90, p99,
    /// p99.9 and max of those that left (`-` while none has).
    #[must_use]
    pub fn cells(&self) -> [String; 11] {
        let left = |ns| {
            if self.count == 0 {
                "-".to_owned()
            } else {
                crate::units::duration(ns)
            }
        };
        let oldest = match (self.now, self.oldest_now_exact) {
            (0, _) => "-".to_owned(),
            (_, true) => crate::units::duration(self.oldest_now_ns),
            (_, false) => format!("≤{}", crate::units::duration(self.oldest_now_ns)),
        };
        [
            self.state.to_owned(),
            self.entered.to_string(),
            self.count.to_string(),
            self.now.to_string(),
            oldest,
            left(self.min_ns),
            left(self.p50_ns),
            left(self.p90_ns),
            left(self.p99_ns),
            left(self.p999_ns),
            left(self.max_ns),
        ]
    }
}

/// The titles of `StateStats::cells`.
pub const STATE_COLUMNS: [&str; 11] = [
    "STATE", "ENTERED", "LEFT", "NOW", "OLDEST", "MIN", "P50", "P90", "P99", "P99.9", "MAX",
];

/// The process a socket belonged to, with the cgroup it was in; pid 0
/// for "not known". The finest grain twtrace counts by: every coarser
/// grouping (`grouping`) is a union of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnerKey {
    pub pid: u32,
    pub comm: Comm,
    pub cgroup: u64,
}

impl OwnerKey {
    /// The transition's owner, or pid 0 / comm `-` when it was not learnt.
    #[must_use]
    pub fn of(t: &Transition) -> Self {
        Self::of_owner(t.owner)
    }

    #[must_use]
    pub fn of_owner(owner: Option<Owner>) -> Self {
        owner.map_or(
            Self {
                pid: 0,
                comm: Comm::UNKNOWN,
                cgroup: 0,
            },
            |o| Self {
                pid: o.pid,
                comm: o.comm,
                cgroup: o.cgroup,
            },
        )
    }
}

#[derive(Clone, Debug, Default)]
pub struct OwnerStats {
    /// Connections this process closed first (its socket went
    /// ESTABLISHED -> FIN_WAIT1, including simultaneous closes).
    pub active_closes: u64,
    /// Connections the peer closed first (ESTABLISHED -> CLOSE_WAIT).
    pub passive_closes: u64,
    pub states: StateHistograms,
    /// Connections ended, by how.
    pub ends: EndCounts,
}

impl OwnerStats {
    /// Adds everything `other` counted.
    pub fn merge(&mut self, other: &Self) {
        self.active_closes += other.active_closes;
        self.passive_closes += other.passive_closes;
        self.states.merge(&other.states);
        self.ends.merge(&other.ends);
    }

    fn record(&mut self, t: &Transition) {
        match t.close_side() {
            Some(CloseSide::Active) => self.active_closes += 1,
            Some(CloseSide::Passive) => self.passive_closes += 1,
            None => {}
        }
        if let Some(ns) = t.in_state_ns {
            self.states.record(t.old, ns);
        }
        if t.old != t.new {
            self.states.enter(t.new);
        }
        self.ends.record(t);
    }
}

/// Everything `summary` reports: the same counts overall, per owner and
/// per network namespace.
#[derive(Clone, Debug, Default)]
pub struct TeardownStats {
    pub total: OwnerStats,
    pub owners: BTreeMap<OwnerKey, OwnerStats>,
    /// Per network namespace inode (0: not known).
    pub namespaces: BTreeMap<u64, OwnerStats>,
}

impl TeardownStats {
    pub fn record(&mut self, t: &Transition) {
        self.total.record(t);
        self.owners.entry(OwnerKey::of(t)).or_default().record(t);
        self.namespaces
            .entry(u64::from(t.netns))
            .or_default()
            .record(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn t(pid: u32, old: TcpState, new: TcpState, ns: Option<u64>) -> Transition {
        Transition {
            ts_ns: 0,
            sock_id: 1,
            owner: (pid != 0).then(|| Owner {
                pid,
                comm: Comm::from(format!("p{pid}").as_str()),
                cgroup: 0,
            }),
            src: "127.0.0.1:1".parse().unwrap(),
            dst: "127.0.0.1:2".parse().unwrap(),
            old,
            new,
            in_state_ns: ns,
            end: None,
            netns: 0,
            accepted: false,
            ending: None,
        }
    }

    /// Relative error allowed by 3 significant digits.
    fn close(actual: u64, expected: u64) -> bool {
        actual.abs_diff(expected) * 1000 <= expected
    }

    #[test]
    fn percentiles_of_one_to_a_thousand_milliseconds() {
        let mut h = StateHistograms::default();
        for ms in 1..=1000 {
            h.record(TcpState::TimeWait, ms * MS);
        }
        let stats = h.stats();
        assert_eq!(stats.len(), 1);
        let s = &stats[0];
        assert_eq!((s.state, s.count), ("TIME_WAIT", 1000));
        for (got, want) in [
            (s.min_ns, MS),
            (s.p50_ns, 500 * MS),
            (s.p90_ns, 900 * MS),
            (s.p99_ns, 990 * MS),
            (s.p999_ns, 999 * MS),
            (s.max_ns, 1000 * MS),
        ] {
            assert!(close(got, want), "got {got}, want {want}");
        }
    }

    #[test]
    fn a_single_value_is_every_percentile() {
        let mut h = StateHistograms::default();
        h.record(TcpState::CloseWait, 200 * MS);
        let s = &h.stats()[0];
        for v in [s.min_ns, s.p50_ns, s.p99_ns, s.max_ns] {
            assert!(close(v, 200 * MS), "{v}");
        }
        assert_eq!(s.min_ns, s.p50_ns);
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let mut h = StateHistograms::default();
        h.record(TcpState::LastAck, 10);
        h.record(TcpState::LastAck, 3_600_000_000_000);
        let s = &h.stats()[0];
        assert_eq!(s.count, 2);
        // Below 1 µs the histogram does not resolve: the minimum reads as
        // its lowest bucket, never above 1 µs.
        assert!(s.min_ns <= LOWEST_NS + LOWEST_NS / 10, "{}", s.min_ns);
        assert!(close(s.max_ns, HIGHEST_NS));
    }

    #[test]
    fn non_teardown_states_are_not_recorded() {
        let mut h = StateHistograms::default();
        h.record(TcpState::Established, MS);
        assert!(h.stats().is_empty());
    }

    #[test]
    fn active_and_passive_closes_per_owner() {
        let mut stats = TeardownStats::default();
        stats.record(&t(1, TcpState::Established, TcpState::FinWait1, Some(MS)));
        stats.record(&t(1, TcpState::FinWait1, TcpState::FinWait2, Some(2 * MS)));
        stats.record(&t(2, TcpState::Established, TcpState::CloseWait, Some(MS)));
        stats.record(&t(
            2,
            TcpState::CloseWait,
            TcpState::LastAck,
            Some(200 * MS),
        ));
        stats.record(&t(0, TcpState::TimeWait, TcpState::Close, None));
        assert_eq!(
            (stats.total.active_closes, stats.total.passive_closes),
            (1, 1)
        );
        let owner = |pid| {
            stats
                .owners
                .iter()
                .find(|(k, _)| k.pid == pid)
                .map(|(_, v)| v)
                .unwrap()
        };
        assert_eq!((owner(1).active_closes, owner(1).passive_closes), (1, 0));
        assert_eq!((owner(2).active_closes, owner(2).passive_closes), (0, 1));
        assert_eq!(owner(0).states.stats(), []);
        // Entered CLOSE_WAIT and left it; entered LAST_ACK, still there.
        let p2 = owner(2).states.stats();
        let p2: Vec<_> = p2.iter().map(|s| (s.state, s.entered, s.count)).collect();
        assert_eq!(p2, [("CLOSE_WAIT", 1, 1), ("LAST_ACK", 1, 0)]);
        // FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT and LAST_ACK entered; TIME_WAIT
        // left (by a socket seen only at its end).
        let overall: Vec<_> = stats
            .total
            .states
            .stats()
            .iter()
            .map(|s| (s.state, s.entered, s.count))
            .collect();
        assert_eq!(
            overall,
            [
                ("FIN_WAIT1", 1, 1),
                ("FIN_WAIT2", 1, 0),
                ("CLOSE_WAIT", 1, 1),
                ("LAST_ACK", 1, 0)
            ]
        );
    }
}
