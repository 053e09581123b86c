//! TIME_WAIT mini-sockets. `tcp_time_wait()` hands a closing connection to
//! a small `inet_timewait_sock` whose life is its timer (`tw_timer`, run
//! by `tw_timer_handler`), so the timer tracepoints show it: the first
//! `timer_start` is its birth (the full socket's `X -> CLOSE` follows on
//! the same CPU), a later one a re-arm (a FIN_WAIT2-substate mini-socket
//! moving to TIME_WAIT), `timer_expire_entry` its normal end, and a
//! `timer_cancel` that no re-arm or expiry follows an early end.

use aya_ebpf::helpers::bpf_jiffies64;
use aya_ebpf::{
    EbpfContext,
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use twtrace_common::{
    BirthKey, FLAG_ACCEPTED, FLAG_IN_STATE_UNKNOWN, HANDOVER_RACE_NS, HANDOVER_WINDOW_NS,
    MAX_NESTING, PendingBirth, SockRecord, TwConfig, TwRecord, TwScratch, counter, kind, tcp_state,
};

use crate::{
    emit::{self, InState, TimerFacts},
    kernel::{address_of, atomic_add, btf_read, bump, in_state, kread, netns_at, now_ns, read},
    maps::{
        ATTACHED_AT, EARLY_CANCELS, FILTER, NESTING, PENDING_BIRTHS, SOCK_LAYOUT, TW_CONFIG,
        TW_SCRATCH, TWS,
    },
    set_state::{SetState, passes_filters},
    twin::{self, Role},
};

/// Who a mini-socket is: its ports and the sequence number it sends next.
/// The ports alone do not tell two connections of one 4-tuple apart (a
/// client reusing its port takes the old mini-socket over with its SYN,
/// and the next one may land at the same address).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Identity {
    sport: u16,
    dport: u16,
    snd_nxt: u32,
}

impl Identity {
    /// Unknown: no mini-socket has port 0, so it matches no record.
    const UNKNOWN: Self = Self {
        sport: 0,
        dport: 0,
        snd_nxt: 0,
    };

    /// Read through the mini-socket's embedded timer; `UNKNOWN` without
    /// BTF or when a read fails. A plain value, not an `Option`: Linux
    /// 5.10's verifier walks paths on which an absent `Option`'s fields
    /// are used, uninitialised (`!read_ok`), and refuses the program.
    fn read(cfg: &TwConfig, timer: u64) -> Self {
        if cfg.has_btf == 0 {
            return Self::UNKNOWN;
        }
        let at = |off: i16| timer.wrapping_add_signed(i64::from(off));
        match (
            kread::<u16>(at(cfg.sport_from_timer)),
            kread::<u16>(at(cfg.dport_from_timer)),
            kread::<u32>(at(cfg.snd_nxt_from_timer)),
        ) {
            (Ok(sport), Ok(dport), Ok(snd_nxt)) => Self {
                sport,
                dport: u16::from_be(dport),
                snd_nxt,
            },
            _ => Self::UNKNOWN,
        }
    }

    fn is_known(self) -> bool {
        self.sport != 0
    }

    /// As `read`, where the verifier has no trouble with the `Option`.
    fn of(cfg: &TwConfig, timer: u64) -> Option<Self> {
        let id = Self::read(cfg, timer);
        id.is_known().then_some(id)
    }

    fn birth_key(self) -> BirthKey {
        BirthKey {
            snd_nxt: self.snd_nxt,
            sport: self.sport,
            dport: self.dport,
        }
    }

    fn of_record(record: &TwRecord) -> Self {
        Self {
            sport: record.sport,
            dport: record.dport,
            snd_nxt: record.snd_nxt,
        }
    }
}

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
    on_start(ctx, &cfg, timer, &facts, read(ctx, cfg.start_now)?);
    Ok(())
}

