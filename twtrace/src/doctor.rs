//! `twtrace doctor`: can twtrace run here, and how healthy is this host's
//! TIME_WAIT? The assessment is pure (a snapshot in, findings out), so
//! every rule is unit-tested; `HostSnapshot::read` gathers the facts.
//!
//! Advice follows what the running kernel really does (see
//! shared/notes/kernel-teardown.md): `tcp_tw_recycle` is gone since 4.12,
//! `tcp_fin_timeout` does not shorten TIME_WAIT, `tcp_tw_reuse` helps only
//! outgoing `connect()`, and overflowing `tcp_max_tw_buckets` drops
//! TIME_WAIT's protection rather than freeing anything.

use std::{collections::BTreeMap, fs, path::Path};

use serde::Serialize;

use crate::{sys, tracefs};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Ok,
    Info,
    Warn,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub id: &'static str,
    pub severity: Severity,
    pub title: String,
    /// What the check found, as read.
    pub value: String,
    pub meaning: &'static str,
    pub advice: &'static str,
}

/// Everything doctor looks at, read once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostSnapshot {
    pub kernel: String,
    pub missing_capabilities: Vec<&'static str>,
    pub btf: bool,
    /// Where tracefs is mounted, or why it is unusable.
    pub tracefs: Option<String>,
    pub tracefs_error: Option<String>,
    pub tw_timer_handler: bool,
    pub missing_tracepoints: Vec<String>,
    pub time_wait: Option<u64>,
    /// `TcpExt` counters: `TW`, `TWRecycled`, `TWKilled`, `TCPTimeWaitOverflow`,
    /// and the aborts (`TCPAbortOn*`).
    pub netstat: BTreeMap<String, u64>,
    /// `Tcp` counters of `/proc/net/snmp`: `OutRsts`, `EstabResets`.
    pub tcp: BTreeMap<String, u64>,
    /// `TCPTimeWaitOverflow`'s growth over the one-second sample: whether
    /// overflow is happening now, not only at some time since boot.
    pub overflow_per_s: u64,
    pub port_range: Option<(u16, u16)>,
    pub reserved_ports: u64,
    pub tw_reuse: Option<u64>,
    pub tw_reuse_delay_ms: Option<u64>,
    pub max_tw_buckets: Option<u64>,
    pub fin_timeout: Option<u64>,
    pub timestamps: Option<u64>,
    pub tw_recycle_exists: bool,
    /// Processes holding CLOSE_WAIT sockets past the leak threshold.
    pub close_wait_leaks: Vec<CloseWaitLeak>,
    /// Network namespaces whose port settings differ from the host's.
    pub namespaces: Vec<NamespaceFacts>,
    pub leak_threshold_ns: u64,
}

/// A network namespace whose port settings differ from the host's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NamespaceFacts {
    pub netns: u64,
    /// Its name under `/run/netns`, else `pid:N` of a process in it.
    pub name: Option<String>,
    pub settings: sys::PortSettings,
    /// TIME_WAIT sockets in it now (its sockstat).
    pub time_wait: Option<u64>,
}

/// Every namespace but ours whose port settings are not `host`'s.
fn namespaces_unlike(host: Option<sys::PortSettings>) -> Vec<NamespaceFacts> {
    let own = crate::netns::own().ok();
    let all = crate::netns::all();
    all.iter()
        .filter(|ns| Some(ns.inode) != own)
        .filter_map(|ns| {
            let (settings, time_wait) = crate::netns::read_in(ns, || {
                (
                    sys::PortSettings::read().ok(),
                    sys::time_wait_sockets_now().ok(),
                )
            })
            .ok()?;
            let settings = settings?;
            (Some(settings) != host).then(|| NamespaceFacts {
                netns: ns.inode,
                name: crate::netns::name_of(ns.inode, &all),
                settings,
                time_wait,
            })
        })
        .collect()
}

