//! A second program on each hot raw tracepoint, for the events the kernel
//! skips. A raw tracepoint program is skipped — counted as a recursion
//! miss — when its tracepoint fires while the same program is already
//! running on the CPU: a state change in a softirq that interrupted a
//! state change in a task, say. At 100 000 connections pinned to one CPU
//! that lost one TIME_WAIT birth in three thousand. Each hook is attached
//! twice; the kernel runs the two back to back for every hit, and the
//! twin acts only on a hit its primary did not claim: the primary claims
//! every hit it runs for, at entry, in a small per-CPU ring (so a hit that
//! lands between the primary and its twin of another hit keeps both
//! claims apart), and the twin takes its claim back. A hit both skipped
//! (an interrupt nested in an interrupt) stays a counted recursion miss:
//! the primaries' misses less the twins' rescues.

use twtrace_common::counter;

use crate::{kernel::bump, maps::CLAIMS};

/// Hook kinds: each has its own ring of claims.
pub const SET_STATE: u32 = 0;
pub const TIMER_START: u32 = 1;
pub const TIMER_CANCEL: u32 = 2;
pub const TIMER_EXPIRE: u32 = 3;

/// The primary program claims the hit `id` (what the tracepoint says:
/// the socket and its states, the timer).
#[inline(always)]
pub fn claim(kind: u32, id: u64) {
    if let Some(claims) = CLAIMS.get_ptr_mut(kind) {
        // SAFETY: this CPU's slot from a successful lookup. An interrupt
        // between the two writes can only run the twin (the primary is
        // running), which reads and clears matching ids: it cannot match
        // a slot being written for another hit.
        let claims = unsafe { &mut *claims };
        // A free slot first: hits nested in the gap between a primary and
        // its twin must not push that hit's claim out of the ring.
        if let Some(slot) = claims.ids.iter_mut().find(|slot| **slot == 0) {
            *slot = id;
            return;
        }
        // All taken (twins skipped, their claims stale): the oldest goes.
        let at = (claims.next % CLAIM_SLOTS) as usize;
        claims.next = claims.next.wrapping_add(1);
        if let Some(slot) = claims.ids.get_mut(at) {
            *slot = id;
        }
    }
}

/// Whether the twin should handle hit `id`: not when its primary claimed
/// it (the claim is taken back), yes when the primary was skipped.
#[inline(always)]
pub fn unclaimed(kind: u32, id: u64) -> bool {
    let Some(claims) = CLAIMS.get_ptr_mut(kind) else {
        return false;
    };
    // SAFETY: as in `claim`; clearing a matching slot is one store.
    let claims = unsafe { &mut *claims };
    for slot in &mut claims.ids {
        if *slot == id {
            *slot = 0;
            return false;
        }
    }
    bump(match kind {
        SET_STATE => counter::RESCUED_SET_STATE,
        TIMER_START => counter::RESCUED_TIMER_START,
        TIMER_CANCEL => counter::RESCUED_TIMER_CANCEL,
        _ => counter::RESCUED_TIMER_EXPIRE,
    });
    true
}

const CLAIM_SLOTS: u64 = twtrace_common::CLAIM_SLOTS as u64;
