//! The live view's model: per-process counters, rates and distributions.
//! Pure: fed transitions and told the time, it hands out snapshots that
//! the view renders without any logic of its own.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use crate::{
    cgroup::Workload,
    ends::{EndCounts, EndKind},
    event::{CloseSide, TcpState, Transition},
    grouping::{self, GroupBy},
    histogram::{OwnerKey, StateHistograms, StateStats, TEARDOWN_STATES},
    top::trend::{Ring, Trends},
};

/// A process's own trend: two minutes at the default refresh (the view's
/// history for the whole host is longer).
const PROCESS_TREND: usize = 120;

/// A route forecast to run out of ports within this many seconds marks the
/// processes closing toward it.
pub const PORTS_HORIZON_S: f64 = 300.0;

/// Remote endpoints remembered per process; beyond it new ones are pooled.
const MAX_REMOTES: usize = 256;

/// What one owner's sockets in one network namespace did.
#[derive(Clone, Debug, Default)]
struct OwnerCounters {
    active: u64,
    passive: u64,
    /// Connections it reset or that were reset under it.
    resets: u64,
    ends: EndCounts,
    states: StateHistograms,
    remotes: HashMap<Remote, u64>,
    remotes_other: u64,
}

impl OwnerCounters {
    fn merge(&mut self, other: &Self) {
        self.active += other.active;
        self.passive += other.passive;
        self.resets += other.resets;
        self.ends.merge(&other.ends);
        self.states.merge(&other.states);
        for (remote, n) in &other.remotes {
            if let Some(count) = self.remotes.get_mut(remote) {
                *count += n;
            } else if self.remotes.len() < MAX_REMOTES {
                self.remotes.insert(*remote, *n);
            } else {
                self.remotes_other += n;
            }
        }
        self.remotes_other += other.remotes_other;
    }
}

/// A row's own trend: closes per interval, and sockets held (TIME_WAIT,
/// FIN_WAIT2, CLOSE_WAIT) at each snapshot.
#[derive(Debug)]
struct RowTrend {
    closes: Ring,
    held: Ring,
}

impl Default for RowTrend {
    fn default() -> Self {
        Self {
            closes: Ring::with_capacity(PROCESS_TREND),
            held: Ring::with_capacity(PROCESS_TREND),
        }
    }
}

/// Who an owner's sockets are: the process (with its cgroup) and the
/// network namespace they live in.
type CounterKey = (OwnerKey, u32);

/// What a row gathers while a snapshot is made: its members' counters and
/// the owners (or the namespace) whose sockets it counts now.
#[derive(Default)]
struct RowMembers<'a> {
    counters: Vec<&'a OwnerCounters>,
    owners: std::collections::BTreeSet<OwnerKey>,
    netns: Option<u64>,
    pids: std::collections::BTreeSet<u32>,
    delta: (u64, u64),
    delta_resets: u64,
}

/// The shape of one state's time distribution: counts in log-spaced
/// buckets (1-2-5 per decade), with its p50 and p99.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub state: &'static str,
    /// (upper bound in ns, sockets whose time fell in the bucket), from
    /// the first bucket with any to the last.
    pub buckets: Vec<(u64, u64)>,
    pub p50_ns: u64,
    pub p99_ns: u64,
}

/// Bucket upper bounds: 1 µs .. 10 min, 1-2-5 per decade.
fn bucket_bounds() -> Vec<u64> {
    let mut bounds = Vec::new();
    let mut decade = 1_000u64;
    while decade < 600_000_000_000 {
        for step in [1, 2, 5] {
            bounds.push(decade * step);
        }
        decade *= 10;
    }
    bounds.push(600_000_000_000);
    bounds
}

fn shape_of(state: TcpState, h: &hdrhistogram::Histogram<u64>) -> Option<Shape> {
    if h.is_empty() {
        return None;
    }
    let mut lower = 0;
    let mut buckets: Vec<(u64, u64)> = bucket_bounds()
        .into_iter()
        .map(|upper| {
            let count = h.count_between(lower, upper.saturating_sub(1));
            lower = upper;
            (upper, count)
        })
        .collect();
    let first = buckets.iter().position(|b| b.1 > 0)?;
    let last = buckets.iter().rposition(|b| b.1 > 0)?;
    buckets.truncate(last + 1);
    buckets.drain(..first);
    Some(Shape {
        state: state.name(),
        buckets,
        p50_ns: h.value_at_quantile(0.5),
        p99_ns: h.value_at_quantile(0.99),
    })
}

