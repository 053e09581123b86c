//! Types shared by the twtrace eBPF program and its userspace loader.
//!
//! Everything here crosses the kernel/user boundary as raw bytes, so every
//! type is `#[repr(C)]`, `Copy`, and laid out without implicit padding
//! (fields ordered widest first, explicit `pad` where needed). The
//! `const` assertions at the bottom keep the layouts honest.
#![no_std]

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
    pub const BOUND_INACTIVE: u8 = 13;

    /// States a connection passes through while it is being torn down.
    /// A transition *into* one of these is what twtrace streams by default.
    #[must_use]
    pub const fn is_teardown(state: u8) -> bool {
        matches!(
            state,
            FIN_WAIT1 | FIN_WAIT2 | CLOSING | TIME_WAIT | CLOSE_WAIT | LAST_ACK | CLOSE
        )
    }
}

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u16 = 6;

/// `TransitionEvent::flags`: the socket was first seen by twtrace in its old
/// state (it predates the tracer, or its record was evicted), so the time it
/// spent there is unknown and `in_state_ns` is 0.
pub const FLAG_IN_STATE_UNKNOWN: u32 = 1 << 0;
/// `TransitionEvent::flags`, `SockRecord::flags`, `TwRecord::flags`: the
/// socket was accepted from a listener, so its local port is the
/// listener's, not an ephemeral port it holds for a `connect()`.
pub const FLAG_ACCEPTED: u32 = 1 << 1;

/// `SockRecord::flags`: a reset arrived for this socket
/// (`tcp:tcp_receive_reset`); its close is the reset's doing.
pub const FLAG_RESET_RECEIVED: u32 = 1 << 2;
/// `SockRecord::flags`: the socket sent a reset before it closed (a
/// keepalive or memory abort); `SockRecord::reset_reason` says why.
pub const FLAG_RESET_SENT: u32 = 1 << 3;

/// How a connection ended, on its full socket's last transition.
pub mod connection_end {
    /// Not a connection's end (or the kernel side could not tell).
    pub const NONE: u8 = 0;
    /// Orderly: the FIN exchange completed (`LAST_ACK -> CLOSE`, or a
    /// close past `FIN_WAIT2`/`CLOSING` that no mini-socket took over).
    pub const FIN: u8 = 1;
    /// This host reset the connection.
    pub const RESET_SENT: u8 = 2;
    /// The peer reset it.
    pub const RESET_RECEIVED: u8 = 3;
    /// Retransmissions (or the user timeout) gave up: `ETIMEDOUT`.
    pub const TIMEOUT: u8 = 4;
    /// Another socket error; `end_detail` is the errno.
    pub const ERROR: u8 = 5;
    /// Closed by its owner before it was established (in `SYN_SENT`):
    /// nothing was sent to end it.
    pub const ABANDONED: u8 = 6;
}

/// Why a reset was sent: twtrace's own codes, stable across kernels. The
/// kernel's `enum sk_rst_reason` (6.10+) is translated into these at load
/// time (`RESET_REASONS`). `UNREAD_DATA` and `LINGER_ZERO` twtrace also
/// proves from the socket itself at its close, on any kernel: `close()`
/// sends those resets after the close, too late to name the close.
pub mod reset_reason {
    pub const UNKNOWN: u8 = 0;
    /// `close()` with data the owner never read (the kernel's
    /// `TCP_ABORT_ON_CLOSE`).
    pub const UNREAD_DATA: u8 = 1;
    /// `close()` with `SO_LINGER` on and a zero timeout.
    pub const LINGER_ZERO: u8 = 2;
    /// An orphan's FIN_WAIT2 given up (`TCP_ABORT_ON_LINGER`).
    pub const ABORT_ON_LINGER: u8 = 3;
    /// Too many orphans or too little memory (`TCP_ABORT_ON_MEMORY`).
    pub const ABORT_ON_MEMORY: u8 = 4;
    /// Keepalive probes went unanswered (`TCP_KEEPALIVE_TIMEOUT`).
    pub const KEEPALIVE_TIMEOUT: u8 = 5;
    /// A disconnect with data still unsent (`TCP_DISCONNECT_WITH_DATA`).
    pub const DISCONNECT_WITH_DATA: u8 = 6;
    /// A segment for a TIME_WAIT socket (`TCP_TIMEWAIT_SOCKET`).
    pub const TIME_WAIT_SOCKET: u8 = 7;
    /// A segment for no socket at all: a SYN to a closed port
    /// (`NO_SOCKET`).
    pub const NO_SOCKET: u8 = 8;
    /// The socket's state called for one (`TCP_STATE`: a disconnect).
    pub const STATE: u8 = 9;
    /// A segment the connection could not accept (bad ACK, PAWS, flags,
    /// an invalid SYN).
    pub const INVALID_SEGMENT: u8 = 10;
    /// Any other reason the kernel named (`NOT_SPECIFIED`, MPTCP's, …).
    pub const OTHER: u8 = 11;
    /// Data arrived after the socket was shut for reading
    /// (`TCP_ABORT_ON_DATA`, RFC 1122).
    pub const DATA_AFTER_CLOSE: u8 = 12;
    pub const COUNT: u32 = 13;

