//! Loading the embedded eBPF object, attaching it, and reading what it
//! streams and what it lost. `probe` describes the running kernel once,
//! `hooks` holds the table of what attaches where; this module loads the
//! object with those facts and owns the result.

use std::{io, os::fd::AsFd};

use anyhow::{Context, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
};
use tokio::io::{Interest, unix::AsyncFd};
use twtrace_common::{
    AF_INET, AF_INET6, DEFAULT_MAX_SOCKETS, DEFAULT_MAX_TW, Filter, LRU_SLACK_PER_CPU, ListenerKey,
    MAX_FILTER_ENTRIES, SockLayout, SockRecord, counter, names, reset_reason,
};

use crate::{sys, tracefs};

pub mod hooks;
pub mod probe;

use probe::KernelFacts;

/// The kernel program, built by build.rs and embedded so the binary is
/// self-contained.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/twtrace.bpf.o"));

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// What to trace; everything here is applied in the kernel.
#[derive(Clone, Debug)]
pub struct TracerOptions {
    /// Only sockets owned by these processes (tgids); empty for all.
    pub pids: Vec<u32>,
    /// Only sockets with one of these as local or remote port; empty for all.
    pub ports: Vec<u16>,
    pub family: Option<Family>,
    /// Stream every transition, not only those into teardown states.
    pub all_states: bool,
    /// Ring buffer size in bytes: a power of two, at least one page;
    /// `None` sizes it from the TIME_WAIT capacity (`ring_bytes_for`).
    pub ring_bytes: Option<u32>,
    /// Capacity of the per-socket record map.
    pub max_sockets: u32,
    /// Most TIME_WAIT mini-sockets followed at once (a cap on the sum of
    /// the namespaces' `tcp_max_tw_buckets`).
    pub max_time_wait: u32,
    /// Carry the kernel program's aya-log diagnostics to the `log` crate.
    pub kernel_log: Option<log::LevelFilter>,
    /// Add the children that processes in `pids` fork to `pids`, in the
    /// kernel (`record`); `pids` may then start empty and be filled with
    /// `Tracer::follow`.
    pub follow_forks: bool,
    /// Only sockets of this network namespace (its inode).
    pub netns: Option<u32>,
    /// Fault injection: each hand-over to a mini-socket waits this long
    /// first, so the peer's packets reach the mini-socket before it.
    #[cfg(feature = "fault-injection")]
    pub slow_hand_over_ns: u64,
    /// The raw tracepoint pairs even where the kernel takes the typed
    /// (`tp_btf`) ones, as on kernels that refuse them (the tests'
    /// `TWTRACE_FAULT=raw-tracepoints` keeps that path covered).
    pub raw_tracepoints: bool,
}

impl Default for TracerOptions {
    fn default() -> Self {
        Self {
            pids: Vec::new(),
            ports: Vec::new(),
            family: None,
            all_states: false,
            ring_bytes: None,
            max_sockets: DEFAULT_MAX_SOCKETS,
            max_time_wait: DEFAULT_MAX_TW,
            kernel_log: None,
            follow_forks: false,
            netns: None,
            #[cfg(feature = "fault-injection")]
            slow_hand_over_ns: 0,
            raw_tracepoints: fault_raw_tracepoints(),
        }
    }
}

/// Fault injection (test builds only): `TWTRACE_FAULT=raw-tracepoints`.
fn fault_raw_tracepoints() -> bool {
    cfg!(feature = "fault-injection")
        && std::env::var_os("TWTRACE_FAULT").is_some_and(|f| f == "raw-tracepoints")
}

/// How often the reader drains the ring when the kernel did not wake it.
const POLL_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Processes `record` can follow: the command and everything it forks.
const FOLLOWED_PIDS: u32 = 65_536;

/// A listening socket and the process holding it, as found at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownListener {
    pub netns: u32,
    pub addr: std::net::SocketAddr,
    pub pid: u32,
    pub comm: [u8; 16],
    /// The holder's v2 cgroup id; 0 when unknown.
    pub cgroup: u64,
}