/// Who a process's connections talk to: the peer's address and, when the
/// peer is the service side, its port (a server's clients each use a new
/// ephemeral port, so they are pooled per address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Remote {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl Remote {
    fn of(t: &Transition) -> Self {
        let service_side_is_remote = t.dst.port() < t.src.port();
        Self {
            ip: t.dst.ip(),
            port: service_side_is_remote.then_some(t.dst.port()),
        }
    }
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addr = |port| SocketAddr::new(self.ip, port);
        match self.port {
            Some(port) => write!(f, "{}", addr(port)),
            None => match self.ip {
                IpAddr::V4(ip) => write!(f, "{ip}:*"),
                IpAddr::V6(ip) => write!(f, "[{ip}]:*"),
            },
        }
    }
}

/// Facts about the host that the command reads and the model only shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostFacts {
    /// TIME_WAIT sockets the kernel reports (`/proc/net/sockstat`), summed
    /// over every network namespace.
    pub kernel_time_wait: Option<u64>,
    /// Sockets in each teardown state now, per owner (those the host held
    /// before twtrace started included).
    pub now: crate::census::CensusNow,
    /// `net.ipv4.ip_local_port_range`.
    pub port_range: Option<(u16, u16)>,
    /// Ephemeral ports `connect()` may use: the range less reserved ports.
    pub usable_ports: Option<u64>,
    /// Features this kernel cannot give (shown in the live view's header).
    pub warnings: Vec<String>,
    pub events_lost: u64,
    pub tw_evictions: u64,
    /// Closes that skipped TIME_WAIT: `tcp_max_tw_buckets` was full.
    pub time_wait_skipped: u64,
    pub time_wait_tracking: bool,
    /// Port-exhaustion forecasts, most urgent first (shown in the detail).
    pub routes: Vec<crate::ports::Forecast>,
}

/// One row: a process, or a group of them (`--by`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessRow {
    /// The process; 0 for a group.
    pub pid: u32,
    /// Its command, or the group's name.
    pub comm: String,
    /// For a group: how many processes it has.
    pub processes: Option<usize>,
    pub active_per_s: f64,
    pub passive_per_s: f64,
    /// Connections reset (sent or received) per second.
    pub resets_per_s: f64,
    /// How its connections ended so far (`fin 3, reset_sent 2 (…)`).
    pub ends: String,
    /// Ports it holds in TIME_WAIT or FIN_WAIT2 now.
    pub time_wait_now: u64,
    pub close_wait_now: u64,
    /// How long its oldest CLOSE_WAIT socket has waited for its `close()`.
    pub close_wait_oldest_ns: Option<u64>,
    /// Its oldest CLOSE_WAIT is past the leak threshold.
    pub leaking: bool,
    /// It closes first toward a route forecast to run out of ports within
    /// `PORTS_HORIZON_S`.
    pub ports_at_risk: bool,
    /// Its closes per interval and sockets held, oldest first.
    pub closes_trend: Ring,
    pub held_trend: Ring,
    /// Each state's time distribution (detail view).
    pub shapes: Vec<Shape>,
    /// p50 and p99 (ns) of the states shown in the table; `None`: no data.
    pub fin_wait2: Option<(u64, u64)>,
    pub time_wait: Option<(u64, u64)>,
    pub close_wait: Option<(u64, u64)>,
    pub total_closes: u64,
    /// For the detail view.
    pub states: Vec<StateStats>,
    pub remotes: Vec<(String, u64)>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Header {
    pub closes_per_s: f64,
    pub active_per_s: f64,
    pub passive_per_s: f64,
    /// TIME_WAIT and FIN_WAIT2 sockets now, as twtrace counts them.
    pub time_wait_traced: u64,
    pub close_wait_now: crate::census::InStateNow,
    pub host: HostFacts,
    /// How long the model has been counting.
    pub elapsed_ns: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TopSnapshot {
    pub header: Header,
    /// What the rows are.
    pub by: GroupBy,
    pub rows: Vec<ProcessRow>,
    pub trends: Trends,
}

/// Names for the rows' groups, from the command's lookups: what a cgroup
/// id is, and what a namespace inode is called.
pub struct Namer<'a> {
    pub workload: &'a mut dyn FnMut(u64) -> Option<Workload>,
    pub netns: &'a dyn Fn(u64) -> Option<String>,
}