    /// Each code's name, as outputs and metric labels show it.
    pub const NAMES: [&str; COUNT as usize] = [
        "unknown",
        "unread_data",
        "linger_zero",
        "abort_on_linger",
        "abort_on_memory",
        "keepalive_timeout",
        "disconnect_with_data",
        "time_wait_socket",
        "no_socket",
        "state",
        "invalid_segment",
        "other",
        "data_after_close",
    ];

    /// The code for a reason the kernel names (`enum sk_rst_reason`,
    /// without its `SK_RST_REASON_` prefix, as its tracepoint prints it).
    #[must_use]
    pub fn of_kernel_name(name: &[u8]) -> u8 {
        match name {
            b"TCP_ABORT_ON_CLOSE" => UNREAD_DATA,
            b"TCP_ABORT_ON_DATA" => DATA_AFTER_CLOSE,
            b"TCP_ABORT_ON_LINGER" => ABORT_ON_LINGER,
            b"TCP_ABORT_ON_MEMORY" => ABORT_ON_MEMORY,
            b"TCP_KEEPALIVE_TIMEOUT" => KEEPALIVE_TIMEOUT,
            b"TCP_DISCONNECT_WITH_DATA" => DISCONNECT_WITH_DATA,
            b"TCP_TIMEWAIT_SOCKET" => TIME_WAIT_SOCKET,
            b"NO_SOCKET" => NO_SOCKET,
            b"TCP_STATE" => STATE,
            b"TCP_INVALID_ACK_SEQUENCE"
            | b"TCP_RFC7323_PAWS"
            | b"TCP_TOO_OLD_ACK"
            | b"TCP_ACK_UNSENT_DATA"
            | b"TCP_FLAGS"
            | b"TCP_OLD_ACK"
            | b"INVALID_SYN" => INVALID_SEGMENT,
            _ => OTHER,
        }
    }
}

/// The kernel's reason numbers (`enum sk_rst_reason`) a translation slot
/// exists for; larger ones count as `reset_reason::OTHER`.
pub const MAX_KERNEL_RESET_REASONS: u32 = 64;

/// `TransitionEvent::kind`: what the kernel saw.
pub mod kind {
    /// A full socket changed state (`sock:inet_sock_set_state`).
    pub const SOCK: u8 = 0;
    /// A TIME_WAIT mini-socket took over from the full socket. `new_state`
    /// is its substate: TIME_WAIT, or FIN_WAIT2 for an orphaned socket
    /// still waiting for the peer's FIN (then nothing changed for the user).
    pub const TW_BIRTH: u8 = 1;
    /// The mini-socket's timer was re-armed (traced); `old_state` →
    /// `new_state` is its substate before and after.
    pub const TW_REARM: u8 = 2;
    /// The mini-socket's timer was cancelled. Either it ended early, or a
    /// `TW_REARM`/`TW_EXPIRE` for the same `tw_id` follows at once (the
    /// kernel cancels before re-arming and before running a timer).
    pub const TW_CANCEL: u8 = 3;
    /// The mini-socket's timer ran out: it ended normally.
    pub const TW_EXPIRE: u8 = 4;
    /// A full socket already closed sent a reset (`sock_id`; its reason in
    /// `end_detail`, `connection_end` `RESET_SENT`; no addresses). After a
    /// close the kernel took for a reset received — `tcp_reset()` on data
    /// arriving after `shutdown(SHUT_RD)` — it is the reset this host sent.
    pub const RESET_AFTER_CLOSE: u8 = 5;
}

