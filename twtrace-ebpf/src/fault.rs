//! Fault injection for the tests, off (and pruned by the verifier: the
//! loader's globals are read-only) unless the loader sets it.

use aya_ebpf::Global;

use crate::kernel::now_ns;

/// How long a hand-over waits before it runs: wide
/// enough for the peer's FIN or SYN to reach the mini-socket on another
/// CPU first, a race the churn test saw once in ~360 000 connections.
#[unsafe(no_mangle)]
pub static SLOW_HAND_OVER_NS: Global<u64> = Global::new(0);

/// Bounded for the verifier: ~20 ns per round leaves the wait well under a
/// millisecond.
const MAX_ROUNDS: u32 = 8192;

#[inline(always)]
pub fn slow_hand_over() {
    let wait = SLOW_HAND_OVER_NS.load();
    if wait == 0 {
        return;
    }
    let until = now_ns().saturating_add(wait);
    for _ in 0..MAX_ROUNDS {
        if now_ns() >= until {
            break;
        }
    }
}
