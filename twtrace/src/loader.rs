//! Loading the embedded eBPF object, attaching it, and reading what it
//! streams and what it lost.

use std::{io, os::fd::AsFd};

use anyhow::{Context, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{RawTracePoint, TracePoint},
};
use tokio::io::{Interest, unix::AsyncFd};
use twtrace_common::{
    AF_INET, AF_INET6, DEFAULT_MAX_SOCKETS, DEFAULT_MAX_TW, Filter, MAX_FILTER_ENTRIES,
    SetStateLayout, SockLayout, TwConfig, counter, names,
};

use crate::{
    btf::Btf,
    event::{self, KernelEvent},
    sys, tracefs,
};

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
    /// Ring buffer size in bytes: a power of two, at least one page.
    pub ring_bytes: u32,
    /// Capacity of the per-socket record map.
    pub max_sockets: u32,
    /// Carry the kernel program's aya-log diagnostics to the `log` crate.
    pub kernel_log: Option<log::LevelFilter>,
    /// Add the children that processes in `pids` fork to `pids`, in the
    /// kernel (`record`); `pids` may then start empty and be filled with
    /// `Tracer::follow`.
    pub follow_forks: bool,
}

impl Default for TracerOptions {
    fn default() -> Self {
        Self {
            pids: Vec::new(),
            ports: Vec::new(),
            family: None,
            all_states: false,
            ring_bytes: 4096 * 1024,
            max_sockets: DEFAULT_MAX_SOCKETS,
            kernel_log: None,
            follow_forks: false,
        }
    }
}

/// How often the reader drains the ring when the kernel did not wake it.
const POLL_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Processes `record` can follow: the command and everything it forks.
const FOLLOWED_PIDS: u32 = 65_536;

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
    /// Records the userspace decoder rejected.
    pub decode_errors: u64,
    /// TIME_WAIT mini-sockets that ended without twtrace holding their
    /// record: alive before twtrace started, or evicted from its LRU map.
    pub tw_untracked_ends: u64,
    /// Mini-socket records the kernel could not store.
    pub tw_update_failed: u64,
}

impl LossReport {
    /// Transitions that never reached the output.
    #[must_use]
    pub fn events_lost(&self) -> u64 {
        self.ringbuf_full + self.read_failed + self.recursion_misses + self.decode_errors
    }
}