/// One state change of one TCP socket, as streamed through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransitionEvent {
    /// Local address: IPv4 in the first 4 bytes, or IPv6, network order.
    pub saddr: [u8; 16],
    /// Remote address, same encoding as `saddr`.
    pub daddr: [u8; 16],
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the transition happened.
    pub ts_ns: u64,
    /// Nanoseconds the socket spent in `old_state`, measured in the kernel.
    pub in_state_ns: u64,
    /// The kernel's full-socket address: identifies one socket while it
    /// lives (kept by its TIME_WAIT mini-socket too).
    pub sock_id: u64,
    /// The mini-socket's timer address (`TW_*` kinds), else 0.
    pub tw_id: u64,
    /// Kernel time and jiffies at the mini-socket's birth: together they
    /// turn the timer's jiffies into nanoseconds.
    pub tw_birth_ns: u64,
    pub tw_birth_jiffies: u64,
    /// The timer's expiry in jiffies, as of this event.
    pub tw_expires: u64,
    /// The timer wheel bucket's expiry in jiffies (births and re-arms on
    /// kernels that report it, else 0): when the timer will really fire.
    pub tw_bucket_expiry: u64,
    /// Owner process (tgid); 0 while no owner has been learnt.
    pub pid: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Local port, host order.
    pub sport: u16,
    /// Remote port, host order.
    pub dport: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub old_state: u8,
    pub new_state: u8,
    /// One of `kind::*`.
    pub kind: u8,
    /// `TW_CANCEL`/`TW_EXPIRE`: the mini-socket's substate read at its end.
    pub end_substate: u8,
    /// A full socket's last transition (`-> CLOSE`): how the connection
    /// ended (`connection_end::*`); 0 on every other event.
    pub connection_end: u8,
    /// With `connection_end`: the reset's reason (`reset_reason::*`) for
    /// `RESET_SENT`, the socket's error number for `ERROR`, else 0.
    pub end_detail: u8,
    /// The socket's network namespace (its inode, as `ip netns identify`
    /// shows it); 0 when unknown (no BTF, or a socket seen only at its end).
    pub netns: u32,
    /// Owner's command name, NUL padded; all zero while the owner is unknown.
    pub comm: [u8; 16],
    /// The owner's cgroup (v2) id, learnt with the owner; 0 while unknown.
    pub cgroup: u64,
}

/// What the kernel program remembers about each live TIME_WAIT mini-socket,
/// keyed by its timer's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TwRecord {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sock_id: u64,
    /// When the current substate began (for FIN_WAIT2: when the full socket
    /// entered it; 0 if unknown).
    pub since_ns: u64,
    pub birth_ns: u64,
    pub birth_jiffies: u64,
    pub pid: u32,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub substate: u8,
    /// Non-zero when the filters let this socket's events through.
    pub emit: u8,
    pub flags: u32,
    pub comm: [u8; 16],
    /// `tw_snd_nxt` at birth: with the ports, tells this mini-socket from a
    /// later one of the same 4-tuple at the same (reused) address.
    pub snd_nxt: u32,
    /// Network namespace inode, from the full socket's record.
    pub netns: u32,
    /// The owner's cgroup id, from the full socket's record.
    pub cgroup: u64,
}

/// Per-CPU scratch that links consecutive tracepoint hits on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TwScratch {
    /// A tw timer armed for the first time, awaiting the full socket's
    /// hand-over (`X -> CLOSE`) that follows on the same CPU.
    pub pending_timer: u64,
    pub pending_ns: u64,
    pub pending_jiffies: u64,
    pub pending_expires: u64,
    pub pending_bucket_expiry: u64,
    /// The last tw timer cancelled on this CPU and not yet explained by a
    /// re-arm or expiry.
    pub cancel_timer: u64,
    /// Who that timer's mini-socket was: a start on the same timer is a
    /// re-arm only if the mini-socket there is still the same one.
    pub cancel_snd_nxt: u32,
    pub cancel_sport: u16,
    pub cancel_dport: u16,
    pub pending_substate: u8,
    /// Non-zero when `cancel_timer`'s mini-socket had no record: if nothing
    /// re-arms it, its end is counted (`counter::TW_UNTRACKED_END`).
    pub cancel_untracked: u8,
    /// Non-zero when that cancel came before the mini-socket's hand-over
    /// and left its end to it (`EARLY_CANCELS`): a re-arm next takes it back.
    pub cancel_early: u8,
    pub pad: [u8; 5],
}