/// The same tracepoint, raw, where BTF gives `struct timer_list`'s
/// layout: the kernel's recursion guard for classic tracepoint programs
/// skipped this one whenever it fired (from an interrupt) while another
/// classic program ran on the CPU, and every skip could turn a TIME_WAIT
/// birth into a plain close.
#[raw_tracepoint(tracepoint = "timer_start")]
pub fn timer_start_raw(ctx: RawTracePointContext) -> i32 {
    tw_hit(&ctx, twin::TIMER_START, Role::Primary, |c, cfg, t| {
        on_raw_start(c, cfg, t, c.arg(1));
    })
}

/// Its twin (`twin`): the arms the kernel skipped the program above for.
#[raw_tracepoint(tracepoint = "timer_start")]
pub fn timer_start_twin(ctx: RawTracePointContext) -> i32 {
    tw_hit(&ctx, twin::TIMER_START, Role::Twin, |c, cfg, t| {
        on_raw_start(c, cfg, t, c.arg(1));
    })
}

/// The same tracepoint, BTF-typed (`tp_btf`): `timer:timer_start` fires
/// for every timer in the system, several per connection, and telling a
/// tw timer from the others is a plain load of `timer->function` here
/// instead of a helper call. Preferred where the kernel loads it; the raw
/// pair above is the fallback.
#[btf_tracepoint(function = "timer_start")]
pub fn timer_start_btf(ctx: BtfTracePointContext) -> i32 {
    typed_tw_hit(&ctx, twin::TIMER_START, Role::Primary, |c, cfg, t| {
        on_raw_start(c, cfg, t, c.arg(1));
    })
}

#[btf_tracepoint(function = "timer_start")]
pub fn timer_start_btf_twin(ctx: BtfTracePointContext) -> i32 {
    typed_tw_hit(&ctx, twin::TIMER_START, Role::Twin, |c, cfg, t| {
        on_raw_start(c, cfg, t, c.arg(1));
    })
}

/// A raw or typed `timer_start(timer, bucket_expiry)`.
// Inlined: Linux 6.1's verifier caps the stack of a whole call chain at
// 512 bytes, and a frame of its own would push the programs past it.
#[inline(always)]
fn on_raw_start<C: EbpfContext>(ctx: &C, cfg: &TwConfig, timer: u64, bucket_arg: u64) {
    let Ok(expires) = kread::<u64>(timer + u64::from(cfg.timer_expires_off)) else {
        bump(counter::READ_FAILED);
        return;
    };
    let facts = TimerFacts {
        expires,
        bucket_expiry: if cfg.raw_start_has_bucket == 0 {
            0
        } else {
            bucket_arg
        },
        substate: read_substate(cfg, timer),
    };
    // SAFETY: a helper call with no arguments and no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    on_start(ctx, cfg, timer, &facts, jiffies);
}

/// The body of every raw timer hook and its twin: only tw timers, and a
/// twin only for the hits its primary was skipped for.
#[inline(always)]
fn tw_hit(
    ctx: &RawTracePointContext,
    kind: u32,
    role: Role,
    handle: impl FnOnce(&RawTracePointContext, &TwConfig, u64),
) -> i32 {
    let cfg = TW_CONFIG.load();
    let timer: u64 = ctx.arg(0);
    if !is_tw_timer(&cfg, timer) {
        return 0;
    }
    let (_run, mine) = twin::enter(kind, role, timer);
    if mine {
        handle(ctx, &cfg, timer);
    }
    0
}

/// `tw_hit` for the typed hooks: the callback is a plain load through the
/// typed timer; everything after works on its address (see `address_of`).
#[inline(always)]
fn typed_tw_hit(
    ctx: &BtfTracePointContext,
    kind: u32,
    role: Role,
    handle: impl FnOnce(&BtfTracePointContext, &TwConfig, u64),
) -> i32 {
    let cfg = TW_CONFIG.load();
    let typed_timer: u64 = ctx.arg(0);
    // Typed hooks load only where BTF gave the layout (has_btf).
    if cfg.handler == 0 || btf_read::<u64>(typed_timer, cfg.timer_function_off) != cfg.handler {
        return 0;
    }
    let timer = address_of(typed_timer, twin::program_slot(kind, role));
    let (_run, mine) = twin::enter(kind, role, timer);
    if mine {
        handle(ctx, &cfg, timer);
    }
    0
}

