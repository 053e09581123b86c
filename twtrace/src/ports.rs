//! Port-exhaustion forecast: per local address and destination, the
//! ephemeral ports held by TIME_WAIT (mini-sockets, either substate), the
//! rate of active closes that keeps adding to them, and how long until the
//! usable range is full. Pure arithmetic, unit-tested.

use serde::Serialize;

use crate::model::Route;

/// How long each active close holds its port: `TCP_TIMEWAIT_LEN`.
#[expect(clippy::cast_precision_loss, reason = "60")]
const HOLD_SECS: f64 = twtrace_common::TIME_WAIT_LEN_SECS as f64;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Forecast {
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
    /// Ports TIME_WAIT will hold once the rate has run for 60 s.
    pub steady_state: f64,
    /// Seconds until no port is left at this rate; `None`: never.
    pub full_in_s: Option<f64>,
}

/// Forecast for one route. Each close holds a port for 60 s, so at rate
/// `r` the held count grows by `r` per second until it reaches `60·r`; the
/// range fills only when `60·r` exceeds it, after `(usable - held) / r`.
#[must_use]
pub fn forecast(
    route: Route,
    held: u64,
    held_other: u64,
    usable: u64,
    closes_per_s: f64,
) -> Forecast {
    let steady_state = closes_per_s * HOLD_SECS;
    let taken = held + held_other;
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
        local: route.local.to_string(),
        remote: route.remote.to_string(),
        held,
        held_other,
        usable,
        closes_per_s,
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
    counts: std::collections::HashMap<Route, u64>,
    live: std::collections::HashMap<u64, Route>,
}

impl CloseCounter {
    pub fn record(&mut self, t: &crate::event::Transition, ephemeral: Option<(u16, u16)>) {
        use crate::event::TcpState::{
            Close, CloseWait, Closing, FinWait1, FinWait2, LastAck, TimeWait,
        };
        let Some(route) = Route::of(t, ephemeral) else {
            return;
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

    /// Forecasts for every route seen, most urgent first.
    #[must_use]
    pub fn forecasts(
        &self,
        held: &std::collections::HashMap<Route, u64>,
        usable: u64,
        seconds: f64,
    ) -> Vec<Forecast> {
        let mut other: std::collections::HashMap<Route, u64> = std::collections::HashMap::new();
        for route in self.live.values() {
            *other.entry(*route).or_default() += 1;
        }
        let mut routes: Vec<Route> = held
            .keys()
            .chain(self.counts.keys())
            .chain(other.keys())
            .copied()
            .collect();
        routes.sort();
        routes.dedup();
        #[expect(clippy::cast_precision_loss, reason = "close counts")]
        let mut out: Vec<Forecast> = routes
            .into_iter()
            .map(|r| {
                let closes = self.counts.get(&r).copied().unwrap_or(0) as f64;
                let rate = if seconds > 0.0 { closes / seconds } else { 0.0 };
                forecast(
                    r,
                    held.get(&r).copied().unwrap_or(0),
                    other.get(&r).copied().unwrap_or(0),
                    usable,
                    rate,
                )
            })
            .collect();
        out.sort_by(|a, b| {
            let urgency = |f: &Forecast| f.full_in_s.unwrap_or(f64::INFINITY);
            urgency(a).total_cmp(&urgency(b)).then(b.held.cmp(&a.held))
        });
        out
    }
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
    format!(
        "{} → {}: {} / {} ports in TIME_WAIT{other}, {:.0} closes/s, {when}",
        f.local, f.remote, f.held, f.usable, f.closes_per_s
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> Route {
        Route {
            local: "127.0.0.1".parse().unwrap(),
            remote: "127.0.0.2:6379".parse().unwrap(),
        }
    }

    #[test]
    fn fills_when_sixty_seconds_of_closes_exceed_the_range() {
        let f = forecast(route(), 21_400, 0, 28_232, 410.0);
        // 410/s x 60 s = 24 600 < 28 232: the range never fills.
        assert_eq!(f.full_in_s, None);
        assert!((f.steady_state - 24_600.0).abs() < 1e-9);
        let f = forecast(route(), 21_400, 0, 28_232, 500.0);
        // (28 232 - 21 400) / 500 = 13.664 s.
        assert!((f.full_in_s.unwrap() - 13.664).abs() < 1e-9);
        assert_eq!(
            describe(&f),
            "127.0.0.1 → 127.0.0.2:6379: 21400 / 28232 ports in TIME_WAIT, 500 closes/s, full in 14 s"
        );
    }

    #[test]
    fn edge_cases() {
        assert_eq!(
            forecast(route(), 28_000, 232, 28_232, 0.0).full_in_s,
            Some(0.0)
        );
        assert_eq!(forecast(route(), 10, 0, 28_232, 0.0).full_in_s, None);
        assert!(describe(&forecast(route(), 10, 0, 28_232, 0.0)).ends_with("not growing"));
        let d = describe(&forecast(route(), 10, 5, 28_232, 1.0));
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
        };
        let mut c = CloseCounter::default();
        let range = Some((32768, 60999));
        for _ in 0..20 {
            c.record(
                &t("127.0.0.1:40000", TcpState::Established, TcpState::FinWait1),
                range,
            );
        }
        // Passive closes and non-ephemeral local ports do not count.
        c.record(
            &t(
                "127.0.0.1:40000",
                TcpState::Established,
                TcpState::CloseWait,
            ),
            range,
        );
        c.record(
            &t("127.0.0.1:80", TcpState::Established, TcpState::FinWait1),
            range,
        );
        let held = [(route(), 15)].into_iter().collect();
        let out = c.forecasts(&held, 28_232, 10.0);
        assert_eq!(out.len(), 1);
        assert!((out[0].closes_per_s - 2.0).abs() < 1e-9);
        assert_eq!(out[0].held, 15);
        // One socket (sock_id 0) is still in CLOSE_WAIT: it holds a port.
        assert_eq!(out[0].held_other, 1);
        c.record(
            &t("127.0.0.1:40000", TcpState::CloseWait, TcpState::LastAck),
            range,
        );
        c.record(
            &t("127.0.0.1:40000", TcpState::LastAck, TcpState::Close),
            range,
        );
        assert_eq!(c.forecasts(&held, 28_232, 10.0)[0].held_other, 0);
    }
}