impl KnownListener {
    /// The kernel side's key and record for it.
    fn as_kernel_entry(&self) -> (ListenerKey, SockRecord) {
        let (addr, family) = crate::event::to_kernel_addr(self.addr.ip());
        let key = ListenerKey {
            addr,
            port: self.addr.port(),
            family,
            netns: self.netns,
        };
        let record = SockRecord {
            since_ns: 0,
            pid: self.pid,
            netns: self.netns,
            comm: self.comm,
            flags: 0,
            reset_reason: 0,
            pad: [0; 3],
            cgroup: self.cgroup,
        };
        (key, record)
    }
}

/// Everything that was lost on the way, so none of it is silent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LossReport {
    /// Transitions dropped in the kernel because the ring buffer was full.
    pub ringbuf_full: u64,
    /// Transitions whose tracepoint record could not be read.
    pub read_failed: u64,
    /// Socket records the kernel could not store (owner/time then unknown).
    pub sock_update_failed: u64,
    /// Program runs the kernel skipped to avoid nesting, over all programs.
    pub recursion_misses: u64,
    /// Records the userspace decoder rejected (counted by the session,
    /// which decodes).
    pub decode_errors: u64,
    /// Mini-sockets whose first arming no hand-over followed: births (and
    /// so whole lives) not reported.
    pub tw_births_missed: u64,
    /// Mini-sockets that ended while twtrace held no record of them.
    pub tw_untracked_ends: u64,
    /// Mini-sockets born under a pid filter whose owner was never learnt:
    /// not reported (they may be another process's).
    pub tw_births_owner_unknown: u64,
    /// Mini-socket records the kernel could not store.
    pub tw_update_failed: u64,
    /// Children of `record`'s command the kernel could not follow.
    pub follow_failed: u64,
    /// Program runs nested too deeply on a CPU to keep TIME_WAIT state.
    pub too_deeply_nested: u64,
}

impl LossReport {
    /// Transitions that never reached the output.
    #[must_use]
    pub fn events_lost(&self) -> u64 {
        self.ringbuf_full + self.read_failed + self.recursion_misses + self.decode_errors
    }
}

/// One of the kernel's counters, summed over CPUs.
fn counter_sum(counters: &PerCpuArray<&MapData, u64>, index: u32) -> anyhow::Result<u64> {
    Ok(counters.get(&index, 0)?.iter().copied().sum())
}

/// Tells the kernel side when every hook was in: a mini-socket armed
/// before then may have handed over unseen, and is not counted as a birth
/// twtrace missed.
fn mark_attached(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut at: Array<&mut MapData, u64> = Array::try_from(
        ebpf.map_mut(names::ATTACHED_AT)
            .context("the eBPF object lacks its ATTACHED_AT map")?,
    )?;
    at.set(0, sys::monotonic_ns(), 0)
        .context("marking the hooks attached")
}

/// A loaded and attached twtrace. Dropping it detaches and unloads
/// everything (the kernel frees programs and maps with their last fd).
pub struct Tracer {
    ebpf: Ebpf,
    /// TIME_WAIT mini-sockets alive when tracing began (`/proc/net/sockstat`):
    /// their ends are expected to be untracked.
    tw_alive_at_start: u64,
    tw_enabled: bool,
    events: AsyncFd<RingBuf<MapData>>,
    programs: Vec<&'static str>,
    warnings: Vec<String>,
    namespaces_known: bool,
    _logger_task: Option<tokio::task::JoinHandle<()>>,
}