/// A mini-socket armed for the first time, by who it is: its ports and the
/// sequence number it sends next, which its full socket's hand-over
/// (`FIN_WAIT2`/`CLOSING -> CLOSE`) carries too, on whatever CPU that runs
/// (the closing task may be preempted and move between the two).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BirthKey {
    pub snd_nxt: u32,
    pub sport: u16,
    pub dport: u16,
}

/// What the first arming of a mini-socket's timer said.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingBirth {
    pub timer: u64,
    pub ns: u64,
    pub jiffies: u64,
    pub expires: u64,
    pub bucket_expiry: u64,
    pub substate: u8,
    pub pad: [u8; 7],
}

/// How soon after its first arming a mini-socket's timer may be cancelled
/// or re-armed on another CPU while its hand-over is still to come on the
/// closing one: the closing CPU runs softirqs (a batch of packets, at most
/// `netdev_budget_usecs`) between the two. Later than that, no hand-over
/// is coming: the birth was missed.
pub const HANDOVER_RACE_NS: u64 = 2_000_000;

/// Claims per hook kind and CPU (see the kernel side's `twin`).
pub const CLAIM_SLOTS: usize = 4;

/// Hits a primary program claimed, that its twin has not taken back, and
/// which of the two programs is running on the CPU now.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The latest claim's sequence number (they start at 1).
    pub next: u64,
    /// The hits claimed; 0 for a free slot.
    pub ids: [u64; CLAIM_SLOTS],
    /// When each was claimed (its sequence number): claims nest like the
    /// programs that make them, so a twin's own claim is older than any
    /// other still there.
    pub seqs: [u64; CLAIM_SLOTS],
    pub primary_running: u32,
    pub twin_running: u32,
}

/// Where the TIME_WAIT machinery sits in this kernel, found at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TwConfig {
    /// Address of `tw_timer_handler` (from kallsyms); 0 disables TIME_WAIT.
    pub handler: u64,
    /// `timer:timer_start` record offsets.
    pub start_timer: u16,
    pub start_function: u16,
    pub start_expires: u16,
    pub start_now: u16,
    /// 0 when the kernel's record has no `bucket_expiry`.
    pub start_bucket_expiry: u16,
    /// From BTF: `struct timer_list` members, and where `tw_substate` sits
    /// relative to the embedded `tw_timer`. `has_btf` 0: unknown.
    pub timer_function_off: u16,
    pub timer_expires_off: u16,
    /// `offsetof(tw_substate) - offsetof(tw_timer)`; negative in practice.
    pub substate_from_timer: i16,
    /// Where the mini-socket's local port (`skc_num`, host order) and
    /// remote port (`skc_dport`, network order) sit relative to `tw_timer`:
    /// they tell a re-armed timer from a new mini-socket that reuses the
    /// address of one just freed.
    pub sport_from_timer: i16,
    pub dport_from_timer: i16,
    /// The mini-socket's `tw_snd_nxt` (`skc_tw_snd_nxt`), relative to `tw_timer`.
    pub snd_nxt_from_timer: i16,
    /// `skc_family` of the mini-socket, relative to `tw_timer`.
    pub family_from_timer: i16,
    pub has_btf: u8,
    /// Non-zero when the raw `timer_start`'s second argument is
    /// `bucket_expiry` (kernels whose record has that field).
    pub raw_start_has_bucket: u8,
    /// The mini-socket's `skc_net` relative to `tw_timer`; 0: unknown.
    pub net_from_timer: i16,
    pub pad: [u8; 4],
}

impl TwConfig {
    pub const DISABLED: Self = Self {
        handler: 0,
        start_timer: 0,
        start_function: 0,
        start_expires: 0,
        start_now: 0,
        start_bucket_expiry: 0,
        timer_function_off: 0,
        timer_expires_off: 0,
        substate_from_timer: 0,
        sport_from_timer: 0,
        dport_from_timer: 0,
        snd_nxt_from_timer: 0,
        family_from_timer: 0,
        has_btf: 0,
        raw_start_has_bucket: 0,
        net_from_timer: 0,
        pad: [0; 4],
    };
}

