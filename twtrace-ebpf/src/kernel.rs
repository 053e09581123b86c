//! Small wrappers over the helpers every hook uses: reading kernel memory
//! and tracepoint records, the clock, the current process, and counting
//! what was lost.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    programs::TracePointContext,
};

use crate::maps::{ADDRESSES, COUNTERS, SOCK_LAYOUT};

/// Reads a `T` at kernel address `at`.
pub fn kread<T>(at: u64) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel copies into a fresh value and fails
    // (instead of faulting) on a bad address; T is plain old data.
    unsafe { bpf_probe_read_kernel(at as *const T) }.map_err(i64::from)
}

/// Reads a `T` at `offset` inside the kernel object at `base`, a BTF-typed
/// pointer (a `tp_btf` argument), with a plain load: no helper call. The
/// offset must be a constant to the verifier (a read-only global), which
/// checks the access against the object's type.
#[inline(always)]
pub fn btf_read<T: Copy>(base: u64, offset: u16) -> T {
    // SAFETY: the verifier proves the load in bounds of the BTF type and
    // turns it into a fault-safe read (BPF_PROBE_MEM); T is plain data.
    unsafe { core::ptr::read_volatile((base + u64::from(offset)) as *const T) }
}

/// The address a BTF-typed pointer holds, as a plain number: the
/// verifier forbids the arithmetic twtrace's keys and hit identities do
/// on a pointer (`^`, masks), but a value read back from a map is a
/// number to it (a privileged program may store a pointer there). `slot`
/// is the program's own (see `ADDRESSES`); 0 if the map fails, which it
/// cannot (the index is in range).
#[inline(always)]
pub fn address_of(pointer: u64, slot: u32) -> u64 {
    let Some(at) = ADDRESSES.get_ptr_mut(slot) else {
        return 0;
    };
    // SAFETY: this CPU's slot of a per-CPU array, from a successful
    // lookup; only this program uses it, and it does not nest in itself.
    // Volatile, so the compiler does not hand back `pointer` itself.
    unsafe {
        core::ptr::write_volatile(at, pointer);
        core::ptr::read_volatile(at)
    }
}

/// Reads a `T` at `offset` in a classic tracepoint's record.
pub fn read<T>(ctx: &TracePointContext, offset: u16) -> Result<T, i64> {
    // SAFETY: the offset comes from the tracepoint's own format file and
    // the read goes through bpf_probe_read_kernel, which fails safely.
    unsafe { ctx.read_at::<T>(usize::from(offset)) }.map_err(i64::from)
}

/// The network namespace (its inode number) of the socket at `sk`; 0
/// when BTF did not give the layout or the read fails. Read once per
/// socket, when its record is made.
#[inline(always)]
pub fn netns_of(sk: u64) -> u32 {
    let l = SOCK_LAYOUT.load();
    if l.net == 0 {
        return 0;
    }
    netns_at(sk + u64::from(l.net))
}

/// The namespace inode behind a `possible_net_t` (a socket's or a
/// mini-socket's `skc_net`) at kernel address `net_field`; 0 if unreadable.
#[inline(always)]
pub fn netns_at(net_field: u64) -> u32 {
    let Ok(net) = kread::<u64>(net_field) else {
        return 0;
    };
    kread::<u32>(net + u64::from(SOCK_LAYOUT.load().net_inum)).unwrap_or(0)
}

/// `CLOCK_MONOTONIC` nanoseconds.
pub fn now_ns() -> u64 {
    // SAFETY: a helper call with no arguments and no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// The current process (tgid, not thread id).
pub fn current_pid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The current task's cgroup id in the v2 hierarchy (the unified one on
/// hybrid hosts): the inode of its directory there.
pub fn current_cgroup() -> u64 {
    // SAFETY: a helper call with no arguments and no preconditions.
    unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() }
}

/// The current task's name, NUL padded.
pub fn current_comm() -> [u8; 16] {
    bpf_get_current_comm().unwrap_or([0; 16])
}

/// Time spent in a state entered at `since_ns` (0: twtrace did not see it
/// entered), and the event flags that say whether it is known.
pub fn in_state(since_ns: u64, now: u64) -> (u64, u32) {
    if since_ns == 0 {
        (0, twtrace_common::FLAG_IN_STATE_UNKNOWN)
    } else {
        (now.saturating_sub(since_ns), 0)
    }
}

/// Adds `value` (wrapping: `u64::MAX` subtracts one) to `*at` in one
/// instruction (`BPF_XADD`, on every kernel twtrace supports). Programs on
/// one CPU nest — a raw tracepoint program may run from an interrupt that
/// arrives while any program runs — and a plain load-add-store
/// interrupted between its load and its store would lose the inner add.
///
/// # Safety
/// `at` must be valid and aligned for a `u64` (a map value).
pub unsafe fn atomic_add(at: *mut u64, value: u64) {
    // SAFETY: the caller's promise; core's atomics lack fetch_add on BPF
    // (no compare-and-swap), the intrinsic lowers to XADD.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(at, value) };
}

/// Counts one loss of kind `index` (`twtrace_common::counter`).
pub fn bump(index: u32) {
    if let Some(count) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU u64 map value from a successful lookup.
        unsafe { atomic_add(count, 1) };
    }
}