/// A tw timer was armed: a re-arm of the mini-socket cancelled just before
/// on this CPU, or a first arming (a birth, handed over next).
fn on_start<C: EbpfContext>(ctx: &C, cfg: &TwConfig, timer: u64, facts: &TimerFacts, jiffies: u64) {
    let now = now_ns();
    let Some(mut scratch) = Scratch::enter() else {
        return;
    };
    let scratch = scratch.get();
    // A pending timer is re-armed by detaching it (traced as a cancel) and
    // enqueueing it again, back to back on this CPU.
    if scratch.cancel_timer == timer {
        scratch.cancel_timer = 0;
        let was_untracked = core::mem::replace(&mut scratch.cancel_untracked, 0) != 0;
        let was_early = core::mem::replace(&mut scratch.cancel_early, 0) != 0;
        match Identity::of(cfg, timer) {
            // Without BTF only a record can say it is the same one.
            None if rearm(ctx, cfg, timer, now, facts) => return,
            None => {}
            // Re-armed, so no end (an untracked one has nothing to update,
            // unless its hand-over is still to come).
            Some(id) if id == cancelled(scratch) => {
                if was_early {
                    resume_pending(id, facts);
                }
                let _ = rearm(ctx, cfg, timer, now, facts);
                return;
            }
            // A new mini-socket where one just ended: its first arming
            // (and, if that one had no record, its end is counted).
            Some(_) if was_untracked => bump(counter::TW_UNTRACKED_END),
            Some(_) => {}
        }
    }
    if births_by_identity(cfg)
        && let Some(id) = Identity::of(cfg, timer)
    {
        let key = id.birth_key();
        let pending = PendingBirth {
            timer,
            ns: now,
            jiffies,
            expires: facts.expires,
            bucket_expiry: facts.bucket_expiry,
            substate: facts.substate,
            pad: [0; 7],
        };
        if PENDING_BIRTHS.insert(key, pending, 0).is_err() {
            bump(counter::TW_BIRTH_MISSED);
        }
        return;
    }
    // A first arming never handed over: that birth went unreported. (With
    // a family filter the other family's hand-overs are not looked at.)
    if scratch.pending_timer != 0 && FILTER.load().family == 0 {
        bump(counter::TW_BIRTH_MISSED);
    }
    scratch.pending_timer = timer;
    scratch.pending_ns = now;
    scratch.pending_jiffies = jiffies;
    scratch.pending_expires = facts.expires;
    scratch.pending_bucket_expiry = facts.bucket_expiry;
    scratch.pending_substate = facts.substate;
}

/// A mini-socket cancelled before its hand-over ran on another CPU was
/// re-armed right after (its peer's FIN moved it from FIN_WAIT2 to
/// TIME_WAIT): it lives on. The end left to the hand-over is taken back
/// unless the hand-over took it first (then the re-arm, reported next,
/// undoes it in userspace); if the hand-over is still to come, it sees the
/// mini-socket as it is now.
fn resume_pending(id: Identity, facts: &TimerFacts) {
    let key = id.birth_key();
    if EARLY_CANCELS.remove(key).is_err() {
        return;
    }
    let Some(pending) = PENDING_BIRTHS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a pointer from a successful lookup; this mini-socket's timer
    // events are serialised by its timer base's lock, and its hand-over
    // copies the entry out before anything else.
    let pending = unsafe { &mut *pending };
    pending.expires = facts.expires;
    pending.bucket_expiry = facts.bucket_expiry;
    pending.substate = facts.substate;
}