/// What the kernel program remembers about each live socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRecord {
    /// When the socket entered its current state; 0 if twtrace did not see it.
    pub since_ns: u64,
    /// Owner tgid; 0 while unknown.
    pub pid: u32,
    /// Network namespace inode; 0 when unknown.
    pub netns: u32,
    pub comm: [u8; 16],
    /// `FLAG_ACCEPTED` when twtrace saw it come from a listener.
    pub flags: u32,
    /// With `FLAG_RESET_SENT`: the reset's reason (`reset_reason::*`).
    pub reset_reason: u8,
    pub pad: [u8; 3],
    /// The owner's cgroup (v2) id, learnt with the owner; 0 while unknown.
    pub cgroup: u64,
}

/// Key of the listener map: a listening socket's network namespace, local
/// address and port (every container may listen on 0.0.0.0:8080). IPv4
/// addresses fill the first 4 bytes of `addr`; a wildcard is all zeros.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub netns: u32,
}

/// Field offsets of `sock:inet_sock_set_state`, read from tracefs at load
/// time so a kernel with another layout never yields wrong numbers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetStateLayout {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    pub pad: u16,
}

impl SetStateLayout {
    /// The layout of kernels 4.16 to 6.18. Only a placeholder for the
    /// object file: the loader always overrides it with what tracefs says.
    pub const DEFAULT: Self = Self {
        skaddr: 8,
        oldstate: 16,
        newstate: 20,
        sport: 24,
        dport: 26,
        family: 28,
        protocol: 30,
        saddr: 32,
        daddr: 36,
        saddr_v6: 40,
        daddr_v6: 56,
        pad: 0,
    };
}

/// Where the fields the raw `inet_sock_set_state` program reads sit in
/// `struct sock`, from BTF at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockLayout {
    pub family: u16,
    pub protocol: u16,
    /// Local port, network order (`inet_sport` of `struct inet_sock`: at
    /// CLOSE the kernel has already cleared `skc_num`).
    pub sport: u16,
    /// Remote port, network order (`skc_dport`).
    pub dport: u16,
    pub rcv_saddr: u16,
    pub daddr: u16,
    pub v6_rcv_saddr: u16,
    pub v6_daddr: u16,
    /// `tcp_sock.snd_nxt`: matches a closing socket to its mini-socket.
    pub snd_nxt: u16,
    /// `skc_net` (the socket's `struct net *`); 0: namespaces unknown.
    pub net: u16,
    /// `net.ns.inum`: the namespace's inode number.
    pub net_inum: u16,
    /// Local port, host order (`skc_num`): read with a plain load where
    /// the socket is typed; 0 once the port is released (at CLOSE), when
    /// `sport` is read instead.
    pub num: u16,
    /// What a close tells of how the connection ended, each 0 where BTF
    /// lacks it: `sk_err`, `sk_flags` (for `SOCK_LINGER`), `sk_lingertime`,
    /// and `tcp_sock`'s `rcv_nxt` and `copied_seq` (data never read).
    pub err: u16,
    pub sk_flags: u16,
    pub lingertime: u16,
    pub rcv_nxt: u16,
    pub copied_seq: u16,
    /// `skc_state`: a reset's socket's state when it is sent.
    pub state: u16,
    /// `sk_buff.dev` and `net_device.nd_net`: the namespace of a segment
    /// answered with a reset when no socket took it; 0: unknown.
    pub skb_dev: u16,
    pub dev_net: u16,
}

impl SockLayout {
    /// A placeholder: the loader always overrides it (or does not load the
    /// raw program).
    pub const UNKNOWN: Self = Self {
        family: 0,
        protocol: 0,
        sport: 0,
        dport: 0,
        rcv_saddr: 0,
        daddr: 0,
        v6_rcv_saddr: 0,
        v6_daddr: 0,
        snd_nxt: 0,
        net: 0,
        net_inum: 0,
        num: 0,
        err: 0,
        sk_flags: 0,
        lingertime: 0,
        rcv_nxt: 0,
        copied_seq: 0,
        state: 0,
        skb_dev: 0,
        dev_net: 0,
    };
}

/// Which transitions the kernel program emits. Set once, before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filter {
    /// 0 for both, else `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Non-zero: only owners listed in the `FILTER_PIDS` map.
    pub pids_enabled: u8,
    /// Non-zero: only sockets whose local or remote port is in `FILTER_PORTS`.
    pub ports_enabled: u8,
    /// Non-zero: every transition, not only those into teardown states.
    pub all_states: u8,
    /// Non-zero: children forked by a process in `FILTER_PIDS` join it
    /// (`twtrace record`), followed in the kernel as they are born.
    pub follow_forks: u8,
    /// Offset of `child_pid` in the `sched:sched_process_fork` record.
    pub fork_child_pid: u16,
    /// Non-zero: only sockets of this network namespace (its inode).
    pub netns: u32,
}

