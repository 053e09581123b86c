//! twtrace's kernel side: follows TCP sockets through their state changes,
//! remembers who owns each one, and streams teardown transitions.
//!
//! Ownership is the hard part. Most teardown transitions run in softirq,
//! where the "current task" is whoever happened to be on the CPU (pid 0, a
//! ksoftirqd, or on loopback the *peer* process that sent the packet). So
//! the owner is learnt only where the kernel is provably running on behalf
//! of the socket's user — connect(), close()/shutdown(), send, receive —
//! remembered per socket, and stamped on every later transition.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext, Global,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::{debug, warn};
use twtrace_common::{
    AF_INET, AF_INET6, DEFAULT_MAX_SOCKETS, DEFAULT_MAX_TW, FLAG_IN_STATE_UNKNOWN, Filter,
    HANDOVER_WINDOW_NS, IPPROTO_TCP, ListenerKey, MAX_FILTER_ENTRIES, SetStateLayout, SockLayout,
    SockRecord, TransitionEvent, TwConfig, TwRecord, TwScratch, counter, kind, tcp_state,
};

/// `BPF_F_NO_COMMON_LRU`: per-CPU LRU lists, no shared lock.
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Unread bytes in the ring past which a submit wakes the reader; the
/// loader sets it to a quarter of the ring.
#[unsafe(no_mangle)]
static WAKEUP_AT_BYTES: Global<u64> = Global::new(64 * 1024);

/// 256 KiB measured zero drops for a 20 000-connection burst; the loader
/// may resize it (`--ring-kib`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Per live socket, keyed by the kernel's `struct sock *`. LRU so that
/// sockets whose CLOSE we never see (or a burst beyond capacity) cannot
/// exhaust the map; the loader sizes it.
#[map]
static SOCKS: LruHashMap<u64, SockRecord> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOCKETS, BPF_F_NO_COMMON_LRU);

/// Who called listen() on each listening address: a socket accepted from
/// it belongs to that process until its own use (send, receive, close)
/// says otherwise. Without this, an accepted socket that is closed before
/// any data moves would have no owner at its first teardown transition.
#[map]
static LISTENERS: LruHashMap<ListenerKey, SockRecord> = LruHashMap::with_max_entries(4096, 0);

#[map]
static FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[map]
static FILTER_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

/// Live TIME_WAIT mini-sockets, keyed by their timer's address. The loader
/// sizes it from `net.ipv4.tcp_max_tw_buckets`.
#[map]
static TWS: LruHashMap<u64, TwRecord> =
    LruHashMap::with_max_entries(DEFAULT_MAX_TW, BPF_F_NO_COMMON_LRU);

#[map]
static TW_SCRATCH: PerCpuArray<TwScratch> = PerCpuArray::with_max_entries(1, 0);

#[unsafe(no_mangle)]
static FILTER: Global<Filter> = Global::new(Filter::NONE);

#[unsafe(no_mangle)]
static TW_CONFIG: Global<TwConfig> = Global::new(TwConfig::DISABLED);

#[unsafe(no_mangle)]
static SOCK_LAYOUT: Global<SockLayout> = Global::new(SockLayout::UNKNOWN);

#[unsafe(no_mangle)]
static SET_STATE_LAYOUT: Global<SetStateLayout> = Global::new(SetStateLayout::DEFAULT);

/// A process followed by `twtrace record` forked: follow the child too.
/// Runs in the parent's context, so the current tgid is the parent's.
#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let filter = FILTER.load();
    if filter.follow_forks == 0 {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if FILTER_PIDS.get_ptr(parent).is_none() {
        return 0;
    }
    match read::<i32>(&ctx, filter.fork_child_pid) {
        // A new thread's tid joins too: harmless, owners are tgids.
        Ok(child) if child > 0 => {
            if FILTER_PIDS.insert(child as u32, 1, 0).is_err() {
                bump(counter::SOCK_UPDATE_FAILED);
            }
        }
        _ => bump(counter::READ_FAILED),
    }
    0
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if try_inet_sock_set_state(&ctx).is_err() {
        bump(counter::READ_FAILED);
    }
    0
}