fn cancelled(scratch: &TwScratch) -> Identity {
    Identity {
        sport: scratch.cancel_sport,
        dport: scratch.cancel_dport,
        snd_nxt: scratch.cancel_snd_nxt,
    }
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
    if Identity::of(cfg, timer).is_some_and(|id| id != Identity::of_record(record)) {
        return false;
    }
    let old = record.substate;
    let spent = in_state(record.since_ns, now);
    if old != facts.substate {
        record.substate = facts.substate;
        record.since_ns = now;
        record.flags &= FLAG_ACCEPTED;
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
    let cfg = TW_CONFIG.load();
    let found = if births_by_identity(&cfg) {
        pending_by_identity(s).map(|(key, p)| (Some(key), p))
    } else {
        pending_on_this_cpu(now).map(|p| (None, p))
    };
    let Some((key, pending)) = found else {
        return false;
    };
    // Only once the record is in place and the birth out is the pending
    // entry let go: a cancel on another CPU from then on finds the record.
    // One that came before left the end to report (`settle_pending`):
    // whichever side deletes it reports it. A re-arm may still follow that
    // cancel: the record stays for it, as after any cancel, and userspace
    // takes a cancel then a re-arm for no end.
    // A mini-socket the filters leave out needs no record: the map holds
    // only what this run reports, so other workloads cannot crowd it out.
    if emit {
        let mut record = tw_record(s, sock, spent, now, &pending);
        record.snd_nxt = Identity::of(&cfg, pending.timer).map_or(0, |id| id.snd_nxt);
        if TWS.insert(pending.timer, record, 0).is_err() {
            bump(counter::TW_UPDATE_FAILED);
        }
        emit::tw_birth(ctx, s, sock, now, spent, &pending);
        if let Some(at) = key.and_then(take_pending_ended) {
            // Stamped when it was cancelled: a re-arm that followed,
            // reported on its CPU maybe before this, is later, and
            // userspace sees that.
            record.since_ns = at;
            let facts = TimerFacts {
                expires: pending.expires,
                bucket_expiry: 0,
                substate: pending.substate,
            };
            let spent = in_state(at, at);
            emit::tw_end(
                ctx,
                &record,
                pending.timer,
                at,
                kind::TW_CANCEL,
                spent,
                &facts,
            );
        }
    } else {
        if sock.pid == 0 && FILTER.load().pids_enabled != 0 {
            bump(counter::TW_BIRTH_OWNER_UNKNOWN);
        }
        if let Some(key) = key {
            let _ = take_pending_ended(key);
        }
    }
    true
}

/// Lets the pending entry `key` go, and returns when its mini-socket was
/// cancelled if that end, left to this hand-over, is its to report.
fn take_pending_ended(key: BirthKey) -> Option<u64> {
    let _ = PENDING_BIRTHS.remove(key);
    // SAFETY: a pointer from a successful lookup; read at once (the value
    // is written once, at insert).
    let at = EARLY_CANCELS.get_ptr(key).map(|p| unsafe { *p })?;
    EARLY_CANCELS.remove(key).is_ok().then_some(at)
}

/// With BTF a first arming is matched to its hand-over by the mini-socket's
/// identity, which the full socket shares, on any CPU and at any delay;
/// without it, by coming next on the same CPU.
fn births_by_identity(cfg: &TwConfig) -> bool {
    cfg.has_btf != 0 && SOCK_LAYOUT.load().snd_nxt != 0
}

/// The first arming of the mini-socket taking over from `s`, if any, and
/// its key: the entry stays until the hand-over is done with it.
fn pending_by_identity(s: &SetState) -> Option<(BirthKey, PendingBirth)> {
    let key = BirthKey {
        snd_nxt: kread(s.sock_id + u64::from(SOCK_LAYOUT.load().snd_nxt)).ok()?,
        sport: s.sport,
        dport: s.dport,
    };
    // SAFETY: a pointer from a successful lookup; copied out at once.
    let pending = PENDING_BIRTHS.get_ptr(key).map(|p| unsafe { *p })?;
    Some((key, pending))
}

/// The fallback: the first arming just before on this CPU.
fn pending_on_this_cpu(now: u64) -> Option<PendingBirth> {
    let mut scratch = Scratch::enter()?;
    let scratch = scratch.get();
    if scratch.pending_timer == 0 {
        return None;
    }
    let timer = core::mem::replace(&mut scratch.pending_timer, 0);
    if now.saturating_sub(scratch.pending_ns) > HANDOVER_WINDOW_NS {
        // Its hand-over never came in time: a birth went unreported.
        bump(counter::TW_BIRTH_MISSED);
        return None;
    }
    Some(PendingBirth {
        timer,
        ns: scratch.pending_ns,
        jiffies: scratch.pending_jiffies,
        expires: scratch.pending_expires,
        bucket_expiry: scratch.pending_bucket_expiry,
        substate: scratch.pending_substate,
        pad: [0; 7],
    })
}

// More than five arguments: BPF calls pass at most five in registers.
#[inline(always)]
fn tw_record(
    s: &SetState,
    sock: &SockRecord,
    spent: InState,
    now: u64,
    pending: &PendingBirth,
) -> TwRecord {
    let substate = pending.substate;
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
        birth_ns: pending.ns,
        birth_jiffies: pending.jiffies,
        pid: sock.pid,
        sport: s.sport,
        dport: s.dport,
        family: s.family,
        substate,
        emit: 1,
        flags: in_state(since_ns, now).1 | (sock.flags & FLAG_ACCEPTED),
        comm: sock.comm,
        snd_nxt: 0,
        netns: sock.netns,
        cgroup: sock.cgroup,
    }
}