impl Filter {
    pub const NONE: Self = Self {
        family: 0,
        pids_enabled: 0,
        ports_enabled: 0,
        all_states: 0,
        follow_forks: 0,
        fork_child_pid: 0,
        netns: 0,
    };
}

/// Indexes into the per-CPU `COUNTERS` array.
pub mod counter {
    /// Events dropped because the ring buffer was full.
    pub const RINGBUF_FULL: u32 = 0;
    /// Transitions whose tracepoint fields could not be read.
    pub const READ_FAILED: u32 = 1;
    /// Socket records that could not be stored (map update failed).
    pub const SOCK_UPDATE_FAILED: u32 = 2;
    /// A mini-socket's first arming that no hand-over from its full socket
    /// followed (on the CPU, or by the end of its life): its birth, and so
    /// its life, went unreported.
    pub const TW_BIRTH_MISSED: u32 = 3;
    /// Mini-socket records that could not be stored.
    pub const TW_UPDATE_FAILED: u32 = 4;
    /// Children of a followed process (`record`) that could not be added
    /// to the pid filter: their sockets are not traced.
    pub const FOLLOW_FAILED: u32 = 5;
    /// Program runs nested deeper than `MAX_NESTING` on one CPU, which
    /// skipped the TIME_WAIT bookkeeping they would have done.
    pub const TOO_DEEPLY_NESTED: u32 = 6;
    /// Mini-sockets that ended while twtrace held no record of them (born
    /// before it started, or their record evicted). Counted in the kernel:
    /// expiries come a timer-wheel bucket at a time, tens of thousands in
    /// one softirq, more than any ring holds.
    pub const TW_UNTRACKED_END: u32 = 11;
    /// Events a hook's twin handled because the hook itself was skipped
    /// by the kernel's recursion guard (per hook kind, `twin::*`).
    pub const RESCUED_SET_STATE: u32 = 7;
    pub const RESCUED_TIMER_START: u32 = 8;
    pub const RESCUED_TIMER_CANCEL: u32 = 9;
    pub const RESCUED_TIMER_EXPIRE: u32 = 10;
    /// Mini-sockets born under a pid filter whose owner was never learnt
    /// (its `close()` unseen): not reported, since they may be another
    /// process's, and counted here.
    pub const TW_BIRTH_OWNER_UNKNOWN: u32 = 12;
    /// Not a loss: mini-sockets that moved on another CPU (re-armed by the
    /// peer's FIN, or cancelled) after their first arming and before their
    /// full socket's hand-over ran; reported as born as they were by then.
    pub const TW_HAND_OVER_RACED: u32 = 13;
    /// Claims a twin found left behind by primaries that ran nested in it
    /// before it marked itself running, and cleared (not a loss: each would
    /// have hidden a later hit of the same socket and states).
    pub const STALE_CLAIMS_CLEARED: u32 = 14;
    pub const COUNT: u32 = 15;
}

