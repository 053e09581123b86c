//! Port-exhaustion forecast: per local address and destination, the
//! ephemeral ports held by TIME_WAIT (mini-sockets, either substate), the
//! rate of active closes that keeps adding to them, and how long until the
//! usable range is full. Pure arithmetic, unit-tested.

use std::collections::HashMap;

use serde::Serialize;

use crate::{model::Route, sys::PortSettings};

/// How long each active close holds its port: `TCP_TIMEWAIT_LEN`.
#[expect(clippy::cast_precision_loss, reason = "60")]
const HOLD_SECS: f64 = twtrace_common::TIME_WAIT_LEN_SECS as f64;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Forecast {
    /// The route's network namespace (inode; 0: unknown).
    pub netns: u64,
    pub local: String,
    pub remote: String,
    /// Ports held in TIME_WAIT now (born while traced).
    pub held: u64,
    /// Ports held by sockets in other teardown states now (FIN_WAIT1,
    /// CLOSING, CLOSE_WAIT, LAST_ACK), seen entering them while traced.
    pub held_other: u64,
    /// Ephemeral ports `connect()` may use toward this destination.
    pub usable: u64,
    /// Active closes per second toward it over the observed period.
    pub closes_per_s: f64,
    /// How long each close keeps its port from `connect()`: 60 s, or
    /// `tcp_tw_reuse_delay` where `tcp_tw_reuse` applies.
    pub hold_s: f64,
    /// Ports TIME_WAIT will hold once the rate has run for `hold_s`.
    pub steady_state: f64,
    /// Seconds until no port is left at this rate; `None`: never.
    pub full_in_s: Option<f64>,
}

/// How long a close keeps its port from `connect()` toward `remote`, in
/// seconds: `tcp_tw_reuse` (1, or 2 for loopback destinations) with
/// timestamps lets `connect()` take a TIME_WAIT port back after
/// `tcp_tw_reuse_delay`; otherwise TIME_WAIT holds it its whole 60 s.
#[must_use]
pub fn hold_secs(settings: &PortSettings, remote: std::net::IpAddr) -> f64 {
    let reuse = match settings.tw_reuse {
        1 => true,
        2 => remote.is_loopback(),
        _ => false,
    };
    if reuse && settings.timestamps != 0 {
        #[expect(clippy::cast_precision_loss, reason = "milliseconds")]
        let delay = settings.tw_reuse_delay_ms as f64 / 1000.0;
        delay
    } else {
        HOLD_SECS
    }
}

/// Forecast for one route. Each close holds a port for `hold_s`, so at
/// rate `r` the held count grows by `r` per second until it reaches
/// `hold_s·r`; the range fills only when that exceeds it, after
/// `(usable - held) / r`. Ports held in TIME_WAIT beyond `hold_s` are
/// reusable, so at most `hold_s·r` of them count.
#[must_use]
pub fn forecast(
    route: Route,
    (held, held_other): (u64, u64),
    usable: u64,
    closes_per_s: f64,
    hold_s: f64,
) -> Forecast {
    let steady_state = closes_per_s * hold_s;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a non-negative port count, far below 2^52"
    )]
    let blocking = if hold_s < HOLD_SECS {
        held.min(steady_state.ceil() as u64)
    } else {
        held
    };
    let taken = blocking + held_other;
    #[expect(clippy::cast_precision_loss, reason = "port counts are far below 2^52")]
    let (held_f, usable_f) = (taken as f64, usable as f64);
    let full_in_s = if taken >= usable {
        Some(0.0)
    } else if closes_per_s > 0.0 && steady_state >= usable_f {
        Some((usable_f - held_f) / closes_per_s)
    } else {
        None
    };
    Forecast {
        netns: route.netns,
        local: route.local.to_string(),
        remote: route.remote.to_string(),
        held,
        held_other,
        usable,
        closes_per_s,
        hold_s,
        steady_state,
        full_in_s,
    }
}

/// Sockets tracked in other teardown states, at most (a bound on memory).
const MAX_LIVE: usize = 1 << 20;

/// Counts active closes per route, to turn into a rate, and the sockets
/// holding a port in another teardown state.
#[derive(Debug, Default)]
pub struct CloseCounter {
    counts: rustc_hash::FxHashMap<Route, u64>,
    live: rustc_hash::FxHashMap<u64, Route>,
}

/// Per route: active closes so far, and ports held in other teardown
/// states now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteCounts {
    pub closes: HashMap<Route, u64>,
    pub held_other: HashMap<Route, u64>,
}

