//! Decoding ring-buffer records into typed transitions.
//!
//! The kernel hands over raw bytes; nothing here trusts them. A record of
//! the wrong size or with impossible values becomes a `DecodeError` that the
//! caller counts, never a panic.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use twtrace_common::{
    AF_INET, AF_INET6, FLAG_ACCEPTED, FLAG_IN_STATE_UNKNOWN, TransitionEvent, connection_end, kind,
    reset_reason, tcp_state,
};

/// A TCP state, named as the kernel names it, without the `TCP_` prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    BoundInactive,
}

impl TcpState {
    #[must_use]
    pub fn from_kernel(value: u8) -> Option<Self> {
        Some(match value {
            tcp_state::ESTABLISHED => Self::Established,
            tcp_state::SYN_SENT => Self::SynSent,
            tcp_state::SYN_RECV => Self::SynRecv,
            tcp_state::FIN_WAIT1 => Self::FinWait1,
            tcp_state::FIN_WAIT2 => Self::FinWait2,
            tcp_state::TIME_WAIT => Self::TimeWait,
            tcp_state::CLOSE => Self::Close,
            tcp_state::CLOSE_WAIT => Self::CloseWait,
            tcp_state::LAST_ACK => Self::LastAck,
            tcp_state::LISTEN => Self::Listen,
            tcp_state::CLOSING => Self::Closing,
            tcp_state::NEW_SYN_RECV => Self::NewSynRecv,
            tcp_state::BOUND_INACTIVE => Self::BoundInactive,
            _ => return None,
        })
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Established => "ESTABLISHED",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::FinWait1 => "FIN_WAIT1",
            Self::FinWait2 => "FIN_WAIT2",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::Listen => "LISTEN",
            Self::Closing => "CLOSING",
            Self::NewSynRecv => "NEW_SYN_RECV",
            Self::BoundInactive => "BOUND_INACTIVE",
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// A task's name as the kernel keeps it: at most 16 bytes, NUL padded, not
/// always UTF-8. Fixed-size and `Copy`, so following owners through the
/// hot path (decode, model, histograms, live view, metrics) allocates
/// nothing; text is made only when something is shown.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Comm([u8; 16]);

impl Comm {
    /// What an unknown owner is shown as.
    pub const UNKNOWN: Self = Self(*b"-\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");

    #[must_use]
    pub const fn from_kernel(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The name as the kernel stores it, NUL-padded.
    #[must_use]
    pub fn to_raw(&self) -> [u8; 16] {
        self.0
    }

    /// The name's bytes, up to the first NUL.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        &self.0[..end]
    }

    /// The name as text (invalid UTF-8 replaced); borrowed when valid.
    #[must_use]
    pub fn to_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.as_bytes())
    }
}

impl From<&str> for Comm {
    /// Truncated to 15 bytes, as the kernel truncates a task's name.
    fn from(name: &str) -> Self {
        let mut bytes = [0u8; 16];
        let len = name.len().min(15);
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        Self(bytes)
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.to_str())
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_str())
    }
}

impl serde::Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_str())
    }
}

/// The process a socket belongs to, as learnt in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    pub pid: u32,
    pub comm: Comm,
    /// Its cgroup (v2) id, learnt with it; 0 if unknown
    /// (`cgroup::Workloads` names it).
    pub cgroup: u64,
}

/// Which side of a connection closed it first — the one rule every count
/// of "who closes first" uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseSide {
    /// This socket's owner closed first: ESTABLISHED -> FIN_WAIT1
    /// (simultaneous closes included). It will hold the TIME_WAIT.
    Active,
    /// The peer closed first: ESTABLISHED -> CLOSE_WAIT.
    Passive,
}

impl CloseSide {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Passive => "passive",
        }
    }
}

/// How a TIME_WAIT mini-socket ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TwEnd {
    /// Its timer ran out.
    Expired,
    /// Ended early: port reuse, a new SYN taking it over, RST, or its
    /// network namespace going away.
    Cancelled,
}

impl TwEnd {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Why a reset was sent (`twtrace_common::reset_reason`): the kernel's
/// reason where it gives one, else what twtrace proved from the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResetReason(u8);

impl ResetReason {
    pub const UNKNOWN: Self = Self(reset_reason::UNKNOWN);