impl Tracer {
    /// Checks the environment, loads the program and attaches it. Must run
    /// inside a tokio runtime (the ring buffer is polled through it).
    pub fn start(options: &TracerOptions) -> anyhow::Result<Self> {
        validate(options)?;
        tokio::runtime::Handle::try_current()
            .context("Tracer::start must be called inside a tokio runtime")?;
        sys::check_privileges()?;
        let facts = KernelFacts::probe(&tracefs::root()?, options.max_time_wait)?;
        let mut ebpf = load(options, &facts)?;
        fill_reset_reasons(&mut ebpf, &facts.reset_reasons)?;
        fill_filter_map::<u32>(&mut ebpf, names::FILTER_PIDS, &options.pids)?;
        fill_filter_map::<u16>(&mut ebpf, names::FILTER_PORTS, &options.ports)?;
        let logger_task = match options.kernel_log {
            Some(level) if level != log::LevelFilter::Off => Some(spawn_kernel_logger(&mut ebpf)?),
            _ => None,
        };
        let attached = hooks::attach_all(&mut ebpf, &facts, options)?;
        mark_attached(&mut ebpf)?;
        let ring = RingBuf::try_from(
            ebpf.take_map(names::EVENTS)
                .context("the eBPF object lacks its EVENTS map")?,
        )?;
        // SAFETY: the RingBuf owns its map fd, which stays open and unchanged
        // until the AsyncFd (which owns the RingBuf) is dropped.
        let events = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(io::Error::from)
            .context("registering the ring buffer with tokio")?;
        let mut warnings = facts.warnings.clone();
        warnings.extend(attached.warnings);
        Ok(Self {
            ebpf,
            namespaces_known: facts.sock.is_some_and(|l| l.net != 0 && l.net_inum != 0),
            tw_alive_at_start: facts.tw_alive_at_start,
            tw_enabled: attached.time_wait,
            events,
            programs: attached.programs,
            warnings,
            _logger_task: logger_task,
        })
    }

    /// Fault injection for the tests: state changes go unseen from now on.
    #[cfg(feature = "fault-injection")]
    pub fn unload_state_changes(&mut self) -> anyhow::Result<()> {
        hooks::unload_state_changes(&mut self.ebpf, &mut self.programs)
    }

    /// Features that could not be attached on this kernel, one line each.
    #[must_use]
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Adds a process to those traced (with `follow_forks`, its future
    /// children follow it).
    pub fn follow(&mut self, pid: u32) -> anyhow::Result<()> {
        let mut map: HashMap<&mut MapData, u32, u8> = HashMap::try_from(
            self.ebpf
                .map_mut(names::FILTER_PIDS)
                .context("the eBPF object lacks its FILTER_PIDS map")?,
        )?;
        map.insert(pid, 1, 0)
            .with_context(|| format!("following pid {pid}"))
    }

    /// Stops following a process (its already-forked children stay).
    pub fn unfollow(&mut self, pid: u32) -> anyhow::Result<()> {
        let mut map: HashMap<&mut MapData, u32, u8> = HashMap::try_from(
            self.ebpf
                .map_mut(names::FILTER_PIDS)
                .context("the eBPF object lacks its FILTER_PIDS map")?,
        )?;
        map.remove(&pid)
            .with_context(|| format!("unfollowing pid {pid}"))
    }

    /// Tells the kernel side who holds listeners that predate the tracer
    /// (their `listen()` was never seen), so connections accepted there carry
    /// their owner from the start instead of only once it first closes,
    /// sends or receives. A listener seen since start keeps its record.
    /// Returns how many were added.
    pub fn add_listeners(&mut self, listeners: &[KnownListener]) -> anyhow::Result<usize> {
        // BPF_NOEXIST: the kernel side's own record is newer.
        const ONLY_IF_ABSENT: u64 = 1;
        let mut map: HashMap<&mut MapData, ListenerKey, SockRecord> = HashMap::try_from(
            self.ebpf
                .map_mut(names::LISTENERS)
                .context("the eBPF object lacks its LISTENERS map")?,
        )?;
        let mut added = 0;
        for listener in listeners {
            let (key, record) = listener.as_kernel_entry();
            added += usize::from(map.insert(key, record, ONLY_IF_ABSENT).is_ok());
        }
        Ok(added)
    }

    /// Whether events carry their socket's network namespace.
    #[must_use]
    pub fn namespaces_known(&self) -> bool {
        self.namespaces_known
    }

    /// Whether TIME_WAIT mini-sockets are followed on this kernel.
    #[must_use]
    pub fn time_wait_enabled(&self) -> bool {
        self.tw_enabled
    }

    /// Waits until the kernel has streamed a ring's quarter, or `POLL_EVERY`
    /// passed, then hands every record available to `each`, in order. The
    /// kernel wakes the reader only past that mark: a wake-up per event
    /// costs more than the event itself. Records are read in place, never
    /// copied: `each` decodes them. Returns when the draining began
    /// (`CLOCK_MONOTONIC` ns): every event the kernel stamped before it has
    /// been handed over.
    pub async fn next_batch(&mut self, each: impl FnMut(&[u8])) -> anyhow::Result<u64> {
        let waited = tokio::time::timeout(POLL_EVERY, self.events.readable_mut()).await;
        let began = sys::monotonic_ns();
        match waited {
            Ok(guard) => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                drain_ring(guard.get_inner_mut(), each);
                guard.clear_ready();
            }
            Err(_) => drain_ring(self.events.get_mut(), each),
        }
        Ok(began)
    }