impl Namer<'_> {
    fn owner(&mut self, by: GroupBy, key: &OwnerKey) -> String {
        let w = if by.names_by_cgroup() {
            (self.workload)(key.cgroup)
        } else {
            None
        };
        grouping::name_of(by, key, w.as_ref()).0
    }
}

#[derive(Debug)]
pub struct TopModel {
    owners: HashMap<CounterKey, OwnerCounters>,
    trends: Trends,
    /// Each row's trend, by its name, for the grouping in `trends_by`.
    row_trends: HashMap<String, RowTrend>,
    trends_by: GroupBy,
    /// Events lost at the previous snapshot (the loss counters are totals).
    lost_before: u64,
    started_ns: u64,
    /// Counters at the previous snapshot, to turn totals into rates.
    previous: HashMap<CounterKey, (u64, u64, u64)>,
    previous_ns: u64,
}

/// `delta / seconds`, 0 when no time passed (a zero period must not divide).
#[must_use]
pub fn rate(delta: u64, period_ns: u64) -> f64 {
    if period_ns == 0 {
        return 0.0;
    }
    #[expect(clippy::cast_precision_loss, reason = "a displayed rate")]
    let per_s = delta as f64 * 1e9 / period_ns as f64;
    per_s
}

impl TopModel {
    #[must_use]
    pub fn new(now_ns: u64) -> Self {
        Self {
            owners: HashMap::new(),
            trends: Trends::default(),
            row_trends: HashMap::new(),
            trends_by: GroupBy::Pid,
            lost_before: 0,
            started_ns: now_ns,
            previous: HashMap::new(),
            previous_ns: now_ns,
        }
    }

    pub fn record(&mut self, t: &Transition) {
        let owner = self.owners.entry((OwnerKey::of(t), t.netns)).or_default();
        let side = t.close_side();
        match side {
            Some(CloseSide::Active) => owner.active += 1,
            Some(CloseSide::Passive) => owner.passive += 1,
            None => {}
        }
        if side.is_some() {
            let remote = Remote::of(t);
            if let Some(count) = owner.remotes.get_mut(&remote) {
                *count += 1;
            } else if owner.remotes.len() < MAX_REMOTES {
                owner.remotes.insert(remote, 1);
            } else {
                owner.remotes_other += 1;
            }
        }
        if let Some(ns) = t.in_state_ns {
            owner.states.record(t.old, ns);
        }
        owner.ends.record(t);
        if matches!(
            EndKind::of(t),
            Some(EndKind::ResetSent | EndKind::ResetReceived)
        ) {
            owner.resets += 1;
        }
    }

