//! Every map and load-time global the programs share. The loader sizes
//! the maps and fills the globals before load (`twtrace_common::names`).

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use twtrace_common::{
    BirthKey, Claims, DEFAULT_MAX_SOCKETS, DEFAULT_MAX_TW, Filter, ListenerKey, MAX_FILTER_ENTRIES,
    MAX_KERNEL_RESET_REASONS, MAX_NESTING, PendingBirth, SetStateLayout, SockLayout, SockRecord,
    TwConfig, TwRecord, TwScratch, counter, reset_reason,
};

/// Unread bytes in the ring past which a submit wakes the reader; the
/// loader sets it to a quarter of the ring.
#[unsafe(no_mangle)]
pub static WAKEUP_AT_BYTES: Global<u64> = Global::new(64 * 1024);

#[unsafe(no_mangle)]
pub static FILTER: Global<Filter> = Global::new(Filter::NONE);

#[unsafe(no_mangle)]
pub static TW_CONFIG: Global<TwConfig> = Global::new(TwConfig::DISABLED);

#[unsafe(no_mangle)]
pub static SOCK_LAYOUT: Global<SockLayout> = Global::new(SockLayout::UNKNOWN);

#[unsafe(no_mangle)]
pub static SET_STATE_LAYOUT: Global<SetStateLayout> = Global::new(SetStateLayout::DEFAULT);

/// Non-zero when `tcp_send_reset` passes the reset's reason (6.10+).
#[unsafe(no_mangle)]
pub static RESET_HAS_REASON: Global<u32> = Global::new(0);

/// The kernel's reset reasons (`enum sk_rst_reason`, by value) as
/// twtrace's codes (`reset_reason::*`); the loader fills it from the
/// tracepoint's format.
#[map]
pub static RESET_REASONS: Array<u8> = Array::with_max_entries(MAX_KERNEL_RESET_REASONS, 0);

/// Resets sent that end no connection twtrace follows — to a segment for
/// no socket (a SYN to a closed port), a TIME_WAIT or request socket, or
/// a socket twtrace holds no record of — by reason.
#[map]
pub static RESETS_APART: PerCpuArray<u64> = PerCpuArray::with_max_entries(reset_reason::COUNT, 0);

/// Per CPU, the last socket closed through `tcp_reset()` in FIN_WAIT1/2
/// (reported as a reset received): if it sends a reset next, in the same
/// call, the kernel only made it look received (`resets`).
#[map]
pub static RESET_IN_DOUBT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The loader sizes it (`--ring-kib`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// What was lost, by cause (`twtrace_common::counter`).
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Per live socket, keyed by the kernel's `struct sock *`. LRU so that
/// sockets whose CLOSE we never see (or a burst beyond capacity) cannot
/// exhaust the map; the loader sizes it. One LRU list for all CPUs (not
/// `BPF_F_NO_COMMON_LRU`): with per-CPU lists, nodes never move between
/// CPUs, and inserts from few CPUs (those taking a NIC's interrupts) could
/// use only `max_entries / ncpus` of it.
#[map]
pub static SOCKS: LruHashMap<u64, SockRecord> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// Who called listen() on each listening address: a socket accepted from
/// it belongs to that process until its own use (send, receive, close)
/// says otherwise. Without this, an accepted socket that is closed before
/// any data moves would have no owner at its first teardown transition.
#[map]
pub static LISTENERS: LruHashMap<ListenerKey, SockRecord> = LruHashMap::with_max_entries(4096, 0);

#[map]
pub static FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[map]
pub static FILTER_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

/// Live TIME_WAIT mini-sockets, keyed by their timer's address. The loader
/// sizes it from the namespaces' `tcp_max_tw_buckets`; a common LRU list,
/// as `SOCKS`.
#[map]
pub static TWS: LruHashMap<u64, TwRecord> = LruHashMap::with_max_entries(DEFAULT_MAX_TW, 0);

/// One scratch slot per nesting depth on each CPU (see `nesting`).
#[map]
pub static TW_SCRATCH: PerCpuArray<TwScratch> = PerCpuArray::with_max_entries(MAX_NESTING, 0);

/// Mini-sockets armed, awaiting their full socket's hand-over (`timewait`).
#[map]
pub static PENDING_BIRTHS: LruHashMap<BirthKey, PendingBirth> =
    LruHashMap::with_max_entries(16_384, 0);

/// Mini-sockets cancelled on one CPU while their hand-over was still to
/// run on another (`timewait::settle_pending`), and when. The entry is
/// the end to report: whichever side deletes it reports it, so exactly one
/// does.
#[map]
pub static EARLY_CANCELS: LruHashMap<BirthKey, u64> = LruHashMap::with_max_entries(1024, 0);

/// When every hook was attached (`bpf_ktime_get_ns`), written once by the
/// loader; 0 until then. A first arming older than that may have had its
/// hand-over before the state-change hooks were in.
#[map]
pub static ATTACHED_AT: Array<u64> = Array::with_max_entries(1, 0);

/// Per hook kind, the hits its primary program claimed (`twin`).
#[map]
pub static CLAIMS: PerCpuArray<Claims> = PerCpuArray::with_max_entries(4, 0);

/// How many scratch-using programs run on this CPU right now.
#[map]
pub static NESTING: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// One slot per program (`twin::program_slot`), per CPU, to turn a
/// BTF-typed pointer into the plain number it is (`address_of`): a
/// program never nests in itself, so its slot is its own for the run.
#[map]
pub static ADDRESSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(8, 0);