    /// `None` for a code no kernel side sends.
    #[must_use]
    pub fn from_code(code: u8) -> Option<Self> {
        (u32::from(code) < reset_reason::COUNT).then_some(Self(code))
    }

    #[must_use]
    pub fn code(self) -> u8 {
        self.0
    }

    /// Every reason, in code order (a bounded label set).
    pub fn all() -> impl Iterator<Item = Self> {
        (0..reset_reason::COUNT).filter_map(|code| u8::try_from(code).ok().map(Self))
    }

    #[must_use]
    pub fn name(self) -> &'static str {
        reset_reason::NAMES[usize::from(self.0)]
    }
}

/// How a connection ended, on its full socket's last transition
/// (`-> CLOSE`). A connection closed through TIME_WAIT ends with its
/// mini-socket instead (`TwEnd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectionEnd {
    /// The FIN exchange completed (the passive side's `LAST_ACK -> CLOSE`).
    Fin,
    /// This host reset the connection.
    ResetSent(ResetReason),
    /// The peer reset it.
    ResetReceived,
    /// Retransmissions, the user timeout or keepalive gave up; with the
    /// reason of the reset sent first, if one was (a keepalive's).
    Timeout(Option<ResetReason>),
    /// Another socket error: its errno.
    Error(u8),
    /// Closed by its owner before it was established: nothing was sent.
    Abandoned,
}

impl ConnectionEnd {
    /// Every end's name, in a fixed order (a bounded label set).
    pub const NAMES: [&str; 6] = [
        "fin",
        "reset_sent",
        "reset_received",
        "timeout",
        "error",
        "abandoned",
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Fin => "fin",
            Self::ResetSent(_) => "reset_sent",
            Self::ResetReceived => "reset_received",
            Self::Timeout(_) => "timeout",
            Self::Error(_) => "error",
            Self::Abandoned => "abandoned",
        }
    }

    /// The reason of the reset this host sent, for ends that had one.
    #[must_use]
    pub fn reset_reason(self) -> Option<ResetReason> {
        match self {
            Self::ResetSent(reason) => Some(reason),
            Self::Timeout(reason) => reason,
            _ => None,
        }
    }

    #[must_use]
    pub fn errno(self) -> Option<u8> {
        match self {
            Self::Error(errno) => Some(errno),
            _ => None,
        }
    }

    /// From the kernel's `(connection_end, end_detail)`; `Ok(None)` for
    /// an event that ends no connection.
    fn from_kernel(end: u8, detail: u8) -> Result<Option<Self>, DecodeError> {
        let reason = || ResetReason::from_code(detail).ok_or(DecodeError::UnknownEnd(end, detail));
        Ok(Some(match end {
            connection_end::NONE => return Ok(None),
            connection_end::FIN => Self::Fin,
            connection_end::RESET_SENT => Self::ResetSent(reason()?),
            connection_end::RESET_RECEIVED => Self::ResetReceived,
            connection_end::TIMEOUT => {
                Self::Timeout((detail != reset_reason::UNKNOWN).then(reason).transpose()?)
            }
            connection_end::ERROR => Self::Error(detail),
            connection_end::ABANDONED => Self::Abandoned,
            _ => return Err(DecodeError::UnknownEnd(end, detail)),
        }))
    }
}

/// What kind of kernel observation an event is (see `twtrace_common::kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Sock,
    TwBirth,
    TwRearm,
    TwCancel,
    TwExpire,
    /// A closed full socket sent a reset (`transition.sock_id`, and
    /// `transition.ending` with its reason); no transition of its own.
    ResetAfterClose,
}

/// The mini-socket's timer facts carried by `TW_*` events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TwFacts {
    /// The timer's kernel address: identifies the mini-socket while it lives.
    pub id: u64,
    pub birth_ns: u64,
    pub birth_jiffies: u64,
    /// The timer's expiry in jiffies as of the event (0: unknown).
    pub expires: u64,
    /// When the timer wheel will fire it, in jiffies (0: not reported).
    pub bucket_expiry: u64,
    /// The substate read from the mini-socket at its end.
    pub end_substate: TcpState,
}

