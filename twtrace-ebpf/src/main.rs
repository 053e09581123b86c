//! twtrace's kernel side: follows TCP sockets through their state changes,
//! remembers who owns each one, follows the TIME_WAIT mini-sockets that
//! outlive them, and streams teardown transitions to userspace.
//!
//! One module per hook family, over shared maps (`maps`), helpers and
//! loss counters (`kernel`) and event constructors (`emit`):
//! * `set_state` — `inet_sock_set_state`: transitions, per-socket records;
//! * `owner` — learning each socket's owner (send, receive, listeners);
//! * `timewait` — the mini-socket's timer: birth, re-arm, cancel, expiry;
//! * `resets` and `ending` — how each connection ended: resets sent and
//!   received, errors, the orderly FIN;
//! * `fork` — following `twtrace record`'s command and its children.
#![no_std]
#![no_main]
// `atomic_xadd`: core's atomics have no fetch_add on BPF (see kernel.rs).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics, for BPF_XADD")]

mod emit;
mod ending;
mod fault;
mod fork;
mod kernel;
mod maps;
mod owner;
mod resets;
mod set_state;
mod timewait;
mod twin;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this never runs.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