impl CloseCounter {
    /// Follows one transition of a socket on `route` (the model's
    /// `route_of`: only ephemeral local ports have one).
    pub fn record(&mut self, t: &crate::event::Transition, route: Route) {
        use crate::event::TcpState::{
            Close, CloseWait, Closing, FinWait1, FinWait2, LastAck, TimeWait,
        };
        if t.close_side() == Some(crate::event::CloseSide::Active) {
            *self.counts.entry(route).or_default() += 1;
        }
        match t.new {
            FinWait1 | Closing | CloseWait | LastAck if self.live.len() < MAX_LIVE => {
                self.live.insert(t.sock_id, route);
            }
            // Past FIN_WAIT2 the port is the mini-socket's, counted apart.
            Close | TimeWait | FinWait2 => {
                self.live.remove(&t.sock_id);
            }
            _ => {}
        }
    }

    #[must_use]
    pub fn counts(&self) -> RouteCounts {
        let mut held_other: HashMap<Route, u64> = HashMap::new();
        for route in self.live.values() {
            *held_other.entry(*route).or_default() += 1;
        }
        RouteCounts {
            closes: self.counts.iter().map(|(r, n)| (*r, *n)).collect(),
            held_other,
        }
    }
}

/// Forecasts for every route seen, most urgent first: `held` ports in
/// TIME_WAIT per route, each namespace's settings (`fallback` where a
/// namespace's are unknown), over `seconds` of observation.
#[must_use]
#[expect(
    clippy::implicit_hasher,
    reason = "the session's maps, with the default hasher"
)]
pub fn forecasts(
    counts: &RouteCounts,
    held: &HashMap<Route, u64>,
    settings: &HashMap<u64, PortSettings>,
    fallback: Option<&PortSettings>,
    seconds: f64,
) -> Vec<Forecast> {
    let mut routes: Vec<Route> = held
        .keys()
        .chain(counts.closes.keys())
        .chain(counts.held_other.keys())
        .copied()
        .collect();
    routes.sort();
    routes.dedup();
    #[expect(clippy::cast_precision_loss, reason = "close counts")]
    let mut out: Vec<Forecast> = routes
        .into_iter()
        .map(|r| {
            let closes = counts.closes.get(&r).copied().unwrap_or(0) as f64;
            let rate = if seconds > 0.0 { closes / seconds } else { 0.0 };
            let settings = settings.get(&r.netns).or(fallback);
            let ports = (
                held.get(&r).copied().unwrap_or(0),
                counts.held_other.get(&r).copied().unwrap_or(0),
            );
            forecast(
                r,
                ports,
                settings.map_or(0, PortSettings::usable),
                rate,
                settings.map_or(HOLD_SECS, |s| hold_secs(s, r.remote.ip())),
            )
        })
        .collect();
    out.sort_by(|a, b| {
        let urgency = |f: &Forecast| f.full_in_s.unwrap_or(f64::INFINITY);
        urgency(a).total_cmp(&urgency(b)).then(b.held.cmp(&a.held))
    });
    out
}

