//! Resets, as the kernel sends and receives them. A reset that comes in,
//! or that this host sends before the socket closes (a keepalive or
//! memory abort), marks the socket's record: its close then says how the
//! connection ended (`ending`). A reset that ends no connection twtrace
//! follows is counted apart, by reason (`RESETS_APART`), in the traced
//! namespace only when `--netns` names one.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use twtrace_common::{
    AF_INET, AF_INET6, FLAG_RESET_RECEIVED, FLAG_RESET_SENT, MAX_KERNEL_RESET_REASONS,
    reset_reason, tcp_state,
};

use crate::{
    emit,
    kernel::{atomic_add, kread, netns_at, netns_of, now_ns},
    maps::{
        FILTER, RESET_HAS_REASON, RESET_IN_DOUBT, RESET_REASONS, RESETS_APART, SOCK_LAYOUT, SOCKS,
    },
};

/// `tcp_receive_reset(sk)`: runs in tcp_reset(), before the close.
#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    if let Some(record) = SOCKS.get_ptr_mut(sk) {
        // SAFETY: a pointer from a successful lookup; the socket's lock
        // serialises its events (see `set_state::update_record`).
        unsafe { (*record).flags |= FLAG_RESET_RECEIVED };
    }
    0
}

/// `tcp_send_reset(sk, skb[, reason])`: `sk` is NULL for a segment no
/// socket took (a SYN to a closed port), else the full, TIME_WAIT or
/// request socket that answered with a reset.
#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let state = if sk == 0 { 0 } else { state_of(sk) };
    let reason = reason_of(&ctx, sk, state);
    if is_live_full_socket(state)
        && let Some(record) = SOCKS.get_ptr_mut(sk)
    {
        // SAFETY: as above. A reset sent before the close: the close
        // reports it, with this reason.
        unsafe {
            (*record).flags |= FLAG_RESET_SENT;
            (*record).reset_reason = reason;
        }
        return 0;
    }
    // After its close: close() with unread data or a zero linger, whose
    // close already said so; or data after shutdown(SHUT_RD), whose close
    // the kernel made through tcp_reset() as if a reset had come in, on
    // this CPU just before: userspace sets that one right. Else it ends
    // nothing twtrace follows.
    if state == tcp_state::CLOSE {
        let family = family_of(sk);
        if take_doubt(sk) && (family == AF_INET || family == AF_INET6) {
            emit::reset_after_close(&ctx, sk, family, reason, now_ns());
        }
    } else {
        let netns = FILTER.load().netns;
        if netns == 0 || netns_of_reset(sk, ctx.arg(1)) == netns {
            count_apart(reason);
        }
    }
    0
}

/// The namespace of the socket that sent the reset, else of the device
/// the segment it answers came in on (0: unknown).
fn netns_of_reset(sk: u64, skb: u64) -> u32 {
    if sk != 0 {
        return netns_of(sk);
    }
    let l = SOCK_LAYOUT.load();
    if skb == 0 || l.skb_dev == 0 || l.dev_net == 0 {
        return 0;
    }
    match kread::<u64>(skb + u64::from(l.skb_dev)) {
        Ok(dev) if dev != 0 => netns_at(dev + u64::from(l.dev_net)),
        _ => 0,
    }
}

/// The reset's reason as twtrace's code: the kernel's, where it passes
/// one; else what the socket proves (none, a TIME_WAIT socket).
fn reason_of(ctx: &RawTracePointContext, sk: u64, state: u8) -> u8 {
    if RESET_HAS_REASON.load() != 0 {
        let kernel: u64 = ctx.arg(2);
        if kernel >= u64::from(MAX_KERNEL_RESET_REASONS) {
            return reset_reason::OTHER;
        }
        return RESET_REASONS
            .get(kernel as u32)
            .copied()
            .unwrap_or(reset_reason::UNKNOWN);
    }
    match (sk, state) {
        (0, _) => reset_reason::NO_SOCKET,
        (_, tcp_state::TIME_WAIT) => reset_reason::TIME_WAIT_SOCKET,
        _ => reset_reason::UNKNOWN,
    }
}

/// Remembers, on this CPU, that `sk` was just reported closed by a reset
/// received from FIN_WAIT1/2 (`ending::is_in_doubt`).
pub fn doubt(sk: u64) {
    if let Some(slot) = RESET_IN_DOUBT.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array, from a successful
        // lookup; a nested program that overwrites it costs one reason.
        unsafe { *slot = sk };
    }
}

/// Whether `sk` is the close in doubt on this CPU; forgets it if so.
fn take_doubt(sk: u64) -> bool {
    let Some(slot) = RESET_IN_DOUBT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: as in `doubt`.
    unsafe {
        if *slot != sk {
            return false;
        }
        *slot = 0;
    }
    true
}

fn family_of(sk: u64) -> u16 {
    let offset = SOCK_LAYOUT.load().family;
    kread::<u16>(sk + u64::from(offset)).unwrap_or(0)
}

fn state_of(sk: u64) -> u8 {
    let offset = SOCK_LAYOUT.load().state;
    if offset == 0 {
        return 0;
    }
    kread::<u8>(sk + u64::from(offset)).unwrap_or(0)
}

/// A full socket that has not closed yet: its close is still to come.
fn is_live_full_socket(state: u8) -> bool {
    !matches!(
        state,
        0 | tcp_state::CLOSE | tcp_state::TIME_WAIT | tcp_state::LISTEN | tcp_state::NEW_SYN_RECV
    )
}

fn count_apart(reason: u8) {
    if let Some(count) = RESETS_APART.get_ptr_mut(u32::from(reason)) {
        // SAFETY: a per-CPU u64 map value from a successful lookup.
        unsafe { atomic_add(count, 1) };
    }
}
