//! `--fail-if` expressions: parsed before the command starts (with the
//! column of any error), evaluated against the report after it ends.
//!
//! ```text
//! expr   := metric op number [unit]
//! metric := lost | active_closes | passive_closes | time_wait_peak
//!         | resets_without_connection
//!         | (count|now|oldest|min|p50|p90|p99|p999|max) '(' STATE ')'
//!         | count '(' END ')'
//! ```
//!
//! `count(S)`: sockets that entered S; `now(S)`: sockets in S at the end;
//! `oldest(S)`: the age of the oldest of those; the others are over the
//! sockets that left S. `count(E)`: connections that ended as E (`fin`,
//! `reset_sent`, `reset_received`, `timeout`, `error`, `abandoned`,
//! `expired`, `cancelled`).
//!
//! ```text
//! op     := > | >= | < | <= | == | !=
//! unit   := ns | us | µs | ms | s | m      (time metrics only; required)
//! ```

use std::fmt;

use crate::{ends::EndKind, event::TcpState, histogram::TEARDOWN_STATES};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Sockets that entered the state.
    Count,
    /// Sockets in the state at the end.
    Now,
    /// How long the oldest socket in the state at the end had been in it.
    Oldest,
    Min,
    P50,
    P90,
    P99,
    P999,
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Lost,
    ActiveCloses,
    PassiveCloses,
    TimeWaitPeak,
    ResetsWithoutConnection,
    State(Stat, TcpState),
    /// Connections that ended this way.
    Ended(EndKind),
}

impl Metric {
    fn is_time(self) -> bool {
        matches!(self, Self::State(stat, _) if !matches!(stat, Stat::Count | Stat::Now))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

impl Op {
    fn holds(self, left: u64, right: u64) -> bool {
        match self {
            Self::Gt => left > right,
            Self::Ge => left >= right,
            Self::Lt => left < right,
            Self::Le => left <= right,
            Self::Eq => left == right,
            Self::Ne => left != right,
        }
    }
}

/// One parsed `--fail-if`: the run fails when `metric op value` holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Threshold {
    pub text: String,
    pub metric: Metric,
    pub op: Op,
    /// Nanoseconds for time metrics, a plain count otherwise.
    pub value: u64,
}

/// A parse error with the 1-based column where it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at column {}", self.message, self.column)
    }
}

struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn skip_spaces(&mut self) {
        while self.text[self.pos..].starts_with(' ') {
            self.pos += 1;
        }
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            column: self.text[..self.pos].chars().count() + 1,
            message: message.into(),
        })
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let start = self.pos;
        while let Some(c) = self.text[self.pos..].chars().next() {
            if !f(c) {
                break;
            }
            self.pos += c.len_utf8();
        }
        &self.text[start..self.pos]
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.text[self.pos..].starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }
}

impl std::str::FromStr for Threshold {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        let mut c = Cursor { text, pos: 0 };
        c.skip_spaces();
        let metric = parse_metric(&mut c)?;
        c.skip_spaces();
        let op = if c.eat(">=") {
            Op::Ge
        } else if c.eat("<=") {
            Op::Le
        } else if c.eat("==") {
            Op::Eq
        } else if c.eat("!=") {
            Op::Ne
        } else if c.eat(">") {
            Op::Gt
        } else if c.eat("<") {
            Op::Lt
        } else {
            return c.error("expected one of > >= < <= == !=");
        };
        c.skip_spaces();
        let number_at = c.pos;
        let number = c.take_while(|ch| ch.is_ascii_digit() || ch == '.');
        if number.is_empty() {
            return c.error("expected a number");
        }
        let Ok(number) = number.parse::<f64>() else {
            c.pos = number_at;
            return c.error(format!("`{number}` is not a number"));
        };
        let unit_at = c.pos;
        let unit = c.take_while(char::is_alphabetic);
        let value = if metric.is_time() {
            let scale = match unit {
                "ns" => 1.0,
                "us" | "µs" => 1e3,
                "ms" => 1e6,
                "s" => 1e9,
                "m" => 60e9,
                "" => return c.error("a time needs a unit: ns, us, ms, s or m"),
                other => {
                    c.pos = unit_at;
                    return c.error(format!("unknown unit `{other}`"));
                }
            };
            number * scale
        } else {
            if !unit.is_empty() {
                c.pos = unit_at;
                return c.error("a count takes no unit");
            }
            number
        };
        c.skip_spaces();
        if c.pos != text.len() {
            return c.error("unexpected text after the value");
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a parsed non-negative threshold, rounded to a whole unit"
        )]
        let value = value.round() as u64;
        Ok(Self {
            text: text.trim().to_owned(),
            metric,
            op,
            value,
        })
    }
}