/// The same tracepoint, raw: `(sk, oldstate, newstate)`, with the socket's
/// fields read through BTF offsets. Preferred when BTF is there: no record
/// to build, and a per-program recursion guard instead of the global one
/// that makes the kernel skip classic tracepoint programs whenever another
/// runs on the CPU.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state_raw(ctx: RawTracePointContext) -> i32 {
    if try_inet_sock_set_state_raw(&ctx).is_err() {
        bump(counter::READ_FAILED);
    }
    0
}

fn kread<T>(at: u64) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel faults safely on a bad address.
    unsafe { bpf_probe_read_kernel(at as *const T) }.map_err(i64::from)
}

fn try_inet_sock_set_state_raw(ctx: &RawTracePointContext) -> Result<(), i64> {
    let l = SOCK_LAYOUT.load();
    let sk: u64 = ctx.arg(0);
    if kread::<u16>(sk + u64::from(l.protocol))? != IPPROTO_TCP {
        return Ok(());
    }
    let family: u16 = kread(sk + u64::from(l.family))?;
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    let filter = FILTER.load();
    if filter.family != 0 && family != filter.family {
        return Ok(());
    }
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if family == AF_INET6 {
        saddr = kread(sk + u64::from(l.v6_rcv_saddr))?;
        daddr = kread(sk + u64::from(l.v6_daddr))?;
    } else {
        saddr[..4].copy_from_slice(&kread::<[u8; 4]>(sk + u64::from(l.rcv_saddr))?);
        daddr[..4].copy_from_slice(&kread::<[u8; 4]>(sk + u64::from(l.daddr))?);
    }
    // The states are ints in the prototype; they fit in a byte.
    let s = SetState {
        sock_id: sk,
        old_state: ctx.arg::<u64>(1) as u8,
        new_state: ctx.arg::<u64>(2) as u8,
        sport: u16::from_be(kread(sk + u64::from(l.sport))?),
        dport: u16::from_be(kread(sk + u64::from(l.dport))?),
        family,
        saddr,
        daddr,
    };
    handle_set_state(ctx, &filter, &s)
}

/// `tcp_sendmsg_locked(sk, msg, skb, size_goal)` runs in the sender's
/// context. The classic tracepoint's record lacks the socket, the raw one
/// has it as the first argument.
#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn tcp_sendmsg_locked(ctx: RawTracePointContext) -> i32 {
    learn_owner(&ctx, ctx.arg::<u64>(0));
    0
}

/// `tcp_rcv_space_adjust(sk)` runs from recvmsg, in the reader's context.
#[raw_tracepoint(tracepoint = "tcp_rcv_space_adjust")]
pub fn tcp_rcv_space_adjust(ctx: RawTracePointContext) -> i32 {
    learn_owner(&ctx, ctx.arg::<u64>(0));
    0
}

/// Transitions that only ever happen inside a syscall of the socket's
/// user: connect() (CLOSE→SYN_SENT) and close()/shutdown() (the two below).
fn in_owner_context(old: u8, new: u8) -> bool {
    matches!(
        (old, new),
        (tcp_state::CLOSE, tcp_state::SYN_SENT | tcp_state::LISTEN)
            | (tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1)
            | (tcp_state::CLOSE_WAIT, tcp_state::LAST_ACK)
    )
}

fn listener_key(s: &SetState, any_address: bool) -> ListenerKey {
    ListenerKey {
        addr: if any_address { [0; 16] } else { s.saddr },
        port: s.sport,
        family: s.family,
    }
}

/// The owner of the listener a new child socket was cloned from: the one
/// bound to its exact address, else the wildcard one.
fn listener_owner(s: &SetState) -> Option<SockRecord> {
    let found = LISTENERS
        .get_ptr(listener_key(s, false))
        .or_else(|| LISTENERS.get_ptr(listener_key(s, true)))?;
    // SAFETY: a pointer from a successful lookup; copied out at once.
    Some(unsafe { *found })
}