/// A process that has not called `close()` on sockets whose peer hung up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CloseWaitLeak {
    pub pid: u32,
    pub comm: String,
    pub netns: u64,
    /// Its CLOSE_WAIT sockets older than the threshold.
    pub count: u64,
    /// An upper bound: the time since data last arrived on the oldest.
    pub oldest_age_ns: u64,
}

/// The CLOSE_WAIT sockets older than `threshold_ns`, per process and
/// namespace, most first.
#[must_use]
pub fn close_wait_leaks(
    sockets: &[crate::snapshot::SocketNow],
    threshold_ns: u64,
) -> Vec<CloseWaitLeak> {
    let old: Vec<_> = sockets
        .iter()
        .filter(|s| s.state == crate::event::TcpState::CloseWait && s.age_ns > threshold_ns)
        .cloned()
        .collect();
    crate::snapshot::group(&old, |_| None)
        .into_iter()
        .map(|g| CloseWaitLeak {
            pid: g.owner.map_or(0, |o| o.pid),
            comm: g
                .owner
                .map_or_else(|| "-".to_owned(), |o| o.comm.to_string()),
            netns: g.netns,
            count: g.count,
            oldest_age_ns: g.oldest_age_ns,
        })
        .collect()
}

const SYSCTL: &str = "/proc/sys/net/ipv4";

fn sysctl(name: &str) -> Option<u64> {
    sys::read_sysctl_u64(&format!("{SYSCTL}/{name}")).ok()
}

impl HostSnapshot {
    #[must_use]
    pub fn read(leak_threshold_ns: u64) -> Self {
        let missing_capabilities = sys::effective_capabilities().map_or_else(
            |_| vec!["(unreadable /proc/self/status)"],
            |caps| {
                // SAFETY: geteuid has no preconditions and cannot fail.
                let euid = unsafe { libc::geteuid() };
                sys::missing_capabilities(caps, euid, sys::kallsyms_open_to_all())
            },
        );
        let tracefs = tracefs::root();
        let missing_tracepoints = match &tracefs {
            Ok(root) => [
                ("sock", "inet_sock_set_state"),
                ("timer", "timer_start"),
                ("timer", "timer_expire_entry"),
                ("timer", "timer_cancel"),
                ("tcp", "tcp_sendmsg_locked"),
                ("tcp", "tcp_rcv_space_adjust"),
                ("sched", "sched_process_fork"),
            ]
            .iter()
            .filter(|(c, n)| !tracefs::has_event(root, c, n))
            .map(|(c, n)| format!("{c}:{n}"))
            .collect(),
            Err(_) => Vec::new(),
        };
        let read_netstat = || -> BTreeMap<String, u64> {
            fs::read_to_string("/proc/net/netstat")
                .map(|t| sys::parse_netstat(&t))
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, _)| {
                    matches!(
                        k.as_str(),
                        "TW" | "TWRecycled"
                            | "TWKilled"
                            | "TCPTimeWaitOverflow"
                            | "TCPAbortOnData"
                            | "TCPAbortOnClose"
                            | "TCPAbortOnMemory"
                            | "TCPAbortOnTimeout"
                            | "TCPAbortOnLinger"
                    )
                })
                .collect()
        };
        let overflows =
            |n: &BTreeMap<String, u64>| n.get("TCPTimeWaitOverflow").copied().unwrap_or(0);
        let before = read_netstat();
        std::thread::sleep(std::time::Duration::from_secs(1));
        let netstat = read_netstat();
        let overflow_per_s = overflows(&netstat).saturating_sub(overflows(&before));
        Self {
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            missing_capabilities,
            btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
            tracefs_error: tracefs.as_ref().err().map(|e| format!("{e:#}")),
            tracefs: tracefs.ok().map(|p| p.display().to_string()),
            tw_timer_handler: matches!(sys::kallsyms_lookup("tw_timer_handler"), Ok(Some(_))),
            missing_tracepoints,
            time_wait: crate::netns::time_wait_sockets_everywhere(),
            netstat,
            tcp: fs::read_to_string("/proc/net/snmp")
                .map(|t| sys::parse_snmp_tcp(&t))
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, _)| matches!(k.as_str(), "OutRsts" | "EstabResets"))
                .collect(),
            overflow_per_s,
            port_range: sys::local_port_range().ok(),
            reserved_ports: sys::reserved_ports(),
            tw_reuse: sysctl("tcp_tw_reuse"),
            tw_reuse_delay_ms: sysctl("tcp_tw_reuse_delay"),
            max_tw_buckets: sysctl("tcp_max_tw_buckets"),
            fin_timeout: sysctl("tcp_fin_timeout"),
            timestamps: sysctl("tcp_timestamps"),
            tw_recycle_exists: Path::new(SYSCTL).join("tcp_tw_recycle").exists(),
            close_wait_leaks: close_wait_leaks(&crate::snapshot::take().sockets, leak_threshold_ns),
            namespaces: namespaces_unlike(sys::PortSettings::read().ok()),
            leak_threshold_ns,
        }
    }

    /// Ephemeral ports `connect()` can use: the range less reserved ones.
    #[must_use]
    pub fn usable_ports(&self) -> Option<u64> {
        self.port_range
            .map(|range| sys::usable_ports(range, self.reserved_ports))
    }
}

