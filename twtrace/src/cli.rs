//! Command-line interface.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::{grouping::GroupBy, loader::Family, output::Format};

#[derive(Debug, Parser)]
#[command(
    name = "twtrace",
    version,
    about = "Who closes TCP connections first, and how long sockets sit in each teardown state",
    long_about = "Who closes TCP connections first, and how long sockets sit in each teardown state.\n\nWithout a command: the live view (`twtrace top`).",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// More diagnostics on stderr: -v warnings and info from the kernel
    /// program, -vv debug.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Options of the live view, when no command is given.
    #[command(flatten)]
    pub top: TopArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Live view of who closes first, refreshed every second (the default).
    Top(TopArgs),
    /// Print every TCP teardown transition, with its owner and time in the
    /// previous state.
    Trace(TraceArgs),
    /// Trace for a while, then print per-state time distributions and who
    /// closed first, overall and per process.
    Summary(SummaryArgs),
    /// Run a command and record the teardown of its connections (and its
    /// children's) for CI: reports, thresholds, its exit status.
    Record(RecordArgs),
    /// Check the prerequisites and this host's TIME_WAIT health, with
    /// advice that is true for the running kernel (no tracing; seconds).
    /// Exit 0 healthy, 4 warnings, 5 twtrace cannot trace here.
    Doctor(DoctorArgs),
    /// Trace for a while, then forecast ephemeral-port exhaustion per local
    /// address and destination (ports held in TIME_WAIT, closes/s, time
    /// until full).
    Ports(PortsArgs),
    /// Headless: trace and serve Prometheus metrics until stopped (a node
    /// exporter for fleets; see deploy/).
    Serve(ServeArgs),
    /// Every socket in a teardown state now, in every network namespace,
    /// grouped by owner and state, with ages (no tracing; like `ss` with
    /// owners). Exit 4 when `--older-than` finds any.
    Sockets(SocketsArgs),
}

#[derive(Debug, Args)]
pub struct SocketsArgs {
    #[command(flatten)]
    pub filter: FilterArgs,

    /// Only this state (FIN_WAIT1, FIN_WAIT2, CLOSING, TIME_WAIT,
    /// CLOSE_WAIT, LAST_ACK; any case, `-` or `_`). Repeatable.
    #[arg(long = "state", value_name = "STATE", value_parser = parse_teardown_state)]
    pub states: Vec<crate::event::TcpState>,

    /// Only sockets in their state for longer than this; exit 4 if any.
    #[arg(long, value_name = "AGE", value_parser = parse_duration, allow_hyphen_values = true)]
    pub older_than: Option<Duration>,

    /// Also list every socket, not only the groups (text output).
    #[arg(short, long)]
    pub list: bool,

    #[command(flatten)]
    pub group: GroupArgs,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

/// A state a socket can sit in while torn down.
pub fn parse_teardown_state(text: &str) -> Result<crate::event::TcpState, String> {
    let name = text.trim().to_ascii_uppercase().replace('-', "_");
    crate::histogram::TEARDOWN_STATES
        .into_iter()
    .find(|s| s.name() == name)
    .ok_or_else(|| {
        format!(
            "`{text}` is not a teardown state: use FIN_WAIT1, FIN_WAIT2, CLOSING, TIME_WAIT, CLOSE_WAIT or LAST_ACK"
        )
    })
}

#[derive(Debug, Args)]
pub struct PortsArgs {
    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub capacity: CapacityArgs,

    /// How long to observe closes.
    #[arg(short, long, default_value = "10s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub duration: Duration,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// A socket in CLOSE_WAIT longer than this is reported as a leak.
    #[arg(long, value_name = "AGE", default_value = "60s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub leak_after: Duration,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

/// Which sockets to trace; applied in the kernel.
#[derive(Debug, Args, Clone)]
pub struct FilterArgs {
    /// Only sockets owned by this process (tgid). Repeatable.
    #[arg(long = "pid", value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,

