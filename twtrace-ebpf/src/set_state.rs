//! `inet_sock_set_state`: every state change of a full TCP socket. Keeps
//! each socket's record (owner, when it entered its state), hands a
//! closing socket over to its TIME_WAIT mini-socket, and streams the
//! transitions into teardown states.

use aya_ebpf::{
    EbpfContext,
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use twtrace_common::{
    AF_INET, AF_INET6, Filter, IPPROTO_TCP, SockLayout, SockRecord, connection_end, counter,
    tcp_state,
};

use crate::{
    emit::{self, InState},
    ending::{self, CloseFacts},
    fault,
    kernel::{address_of, btf_read, bump, in_state, kread, now_ns, read},
    maps::{FILTER, FILTER_PIDS, FILTER_PORTS, SET_STATE_LAYOUT, SOCK_LAYOUT, SOCKS},
    owner, resets, timewait,
    twin::{self, Role},
};

/// The fields of one state change that twtrace uses.
pub struct SetState {
    pub sock_id: u64,
    pub old_state: u8,
    pub new_state: u8,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// At `-> CLOSE`: what the socket says about how it ended.
    pub close: CloseFacts,
}

/// The classic tracepoint, whose record layout comes from tracefs: the
/// fallback when BTF does not give `struct sock`'s layout.
#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if try_classic(&ctx).is_err() {
        bump(counter::READ_FAILED);
    }
    0
}

/// The same tracepoint, raw: `(sk, oldstate, newstate)`, with the socket's
/// fields read through BTF offsets. Preferred: no record to build, and a
/// per-program recursion guard instead of the one that makes the kernel
/// skip a classic tracepoint program whenever another runs on the CPU.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state_raw(ctx: RawTracePointContext) -> i32 {
    raw_hit(&ctx, Role::Primary)
}

/// The same, for the hits the kernel skipped the program above for.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state_twin(ctx: RawTracePointContext) -> i32 {
    raw_hit(&ctx, Role::Twin)
}

/// The same tracepoint as a BTF-typed one (`tp_btf`): the socket is a
/// typed pointer, so its fields are plain loads instead of a helper call
/// each (~35 ns apiece, six per state change). Preferred where the kernel
/// loads it; the raw pair above is the fallback.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    btf_hit(&ctx, Role::Primary)
}

/// The same, for the hits the kernel skipped the program above for.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf_twin(ctx: BtfTracePointContext) -> i32 {
    btf_hit(&ctx, Role::Twin)
}

#[inline(always)]
fn raw_hit(ctx: &RawTracePointContext, role: Role) -> i32 {
    let (sk, old, new): (u64, u64, u64) = (ctx.arg(0), ctx.arg(1), ctx.arg(2));
    let (_run, handle) = enter(role, sk, old, new);
    if handle && try_state_change(ctx, &RawSock(sk), old, new).is_err() {
        bump(counter::READ_FAILED);
    }
    0
}

#[inline(always)]
fn btf_hit(ctx: &BtfTracePointContext, role: Role) -> i32 {
    let (pointer, old, new): (u64, u64, u64) = (ctx.arg(0), ctx.arg(1), ctx.arg(2));
    let address = address_of(pointer, twin::program_slot(twin::SET_STATE, role));
    let (_run, handle) = enter(role, address, old, new);
    let sk = TypedSock { pointer, address };
    if handle && try_state_change(ctx, &sk, old, new).is_err() {
        bump(counter::READ_FAILED);
    }
    0
}

/// Starts this program's run for a state change (see `twin::enter`).
#[inline(always)]
fn enter(role: Role, sk: u64, old: u64, new: u64) -> (Option<twin::Run>, bool) {
    // First, where the verifier has one state to follow through the wait;
    // the global is read first, so outside the tests nothing else runs.
    let delay = fault::hand_over_delay_ns();
    if delay != 0 && role == Role::Primary && is_hand_over(old, new) {
        fault::spin(delay);
    }
    twin::enter(twin::SET_STATE, role, hit(sk, old, new))
}

