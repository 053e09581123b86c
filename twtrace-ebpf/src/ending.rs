//! How a connection ended, decided at its full socket's last transition
//! (`X -> CLOSE`) from what the socket itself says then: the error the
//! kernel set on it, whether a reset came in or went out before, and —
//! for a close that the kernel follows with a reset of its own, after the
//! transition — why close() had to reset (data never read, a zero
//! linger). Nothing here looks at the current task: on loopback the
//! peer's softirq runs in the closer's context.

use twtrace_common::{
    FLAG_RESET_RECEIVED, FLAG_RESET_SENT, SockRecord, connection_end, reset_reason, tcp_state,
};

const EPIPE: u32 = 32;
const ECONNRESET: u32 = 104;
const ETIMEDOUT: u32 = 110;
const ECONNREFUSED: u32 = 111;

/// What the closing socket says about its end.
#[derive(Clone, Copy)]
pub struct CloseFacts {
    /// `sk_err`: the error the kernel ended it with (0: none).
    pub err: u32,
    /// close() found data its owner never read.
    pub unread_data: bool,
    /// `SO_LINGER` on with a zero timeout.
    pub linger_zero: bool,
}

impl CloseFacts {
    /// For transitions that end nothing, and where BTF gives no layout.
    pub const NONE: Self = Self {
        err: 0,
        unread_data: false,
        linger_zero: false,
    };
}

/// `(connection_end, end_detail)` for a full socket's `old -> CLOSE`.
#[inline(always)]
pub fn of_close(old: u8, record: &SockRecord, facts: &CloseFacts) -> (u8, u8) {
    // A listener's close ends no connection; CLOSE -> CLOSE is no move.
    if old == tcp_state::LISTEN || old == tcp_state::CLOSE {
        return (connection_end::NONE, 0);
    }
    // tcp_reset() sets ECONNRESET (EPIPE in CLOSE_WAIT, ECONNREFUSED in
    // SYN_SENT) before the close: the fallback where the hook is missing.
    let reset_in = matches!(facts.err, ECONNRESET | EPIPE | ECONNREFUSED);
    if record.flags & FLAG_RESET_RECEIVED != 0 || reset_in {
        return (connection_end::RESET_RECEIVED, 0);
    }
    let sent_reason = if record.flags & FLAG_RESET_SENT != 0 {
        record.reset_reason
    } else {
        reset_reason::UNKNOWN
    };
    match facts.err {
        0 => {}
        // A keepalive gave up with a reset first: its reason says so.
        ETIMEDOUT => return (connection_end::TIMEOUT, sent_reason),
        err => return (connection_end::ERROR, err.min(255) as u8),
    }
    match old {
        // The FIN exchange completed; past FIN_WAIT2/CLOSING a close that
        // no mini-socket took over (tcp_max_tw_buckets full) is one too.
        tcp_state::LAST_ACK | tcp_state::FIN_WAIT2 | tcp_state::CLOSING => (connection_end::FIN, 0),
        tcp_state::SYN_SENT => (connection_end::ABANDONED, 0),
        // ESTABLISHED, SYN_RECV, FIN_WAIT1, CLOSE_WAIT straight to CLOSE
        // with no error: the kernel resets the peer (tcp_need_reset).
        _ => {
            // What close() proves first: its reset comes after this
            // transition. Else the reason of a reset sent before it.
            let reason = if facts.unread_data {
                reset_reason::UNREAD_DATA
            } else if facts.linger_zero {
                reset_reason::LINGER_ZERO
            } else {
                sent_reason
            };
            (connection_end::RESET_SENT, reason)
        }
    }
}

/// A close the kernel made through `tcp_reset()` in FIN_WAIT1/2: a reset
/// received, or data after `shutdown(SHUT_RD)`, which it answers with a
/// reset of its own right after (`resets`).
pub fn is_in_doubt(old: u8, end: u8) -> bool {
    end == connection_end::RESET_RECEIVED
        && (old == tcp_state::FIN_WAIT1 || old == tcp_state::FIN_WAIT2)
}
