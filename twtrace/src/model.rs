//! The teardown model: turns what the kernel observed into the transitions
//! users see. Pure — no kernel, no clock of its own — so every rule here is
//! unit-tested.
//!
//! Two things need more than one kernel event:
//! * A cancelled mini-socket timer is either the end of the mini-socket or
//!   the first half of a re-arm (the kernel detaches a pending timer before
//!   enqueueing it again) or of an expiry. The follow-up comes at once, on
//!   the same CPU; a cancel that nothing follows within `CANCEL_GRACE_NS`
//!   is an early end.
//! * An orphaned FIN_WAIT2 mini-socket moves to TIME_WAIT when the peer's
//!   FIN arrives by re-arming its timer, which the kernel does not trace
//!   when the new expiry lands in the same timer-wheel bucket. The expiry
//!   is still updated, so the move happened at `expires - TCP_TIMEWAIT_LEN`.
//! * Data arriving at a socket shut for reading (`FIN_WAIT1/2` after
//!   `shutdown(SHUT_RD)`) makes the kernel close it through `tcp_reset()`,
//!   as if a reset had come in, then reset the peer: such a close is held
//!   `CANCEL_GRACE_NS` for the reset sent after it.

use std::collections::HashMap;

// Fx for the maps touched per event: their keys are kernel addresses.
use rustc_hash::FxHashMap;

use twtrace_common::TIME_WAIT_LEN_SECS;

use crate::event::{
    ConnectionEnd, EventKind, KernelEvent, ResetReason, TcpState, Transition, TwEnd,
};

/// How long a cancel waits for a re-arm or expiry of the same timer. The
/// kernel emits those microseconds later; this leaves room for a busy CPU.
pub const CANCEL_GRACE_NS: u64 = 20_000_000;

#[derive(Debug)]
pub struct TeardownModel {
    /// Kernel ticks per second, to turn timer jiffies into nanoseconds.
    hz: Option<u64>,
    pending_cancels: FxHashMap<u64, KernelEvent>,
    /// Mini-sockets (TIME_WAIT, or FIN_WAIT2 awaiting the peer's FIN) born
    /// while traced and not yet ended: each holds its port.
    mini_sockets: u64,
    mini_sockets_peak: u64,
    /// Ephemeral ports held by mini-sockets, per local address and
    /// destination: what runs a client out of ports toward one server.
    held_by_route: HashMap<Route, u64>,
    /// Each namespace's `ip_local_port_range`: only local ports in it are
    /// ephemeral. Filled by the session before a namespace's first event.
    port_ranges: HashMap<u64, (u16, u16)>,
    /// Full sockets that went `FIN_WAIT2`/`CLOSING` -> CLOSE with no mini-socket
    /// taking over: the namespace's `tcp_max_tw_buckets` was full.
    time_wait_skipped: u64,
    /// Orphaned mini-sockets still in FIN_WAIT2 as far as traced, by timer:
    /// their birth. The move to TIME_WAIT may have happened untraced.
    orphans: FxHashMap<u64, Transition>,
    /// Orphans whose move to TIME_WAIT was found by asking the kernel: when
    /// their TIME_WAIT began.
    resolved: FxHashMap<u64, u64>,
    /// Mini-sockets re-armed with no cancel before it, within the last
    /// `CANCEL_GRACE_NS`, by timer: when. A cancel stamped before that
    /// re-arm but read after it (written by another CPU's hand-over) is no
    /// end. Only such races land here.
    rearmed_at: FxHashMap<u64, u64>,
    /// `FIN_WAIT1/2` closes the kernel took for a reset received, by socket:
    /// a reset sent right after makes them this host's (`push`).
    resets_in_doubt: FxHashMap<u64, Transition>,
}

/// A close through `tcp_reset()` in `FIN_WAIT1/2`: a reset received, or
/// data after `shutdown(SHUT_RD)` that this host answers with one.
fn is_reset_in_doubt(t: &Transition) -> bool {
    t.new == TcpState::Close
        && matches!(t.old, TcpState::FinWait1 | TcpState::FinWait2)
        && t.ending == Some(ConnectionEnd::ResetReceived)
}

/// A local address and the destination its ephemeral ports point to, in
/// one network namespace (127.0.0.1 in two namespaces is two routes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Route {
    /// The namespace's inode; 0 when the kernel did not say.
    pub netns: u64,
    pub local: std::net::IpAddr,
    pub remote: std::net::SocketAddr,
}

impl Route {
    /// The route of a socket whose local port is ephemeral (in its
    /// namespace's range, and not a listener's that it was accepted on),
    /// else `None`.
    #[must_use]
    pub fn of(t: &Transition, ephemeral: Option<(u16, u16)>) -> Option<Self> {
        if t.accepted {
            return None;
        }
        let (low, high) = ephemeral?;
        (low..=high).contains(&t.src.port()).then_some(Self {
            netns: u64::from(t.netns),
            local: t.src.ip(),
            remote: t.dst,
        })
    }
}

