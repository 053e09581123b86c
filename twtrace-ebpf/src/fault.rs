//! Fault injection for the tests, off (and pruned by the verifier: the
//! loader's globals are read-only) unless the loader sets it.

use aya_ebpf::Global;

use crate::kernel::now_ns;

/// How long a hand-over waits before it runs: wide enough for the peer's
/// FIN or RST to reach the mini-socket on another CPU first, a race the
/// churn test saw once in ~360 000 connections.
#[unsafe(no_mangle)]
pub static SLOW_HAND_OVER_NS: Global<u64> = Global::new(0);

/// Bounded for the verifier: ~20 ns per round leaves the wait well under a
/// millisecond.
const MAX_ROUNDS: u32 = 8192;

/// The wait `SLOW_HAND_OVER_NS` asks for; 0 (always, outside the tests).
#[inline(always)]
pub fn hand_over_delay_ns() -> u64 {
    SLOW_HAND_OVER_NS.load()
}

/// Spins for `wait` ns, at most `MAX_ROUNDS` clock reads.
#[inline(always)]
pub fn spin(wait: u64) {
    let until = now_ns().saturating_add(wait);
    for _ in 0..MAX_ROUNDS {
        if now_ns() >= until {
            break;
        }
    }
}