/// Raw tracepoints for cancel and expiry: they need only the timer, and
/// the kernel guards raw tracepoint programs against recursion one by one,
/// whereas it skips a classic tracepoint program whenever any other one
/// runs on the CPU — and these fire in the timer softirq, on top of
/// everything, all the time.
#[raw_tracepoint(tracepoint = "timer_cancel")]
pub fn timer_cancel(ctx: RawTracePointContext) -> i32 {
    tw_hit(&ctx, twin::TIMER_CANCEL, Role::Primary, |c, cfg, t| {
        on_cancel(c, cfg, t)
    })
}

#[raw_tracepoint(tracepoint = "timer_cancel")]
pub fn timer_cancel_twin(ctx: RawTracePointContext) -> i32 {
    tw_hit(&ctx, twin::TIMER_CANCEL, Role::Twin, |c, cfg, t| {
        on_cancel(c, cfg, t)
    })
}

/// The same, typed (see `timer_start_btf`).
#[btf_tracepoint(function = "timer_cancel")]
pub fn timer_cancel_btf(ctx: BtfTracePointContext) -> i32 {
    typed_tw_hit(&ctx, twin::TIMER_CANCEL, Role::Primary, |c, cfg, t| {
        on_cancel(c, cfg, t)
    })
}

#[btf_tracepoint(function = "timer_cancel")]
pub fn timer_cancel_btf_twin(ctx: BtfTracePointContext) -> i32 {
    typed_tw_hit(&ctx, twin::TIMER_CANCEL, Role::Twin, |c, cfg, t| {
        on_cancel(c, cfg, t)
    })
}

#[raw_tracepoint(tracepoint = "timer_expire_entry")]
pub fn timer_expire_entry(ctx: RawTracePointContext) -> i32 {
    tw_hit(&ctx, twin::TIMER_EXPIRE, Role::Primary, |c, cfg, t| {
        on_expire(c, cfg, t)
    })
}

#[raw_tracepoint(tracepoint = "timer_expire_entry")]
pub fn timer_expire_entry_twin(ctx: RawTracePointContext) -> i32 {
    tw_hit(&ctx, twin::TIMER_EXPIRE, Role::Twin, |c, cfg, t| {
        on_expire(c, cfg, t)
    })
}