impl TeardownModel {
    #[must_use]
    pub fn new(hz: Option<u64>) -> Self {
        Self {
            hz,
            pending_cancels: FxHashMap::default(),
            mini_sockets: 0,
            mini_sockets_peak: 0,
            held_by_route: HashMap::new(),
            port_ranges: HashMap::new(),
            time_wait_skipped: 0,
            orphans: FxHashMap::default(),
            resolved: FxHashMap::default(),
            rearmed_at: FxHashMap::default(),
            resets_in_doubt: FxHashMap::default(),
        }
    }

    /// Counts ports held per route in namespace `netns`, for local ports
    /// in `range`.
    pub fn set_port_range(&mut self, netns: u64, range: (u16, u16)) {
        self.port_ranges.insert(netns, range);
    }

    /// Whether the namespace's port range is known yet.
    #[must_use]
    pub fn knows_namespace(&self, netns: u64) -> bool {
        self.port_ranges.contains_key(&netns)
    }

    /// The route of a transition's socket, by its namespace's port range
    /// (the one rule for "this local port is ephemeral").
    #[must_use]
    pub fn route_of(&self, t: &Transition) -> Option<Route> {
        Route::of(t, self.port_ranges.get(&u64::from(t.netns)).copied())
    }

    /// Ephemeral ports held by mini-sockets now, per route.
    #[must_use]
    pub fn held_by_route(&self) -> &HashMap<Route, u64> {
        &self.held_by_route
    }

    /// Mini-sockets alive now, and the most alive at once so far.
    #[must_use]
    pub fn mini_sockets(&self) -> (u64, u64) {
        (self.mini_sockets, self.mini_sockets_peak)
    }

    /// Connections that skipped TIME_WAIT (`TcpExtTCPTimeWaitOverflow`).
    #[must_use]
    pub fn time_wait_skipped(&self) -> u64 {
        self.time_wait_skipped
    }

