//! TIME_WAIT mini-sockets. `tcp_time_wait()` hands a closing connection to
//! a small `inet_timewait_sock` whose life is its timer (`tw_timer`, run
//! by `tw_timer_handler`), so the timer tracepoints show it: the first
//! `timer_start` is its birth (the full socket's `X -> CLOSE` follows on
//! the same CPU), a later one a re-arm (a FIN_WAIT2-substate mini-socket
//! moving to TIME_WAIT), `timer_expire_entry` its normal end, and a
//! `timer_cancel` that no re-arm or expiry follows an early end.

use aya_ebpf::{
    EbpfContext,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use twtrace_common::{
    FLAG_IN_STATE_UNKNOWN, HANDOVER_WINDOW_NS, MAX_NESTING, SockRecord, TwConfig, TwRecord,
    TwScratch, counter, kind, tcp_state,
};

use crate::{
    emit::{self, InState, TimerFacts},
    kernel::{atomic_add, bump, in_state, kread, now_ns, read},
    maps::{NESTING, TW_CONFIG, TW_SCRATCH, TWS},
    set_state::SetState,
};

/// This CPU's scratch slot for the current nesting depth. Programs on one
/// CPU nest: a raw tracepoint program may run from an interrupt that
/// arrives while any program runs, and a classic one from an interrupt
/// while a raw one runs. Each depth has its own slot, so an interrupting
/// program never sees, or overwrites, state the one it interrupted is
/// in the middle of using. Dropping the guard leaves the depth.
struct Scratch {
    depth: *mut u64,
    slot: *mut TwScratch,
}

impl Scratch {
    fn enter() -> Option<Self> {
        let depth = NESTING.get_ptr_mut(0)?;
        // SAFETY: a per-CPU u64 map value from a successful lookup.
        unsafe { atomic_add(depth, 1) };
        // An atomic add, then a read: an interrupting program that enters
        // and leaves between the two restores the count, so this run's
        // depth is exact wherever the interrupt lands.
        // SAFETY: as above; a plain aligned read of the value.
        let mine = unsafe { core::ptr::read_volatile(depth) }.wrapping_sub(1);
        // From here on, dropping the guard leaves the depth again.
        let mut guard = Self {
            depth,
            slot: core::ptr::null_mut(),
        };
        if mine >= u64::from(MAX_NESTING) {
            bump(counter::TOO_DEEPLY_NESTED);
            return None;
        }
        guard.slot = TW_SCRATCH.get_ptr_mut(mine as u32)?;
        Some(guard)
    }

    fn get(&mut self) -> &mut TwScratch {
        // SAFETY: the slot of this run's own depth on this CPU (see
        // above): nothing else touches it until this guard drops.
        unsafe { &mut *self.slot }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: the map value `enter` found; maps outlive program runs.
        unsafe { atomic_add(self.depth, u64::MAX) };
    }
}

/// `timer:timer_start` fires for every timer in the system; only those
/// whose callback is `tw_timer_handler` belong to mini-sockets.
#[tracepoint]
pub fn timer_start(ctx: TracePointContext) -> u32 {
    if try_timer_start(&ctx).is_err() {
        bump(counter::READ_FAILED);
    }
    0
}

fn try_timer_start(ctx: &TracePointContext) -> Result<(), i64> {
    let cfg = TW_CONFIG.load();
    if cfg.handler == 0 || read::<u64>(ctx, cfg.start_function)? != cfg.handler {
        return Ok(());
    }
    let timer: u64 = read(ctx, cfg.start_timer)?;
    let facts = TimerFacts {
        expires: read(ctx, cfg.start_expires)?,
        bucket_expiry: if cfg.start_bucket_expiry == 0 {
            0
        } else {
            read(ctx, cfg.start_bucket_expiry)?
        },
        substate: read_substate(&cfg, timer),
    };
    let jiffies: u64 = read(ctx, cfg.start_now)?;
    let now = now_ns();
    let Some(mut scratch) = Scratch::enter() else {
        return Ok(());
    };
    let scratch = scratch.get();
    // A pending timer is re-armed by detaching it (traced as a cancel) and
    // enqueueing it again, back to back on this CPU.
    if scratch.cancel_timer == timer {
        scratch.cancel_timer = 0;
        if rearm(ctx, &cfg, timer, now, &facts) {
            return Ok(());
        }
        // No record of this mini-socket: the cancel was an earlier one's
        // (a SYN taking it over, no start followed) whose memory the slab
        // has just handed to a new mini-socket. This is its first arming.
    }
    // First arming: tcp_time_wait() hands the connection over next.
    scratch.pending_timer = timer;
    scratch.pending_ns = now;
    scratch.pending_jiffies = jiffies;
    scratch.pending_expires = facts.expires;
    scratch.pending_bucket_expiry = facts.bucket_expiry;
    scratch.pending_substate = facts.substate;
    Ok(())
}

/// A re-arm of a known mini-socket: its substate may have changed.
/// Returns false when twtrace holds no record of the mini-socket.
// Inlined into timer_start, its only caller.
#[inline(always)]
fn rearm<C: EbpfContext>(
    ctx: &C,
    cfg: &TwConfig,
    timer: u64,
    now: u64,
    facts: &TimerFacts,
) -> bool {
    let Some(record) = TWS.get_ptr_mut(timer) else {
        return false;
    };
    // SAFETY: a pointer from a successful lookup; a mini-socket's timer
    // events are serialised by the timer base's lock.
    let record = unsafe { &mut *record };
    if !same_mini_socket(cfg, timer, record) {
        return false;
    }
    let old = record.substate;
    let spent = in_state(record.since_ns, now);
    if old != facts.substate {
        record.substate = facts.substate;
        record.since_ns = now;
        record.flags = 0;
    }
    if record.emit != 0 {
        emit::tw_rearm(ctx, record, timer, now, old, spent, facts);
    }
    true
}

/// If `tcp_time_wait()` just armed a mini-socket's timer on this CPU, the
/// full socket's `X -> CLOSE` is its hand-over: record the mini-socket
/// and report its birth. Returns whether that was the case.
// More than five arguments: BPF calls pass at most five in registers.
#[inline(always)]
pub fn take_over<C: EbpfContext>(
    ctx: &C,
    s: &SetState,
    sock: &SockRecord,
    spent: InState,
    now: u64,
    emit: bool,
) -> bool {
    let Some(mut scratch) = Scratch::enter() else {
        return false;
    };
    let pending = scratch.get();
    let timer = pending.pending_timer;
    if timer == 0 || now.saturating_sub(pending.pending_ns) > HANDOVER_WINDOW_NS {
        return false;
    }
    pending.pending_timer = 0;
    let record = tw_record(s, sock, spent, now, pending, emit);
    if TWS.insert(timer, record, 0).is_err() {
        bump(counter::TW_UPDATE_FAILED);
    }
    if emit {
        emit::tw_birth(ctx, s, sock, now, spent, timer, pending);
    }
    true
}

// More than five arguments: BPF calls pass at most five in registers.
#[inline(always)]
fn tw_record(
    s: &SetState,
    sock: &SockRecord,
    spent: InState,
    now: u64,
    pending: &TwScratch,
    emit: bool,
) -> TwRecord {
    let substate = pending.pending_substate;
    // An orphaned FIN_WAIT2 goes on in the mini-socket: its time in
    // FIN_WAIT2 keeps counting from the full socket's FIN_WAIT2.
    let since_ns = if substate == tcp_state::TIME_WAIT {
        now
    } else if spent.1 & FLAG_IN_STATE_UNKNOWN == 0 {
        now - spent.0
    } else {
        0
    };
    TwRecord {
        saddr: s.saddr,
        daddr: s.daddr,
        sock_id: s.sock_id,
        since_ns,
        birth_ns: pending.pending_ns,
        birth_jiffies: pending.pending_jiffies,
        pid: sock.pid,
        sport: s.sport,
        dport: s.dport,
        family: s.family,
        substate,
        emit: u8::from(emit),
        flags: in_state(since_ns, now).1,
        comm: sock.comm,
    }
}

/// Raw tracepoints for cancel and expiry: they need only the timer, and
/// the kernel guards raw tracepoint programs against recursion one by one,
/// whereas it skips a classic tracepoint program whenever any other one
/// runs on the CPU — and these fire in the timer softirq, on top of
/// everything, all the time.
#[raw_tracepoint(tracepoint = "timer_cancel")]
pub fn timer_cancel(ctx: RawTracePointContext) -> i32 {
    on_cancel(&ctx, ctx.arg::<u64>(0));
    0
}

#[raw_tracepoint(tracepoint = "timer_expire_entry")]
pub fn timer_expire_entry(ctx: RawTracePointContext) -> i32 {
    on_expire(&ctx, ctx.arg::<u64>(0));
    0
}

fn on_cancel<C: EbpfContext>(ctx: &C, timer: u64) {
    let cfg = TW_CONFIG.load();
    if cfg.handler == 0 || !is_tw_timer(&cfg, timer) {
        return;
    }
    // SAFETY: a pointer from a successful lookup; copied out at once.
    let Some(record) = TWS.get_ptr(timer).map(|r| unsafe { *r }) else {
        return;
    };
    if !same_mini_socket(&cfg, timer, &record) {
        return;
    }
    let Some(mut scratch) = Scratch::enter() else {
        return;
    };
    let scratch = scratch.get();
    // The previous cancel on this CPU was not followed by a re-arm or an
    // expiry: that mini-socket is gone, and so is its record.
    if scratch.cancel_timer != 0 && scratch.cancel_timer != timer {
        let _ = TWS.remove(scratch.cancel_timer);
    }
    scratch.cancel_timer = timer;
    if record.emit != 0 {
        report_end(ctx, &cfg, &record, timer, kind::TW_CANCEL);
    }
}

fn on_expire<C: EbpfContext>(ctx: &C, timer: u64) {
    let cfg = TW_CONFIG.load();
    if cfg.handler == 0 || !is_tw_timer(&cfg, timer) {
        return;
    }
    if let Some(mut scratch) = Scratch::enter() {
        let scratch = scratch.get();
        if scratch.cancel_timer == timer {
            scratch.cancel_timer = 0;
        }
    }
    // SAFETY: a pointer from a successful lookup; copied out at once.
    let record = TWS.get_ptr(timer).map(|r| unsafe { *r });
    let Some(record) = record.filter(|r| same_mini_socket(&cfg, timer, r)) else {
        bump(counter::TW_UNTRACKED_END);
        return;
    };
    if record.emit != 0 {
        report_end(ctx, &cfg, &record, timer, kind::TW_EXPIRE);
    }
    let _ = TWS.remove(timer);
}

// Inlined: the event's facts stay in registers.
#[inline(always)]
fn report_end<C: EbpfContext>(ctx: &C, cfg: &TwConfig, record: &TwRecord, timer: u64, end: u8) {
    let now = now_ns();
    // The timer's expiry as of now: a re-arm the kernel did not trace
    // (same wheel bucket) still updated it.
    let facts = TimerFacts {
        expires: if cfg.has_btf == 0 {
            0
        } else {
            kread(timer + u64::from(cfg.timer_expires_off)).unwrap_or(0)
        },
        bucket_expiry: 0,
        substate: read_substate(cfg, timer),
    };
    emit::tw_end(
        ctx,
        record,
        timer,
        now,
        end,
        in_state(record.since_ns, now),
        &facts,
    );
}

/// Whether `timer` runs `tw_timer_handler`: read from the timer itself
/// (BTF), else known only by being in the map.
fn is_tw_timer(cfg: &TwConfig, timer: u64) -> bool {
    if cfg.has_btf == 0 {
        return TWS.get_ptr(timer).is_some();
    }
    kread::<u64>(timer + u64::from(cfg.timer_function_off)) == Ok(cfg.handler)
}

/// Whether the record for `timer` describes the mini-socket that owns that
/// timer now: a freed mini-socket's address is soon reused by a new one,
/// and a record left by an early end must not be taken for it.
fn same_mini_socket(cfg: &TwConfig, timer: u64, record: &TwRecord) -> bool {
    if cfg.has_btf == 0 {
        return true;
    }
    let at = |off: i16| timer.wrapping_add_signed(i64::from(off));
    let sport = kread::<u16>(at(cfg.sport_from_timer));
    let dport = kread::<u16>(at(cfg.dport_from_timer));
    sport == Ok(record.sport) && dport.map(u16::from_be) == Ok(record.dport)
}

/// The mini-socket's `tw_substate`, read through its embedded timer. Without
/// BTF twtrace cannot tell, and treats every mini-socket as TIME_WAIT.
fn read_substate(cfg: &TwConfig, timer: u64) -> u8 {
    if cfg.has_btf == 0 {
        return tcp_state::TIME_WAIT;
    }
    match kread::<u8>(timer.wrapping_add_signed(i64::from(cfg.substate_from_timer))) {
        Ok(tcp_state::FIN_WAIT2) => tcp_state::FIN_WAIT2,
        _ => tcp_state::TIME_WAIT,
    }
}
