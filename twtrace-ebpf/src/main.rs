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
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, raw_tracepoint, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::{debug, warn};
use twtrace_common::{
    AF_INET, AF_INET6, DEFAULT_MAX_SOCKETS, FLAG_IN_STATE_UNKNOWN, Filter, IPPROTO_TCP,
    MAX_FILTER_ENTRIES, SetStateLayout, SockRecord, TransitionEvent, counter, tcp_state,
};

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
static SOCKS: LruHashMap<u64, SockRecord> = LruHashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

#[map]
static FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[map]
static FILTER_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[unsafe(no_mangle)]
static FILTER: Global<Filter> = Global::new(Filter::NONE);

#[unsafe(no_mangle)]
static SET_STATE_LAYOUT: Global<SetStateLayout> = Global::new(SetStateLayout::DEFAULT);

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if try_inet_sock_set_state(&ctx).is_err() {
        bump(counter::READ_FAILED);
    }
    0
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
        (tcp_state::CLOSE, tcp_state::SYN_SENT)
            | (tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1)
            | (tcp_state::CLOSE_WAIT, tcp_state::LAST_ACK)
    )
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let layout = SET_STATE_LAYOUT.load();
    let protocol: u16 = read(ctx, layout.protocol)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let filter = FILTER.load();
    let family: u16 = read(ctx, layout.family)?;
    if filter.family != 0 && family != filter.family {
        return Ok(());
    }
    let sock_id: u64 = read(ctx, layout.skaddr)?;
    // The kernel's states fit in a byte; the record stores them as i32.
    let old_state = read::<i32>(ctx, layout.oldstate)? as u8;
    let new_state = read::<i32>(ctx, layout.newstate)? as u8;
    // SAFETY: a plain helper call with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };

    // close() after shutdown() re-enters the same state (FIN_WAIT1 or
    // LAST_ACK, via tcp_close_state). Not a transition: the time in state
    // runs on; but it is a close() by the owner.
    if old_state == new_state {
        if let Some(existing) = SOCKS.get_ptr_mut(sock_id) {
            // SAFETY: see below; a pointer from a successful lookup.
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
            if in_owner_context(old_state, new_state) {
                set_owner_to_current(existing);
            }
            record = *existing;
        }
        _ => {
            record.since_ns = now;
            if in_owner_context(old_state, new_state) {
                set_owner_to_current(&mut record);
            }
            if new_state != tcp_state::CLOSE && SOCKS.insert(sock_id, record, 0).is_err() {
                bump(counter::SOCK_UPDATE_FAILED);
            }
        }
    }
    if new_state == tcp_state::CLOSE {
        // The address will be reused for another socket: end the record here.
        let _ = SOCKS.remove(sock_id);
    }

    if filter.all_states == 0 && !is_connection_teardown(old_state, new_state) {
        return Ok(());
    }
    if filter.pids_enabled != 0 && FILTER_PIDS.get_ptr(record.pid).is_none() {
        return Ok(());
    }
    let sport: u16 = read(ctx, layout.sport)?;
    let dport: u16 = read(ctx, layout.dport)?;
    if filter.ports_enabled != 0
        && FILTER_PORTS.get_ptr(sport).is_none()
        && FILTER_PORTS.get_ptr(dport).is_none()
    {
        return Ok(());
    }

    let Some(mut entry) = EVENTS.reserve::<TransitionEvent>(0) else {
        bump(counter::RINGBUF_FULL);
        warn!(ctx, "ring buffer full: transition dropped");
        return Ok(());
    };
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    let filled = if family == AF_INET6 {
        read::<[u8; 16]>(ctx, layout.saddr_v6).and_then(|s| {
            saddr = s;
            daddr = read(ctx, layout.daddr_v6)?;
            Ok(())
        })
    } else if family == AF_INET {
        read::<[u8; 4]>(ctx, layout.saddr).and_then(|s| {
            saddr[..4].copy_from_slice(&s);
            daddr[..4].copy_from_slice(&read::<[u8; 4]>(ctx, layout.daddr)?);
            Ok(())
        })
    } else {
        Ok(())
    };
    if let Err(e) = filled {
        entry.discard(0);
        return Err(e);
    }
    entry.write(TransitionEvent {
        saddr,
        daddr,
        ts_ns: now,
        in_state_ns,
        sock_id,
        pid: record.pid,
        flags,
        sport,
        dport,
        family,
        old_state,
        new_state,
        comm: record.comm,
    });
    entry.submit(0);
    Ok(())
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
