//! What the running kernel offers twtrace, found once before loading:
//! tracepoint record layouts (tracefs), struct offsets (BTF, parsed once),
//! the TIME_WAIT timer's handler (kallsyms) and the sysctls that size the
//! maps. `KernelFacts::from_sources` is pure, so each kernel's quirks are
//! unit-tested from fixture files; `KernelFacts::probe` reads the host.

use std::path::Path;

use anyhow::Context;
use twtrace_common::{
    MAX_KERNEL_RESET_REASONS, SetStateLayout, SockLayout, TwConfig, reset_reason,
};

use crate::{btf::Btf, netns, sys, tracefs};

/// Member offsets of kernel structs: the running kernel's BTF, or a
/// table in tests.
pub trait StructLayouts {
    fn member_offset(&self, name: &str, member: &str) -> anyhow::Result<u32>;
}

impl StructLayouts for Btf {
    fn member_offset(&self, name: &str, member: &str) -> anyhow::Result<u32> {
        Btf::member_offset(self, name, member)
    }
}

/// The raw inputs, each as the host gives it (or why it could not).
pub struct Sources<'a> {
    pub set_state_format: &'a str,
    pub timer_start_format: anyhow::Result<String>,
    pub fork_format: anyhow::Result<String>,
    pub send_reset_format: anyhow::Result<String>,
    pub layouts: anyhow::Result<&'a dyn StructLayouts>,
    /// Address of `tw_timer_handler`.
    pub tw_timer_handler: anyhow::Result<u64>,
    /// `net.ipv4.tcp_max_tw_buckets`, summed over every network namespace.
    pub max_tw_buckets: Option<u64>,
    /// The cap on the map's size (`--max-time-wait`).
    pub max_time_wait: u32,
    /// TIME_WAIT sockets alive now in every namespace (`/proc/net/sockstat`).
    pub time_wait_now: Option<u64>,
    /// `kernel.perf_event_paranoid`.
    pub perf_event_paranoid: Option<u64>,
}

/// Everything loading and attaching need to know about this kernel.
#[derive(Clone, Debug)]
pub struct KernelFacts {
    pub set_state: SetStateLayout,
    /// `struct sock` offsets for the raw `inet_sock_set_state` program;
    /// `None`: the classic tracepoint is used.
    pub sock: Option<SockLayout>,
    /// `TwConfig::DISABLED` when TIME_WAIT cannot be followed.
    pub time_wait: TwConfig,
    /// Offset of `child_pid` in `sched:sched_process_fork`.
    pub fork_child_pid: Option<u16>,
    /// What `tcp:tcp_send_reset` says of why a reset was sent.
    pub reset_reasons: ResetReasons,
    /// Entries for the mini-socket map.
    pub tw_capacity: u32,
    pub tw_alive_at_start: u64,
    pub perf_event_paranoid: Option<u64>,
    /// What is only partly available, one line each.
    pub warnings: Vec<String>,
}

impl KernelFacts {
    /// Reads this host's tracefs, BTF, kallsyms and sysctls.
    /// `max_time_wait` caps the mini-socket map's size.
    pub fn probe(tracefs_root: &Path, max_time_wait: u32) -> anyhow::Result<Self> {
        let format =
            |category: &str, event: &str| tracefs::read_format_text(tracefs_root, category, event);
        let set_state_format = format("sock", "inet_sock_set_state")?;
        let btf = Btf::from_sys_fs();
        let layouts: anyhow::Result<&dyn StructLayouts> = match &btf {
            Ok(btf) => Ok(btf),
            Err(error) => Err(anyhow::anyhow!("{error:#}")),
        };
        let tw_timer_handler = sys::kallsyms_lookup("tw_timer_handler").and_then(|found| {
            found.context(
                "symbol tw_timer_handler not in /proc/kallsyms (or its address is hidden: run as root)",
            )
        });
        Self::from_sources(&Sources {
            set_state_format: &set_state_format,
            timer_start_format: format("timer", "timer_start"),
            fork_format: format("sched", "sched_process_fork"),
            send_reset_format: format("tcp", "tcp_send_reset"),
            layouts,
            tw_timer_handler,
            max_tw_buckets: netns::sum_over_all(|| {
                sys::read_sysctl_u64("/proc/sys/net/ipv4/tcp_max_tw_buckets").ok()
            }),
            max_time_wait,
            time_wait_now: netns::sum_over_all(|| sys::time_wait_sockets_now().ok()),
            perf_event_paranoid: sys::read_sysctl_u64("/proc/sys/kernel/perf_event_paranoid").ok(),
        })
    }