    /// Only sockets with this local or remote port. Repeatable.
    #[arg(long = "port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,

    /// IPv4 only.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,

    /// IPv6 only.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,

    /// Only sockets of this network namespace: its inode (`lsns -t net`),
    /// its name (`ip netns list`) or `pid:N` (the namespace of process N).
    #[arg(long, value_name = "NETNS")]
    pub netns: Option<String>,
}

impl FilterArgs {
    #[must_use]
    pub fn family(&self) -> Option<Family> {
        match (self.ipv4, self.ipv6) {
            (true, _) => Some(Family::V4),
            (_, true) => Some(Family::V6),
            _ => None,
        }
    }
}

/// Kernel-side capacities.
#[derive(Debug, Args, Clone)]
pub struct CapacityArgs {
    /// Ring buffer size in KiB (a power of two). By default room for the
    /// ends of a quarter of the TIME_WAIT capacity at once (the kernel
    /// expires them in bursts), 4 to 64 MiB. Raise it if events are lost.
    #[arg(long, value_name = "KIB", value_parser = parse_ring_kib)]
    pub ring_kib: Option<u32>,

    /// Sockets the kernel remembers owners and timestamps for (LRU).
    #[arg(long, value_name = "N", default_value_t = twtrace_common::DEFAULT_MAX_SOCKETS,
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub max_sockets: u32,

    /// Most TIME_WAIT mini-sockets followed at once: by default the sum of
    /// every network namespace's `tcp_max_tw_buckets`, up to 262144 (about
    /// 19 MB of kernel memory per 100 000). Beyond it, ends are counted as
    /// ends without a record.
    #[arg(long, value_name = "N", default_value_t = twtrace_common::DEFAULT_MAX_TW,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_time_wait: u32,
}

/// What every tracing command takes.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub capacity: CapacityArgs,

    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,

    /// Stop after this long (e.g. 500ms, 5s, 2m, 1h); otherwise at Ctrl-C.
    #[arg(short, long, value_parser = parse_duration, allow_hyphen_values = true)]
    pub duration: Option<Duration>,

    #[command(flatten)]
    pub group: GroupArgs,
}

/// How reports group sockets.
#[derive(Debug, Args)]
pub struct GroupArgs {
    /// Group closes and time in state by process (pid), command (comm),
    /// systemd unit, container, Kubernetes pod, network namespace (netns)
    /// or cgroup. Names come from the owner's cgroup path, and pod and
    /// container names from the kubelet's /var/log/pods and
    /// /var/log/containers where the node has them.
    #[arg(long, value_enum, default_value_t = GroupBy::Pid)]
    pub by: GroupBy,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub run: RunArgs,

    /// Every state change, not only those into teardown states.
    #[arg(long)]
    pub all_states: bool,
}

#[derive(Debug, Args)]
pub struct SummaryArgs {
    #[command(flatten)]
    pub run: RunArgs,

    /// Also serve Prometheus/OpenMetrics metrics here while tracing
    /// (e.g. 127.0.0.1:9866).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub capacity: CapacityArgs,

    /// Where to serve the Prometheus/OpenMetrics endpoint.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:9866")]
    pub metrics_addr: std::net::SocketAddr,
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// Trace the whole machine, not only the command and its children.
    #[arg(long)]
    pub all: bool,

    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub capacity: CapacityArgs,

    /// Write the JSON report here (schema in the README).
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,

    /// Write an HdrHistogram interval log here, one tag per state.
    #[arg(long, value_name = "FILE")]
    pub hlog: Option<std::path::PathBuf>,

    /// Write github-action-benchmark `customSmallerIsBetter` JSON here.
    #[arg(long, value_name = "FILE")]
    pub bench_json: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub group: GroupArgs,

    /// Fail (exit 3) when this holds, e.g. `p99(FIN_WAIT2) > 50ms`,
    /// `count(TIME_WAIT) > 10000`, `count(reset_sent) > 0`, `lost > 0`.
    /// Repeatable.
    #[arg(long, value_name = "EXPR", value_parser = parse_threshold)]
    pub fail_if: Vec<crate::threshold::Threshold>,