/// Map and program names both sides agree on.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const SOCKS: &str = "SOCKS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const FILTER_PIDS: &str = "FILTER_PIDS";
    pub const FILTER_PORTS: &str = "FILTER_PORTS";
    pub const GLOBAL_FILTER: &str = "FILTER";
    pub const GLOBAL_SET_STATE_LAYOUT: &str = "SET_STATE_LAYOUT";
    pub const GLOBAL_TW_CONFIG: &str = "TW_CONFIG";
    pub const TWS: &str = "TWS";
    pub const ATTACHED_AT: &str = "ATTACHED_AT";
    pub const TW_SCRATCH: &str = "TW_SCRATCH";
    pub const PROG_TIMER_START: &str = "timer_start";
    pub const PROG_TIMER_START_RAW: &str = "timer_start_raw";
    pub const PROG_TIMER_EXPIRE: &str = "timer_expire_entry";
    pub const PROG_TIMER_CANCEL: &str = "timer_cancel";
    pub const PROG_FORK: &str = "sched_process_fork";
    pub const PROG_SET_STATE: &str = "inet_sock_set_state";
    pub const PROG_SET_STATE_RAW: &str = "inet_sock_set_state_raw";
    pub const GLOBAL_SOCK_LAYOUT: &str = "SOCK_LAYOUT";
    pub const GLOBAL_RESET_HAS_REASON: &str = "RESET_HAS_REASON";
    pub const RESET_REASONS: &str = "RESET_REASONS";
    pub const RESETS_APART: &str = "RESETS_APART";
    pub const PROG_SEND_RESET: &str = "tcp_send_reset";
    pub const PROG_RECEIVE_RESET: &str = "tcp_receive_reset";
    pub const GLOBAL_WAKEUP_AT_BYTES: &str = "WAKEUP_AT_BYTES";
    pub const GLOBAL_SLOW_HAND_OVER_NS: &str = "SLOW_HAND_OVER_NS";
    pub const PROG_SET_STATE_TWIN: &str = "inet_sock_set_state_twin";
    pub const PROG_SET_STATE_BTF: &str = "inet_sock_set_state_btf";
    pub const PROG_SET_STATE_BTF_TWIN: &str = "inet_sock_set_state_btf_twin";
    pub const PROG_TIMER_START_TWIN: &str = "timer_start_twin";
    pub const PROG_TIMER_CANCEL_TWIN: &str = "timer_cancel_twin";
    pub const PROG_TIMER_START_BTF: &str = "timer_start_btf";
    pub const PROG_TIMER_START_BTF_TWIN: &str = "timer_start_btf_twin";
    pub const PROG_TIMER_CANCEL_BTF: &str = "timer_cancel_btf";
    pub const PROG_TIMER_CANCEL_BTF_TWIN: &str = "timer_cancel_btf_twin";
    pub const PROG_TIMER_EXPIRE_TWIN: &str = "timer_expire_entry_twin";
    pub const PROG_SENDMSG: &str = "tcp_sendmsg_locked";
    pub const PROG_RCV_SPACE: &str = "tcp_rcv_space_adjust";
}

/// Default capacity of the per-socket record map (LRU; oldest evicted).
pub const DEFAULT_MAX_SOCKETS: u32 = 131_072;
/// The most TIME_WAIT mini-sockets followed at once unless told otherwise
/// (`--max-time-wait`): the namespaces' `tcp_max_tw_buckets`, summed, are
/// capped at this.
pub const DEFAULT_MAX_TW: u32 = 262_144;
/// Nodes an LRU map's per-CPU free lists may hold back (the kernel's
/// `LOCAL_FREE_TARGET`, twice over for its pending lists): maps get this
/// much more per possible CPU, so they hold what they promise.
pub const LRU_SLACK_PER_CPU: u32 = 256;
/// How soon after a tw timer's first arming the full socket's hand-over
/// must follow on the same CPU (it is the next thing `tcp_time_wait` does).
pub const HANDOVER_WINDOW_NS: u64 = 10_000_000;
/// Per-CPU scratch slots: one for each context a program can run in at
/// once on a CPU (task, softirq, hardirq, NMI), so a program that
/// interrupts another never shares its scratch state.
pub const MAX_NESTING: u32 = 4;
/// `TCP_TIMEWAIT_LEN`: how long a TIME_WAIT mini-socket lives, compiled
/// into the kernel (not a sysctl).
pub const TIME_WAIT_LEN_SECS: u64 = 60;
/// Capacity of the pid and port filter maps.
pub const MAX_FILTER_ENTRIES: u32 = 64;

// Layouts are part of the kernel/user contract: catch accidental padding.
const _: () = assert!(core::mem::size_of::<TransitionEvent>() == 144);
const _: () = assert!(core::mem::size_of::<TwRecord>() == 112);
const _: () = assert!(core::mem::size_of::<TwScratch>() == 64);
const _: () = assert!(core::mem::size_of::<TwConfig>() == 40);
const _: () = assert!(core::mem::size_of::<SockRecord>() == 48);
const _: () = assert!(core::mem::size_of::<ListenerKey>() == 24);
const _: () = assert!(core::mem::size_of::<SockLayout>() == 40);
const _: () = assert!(core::mem::size_of::<BirthKey>() == 8);
const _: () = assert!(core::mem::size_of::<PendingBirth>() == 48);
const _: () = assert!(core::mem::size_of::<SetStateLayout>() == 24);
const _: () = assert!(core::mem::size_of::<Filter>() == 12);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], Copy, has no padding (asserted above)
    // and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::TransitionEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SetStateLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Filter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TwRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TwConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TwScratch {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenerKey {}
}