/// The fields of one `inet_sock_set_state` record that twtrace uses.
struct SetState {
    sock_id: u64,
    old_state: u8,
    new_state: u8,
    sport: u16,
    dport: u16,
    family: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

fn read_set_state(
    ctx: &TracePointContext,
    layout: &SetStateLayout,
    family: u16,
) -> Result<SetState, i64> {
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if family == AF_INET6 {
        saddr = read(ctx, layout.saddr_v6)?;
        daddr = read(ctx, layout.daddr_v6)?;
    } else {
        saddr[..4].copy_from_slice(&read::<[u8; 4]>(ctx, layout.saddr)?);
        daddr[..4].copy_from_slice(&read::<[u8; 4]>(ctx, layout.daddr)?);
    }
    Ok(SetState {
        sock_id: read(ctx, layout.skaddr)?,
        // The kernel's states fit in a byte; the record stores them as i32.
        old_state: read::<i32>(ctx, layout.oldstate)? as u8,
        new_state: read::<i32>(ctx, layout.newstate)? as u8,
        sport: read(ctx, layout.sport)?,
        dport: read(ctx, layout.dport)?,
        family,
        saddr,
        daddr,
    })
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let layout = SET_STATE_LAYOUT.load();
    let protocol: u16 = read(ctx, layout.protocol)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let filter = FILTER.load();
    let family: u16 = read(ctx, layout.family)?;
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    if filter.family != 0 && family != filter.family {
        return Ok(());
    }
    let s = read_set_state(ctx, &layout, family)?;
    handle_set_state(ctx, &filter, &s)
}

/// Everything after reading the tracepoint: the socket's record, its
/// owner, the TIME_WAIT hand-over, filters, and the event.
fn handle_set_state<C: EbpfContext>(ctx: &C, filter: &Filter, s: &SetState) -> Result<(), i64> {
    let family = s.family;
    let sock_id = s.sock_id;
    let (old_state, new_state) = (s.old_state, s.new_state);
    // SAFETY: a plain helper call with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };

    // close() after shutdown() re-enters the same state (FIN_WAIT1 or
    // LAST_ACK, via tcp_close_state). Not a transition: the time in state
    // runs on; but it is a close() by the owner.
    if old_state == new_state {
        if let Some(existing) = SOCKS.get_ptr_mut(sock_id) {
            // SAFETY: a pointer from a successful lookup; see below.
            set_owner_to_current(unsafe { &mut *existing });
        }
        return Ok(());
    }

    // A socket leaving CLOSE (connect, listen) or LISTEN (a child cloned
    // from its listener) is new: whatever a recycled address left behind
    // must not leak into it.
    let born = old_state == tcp_state::CLOSE || old_state == tcp_state::LISTEN;
    let mut record = SockRecord {
        since_ns: 0,
        pid: 0,
        pad: 0,
        comm: [0; 16],
    };
    let mut in_state_ns = 0;
    let mut flags = FLAG_IN_STATE_UNKNOWN;
    let owner_context = in_owner_context(old_state, new_state);
    match SOCKS.get_ptr_mut(sock_id) {
        Some(existing) if !born => {
            // SAFETY: the pointer comes from a successful lookup and the map
            // value lives until deleted; only this socket's own transitions
            // touch it, and the kernel serialises those under the socket lock.
            let existing = unsafe { &mut *existing };
            if existing.since_ns != 0 {
                in_state_ns = now.saturating_sub(existing.since_ns);
                flags = 0;
            }
            existing.since_ns = now;
            if owner_context {
                set_owner_to_current(existing);
            }
            record = *existing;
        }
        _ => {
            if owner_context {
                set_owner_to_current(&mut record);
            } else if old_state == tcp_state::LISTEN
                && let Some(listener) = listener_owner(s)
            {
                record.pid = listener.pid;
                record.comm = listener.comm;
            }
            record.since_ns = now;
            if new_state != tcp_state::CLOSE && SOCKS.insert(sock_id, record, 0).is_err() {
                bump(counter::SOCK_UPDATE_FAILED);
            }
        }
    }
    if new_state == tcp_state::CLOSE {
        // The address will be reused for another socket: end the record here.
        let _ = SOCKS.remove(sock_id);
    }
    if new_state == tcp_state::LISTEN {
        let _ = LISTENERS.insert(listener_key(s, false), record, 0);
    } else if old_state == tcp_state::LISTEN && new_state == tcp_state::CLOSE {
        let _ = LISTENERS.remove(listener_key(s, false));
    }
    let emit = passes_filters(filter, record.pid, s.sport, s.dport);

    if new_state == tcp_state::CLOSE
        && (old_state == tcp_state::FIN_WAIT2 || old_state == tcp_state::CLOSING)
        && take_over_by_mini_socket(ctx, s, &record, in_state_ns, flags, now, emit)
    {
        // The full socket's CLOSE is only a hand-over: the connection lives
        // on in the mini-socket, so it is no close.
        return Ok(());
    }

    if filter.all_states == 0 && !is_connection_teardown(old_state, new_state) {
        return Ok(());
    }
    if !emit {
        return Ok(());
    }
    let event = TransitionEvent {
        saddr: s.saddr,
        daddr: s.daddr,
        ts_ns: now,
        in_state_ns,
        sock_id,
        tw_id: 0,
        tw_birth_ns: 0,
        tw_birth_jiffies: 0,
        tw_expires: 0,
        tw_bucket_expiry: 0,
        pid: record.pid,
        flags,
        sport: s.sport,
        dport: s.dport,
        family,
        old_state,
        new_state,
        kind: kind::SOCK,
        end_substate: 0,
        pad: [0; 6],
        comm: record.comm,
    };
    submit(ctx, &event);
    Ok(())
}

fn passes_filters(filter: &Filter, pid: u32, sport: u16, dport: u16) -> bool {
    if filter.pids_enabled != 0 && FILTER_PIDS.get_ptr(pid).is_none() {
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

fn submit<C: EbpfContext>(ctx: &C, event: &TransitionEvent) {
    // Waking the reader costs an irq_work (an IPI, a VM exit on a guest):
    // measured at ~2.5 µs per event here, two thirds of the program's cost.
    // The reader polls every few milliseconds anyway; wake it only when the
    // ring fills past the mark, so it drains in time at any rate.
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_AT_BYTES.load() {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    match EVENTS.reserve::<TransitionEvent>(0) {
        Some(mut entry) => {
            entry.write(*event);
            entry.submit(flags);
        }
        None => {
            bump(counter::RINGBUF_FULL);
            warn!(ctx, "ring buffer full: transition dropped");
        }
    }
}

/// If `tcp_time_wait()` just armed a mini-socket's timer on this CPU, the
/// full socket's `X -> CLOSE` is its hand-over: record the mini-socket
/// and report its birth. Returns whether that was the case.
fn take_over_by_mini_socket<C: EbpfContext>(
    ctx: &C,
    s: &SetState,
    sock: &SockRecord,
    in_state_ns: u64,
    flags: u32,
    now: u64,
    emit: bool,
) -> bool {
    let Some(scratch) = TW_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU slot; tracing programs do not nest on one CPU.
    let scratch = unsafe { &mut *scratch };
    let timer = scratch.pending_timer;
    if timer == 0 || now.saturating_sub(scratch.pending_ns) > HANDOVER_WINDOW_NS {
        return false;
    }
    scratch.pending_timer = 0;
    let substate = scratch.pending_substate;
    // An orphaned FIN_WAIT2 goes on in the mini-socket: its time in
    // FIN_WAIT2 keeps counting from the full socket's FIN_WAIT2.
    let since_ns = if substate == tcp_state::TIME_WAIT {
        now
    } else if flags & FLAG_IN_STATE_UNKNOWN == 0 {
        now - in_state_ns
    } else {
        0
    };
    let record = TwRecord {
        saddr: s.saddr,
        daddr: s.daddr,
        sock_id: s.sock_id,
        since_ns,
        birth_ns: scratch.pending_ns,
        birth_jiffies: scratch.pending_jiffies,
        pid: sock.pid,
        sport: s.sport,
        dport: s.dport,
        family: s.family,
        substate,
        emit: u8::from(emit),
        flags: if since_ns == 0 {
            FLAG_IN_STATE_UNKNOWN
        } else {
            0
        },
        comm: sock.comm,
    };
    if TWS.insert(timer, record, 0).is_err() {
        bump(counter::TW_UPDATE_FAILED);
    }
    if emit {
        let event = TransitionEvent {
            saddr: s.saddr,
            daddr: s.daddr,
            ts_ns: now,
            in_state_ns,
            sock_id: s.sock_id,
            tw_id: timer,
            tw_birth_ns: scratch.pending_ns,
            tw_birth_jiffies: scratch.pending_jiffies,
            tw_expires: scratch.pending_expires,
            tw_bucket_expiry: scratch.pending_bucket_expiry,
            pid: sock.pid,
            flags,
            sport: s.sport,
            dport: s.dport,
            family: s.family,
            old_state: s.old_state,
            new_state: substate,
            kind: kind::TW_BIRTH,
            end_substate: 0,
            pad: [0; 6],
            comm: sock.comm,
        };
        submit(ctx, &event);
    }
    true
}

/// `timer:timer_start` fires for every timer in the system; only those
/// whose callback is `tw_timer_handler` belong to mini-sockets.
#[tracepoint]
pub fn timer_start(ctx: TracePointContext) -> u32 {
    if try_timer_start(&ctx).is_err() {
        bump(counter::READ_FAILED);
    }
    0
}

fn try_timer_start(ctx: &TracePointContext) -> Result<(), i64> {
    let cfg = TW_CONFIG.load();
    if cfg.handler == 0 || read::<u64>(ctx, cfg.start_function)? != cfg.handler {
        return Ok(());
    }
    let timer: u64 = read(ctx, cfg.start_timer)?;
    let expires: u64 = read(ctx, cfg.start_expires)?;
    let jiffies: u64 = read(ctx, cfg.start_now)?;
    let bucket_expiry: u64 = if cfg.start_bucket_expiry == 0 {
        0
    } else {
        read(ctx, cfg.start_bucket_expiry)?
    };
    // SAFETY: a plain helper call with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let substate = read_substate(&cfg, timer);
    let Some(scratch) = TW_SCRATCH.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: a per-CPU slot; tracing programs do not nest on one CPU.
    let scratch = unsafe { &mut *scratch };

    // A pending timer is re-armed by detaching it (traced as a cancel) and
    // enqueueing it again, back to back on this CPU.
    if scratch.cancel_timer == timer {
        scratch.cancel_timer = 0;
        if let Some(record) = TWS.get_ptr_mut(timer).filter(|r| {
            // SAFETY: a pointer from a successful lookup.
            same_mini_socket(&cfg, timer, unsafe { &**r })
        }) {
            // SAFETY: a pointer from a successful lookup; the mini-socket's
            // timer events are serialised by the timer base lock.
            let record = unsafe { &mut *record };
            let old = record.substate;
            let in_state_ns = if record.since_ns == 0 {
                0
            } else {
                now.saturating_sub(record.since_ns)
            };
            let flags = if record.since_ns == 0 {
                FLAG_IN_STATE_UNKNOWN
            } else {
                0
            };
            if old != substate {
                record.substate = substate;
                record.since_ns = now;
                record.flags = 0;
            }
            if record.emit != 0 {
                let event = tw_event(
                    record,
                    timer,
                    now,
                    kind::TW_REARM,
                    old,
                    substate,
                    in_state_ns,
                    flags,
                    expires,
                    bucket_expiry,
                    substate,
                );
                submit(ctx, &event);
            }
            return Ok(());
        }
        // No record of this mini-socket: the cancel was an earlier one's
        // (a SYN taking it over, no start followed) whose memory the slab
        // has just handed to a new mini-socket. This is its first arming.
    }
    // First arming: tcp_time_wait() hands the connection over next.
    scratch.pending_timer = timer;
    scratch.pending_ns = now;
    scratch.pending_jiffies = jiffies;
    scratch.pending_expires = expires;
    scratch.pending_bucket_expiry = bucket_expiry;
    scratch.pending_substate = substate;
    Ok(())
}

/// Raw tracepoints for cancel and expiry: they need only the timer, and
/// the kernel guards raw tracepoint programs against recursion one by one,
/// whereas it skips a classic tracepoint program whenever any other one
/// runs on the CPU — and these fire in the timer softirq, on top of
/// everything, all the time.
#[raw_tracepoint(tracepoint = "timer_cancel")]
pub fn timer_cancel(ctx: RawTracePointContext) -> i32 {
    try_timer_cancel(&ctx, ctx.arg::<u64>(0));
    0
}

/// Whether `timer` runs `tw_timer_handler`: read from the timer itself
/// (BTF), else known only by being in the map.
fn is_tw_timer(cfg: &TwConfig, timer: u64) -> bool {
    if cfg.has_btf == 0 {
        return TWS.get_ptr(timer).is_some();
    }
    // SAFETY: bpf_probe_read_kernel faults safely on a bad address.
    let function =
        unsafe { bpf_probe_read_kernel((timer + u64::from(cfg.timer_function_off)) as *const u64) };
    function == Ok(cfg.handler)
}

fn try_timer_cancel<C: EbpfContext>(ctx: &C, timer: u64) {
    let cfg = TW_CONFIG.load();
    if cfg.handler == 0 || !is_tw_timer(&cfg, timer) {
        return;
    }
    let Some(scratch) = TW_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU slot. A raw tracepoint program may run nested in a
    // classic one on this CPU; of the slot it only writes `cancel_timer`,
    // whose cancel/re-arm pairs the kernel runs with interrupts off.
    let scratch = unsafe { &mut *scratch };
    let Some(record) = TWS.get_ptr(timer) else {
        return;
    };
    // SAFETY: a pointer from a successful lookup.
    let record = unsafe { *record };
    if !same_mini_socket(&cfg, timer, &record) {
        return;
    }
    // The previous cancel on this CPU was not followed by a re-arm or an
    // expiry: that mini-socket is gone, and so is its record.
    if scratch.cancel_timer != 0 && scratch.cancel_timer != timer {
        let _ = TWS.remove(scratch.cancel_timer);
    }
    scratch.cancel_timer = timer;
    if record.emit != 0 {
        emit_end(ctx, &cfg, &record, timer, kind::TW_CANCEL);
    }
}

#[raw_tracepoint(tracepoint = "timer_expire_entry")]
pub fn timer_expire_entry(ctx: RawTracePointContext) -> i32 {
    try_timer_expire_entry(&ctx, ctx.arg::<u64>(0));
    0
}

fn try_timer_expire_entry<C: EbpfContext>(ctx: &C, timer: u64) {
    let cfg = TW_CONFIG.load();
    if cfg.handler == 0 || !is_tw_timer(&cfg, timer) {
        return;
    }
    if let Some(scratch) = TW_SCRATCH.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot; tracing programs do not nest on one CPU.
        let scratch = unsafe { &mut *scratch };
        if scratch.cancel_timer == timer {
            scratch.cancel_timer = 0;
        }
    }
    // SAFETY: a pointer from a successful lookup.
    let record = TWS.get_ptr(timer).map(|r| unsafe { *r });
    let Some(record) = record.filter(|r| same_mini_socket(&cfg, timer, r)) else {
        bump(counter::TW_UNTRACKED_END);
        return;
    };
    if record.emit != 0 {
        emit_end(ctx, &cfg, &record, timer, kind::TW_EXPIRE);
    }
    let _ = TWS.remove(timer);
}

fn emit_end<C: EbpfContext>(
    ctx: &C,
    cfg: &TwConfig,
    record: &TwRecord,
    timer: u64,
    event_kind: u8,
) {
    // SAFETY: a plain helper call with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let (in_state_ns, flags) = if record.since_ns == 0 {
        (0, FLAG_IN_STATE_UNKNOWN)
    } else {
        (now.saturating_sub(record.since_ns), 0)
    };
    // The timer's expiry as of now: a re-arm the kernel did not trace
    // (same wheel bucket) still updated it.
    let expires = if cfg.has_btf == 0 {
        0
    } else {
        // SAFETY: bpf_probe_read_kernel faults safely on a bad address.
        unsafe { bpf_probe_read_kernel((timer + u64::from(cfg.timer_expires_off)) as *const u64) }
            .unwrap_or(0)
    };
    let end_substate = read_substate(cfg, timer);
    let event = tw_event(
        record,
        timer,
        now,
        event_kind,
        record.substate,
        tcp_state::CLOSE,
        in_state_ns,
        flags,
        expires,
        0,
        end_substate,
    );
    submit(ctx, &event);
}

#[expect(
    clippy::too_many_arguments,
    reason = "one flat constructor for the event; a builder would cost stack in BPF"
)]
fn tw_event(
    record: &TwRecord,
    timer: u64,
    now: u64,
    event_kind: u8,
    old_state: u8,
    new_state: u8,
    in_state_ns: u64,
    flags: u32,
    expires: u64,
    bucket_expiry: u64,
    end_substate: u8,
) -> TransitionEvent {
    TransitionEvent {
        saddr: record.saddr,
        daddr: record.daddr,
        ts_ns: now,
        in_state_ns,
        sock_id: record.sock_id,
        tw_id: timer,
        tw_birth_ns: record.birth_ns,
        tw_birth_jiffies: record.birth_jiffies,
        tw_expires: expires,
        tw_bucket_expiry: bucket_expiry,
        pid: record.pid,
        flags,
        sport: record.sport,
        dport: record.dport,
        family: record.family,
        old_state,
        new_state,
        kind: event_kind,
        end_substate,
        pad: [0; 6],
        comm: record.comm,
    }
}