/// One state change: the socket (kernel addresses have their top 16 bits
/// set, which the two states replace) and its old and new state.
fn hit(sk: u64, old: u64, new: u64) -> u64 {
    sk ^ (((old & 0xff) << 8 | (new & 0xff)) << 48)
}

/// A full socket's `X -> CLOSE` that may hand it to a mini-socket.
fn is_hand_over(old: u64, new: u64) -> bool {
    new == u64::from(tcp_state::CLOSE)
        && (old == u64::from(tcp_state::FIN_WAIT2) || old == u64::from(tcp_state::CLOSING))
}

fn is_traced_family(filter: &Filter, family: u16) -> bool {
    (family == AF_INET || family == AF_INET6) && (filter.family == 0 || family == filter.family)
}

/// How a hook reads the socket's fields: through the helper at BTF
/// offsets (raw), or with plain loads the verifier checks (typed).
trait SockFields {
    /// The socket's address: its identity in the maps and claims.
    fn address(&self) -> u64;
    fn u16_at(&self, offset: u16) -> Result<u16, i64>;
    fn u32_at(&self, offset: u16) -> Result<u32, i64>;
    fn u64_at(&self, offset: u16) -> Result<u64, i64>;
    /// The local port, host order.
    fn local_port(&self, l: &SockLayout) -> Result<u16, i64>;
}

/// A raw tracepoint's socket: a plain number to the verifier.
struct RawSock(u64);

impl SockFields for RawSock {
    fn address(&self) -> u64 {
        self.0
    }
    fn u16_at(&self, offset: u16) -> Result<u16, i64> {
        kread(self.0 + u64::from(offset))
    }
    fn u32_at(&self, offset: u16) -> Result<u32, i64> {
        kread(self.0 + u64::from(offset))
    }
    fn u64_at(&self, offset: u16) -> Result<u64, i64> {
        kread(self.0 + u64::from(offset))
    }
    fn local_port(&self, l: &SockLayout) -> Result<u16, i64> {
        Ok(u16::from_be(self.u16_at(l.sport)?))
    }
}

/// A typed tracepoint's socket: the pointer, for loads within `struct
/// sock`, and its address (`address_of`), for the rest.
struct TypedSock {
    pointer: u64,
    address: u64,
}

impl SockFields for TypedSock {
    fn address(&self) -> u64 {
        self.address
    }
    fn u16_at(&self, offset: u16) -> Result<u16, i64> {
        Ok(btf_read(self.pointer, offset))
    }
    fn u32_at(&self, offset: u16) -> Result<u32, i64> {
        Ok(btf_read(self.pointer, offset))
    }
    fn u64_at(&self, offset: u16) -> Result<u64, i64> {
        Ok(btf_read(self.pointer, offset))
    }
    /// `skc_num`, a plain load; once it is cleared at CLOSE, `inet_sport`
    /// through the helper (it lies in `struct inet_sock`, beyond the type
    /// the verifier knows the argument as).
    fn local_port(&self, l: &SockLayout) -> Result<u16, i64> {
        match self.u16_at(l.num)? {
            0 => Ok(u16::from_be(kread(self.address + u64::from(l.sport))?)),
            port => Ok(port),
        }
    }
}

/// One state change of the socket `sk` from `old` to `new`, read and
/// handled. IPv6 addresses go through the helper either way (a 16-byte
/// load is not one the verifier allows).
// Inlined into each program and its twin: a shared call frame of its own
// would count twice against the 512-byte combined stack of Linux 6.1.
#[inline(always)]
fn try_state_change<C: EbpfContext>(
    ctx: &C,
    sk: &impl SockFields,
    old: u64,
    new: u64,
) -> Result<(), i64> {
    let l = SOCK_LAYOUT.load();
    if sk.u16_at(l.protocol)? != IPPROTO_TCP {
        return Ok(());
    }
    let family = sk.u16_at(l.family)?;
    let filter = FILTER.load();
    if !is_traced_family(&filter, family) {
        return Ok(());
    }
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if family == AF_INET6 {
        saddr = kread(sk.address() + u64::from(l.v6_rcv_saddr))?;
        daddr = kread(sk.address() + u64::from(l.v6_daddr))?;
    } else {
        saddr[..4].copy_from_slice(&sk.u32_at(l.rcv_saddr)?.to_ne_bytes());
        daddr[..4].copy_from_slice(&sk.u32_at(l.daddr)?.to_ne_bytes());
    }
    // The states are ints in the prototype; they fit in a byte.
    let s = SetState {
        sock_id: sk.address(),
        old_state: old as u8,
        new_state: new as u8,
        sport: sk.local_port(&l)?,
        dport: u16::from_be(sk.u16_at(l.dport)?),
        family,
        saddr,
        daddr,
        close: if new == u64::from(tcp_state::CLOSE) {
            close_facts(sk, &l, old as u8)
        } else {
            CloseFacts::NONE
        },
    };
    handle(ctx, &filter, &s)
}