/// A loaded and attached twtrace. Dropping it detaches and unloads
/// everything (the kernel frees programs and maps with their last fd).
pub struct Tracer {
    ebpf: Ebpf,
    /// TIME_WAIT mini-sockets alive when tracing began (`/proc/net/sockstat`):
    /// their ends are expected to be untracked.
    tw_alive_at_start: u64,
    /// Capacity of the kernel's mini-socket map.
    tw_capacity: u32,
    tw_enabled: bool,
    events: AsyncFd<RingBuf<MapData>>,
    programs: Vec<&'static str>,
    warnings: Vec<String>,
    decode_errors: u64,
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
        let tracefs = tracefs::root()?;
        let layout = set_state_layout(&tracefs)?;
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
            fork_child_pid: if options.follow_forks {
                tracefs::read_format(&tracefs, "sched", "sched_process_fork")?.offset(
                    "sched:sched_process_fork",
                    "child_pid",
                    4,
                )?
            } else {
                0
            },
        };
        let log_level: u8 = match options.kernel_log {
            None | Some(log::LevelFilter::Off) => 0,
            Some(level) => level as u8,
        };
        let mut warnings = Vec::new();
        let tw_config = time_wait_config_or_warn(&tracefs, &mut warnings);
        // Each network namespace holds up to tcp_max_tw_buckets mini-sockets;
        // the map holds at least that many, as the LRU evicts beyond it.
        let tw_capacity = sys::read_sysctl_u64("/proc/sys/net/ipv4/tcp_max_tw_buckets")
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .map_or(DEFAULT_MAX_TW, |n| n.clamp(1024, 4 << 20));
        let tw_alive_at_start = sys::time_wait_sockets_now().unwrap_or(0);
        // Without BTF the classic tracepoint's record gives the same fields.
        let sock_layout = sock_layout().ok();
        let mut ebpf = EbpfLoader::new()
            .override_global(names::GLOBAL_FILTER, &filter, true)
            .override_global(names::GLOBAL_SET_STATE_LAYOUT, &layout, true)
            .override_global(names::GLOBAL_TW_CONFIG, &tw_config, true)
            .override_global(
                names::GLOBAL_SOCK_LAYOUT,
                sock_layout.as_ref().unwrap_or(&SockLayout::UNKNOWN),
                true,
            )
            .override_global(aya_log::LEVEL, &log_level, false)
            .override_global(
                names::GLOBAL_WAKEUP_AT_BYTES,
                &u64::from(options.ring_bytes / 4),
                true,
            )
            .map_max_entries(names::EVENTS, options.ring_bytes)
            .map_max_entries(names::SOCKS, options.max_sockets)
            .map_max_entries(names::TWS, tw_capacity)
            .map_max_entries(
                names::FILTER_PIDS,
                if options.follow_forks { FOLLOWED_PIDS } else { MAX_FILTER_ENTRIES },
            )
            .load(EBPF_OBJECT)
            .context("loading twtrace's eBPF programs into the kernel (see `dmesg` and run with -v for the verifier log)")?;

        fill_filter_map::<u32>(&mut ebpf, names::FILTER_PIDS, &options.pids)?;
        fill_filter_map::<u16>(&mut ebpf, names::FILTER_PORTS, &options.ports)?;

        let logger_task = match options.kernel_log {
            Some(level) if level != log::LevelFilter::Off => Some(spawn_kernel_logger(&mut ebpf)?),
            _ => None,
        };

        let (mut programs, tw_enabled) = attach_all(
            &mut ebpf,
            sock_layout.is_some(),
            tw_config.handler != 0,
            &mut warnings,
        )?;
        if options.follow_forks {
            attach_tracepoint(&mut ebpf, names::PROG_FORK, "sched", "sched_process_fork").context(
                "attaching to sched:sched_process_fork (needed to follow the command's children)",
            )?;
            programs.push(names::PROG_FORK);
        }

        let ring = RingBuf::try_from(
            ebpf.take_map(names::EVENTS)
                .context("the eBPF object lacks its EVENTS map")?,
        )?;
        // SAFETY: the RingBuf owns its map fd, which stays open and unchanged
        // until the AsyncFd (which owns the RingBuf) is dropped.
        let events = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(io::Error::from)
            .context("registering the ring buffer with tokio")?;
        Ok(Self {
            ebpf,
            tw_alive_at_start,
            tw_capacity,
            tw_enabled,
            events,
            programs,
            warnings,
            decode_errors: 0,
            _logger_task: logger_task,
        })
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

    /// Whether TIME_WAIT mini-sockets are followed on this kernel.
    #[must_use]
    pub fn time_wait_enabled(&self) -> bool {
        self.tw_enabled
    }

    /// Capacity of the kernel's TIME_WAIT map.
    #[must_use]
    pub fn time_wait_capacity(&self) -> u32 {
        self.tw_capacity
    }

    /// Waits until the kernel has streamed a ring's quarter, or `POLL_EVERY`
    /// passed, then appends every event available to `out`. The kernel
    /// wakes the reader only past that mark: a wake-up per event costs more
    /// than the event itself.
    pub async fn next_batch(&mut self, out: &mut Vec<KernelEvent>) -> anyhow::Result<()> {
        match tokio::time::timeout(POLL_EVERY, self.events.readable_mut()).await {
            Ok(guard) => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                self.decode_errors += drain_ring(guard.get_inner_mut(), out);
                guard.clear_ready();
            }
            Err(_) => self.decode_errors += drain_ring(self.events.get_mut(), out),
        }
        Ok(())
    }

    /// Appends what is in the ring buffer now, without waiting.
    pub fn drain(&mut self, out: &mut Vec<KernelEvent>) {
        self.decode_errors += drain_ring(self.events.get_mut(), out);
    }

    /// Counts of what was lost, from the kernel's counters and the
    /// programs' recursion misses.
    pub fn loss(&self) -> anyhow::Result<LossReport> {
        let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(names::COUNTERS)
                .context("the eBPF object lacks its COUNTERS map")?,
        )?;
        let sum = |index: u32| -> anyhow::Result<u64> {
            Ok(counters.get(&index, 0)?.iter().copied().sum())
        };
        let mut recursion_misses = 0;
        for name in &self.programs {
            recursion_misses += self.program_stats(name)?.recursion_misses;
        }
        Ok(LossReport {
            ringbuf_full: sum(counter::RINGBUF_FULL)?,
            read_failed: sum(counter::READ_FAILED)?,
            sock_update_failed: sum(counter::SOCK_UPDATE_FAILED)?,
            recursion_misses,
            decode_errors: self.decode_errors,
            tw_untracked_ends: sum(counter::TW_UNTRACKED_END)?,
            tw_update_failed: sum(counter::TW_UPDATE_FAILED)?,
        })
    }

    /// The kernel's run-time statistics of one attached program.
    pub fn program_stats(&self, name: &str) -> anyhow::Result<sys::ProgStats> {
        let program = self
            .ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))?;
        sys::prog_stats(&program.fd()?.as_fd())
    }

    /// Mini-socket records evicted from the kernel's LRU map (an estimate:
    /// untracked ends beyond those alive when tracing began).
    pub fn tw_evictions(&self) -> anyhow::Result<u64> {
        Ok(self
            .loss()?
            .tw_untracked_ends
            .saturating_sub(self.tw_alive_at_start))
    }

    /// Names of the attached programs.
    #[must_use]
    pub fn programs(&self) -> &[&'static str] {
        &self.programs
    }
}