    /// Rows (one per process, or per group `by` makes, named by `names`)
    /// and totals now; rates cover the time since the last snapshot.
    pub fn snapshot(
        &mut self,
        now_ns: u64,
        host: HostFacts,
        by: GroupBy,
        names: &mut Namer,
    ) -> TopSnapshot {
        let period = now_ns.saturating_sub(self.previous_ns);
        let mut header = Header {
            host,
            elapsed_ns: now_ns.saturating_sub(self.started_ns),
            ..Header::default()
        };
        if by != self.trends_by {
            self.row_trends.clear();
            self.trends_by = by;
        }
        let members = members(&self.owners, &self.previous, &header.host, by, names);
        let (delta_active, delta_passive) = members
            .values()
            .fold((0, 0), |(a, p), m| (a + m.delta.0, p + m.delta.1));
        let at_risk = routes_at_risk(&header.host.routes);
        let mut rows = Vec::with_capacity(members.len());
        for (name, m) in &members {
            let trend = self.row_trends.entry(name.clone()).or_default();
            let row = row_of(name, by, m, &header.host, period, trend, &at_risk);
            rows.push(row);
        }
        self.row_trends.retain(|name, _| members.contains_key(name));
        let now = |state| header.host.now.state(state).count;
        header.time_wait_traced = now(TcpState::TimeWait) + now(TcpState::FinWait2);
        header.close_wait_now = header.host.now.state(TcpState::CloseWait);
        header.active_per_s = rate(delta_active, period);
        header.passive_per_s = rate(delta_passive, period);
        header.closes_per_s = header.active_per_s + header.passive_per_s;
        self.record_trends(&header, (delta_active, delta_passive), period);
        self.previous = self
            .owners
            .iter()
            .map(|(k, c)| (*k, (c.active, c.passive, c.resets)))
            .collect();
        self.previous_ns = now_ns;
        rows.sort_by(|a, b| a.pid.cmp(&b.pid).then_with(|| a.comm.cmp(&b.comm)));
        TopSnapshot {
            header,
            by,
            rows,
            trends: self.trends.clone(),
        }
    }

    /// One sample of the header's numbers for the charts.
    fn record_trends(&mut self, header: &Header, (active, passive): (u64, u64), period: u64) {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a non-negative rate, rounded for a chart"
        )]
        let per_s = |delta: u64| rate(delta, period).round() as u64;
        let t = &mut self.trends;
        t.active_per_s.push(per_s(active));
        t.passive_per_s.push(per_s(passive));
        t.time_wait_traced.push(header.time_wait_traced);
        t.time_wait_kernel
            .push(header.host.kernel_time_wait.unwrap_or(0));
        t.close_wait_now.push(header.close_wait_now.count);
        let lost = header.host.events_lost;
        t.lost.push(lost.saturating_sub(self.lost_before));
        self.lost_before = lost;
    }
}

/// Each row's members: every owner seen closing, and those that only
/// hold sockets (a leak from before the start shows even if nothing
/// moves).
fn members<'a>(
    owners: &'a HashMap<CounterKey, OwnerCounters>,
    previous: &HashMap<CounterKey, (u64, u64, u64)>,
    host: &HostFacts,
    by: GroupBy,
    names: &mut Namer,
) -> std::collections::BTreeMap<String, RowMembers<'a>> {
    let mut rows: std::collections::BTreeMap<String, RowMembers<'a>> =
        std::collections::BTreeMap::new();
    let netns_row = |inode: u64| grouping::netns_label(inode, (names.netns)(inode));
    let mut netns_rows: HashMap<u64, String> = HashMap::new();
    for ((key, netns), c) in owners {
        let name = if by == GroupBy::Netns {
            netns_rows
                .entry(u64::from(*netns))
                .or_insert_with(|| netns_row(u64::from(*netns)))
                .clone()
        } else {
            names.owner(by, key)
        };
        let m = rows.entry(name).or_default();
        let (active, passive, resets) = previous.get(&(*key, *netns)).copied().unwrap_or_default();
        m.delta.0 += c.active - active;
        m.delta.1 += c.passive - passive;
        m.delta_resets += c.resets - resets;
        m.counters.push(c);
        m.pids.insert(key.pid);
        if by == GroupBy::Netns {
            m.netns = Some(u64::from(*netns));
        } else {
            m.owners.insert(*key);
        }
    }
    if by == GroupBy::Netns {
        for inode in host.now.by_netns.keys() {
            let name = netns_rows
                .entry(*inode)
                .or_insert_with(|| netns_row(*inode));
            rows.entry(name.clone()).or_default().netns = Some(*inode);
        }
    } else {
        for key in host.now.by_owner.keys() {
            let m = rows.entry(names.owner(by, key)).or_default();
            m.owners.insert(*key);
            m.pids.insert(key.pid);
        }
    }
    rows
}

/// The remote ends (as rows name them) of routes forecast to run out of
/// ports within the horizon.
fn routes_at_risk(routes: &[crate::ports::Forecast]) -> Vec<String> {
    routes
        .iter()
        .filter(|f| f.full_in_s.is_some_and(|s| s <= PORTS_HORIZON_S))
        .map(|f| f.remote.clone())
        .collect()
}