    /// The facts from their sources; fails only when twtrace cannot trace
    /// at all (no usable `inet_sock_set_state`).
    pub fn from_sources(sources: &Sources<'_>) -> anyhow::Result<Self> {
        let set_state = set_state_layout(&tracefs::parse_format(sources.set_state_format))?;
        let mut warnings = Vec::new();
        let time_wait = match time_wait_config(sources) {
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
        };
        let fork_child_pid = sources.fork_format.as_ref().ok().and_then(|text| {
            tracefs::parse_format(text)
                .offset("sched:sched_process_fork", "child_pid", 4)
                .ok()
        });
        // Each network namespace holds up to its tcp_max_tw_buckets
        // mini-sockets; one map serves them all, up to the cap.
        let tw_capacity = sources
            .max_tw_buckets
            .map_or(sources.max_time_wait, |n| {
                u32::try_from(n)
                    .unwrap_or(u32::MAX)
                    .min(sources.max_time_wait)
            })
            .max(1024);
        let sock = sources
            .layouts
            .as_ref()
            .ok()
            .and_then(|l| sock_layout(*l).ok());
        if sock.is_none_or(|l| l.net == 0 || l.net_inum == 0) {
            warnings.push(
                "network namespaces unknown (no BTF for struct sock / struct net): events carry no namespace, so sockets in other namespaces are resolved only when they end".to_owned(),
            );
        }
        let reset_reasons = sources
            .send_reset_format
            .as_deref()
            .map_or_else(|_| ResetReasons::default(), ResetReasons::from_format);
        // Linux 6.10 gave tcp_send_reset its reason and made it fire for
        // every reset; before, only for those a full socket sends.
        if sources.send_reset_format.is_ok() && !reset_reasons.given {
            warnings.push(
                "this kernel (before 6.10) does not trace resets sent for a TIME_WAIT socket or for no socket (a SYN to a closed port), nor say why a reset was sent: resets_without_connection misses those, and a reset sent before a close (keepalive, memory) has reason `unknown`".to_owned(),
            );
        }
        Ok(Self {
            set_state,
            sock,
            time_wait,
            fork_child_pid,
            reset_reasons,
            tw_capacity,
            tw_alive_at_start: sources.time_wait_now.unwrap_or(0),
            perf_event_paranoid: sources.perf_event_paranoid,
            warnings,
        })
    }

    #[must_use]
    pub fn time_wait_possible(&self) -> bool {
        self.time_wait.handler != 0
    }
}

fn set_state_layout(format: &tracefs::EventFormat) -> anyhow::Result<SetStateLayout> {
    const EVENT: &str = "sock:inet_sock_set_state";
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

/// Offsets in `struct sock` for the raw `inet_sock_set_state` program.
/// Fails where `sk_protocol` is a bitfield (before 5.6): the classic
/// tracepoint is used there.
fn sock_layout(btf: &dyn StructLayouts) -> anyhow::Result<SockLayout> {
    let common = btf.member_offset("sock", "__sk_common")?;
    let at = |member: &str| -> anyhow::Result<u16> {
        Ok(u16::try_from(
            common + btf.member_offset("sock_common", member)?,
        )?)
    };
    let sock_member = |member: &str| -> anyhow::Result<u16> {
        Ok(u16::try_from(btf.member_offset("sock", member)?)?)
    };
    let tcp_member = |member: &str| -> anyhow::Result<u16> {
        Ok(u16::try_from(btf.member_offset("tcp_sock", member)?)?)
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
        snd_nxt: u16::try_from(btf.member_offset("tcp_sock", "snd_nxt")?)?,
        // Without them events carry no namespace; everything else works.
        net: at("skc_net").unwrap_or(0),
        net_inum: net_inum_offset(btf).unwrap_or(0),
        num: at("skc_num")?,
        // Without them a connection's end is told from fewer facts.
        err: sock_member("sk_err").unwrap_or(0),
        sk_flags: at("skc_flags").unwrap_or(0),
        lingertime: sock_member("sk_lingertime").unwrap_or(0),
        rcv_nxt: tcp_member("rcv_nxt").unwrap_or(0),
        copied_seq: tcp_member("copied_seq").unwrap_or(0),
        state: at("skc_state").unwrap_or(0),
        skb_dev: member_u16(btf, "sk_buff", "dev").unwrap_or(0),
        dev_net: member_u16(btf, "net_device", "nd_net").unwrap_or(0),
    })
}