    /// Hands what is in the ring buffer now to `each`, without waiting.
    pub fn drain(&mut self, each: impl FnMut(&[u8])) {
        drain_ring(self.events.get_mut(), each);
    }

    /// Counts of what was lost, from the kernel's counters and the
    /// programs' recursion misses.
    pub fn loss(&self) -> anyhow::Result<LossReport> {
        let counters = self.counters()?;
        let sum = |index: u32| counter_sum(&counters, index);
        // A primary's misses that its twin handled are no loss.
        let mut recursion_misses = 0;
        for name in self.programs.iter().filter(|n| !hooks::is_twin(n)) {
            recursion_misses += self.program_stats(name)?.recursion_misses;
        }
        for rescued in [
            counter::RESCUED_SET_STATE,
            counter::RESCUED_TIMER_START,
            counter::RESCUED_TIMER_CANCEL,
            counter::RESCUED_TIMER_EXPIRE,
        ] {
            recursion_misses = recursion_misses.saturating_sub(sum(rescued)?);
        }
        Ok(LossReport {
            ringbuf_full: sum(counter::RINGBUF_FULL)?,
            read_failed: sum(counter::READ_FAILED)?,
            sock_update_failed: sum(counter::SOCK_UPDATE_FAILED)?,
            recursion_misses,
            decode_errors: 0,
            tw_births_missed: sum(counter::TW_BIRTH_MISSED)?,
            tw_untracked_ends: sum(counter::TW_UNTRACKED_END)?
                + self.untracked_cancels_pending()?,
            tw_update_failed: sum(counter::TW_UPDATE_FAILED)?,
            tw_births_owner_unknown: sum(counter::TW_BIRTH_OWNER_UNKNOWN)?,
            follow_failed: sum(counter::FOLLOW_FAILED)?,
            too_deeply_nested: sum(counter::TOO_DEEPLY_NESTED)?,
        })
    }

    /// Resets sent that ended no connection twtrace follows (a SYN to a
    /// closed port, a segment for a TIME_WAIT socket, …), by reason
    /// (`reset_reason::*`), since tracing began.
    pub fn resets_apart(&self) -> anyhow::Result<[u64; reset_reason::COUNT as usize]> {
        let counts: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(names::RESETS_APART)
                .context("the eBPF object lacks its RESETS_APART map")?,
        )?;
        let mut out = [0; reset_reason::COUNT as usize];
        for (reason, slot) in (0..reset_reason::COUNT).zip(out.iter_mut()) {
            *slot = counter_sum(&counts, reason)?;
        }
        Ok(out)
    }

    /// Mini-sockets that moved before their hand-over (`TimeWaitTally`).
    pub fn hand_overs_raced(&self) -> anyhow::Result<u64> {
        counter_sum(&self.counters()?, counter::TW_HAND_OVER_RACED)
    }

    /// The kernel's counters (`twtrace_common::counter`), per CPU.
    fn counters(&self) -> anyhow::Result<PerCpuArray<&MapData, u64>> {
        Ok(PerCpuArray::try_from(
            self.ebpf
                .map(names::COUNTERS)
                .context("the eBPF object lacks its COUNTERS map")?,
        )?)
    }

    /// Untracked mini-sockets cancelled last on a CPU, that nothing has
    /// re-armed since: counted as ended (a later re-arm is rare: the
    /// kernel re-arms a timer in the same call that detached it).
    fn untracked_cancels_pending(&self) -> anyhow::Result<u64> {
        let scratch: PerCpuArray<&MapData, twtrace_common::TwScratch> = PerCpuArray::try_from(
            self.ebpf
                .map(names::TW_SCRATCH)
                .context("the eBPF object lacks its TW_SCRATCH map")?,
        )?;
        let mut pending = 0;
        for depth in 0..twtrace_common::MAX_NESTING {
            let slots = scratch.get(&depth, 0)?;
            pending += slots
                .iter()
                .filter(|s| s.cancel_timer != 0 && s.cancel_untracked != 0)
                .count() as u64;
        }
        Ok(pending)
    }

    /// The kernel's run-time statistics of one attached program.
    pub fn program_stats(&self, name: &str) -> anyhow::Result<sys::ProgStats> {
        let program = self
            .ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))?;
        sys::prog_stats(&program.fd()?.as_fd())
    }

    /// TIME_WAIT mini-sockets alive in every namespace when tracing began:
    /// ends without a record beyond these were evicted records.
    #[must_use]
    pub fn tw_alive_at_start(&self) -> u64 {
        self.tw_alive_at_start
    }

    /// Names of the attached programs.
    #[must_use]
    pub fn programs(&self) -> &[&'static str] {
        &self.programs
    }
}