/// One row; `at_risk` are the remotes of routes about to run out of
/// ports. Its trend takes this snapshot's sample.
fn row_of(
    name: &str,
    by: GroupBy,
    m: &RowMembers,
    host: &HostFacts,
    period: u64,
    trend: &mut RowTrend,
    at_risk: &[String],
) -> ProcessRow {
    // One member (a process, usually) is shown as it is; more are merged.
    let merged;
    let c = if let [one] = m.counters[..] {
        one
    } else {
        let mut all = OwnerCounters::default();
        for c in &m.counters {
            all.merge(c);
        }
        merged = all;
        &merged
    };
    let now = |state| {
        if let Some(inode) = m.netns {
            return host.now.of_netns(inode, state);
        }
        let mut total = crate::census::InStateNow::default();
        for key in &m.owners {
            total.merge(&host.now.of_owner(key, state));
        }
        total
    };
    let close_wait = now(TcpState::CloseWait);
    let p50_p99 = |state| {
        c.states
            .get(state)
            .filter(|h| !h.is_empty())
            .map(|h| (h.value_at_quantile(0.5), h.value_at_quantile(0.99)))
    };
    let mut remotes: Vec<(String, u64)> =
        c.remotes.iter().map(|(r, n)| (r.to_string(), *n)).collect();
    remotes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    remotes.truncate(10);
    if c.remotes_other > 0 {
        remotes.push(("(others)".into(), c.remotes_other));
    }
    let time_wait_now = now(TcpState::TimeWait).count + now(TcpState::FinWait2).count;
    trend.closes.push(m.delta.0 + m.delta.1);
    trend.held.push(time_wait_now + close_wait.count);
    let (pid, comm, processes) = match (by, m.owners.first()) {
        (GroupBy::Pid, Some(key)) => (key.pid, key.comm.to_string(), None),
        // Sockets whose owner was never learnt (pid 0) are no process.
        _ => (
            0,
            name.to_owned(),
            Some(m.pids.iter().filter(|&&pid| pid != 0).count()),
        ),
    };
    ProcessRow {
        pid,
        comm,
        processes,
        active_per_s: rate(m.delta.0, period),
        passive_per_s: rate(m.delta.1, period),
        resets_per_s: rate(m.delta_resets, period),
        ends: c.ends.describe(),
        time_wait_now,
        close_wait_now: close_wait.count,
        close_wait_oldest_ns: (close_wait.count > 0).then_some(close_wait.oldest_age_ns),
        leaking: close_wait.count > 0 && close_wait.oldest_age_ns > crate::session::LEAK_AGE_NS,
        ports_at_risk: remotes.iter().any(|(r, _)| at_risk.contains(r)),
        fin_wait2: p50_p99(TcpState::FinWait2),
        time_wait: p50_p99(TcpState::TimeWait),
        close_wait: p50_p99(TcpState::CloseWait),
        total_closes: c.active + c.passive,
        states: c.states.stats_with_now(now),
        remotes,
        closes_trend: trend.closes.clone(),
        held_trend: trend.held.clone(),
        shapes: TEARDOWN_STATES
            .iter()
            .filter_map(|&state| shape_of(state, c.states.get(state)?))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Owner;

    const S: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    fn t(pid: u32, src: &str, dst: &str, old: TcpState, new: TcpState, ns: u64) -> Transition {
        Transition {
            ts_ns: 0,
            sock_id: 1,
            owner: Some(Owner {
                pid,
                comm: crate::event::Comm::from(format!("p{pid}").as_str()),
                cgroup: 0,
            }),
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            old,
            new,
            in_state_ns: Some(ns),
            end: None,
            netns: 0,
            accepted: false,
            ending: None,
        }
    }

    /// A snapshot by process.
    fn snap(model: &mut TopModel, now_ns: u64, host: HostFacts) -> TopSnapshot {
        model.snapshot(
            now_ns,
            host,
            GroupBy::Pid,
            &mut Namer {
                workload: &mut |_| None,
                netns: &|_| None,
            },
        )
    }

    fn active(pid: u32, model: &mut TopModel) {
        model.record(&t(
            pid,
            "127.0.0.1:40000",
            "127.0.0.2:6379",
            TcpState::Established,
            TcpState::FinWait1,
            MS,
        ));
    }

    #[test]
    fn resets_per_second_and_how_connections_ended() {
        let mut model = TopModel::new(0);
        let reason =
            crate::event::ResetReason::from_code(twtrace_common::reset_reason::UNREAD_DATA);
        for ending in [
            crate::event::ConnectionEnd::ResetSent(reason.unwrap()),
            crate::event::ConnectionEnd::ResetReceived,
            crate::event::ConnectionEnd::Fin,
        ] {
            let mut close = t(
                7,
                "127.0.0.1:40000",
                "127.0.0.2:6379",
                TcpState::Established,
                TcpState::Close,
                MS,
            );
            close.ending = Some(ending);
            model.record(&close);
        }
        let first = snap(&mut model, 2 * S, HostFacts::default());
        assert!(
            (first.rows[0].resets_per_s - 1.0).abs() < 1e-9,
            "two in 2 s"
        );
        assert_eq!(
            first.rows[0].ends,
            "fin 1, reset_sent 1 (unread_data 1), reset_received 1"
        );
        let second = snap(&mut model, 3 * S, HostFacts::default());
        assert!(second.rows[0].resets_per_s.abs() < f64::EPSILON);
    }

    #[test]
    fn rate_guards_a_zero_period() {
        assert!((rate(10, 0)).abs() < f64::EPSILON);
        assert!((rate(10, 2 * S) - 5.0).abs() < 1e-9);
        assert!((rate(1, 500 * MS) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn rates_cover_the_time_since_the_last_snapshot() {
        let mut model = TopModel::new(0);
        for _ in 0..10 {
            active(1, &mut model);
        }
        let first = snap(&mut model, 2 * S, HostFacts::default());
        assert!((first.rows[0].active_per_s - 5.0).abs() < 1e-9);
        assert!((first.header.closes_per_s - 5.0).abs() < 1e-9);
        // Nothing new: the rate falls to 0 but the total stays.
        let second = snap(&mut model, 3 * S, HostFacts::default());
        assert!(second.rows[0].active_per_s.abs() < f64::EPSILON);
        assert_eq!(second.rows[0].total_closes, 10);
        // A snapshot at the same instant divides by nothing.
        active(1, &mut model);
        let third = snap(&mut model, 3 * S, HostFacts::default());
        assert!(third.rows[0].active_per_s.abs() < f64::EPSILON);
    }

    #[test]
    fn sockets_now_come_from_the_census_and_a_leak_is_marked() {
        let mut model = TopModel::new(0);
        let (src, dst) = ("127.0.0.1:40000", "127.0.0.2:6379");
        model.record(&t(1, src, dst, TcpState::TimeWait, TcpState::Close, 60 * S));
        let mut census = crate::census::Census::default();
        for (pid, port, new) in [
            (1, 1, TcpState::TimeWait),
            (1, 2, TcpState::TimeWait),
            (1, 3, TcpState::FinWait2),
            (2, 4, TcpState::TimeWait),
            (3, 5, TcpState::CloseWait),
        ] {
            let mut into = t(
                pid,
                &format!("127.0.0.1:{port}"),
                dst,
                TcpState::Established,
                new,
                MS,
            );
            into.ts_ns = S;
            census.record(&into);
        }
        let host = HostFacts {
            now: census.now(100 * S, crate::session::LEAK_AGE_NS),
            ..HostFacts::default()
        };
        let snap = snap(&mut model, 100 * S, host);
        let row = |pid| snap.rows.iter().find(|r| r.pid == pid).unwrap();
        assert_eq!(row(1).time_wait_now, 3);
        assert_eq!(row(2).time_wait_now, 1);
        assert_eq!(snap.header.time_wait_traced, 4);
        // pid 3 closed nothing, yet it holds a CLOSE_WAIT for 99 s: a leak.
        assert_eq!(row(3).close_wait_now, 1);
        assert_eq!(row(3).close_wait_oldest_ns, Some(99 * S));
        assert!(row(3).leaking);
        assert!(!row(1).leaking);
        let (p50, p99) = row(1).time_wait.unwrap();
        assert!(p50.abs_diff(60 * S) * 1000 <= 60 * S && p99 >= p50);
    }

    #[test]
    fn percentiles_per_state_for_known_inputs() {
        let mut model = TopModel::new(0);
        for ms in 1..=100 {
            model.record(&t(
                1,
                "127.0.0.1:6379",
                "127.0.0.1:50000",
                TcpState::CloseWait,
                TcpState::LastAck,
                ms * MS,
            ));
        }
        let snap = snap(&mut model, S, HostFacts::default());
        let (p50, p99) = snap.rows[0].close_wait.unwrap();
        assert!(p50.abs_diff(50 * MS) * 1000 <= 50 * MS, "{p50}");
        assert!(p99.abs_diff(99 * MS) * 1000 <= 99 * MS, "{p99}");
        assert_eq!(snap.rows[0].fin_wait2, None);
    }

    #[test]
    fn remotes_are_services_or_pooled_clients() {
        let mut model = TopModel::new(0);
        // A client closing to a service: keyed by the service's port.
        active(1, &mut model);
        active(1, &mut model);
        // A server whose clients close first: pooled per client address.
        for port in [50000, 50001, 50002] {
            model.record(&t(
                2,
                "127.0.0.1:6379",
                &format!("127.0.0.3:{port}"),
                TcpState::Established,
                TcpState::CloseWait,
                MS,
            ));
        }
        let snap = snap(&mut model, S, HostFacts::default());
        assert_eq!(snap.rows[0].remotes, [("127.0.0.2:6379".to_string(), 2)]);
        assert_eq!(snap.rows[1].remotes, [("127.0.0.3:*".to_string(), 3)]);
    }

    #[test]
    fn rows_regroup_by_pod_with_their_processes_and_keep_their_totals() {
        let mut model = TopModel::new(0);
        // pids 1 and 2 in pod A (cgroups 11, 12), pid 3 in pod B (13).
        for (pid, cgroup, closes) in [(1, 11, 2), (2, 12, 3), (3, 13, 4)] {
            for _ in 0..closes {
                let mut close = t(
                    pid,
                    "127.0.0.1:40000",
                    "127.0.0.2:6379",
                    TcpState::Established,
                    TcpState::FinWait1,
                    MS,
                );
                if let Some(owner) = close.owner.as_mut() {
                    owner.cgroup = cgroup;
                }
                model.record(&close);
            }
        }
        let pod = |cgroup: u64| {
            let uid = if cgroup == 13 { "b" } else { "a" }.repeat(8);
            Some(crate::cgroup::parse(&format!(
                "/kubepods/pod{uid}-0000-4000-8000-000000000000/{}",
                format!("{cgroup}").repeat(32)
            )))
        };
        let by_pod = model.snapshot(
            S,
            HostFacts::default(),
            GroupBy::Pod,
            &mut Namer {
                workload: &mut |id| pod(id),
                netns: &|_| None,
            },
        );
        let rows: Vec<(String, Option<usize>, u64)> = by_pod
            .rows
            .iter()
            .map(|r| (r.comm.clone(), r.processes, r.total_closes))
            .collect();
        assert_eq!(
            rows,
            [
                (
                    "aaaaaaaa-0000-4000-8000-000000000000".to_owned(),
                    Some(2),
                    5
                ),
                (
                    "bbbbbbbb-0000-4000-8000-000000000000".to_owned(),
                    Some(1),
                    4
                ),
            ]
        );
        assert!((by_pod.rows[0].active_per_s - 5.0).abs() < 1e-9);
        assert!((by_pod.header.active_per_s - 9.0).abs() < 1e-9);
        // Back by process: one row each, the totals unchanged.
        let per_process = snap(&mut model, 2 * S, HostFacts::default());
        assert_eq!(
            per_process.rows.iter().map(|r| r.total_closes).sum::<u64>(),
            9
        );
        assert_eq!(per_process.rows.len(), 3);
    }
}
