//! How connections ended, counted: the one tally `summary`, `record`,
//! `--fail-if`, the live view and Prometheus all read. A connection ends
//! once: on its full socket's last transition (`ConnectionEnd`), or, when
//! it closed through TIME_WAIT, on its mini-socket's end (`TwEnd`).

use twtrace_common::reset_reason;

use crate::event::{ConnectionEnd, ResetReason, Transition, TwEnd};

/// Every way a connection ends, as users name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndKind {
    Fin,
    ResetSent,
    ResetReceived,
    Timeout,
    Error,
    Abandoned,
    /// Through TIME_WAIT, its timer ran out.
    Expired,
    /// Through TIME_WAIT, ended early (port reuse, RST, namespace gone).
    Cancelled,
}

impl EndKind {
    pub const ALL: [Self; 8] = [
        Self::Fin,
        Self::ResetSent,
        Self::ResetReceived,
        Self::Timeout,
        Self::Error,
        Self::Abandoned,
        Self::Expired,
        Self::Cancelled,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Fin => "fin",
            Self::ResetSent => "reset_sent",
            Self::ResetReceived => "reset_received",
            Self::Timeout => "timeout",
            Self::Error => "error",
            Self::Abandoned => "abandoned",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }

    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The end `t` is, if it ends a connection.
    #[must_use]
    pub fn of(t: &Transition) -> Option<Self> {
        if let Some(end) = t.end {
            return Some(match end {
                TwEnd::Expired => Self::Expired,
                TwEnd::Cancelled => Self::Cancelled,
            });
        }
        Some(match t.ending? {
            ConnectionEnd::Fin => Self::Fin,
            ConnectionEnd::ResetSent(_) => Self::ResetSent,
            ConnectionEnd::ResetReceived => Self::ResetReceived,
            ConnectionEnd::Timeout(_) => Self::Timeout,
            ConnectionEnd::Error(_) => Self::Error,
            ConnectionEnd::Abandoned => Self::Abandoned,
        })
    }

    fn index(self) -> usize {
        self as usize
    }
}

const REASONS: usize = reset_reason::COUNT as usize;

/// Connections ended, by how, and the resets this host sent by reason.
/// Fixed arrays: counting allocates nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndCounts {
    by_kind: [u64; EndKind::ALL.len()],
    /// Resets sent (as `reset_sent`, or before a `timeout`), by reason.
    resets_sent_by_reason: [u64; REASONS],
}

impl EndCounts {
    pub fn record(&mut self, t: &Transition) {
        let Some(kind) = EndKind::of(t) else {
            return;
        };
        self.by_kind[kind.index()] += 1;
        if let Some(reason) = t.ending.and_then(ConnectionEnd::reset_reason) {
            self.resets_sent_by_reason[usize::from(reason.code())] += 1;
        }
    }

    pub fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.by_kind.iter_mut().zip(other.by_kind) {
            *mine += theirs;
        }
        for (mine, theirs) in self
            .resets_sent_by_reason
            .iter_mut()
            .zip(other.resets_sent_by_reason)
        {
            *mine += theirs;
        }
    }

    #[must_use]
    pub fn get(&self, kind: EndKind) -> u64 {
        self.by_kind[kind.index()]
    }

    #[must_use]
    pub fn total(&self) -> u64 {
        self.by_kind.iter().sum()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }

    /// The ends that happened, in `EndKind::ALL` order.
    pub fn nonzero(&self) -> impl Iterator<Item = (EndKind, u64)> + '_ {
        EndKind::ALL
            .into_iter()
            .map(|k| (k, self.get(k)))
            .filter(|&(_, n)| n > 0)
    }

    /// Resets sent with each reason that occurred.
    pub fn reset_reasons(&self) -> impl Iterator<Item = (ResetReason, u64)> + '_ {
        ResetReason::all()
            .map(|r| (r, self.resets_sent_by_reason[usize::from(r.code())]))
            .filter(|&(_, n)| n > 0)
    }

    /// `reset_sent 3 (linger_zero 2, unread_data 1), fin 7` — or `-`.
    #[must_use]
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .nonzero()
            .map(|(kind, n)| match kind {
                EndKind::ResetSent | EndKind::Timeout => {
                    let reasons: Vec<String> = self
                        .reasons_of(kind)
                        .map(|(r, n)| format!("{} {n}", r.name()))
                        .collect();
                    if reasons.is_empty() {
                        format!("{} {n}", kind.name())
                    } else {
                        format!("{} {n} ({})", kind.name(), reasons.join(", "))
                    }
                }
                _ => format!("{} {n}", kind.name()),
            })
            .collect();
        if parts.is_empty() {
            "-".to_owned()
        } else {
            parts.join(", ")
        }
    }

    /// The reasons counted under `kind`: every reason for `reset_sent`;
    /// a timeout only has a keepalive's.
    fn reasons_of(&self, kind: EndKind) -> impl Iterator<Item = (ResetReason, u64)> + '_ {
        self.reset_reasons().filter(move |(r, _)| {
            (kind == EndKind::Timeout) == (r.code() == reset_reason::KEEPALIVE_TIMEOUT)
        })
    }
}