// Inlined: Linux 6.1's verifier caps the stack of a whole call chain at
// 512 bytes, and a frame of its own would push the programs past it.
#[inline(always)]
fn on_cancel<C: EbpfContext>(ctx: &C, cfg: &TwConfig, timer: u64) {
    let id = Identity::read(cfg, timer);
    let known = id.is_known();
    // Only a mini-socket with no record, or one armed moments ago, can have
    // a hand-over still running on another CPU: that one reports the end.
    let now = now_ns();
    let to_come = known && {
        let born = born_ns(timer, id);
        (born == 0 || now.saturating_sub(born) <= HANDOVER_RACE_NS) && settle_pending(id, now)
    };
    // Read only now: a hand-over that ran on its CPU since the look above
    // has its record in place and left the end to this cancel (read
    // before, it was missing, and the end was lost: 1 in ~400 overtaken
    // hand-overs).
    let (own, record) = own_record(timer, id);
    let ends_here = own && !to_come;
    // No record: its hand-over was missed, or came before twtrace.
    let untracked = known && !ends_here && !to_come && counts_untracked(cfg, timer, id);
    let Some(mut scratch) = Scratch::enter() else {
        return;
    };
    let scratch = scratch.get();
    // The previous cancel on this CPU was not followed by a re-arm or an
    // expiry: that mini-socket is gone, and so is its record — unless its
    // address already holds a new one (born on another CPU meanwhile).
    if scratch.cancel_timer != 0 && scratch.cancel_timer != timer {
        if scratch.cancel_untracked != 0 {
            bump(counter::TW_UNTRACKED_END);
        }
        forget_if_still(cfg, scratch);
    }
    scratch.cancel_timer = timer;
    scratch.cancel_untracked = u8::from(untracked);
    scratch.cancel_early = u8::from(to_come);
    scratch.cancel_sport = id.sport;
    scratch.cancel_dport = id.dport;
    scratch.cancel_snd_nxt = id.snd_nxt;
    if ends_here && record.emit != 0 {
        report_end(ctx, cfg, &record, timer, kind::TW_CANCEL);
    }
}

// Inlined: Linux 6.1's verifier caps the stack of a whole call chain at
// 512 bytes, and a frame of its own would push the programs past it.
#[inline(always)]
fn on_expire<C: EbpfContext>(ctx: &C, cfg: &TwConfig, timer: u64) {
    if let Some(mut scratch) = Scratch::enter() {
        let scratch = scratch.get();
        if scratch.cancel_timer == timer {
            scratch.cancel_timer = 0;
            scratch.cancel_untracked = 0;
        }
    }
    let id = Identity::read(cfg, timer);
    let (own, record) = own_record(timer, id);
    if own {
        if record.emit != 0 {
            report_end(ctx, cfg, &record, timer, kind::TW_EXPIRE);
        }
        let _ = TWS.remove(timer);
    } else if id.is_known() {
        count_if_birth_missed(id);
        if counts_untracked(cfg, timer, id) {
            bump(counter::TW_UNTRACKED_END);
        }
    }
}

/// The record at `timer`, copied out, and whether it is the mini-socket's
/// there now: its identity matches, or could not be read (then the record
/// is all there is to go by). A record left by an earlier mini-socket at
/// the same address is not.
#[inline(always)]
fn own_record(timer: u64, id: Identity) -> (bool, TwRecord) {
    let (has_record, record) = copy_record(timer);
    let own = has_record && (!id.is_known() || id == Identity::of_record(&record));
    (own, record)
}

/// The record of the mini-socket at `timer`, copied out, and whether it
/// has one (zeros when not). A plain value, not an `Option`, for Linux
/// 5.10's verifier: see `Identity::read`.
fn copy_record(timer: u64) -> (bool, TwRecord) {
    match TWS.get_ptr(timer) {
        // SAFETY: a pointer from a successful lookup; copied out at once.
        Some(record) => (true, unsafe { *record }),
        None => (false, NO_RECORD),
    }
}

const NO_RECORD: TwRecord = TwRecord {
    saddr: [0; 16],
    daddr: [0; 16],
    sock_id: 0,
    since_ns: 0,
    birth_ns: 0,
    birth_jiffies: 0,
    pid: 0,
    sport: 0,
    dport: 0,
    family: 0,
    substate: 0,
    emit: 0,
    flags: 0,
    comm: [0; 16],
    snd_nxt: 0,
    netns: 0,
    cgroup: 0,
};

/// When the mini-socket at `timer` with identity `id` was born; 0 if it
/// has no record. (A number, not an `Option`: the verifier lost track of
/// the `Option`'s spilled register under bare capabilities — "!read_ok".)
fn born_ns(timer: u64, id: Identity) -> u64 {
    let Some(record) = TWS.get_ptr(timer) else {
        return 0;
    };
    // SAFETY: a pointer from a successful lookup; read at once.
    let record = unsafe { &*record };
    if Identity::of_record(record) == id {
        record.birth_ns
    } else {
        0
    }
}