fn finding(
    id: &'static str,
    severity: Severity,
    title: impl Into<String>,
    value: impl Into<String>,
    meaning: &'static str,
    advice: &'static str,
) -> Finding {
    Finding {
        id,
        severity,
        title: title.into(),
        value: value.into(),
        meaning,
        advice,
    }
}

/// The findings, most severe first within prerequisites and health.
#[must_use]
pub fn assess(h: &HostSnapshot) -> Vec<Finding> {
    let mut f = Vec::new();
    prerequisites(h, &mut f);
    hooks(h, &mut f);
    time_wait_health(h, &mut f);
    ports(h, &mut f);
    resets(h, &mut f);
    teardown_sysctls(h, &mut f);
    leaks(h, &mut f);
    namespaces(h, &mut f);
    f
}

/// Namespaces with settings of their own: their ports run out by their
/// own rules. A warning when TIME_WAIT holds half of one's usable ports.
fn namespaces(h: &HostSnapshot, f: &mut Vec<Finding>) {
    for ns in &h.namespaces {
        let s = &ns.settings;
        let usable = s.usable();
        let tw = ns.time_wait.unwrap_or(0);
        let severity = if tw * 2 >= usable {
            Severity::Warn
        } else {
            Severity::Info
        };
        let name = ns.name.clone().unwrap_or_else(|| ns.netns.to_string());
        f.push(finding(
            "netns_ports",
            severity,
            format!("network namespace {name} ({})", ns.netns),
            format!(
                "{usable} usable ports ({}-{}, {} reserved), tcp_tw_reuse {}, tcp_tw_reuse_delay {} ms, tcp_timestamps {}, tcp_max_tw_buckets {}; {tw} in TIME_WAIT now",
                s.port_range.0,
                s.port_range.1,
                s.reserved,
                s.tw_reuse,
                s.tw_reuse_delay_ms,
                s.timestamps,
                s.max_tw_buckets.map_or_else(|| "?".to_owned(), |n| n.to_string()),
            ),
            "Its settings differ from the host's: each namespace has its own port range and TIME_WAIT sysctls, and its clients run out of ports by them, not by the host's.",
            "Forecast it with `twtrace ports --netns NAME`; set its sysctls inside it (`ip netns exec NAME sysctl ...`, or the pod's securityContext.sysctls).",
        ));
    }
}