/// One decoded ring-buffer record: a full-socket transition, or a fact
/// about a TIME_WAIT mini-socket that the teardown model turns into
/// transitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelEvent {
    pub kind: EventKind,
    pub transition: Transition,
    pub tw: Option<TwFacts>,
}

/// One state change, as twtrace reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// `CLOCK_MONOTONIC` nanoseconds, as the kernel stamped it.
    pub ts_ns: u64,
    pub sock_id: u64,
    /// `None` while the kernel had not yet learnt who uses the socket.
    pub owner: Option<Owner>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub old: TcpState,
    pub new: TcpState,
    /// Time spent in `old`; `None` when twtrace did not see the socket enter it.
    pub in_state_ns: Option<u64>,
    /// For a mini-socket's `TIME_WAIT`/`FIN_WAIT2` `-> CLOSE`: how it ended.
    pub end: Option<TwEnd>,
    /// For a full socket's last transition (`-> CLOSE`): how its
    /// connection ended.
    pub ending: Option<ConnectionEnd>,
    /// The socket's network namespace inode; 0 when the kernel did not say.
    pub netns: u32,
    /// Accepted from a listener (twtrace saw it): its local port is the
    /// listener's, never an ephemeral port held for a `connect()`.
    pub accepted: bool,
}

impl Transition {
    /// The close this transition is, if it is the start of one.
    #[must_use]
    pub fn close_side(&self) -> Option<CloseSide> {
        match (self.old, self.new) {
            (TcpState::Established, TcpState::FinWait1) => Some(CloseSide::Active),
            (TcpState::Established, TcpState::CloseWait) => Some(CloseSide::Passive),
            _ => None,
        }
    }

    /// How this transition ended its socket, if it did: a mini-socket's
    /// end or a connection's.
    #[must_use]
    pub fn end_name(&self) -> Option<&'static str> {
        self.end
            .map(TwEnd::name)
            .or_else(|| self.ending.map(ConnectionEnd::name))
    }

    #[must_use]
    pub fn family(&self) -> &'static str {
        if self.src.is_ipv4() { "ipv4" } else { "ipv6" }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    WrongSize { got: usize, want: usize },
    UnknownFamily(u16),
    UnknownState(u8),
    UnknownKind(u8),
    UnknownEnd(u8, u8),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongSize { got, want } => {
                write!(f, "record of {got} bytes, expected {want}")
            }
            Self::UnknownFamily(family) => write!(f, "unknown address family {family}"),
            Self::UnknownState(state) => write!(f, "unknown TCP state {state}"),
            Self::UnknownKind(kind) => write!(f, "unknown event kind {kind}"),
            Self::UnknownEnd(end, detail) => {
                write!(f, "unknown connection end {end} (detail {detail})")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Reads the raw record without assuming the buffer's alignment.
pub fn decode_raw(bytes: &[u8]) -> Result<TransitionEvent, DecodeError> {
    let want = size_of::<TransitionEvent>();
    if bytes.len() != want {
        return Err(DecodeError::WrongSize {
            got: bytes.len(),
            want,
        });
    }
    // SAFETY: the length was checked above, read_unaligned copes with any
    // alignment, and TransitionEvent is plain old data valid for any bits.
    Ok(unsafe { bytes.as_ptr().cast::<TransitionEvent>().read_unaligned() })
}

/// Decodes and validates one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<KernelEvent, DecodeError> {
    from_raw(&decode_raw(bytes)?)
}

