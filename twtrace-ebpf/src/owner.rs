//! Who owns each socket. Most teardown transitions run in softirq, where
//! the current task is whoever happened to be on the CPU (pid 0, a
//! ksoftirqd, or on loopback the *peer* process), so the owner is learnt
//! only where the kernel provably runs for the socket's user: connect(),
//! listen(), close()/shutdown(), send and receive.

use aya_ebpf::{EbpfContext, macros::raw_tracepoint, programs::RawTracePointContext};
use aya_log_ebpf::debug;
use twtrace_common::{FLAG_ACCEPTED, ListenerKey, SockRecord, counter, tcp_state};

use crate::{
    kernel::{bump, current_cgroup, current_comm, current_pid, netns_of},
    maps::{LISTENERS, SOCKS},
    set_state::SetState,
};

/// `tcp_sendmsg_locked(sk, msg, skb, size_goal)` runs in the sender's
/// context. The classic tracepoint's record lacks the socket, the raw one
/// has it as the first argument.
#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn tcp_sendmsg_locked(ctx: RawTracePointContext) -> i32 {
    learn(&ctx, ctx.arg::<u64>(0));
    0
}

/// `tcp_rcv_space_adjust(sk)` runs from recvmsg, in the reader's context.
#[raw_tracepoint(tracepoint = "tcp_rcv_space_adjust")]
pub fn tcp_rcv_space_adjust(ctx: RawTracePointContext) -> i32 {
    learn(&ctx, ctx.arg::<u64>(0));
    0
}

/// Transitions that only ever happen inside a syscall of the socket's
/// user: connect() (CLOSE→SYN_SENT), listen() (CLOSE→LISTEN) and
/// close()/shutdown() (the two below).
pub fn in_owner_context(old: u8, new: u8) -> bool {
    matches!(
        (old, new),
        (tcp_state::CLOSE, tcp_state::SYN_SENT | tcp_state::LISTEN)
            | (tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1)
            | (tcp_state::CLOSE_WAIT, tcp_state::LAST_ACK)
    )
}

pub fn set_to_current(record: &mut SockRecord) {
    record.pid = current_pid();
    record.comm = current_comm();
    record.cgroup = current_cgroup();
}

/// close() after shutdown(): the caller owns the socket.
pub fn closed_again(sock_id: u64) {
    if let Some(existing) = SOCKS.get_ptr_mut(sock_id) {
        // SAFETY: a pointer from a successful lookup; the socket's lock
        // serialises its events (see `set_state::update_record`).
        set_to_current(unsafe { &mut *existing });
    }
}

/// The record of a socket twtrace sees for the first time: owned by the
/// current process where the kernel runs for its user, else by the
/// process that listens where it was accepted, else unknown.
#[inline(always)]
pub fn of_new_socket(s: &SetState, owner_context: bool, now: u64) -> SockRecord {
    let mut record = SockRecord {
        since_ns: now,
        pid: 0,
        netns: netns_of(s.sock_id),
        comm: [0; 16],
        flags: if s.old_state == tcp_state::LISTEN {
            FLAG_ACCEPTED
        } else {
            0
        },
        reset_reason: 0,
        pad: [0; 3],
        cgroup: 0,
    };
    if owner_context {
        set_to_current(&mut record);
    } else if s.old_state == tcp_state::LISTEN
        && let Some(listener) = listener_owner(s, record.netns)
    {
        record.pid = listener.pid;
        record.comm = listener.comm;
        record.cgroup = listener.cgroup;
    }
    record
}

/// Remembers who listens on each address, for the sockets accepted there.
/// (Listeners older than twtrace are added from its start-up snapshot.)
pub fn track_listener(s: &SetState, record: &SockRecord) {
    if s.new_state == tcp_state::LISTEN {
        let _ = LISTENERS.insert(listener_key(s, record.netns, false), *record, 0);
    } else if s.old_state == tcp_state::LISTEN && s.new_state == tcp_state::CLOSE {
        let _ = LISTENERS.remove(listener_key(s, record.netns, false));
    }
}

fn listener_key(s: &SetState, netns: u32, any_address: bool) -> ListenerKey {
    ListenerKey {
        addr: if any_address { [0; 16] } else { s.saddr },
        port: s.sport,
        family: s.family,
        netns,
    }
}

/// The owner of the listener a new child socket was cloned from, in the
/// child's namespace: the one bound to its exact address, else the
/// wildcard one.
fn listener_owner(s: &SetState, netns: u32) -> Option<SockRecord> {
    let found = LISTENERS
        .get_ptr(listener_key(s, netns, false))
        .or_else(|| LISTENERS.get_ptr(listener_key(s, netns, true)))?;
    // SAFETY: a pointer from a successful lookup; copied out at once.
    Some(unsafe { *found })
}

/// Learns the owner of `sock_id` from a send or receive by the current
/// process.
fn learn<C: EbpfContext>(ctx: &C, sock_id: u64) {
    let pid = current_pid();
    if pid == 0 {
        return;
    }
    if let Some(existing) = SOCKS.get_ptr_mut(sock_id) {
        // SAFETY: a pointer from a successful lookup; sends and receives
        // run under the socket's lock, like its state changes.
        let existing = unsafe { &mut *existing };
        // The common case on a busy socket: nothing to learn, stay cheap.
        if existing.pid != pid {
            set_to_current(existing);
            debug!(ctx, "owner {} learnt at send/receive", pid);
        }
        return;
    }
    // A socket twtrace has not seen change state (it predates the tracer):
    // remember its owner, with its time in state unknown.
    let mut record = SockRecord {
        since_ns: 0,
        pid: 0,
        netns: netns_of(sock_id),
        comm: [0; 16],
        flags: 0,
        reset_reason: 0,
        pad: [0; 3],
        cgroup: 0,
    };
    set_to_current(&mut record);
    if SOCKS.insert(sock_id, record, 0).is_err() {
        bump(counter::SOCK_UPDATE_FAILED);
    }
    debug!(ctx, "owner {} learnt for a socket seen first in use", pid);
}