/// CLOSE_WAIT past the threshold: the application's bug, not a sysctl's.
fn leaks(h: &HostSnapshot, f: &mut Vec<Finding>) {
    let threshold = crate::units::duration(h.leak_threshold_ns);
    if h.close_wait_leaks.is_empty() {
        f.push(finding(
            "close_wait_leak",
            Severity::Ok,
            "CLOSE_WAIT leaks",
            format!("no socket in CLOSE_WAIT for over {threshold}"),
            "Every application closes its sockets after the peer hangs up.",
            "",
        ));
    }
    for leak in &h.close_wait_leaks {
        f.push(finding(
            "close_wait_leak",
            Severity::Warn,
            format!("CLOSE_WAIT leak: pid {} ({})", leak.pid, leak.comm),
            format!(
                "{} sockets in CLOSE_WAIT for over {threshold}, the oldest for up to {} (netns {})",
                leak.count,
                crate::units::duration(leak.oldest_age_ns),
                leak.netns
            ),
            "It has not called close() after the peer closed: a leak in the application, not a kernel setting. Each such socket holds its memory and file descriptor until the process closes it or exits.",
            "Find the code path that drops the connection without closing it (see `twtrace sockets --state close-wait --pid PID` for the peers); no sysctl shortens CLOSE_WAIT.",
        ));
    }
}

/// Can twtrace trace here at all, and what will it miss.
fn prerequisites(h: &HostSnapshot, f: &mut Vec<Finding>) {
    use Severity::{Error, Ok, Warn};
    f.push(if h.missing_capabilities.is_empty() {
        finding(
            "privileges",
            Ok,
            "privileges",
            "enough to load eBPF programs",
            "twtrace can load and attach its programs.",
            "",
        )
    } else {
        finding(
            "privileges",
            Error,
            "privileges",
            format!("missing {}", h.missing_capabilities.join(", ")),
            "twtrace cannot load eBPF programs as this user.",
            "Run it as root, or with CAP_BPF, CAP_PERFMON, CAP_SYSLOG (and CAP_DAC_READ_SEARCH when not uid 0).",
        )
    });
    f.push(match &h.tracefs {
        Some(path) => finding(
            "tracefs",
            Ok,
            "tracefs",
            path.clone(),
            "Tracepoint layouts can be read.",
            "",
        ),
        None => finding(
            "tracefs",
            Error,
            "tracefs",
            h.tracefs_error.clone().unwrap_or_default(),
            "Without tracefs twtrace cannot attach to tracepoints.",
            "Mount it: mount -t tracefs tracefs /sys/kernel/tracing",
        ),
    });
    f.push(if h.btf {
        finding("btf", Ok, "kernel BTF", "/sys/kernel/btf/vmlinux", "Struct layouts are known: orphaned FIN_WAIT2 is told from TIME_WAIT.", "")
    } else {
        finding("btf", Warn, "kernel BTF", "missing", "Orphaned FIN_WAIT2 mini-sockets will be reported as TIME_WAIT, and the slower classic tracepoint is used.",
            "Use a kernel built with CONFIG_DEBUG_INFO_BTF=y.")
    });
}

/// Whether TIME_WAIT can be followed, and which tracepoints are missing.
fn hooks(h: &HostSnapshot, f: &mut Vec<Finding>) {
    use Severity::{Error, Ok, Warn};
    f.push(if h.tw_timer_handler {
        finding(
            "tw_timer_handler",
            Ok,
            "symbol tw_timer_handler",
            "found in /proc/kallsyms",
            "TIME_WAIT mini-sockets can be followed.",
            "",
        )
    } else {
        finding(
            "tw_timer_handler",
            Warn,
            "symbol tw_timer_handler",
            "missing or hidden",
            "No TIME_WAIT tracking: the hand-over shows as a close.",
            "Run as root (kptr_restrict hides addresses from others).",
        )
    });
    let essential_missing = h
        .missing_tracepoints
        .iter()
        .any(|t| t == "sock:inet_sock_set_state");
    f.push(if h.missing_tracepoints.is_empty() {
        finding(
            "tracepoints",
            Ok,
            "tracepoints",
            "all present",
            "Every tracepoint twtrace uses exists.",
            "",
        )
    } else {
        finding(
            "tracepoints",
            if essential_missing { Error } else { Warn },
            "tracepoints",
            format!("missing {}", h.missing_tracepoints.join(", ")),
            "Missing tracepoints degrade one feature each (sock:inet_sock_set_state is essential).",
            "twtrace warns at start about what it cannot show.",
        )
    });
}