/// Loads the object, sized and configured for this run and this kernel.
fn load(options: &TracerOptions, facts: &KernelFacts) -> anyhow::Result<Ebpf> {
    let filter = Filter {
        family: match options.family {
            None => 0,
            Some(Family::V4) => AF_INET,
            Some(Family::V6) => AF_INET6,
        },
        pids_enabled: u8::from(!options.pids.is_empty() || options.follow_forks),
        ports_enabled: u8::from(!options.ports.is_empty()),
        all_states: u8::from(options.all_states),
        follow_forks: u8::from(options.follow_forks),
        fork_child_pid: match (options.follow_forks, facts.fork_child_pid) {
            (false, _) => 0,
            (true, Some(offset)) => offset,
            (true, None) => bail!(
                "tracepoint sched:sched_process_fork has no usable child_pid on this kernel (needed to follow the command's children)"
            ),
        },
        netns: options.netns.unwrap_or(0),
    };
    let log_level: u8 = match options.kernel_log {
        None | Some(log::LevelFilter::Off) => 0,
        Some(level) => level as u8,
    };
    let ring_bytes = options
        .ring_bytes
        .unwrap_or_else(|| ring_bytes_for(facts.tw_capacity));
    let followed = if options.follow_forks {
        FOLLOWED_PIDS
    } else {
        MAX_FILTER_ENTRIES
    };
    let wakeup_at_bytes = u64::from(ring_bytes / 4);
    let reset_has_reason = u32::from(facts.reset_reasons.given);
    let mut loader = EbpfLoader::new();
    loader
        .override_global(names::GLOBAL_FILTER, &filter, true)
        .override_global(names::GLOBAL_SET_STATE_LAYOUT, &facts.set_state, true)
        .override_global(names::GLOBAL_TW_CONFIG, &facts.time_wait, true)
        .override_global(
            names::GLOBAL_SOCK_LAYOUT,
            facts.sock.as_ref().unwrap_or(&SockLayout::UNKNOWN),
            true,
        )
        .override_global(aya_log::LEVEL, &log_level, false)
        .override_global(names::GLOBAL_WAKEUP_AT_BYTES, &wakeup_at_bytes, true)
        .override_global(names::GLOBAL_RESET_HAS_REASON, &reset_has_reason, true)
        .map_max_entries(names::EVENTS, ring_bytes)
        .map_max_entries(names::SOCKS, with_lru_slack(options.max_sockets))
        .map_max_entries(names::TWS, with_lru_slack(facts.tw_capacity))
        .map_max_entries(names::FILTER_PIDS, followed);
    #[cfg(feature = "fault-injection")]
    loader.override_global(
        names::GLOBAL_SLOW_HAND_OVER_NS,
        &options.slow_hand_over_ns,
        true,
    );
    loader
        .load(EBPF_OBJECT)
        .context("loading twtrace's eBPF programs into the kernel (see `dmesg` and run with -v for the verifier log)")
}