/// `SOCK_LINGER` in `enum sock_flags`: its fifth value on every kernel.
const SOCK_LINGER: u64 = 4;

/// What the closing socket says about its end (see `ending`). `tcp_sock`'s
/// fields lie beyond the `struct sock` a typed pointer is known as: read
/// through the helper.
// Inlined, as `try_state_change` (the 512-byte stack of Linux 6.1).
#[inline(always)]
fn close_facts(sk: &impl SockFields, l: &SockLayout, old: u8) -> CloseFacts {
    let err = if l.err == 0 {
        0
    } else {
        sk.u32_at(l.err).unwrap_or(0)
    };
    let linger_zero = l.sk_flags != 0
        && l.lingertime != 0
        && sk
            .u64_at(l.sk_flags)
            .is_ok_and(|f| f & (1 << SOCK_LINGER) != 0)
        && sk.u64_at(l.lingertime) == Ok(0);
    // close() drops what was never read without moving `copied_seq`; a
    // FIN received (CLOSE_WAIT) takes one sequence number of its own.
    let unread_data = l.rcv_nxt != 0 && l.copied_seq != 0 && {
        let at = |offset: u16| kread::<u32>(sk.address() + u64::from(offset));
        match (at(l.rcv_nxt), at(l.copied_seq)) {
            (Ok(rcv_nxt), Ok(copied)) => {
                let fin = u32::from(old == tcp_state::CLOSE_WAIT);
                rcv_nxt.wrapping_sub(copied) as i32 > fin as i32
            }
            _ => false,
        }
    };
    CloseFacts {
        err,
        unread_data,
        linger_zero,
    }
}

fn try_classic(ctx: &TracePointContext) -> Result<(), i64> {
    let layout = SET_STATE_LAYOUT.load();
    if read::<u16>(ctx, layout.protocol)? != IPPROTO_TCP {
        return Ok(());
    }
    let filter = FILTER.load();
    let family: u16 = read(ctx, layout.family)?;
    if !is_traced_family(&filter, family) {
        return Ok(());
    }
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if family == AF_INET6 {
        saddr = read(ctx, layout.saddr_v6)?;
        daddr = read(ctx, layout.daddr_v6)?;
    } else {
        saddr[..4].copy_from_slice(&read::<[u8; 4]>(ctx, layout.saddr)?);
        daddr[..4].copy_from_slice(&read::<[u8; 4]>(ctx, layout.daddr)?);
    }
    let s = SetState {
        sock_id: read(ctx, layout.skaddr)?,
        // The kernel's states fit in a byte; the record stores them as i32.
        old_state: read::<i32>(ctx, layout.oldstate)? as u8,
        new_state: read::<i32>(ctx, layout.newstate)? as u8,
        sport: read(ctx, layout.sport)?,
        dport: read(ctx, layout.dport)?,
        family,
        saddr,
        daddr,
        // The classic record carries no socket fields; a reset received
        // is still known from the record (`resets`).
        close: CloseFacts::NONE,
    };
    handle(ctx, &filter, &s)
}