    /// The command to run, after `--`.
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_threshold(text: &str) -> Result<crate::threshold::Threshold, String> {
    text.parse()
        .map_err(|e: crate::threshold::ParseError| format!("{e} in `{text}`"))
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub capacity: CapacityArgs,

    /// Refresh interval.
    #[arg(short, long, default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub interval: Duration,

    #[command(flatten)]
    pub group: GroupArgs,

    /// Print this many tables, then exit (plain-text mode).
    #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Stop after this long.
    #[arg(short, long, value_parser = parse_duration, allow_hyphen_values = true)]
    pub duration: Option<Duration>,

    /// Plain text every interval even on a terminal, like `top -b`
    /// (automatic when stdout is not a terminal).
    #[arg(short, long)]
    pub batch: bool,

    /// Also serve Prometheus/OpenMetrics metrics here.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Parses `500ms`, `5s`, `2m`, `1h`, `1.5s`, and a bare number as seconds
/// (as `top -d 1`, `watch -n 1` and `vmstat 1` take it). Rejects zero and
/// negatives.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.starts_with('-') {
        return Err(format!("`{text}` must be a positive duration"));
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 500ms, 5s, 2m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{text}`: use ms, s, m or h"
            ));
        }
    };
    if !(seconds > 0.0 && seconds < 1e9) {
        return Err(format!("`{text}` must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_ring_kib(text: &str) -> Result<u32, String> {
    let kib: u32 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number of KiB"))?;
    if !kib.is_power_of_two() || !(4..=1_048_576).contains(&kib) {
        return Err(format!(
            "{kib} KiB is not a power of two between 4 and 1048576"
        ));
    }
    Ok(kib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_mins(2)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_hours(1)));
        // A bare number is seconds, as top, watch and vmstat take it.
        assert_eq!(parse_duration("1"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
    }

    #[test]
    fn bad_durations_are_rejected_with_a_reason() {
        for bad in ["-5s", "abc", "0", "0s", "5x", "", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad} was accepted");
        }
        assert!(parse_duration("0").unwrap_err().contains("positive"));
    }

    #[test]
    fn ring_size_must_be_a_power_of_two() {
        assert_eq!(parse_ring_kib("256"), Ok(256));
        assert!(parse_ring_kib("100").is_err());
        assert!(parse_ring_kib("2").is_err());
        assert!(parse_ring_kib("-1").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn no_command_is_the_live_view_with_its_filters() {
        let cli = Cli::try_parse_from(["twtrace", "--pid", "42", "-n", "3"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.top.filter.pids, [42]);
        assert_eq!(cli.top.count, Some(3));
        assert_eq!(cli.top.interval, Duration::from_secs(1));
        let explicit = Cli::try_parse_from(["twtrace", "top", "--interval", "500ms"]).unwrap();
        assert!(
            matches!(explicit.command, Some(Command::Top(ref a)) if a.interval == Duration::from_millis(500))
        );
    }

    #[test]
    fn ipv4_and_ipv6_conflict() {
        let err = Cli::try_parse_from(["twtrace", "trace", "-4", "-6"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn repeated_filters_accumulate() {
        let cli = Cli::try_parse_from([
            "twtrace", "trace", "--pid", "1", "--pid", "2", "--port", "80",
        ])
        .unwrap();
        let Some(Command::Trace(args)) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(args.run.filter.pids, [1, 2]);
        assert_eq!(args.run.filter.ports, [80]);
        assert!(Cli::try_parse_from(["twtrace", "trace", "--port", "0"]).is_err());
        assert!(Cli::try_parse_from(["twtrace", "trace", "--port", "70000"]).is_err());
        assert!(Cli::try_parse_from(["twtrace", "trace", "--pid", "0"]).is_err());
    }
}