/// Whether the record for `timer` describes the mini-socket that owns that
/// timer now: a freed mini-socket's address is soon reused by a new one,
/// and a record left by an early end must not be taken for it.
fn same_mini_socket(cfg: &TwConfig, timer: u64, record: &TwRecord) -> bool {
    if cfg.has_btf == 0 {
        return true;
    }
    let at = |off: i16| timer.wrapping_add_signed(i64::from(off));
    // SAFETY: bpf_probe_read_kernel faults safely on a bad address.
    let sport = unsafe { bpf_probe_read_kernel(at(cfg.sport_from_timer) as *const u16) };
    // SAFETY: as above.
    let dport = unsafe { bpf_probe_read_kernel(at(cfg.dport_from_timer) as *const u16) };
    sport == Ok(record.sport) && dport.map(u16::from_be) == Ok(record.dport)
}

/// The mini-socket's `tw_substate`, read through its embedded timer. Without
/// BTF twtrace cannot tell, and treats every mini-socket as TIME_WAIT.
fn read_substate(cfg: &TwConfig, timer: u64) -> u8 {
    if cfg.has_btf == 0 {
        return tcp_state::TIME_WAIT;
    }
    let at = timer.wrapping_add_signed(i64::from(cfg.substate_from_timer));
    // SAFETY: bpf_probe_read_kernel faults safely on a bad address.
    match unsafe { bpf_probe_read_kernel(at as *const u8) } {
        Ok(tcp_state::FIN_WAIT2) => tcp_state::FIN_WAIT2,
        _ => tcp_state::TIME_WAIT,
    }
}