/// Everything after reading the tracepoint: the socket's record, the
/// TIME_WAIT hand-over, filters, and the event.
// Inlined: Linux 6.1's verifier caps the stack of a whole call chain at
// 512 bytes, and a frame of its own would push the programs past it.
#[inline(always)]
fn handle<C: EbpfContext>(ctx: &C, filter: &Filter, s: &SetState) -> Result<(), i64> {
    // close() after shutdown() re-enters the same state (FIN_WAIT1 or
    // LAST_ACK, via tcp_close_state). Not a transition: the time in state
    // runs on; but it is a close() by the owner.
    if s.old_state == s.new_state {
        owner::closed_again(s.sock_id);
        return Ok(());
    }
    let now = now_ns();
    let (record, in_state) = update_record(s, now);
    owner::track_listener(s, &record);
    let emit = passes_filters(filter, &record, s.sport, s.dport);
    // The full socket's CLOSE after FIN_WAIT2 or CLOSING may be only its
    // hand-over to a mini-socket: the connection lives on, it is no close.
    if is_hand_over(u64::from(s.old_state), u64::from(s.new_state))
        && timewait::take_over(ctx, s, &record, in_state, now, emit)
    {
        return Ok(());
    }
    let wanted = filter.all_states != 0 || is_connection_teardown(s.old_state, s.new_state);
    if wanted && emit {
        let end = if s.new_state == tcp_state::CLOSE {
            ending::of_close(s.old_state, &record, &s.close)
        } else {
            (connection_end::NONE, 0)
        };
        if ending::is_in_doubt(s.old_state, end.0) {
            resets::doubt(s.sock_id);
        }
        emit::sock_transition(ctx, s, &record, now, in_state, end);
    }
    Ok(())
}

/// Moves the socket's record to its new state, learning its owner where
/// the kernel runs for it, and returns the record and the time it spent
/// in its old state.
// Inlined: a call frame of its own pushed the programs past the 512-byte
// combined stack that Linux 6.1's verifier allows.
#[inline(always)]
fn update_record(s: &SetState, now: u64) -> (SockRecord, InState) {
    // A socket leaving CLOSE (connect, listen) or LISTEN (a child cloned
    // from its listener) is new: whatever a recycled address left behind
    // must not leak into it.
    let born = s.old_state == tcp_state::CLOSE || s.old_state == tcp_state::LISTEN;
    let owner_context = owner::in_owner_context(s.old_state, s.new_state);
    let existing = if born {
        None
    } else {
        SOCKS.get_ptr_mut(s.sock_id)
    };
    let result = if let Some(existing) = existing {
        // SAFETY: the pointer comes from a successful lookup and the value
        // lives until deleted; only this socket's own events touch it, and
        // the kernel serialises those under the socket's lock (softirq
        // work on a socket a task holds waits in its backlog).
        let existing = unsafe { &mut *existing };
        let spent = in_state(existing.since_ns, now);
        existing.since_ns = now;
        if owner_context {
            owner::set_to_current(existing);
        }
        (*existing, spent)
    } else {
        let record = owner::of_new_socket(s, owner_context, now);
        if s.new_state != tcp_state::CLOSE && SOCKS.insert(s.sock_id, record, 0).is_err() {
            bump(counter::SOCK_UPDATE_FAILED);
        }
        (record, in_state(0, now))
    };
    if s.new_state == tcp_state::CLOSE {
        // The address will be reused for another socket: end the record.
        let _ = SOCKS.remove(s.sock_id);
    }
    result
}

pub fn passes_filters(filter: &Filter, owner: &SockRecord, sport: u16, dport: u16) -> bool {
    if filter.pids_enabled != 0 && FILTER_PIDS.get_ptr(owner.pid).is_none() {
        return false;
    }
    if filter.netns != 0 && owner.netns != filter.netns {
        return false;
    }
    if filter.ports_enabled != 0
        && FILTER_PORTS.get_ptr(sport).is_none()
        && FILTER_PORTS.get_ptr(dport).is_none()
    {
        return false;
    }
    true
}

/// A move into a teardown state, except a listener closing: that ends no
/// connection.
fn is_connection_teardown(old: u8, new: u8) -> bool {
    tcp_state::is_teardown(new) && !(old == tcp_state::LISTEN && new == tcp_state::CLOSE)
}
