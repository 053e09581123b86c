//! A second program on each hot raw tracepoint, for the events the kernel
//! skips. A raw tracepoint program is skipped — counted as a recursion
//! miss — when its tracepoint fires while the same program is already
//! running on the CPU: a state change in a softirq that interrupted a
//! state change in a task, say. At 100 000 connections pinned to one CPU
//! that lost one TIME_WAIT birth in three thousand. Each hook is attached
//! twice; the kernel runs the two back to back for every hit, and the
//! twin acts only on a hit its primary was skipped for.
//!
//! The kernel skips the primary for a hit exactly when the primary is
//! running on the CPU beneath it, so the primary marks itself running and
//! the twin acts whenever it finds that mark. The mark cannot cover the
//! few instructions between the kernel's own guard and the program's
//! first store, so the primary also claims every hit it runs for, at
//! entry, in a small per-CPU ring; a twin that finds no mark acts on a
//! hit nobody claimed and takes its primary's claim back otherwise. A
//! primary running above a twin does not claim: the kernel will skip that
//! twin, and the claim would stay behind to hide a later hit of the same
//! socket and states (claims left that way lost 2–6 births in 100 000).
//!
//! The twin's own mark has the same blind spot: a primary nested in a twin
//! not yet marked claims, and the kernel skips the nested twin. Those
//! claims are all newer than the enclosing twin's own, which is why claims
//! carry a sequence number: a twin taking its claim back clears every
//! newer one, and a full ring gives up its newest. (Left, one hid a later
//! hand-over from both programs: a birth missed and a recursion miss net
//! of rescues, in about one 100 000-birth run of ten.) A hit both skipped
//! stays a counted recursion miss: the primaries' misses less the twins'
//! rescues.

use twtrace_common::{Claims, counter};

use crate::{kernel::bump, maps::CLAIMS};

/// Hook kinds: each has its own ring of claims.
pub const SET_STATE: u32 = 0;
pub const TIMER_START: u32 = 1;
pub const TIMER_CANCEL: u32 = 2;
pub const TIMER_EXPIRE: u32 = 3;

/// Which of a hook's two programs runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Twin,
}

/// The program's own slot among those of every hook kind and role (for
/// per-program scratch such as `kernel::address_of`).
pub fn program_slot(kind: u32, role: Role) -> u32 {
    kind * 2 + role as u32
}

/// This program's run for one hit, on this CPU: its mark is cleared when
/// the run ends (dropped).
pub struct Run {
    claims: *mut Claims,
    role: Role,
}

impl Drop for Run {
    fn drop(&mut self) {
        // SAFETY: the map value `enter` found; maps outlive program runs.
        let claims = unsafe { &mut *self.claims };
        match self.role {
            Role::Primary => claims.primary_running = 0,
            Role::Twin => claims.twin_running = 0,
        }
    }
}

/// Starts this program's run for hit `id` (what the tracepoint says: the
/// socket and its states, the timer), and says whether this program is the
/// one to handle it: always the primary, the twin only when its primary
/// was skipped. Keep the run until the hit is handled. No closure: a body
/// of its own would be one more call frame against Linux 6.1's 512-byte
/// stack for a whole call chain.
#[inline(always)]
pub fn enter(kind: u32, role: Role, id: u64) -> (Option<Run>, bool) {
    let Some(claims) = CLAIMS.get_ptr_mut(kind) else {
        // Cannot happen (the index is in range); the primary alone acts.
        return (None, role == Role::Primary);
    };
    // SAFETY: this CPU's slot from a successful lookup. Only a program
    // nested in this one (an interrupt) touches it meanwhile, and it is
    // the other of the pair (the kernel skips this one): it sets and
    // clears its own mark, and writes only whole claim slots, so no
    // partial write is ever read as a match.
    let slot = unsafe { &mut *claims };
    let handle = match role {
        Role::Primary => {
            slot.primary_running = 1;
            if slot.twin_running == 0 {
                claim(slot, id);
            }
            true
        }
        Role::Twin => {
            slot.twin_running = 1;
            primary_skipped(slot, kind, id)
        }
    };
    (Some(Run { claims, role }), handle)
}

fn claim(claims: &mut Claims, id: u64) {
    claims.next = claims.next.wrapping_add(1);
    // A free slot, else the newest claim's: outstanding claims nest, the
    // oldest is an enclosing primary's that its twin will take back, and
    // anything newer was left by a twin the kernel skipped.
    let mut at = 0;
    let mut newest = 0;
    for (i, (slot, seq)) in claims.ids.iter().zip(&claims.seqs).enumerate() {
        if *slot == 0 {
            at = i;
            break;
        }
        if *seq >= newest {
            newest = *seq;
            at = i;
        }
    }
    // Free first, then the number, then the id: a program nested in this
    // one sees the slot free or whole.
    if let (Some(slot), Some(seq)) = (claims.ids.get_mut(at), claims.seqs.get_mut(at)) {
        *slot = 0;
        *seq = claims.next;
        *slot = id;
    }
}

/// Whether the kernel skipped the primary for this hit: it is running
/// beneath the twin, or it never claimed the hit. A found claim is taken
/// back.
#[inline(always)]
fn primary_skipped(claims: &mut Claims, kind: u32, id: u64) -> bool {
    if claims.primary_running == 0 {
        let mut taken = 0;
        for (slot, seq) in claims.ids.iter_mut().zip(&claims.seqs) {
            if *slot == id {
                *slot = 0;
                taken = *seq;
                break;
            }
        }
        if taken != 0 {
            clear_newer(claims, taken);
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

/// Clears the claims made after `seq`: nested primaries made them while
/// this twin ran unmarked, and the kernel skipped their twins.
fn clear_newer(claims: &mut Claims, seq: u64) {
    for (slot, claimed) in claims.ids.iter_mut().zip(&claims.seqs) {
        if *slot != 0 && *claimed > seq {
            *slot = 0;
            bump(counter::STALE_CLAIMS_CLEARED);
        }
    }
}