/// Tells the kernel side which of twtrace's reasons each of the kernel's
/// reset reasons is.
fn fill_reset_reasons(ebpf: &mut Ebpf, reasons: &probe::ResetReasons) -> anyhow::Result<()> {
    let mut map: Array<&mut MapData, u8> = Array::try_from(
        ebpf.map_mut(names::RESET_REASONS)
            .context("the eBPF object lacks its RESET_REASONS map")?,
    )?;
    for &(value, code) in &reasons.codes {
        map.set(value, code, 0)
            .context("filling the reset reasons")?;
    }
    Ok(())
}

/// The ring's default size: room for the ends of a quarter of the
/// TIME_WAIT capacity at once. The kernel expires mini-sockets a
/// timer-wheel bucket at a time (2 s of births at HZ=250, 4 s at 1000),
/// in one softirq, faster than any reader drains: at 20 000 births/s,
/// 40 000 ends in a few milliseconds, which overflowed 4 MiB. At least
/// 4 MiB, at most 64 MiB (16 MiB for 262 144 mini-sockets).
#[must_use]
pub fn ring_bytes_for(tw_capacity: u32) -> u32 {
    const RECORD: u64 = size_of::<twtrace_common::TransitionEvent>() as u64 + 8;
    let quarter = u64::from(tw_capacity) * RECORD / 4;
    let bytes = quarter.next_power_of_two().clamp(4 << 20, 64 << 20);
    u32::try_from(bytes).unwrap_or(64 << 20)
}

/// An LRU map's size for `n` entries usable from any CPU.
fn with_lru_slack(n: u32) -> u32 {
    let cpus = sys::possible_cpus().unwrap_or(1);
    n.saturating_add(LRU_SLACK_PER_CPU.saturating_mul(cpus))
}

fn validate(options: &TracerOptions) -> anyhow::Result<()> {
    if let Some(bytes) = options.ring_bytes
        && (!bytes.is_power_of_two() || bytes < 4096)
    {
        bail!("ring buffer size must be a power of two of at least 4 KiB, got {bytes} bytes");
    }
    if options.max_sockets == 0 {
        bail!("the socket map needs at least one entry");
    }
    for (what, count) in [
        ("--pid", options.pids.len()),
        ("--port", options.ports.len()),
    ] {
        if count > MAX_FILTER_ENTRIES as usize {
            bail!("at most {MAX_FILTER_ENTRIES} {what} values, got {count}");
        }
    }
    Ok(())
}

fn fill_filter_map<K: aya::Pod>(ebpf: &mut Ebpf, name: &str, keys: &[K]) -> anyhow::Result<()> {
    let mut map: HashMap<&mut MapData, K, u8> = HashMap::try_from(
        ebpf.map_mut(name)
            .with_context(|| format!("the eBPF object lacks its {name} map"))?,
    )?;
    for key in keys {
        map.insert(key, 1, 0)
            .with_context(|| format!("filling {name}"))?;
    }
    Ok(())
}

fn spawn_kernel_logger(ebpf: &mut Ebpf) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let logger =
        aya_log::EbpfLogger::init(ebpf).context("setting up the kernel program's log channel")?;
    // SAFETY: the logger owns its ring buffer fd, open and unchanged for as
    // long as the AsyncFd that owns the logger.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(io::Error::from)
        .context("registering the kernel log channel with tokio")?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

/// Hands each record in the ring buffer to `each`.
fn drain_ring(ring: &mut RingBuf<MapData>, mut each: impl FnMut(&[u8])) {
    while let Some(item) = ring.next() {
        each(&item);
    }
}

#[cfg(test)]
mod tests {
    use super::ring_bytes_for;

    #[test]
    fn the_default_ring_holds_a_quarter_of_the_time_wait_capacity() {
        assert_eq!(ring_bytes_for(1024), 4 << 20, "at least 4 MiB");
        // 131 072 × 144 B / 4 = 4.5 MiB.
        assert_eq!(ring_bytes_for(131_072), 8 << 20);
        assert_eq!(ring_bytes_for(262_144), 16 << 20);
        assert_eq!(ring_bytes_for(16_777_216), 64 << 20, "at most 64 MiB");
    }
}