fn member_u16(btf: &dyn StructLayouts, name: &str, member: &str) -> anyhow::Result<u16> {
    Ok(u16::try_from(btf.member_offset(name, member)?)?)
}

/// The kernel's reasons for a reset (`enum sk_rst_reason`, 6.10+), as the
/// tracepoint's format lists them: which value is which of twtrace's codes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResetReasons {
    /// Whether `tcp_send_reset` passes a reason at all.
    pub given: bool,
    /// `(kernel value, reset_reason code)` for each value it names.
    pub codes: Vec<(u32, u8)>,
}

impl ResetReasons {
    /// From the format's `reason` field and its `__print_symbolic` table
    /// (`{ 11, "TCP_ABORT_ON_CLOSE" }`, …).
    fn from_format(text: &str) -> Self {
        let given = tracefs::parse_format(text).fields.contains_key("reason");
        let table = text
            .split_once("REC->reason,")
            .map_or("", |(_, after)| after);
        let codes = table
            .split('{')
            .skip(1)
            .filter_map(|entry| {
                let (value, rest) = entry.split_once(',')?;
                let value: u32 = value.trim().parse().ok()?;
                let name = rest.split('"').nth(1)?;
                (value < MAX_KERNEL_RESET_REASONS)
                    .then(|| (value, reset_reason::of_kernel_name(name.as_bytes())))
            })
            .collect();
        Self { given, codes }
    }
}

/// `offsetof(struct net, ns.inum)`: the namespace's inode number.
fn net_inum_offset(btf: &dyn StructLayouts) -> anyhow::Result<u16> {
    Ok(u16::try_from(
        btf.member_offset("net", "ns")? + btf.member_offset("ns_common", "inum")?,
    )?)
}

/// What following TIME_WAIT mini-sockets needs on this kernel, with
/// warnings for what is only partly available.
fn time_wait_config(sources: &Sources<'_>) -> anyhow::Result<(TwConfig, Vec<String>)> {
    let handler = *sources
        .tw_timer_handler
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let text = sources
        .timer_start_format
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let start = tracefs::parse_format(text);
    let at = |name: &str| start.offset("timer:timer_start", name, 8);
    let mut config = TwConfig {
        handler,
        start_timer: at("timer")?,
        start_function: at("function")?,
        start_expires: at("expires")?,
        start_now: at("now")?,
        // Older kernels (6.1) lack it; the expiry test then bounds by a
        // bucket guess.
        start_bucket_expiry: at("bucket_expiry").unwrap_or(0),
        // The field came with the raw tracepoint's second argument.
        raw_start_has_bucket: u8::from(at("bucket_expiry").is_ok()),
        ..TwConfig::DISABLED
    };
    let mut warnings = Vec::new();
    match sources
        .layouts
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|l| timer_offsets(*l, &mut config))
    {
        Ok(()) => config.has_btf = 1,
        Err(error) => warnings.push(format!(
            "kernel BTF unusable ({error:#}): orphaned FIN_WAIT2 mini-sockets are reported as TIME_WAIT"
        )),
    }
    Ok((config, warnings))
}