/// A move into a teardown state, except a listener closing: that ends no
/// connection.
fn is_connection_teardown(old: u8, new: u8) -> bool {
    tcp_state::is_teardown(new) && !(old == tcp_state::LISTEN && new == tcp_state::CLOSE)
}

fn learn_owner<C: EbpfContext>(ctx: &C, sock_id: u64) {
    // The upper half is the tgid: the process, not the thread.
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if pid == 0 {
        return;
    }
    if let Some(existing) = SOCKS.get_ptr_mut(sock_id) {
        // SAFETY: pointer from a successful lookup; see try_inet_sock_set_state.
        let existing = unsafe { &mut *existing };
        // The common case on a busy socket: nothing to learn, stay cheap.
        if existing.pid != pid {
            set_owner_to_current(existing);
            debug!(ctx, "owner {} learnt at send/receive", pid);
        }
        return;
    }
    // A socket twtrace has not seen change state (it predates the tracer):
    // remember its owner, with its time in state unknown.
    let mut record = SockRecord {
        since_ns: 0,
        pid: 0,
        pad: 0,
        comm: [0; 16],
    };
    set_owner_to_current(&mut record);
    if SOCKS.insert(sock_id, record, 0).is_err() {
        bump(counter::SOCK_UPDATE_FAILED);
    }
    debug!(ctx, "owner {} learnt for a socket seen first in use", pid);
}

fn set_owner_to_current(record: &mut SockRecord) {
    record.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    record.comm = bpf_get_current_comm().unwrap_or([0; 16]);
}

fn read<T>(ctx: &TracePointContext, offset: u16) -> Result<T, i64> {
    // SAFETY: the offset comes from the tracepoint's own format file and
    // bpf_probe_read_kernel faults safely on a bad address.
    unsafe { ctx.read_at::<T>(usize::from(offset)) }.map_err(i64::from)
}

fn bump(index: u32) {
    if let Some(count) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, so no other program touches it while this
        // one runs (tracing programs do not nest on one CPU).
        unsafe { *count += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this never runs.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