fn validate(options: &TracerOptions) -> anyhow::Result<()> {
    if !options.ring_bytes.is_power_of_two() || options.ring_bytes < 4096 {
        bail!(
            "ring buffer size must be a power of two of at least 4 KiB, got {} bytes",
            options.ring_bytes
        );
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

fn set_state_layout(tracefs: &std::path::Path) -> anyhow::Result<SetStateLayout> {
    const EVENT: &str = "sock:inet_sock_set_state";
    let format = tracefs::read_format(tracefs, "sock", "inet_sock_set_state")?;
    let at = |name: &str, size: u16| format.offset(EVENT, name, size);
    Ok(SetStateLayout {
        skaddr: at("skaddr", 8)?,
        oldstate: at("oldstate", 4)?,
        newstate: at("newstate", 4)?,
        sport: at("sport", 2)?,
        dport: at("dport", 2)?,
        family: at("family", 2)?,
        protocol: at("protocol", 2)?,
        saddr: at("saddr", 4)?,
        daddr: at("daddr", 4)?,
        saddr_v6: at("saddr_v6", 16)?,
        daddr_v6: at("daddr_v6", 16)?,
        pad: 0,
    })
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

/// Attaches every program; the first is required, the rest degrade one
/// feature each with a warning. Returns the attached programs and whether
/// TIME_WAIT tracking is on.
fn attach_all(
    ebpf: &mut Ebpf,
    raw_set_state: bool,
    want_time_wait: bool,
    warnings: &mut Vec<String>,
) -> anyhow::Result<(Vec<&'static str>, bool)> {
    let mut programs = Vec::new();
    if raw_set_state {
        attach_raw(ebpf, names::PROG_SET_STATE_RAW)
            .context("attaching to the inet_sock_set_state raw tracepoint")?;
        programs.push(names::PROG_SET_STATE_RAW);
    } else {
        attach_tracepoint(ebpf, names::PROG_SET_STATE, "sock", "inet_sock_set_state")
            .context("attaching to the sock:inet_sock_set_state tracepoint")?;
        programs.push(names::PROG_SET_STATE);
    }

    // Owners of accepted sockets are learnt at their first send or
    // receive; without one of these hooks, from the other or at close()
    // (until then the socket is its listener's owner's). Debian 12's 6.1
    // has no tcp_sendmsg_locked.
    for (name, learnt_from) in [
        (names::PROG_SENDMSG, "their first receive"),
        (names::PROG_RCV_SPACE, "their first send"),
    ] {
        match attach_raw(ebpf, name) {
            Ok(()) => programs.push(name),
            Err(error) => {
                let what = if is_not_found(&error) {
                    format!("this kernel has no tracepoint tcp:{name}")
                } else {
                    format!("tracepoint tcp:{name} could not be attached ({error:#})")
                };
                warnings.push(format!(
                    "{what}: accepted sockets count as their listener's owner's until {learnt_from} or close()"
                ));
            }
        }
    }

    let mut tw_enabled = want_time_wait;
    if tw_enabled {
        for (program, event, raw) in [
            (names::PROG_TIMER_START, "timer_start", false),
            (names::PROG_TIMER_EXPIRE, "timer_expire_entry", true),
            (names::PROG_TIMER_CANCEL, "timer_cancel", true),
        ] {
            let attached = if raw {
                attach_raw(ebpf, program)
            } else {
                attach_tracepoint(ebpf, program, "timer", event)
            };
            match attached {
                Ok(()) => programs.push(program),
                Err(error) => {
                    tw_enabled = false;
                    // Debian's kernels make perf_event_paranoid=3 (their
                    // default) refuse perf_event_open without CAP_SYS_ADMIN.
                    let hint = if !raw
                        && crate::sys::read_sysctl_u64("/proc/sys/kernel/perf_event_paranoid")
                            .is_ok_and(|p| p > 2)
                    {
                        "; with kernel.perf_event_paranoid=3 this kernel may need CAP_SYS_ADMIN, or `sysctl kernel.perf_event_paranoid=2`"
                    } else {
                        ""
                    };
                    warnings.push(format!(
                        "tracepoint timer:{event} unavailable ({error:#}{hint}): TIME_WAIT lifetimes are incomplete"
                    ));
                }
            }
        }
    }
    Ok((programs, tw_enabled))
}

/// Whether attaching failed because the kernel has no such tracepoint.
fn is_not_found(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &str,
    category: &str,
    event: &str,
) -> anyhow::Result<()> {
    let program: &mut TracePoint = ebpf
        .program_mut(name)
        .with_context(|| format!("the eBPF object lacks {name}"))?
        .try_into()?;
    program.load()?;
    program.attach(category, event)?;
    Ok(())
}

/// The TIME_WAIT configuration, or tracking disabled with a warning that
/// says what is missing.
fn time_wait_config_or_warn(tracefs: &std::path::Path, warnings: &mut Vec<String>) -> TwConfig {
    match time_wait_config(tracefs) {
        Ok((config, partial)) => {
            warnings.extend(partial);
            config
        }
        Err(error) => {
            warnings.push(format!(
                "TIME_WAIT tracking unavailable ({error:#}): no TIME_WAIT transitions or lifetimes; the full socket's hand-over to it shows as a close"
            ));
            TwConfig::DISABLED
        }
    }
}

/// Finds what following TIME_WAIT mini-sockets needs on this kernel.
/// Returns warnings for what is only partly available.
fn time_wait_config(tracefs: &std::path::Path) -> anyhow::Result<(TwConfig, Vec<String>)> {
    let handler = sys::kallsyms_lookup("tw_timer_handler")?.context(
        "symbol tw_timer_handler not in /proc/kallsyms (or its address is hidden: run as root)",
    )?;
    let start = tracefs::read_format(tracefs, "timer", "timer_start")?;
    let mut warnings = Vec::new();
    let mut config = TwConfig {
        handler,
        start_timer: start.offset("timer:timer_start", "timer", 8)?,
        start_function: start.offset("timer:timer_start", "function", 8)?,
        start_expires: start.offset("timer:timer_start", "expires", 8)?,
        start_now: start.offset("timer:timer_start", "now", 8)?,
        // Older kernels lack it; the expiry test then bounds by a bucket guess.
        start_bucket_expiry: start
            .offset("timer:timer_start", "bucket_expiry", 8)
            .unwrap_or(0),
        ..TwConfig::DISABLED
    };
    match btf_offsets() {
        Ok(offsets) => {
            config.timer_function_off = offsets.timer_function;
            config.timer_expires_off = offsets.timer_expires;
            config.substate_from_timer = offsets.substate_from_timer;
            config.sport_from_timer = offsets.sport_from_timer;
            config.dport_from_timer = offsets.dport_from_timer;
            config.has_btf = 1;
        }
        Err(error) => warnings.push(format!(
            "kernel BTF unusable ({error:#}): orphaned FIN_WAIT2 mini-sockets are reported as TIME_WAIT"
        )),
    }
    Ok((config, warnings))
}

struct BtfOffsets {
    timer_function: u16,
    timer_expires: u16,
    substate_from_timer: i16,
    sport_from_timer: i16,
    dport_from_timer: i16,
}

fn btf_offsets() -> anyhow::Result<BtfOffsets> {
    let btf = Btf::from_sys_fs()?;
    let timer = btf.member_offset("inet_timewait_sock", "tw_timer")?;
    // The mini-socket starts with the same `struct sock_common` as a socket.
    let common = btf.member_offset("inet_timewait_sock", "__tw_common")?;
    let from_timer = |offset: u32| i16::try_from(i64::from(offset) - i64::from(timer));
    Ok(BtfOffsets {
        timer_function: u16::try_from(btf.member_offset("timer_list", "function")?)?,
        timer_expires: u16::try_from(btf.member_offset("timer_list", "expires")?)?,
        substate_from_timer: from_timer(btf.member_offset("inet_timewait_sock", "tw_substate")?)?,
        sport_from_timer: from_timer(common + btf.member_offset("sock_common", "skc_num")?)?,
        dport_from_timer: from_timer(common + btf.member_offset("sock_common", "skc_dport")?)?,
    })
}

/// Attaches raw tracepoint program `name`, whose tracepoint is its name
/// without a `_raw` suffix.
fn attach_raw(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let program: &mut RawTracePoint = ebpf
        .program_mut(name)
        .with_context(|| format!("the eBPF object lacks {name}"))?
        .try_into()?;
    program.load()?;
    program.attach(name.trim_end_matches("_raw"))?;
    Ok(())
}

/// Offsets in `struct sock` for the raw `inet_sock_set_state` program.
/// Fails on kernels without BTF, or where `sk_protocol` is a bitfield
/// (before 5.6): the classic tracepoint is used there.
fn sock_layout() -> anyhow::Result<SockLayout> {
    let btf = Btf::from_sys_fs()?;
    let common = btf.member_offset("sock", "__sk_common")?;
    let at = |member: &str| -> anyhow::Result<u16> {
        Ok(u16::try_from(
            common + btf.member_offset("sock_common", member)?,
        )?)
    };
    Ok(SockLayout {
        family: at("skc_family")?,
        protocol: u16::try_from(btf.member_offset("sock", "sk_protocol")?)?,
        sport: u16::try_from(btf.member_offset("inet_sock", "inet_sport")?)?,
        dport: at("skc_dport")?,
        rcv_saddr: at("skc_rcv_saddr")?,
        daddr: at("skc_daddr")?,
        v6_rcv_saddr: at("skc_v6_rcv_saddr")?,
        v6_daddr: at("skc_v6_daddr")?,
    })
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

/// Drains the ring buffer into `out`; returns how many records were
/// rejected by the decoder.
fn drain_ring(ring: &mut RingBuf<MapData>, out: &mut Vec<KernelEvent>) -> u64 {
    let mut rejected = 0;
    while let Some(item) = ring.next() {
        match event::decode(&item) {
            Ok(transition) => out.push(transition),
            Err(error) => {
                rejected += 1;
                log::debug!("rejected a ring-buffer record: {error}");
            }
        }
    }
    rejected
}