/// Validates a record of the right size.
pub fn from_raw(raw: &TransitionEvent) -> Result<KernelEvent, DecodeError> {
    let (src_ip, dst_ip) = match raw.family {
        AF_INET => (IpAddr::V4(ipv4(&raw.saddr)), IpAddr::V4(ipv4(&raw.daddr))),
        AF_INET6 => (
            IpAddr::V6(Ipv6Addr::from(raw.saddr)),
            IpAddr::V6(Ipv6Addr::from(raw.daddr)),
        ),
        other => return Err(DecodeError::UnknownFamily(other)),
    };
    let state = |value| TcpState::from_kernel(value).ok_or(DecodeError::UnknownState(value));
    let owner = (raw.pid != 0).then_some(Owner {
        pid: raw.pid,
        comm: Comm::from_kernel(raw.comm),
        cgroup: raw.cgroup,
    });
    let event_kind = match raw.kind {
        kind::SOCK => EventKind::Sock,
        kind::TW_BIRTH => EventKind::TwBirth,
        kind::TW_REARM => EventKind::TwRearm,
        kind::TW_CANCEL => EventKind::TwCancel,
        kind::TW_EXPIRE => EventKind::TwExpire,
        kind::RESET_AFTER_CLOSE => EventKind::ResetAfterClose,
        other => return Err(DecodeError::UnknownKind(other)),
    };
    let tw = match event_kind {
        EventKind::Sock | EventKind::ResetAfterClose => None,
        _ => Some(TwFacts {
            id: raw.tw_id,
            birth_ns: raw.tw_birth_ns,
            birth_jiffies: raw.tw_birth_jiffies,
            expires: raw.tw_expires,
            bucket_expiry: raw.tw_bucket_expiry,
            end_substate: match raw.end_substate {
                0 => TcpState::TimeWait,
                value => state(value)?,
            },
        }),
    };
    Ok(KernelEvent {
        kind: event_kind,
        transition: Transition {
            ts_ns: raw.ts_ns,
            sock_id: raw.sock_id,
            owner,
            src: SocketAddr::new(src_ip, raw.sport),
            dst: SocketAddr::new(dst_ip, raw.dport),
            old: state(raw.old_state)?,
            new: state(raw.new_state)?,
            in_state_ns: (raw.flags & FLAG_IN_STATE_UNKNOWN == 0).then_some(raw.in_state_ns),
            end: None,
            ending: ConnectionEnd::from_kernel(raw.connection_end, raw.end_detail)?,
            netns: raw.netns,
            accepted: raw.flags & FLAG_ACCEPTED != 0,
        },
        tw,
    })
}

/// An address as the kernel programs store it (the inverse of
/// `from_raw`'s reading): IPv4 in the first 4 bytes, and its family.
#[must_use]
pub fn to_kernel_addr(ip: IpAddr) -> ([u8; 16], u16) {
    match ip {
        IpAddr::V4(v4) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            (bytes, AF_INET)
        }
        IpAddr::V6(v6) => (v6.octets(), AF_INET6),
    }
}