fn parse_metric(c: &mut Cursor<'_>) -> Result<Metric, ParseError> {
    let name_at = c.pos;
    let name = c.take_while(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '.');
    let stat = match name {
        "lost" => return Ok(Metric::Lost),
        "active_closes" => return Ok(Metric::ActiveCloses),
        "passive_closes" => return Ok(Metric::PassiveCloses),
        "time_wait_peak" => return Ok(Metric::TimeWaitPeak),
        "resets_without_connection" => return Ok(Metric::ResetsWithoutConnection),
        "count" => Stat::Count,
        "now" => Stat::Now,
        "oldest" => Stat::Oldest,
        "min" => Stat::Min,
        "p50" => Stat::P50,
        "p90" => Stat::P90,
        "p99" => Stat::P99,
        "p999" | "p99.9" => Stat::P999,
        "max" => Stat::Max,
        other => {
            c.pos = name_at;
            return c.error(format!(
                "unknown metric `{other}` (lost, active_closes, passive_closes, time_wait_peak, resets_without_connection, count/now/oldest/min/p50/p90/p99/p999/max(STATE), or count(END))"
            ));
        }
    };
    c.skip_spaces();
    if !c.eat("(") {
        return c.error("expected `(`");
    }
    c.skip_spaces();
    let state_at = c.pos;
    let state_name = c.take_while(|ch| ch.is_ascii_alphanumeric() || ch == '_');
    if stat == Stat::Count
        && let Some(kind) = EndKind::from_name(&state_name.to_ascii_lowercase())
    {
        c.skip_spaces();
        if !c.eat(")") {
            return c.error("expected `)`");
        }
        return Ok(Metric::Ended(kind));
    }
    let Some(state) = TEARDOWN_STATES
        .iter()
        .copied()
        .find(|s| s.name().eq_ignore_ascii_case(state_name))
    else {
        c.pos = state_at;
        return c.error(format!(
            "unknown state `{state_name}` (FIN_WAIT1, FIN_WAIT2, CLOSING, TIME_WAIT, CLOSE_WAIT, LAST_ACK; count() also takes an end: fin, reset_sent, reset_received, timeout, error, abandoned, expired, cancelled)"
        ));
    };
    c.skip_spaces();
    if !c.eat(")") {
        return c.error("expected `)`");
    }
    Ok(Metric::State(stat, state))
}

/// The numbers a threshold can be checked against.
pub trait Measured {
    fn measure(&self, metric: Metric) -> u64;
}

impl Threshold {
    /// The measured value, and whether the threshold is broken by it.
    pub fn check(&self, measured: &impl Measured) -> (u64, bool) {
        let actual = measured.measure(self.metric);
        (actual, self.op.holds(actual, self.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Threshold, ParseError> {
        text.parse()
    }

    #[test]
    fn parses_the_documented_examples() {
        let t = parse("p99(FIN_WAIT2) > 50ms").unwrap();
        assert_eq!(t.metric, Metric::State(Stat::P99, TcpState::FinWait2));
        assert_eq!((t.op, t.value), (Op::Gt, 50_000_000));
        let t = parse("count(TIME_WAIT) > 10000").unwrap();
        assert_eq!(t.metric, Metric::State(Stat::Count, TcpState::TimeWait));
        assert_eq!(t.value, 10_000);
        let t = parse("lost > 0").unwrap();
        assert_eq!((t.metric, t.op, t.value), (Metric::Lost, Op::Gt, 0));
        let t = parse("  p99.9(close_wait)>=1.5s ").unwrap();
        assert_eq!(t.metric, Metric::State(Stat::P999, TcpState::CloseWait));
        assert_eq!((t.op, t.value), (Op::Ge, 1_500_000_000));
        assert_eq!(parse("max(LAST_ACK) != 250us").unwrap().value, 250_000);
        let t = parse("now(CLOSE_WAIT) > 0").unwrap();
        assert_eq!(t.metric, Metric::State(Stat::Now, TcpState::CloseWait));
        let t = parse("oldest(CLOSE_WAIT) > 1m").unwrap();
        assert_eq!(
            (t.metric, t.value),
            (
                Metric::State(Stat::Oldest, TcpState::CloseWait),
                60_000_000_000
            )
        );
        assert!(parse("oldest(CLOSE_WAIT) > 5").is_err());
        let t = parse("count(reset_sent) > 0").unwrap();
        assert_eq!((t.metric, t.value), (Metric::Ended(EndKind::ResetSent), 0));
        assert_eq!(
            parse("count( TIMEOUT ) >= 2").unwrap().metric,
            Metric::Ended(EndKind::Timeout)
        );
        assert_eq!(
            parse("resets_without_connection > 10").unwrap().metric,
            Metric::ResetsWithoutConnection
        );
        // Ends are counts only.
        assert!(parse("p99(reset_sent) > 1s").is_err());
    }

    #[test]
    fn errors_point_at_the_column() {
        let cases = [
            ("p99(FIN_WAIT3) > 50ms", 5, "unknown state"),
            ("p98(FIN_WAIT2) > 50ms", 1, "unknown metric"),
            ("p99(FIN_WAIT2) >> 50ms", 17, "expected a number"),
            ("p99(FIN_WAIT2) 50ms", 16, "expected one of"),
            ("p99(FIN_WAIT2) > 50", 20, "needs a unit"),
            ("p99(FIN_WAIT2) > 50 ms", 20, "needs a unit"),
            ("p99(FIN_WAIT2) > 50xs", 20, "unknown unit"),
            ("lost > 0ms", 9, "takes no unit"),
            ("p99 FIN_WAIT2 > 1s", 5, "expected `(`"),
            ("p99(FIN_WAIT2 > 1s", 15, "expected `)`"),
        ];
        for (text, column, message) in cases {
            let err = parse(text).unwrap_err();
            assert_eq!(err.column, column, "{text}: {err}");
            assert!(err.message.contains(message), "{text}: {err}");
        }
    }

    struct Fixed(u64);
    impl Measured for Fixed {
        fn measure(&self, _: Metric) -> u64 {
            self.0
        }
    }

    #[test]
    fn check_reports_the_actual_value() {
        let t = parse("p99(TIME_WAIT) > 60s").unwrap();
        assert_eq!(t.check(&Fixed(61_000_000_000)), (61_000_000_000, true));
        assert_eq!(t.check(&Fixed(60_000_000_000)), (60_000_000_000, false));
        assert!(parse("lost == 0").unwrap().check(&Fixed(0)).1);
    }
}