/// A mini-socket cancelled while its first arming still waits for its
/// hand-over. Armed moments ago, another CPU (its peer's FIN, RST or SYN)
/// reached it before that hand-over let the pending entry go: the end is
/// left in `EARLY_CANCELS`, and if the entry is gone once it is there, the
/// hand-over may have looked already, so whichever side deletes the end
/// reports it; returns whether the hand-over does (a re-arm next takes it
/// back). Armed long ago, its hand-over was missed (`forget_missed`).
fn settle_pending(id: Identity, now: u64) -> bool {
    let key = id.birth_key();
    // SAFETY: a pointer from a successful lookup; read at once.
    let Some(born_ns) = PENDING_BIRTHS.get_ptr(key).map(|p| unsafe { (*p).ns }) else {
        return false;
    };
    if now.saturating_sub(born_ns) > HANDOVER_RACE_NS {
        forget_missed(key, born_ns);
        return false;
    }
    if EARLY_CANCELS.insert(key, now, 0).is_err() {
        return false;
    }
    bump(counter::TW_HAND_OVER_RACED);
    if PENDING_BIRTHS.get_ptr(key).is_some() {
        return true;
    }
    // The hand-over let the entry go meanwhile: its record is in place.
    EARLY_CANCELS.remove(key).is_err()
}

/// A mini-socket with no record whose first arming still waits for its
/// hand-over: no program acted on the full socket's hand-over (the kernel
/// skipped both of the pair), so its birth went unreported.
fn count_if_birth_missed(id: Identity) {
    let key = id.birth_key();
    // SAFETY: a pointer from a successful lookup; read at once.
    if let Some(born_ns) = PENDING_BIRTHS.get_ptr(key).map(|p| unsafe { (*p).ns }) {
        forget_missed(key, born_ns);
    }
}

/// Counts a birth missed at its first event since, and forgets it; one born
/// before every hook was in is not twtrace's to count.
fn forget_missed(key: BirthKey, born_ns: u64) {
    let _ = PENDING_BIRTHS.remove(key);
    let attached_ns = ATTACHED_AT.get(0).copied().unwrap_or(0);
    if attached_ns != 0 && born_ns >= attached_ns {
        bump(counter::TW_BIRTH_MISSED);
    }
}

/// Removes the record of the mini-socket `scratch` last saw cancelled, if
/// the record is still that one's.
fn forget_if_still(cfg: &TwConfig, scratch: &TwScratch) {
    let gone = scratch.cancel_timer;
    // SAFETY: a pointer from a successful lookup; copied out at once.
    let Some(record) = TWS.get_ptr(gone).map(|r| unsafe { *r }) else {
        return;
    };
    if cfg.has_btf == 0 || Identity::of_record(&record) == cancelled(scratch) {
        let _ = TWS.remove(gone);
    }
}

/// Whether the end of a mini-socket without a record is this run's to
/// count: its owner is unknown, so not under a pid filter; its ports and
/// namespace are (read from the mini-socket, only under `--netns`).
fn counts_untracked(cfg: &TwConfig, timer: u64, id: Identity) -> bool {
    let filter = FILTER.load();
    if filter.pids_enabled != 0 {
        return false;
    }
    let netns = if filter.netns == 0 || cfg.net_from_timer == 0 {
        0
    } else {
        netns_at(timer.wrapping_add_signed(i64::from(cfg.net_from_timer)))
    };
    let owner = SockRecord {
        since_ns: 0,
        pid: 0,
        netns,
        comm: [0; 16],
        flags: 0,
        reset_reason: 0,
        pad: [0; 3],
        cgroup: 0,
    };
    passes_filters(&filter, &owner, id.sport, id.dport)
}

// Inlined: Linux 6.1's verifier caps the stack of a whole call chain at
// 512 bytes, and a frame of its own would push the programs past it.
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
    if cfg.handler == 0 {
        return false;
    }
    if cfg.has_btf == 0 {
        return TWS.get_ptr(timer).is_some();
    }
    kread::<u64>(timer + u64::from(cfg.timer_function_off)) == Ok(cfg.handler)
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