/// One readable line, e.g. `127.0.0.1 → 127.0.0.2:6379: 21400 / 28232
/// ports in TIME_WAIT, 410 closes/s, full in 17 s`.
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "a percentage")]
pub fn describe(f: &Forecast) -> String {
    let when = match f.full_in_s {
        Some(s) if s <= 0.0 => "full now".to_owned(),
        Some(s) => format!("full in {s:.0} s"),
        None if f.closes_per_s > 0.0 => format!(
            "never full at this rate (steady at {:.0}, {:.0} %)",
            f.steady_state,
            f.steady_state * 100.0 / f.usable.max(1) as f64
        ),
        None => "not growing".to_owned(),
    };
    let other = if f.held_other > 0 {
        format!(" (+{} in other teardown states)", f.held_other)
    } else {
        String::new()
    };
    let netns = if f.netns == 0 {
        String::new()
    } else {
        format!("[netns {}] ", f.netns)
    };
    let reuse = if f.hold_s < HOLD_SECS {
        format!(" (tcp_tw_reuse: ports back after {:.1} s)", f.hold_s)
    } else {
        String::new()
    };
    format!(
        "{netns}{} → {}: {} / {} ports in TIME_WAIT{other}, {:.0} closes/s, {when}{reuse}",
        f.local, f.remote, f.held, f.usable, f.closes_per_s
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> Route {
        Route {
            netns: 0,
            local: "127.0.0.1".parse().unwrap(),
            remote: "127.0.0.2:6379".parse().unwrap(),
        }
    }

    #[test]
    fn fills_when_sixty_seconds_of_closes_exceed_the_range() {
        let f = forecast(route(), (21_400, 0), 28_232, 410.0, 60.0);
        // 410/s x 60 s = 24 600 < 28 232: the range never fills.
        assert_eq!(f.full_in_s, None);
        assert!((f.steady_state - 24_600.0).abs() < 1e-9);
        let f = forecast(route(), (21_400, 0), 28_232, 500.0, 60.0);
        // (28 232 - 21 400) / 500 = 13.664 s.
        assert!((f.full_in_s.unwrap() - 13.664).abs() < 1e-9);
        assert_eq!(
            describe(&f),
            "127.0.0.1 → 127.0.0.2:6379: 21400 / 28232 ports in TIME_WAIT, 500 closes/s, full in 14 s"
        );
    }

    /// As the session does: only sockets with a route are counted.
    fn record(c: &mut CloseCounter, t: &crate::event::Transition, range: Option<(u16, u16)>) {
        if let Some(route) = Route::of(t, range) {
            c.record(t, route);
        }
    }

    fn settings(tw_reuse: u64) -> PortSettings {
        PortSettings {
            port_range: (32768, 60999),
            reserved: 0,
            tw_reuse,
            tw_reuse_delay_ms: 1000,
            timestamps: 1,
            max_tw_buckets: Some(131_072),
        }
    }

    #[test]
    fn tw_reuse_lets_connect_take_ports_back_after_its_delay() {
        let loopback = "127.0.0.2".parse().unwrap();
        let remote = "10.0.0.2".parse().unwrap();
        assert!((hold_secs(&settings(0), loopback) - 60.0).abs() < 1e-9);
        assert!((hold_secs(&settings(2), loopback) - 1.0).abs() < 1e-9);
        assert!((hold_secs(&settings(2), remote) - 60.0).abs() < 1e-9);
        assert!((hold_secs(&settings(1), remote) - 1.0).abs() < 1e-9);
        let no_timestamps = PortSettings {
            timestamps: 0,
            ..settings(1)
        };
        assert!((hold_secs(&no_timestamps, remote) - 60.0).abs() < 1e-9);
        // 1 000 ports at 100 closes/s: full in 10 s without reuse; with
        // it only a second's closes block, 100 ports: never full.
        let f = forecast(route(), (0, 0), 1000, 100.0, 60.0);
        assert!((f.full_in_s.unwrap() - 10.0).abs() < 1e-9);
        let f = forecast(route(), (900, 0), 1000, 100.0, 1.0);
        assert_eq!(f.full_in_s, None, "{f:?}");
    }

    #[test]
    fn edge_cases() {
        assert_eq!(
            forecast(route(), (28_000, 232), 28_232, 0.0, 60.0).full_in_s,
            Some(0.0)
        );
        assert_eq!(
            forecast(route(), (10, 0), 28_232, 0.0, 60.0).full_in_s,
            None
        );
        assert!(describe(&forecast(route(), (10, 0), 28_232, 0.0, 60.0)).ends_with("not growing"));
        let d = describe(&forecast(route(), (10, 5), 28_232, 1.0, 60.0));
        assert!(
            d.contains("never full") && d.contains("(+5 in other teardown states)"),
            "{d}"
        );
    }

    #[test]
    fn rates_come_from_active_closes_on_ephemeral_ports() {
        use crate::event::{TcpState, Transition};
        let t = |src: &str, old, new| Transition {
            ts_ns: 0,
            sock_id: 0,
            owner: None,
            src: src.parse().unwrap(),
            dst: "127.0.0.2:6379".parse().unwrap(),
            old,
            new,
            in_state_ns: None,
            end: None,
            netns: 0,
            accepted: false,
            ending: None,
        };
        let mut c = CloseCounter::default();
        let range = Some((32768, 60999));
        for _ in 0..20 {
            record(
                &mut c,
                &t("127.0.0.1:40000", TcpState::Established, TcpState::FinWait1),
                range,
            );
        }
        // Passive closes and non-ephemeral local ports do not count.
        record(
            &mut c,
            &t(
                "127.0.0.1:40000",
                TcpState::Established,
                TcpState::CloseWait,
            ),
            range,
        );
        record(
            &mut c,
            &t("127.0.0.1:80", TcpState::Established, TcpState::FinWait1),
            range,
        );
        let held = [(route(), 15)].into_iter().collect();
        let out = forecasts(
            &c.counts(),
            &held,
            &HashMap::new(),
            Some(&settings(0)),
            10.0,
        );
        assert_eq!(out.len(), 1);
        assert!((out[0].closes_per_s - 2.0).abs() < 1e-9);
        assert_eq!(out[0].held, 15);
        // One socket (sock_id 0) is still in CLOSE_WAIT: it holds a port.
        assert_eq!(out[0].held_other, 1);
        record(
            &mut c,
            &t("127.0.0.1:40000", TcpState::CloseWait, TcpState::LastAck),
            range,
        );
        record(
            &mut c,
            &t("127.0.0.1:40000", TcpState::LastAck, TcpState::Close),
            range,
        );
        assert_eq!(
            forecasts(
                &c.counts(),
                &held,
                &HashMap::new(),
                Some(&settings(0)),
                10.0
            )[0]
            .held_other,
            0
        );
    }
}
