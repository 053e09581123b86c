//! `twtrace record`'s outputs: the JSON report, the HdrHistogram interval
//! log and the github-action-benchmark file.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    time::{Duration, SystemTime},
};

use anyhow::Context;
use hdrhistogram::serialization::{
    V2DeflateSerializer,
    interval_log::{IntervalLogWriterBuilder, Tag},
};
use serde::Serialize;

use crate::{
    grouping::GroupBy,
    histogram::{StateStats, TEARDOWN_STATES, TeardownStats},
    output::summary::{
        EndsReport, GroupReport, Lost, NamespaceReport, ProcessReport, SummaryReport,
    },
    threshold::{Measured, Metric, Stat, Threshold},
};

/// Schema version of the JSON report; bumped on incompatible changes.
pub const SCHEMA: &str = "twtrace-record/2";

#[derive(Clone, Debug, Serialize)]
pub struct ThresholdResult {
    pub expr: String,
    pub actual: u64,
    pub broken: bool,
}

/// The JSON report (`--json`); documented in the README.
#[derive(Clone, Debug, Serialize)]
pub struct RecordReport {
    pub schema: &'static str,
    pub twtrace_version: &'static str,
    pub command: Vec<String>,
    /// `record --all`: the whole machine, not only the command's processes.
    pub all: bool,
    pub start_unix_ns: u128,
    pub duration_ns: u64,
    pub kernel: String,
    /// The command's exit code, or `null` when a signal ended it.
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    pub active_closes: u64,
    pub passive_closes: u64,
    /// Most TIME_WAIT mini-sockets the command held at once, born while
    /// recorded; orphaned ones still waiting in FIN_WAIT2 count too (each
    /// holds its port just the same).
    pub time_wait_peak: u64,
    /// Closes that skipped TIME_WAIT (`tcp_max_tw_buckets` full), as seen,
    /// and by the kernel's count (`TcpExtTCPTimeWaitOverflow`).
    pub time_wait_skipped: u64,
    pub time_wait_overflows_kernel: Option<u64>,
    pub events: u64,
    /// How the connections seen ending ended, and the resets sent by reason.
    pub ends: EndsReport,
    /// Resets sent that ended no connection (a SYN to a closed port, …).
    pub resets_without_connection: BTreeMap<&'static str, u64>,
    pub lost: Lost,
    pub states: Vec<StateStats>,
    pub processes: Vec<ProcessReport>,
    pub namespaces: Vec<NamespaceReport>,
    /// What `groups` groups by (`--by`).
    pub by: GroupBy,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupReport>,
    pub thresholds: Vec<ThresholdResult>,
}

impl RecordReport {
    /// Everything but the thresholds, which are checked against it next.
    #[must_use]
    pub fn new(summary: SummaryReport, meta: RunMeta, time_wait_peak: u64) -> Self {
        Self {
            schema: SCHEMA,
            twtrace_version: env!("CARGO_PKG_VERSION"),
            command: meta.command,
            all: meta.all,
            start_unix_ns: meta
                .start
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            duration_ns: summary.duration_ns,
            kernel: meta.kernel,
            exit_code: meta.exit_code,
            exit_signal: meta.exit_signal,
            active_closes: summary.active_closes,
            passive_closes: summary.passive_closes,
            time_wait_peak,
            time_wait_skipped: summary.time_wait_skipped,
            time_wait_overflows_kernel: summary.time_wait_overflows_kernel,
            events: summary.events,
            ends: summary.ends,
            resets_without_connection: summary.resets_without_connection,
            lost: summary.lost,
            states: summary.states,
            processes: summary.processes,
            namespaces: summary.namespaces,
            by: summary.by,
            groups: summary.groups,
            thresholds: Vec::new(),
        }
    }

    /// Checks every threshold; returns whether any is broken.
    pub fn check(&mut self, thresholds: &[Threshold]) -> bool {
        self.thresholds = thresholds
            .iter()
            .map(|t| {
                let (actual, broken) = t.check(&*self);
                ThresholdResult {
                    expr: t.text.clone(),
                    actual,
                    broken,
                }
            })
            .collect();
        self.thresholds.iter().any(|t| t.broken)
    }

    pub fn write_json(&self, out: &mut impl Write) -> io::Result<()> {
        serde_json::to_writer_pretty(&mut *out, self)?;
        out.write_all(b"\n")
    }

    /// github-action-benchmark's `customSmallerIsBetter`: p50 and p99 of
    /// each state seen, in ns, and the events lost.
    pub fn write_bench_json(&self, out: &mut impl Write) -> io::Result<()> {
        #[derive(Serialize)]
        struct Entry {
            name: String,
            unit: &'static str,
            value: u64,
            extra: String,
        }
        let mut entries = Vec::new();
        for s in &self.states {
            for (stat, value) in [("p50", s.p50_ns), ("p99", s.p99_ns)] {
                entries.push(Entry {
                    name: format!("{} {stat}", s.state),
                    unit: "ns",
                    value,
                    extra: format!("{} sockets", s.count),
                });
            }
        }
        entries.push(Entry {
            name: "events lost".into(),
            unit: "events",
            value: self.lost.events,
            extra: String::new(),
        });
        serde_json::to_writer_pretty(&mut *out, &entries)?;
        out.write_all(b"\n")
    }
}

