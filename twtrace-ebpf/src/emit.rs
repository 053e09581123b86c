//! Streaming events: one constructor per event kind, each writing the
//! event straight into its reserved ring-buffer slot (no copy from the
//! stack), and the reader's wake-up policy.

use core::mem::MaybeUninit;

use aya_ebpf::EbpfContext;
use aya_log_ebpf::warn;
use twtrace_common::{
    FLAG_ACCEPTED, PendingBirth, SockRecord, TransitionEvent, TwRecord, connection_end, counter,
    kind, tcp_state,
};

use crate::{
    kernel::bump,
    maps::{EVENTS, WAKEUP_AT_BYTES},
    set_state::SetState,
};

const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Time in the old state, and `TransitionEvent::flags` saying if known.
pub type InState = (u64, u32);

/// What a mini-socket's timer said at the event.
pub struct TimerFacts {
    /// `timer.expires` in jiffies (0: unknown).
    pub expires: u64,
    /// When the wheel will fire it (0: not reported).
    pub bucket_expiry: u64,
    /// The mini-socket's substate now.
    pub substate: u8,
}

/// A mini-socket's timer, for the events about it (all 0 for a full
/// socket's own transitions).
struct TimerIds {
    id: u64,
    birth_ns: u64,
    birth_jiffies: u64,
    expires: u64,
    bucket_expiry: u64,
}

/// A full socket's state change.
// Inlined into each hook: no call, no copy of its arguments.
#[inline(always)]
pub fn sock_transition<C: EbpfContext>(
    ctx: &C,
    s: &SetState,
    owner: &SockRecord,
    now: u64,
    in_state: InState,
    end: (u8, u8),
) {
    let none = TimerIds {
        id: 0,
        birth_ns: 0,
        birth_jiffies: 0,
        expires: 0,
        bucket_expiry: 0,
    };
    let what = (kind::SOCK, s.new_state);
    socket_event(ctx, s, owner, now, in_state, what, &none, end);
}

/// A mini-socket took the connection over from the full socket `s`; its
/// timer was first armed as `pending` says.
// More than five arguments: BPF calls pass at most five in registers.
#[inline(always)]
pub fn tw_birth<C: EbpfContext>(
    ctx: &C,
    s: &SetState,
    owner: &SockRecord,
    now: u64,
    in_state: InState,
    pending: &PendingBirth,
) {
    let ids = TimerIds {
        id: pending.timer,
        birth_ns: pending.ns,
        birth_jiffies: pending.jiffies,
        expires: pending.expires,
        bucket_expiry: pending.bucket_expiry,
    };
    let what = (kind::TW_BIRTH, pending.substate);
    let end = (connection_end::NONE, 0);
    socket_event(ctx, s, owner, now, in_state, what, &ids, end);
}

/// An event about the full socket `s`: `what` is its kind and new state,
/// `(connection_end, end_detail)` how its connection ended, if it did.
#[expect(
    clippy::too_many_arguments,
    reason = "the shared body of the two full-socket constructors above"
)]
// More than five arguments: BPF calls pass at most five in registers.
#[inline(always)]
fn socket_event<C: EbpfContext>(
    ctx: &C,
    s: &SetState,
    owner: &SockRecord,
    now: u64,
    in_state: InState,
    (event_kind, new_state): (u8, u8),
    timer: &TimerIds,
    (connection_end, end_detail): (u8, u8),
) {
    submit(ctx, |slot| {
        slot.write(TransitionEvent {
            saddr: s.saddr,
            daddr: s.daddr,
            ts_ns: now,
            in_state_ns: in_state.0,
            sock_id: s.sock_id,
            tw_id: timer.id,
            tw_birth_ns: timer.birth_ns,
            tw_birth_jiffies: timer.birth_jiffies,
            tw_expires: timer.expires,
            tw_bucket_expiry: timer.bucket_expiry,
            pid: owner.pid,
            flags: in_state.1 | (owner.flags & FLAG_ACCEPTED),
            sport: s.sport,
            dport: s.dport,
            family: s.family,
            old_state: s.old_state,
            new_state,
            kind: event_kind,
            end_substate: 0,
            connection_end,
            end_detail,
            netns: owner.netns,
            comm: owner.comm,
            cgroup: owner.cgroup,
        });
    });
}

