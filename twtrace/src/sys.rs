//! Small system facts twtrace needs: privileges, clocks, BPF program stats.

use std::{fs, os::fd::AsRawFd};

use anyhow::{Context, bail};

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYSLOG: u32 = 34;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capability set of this process, from /proc/self/status.
pub fn effective_capabilities() -> anyhow::Result<u64> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_cap_eff(&status).context("no CapEff line in /proc/self/status")
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// The capabilities twtrace lacks to load and attach its programs and to
/// find the TIME_WAIT timer's handler, by name. `kallsyms_open` says
/// whether /proc/kallsyms shows addresses to everyone here.
#[must_use]
pub fn missing_capabilities(cap_eff: u64, euid: u32, kallsyms_open: bool) -> Vec<&'static str> {
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN implies both on kernels before 5.8 and still does.
    if !has(CAP_SYS_ADMIN) {
        if !has(CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has(CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    // tracefs is mode 0700, owned by root: anyone else needs to search it.
    if euid != 0 && !has(CAP_DAC_READ_SEARCH) {
        missing.push("CAP_DAC_READ_SEARCH");
    }
    // /proc/kallsyms shows zeros instead of addresses without it (unless
    // kptr_restrict=0 and perf_event_paranoid<=1), and TIME_WAIT is found
    // through tw_timer_handler's address. Not even root has it implicitly.
    if !kallsyms_open && !has(CAP_SYSLOG) {
        missing.push("CAP_SYSLOG");
    }
    missing
}

/// Whether /proc/kallsyms shows real addresses to any process.
#[must_use]
pub fn kallsyms_open_to_all() -> bool {
    let read = |path| read_sysctl_u64(path).ok();
    read("/proc/sys/kernel/kptr_restrict") == Some(0)
        && read("/proc/sys/kernel/perf_event_paranoid").is_some_and(|p| p <= 1)
}

/// Fails with one line naming what is missing, before any BPF call could
/// fail with a bare EPERM.
pub fn check_privileges() -> anyhow::Result<()> {
    let cap_eff = effective_capabilities()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let missing = missing_capabilities(cap_eff, euid, kallsyms_open_to_all());
    if !missing.is_empty() {
        bail!(
            "not allowed to trace: missing {}; run twtrace as root (e.g. `sudo twtrace trace`) or grant CAP_BPF, CAP_PERFMON, CAP_SYSLOG (and CAP_DAC_READ_SEARCH when not uid 0)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Offset between `CLOCK_REALTIME` and `CLOCK_MONOTONIC`, to turn the kernel's
/// `bpf_ktime_get_ns()` stamps into wall-clock time.
#[must_use]
pub fn realtime_minus_monotonic_ns() -> i128 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC)
}

/// `CLOCK_MONOTONIC` now, in the kernel's `bpf_ktime_get_ns()` units.
#[must_use]
pub fn monotonic_ns() -> u64 {
    u64::try_from(clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
}

/// CPUs the kernel may ever bring up (per-CPU map state exists for each).
#[must_use]
pub fn possible_cpus() -> Option<u32> {
    let text = fs::read_to_string("/sys/devices/system/cpu/possible").ok()?;
    count_cpu_list(&text)
}

/// Counts a kernel CPU list such as `0-3,8,10-11`.
#[must_use]
pub fn count_cpu_list(text: &str) -> Option<u32> {
    let mut n = 0;
    for part in text.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u32>().ok()?.checked_sub(a.parse().ok()?)? + 1,
            None => part.parse::<u32>().map(|_| 1).ok()?,
        };
    }
    Some(n)
}

/// The kernel's tick rate (`CONFIG_HZ`): the coarse clocks advance once per
/// jiffy, so their resolution is one jiffy.
#[must_use]
pub fn kernel_hz() -> Option<u64> {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `res` is a valid, writable timespec.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &raw mut res) };
    let tick_ns = u64::try_from(res.tv_nsec).ok()?;
    (rc == 0 && res.tv_sec == 0 && tick_ns > 0).then(|| (1_000_000_000 + tick_ns / 2) / tick_ns)
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; these clocks always exist.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Run-time statistics the kernel keeps for one loaded program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgStats {
    /// Only counted while `kernel.bpf_stats_enabled` is 1.
    pub run_time_ns: u64,
    pub run_cnt: u64,
    /// Times the kernel skipped the program because it would have nested
    /// on one CPU: events that were never seen, invisible to the program.
    pub recursion_misses: u64,
}

// Offsets in the kernel's `struct bpf_prog_info` (stable uAPI: fields are
// only ever appended).
const INFO_RUN_TIME_NS: usize = 192;
const INFO_RUN_CNT: usize = 200;
const INFO_RECURSION_MISSES: usize = 208;
const INFO_LEN: usize = 232;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Reads `bpf_prog_info` for a program fd. aya 0.14 does not expose
/// `recursion_misses`, so this asks the kernel directly.
pub fn prog_stats(fd: &impl AsRawFd) -> anyhow::Result<ProgStats> {
    let mut info = [0u64; INFO_LEN / 8];
    let mut attr = InfoByFdAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).context("negative fd")?,
        info_len: u32::try_from(INFO_LEN)?,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` is a valid BPF_OBJ_GET_INFO_BY_FD attribute whose `info`
    // points at INFO_LEN writable bytes that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            size_of::<InfoByFdAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_OBJ_GET_INFO_BY_FD");
    }
    let field = |offset: usize| info[offset / 8];
    Ok(ProgStats {
        run_time_ns: field(INFO_RUN_TIME_NS),
        run_cnt: field(INFO_RUN_CNT),
        recursion_misses: field(INFO_RECURSION_MISSES),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff_is_parsed_as_hex() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x01ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn root_with_full_caps_lacks_nothing() {
        assert!(missing_capabilities(u64::MAX, 0, false).is_empty());
    }

    #[test]
    fn no_caps_names_bpf_perfmon_and_tracefs_access() {
        assert_eq!(
            missing_capabilities(0, 1000, false),
            [
                "CAP_BPF",
                "CAP_PERFMON",
                "CAP_DAC_READ_SEARCH",
                "CAP_SYSLOG"
            ]
        );
        // Root owns tracefs, so it needs no DAC capability to read it.
        assert_eq!(
            missing_capabilities(0, 0, false),
            ["CAP_BPF", "CAP_PERFMON", "CAP_SYSLOG"]
        );
        // Kernel addresses open to all: no CAP_SYSLOG needed.
        assert_eq!(missing_capabilities(0, 0, true), ["CAP_BPF", "CAP_PERFMON"]);
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon() {
        let caps = 1 << CAP_SYS_ADMIN | 1 << CAP_DAC_READ_SEARCH | 1 << CAP_SYSLOG;
        assert!(missing_capabilities(caps, 1000, false).is_empty());
        let only_bpf = 1 << CAP_BPF | 1 << CAP_SYSLOG;
        assert_eq!(missing_capabilities(only_bpf, 0, false), ["CAP_PERFMON"]);
    }

    #[test]
    fn kernel_hz_is_a_real_tick_rate() {
        let hz = kernel_hz().expect("coarse clock resolution");
        assert!([100, 250, 300, 1000].contains(&hz), "HZ={hz}");
    }

    #[test]
    fn clocks_are_consistent() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
        // Realtime is years past the monotonic clock's boot-time origin.
        assert!(realtime_minus_monotonic_ns() > 1_000_000_000 * 3600 * 24 * 365);
    }
}

/// Address of a kernel symbol from /proc/kallsyms. `None` when the symbol
/// is missing or its address is hidden (`kptr_restrict`, not root).
pub fn kallsyms_lookup(symbol: &str) -> anyhow::Result<Option<u64>> {
    let text = fs::read_to_string("/proc/kallsyms").context("reading /proc/kallsyms")?;
    Ok(parse_kallsyms(&text, symbol))
}

fn parse_kallsyms(text: &str, symbol: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let (addr, _kind, name) = (parts.next()?, parts.next()?, parts.next()?);
        (name == symbol)
            .then(|| u64::from_str_radix(addr, 16).ok())
            .flatten()
            .filter(|&addr| addr != 0)
    })
}

/// A whole number from a /proc/sys file.
pub fn read_sysctl_u64(path: &str) -> anyhow::Result<u64> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.trim()
        .parse()
        .with_context(|| format!("{path} holds {text:?}, not a number"))
}

#[cfg(test)]
mod kallsyms_tests {
    use super::parse_kallsyms;

    #[test]
    fn finds_exact_symbol_and_ignores_hidden_addresses() {
        let text = "ffffffff82003430 t tw_timer_handler\nffffffff82003440 t tw_timer_handler_x\n";
        assert_eq!(
            parse_kallsyms(text, "tw_timer_handler"),
            Some(0xffff_ffff_8200_3430)
        );
        assert_eq!(parse_kallsyms(text, "nope"), None);
        let hidden = "0000000000000000 t tw_timer_handler\n";
        assert_eq!(parse_kallsyms(hidden, "tw_timer_handler"), None);
    }
}

/// This thread's network namespace's `/proc/net`. `/proc/net` itself is
/// the main thread's, which is wrong on a thread that entered another
/// namespace (`netns::read_in`).
const THREAD_NET: &str = "/proc/thread-self/net";

/// TIME_WAIT mini-sockets in this thread's network namespace now, IPv4
/// and IPv6 together (`tw` in sockstat counts both).
pub fn time_wait_sockets_now() -> anyhow::Result<u64> {
    let path = format!("{THREAD_NET}/sockstat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_sockstat_tw(&text).context("no TCP tw count in /proc/net/sockstat")
}

#[must_use]
pub fn parse_sockstat_tw(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == "tw" {
            return words.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod cpu_list_tests {
    #[test]
    fn counts_ranges_and_singles() {
        assert_eq!(super::count_cpu_list("0-1\n"), Some(2));
        assert_eq!(super::count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(super::count_cpu_list("0"), Some(1));
        assert_eq!(super::count_cpu_list("x"), None);
    }
}

#[cfg(test)]
mod sockstat_tests {
    #[test]
    fn reads_tw_from_the_tcp_line() {
        let text =
            "sockets: used 180\nTCP: inuse 5 orphan 0 tw 1234 alloc 9 mem 1\nUDP: inuse 1 mem 0\n";
        assert_eq!(super::parse_sockstat_tw(text), Some(1234));
        assert_eq!(super::parse_sockstat_tw("UDP: inuse 1\n"), None);
    }
}

/// `TcpExt` counters from /proc/net/netstat (a header line of names, then
/// a line of values).
#[must_use]
pub fn parse_netstat(text: &str) -> std::collections::BTreeMap<String, u64> {
    parse_counter_lines(text, "TcpExt:")
}

/// The `Tcp:` counters of `/proc/net/snmp` (`OutRsts`, `EstabResets`, …).
#[must_use]
pub fn parse_snmp_tcp(text: &str) -> std::collections::BTreeMap<String, u64> {
    parse_counter_lines(text, "Tcp:")
}

/// A names line and a values line, both starting with `prefix`.
fn parse_counter_lines(text: &str, prefix: &str) -> std::collections::BTreeMap<String, u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return std::collections::BTreeMap::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
        .collect()
}

/// `major.minor` of a kernel release (`5.10.0-46-cloud-amd64` → 5.10).
#[must_use]
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Whether `TcpExtTW` + `TcpExtTWKilled` count TIME_WAIT births on this
/// kernel. Before Linux 5.18 they were counted when a mini-socket's timer
/// fired — expiries, not births, and no early end (the commit "tcp/dccp:
/// no longer use `twsk_net(tw)` from `tw_timer_handler()`"); an unparsable
/// release is taken as new.
#[must_use]
pub fn tw_counters_count_births(release: &str) -> bool {
    kernel_version(release).is_none_or(|version| version >= (5, 18))
}

#[cfg(test)]
mod version_tests {
    use super::*;

    #[test]
    fn time_wait_counters_count_births_from_5_18() {
        assert_eq!(kernel_version("5.10.0-46-cloud-amd64"), Some((5, 10)));
        assert_eq!(kernel_version("6.12.118+deb13-cloud-amd64"), Some((6, 12)));
        assert!(!tw_counters_count_births("5.10.0-46-cloud-amd64"));
        assert!(!tw_counters_count_births("5.17.15"));
        assert!(tw_counters_count_births("5.18.0"));
        assert!(tw_counters_count_births("6.1.0-57-cloud-arm64"));
        assert!(tw_counters_count_births("weird"));
    }
}

/// One `TcpExt` counter of this thread's network namespace.
#[must_use]
pub fn tcp_ext_counter(name: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("{THREAD_NET}/netstat")).ok()?;
    parse_netstat(&text).get(name).copied()
}

/// `net.ipv4.ip_local_port_range`: the ports `connect()` picks from.
pub fn local_port_range() -> anyhow::Result<(u16, u16)> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(low)), Some(Ok(high))) => Ok((low, high)),
        _ => anyhow::bail!("{path} holds {text:?}"),
    }
}

/// What decides how fast a network namespace runs out of ephemeral ports:
/// its own sysctls (every namespace has its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PortSettings {
    pub port_range: (u16, u16),
    /// Ports `ip_local_reserved_ports` holds back.
    pub reserved: u64,
    pub tw_reuse: u64,
    /// `tcp_tw_reuse_delay` (ms); kernels without it reuse after 1 s.
    pub tw_reuse_delay_ms: u64,
    pub timestamps: u64,
    pub max_tw_buckets: Option<u64>,
}

impl PortSettings {
    /// The settings of this thread's network namespace.
    pub fn read() -> anyhow::Result<Self> {
        let sysctl = |name: &str| read_sysctl_u64(&format!("/proc/sys/net/ipv4/{name}"));
        Ok(Self {
            port_range: local_port_range()?,
            reserved: reserved_ports(),
            tw_reuse: sysctl("tcp_tw_reuse").unwrap_or(0),
            tw_reuse_delay_ms: sysctl("tcp_tw_reuse_delay").unwrap_or(1000),
            timestamps: sysctl("tcp_timestamps").unwrap_or(0),
            max_tw_buckets: sysctl("tcp_max_tw_buckets").ok(),
        })
    }

    /// Ephemeral ports `connect()` may use.
    #[must_use]
    pub fn usable(&self) -> u64 {
        usable_ports(self.port_range, self.reserved)
    }
}

/// Ephemeral ports `connect()` may use: `ip_local_port_range` less
/// `ip_local_reserved_ports`.
pub fn usable_ephemeral_ports() -> anyhow::Result<u64> {
    Ok(usable_ports(local_port_range()?, reserved_ports()))
}

/// The ports `ip_local_reserved_ports` holds back (0 if unreadable).
#[must_use]
pub fn reserved_ports() -> u64 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
        .map_or(0, |t| count_reserved_ports(&t))
}

/// The one rule for usable ephemeral ports: the inclusive range less the
/// reserved ones. (Strictly, only reserved ports inside the range count;
/// the kernel's default reserves none.)
#[must_use]
pub fn usable_ports((low, high): (u16, u16), reserved: u64) -> u64 {
    (u64::from(high.saturating_sub(low)) + 1).saturating_sub(reserved)
}

/// How many ports `ip_local_reserved_ports` holds back ("1000,2000-2010").
#[must_use]
pub fn count_reserved_ports(text: &str) -> u64 {
    text.trim()
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.trim().split_once('-') {
            Some((a, b)) => match (a.parse::<u64>(), b.parse::<u64>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => u64::from(p.trim().parse::<u64>().is_ok()),
        })
        .sum()
}

/// Tells a service manager that tracing is attached (systemd's
/// `sd_notify` protocol: `READY=1` to the datagram socket named by
/// `NOTIFY_SOCKET`, `@` for the abstract namespace). Tests use it too: a
/// machine-readable "attached", unlike the line on stderr.
pub fn notify_ready() {
    use std::os::{linux::net::SocketAddrExt, unix::net};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let address = match path.strip_prefix('@') {
        Some(name) => net::SocketAddr::from_abstract_name(name.as_bytes()),
        None => net::SocketAddr::from_pathname(&path),
    };
    let sent = address
        .and_then(|address| net::UnixDatagram::unbound()?.send_to_addr(b"READY=1", &address));
    if let Err(error) = sent {
        log::warn!("telling NOTIFY_SOCKET={path} that twtrace is ready: {error}");
    }
}