/// TIME_WAIT now against the kernel's limit, overflows, and the counters.
fn time_wait_health(h: &HostSnapshot, f: &mut Vec<Finding>) {
    use Severity::{Info, Ok, Warn};
    let tw = h.time_wait.unwrap_or(0);
    if let Some(max) = h.max_tw_buckets {
        let near = max > 0 && tw.saturating_mul(10) >= max.saturating_mul(9);
        f.push(finding("tcp_max_tw_buckets", if near { Warn } else { Ok }, "TIME_WAIT sockets vs tcp_max_tw_buckets",
            format!("{tw} of {max}"),
            "At the limit the kernel destroys nothing already in TIME_WAIT: new closers skip TIME_WAIT instead (TcpExtTCPTimeWaitOverflow), losing its protection against late segments of old connections.",
            "Remove the cause (connection pooling, keep-alive, letting clients close first); raising the limit only costs memory."));
    }
    let overflow = h.netstat.get("TCPTimeWaitOverflow").copied().unwrap_or(0);
    let severity = match (h.overflow_per_s, overflow) {
        (1.., _) => Warn,
        (0, 1..) => Info,
        _ => Ok,
    };
    f.push(finding(
        "overflow",
        severity,
        "TIME_WAIT overflows (TcpExtTCPTimeWaitOverflow)",
        format!("{overflow} since boot, {}/s now", h.overflow_per_s),
        "Connections that skipped TIME_WAIT because tcp_max_tw_buckets was reached.",
        if overflow > 0 {
            "See tcp_max_tw_buckets above."
        } else {
            ""
        },
    ));
    f.push(finding("tw_counters", Info, "TIME_WAIT counters since boot",
        format!("TW {}, TWRecycled {}, TWKilled {}",
            opt(h.netstat.get("TW").copied()), opt(h.netstat.get("TWRecycled").copied()), opt(h.netstat.get("TWKilled").copied())),
        if sys::tw_counters_count_births(&h.kernel) {
            "TW: TIME_WAIT mini-sockets born with a timeout over 4 s; TWKilled: born with a shorter one (an orphaned FIN_WAIT2 with a small tcp_fin_timeout) — together, every birth; TWRecycled: ports taken over by tcp_tw_reuse. None counts an expiry."
        } else {
            "On this kernel (before 5.18) TW counts TIME_WAIT mini-sockets whose timer fired after a timeout over 4 s, TWKilled those with a shorter one — expiries, not births, and no early end (a namespace deleted, a port reused); TWRecycled: ports taken over by tcp_tw_reuse."
        },
        ""));
}

/// A counter, or `unreadable`.
fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "unreadable".to_owned(), |v| v.to_string())
}

/// What the kernel counts of resets, since boot, and where twtrace says
/// who and why.
fn resets(h: &HostSnapshot, f: &mut Vec<Finding>) {
    let ext = |name: &str| opt(h.netstat.get(name).copied());
    f.push(finding(
        "resets",
        Severity::Info,
        "resets since boot",
        format!(
            "sent {} (OutRsts), connections reset {} (EstabResets); aborts: unread data {} (TCPAbortOnClose), zero linger or data after close {} (TCPAbortOnData), memory {}, timeout {}, linger {}",
            opt(h.tcp.get("OutRsts").copied()),
            opt(h.tcp.get("EstabResets").copied()),
            ext("TCPAbortOnClose"),
            ext("TCPAbortOnData"),
            ext("TCPAbortOnMemory"),
            ext("TCPAbortOnTimeout"),
            ext("TCPAbortOnLinger"),
        ),
        "EstabResets: connections that went from ESTABLISHED or CLOSE_WAIT straight to CLOSE, whichever side reset; OutRsts: every reset sent, those to closed ports included. This namespace only.",
        "`twtrace summary` names the process behind each reset and why (its ENDS column).",
    ));
}