impl Measured for RecordReport {
    fn measure(&self, metric: Metric) -> u64 {
        let state_stat = |stat, state: crate::event::TcpState| {
            let Some(s) = self.states.iter().find(|s| s.state == state.name()) else {
                return 0;
            };
            match stat {
                Stat::Count => s.entered,
                Stat::Now => s.now,
                Stat::Oldest => s.oldest_now_ns,
                Stat::Min => s.min_ns,
                Stat::P50 => s.p50_ns,
                Stat::P90 => s.p90_ns,
                Stat::P99 => s.p99_ns,
                Stat::P999 => s.p999_ns,
                Stat::Max => s.max_ns,
            }
        };
        match metric {
            Metric::Lost => self.lost.events,
            Metric::ActiveCloses => self.active_closes,
            Metric::PassiveCloses => self.passive_closes,
            Metric::TimeWaitPeak => self.time_wait_peak,
            Metric::Ended(kind) => self.ends.by_end.get(kind.name()).copied().unwrap_or(0),
            Metric::ResetsWithoutConnection => self.resets_without_connection.values().sum(),
            Metric::State(stat, state) => state_stat(stat, state),
        }
    }
}

/// What is known about the run besides the measurements.
#[derive(Clone, Debug)]
pub struct RunMeta {
    pub command: Vec<String>,
    pub all: bool,
    pub start: SystemTime,
    pub kernel: String,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
}

/// Writes one interval per teardown state covering the whole run, tagged
/// with the state's name, values in nanoseconds (HdrHistogram's standard
/// V2 compressed interval log).
pub fn write_hlog(
    stats: &TeardownStats,
    start: SystemTime,
    duration: Duration,
    command: &[String],
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut serializer = V2DeflateSerializer::new();
    let mut log = IntervalLogWriterBuilder::new()
        .add_comment(&format!("twtrace record: {}", command.join(" ")))
        .add_comment("values are nanoseconds of time spent in the tagged TCP state")
        .with_start_time(start)
        .with_base_time(start)
        .with_max_value_divisor(1e6)
        .begin_log_with(out, &mut serializer)
        .context("writing the interval log header")?;
    for state in TEARDOWN_STATES {
        let Some(h) = stats.total.states.get(state).filter(|h| !h.is_empty()) else {
            continue;
        };
        log.write_histogram(h, Duration::ZERO, duration, Tag::new(state.name()))
            .map_err(|e| anyhow::anyhow!("writing the {} histogram: {e}", state.name()))?;
    }
    Ok(())
}

/// The running kernel's release, as `uname -r` prints it.
#[must_use]
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use hdrhistogram::serialization::{
        Deserializer,
        interval_log::{IntervalLogIterator, LogEntry},
    };

    use super::*;
    use crate::event::{Owner, TcpState, Transition};

    const MS: u64 = 1_000_000;

    fn stats() -> TeardownStats {
        let mut stats = TeardownStats::default();
        for ms in 1..=100 {
            stats.record(&Transition {
                ts_ns: 0,
                sock_id: 0,
                owner: Some(Owner {
                    pid: 1,
                    comm: "load".into(),
                    cgroup: 0,
                }),
                src: "127.0.0.1:1".parse().unwrap(),
                dst: "127.0.0.1:2".parse().unwrap(),
                old: TcpState::FinWait2,
                new: TcpState::TimeWait,
                in_state_ns: Some(ms * MS),
                end: None,
                netns: 0,
                accepted: false,
                ending: None,
            });
        }
        stats
    }

    #[test]
    fn hlog_round_trips_with_the_same_percentiles() {
        let stats = stats();
        let mut buf = Vec::new();
        write_hlog(
            &stats,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            Duration::from_secs(5),
            &["load".into()],
            &mut buf,
        )
        .unwrap();
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(text.contains("#[StartTime: 1700000000"), "{text}");
        let mut seen = 0;
        for entry in IntervalLogIterator::new(&buf) {
            let LogEntry::Interval(interval) = entry.unwrap() else {
                continue;
            };
            seen += 1;
            assert_eq!(interval.tag().map(|t| t.as_str()), Some("FIN_WAIT2"));
            let bytes = base64_decode(interval.encoded_histogram());
            let h: hdrhistogram::Histogram<u64> = Deserializer::new()
                .deserialize(&mut bytes.as_slice())
                .unwrap();
            let original = stats.total.states.get(TcpState::FinWait2).unwrap();
            for q in [0.5, 0.9, 0.99, 0.999] {
                assert_eq!(
                    h.value_at_quantile(q),
                    original.value_at_quantile(q),
                    "q={q}"
                );
            }
            assert_eq!(h.len(), 100);
        }
        assert_eq!(seen, 1);
    }

    fn base64_decode(text: &str) -> Vec<u8> {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let mut acc = 0u32;
        let mut bits = 0;
        for b in text.bytes().filter(|&b| b != b'=') {
            let v = ALPHABET.iter().position(|&a| a == b).unwrap();
            acc = (acc << 6) | u32::try_from(v).unwrap();
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push(u8::try_from((acc >> bits) & 0xff).unwrap());
            }
        }
        out
    }
}