/// A mini-socket's timer was re-armed: its substate went `old` → `timer.substate`.
// More than five arguments: BPF calls pass at most five in registers.
#[inline(always)]
pub fn tw_rearm<C: EbpfContext>(
    ctx: &C,
    record: &TwRecord,
    timer: u64,
    now: u64,
    old: u8,
    in_state: InState,
    facts: &TimerFacts,
) {
    tw_event(
        ctx,
        record,
        timer,
        now,
        kind::TW_REARM,
        (old, facts.substate),
        in_state,
        facts,
    );
}

/// A mini-socket's timer was cancelled (`kind::TW_CANCEL`) or ran out
/// (`kind::TW_EXPIRE`).
// More than five arguments: BPF calls pass at most five in registers.
#[inline(always)]
pub fn tw_end<C: EbpfContext>(
    ctx: &C,
    record: &TwRecord,
    timer: u64,
    now: u64,
    end_kind: u8,
    in_state: InState,
    facts: &TimerFacts,
) {
    let states = (record.substate, tcp_state::CLOSE);
    tw_event(ctx, record, timer, now, end_kind, states, in_state, facts);
}

#[expect(
    clippy::too_many_arguments,
    reason = "the shared body of the two mini-socket constructors above"
)]
// More than five arguments: BPF calls pass at most five in registers.
#[inline(always)]
fn tw_event<C: EbpfContext>(
    ctx: &C,
    record: &TwRecord,
    timer: u64,
    now: u64,
    event_kind: u8,
    (old_state, new_state): (u8, u8),
    in_state: InState,
    facts: &TimerFacts,
) {
    submit(ctx, |slot| {
        slot.write(TransitionEvent {
            saddr: record.saddr,
            daddr: record.daddr,
            ts_ns: now,
            in_state_ns: in_state.0,
            sock_id: record.sock_id,
            tw_id: timer,
            tw_birth_ns: record.birth_ns,
            tw_birth_jiffies: record.birth_jiffies,
            tw_expires: facts.expires,
            tw_bucket_expiry: facts.bucket_expiry,
            pid: record.pid,
            flags: in_state.1 | (record.flags & FLAG_ACCEPTED),
            sport: record.sport,
            dport: record.dport,
            family: record.family,
            old_state,
            new_state,
            kind: event_kind,
            end_substate: facts.substate,
            connection_end: connection_end::NONE,
            end_detail: 0,
            netns: record.netns,
            comm: record.comm,
            cgroup: record.cgroup,
        });
    });
}

/// The closed full socket `sk` (of `family`) sent a reset, for `reason`.
#[inline(always)]
pub fn reset_after_close<C: EbpfContext>(ctx: &C, sk: u64, family: u16, reason: u8, now: u64) {
    submit(ctx, |slot| {
        slot.write(TransitionEvent {
            saddr: [0; 16],
            daddr: [0; 16],
            ts_ns: now,
            in_state_ns: 0,
            sock_id: sk,
            tw_id: 0,
            tw_birth_ns: 0,
            tw_birth_jiffies: 0,
            tw_expires: 0,
            tw_bucket_expiry: 0,
            pid: 0,
            flags: 0,
            sport: 0,
            dport: 0,
            family,
            old_state: tcp_state::CLOSE,
            new_state: tcp_state::CLOSE,
            kind: kind::RESET_AFTER_CLOSE,
            end_substate: 0,
            connection_end: connection_end::RESET_SENT,
            end_detail: reason,
            netns: 0,
            comm: [0; 16],
            cgroup: 0,
        });
    });
}

/// Reserves a slot, lets `fill` write the event into it, and submits it;
/// counts the event as lost when the ring is full.
// Inlined so that `fill` writes into the reserved slot itself.
#[inline(always)]
fn submit<C: EbpfContext>(ctx: &C, fill: impl FnOnce(&mut MaybeUninit<TransitionEvent>)) {
    // Waking the reader costs an irq_work (an IPI, a VM exit on a guest):
    // measured at ~2.5 µs per event, two thirds of the program's cost.
    // The reader polls every few milliseconds anyway; wake it only when
    // the ring fills past the mark, so it drains in time at any rate.
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_AT_BYTES.load() {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    match EVENTS.reserve::<TransitionEvent>(0) {
        Some(mut entry) => {
            fill(&mut entry);
            entry.submit(flags);
        }
        None => {
            bump(counter::RINGBUF_FULL);
            warn!(ctx, "ring buffer full: transition dropped");
        }
    }
}