    /// Mini-sockets whose cancel is not yet known to be an end.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.pending_cancels.len()
    }

    /// Feeds one kernel event; appends the transitions it completes.
    pub fn push(&mut self, event: KernelEvent, out: &mut Vec<Transition>) {
        match event.kind {
            EventKind::Sock => {
                let t = &event.transition;
                if t.new == TcpState::Close
                    && matches!(t.old, TcpState::FinWait2 | TcpState::Closing)
                {
                    // A hand-over to a mini-socket would have been a birth.
                    self.time_wait_skipped += 1;
                }
                if is_reset_in_doubt(t) {
                    self.resets_in_doubt.insert(t.sock_id, event.transition);
                } else {
                    out.push(event.transition);
                }
            }
            EventKind::ResetAfterClose => {
                // Otherwise a reset after a close already told (unread
                // data, a zero linger): nothing to change.
                if let Some(mut close) = self.resets_in_doubt.remove(&event.transition.sock_id) {
                    let reason = event
                        .transition
                        .ending
                        .and_then(ConnectionEnd::reset_reason)
                        .filter(|r| *r != ResetReason::UNKNOWN)
                        .or_else(|| {
                            ResetReason::from_code(twtrace_common::reset_reason::DATA_AFTER_CLOSE)
                        })
                        .unwrap_or(ResetReason::UNKNOWN);
                    close.ending = Some(ConnectionEnd::ResetSent(reason));
                    out.push(close);
                }
            }
            EventKind::TwBirth => {
                // A new mini-socket at the address of one whose cancel is
                // pending: that one has ended (its memory was reused).
                if let Some(tw) = event.tw
                    && let Some(ended) = self.pending_cancels.remove(&tw.id)
                {
                    self.end_cancelled(ended, out);
                }
                if let Some(route) = self.route_of(&event.transition) {
                    *self.held_by_route.entry(route).or_default() += 1;
                }
                self.mini_sockets += 1;
                self.mini_sockets_peak = self.mini_sockets_peak.max(self.mini_sockets);
                if let Some(tw) = event.tw {
                    self.resolved.remove(&tw.id);
                    self.rearmed_at.remove(&tw.id);
                }
                // An orphaned socket still waiting for the peer's FIN stays
                // in FIN_WAIT2, now in the mini-socket: nothing changed.
                if event.transition.new == TcpState::TimeWait {
                    out.push(event.transition);
                } else if let Some(tw) = event.tw {
                    self.orphans.insert(tw.id, event.transition);
                }
            }
            EventKind::TwRearm => {
                let moved = event.transition.old != event.transition.new;
                let mut already_reported = false;
                if let Some(tw) = event.tw {
                    // A re-arm whose cancel has not come yet: that cancel,
                    // written by another CPU's hand-over, is no end.
                    if self.pending_cancels.remove(&tw.id).is_none() {
                        self.rearmed_at.insert(tw.id, event.transition.ts_ns);
                    }
                    self.orphans.remove(&tw.id);
                    already_reported = self.resolved.remove(&tw.id).is_some();
                }
                if moved && !already_reported {
                    out.push(event.transition);
                }
            }
            EventKind::TwCancel => {
                if let Some(tw) = event.tw
                    && self
                        .rearmed_at
                        .get(&tw.id)
                        .is_none_or(|at| *at <= event.transition.ts_ns)
                {
                    // A second cancel replaces the first: the first was
                    // followed by something, as the kernel re-cancelled.
                    self.pending_cancels.insert(tw.id, event);
                }
            }
            EventKind::TwExpire => {
                if let Some(tw) = event.tw {
                    self.pending_cancels.remove(&tw.id);
                }
                self.end(event, TwEnd::Expired, out);
            }
        }
    }

    /// Ends the mini-sockets whose cancel nothing followed, given the
    /// kernel's clock (CLOCK_MONOTONIC) now.
    pub fn flush(&mut self, now_ns: u64, out: &mut Vec<Transition>) {
        self.rearmed_at
            .retain(|_, at| at.saturating_add(CANCEL_GRACE_NS) > now_ns);
        // No reset followed: the reset did come in.
        let mut received: Vec<Transition> = Vec::new();
        self.resets_in_doubt.retain(|_, t| {
            let due = t.ts_ns.saturating_add(CANCEL_GRACE_NS) <= now_ns;
            if due {
                received.push(t.clone());
            }
            !due
        });
        received.sort_by_key(|t| t.ts_ns);
        out.extend(received);
        let due: Vec<u64> = self
            .pending_cancels
            .iter()
            .filter(|(_, e)| e.transition.ts_ns.saturating_add(CANCEL_GRACE_NS) <= now_ns)
            .map(|(id, _)| *id)
            .collect();
        let mut ended: Vec<KernelEvent> = due
            .iter()
            .filter_map(|id| self.pending_cancels.remove(id))
            .collect();
        ended.sort_by_key(|e| e.transition.ts_ns);
        for event in ended {
            self.end_cancelled(event, out);
        }
    }

    fn end_cancelled(&mut self, event: KernelEvent, out: &mut Vec<Transition>) {
        self.end(event, TwEnd::Cancelled, out);
    }

    /// Ends every pending cancel (tracing stops, nothing more will come).
    pub fn finish(&mut self, out: &mut Vec<Transition>) {
        self.flush(u64::MAX, out);
    }

    fn end(&mut self, event: KernelEvent, end: TwEnd, out: &mut Vec<Transition>) {
        self.mini_sockets = self.mini_sockets.saturating_sub(1);
        if let Some(route) = self.route_of(&event.transition)
            && let Some(held) = self.held_by_route.get_mut(&route)
        {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.held_by_route.remove(&route);
            }
        }
        let mut last = event.transition;
        last.end = Some(end);
        let Some(tw) = event.tw else {
            out.push(last);
            return;
        };
        self.orphans.remove(&tw.id);
        if let Some(began) = self.resolved.remove(&tw.id)
            && last.old == TcpState::FinWait2
        {
            // Its move to TIME_WAIT was reported when the kernel told it.
            last.old = TcpState::TimeWait;
            last.in_state_ns = Some(last.ts_ns.saturating_sub(began));
            out.push(last);
            return;
        }
        if last.old == TcpState::FinWait2 && tw.end_substate == TcpState::TimeWait {
            // The peer's FIN arrived and the kernel re-armed the timer
            // without tracing it: recover when from the timer's expiry.
            let since = last.in_state_ns.map(|ns| last.ts_ns.saturating_sub(ns));
            let moved = self.time_wait_began(&tw, last.ts_ns, since);
            let mut into_tw = last.clone();
            into_tw.end = None;
            into_tw.new = TcpState::TimeWait;
            into_tw.ts_ns = moved.unwrap_or(last.ts_ns);
            into_tw.in_state_ns = moved.zip(since).map(|(m, s)| m.saturating_sub(s));
            last.old = TcpState::TimeWait;
            last.in_state_ns = moved.map(|m| last.ts_ns.saturating_sub(m));
            out.push(into_tw);
        }
        out.push(last);
    }

    /// Orphaned mini-sockets born at least `min_age_ns` before `now_ns`
    /// whose move to TIME_WAIT has not been seen, oldest first, at most
    /// `limit`: their timer id and birth.
    #[must_use]
    pub fn unresolved_orphans(
        &self,
        now_ns: u64,
        min_age_ns: u64,
        limit: usize,
    ) -> Vec<(u64, Transition)> {
        // Pick by birth time first, clone only those picked: at high churn
        // there are tens of thousands, and this runs every second.
        let mut due: Vec<(u64, u64)> = self
            .orphans
            .iter()
            .filter(|(_, t)| t.ts_ns.saturating_add(min_age_ns) <= now_ns)
            .map(|(id, t)| (t.ts_ns, *id))
            .collect();
        if due.len() > limit {
            due.select_nth_unstable(limit);
            due.truncate(limit);
        }
        due.sort_unstable();
        due.into_iter()
            .filter_map(|(_, id)| Some((id, self.orphans.get(&id)?.clone())))
            .collect()
    }

    /// The kernel says the orphan with timer `id` entered TIME_WAIT at
    /// `began_ns` (kernel monotonic time): reports that move now.
    pub fn resolve_orphan(&mut self, id: u64, began_ns: u64, out: &mut Vec<Transition>) {
        let Some(birth) = self.orphans.remove(&id) else {
            return;
        };
        let fin_wait2_since = birth
            .in_state_ns
            .map(|spent| birth.ts_ns.saturating_sub(spent));
        // Not before its FIN_WAIT2 began, as a timer's jiffy could say.
        let began = began_ns.max(fin_wait2_since.unwrap_or(0));
        self.resolved.insert(id, began);
        out.push(Transition {
            ts_ns: began,
            old: TcpState::FinWait2,
            new: TcpState::TimeWait,
            in_state_ns: fin_wait2_since.map(|since| began.saturating_sub(since)),
            end: None,
            ..birth
        });
    }

    /// Kernel time at which the mini-socket's TIME_WAIT began, from its
    /// timer: armed for `TIME_WAIT_LEN_SECS` then, so it began at
    /// `expires - TIME_WAIT_LEN_SECS * HZ` jiffies, mapped to nanoseconds through
    /// the birth anchor. Clamped to what is possible: after the FIN_WAIT2
    /// began and no later than the end.
    fn time_wait_began(
        &self,
        tw: &crate::event::TwFacts,
        end_ns: u64,
        since_ns: Option<u64>,
    ) -> Option<u64> {
        let hz = self.hz?;
        if tw.expires == 0 || tw.birth_ns == 0 {
            return None;
        }
        let began_jiffies = i128::from(tw.expires) - i128::from(TIME_WAIT_LEN_SECS * hz);
        let delta_jiffies = began_jiffies - i128::from(tw.birth_jiffies);
        let ns = i128::from(tw.birth_ns) + delta_jiffies * 1_000_000_000 / i128::from(hz);
        // Not `clamp`: records the kernel got wrong (or bytes that are not
        // a record at all) can put the lower bound after the end.
        let lower = i128::from(since_ns.unwrap_or(tw.birth_ns));
        let ns = ns.max(lower).min(i128::from(end_ns));
        u64::try_from(ns).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Owner, TwFacts};

    const HZ: u64 = 250;
    const MS: u64 = 1_000_000;

    fn transition(old: TcpState, new: TcpState, ts_ns: u64, in_state_ns: u64) -> Transition {
        Transition {
            ts_ns,
            sock_id: 0x100,
            owner: Some(Owner {
                pid: 7,
                comm: "client".into(),
                cgroup: 0,
            }),
            src: "127.0.0.1:40000".parse().unwrap(),
            dst: "127.0.0.1:80".parse().unwrap(),
            old,
            new,
            in_state_ns: Some(in_state_ns),
            end: None,
            netns: 0,
            accepted: false,
            ending: None,
        }
    }

    fn tw_event(
        kind: EventKind,
        t: Transition,
        expires: u64,
        end_substate: TcpState,
    ) -> KernelEvent {
        KernelEvent {
            kind,
            transition: t,
            tw: Some(TwFacts {
                id: 0xabc,
                // Born at 1 s kernel time, jiffy 1000.
                birth_ns: 1_000 * MS,
                birth_jiffies: 1000,
                expires,
                bucket_expiry: 0,
                end_substate,
            }),
        }
    }

    fn run(events: Vec<KernelEvent>, flush_at: u64) -> Vec<Transition> {
        let mut model = TeardownModel::new(Some(HZ));
        let mut out = Vec::new();
        for e in events {
            model.push(e, &mut out);
        }
        model.flush(flush_at, &mut out);
        out
    }

    fn sock(t: Transition) -> KernelEvent {
        KernelEvent {
            kind: EventKind::Sock,
            transition: t,
            tw: None,
        }
    }

    #[test]
    fn a_fin_wait_close_through_tcp_reset_is_this_hosts_reset_when_one_follows() {
        let mut close = transition(TcpState::FinWait2, TcpState::Close, 100 * MS, MS);
        close.ending = Some(ConnectionEnd::ResetReceived);
        let mut after = transition(TcpState::Close, TcpState::Close, 100 * MS + 5_000, 0);
        after.ending = Some(ConnectionEnd::ResetSent(ResetReason::UNKNOWN));
        let reset_after = KernelEvent {
            kind: EventKind::ResetAfterClose,
            transition: after,
            tw: None,
        };
        // Data after shutdown(SHUT_RD): the kernel's reason, else twtrace's.
        let out = run(vec![sock(close.clone()), reset_after.clone()], 100 * MS);
        let data_after_close =
            ResetReason::from_code(twtrace_common::reset_reason::DATA_AFTER_CLOSE).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].ending,
            Some(ConnectionEnd::ResetSent(data_after_close))
        );
        assert_eq!(out[0].owner, close.owner, "the closer's, not the softirq's");
        // A reset that did come in: released as such once nothing followed.
        let held = run(vec![sock(close.clone())], 100 * MS + CANCEL_GRACE_NS - 1);
        assert!(held.is_empty(), "{held:?}");
        let out = run(vec![sock(close.clone())], 100 * MS + CANCEL_GRACE_NS);
        assert_eq!(out[0].ending, Some(ConnectionEnd::ResetReceived));
        // A reset after a close already told changes nothing.
        let out = run(vec![reset_after], 100 * MS);
        assert!(out.is_empty(), "{out:?}");
        // Elsewhere a reset received is no doubt.
        let mut established = close;
        established.old = TcpState::Established;
        let out = run(vec![sock(established)], 0);
        assert_eq!(out[0].ending, Some(ConnectionEnd::ResetReceived));
    }

    fn steps(out: &[Transition]) -> Vec<(TcpState, TcpState, Option<TwEnd>)> {
        out.iter().map(|t| (t.old, t.new, t.end)).collect()
    }

    /// Found by fuzzing: an end stamped before the mini-socket's birth
    /// (only bad data can say so) must not panic in the clamp of the
    /// recovered TIME_WAIT start.
    #[test]
    fn end_before_birth_does_not_panic() {
        let mut end = transition(TcpState::FinWait2, TcpState::Close, 500 * MS, 0);
        end.in_state_ns = None;
        let out = run(
            vec![tw_event(
                EventKind::TwExpire,
                end,
                1000 + 60 * HZ,
                TcpState::TimeWait,
            )],
            u64::MAX,
        );
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|t| t.ts_ns <= 500 * MS));
    }

    #[test]
    fn time_wait_birth_and_expiry() {
        let birth = transition(TcpState::FinWait2, TcpState::TimeWait, 1_000 * MS, 5 * MS);
        let cancel = transition(
            TcpState::TimeWait,
            TcpState::Close,
            61_000 * MS,
            60_000 * MS,
        );
        let expire = transition(
            TcpState::TimeWait,
            TcpState::Close,
            61_000 * MS,
            60_000 * MS,
        );
        let out = run(
            vec![
                tw_event(
                    EventKind::TwBirth,
                    birth,
                    1000 + 60 * HZ,
                    TcpState::TimeWait,
                ),
                // The kernel detaches a timer before running it.
                tw_event(EventKind::TwCancel, cancel, 0, TcpState::TimeWait),
                tw_event(
                    EventKind::TwExpire,
                    expire,
                    1000 + 60 * HZ,
                    TcpState::TimeWait,
                ),
            ],
            u64::MAX,
        );
        assert_eq!(
            steps(&out),
            [
                (TcpState::FinWait2, TcpState::TimeWait, None),
                (TcpState::TimeWait, TcpState::Close, Some(TwEnd::Expired)),
            ]
        );
        assert_eq!(out[1].in_state_ns, Some(60_000 * MS));
    }

    #[test]
    fn an_orphan_resolved_by_the_kernel_moves_once_and_ends_in_time_wait() {
        let mut model = TeardownModel::new(Some(HZ));
        let mut out = Vec::new();
        // FIN_WAIT2 since 990 ms; the mini-socket born at 1 s.
        let birth = transition(TcpState::FinWait2, TcpState::FinWait2, 1_000 * MS, 10 * MS);
        model.push(
            tw_event(EventKind::TwBirth, birth, 0, TcpState::FinWait2),
            &mut out,
        );
        assert!(out.is_empty());
        assert!(
            model
                .unresolved_orphans(1_050 * MS, 100 * MS, 10)
                .is_empty()
        );
        let pending = model.unresolved_orphans(1_200 * MS, 100 * MS, 10);
        assert_eq!(pending.len(), 1);
        let id = pending[0].0;
        // The kernel says its TIME_WAIT began at 1.1 s.
        model.resolve_orphan(id, 1_100 * MS, &mut out);
        assert_eq!(
            steps(&out),
            [(TcpState::FinWait2, TcpState::TimeWait, None)]
        );
        assert_eq!(
            (out[0].ts_ns, out[0].in_state_ns),
            (1_100 * MS, Some(110 * MS))
        );
        assert!(model.unresolved_orphans(2_000 * MS, 0, 10).is_empty());
        // A traced re-arm of the same move is not reported twice.
        let rearm = transition(TcpState::FinWait2, TcpState::TimeWait, 1_500 * MS, 0);
        model.push(
            tw_event(EventKind::TwRearm, rearm, 0, TcpState::TimeWait),
            &mut out,
        );
        assert_eq!(out.len(), 1);
        out.clear();
        // Resolved without a traced re-arm: the end is TIME_WAIT's.
        let mut model = TeardownModel::new(Some(HZ));
        let birth = transition(TcpState::FinWait2, TcpState::FinWait2, 1_000 * MS, 10 * MS);
        model.push(
            tw_event(EventKind::TwBirth, birth, 0, TcpState::FinWait2),
            &mut out,
        );
        model.resolve_orphan(id, 1_100 * MS, &mut out);
        out.clear();
        let end = transition(
            TcpState::FinWait2,
            TcpState::Close,
            61_100 * MS,
            60_110 * MS,
        );
        model.push(
            tw_event(EventKind::TwExpire, end, 1000 + 61 * HZ, TcpState::TimeWait),
            &mut out,
        );
        assert_eq!(
            steps(&out),
            [(TcpState::TimeWait, TcpState::Close, Some(TwEnd::Expired))]
        );
        assert_eq!(out[0].in_state_ns, Some(60_000 * MS));
    }

    #[test]
    fn mini_sockets_alive_and_peak() {
        let mut model = TeardownModel::new(Some(HZ));
        let mut out = Vec::new();
        for _ in 0..3 {
            let birth = transition(TcpState::FinWait2, TcpState::FinWait2, MS, MS);
            model.push(
                tw_event(EventKind::TwBirth, birth, 0, TcpState::FinWait2),
                &mut out,
            );
        }
        let end = transition(TcpState::TimeWait, TcpState::Close, 2 * MS, MS);
        model.push(
            tw_event(EventKind::TwExpire, end, 0, TcpState::TimeWait),
            &mut out,
        );
        assert_eq!(model.mini_sockets(), (2, 3));
        // Without a port range no route is counted.
        assert!(model.held_by_route().is_empty());
        let mut model = TeardownModel::new(Some(HZ));
        model.set_port_range(0, (32768, 60999));
        let birth = transition(TcpState::FinWait2, TcpState::TimeWait, MS, MS);
        model.push(
            tw_event(EventKind::TwBirth, birth, 0, TcpState::TimeWait),
            &mut out,
        );
        let route = Route {
            netns: 0,
            local: "127.0.0.1".parse().unwrap(),
            remote: "127.0.0.1:80".parse().unwrap(),
        };
        assert_eq!(model.held_by_route().get(&route), Some(&1));
    }

    #[test]
    fn a_server_closing_first_on_a_listener_in_the_ephemeral_range_holds_no_route() {
        // A listener bound to port 0 gets a port from the ephemeral range;
        // its accepted sockets hold no port a connect() could want, and
        // every client's port would otherwise be a route of its own.
        let mut model = TeardownModel::new(Some(HZ));
        let mut out = Vec::new();
        model.set_port_range(0, (32768, 60999));
        let mut birth = transition(TcpState::FinWait2, TcpState::TimeWait, MS, MS);
        birth.accepted = true;
        assert_eq!(model.route_of(&birth), None);
        model.push(
            tw_event(EventKind::TwBirth, birth.clone(), 0, TcpState::TimeWait),
            &mut out,
        );
        assert!(model.held_by_route().is_empty());
        birth.accepted = false;
        assert!(model.route_of(&birth).is_some());
    }

    #[test]
    fn the_same_loopback_route_in_two_namespaces_is_two_routes() {
        let mut model = TeardownModel::new(Some(HZ));
        let mut out = Vec::new();
        for netns in [11, 22] {
            model.set_port_range(netns, (32768, 60999));
            let mut birth = transition(TcpState::FinWait2, TcpState::TimeWait, MS, MS);
            birth.src = "127.0.0.1:40000".parse().unwrap();
            birth.netns = u32::try_from(netns).unwrap();
            model.push(
                tw_event(EventKind::TwBirth, birth, 0, TcpState::TimeWait),
                &mut out,
            );
        }
        let routes: Vec<u64> = model.held_by_route().keys().map(|r| r.netns).collect();
        assert_eq!(routes.len(), 2, "{routes:?}");
        assert!(routes.contains(&11) && routes.contains(&22));
    }

    #[test]
    fn a_cancel_stamped_before_a_re_arm_read_first_is_no_end() {
        // Another CPU's hand-over writes the cancel of a mini-socket that
        // the peer's FIN re-armed meanwhile; the re-arm reaches the ring first.
        let mut model = TeardownModel::new(Some(HZ));
        let mut out = Vec::new();
        let birth = transition(TcpState::FinWait2, TcpState::FinWait2, 1_000 * MS, MS);
        model.push(
            tw_event(EventKind::TwBirth, birth, 0, TcpState::FinWait2),
            &mut out,
        );
        let rearm = transition(TcpState::FinWait2, TcpState::TimeWait, 1_002 * MS, 0);
        model.push(
            tw_event(EventKind::TwRearm, rearm, 0, TcpState::TimeWait),
            &mut out,
        );
        let cancel = transition(TcpState::FinWait2, TcpState::Close, 1_001 * MS, 0);
        model.push(
            tw_event(EventKind::TwCancel, cancel, 0, TcpState::FinWait2),
            &mut out,
        );
        model.flush(2_000 * MS, &mut out);
        assert_eq!(
            steps(&out),
            [(TcpState::FinWait2, TcpState::TimeWait, None)],
            "re-armed, not ended"
        );
        assert_eq!(model.mini_sockets().0, 1);
        // A cancel after the re-arm is an end.
        let cancel = transition(TcpState::TimeWait, TcpState::Close, 3_000 * MS, 0);
        model.push(
            tw_event(EventKind::TwCancel, cancel, 0, TcpState::TimeWait),
            &mut out,
        );
        model.flush(3_000 * MS + CANCEL_GRACE_NS, &mut out);
        assert_eq!(out.last().and_then(|t| t.end), Some(TwEnd::Cancelled));
        assert_eq!(model.mini_sockets().0, 0);
    }

    #[test]
    fn cancel_alone_is_an_early_end_after_the_grace_period() {
        let cancel = transition(TcpState::TimeWait, TcpState::Close, 3_000 * MS, 2_000 * MS);
        let mut model = TeardownModel::new(Some(HZ));
        let mut out = Vec::new();
        model.push(
            tw_event(EventKind::TwCancel, cancel, 0, TcpState::TimeWait),
            &mut out,
        );
        model.flush(3_000 * MS + CANCEL_GRACE_NS - 1, &mut out);
        assert!(out.is_empty(), "too early: {out:?}");
        assert_eq!(model.pending(), 1);
        model.flush(3_000 * MS + CANCEL_GRACE_NS, &mut out);
        assert_eq!(
            steps(&out),
            [(TcpState::TimeWait, TcpState::Close, Some(TwEnd::Cancelled))]
        );
        assert_eq!(out[0].in_state_ns, Some(2_000 * MS));
        assert_eq!(model.pending(), 0);
    }

    #[test]
    fn cancel_followed_by_rearm_is_no_end() {
        let cancel = transition(TcpState::TimeWait, TcpState::Close, 2_000 * MS, MS);
        let rearm = transition(TcpState::TimeWait, TcpState::TimeWait, 2_000 * MS, MS);
        let out = run(
            vec![
                tw_event(EventKind::TwCancel, cancel, 0, TcpState::TimeWait),
                tw_event(
                    EventKind::TwRearm,
                    rearm,
                    1000 + 61 * HZ,
                    TcpState::TimeWait,
                ),
            ],
            u64::MAX,
        );
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn orphaned_fin_wait2_is_not_time_wait_and_its_traced_move_is_a_transition() {
        let birth = transition(TcpState::FinWait2, TcpState::FinWait2, 1_000 * MS, 10_000);
        let rearm = transition(TcpState::FinWait2, TcpState::TimeWait, 1_300 * MS, 300 * MS);
        let expire = transition(
            TcpState::TimeWait,
            TcpState::Close,
            61_300 * MS,
            60_000 * MS,
        );
        let out = run(
            vec![
                tw_event(
                    EventKind::TwBirth,
                    birth,
                    1000 + 60 * HZ,
                    TcpState::FinWait2,
                ),
                tw_event(
                    EventKind::TwRearm,
                    rearm,
                    1075 + 60 * HZ,
                    TcpState::TimeWait,
                ),
                tw_event(
                    EventKind::TwExpire,
                    expire,
                    1075 + 60 * HZ,
                    TcpState::TimeWait,
                ),
            ],
            u64::MAX,
        );
        assert_eq!(
            steps(&out),
            [
                (TcpState::FinWait2, TcpState::TimeWait, None),
                (TcpState::TimeWait, TcpState::Close, Some(TwEnd::Expired)),
            ]
        );
        assert_eq!(out[0].in_state_ns, Some(300 * MS));
    }

    #[test]
    fn untraced_move_to_time_wait_is_recovered_from_the_timer() {
        // FIN_WAIT2 began at 0.99 s; born at 1 s (jiffy 1000); the peer's FIN
        // came 300 ms (75 jiffies) later; the re-arm was not traced. The
        // mini-socket is cancelled at 5 s, still holding TIME_WAIT.
        let cancel = transition(TcpState::FinWait2, TcpState::Close, 5_000 * MS, 4_010 * MS);
        let out = run(
            vec![tw_event(
                EventKind::TwCancel,
                cancel,
                1075 + 60 * HZ,
                TcpState::TimeWait,
            )],
            u64::MAX,
        );
        assert_eq!(
            steps(&out),
            [
                (TcpState::FinWait2, TcpState::TimeWait, None),
                (TcpState::TimeWait, TcpState::Close, Some(TwEnd::Cancelled)),
            ]
        );
        assert_eq!(out[0].ts_ns, 1_300 * MS);
        assert_eq!(out[0].in_state_ns, Some(310 * MS));
        assert_eq!(out[1].in_state_ns, Some(3_700 * MS));
    }

    #[test]
    fn fin_wait2_mini_socket_that_times_out_ends_in_fin_wait2() {
        let expire = transition(
            TcpState::FinWait2,
            TcpState::Close,
            61_000 * MS,
            60_000 * MS,
        );
        let out = run(
            vec![tw_event(
                EventKind::TwExpire,
                expire,
                1000 + 60 * HZ,
                TcpState::FinWait2,
            )],
            0,
        );
        assert_eq!(
            steps(&out),
            [(TcpState::FinWait2, TcpState::Close, Some(TwEnd::Expired))]
        );
    }

    #[test]
    fn without_hz_the_move_is_reported_with_unknown_times() {
        let cancel = transition(TcpState::FinWait2, TcpState::Close, 5_000 * MS, 4_000 * MS);
        let mut model = TeardownModel::new(None);
        let mut out = Vec::new();
        model.push(
            tw_event(
                EventKind::TwCancel,
                cancel,
                1075 + 60 * HZ,
                TcpState::TimeWait,
            ),
            &mut out,
        );
        model.finish(&mut out);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].in_state_ns, out[1].in_state_ns), (None, None));
    }

    #[test]
    fn socket_transitions_pass_through() {
        let t = transition(TcpState::Established, TcpState::FinWait1, 5, 4);
        let out = run(
            vec![KernelEvent {
                kind: EventKind::Sock,
                transition: t.clone(),
                tw: None,
            }],
            0,
        );
        assert_eq!(out, [t]);
    }

    /// Found at 100 000 TIME_WAIT: a client reusing its port takes the
    /// mini-socket over with its SYN (a cancel nothing follows), and the
    /// next connection's mini-socket lands at the same address within the
    /// grace period. The first one has ended; the second is a new one.
    #[test]
    fn a_birth_at_the_address_of_a_pending_cancel_ends_that_one_first() {
        let birth = |ts| transition(TcpState::FinWait2, TcpState::TimeWait, ts, 5 * MS);
        let cancel = transition(TcpState::TimeWait, TcpState::Close, 1_005 * MS, 5 * MS);
        let mut model = TeardownModel::new(Some(HZ));
        let mut out = Vec::new();
        model.push(
            tw_event(EventKind::TwBirth, birth(1_000 * MS), 0, TcpState::TimeWait),
            &mut out,
        );
        model.push(
            tw_event(EventKind::TwCancel, cancel, 0, TcpState::TimeWait),
            &mut out,
        );
        model.push(
            tw_event(EventKind::TwBirth, birth(1_010 * MS), 0, TcpState::TimeWait),
            &mut out,
        );
        assert_eq!(
            steps(&out),
            [
                (TcpState::FinWait2, TcpState::TimeWait, None),
                (TcpState::TimeWait, TcpState::Close, Some(TwEnd::Cancelled)),
                (TcpState::FinWait2, TcpState::TimeWait, None),
            ]
        );
        assert_eq!(model.mini_sockets(), (1, 1));
        assert_eq!(model.pending(), 0);
    }

    #[test]
    fn a_close_from_fin_wait2_with_no_mini_socket_skipped_time_wait() {
        let mut model = TeardownModel::new(Some(HZ));
        let mut out = Vec::new();
        let event = KernelEvent {
            kind: EventKind::Sock,
            transition: transition(TcpState::FinWait2, TcpState::Close, 5, 4),
            tw: None,
        };
        model.push(event, &mut out);
        assert_eq!((model.time_wait_skipped(), out.len()), (1, 1));
    }
}