/// Where the mini-socket's fields sit relative to its embedded timer.
fn timer_offsets(btf: &dyn StructLayouts, config: &mut TwConfig) -> anyhow::Result<()> {
    let timer = btf.member_offset("inet_timewait_sock", "tw_timer")?;
    // The mini-socket starts with the same `struct sock_common` as a socket.
    let common = btf.member_offset("inet_timewait_sock", "__tw_common")?;
    let from_timer = |offset: u32| i16::try_from(i64::from(offset) - i64::from(timer));
    config.timer_function_off = u16::try_from(btf.member_offset("timer_list", "function")?)?;
    config.timer_expires_off = u16::try_from(btf.member_offset("timer_list", "expires")?)?;
    config.substate_from_timer =
        from_timer(btf.member_offset("inet_timewait_sock", "tw_substate")?)?;
    config.sport_from_timer = from_timer(common + btf.member_offset("sock_common", "skc_num")?)?;
    config.dport_from_timer = from_timer(common + btf.member_offset("sock_common", "skc_dport")?)?;
    config.family_from_timer =
        from_timer(common + btf.member_offset("sock_common", "skc_family")?)?;
    // `tw_snd_nxt`: kept in the common part (a union member there).
    config.snd_nxt_from_timer =
        from_timer(common + btf.member_offset("sock_common", "skc_tw_snd_nxt")?)?;
    // Only the `--netns` filter needs it, for mini-sockets without a record.
    config.net_from_timer = btf
        .member_offset("sock_common", "skc_net")
        .ok()
        .and_then(|net| from_timer(common + net).ok())
        .unwrap_or(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const SET_STATE_6_18: &str = include_str!("fixtures/inet_sock_set_state-6.18.format");
    const TIMER_START_6_18: &str = include_str!("fixtures/timer_start-6.18.format");
    const TIMER_START_6_1: &str = include_str!("fixtures/timer_start-6.1.format");
    const FORK_6_18: &str = include_str!("fixtures/sched_process_fork-6.18.format");
    const SEND_RESET_6_18: &str = include_str!("fixtures/tcp_send_reset-6.18.format");
    /// `struct member offset` lines, read from 6.18's BTF.
    const BTF_6_18: &str = include_str!("fixtures/btf-offsets-6.18.txt");

    struct Table(HashMap<(String, String), u32>);

    impl Table {
        fn parse(text: &str) -> Self {
            Self(
                text.lines()
                    .filter_map(|line| {
                        let mut words = line.split_whitespace();
                        let (s, m, o) = (words.next()?, words.next()?, words.next()?);
                        Some(((s.to_owned(), m.to_owned()), o.parse().ok()?))
                    })
                    .collect(),
            )
        }
    }

    impl StructLayouts for Table {
        fn member_offset(&self, name: &str, member: &str) -> anyhow::Result<u32> {
            self.0
                .get(&(name.to_owned(), member.to_owned()))
                .copied()
                .with_context(|| format!("no {name}.{member}"))
        }
    }

    fn sources<'a>(timer_start: &str, layouts: Option<&'a Table>) -> Sources<'a> {
        Sources {
            set_state_format: SET_STATE_6_18,
            timer_start_format: Ok(timer_start.to_owned()),
            fork_format: Ok(FORK_6_18.to_owned()),
            send_reset_format: Ok(SEND_RESET_6_18.to_owned()),
            layouts: layouts
                .map(|t| t as &dyn StructLayouts)
                .context("no BTF here"),
            tw_timer_handler: Ok(0xffff_ffff_8100_0000),
            max_tw_buckets: Some(131_072),
            max_time_wait: 262_144,
            time_wait_now: Some(7),
            perf_event_paranoid: Some(2),
        }
    }

    #[test]
    fn kernel_6_18_gives_everything() {
        let btf = Table::parse(BTF_6_18);
        let facts = KernelFacts::from_sources(&sources(TIMER_START_6_18, Some(&btf))).unwrap();
        assert_eq!(facts.set_state, SetStateLayout::DEFAULT);
        let sock = facts.sock.unwrap();
        assert_eq!((sock.net, sock.net_inum), (48, 176));
        assert_eq!(facts.time_wait.start_bucket_expiry, 32);
        assert_eq!(facts.time_wait.raw_start_has_bucket, 1);
        assert!(facts.time_wait.snd_nxt_from_timer < 0);
        assert!(facts.time_wait.net_from_timer < 0);
        assert_eq!(facts.time_wait.start_now, 40);
        assert_eq!(facts.time_wait.has_btf, 1);
        assert!(facts.time_wait.substate_from_timer < 0);
        assert_eq!(facts.fork_child_pid, Some(20));
        assert_eq!((facts.tw_capacity, facts.tw_alive_at_start), (131_072, 7));
        assert!(facts.warnings.is_empty(), "{:?}", facts.warnings);
        assert_eq!(
            (sock.err, sock.sk_flags, sock.lingertime, sock.state),
            (284, 96, 576, 18)
        );
        assert_eq!((sock.rcv_nxt, sock.copied_seq), (1664, 1464));
        assert_eq!((sock.skb_dev, sock.dev_net), (16, 264));
    }

    #[test]
    fn reset_reasons_come_from_the_tracepoint_format() {
        let reasons = ResetReasons::from_format(SEND_RESET_6_18);
        assert!(reasons.given);
        let code = |value| reasons.codes.iter().find(|(v, _)| *v == value).map(|c| c.1);
        assert_eq!(code(1), Some(reset_reason::NO_SOCKET));
        assert_eq!(code(9), Some(reset_reason::TIME_WAIT_SOCKET));
        assert_eq!(code(11), Some(reset_reason::UNREAD_DATA));
        assert_eq!(code(14), Some(reset_reason::STATE));
        assert_eq!(code(15), Some(reset_reason::KEEPALIVE_TIMEOUT));
        assert_eq!(code(2), Some(reset_reason::INVALID_SEGMENT));
        assert_eq!(code(17), Some(reset_reason::OTHER));
        assert_eq!(reasons.codes.len(), 26);
        // Before 6.10: no reason field, nothing to translate, and a
        // warning that says what goes unseen.
        let old = SEND_RESET_6_18.replace("reason", "other");
        assert!(!ResetReasons::from_format(&old).given);
        let btf = Table::parse(BTF_6_18);
        let mut s = sources(TIMER_START_6_18, Some(&btf));
        s.send_reset_format = Ok(old);
        let facts = KernelFacts::from_sources(&s).unwrap();
        assert_eq!(facts.warnings.len(), 1, "{:?}", facts.warnings);
        assert!(facts.warnings[0].contains("a SYN to a closed port"));
    }

    #[test]
    fn kernel_6_1_timer_start_has_no_bucket_expiry() {
        let btf = Table::parse(BTF_6_18);
        let facts = KernelFacts::from_sources(&sources(TIMER_START_6_1, Some(&btf))).unwrap();
        assert_eq!(facts.time_wait.start_bucket_expiry, 0);
        assert_eq!(facts.time_wait.raw_start_has_bucket, 0);
        assert_eq!(facts.time_wait.start_now, 32);
        assert!(facts.time_wait_possible());
    }

    #[test]
    fn without_btf_the_classic_tracepoint_and_a_warning() {
        let facts = KernelFacts::from_sources(&sources(TIMER_START_6_18, None)).unwrap();
        assert_eq!(facts.sock, None);
        assert_eq!(facts.time_wait.has_btf, 0);
        assert!(facts.time_wait_possible());
        assert_eq!(facts.warnings.len(), 2);
        assert!(
            facts.warnings[0].contains("orphaned FIN_WAIT2"),
            "{:?}",
            facts.warnings
        );
        assert!(facts.warnings[1].contains("network namespaces unknown"));
    }

    #[test]
    fn without_the_handler_no_time_wait_and_why() {
        let mut s = sources(TIMER_START_6_18, None);
        s.tw_timer_handler = Err(anyhow::anyhow!(
            "symbol tw_timer_handler not in /proc/kallsyms"
        ));
        s.max_tw_buckets = None;
        let facts = KernelFacts::from_sources(&s).unwrap();
        assert!(!facts.time_wait_possible());
        assert_eq!(facts.tw_capacity, 262_144);
        s.max_tw_buckets = Some(4 * 131_072);
        let facts = KernelFacts::from_sources(&s).unwrap();
        assert_eq!(facts.tw_capacity, 262_144, "capped");
        assert!(
            facts.warnings[0]
                .starts_with("TIME_WAIT tracking unavailable (symbol tw_timer_handler")
        );
    }

    #[test]
    fn a_set_state_record_without_its_fields_is_an_error() {
        let mut s = sources(TIMER_START_6_18, None);
        s.set_state_format = TIMER_START_6_18;
        let error = KernelFacts::from_sources(&s).unwrap_err();
        assert!(
            format!("{error:#}").contains("inet_sock_set_state"),
            "{error:#}"
        );
    }
}