/// The ephemeral ports TIME_WAIT can exhaust.
fn ports(h: &HostSnapshot, f: &mut Vec<Finding>) {
    use Severity::{Ok, Warn};
    let tw = h.time_wait.unwrap_or(0);
    if let Some(usable) = h.usable_ports() {
        let (lo, hi) = h.port_range.unwrap_or_default();
        let risky = usable > 0 && tw.saturating_mul(2) >= usable;
        f.push(finding("ports", if risky { Warn } else { Ok }, "ephemeral ports",
            format!("{usable} usable ({lo}-{hi}, {} reserved), {tw} sockets in TIME_WAIT", h.reserved_ports),
            "A TIME_WAIT socket holds its port only toward the same remote address and port; when one client talks to one server address, TIME_WAIT can exhaust the range and connect() fails with EADDRNOTAVAIL.",
            if risky { "Reuse connections (pooling, keep-alive), spread over more destination addresses, or widen ip_local_port_range; `twtrace ports` shows which destination is at risk." } else { "" }));
    }
}

/// The teardown sysctls, with what each really does on this kernel.
fn teardown_sysctls(h: &HostSnapshot, f: &mut Vec<Finding>) {
    use Severity::{Info, Ok, Warn};
    if let Some(reuse) = h.tw_reuse {
        let (severity, value) = match reuse {
            0 => (Info, "0: never reuse a TIME_WAIT port for connect()"),
            1 => (
                Ok,
                "1: connect() may reuse TIME_WAIT ports (with timestamps)",
            ),
            2 => (Info, "2: reuse for loopback connections only (the default)"),
            _ => (Info, "unknown value"),
        };
        f.push(finding("tcp_tw_reuse", severity, "tcp_tw_reuse", value.to_owned(),
            "Lets outgoing connect() take a port still in TIME_WAIT when timestamps prove it safe. It never helps a server's accepted sockets.",
            "Set 1 on hosts that open many outgoing connections to the same destination; it needs tcp_timestamps."));
        if reuse != 0 && h.timestamps == Some(0) {
            f.push(finding(
                "tcp_timestamps",
                Warn,
                "tcp_timestamps",
                "0",
                "tcp_tw_reuse relies on TCP timestamps; with them off it never triggers.",
                "Keep net.ipv4.tcp_timestamps=1.",
            ));
        }
    }
    if let Some(delay) = h.tw_reuse_delay_ms {
        f.push(finding(
            "tcp_tw_reuse_delay",
            Info,
            "tcp_tw_reuse_delay",
            format!("{delay} ms"),
            "How long a TIME_WAIT socket must have existed before tcp_tw_reuse may take its port.",
            "",
        ));
    }
    if let Some(fin) = h.fin_timeout {
        f.push(finding("tcp_fin_timeout", Info, "tcp_fin_timeout", format!("{fin} s"),
            "Bounds how long an orphaned socket waits in FIN_WAIT2 for the peer's FIN. It does not shorten TIME_WAIT, which is fixed at 60 s (TCP_TIMEWAIT_LEN, compiled in).",
            "Lowering it is no TIME_WAIT fix; twtrace shows FIN_WAIT2 and TIME_WAIT apart."));
    }
    f.push(if h.tw_recycle_exists {
        finding(
            "tcp_tw_recycle",
            Warn,
            "tcp_tw_recycle",
            "present (kernel older than 4.12)",
            "Recycling breaks clients behind NAT; it was removed in Linux 4.12.",
            "Keep it 0.",
        )
    } else {
        finding(
            "tcp_tw_recycle",
            Ok,
            "tcp_tw_recycle",
            "absent (removed in Linux 4.12)",
            "Advice to set it is obsolete: the sysctl does not exist on this kernel.",
            "",
        )
    });
}