/// Resets this host sent that ended no connection twtrace follows: to a
/// segment for no socket (a SYN to a closed port), for a TIME_WAIT or
/// request socket, or from a socket it holds no record of. By reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetsApart(pub [u64; REASONS]);

impl ResetsApart {
    #[must_use]
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Each reason that occurred, with its count.
    pub fn nonzero(&self) -> impl Iterator<Item = (ResetReason, u64)> + '_ {
        ResetReason::all()
            .map(|r| (r, self.0[usize::from(r.code())]))
            .filter(|&(_, n)| n > 0)
    }

    /// `no_socket 20, time_wait_socket 1` — or `-`.
    #[must_use]
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .nonzero()
            .map(|(r, n)| format!("{} {n}", r.name()))
            .collect();
        if parts.is_empty() {
            "-".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TcpState;

    fn ended(ending: Option<ConnectionEnd>, end: Option<TwEnd>) -> Transition {
        Transition {
            ts_ns: 0,
            sock_id: 1,
            owner: None,
            src: "127.0.0.1:1".parse().unwrap(),
            dst: "127.0.0.1:2".parse().unwrap(),
            old: TcpState::Established,
            new: TcpState::Close,
            in_state_ns: None,
            end,
            netns: 0,
            accepted: false,
            ending,
        }
    }

    #[test]
    fn each_end_is_counted_once_with_its_reason() {
        let linger = ResetReason::from_code(reset_reason::LINGER_ZERO).unwrap();
        let unread = ResetReason::from_code(reset_reason::UNREAD_DATA).unwrap();
        let keepalive = ResetReason::from_code(reset_reason::KEEPALIVE_TIMEOUT).unwrap();
        let mut counts = EndCounts::default();
        for t in [
            ended(Some(ConnectionEnd::ResetSent(linger)), None),
            ended(Some(ConnectionEnd::ResetSent(linger)), None),
            ended(Some(ConnectionEnd::ResetSent(unread)), None),
            ended(Some(ConnectionEnd::Timeout(Some(keepalive))), None),
            ended(Some(ConnectionEnd::Timeout(None)), None),
            ended(Some(ConnectionEnd::Fin), None),
            ended(None, Some(TwEnd::Expired)),
            ended(None, None),
        ] {
            counts.record(&t);
        }
        assert_eq!(counts.get(EndKind::ResetSent), 3);
        assert_eq!(counts.get(EndKind::Timeout), 2);
        assert_eq!(
            counts.total(),
            7,
            "the transition that ends nothing is not counted"
        );
        assert_eq!(
            counts.describe(),
            "fin 1, reset_sent 3 (unread_data 1, linger_zero 2), timeout 2 (keepalive_timeout 1), expired 1"
        );
        let mut twice = counts;
        twice.merge(&counts);
        assert_eq!(twice.get(EndKind::ResetSent), 6);
        assert_eq!(EndCounts::default().describe(), "-");
        assert_eq!(
            EndKind::from_name("reset_received"),
            Some(EndKind::ResetReceived)
        );
    }
}