fn ipv4(bytes: &[u8; 16]) -> Ipv4Addr {
    Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn raw_event() -> TransitionEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        TransitionEvent {
            saddr,
            daddr,
            ts_ns: 5_000_000_000,
            in_state_ns: 1_500,
            sock_id: 0xffff_8880_1234_5678,
            tw_id: 0,
            tw_birth_ns: 0,
            tw_birth_jiffies: 0,
            tw_expires: 0,
            tw_bucket_expiry: 0,
            pid: 4242,
            flags: 0,
            sport: 40_000,
            dport: 6379,
            family: AF_INET,
            old_state: tcp_state::ESTABLISHED,
            new_state: tcp_state::FIN_WAIT1,
            kind: kind::SOCK,
            end_substate: 0,
            connection_end: 0,
            end_detail: 0,
            netns: 0,
            comm,
            cgroup: 0,
        }
    }

    pub(crate) fn bytes_of(event: &TransitionEvent) -> Vec<u8> {
        // SAFETY: TransitionEvent is repr(C) without padding, so all its
        // bytes are initialised.
        unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(event).cast::<u8>(),
                size_of::<TransitionEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_ipv4_transition_with_owner() {
        let event = decode(&bytes_of(&raw_event())).unwrap();
        assert_eq!((event.kind, event.tw), (EventKind::Sock, None));
        let t = event.transition;
        assert_eq!(t.src, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(t.dst, "127.0.0.2:6379".parse().unwrap());
        assert_eq!((t.old, t.new), (TcpState::Established, TcpState::FinWait1));
        assert_eq!(
            t.owner,
            Some(Owner {
                pid: 4242,
                comm: Comm::from("curl"),
                cgroup: 0,
            })
        );
        assert_eq!(t.in_state_ns, Some(1_500));
        assert_eq!(t.family(), "ipv4");
    }

    #[test]
    fn kernel_addresses_decode_back_to_what_was_encoded() {
        for src in ["10.1.2.3:8080", "[2001:db8::7]:443"] {
            let src: SocketAddr = src.parse().unwrap();
            let mut raw = raw_event();
            (raw.saddr, raw.family) = to_kernel_addr(src.ip());
            raw.daddr = raw.saddr;
            raw.sport = src.port();
            let t = decode(&bytes_of(&raw)).unwrap().transition;
            assert_eq!(t.src, src);
        }
    }

    #[test]
    fn decodes_ipv6_unknown_owner_and_unknown_duration() {
        let mut raw = raw_event();
        raw.family = AF_INET6;
        raw.saddr = Ipv6Addr::LOCALHOST.octets();
        raw.daddr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        raw.pid = 0;
        raw.comm = [0; 16];
        raw.flags = FLAG_IN_STATE_UNKNOWN;
        let t = decode(&bytes_of(&raw)).unwrap().transition;
        assert_eq!(t.src, "[::1]:40000".parse().unwrap());
        assert_eq!(t.dst, "[2001:db8::1]:6379".parse().unwrap());
        assert_eq!(t.owner, None);
        assert_eq!(t.in_state_ns, None);
        assert_eq!(t.family(), "ipv6");
    }

    #[test]
    fn rejects_short_long_and_malformed_records() {
        let bytes = bytes_of(&raw_event());
        assert_eq!(
            decode(&bytes[..10]),
            Err(DecodeError::WrongSize { got: 10, want: 144 })
        );
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(decode(&long), Err(DecodeError::WrongSize { .. })));
        let mut raw = raw_event();
        raw.family = 99;
        assert_eq!(decode(&bytes_of(&raw)), Err(DecodeError::UnknownFamily(99)));
        let mut raw = raw_event();
        raw.new_state = 0;
        assert_eq!(decode(&bytes_of(&raw)), Err(DecodeError::UnknownState(0)));
        let mut raw = raw_event();
        raw.kind = 9;
        assert_eq!(decode(&bytes_of(&raw)), Err(DecodeError::UnknownKind(9)));
    }

    #[test]
    fn decodes_time_wait_facts() {
        let mut raw = raw_event();
        raw.kind = kind::TW_EXPIRE;
        raw.old_state = tcp_state::TIME_WAIT;
        raw.new_state = tcp_state::CLOSE;
        raw.tw_id = 0xffff_8880_0000_0100;
        raw.tw_birth_ns = 1;
        raw.tw_birth_jiffies = 2;
        raw.tw_expires = 3;
        raw.tw_bucket_expiry = 4;
        raw.end_substate = tcp_state::FIN_WAIT2;
        let event = decode(&bytes_of(&raw)).unwrap();
        assert_eq!(event.kind, EventKind::TwExpire);
        assert_eq!(
            event.tw,
            Some(TwFacts {
                id: 0xffff_8880_0000_0100,
                birth_ns: 1,
                birth_jiffies: 2,
                expires: 3,
                bucket_expiry: 4,
                end_substate: TcpState::FinWait2,
            })
        );
    }

    #[test]
    fn decodes_from_unaligned_buffer() {
        let mut buf = vec![0u8; 1];
        buf.extend(bytes_of(&raw_event()));
        assert_eq!(
            decode(&buf[1..]).unwrap().transition.sock_id,
            0xffff_8880_1234_5678
        );
    }

    #[test]
    fn comm_stops_at_nul_and_tolerates_bad_utf8() {
        let mut comm = [0u8; 16];
        comm[..3].copy_from_slice(&[b'a', 0xff, b'b']);
        assert_eq!(Comm::from_kernel(comm).to_string(), "a\u{fffd}b");
        assert_eq!(Comm::from_kernel([b'x'; 16]).to_string(), "x".repeat(16));
        assert_eq!(Comm::UNKNOWN.to_string(), "-");
        assert_eq!(
            Comm::from("a-very-long-command-name").to_string(),
            "a-very-long-com"
        );
    }

    #[test]
    fn every_kernel_state_round_trips_its_name() {
        for value in 1..=13 {
            let state = TcpState::from_kernel(value).unwrap();
            assert!(!state.name().starts_with("TCP_"));
        }
        assert_eq!(TcpState::from_kernel(14), None);
        assert_eq!(TcpState::FinWait2.to_string(), "FIN_WAIT2");
    }
}