/// The exit code doctor documents: 0 healthy, 4 warnings, 5 twtrace cannot
/// trace here.
#[must_use]
pub fn exit_code(findings: &[Finding]) -> u8 {
    match findings.iter().map(|f| f.severity).max() {
        Some(Severity::Error) => 5,
        Some(Severity::Warn) => 4,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> HostSnapshot {
        HostSnapshot {
            kernel: "6.18.0".into(),
            btf: true,
            tracefs: Some("/sys/kernel/tracing".into()),
            tw_timer_handler: true,
            time_wait: Some(100),
            netstat: [
                ("TW", 5),
                ("TWRecycled", 0),
                ("TWKilled", 0),
                ("TCPTimeWaitOverflow", 0),
                ("TCPAbortOnClose", 4),
                ("TCPAbortOnData", 5),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            tcp: [("OutRsts", 12), ("EstabResets", 9)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            port_range: Some((32768, 60999)),
            tw_reuse: Some(2),
            tw_reuse_delay_ms: Some(1000),
            max_tw_buckets: Some(131_072),
            fin_timeout: Some(60),
            timestamps: Some(1),
            ..HostSnapshot::default()
        }
    }

    #[test]
    fn a_close_wait_leak_names_the_process_and_warns() {
        let mut h = healthy();
        assert_eq!(severity_of(&assess(&h), "close_wait_leak"), Severity::Ok);
        h.leak_threshold_ns = 60_000_000_000;
        h.close_wait_leaks = vec![CloseWaitLeak {
            pid: 4242,
            comm: "leaky".into(),
            netns: 1,
            count: 25,
            oldest_age_ns: 300_000_000_000,
        }];
        let findings = assess(&h);
        let leak = findings.iter().find(|f| f.id == "close_wait_leak").unwrap();
        assert_eq!(leak.severity, Severity::Warn);
        assert!(leak.title.contains("4242 (leaky)"), "{}", leak.title);
        assert!(leak.value.contains("25 sockets"), "{}", leak.value);
        assert!(leak.meaning.contains("not a kernel setting"));
        assert_eq!(exit_code(&findings), 4);
    }

    #[test]
    fn a_namespace_with_its_own_port_range_is_reported_and_warns_when_half_full() {
        let mut h = healthy();
        let settings = sys::PortSettings {
            port_range: (40000, 40999),
            reserved: 0,
            tw_reuse: 0,
            tw_reuse_delay_ms: 1000,
            timestamps: 1,
            max_tw_buckets: Some(131_072),
        };
        h.namespaces = vec![NamespaceFacts {
            netns: 4_026_532_178,
            name: Some("pod-a".into()),
            settings,
            time_wait: Some(10),
        }];
        let finding = |h: &HostSnapshot| {
            assess(h)
                .into_iter()
                .find(|f| f.id == "netns_ports")
                .unwrap()
        };
        let f = finding(&h);
        assert_eq!(f.severity, Severity::Info);
        assert!(f.title.contains("pod-a"), "{}", f.title);
        assert!(
            f.value.starts_with("1000 usable ports (40000-40999"),
            "{}",
            f.value
        );
        h.namespaces[0].time_wait = Some(600);
        assert_eq!(finding(&h).severity, Severity::Warn);
    }

    fn severity_of(findings: &[Finding], id: &str) -> Severity {
        findings
            .iter()
            .find(|f| f.id == id)
            .map(|f| f.severity)
            .unwrap()
    }

    #[test]
    fn a_healthy_host_exits_0() {
        let f = assess(&healthy());
        assert_eq!(exit_code(&f), 0, "{f:#?}");
        assert_eq!(severity_of(&f, "tcp_tw_recycle"), Severity::Ok);
    }

    #[test]
    fn resets_are_counted_as_the_kernel_counts_them() {
        let f = assess(&healthy());
        let resets = f
            .iter()
            .find(|f| f.id == "resets")
            .expect("a resets finding");
        assert_eq!(resets.severity, Severity::Info);
        assert!(
            resets.value.starts_with(
                "sent 12 (OutRsts), connections reset 9 (EstabResets); aborts: unread data 4 (TCPAbortOnClose), zero linger or data after close 5 (TCPAbortOnData), memory unreadable"
            ),
            "{}",
            resets.value
        );
    }

    #[test]
    fn time_wait_counters_are_read_as_this_kernel_counts_them() {
        let meaning = |kernel: &str| {
            let h = HostSnapshot {
                kernel: kernel.into(),
                ..healthy()
            };
            let f = assess(&h);
            f.iter()
                .find(|f| f.id == "tw_counters")
                .expect("a tw_counters finding")
                .meaning
        };
        assert!(meaning("6.1.0-57-cloud-amd64").contains("together, every birth"));
        let old = meaning("5.10.0-46-cloud-amd64");
        assert!(old.contains("expiries, not births"), "{old}");
    }

    #[test]
    fn near_max_tw_buckets_and_overflow_warn() {
        let mut h = healthy();
        h.time_wait = Some(120_000);
        h.netstat.insert("TCPTimeWaitOverflow".into(), 3);
        h.overflow_per_s = 3;
        let f = assess(&h);
        assert_eq!(severity_of(&f, "tcp_max_tw_buckets"), Severity::Warn);
        assert_eq!(severity_of(&f, "overflow"), Severity::Warn);
        assert_eq!(severity_of(&f, "ports"), Severity::Warn);
        assert_eq!(exit_code(&f), 4);
    }

    #[test]
    fn overflow_long_ago_is_information_not_a_warning() {
        let mut h = healthy();
        h.netstat.insert("TCPTimeWaitOverflow".into(), 875_795);
        let f = assess(&h);
        assert_eq!(severity_of(&f, "overflow"), Severity::Info);
        assert_eq!(exit_code(&f), 0);
    }

    #[test]
    fn missing_prerequisites_exit_5() {
        let mut h = healthy();
        h.missing_capabilities = vec!["CAP_BPF"];
        assert_eq!(exit_code(&assess(&h)), 5);
        let mut h = healthy();
        h.missing_tracepoints = vec!["sock:inet_sock_set_state".into()];
        assert_eq!(exit_code(&assess(&h)), 5);
        let mut h = healthy();
        h.missing_tracepoints = vec!["tcp:tcp_sendmsg_locked".into()];
        assert_eq!(exit_code(&assess(&h)), 4);
    }

    #[test]
    fn advice_is_true_for_modern_kernels() {
        let f = assess(&healthy());
        let fin = f.iter().find(|f| f.id == "tcp_fin_timeout").unwrap();
        assert!(fin.meaning.contains("does not shorten TIME_WAIT"));
        let reuse = f.iter().find(|f| f.id == "tcp_tw_reuse").unwrap();
        assert!(reuse.meaning.contains("never helps a server"));
        let recycle = f.iter().find(|f| f.id == "tcp_tw_recycle").unwrap();
        assert!(recycle.value.contains("removed in Linux 4.12"));
        let mut h = healthy();
        h.tw_reuse = Some(1);
        h.timestamps = Some(0);
        assert_eq!(severity_of(&assess(&h), "tcp_timestamps"), Severity::Warn);
    }

    #[test]
    fn parses_netstat_and_reserved_ports() {
        let text =
            "TcpExt: SyncookiesSent TW TWRecycled\nTcpExt: 0 42 7\nIpExt: InNoRoutes\nIpExt: 0\n";
        let n = sys::parse_netstat(text);
        assert_eq!((n["TW"], n["TWRecycled"]), (42, 7));
        assert_eq!(sys::count_reserved_ports("\n"), 0);
        assert_eq!(sys::count_reserved_ports("1000,2000-2010\n"), 12);
        let mut h = healthy();
        h.reserved_ports = 232;
        assert_eq!(h.usable_ports(), Some(28_000));
    }
}
