//! `cargo xtask bench`: overhead and capacity of twtrace against a
//! baseline and libbpf-tools' tcpstates, measured side by side in one
//! invocation, alternating configurations round after round, on each
//! workload (`workload`): the churn binary closing on either side, and
//! nginx under wrk.

mod report;
mod workload;

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::Value;

use self::workload::Servers;
pub use self::workload::Workload;
use crate::workspace_root;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    Baseline,
    TwtraceTrace,
    TwtraceSummary,
    TwtraceServe,
    TwtraceTop,
    Tcpstates,
}

impl Config {
    const ALL: [Self; 6] = [
        Self::Baseline,
        Self::TwtraceTrace,
        Self::TwtraceSummary,
        Self::TwtraceServe,
        Self::TwtraceTop,
        Self::Tcpstates,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::TwtraceTrace => "twtrace trace -o json",
            Self::TwtraceSummary => "twtrace summary",
            Self::TwtraceServe => "twtrace serve",
            Self::TwtraceTop => "twtrace top -b",
            Self::Tcpstates => "tcpstates",
        }
    }

    /// The share of the untraced rate issue 17 asks this configuration to
    /// keep (none for the baseline and the peer).
    fn target_ratio(self) -> Option<f64> {
        match self {
            Self::Baseline | Self::Tcpstates => None,
            Self::TwtraceTrace => Some(0.95),
            Self::TwtraceSummary | Self::TwtraceServe | Self::TwtraceTop => Some(0.97),
        }
    }

    fn is_twtrace(self) -> bool {
        self.target_ratio().is_some()
    }
}

/// One configuration's measurements in one round.
#[derive(Clone, Debug, Default)]
struct Sample {
    rate: f64,
    connections: u64,
    /// Per attached program: (name, `run_time_ns`, `run_cnt`).
    programs: Vec<(String, u64, u64)>,
    events: Option<u64>,
    lost: Option<u64>,
    cpu_s: f64,
    peak_rss_kib: u64,
}

impl Sample {
    fn kernel_ns(&self) -> u64 {
        self.programs.iter().map(|p| p.1).sum()
    }

    fn runs(&self) -> u64 {
        self.programs.iter().map(|p| p.2).sum()
    }
}

pub struct Options {
    pub seconds: f64,
    pub rounds: usize,
    pub workloads: Vec<Workload>,
    /// A request and a reply on each churn connection.
    pub exchange: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let root = workspace_root();
    let twtrace = root.join("target/release/twtrace");
    let scratch = PathBuf::from("/dev/shm/twtrace-bench");
    fs::create_dir_all(&scratch)?;
    let servers = Servers::start(root.join("target/release/churn"), &opts.workloads, &scratch)?;
    // Run-time statistics cost a little for every BPF program; on for all
    // configurations alike (baseline has no programs of its own), and
    // only while the bench runs.
    let stats_before = fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("enabling kernel.bpf_stats_enabled (root needed)")?;
    let result = (|| {
        let mut samples: BTreeMap<(usize, usize), Vec<Sample>> = BTreeMap::new();
        for round in 0..opts.rounds {
            for (w, workload) in opts.workloads.iter().enumerate() {
                for (c, config) in Config::ALL.iter().enumerate() {
                    eprintln!(
                        "bench: round {}/{} {}: {}",
                        round + 1,
                        opts.rounds,
                        workload.name(),
                        config.name()
                    );
                    let run = Run {
                        config: *config,
                        workload: *workload,
                        twtrace: &twtrace,
                        servers: &servers,
                        scratch: &scratch,
                    };
                    samples.entry((w, c)).or_default().push(run.measure(opts)?);
                }
            }
        }
        Ok::<_, anyhow::Error>(samples)
    })();
    let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
    let samples = result?;
    let report = report::summarise(&samples, opts);
    println!("{}", report::table(&report));
    let out = root.join("target/bench");
    fs::create_dir_all(&out)?;
    fs::write(
        out.join("latest.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    eprintln!("bench: wrote {}", out.join("latest.json").display());
    Ok(())
}

/// `bpftool prog show -j`, as (id, name, `run_time_ns`, `run_cnt`).
fn programs() -> anyhow::Result<Vec<(u64, String, u64, u64)>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .context("running bpftool (apt-get install bpftool)")?;
    let list: Value = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
    Ok(list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["id"].as_u64().unwrap_or(0),
                        p["name"].as_str().unwrap_or("?").to_owned(),
                        p["run_time_ns"].as_u64().unwrap_or(0),
                        p["run_cnt"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// One configuration's tracer, if any, with where it writes and, for
/// those that serve metrics, where to scrape them.
struct Tracer {
    child: Child,
    metrics_port: Option<u16>,
}

fn start_tracer(config: Config, twtrace: &Path, out: &Path) -> anyhow::Result<Option<Tracer>> {
    let file = || fs::File::create(out);
    let quiet = |command: &mut Command| -> anyhow::Result<Child> {
        Ok(command.stdout(file()?).stderr(Stdio::null()).spawn()?)
    };
    let metrics_port = matches!(config, Config::TwtraceServe | Config::TwtraceTop)
        .then(workload::free_port)
        .transpose()?;
    let metrics_addr = metrics_port.map(|p| format!("127.0.0.1:{p}"));
    let twtrace_command = |args: &[&str]| -> anyhow::Result<Child> {
        let mut command = Command::new(twtrace);
        command.args(args);
        if let Some(addr) = &metrics_addr {
            command.args(["--metrics-addr", addr]);
        }
        quiet(&mut command)
    };
    let child = match config {
        Config::Baseline => return Ok(None),
        Config::TwtraceTrace => twtrace_command(&["trace", "-o", "json"])?,
        Config::TwtraceSummary => twtrace_command(&["summary", "-o", "json"])?,
        Config::TwtraceServe => twtrace_command(&["serve"])?,
        Config::TwtraceTop => twtrace_command(&["top", "-b"])?,
        Config::Tcpstates => quiet(&mut Command::new("/usr/sbin/tcpstates"))
            .context("starting tcpstates (apt-get install libbpf-tools)")?,
    };
    Ok(Some(Tracer {
        child,
        metrics_port,
    }))
}

/// Events twtrace lost, from its metrics page: the kinds `summary` counts
/// as lost events (the others — TIME_WAIT ends without a record, say —
/// are mostly the mini-sockets earlier configurations left behind).
const LOST_EVENT_KINDS: [&str; 4] = [
    "ringbuf_full",
    "recursion_misses",
    "unreadable",
    "undecodable",
];

fn scrape_lost(port: u16) -> anyhow::Result<u64> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut page = String::new();
    stream.read_to_string(&mut page)?;
    let lost = page
        .lines()
        .filter(|l| l.starts_with("twtrace_lost_events_total"))
        .filter(|l| {
            LOST_EVENT_KINDS
                .iter()
                .any(|k| l.contains(&format!("kind=\"{k}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a counter's value"
    )]
    Ok(lost as u64)
}

/// CPU seconds (user + system) and peak RSS (KiB) of a live process.
fn usage(pid: u32) -> (f64, u64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may hold spaces: utime, stime
    // are the 12th and 13th after it.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = f64::from(u32::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100));
    let cpu = (ticks(11) + ticks(12)) / hz.max(1.0);
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (cpu, rss)
}

/// One measurement: a configuration on a workload.
struct Run<'a> {
    config: Config,
    workload: Workload,
    twtrace: &'a Path,
    servers: &'a Servers,
    scratch: &'a Path,
}

impl Run<'_> {
    fn measure(&self, opts: &Options) -> anyhow::Result<Sample> {
        let before: HashSet<u64> = programs()?.into_iter().map(|p| p.0).collect();
        let out = self.scratch.join("tracer.out");
        let mut tracer = start_tracer(self.config, self.twtrace, &out)?;
        // Attached when its programs are loaded and stay loaded a moment.
        let mine = |before: &HashSet<u64>| -> anyhow::Result<Vec<(u64, String, u64, u64)>> {
            Ok(programs()?
                .into_iter()
                .filter(|p| !before.contains(&p.0))
                .collect())
        };
        if tracer.is_some() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while mine(&before)?.is_empty() {
                if Instant::now() > deadline {
                    bail!("{} did not load its programs", self.config.name());
                }
                thread::sleep(Duration::from_millis(50));
            }
            thread::sleep(Duration::from_millis(500));
        }
        let start_stats = mine(&before)?;
        let start_cpu = tracer.as_ref().map_or(0.0, |t| usage(t.child.id()).0);
        let completed = workload::run(self.workload, opts.seconds, opts.exchange, self.servers)?;
        let end_stats = mine(&before)?;
        let (end_cpu, peak_rss_kib) = tracer.as_ref().map_or((0.0, 0), |t| usage(t.child.id()));
        let mut sample = Sample {
            rate: completed.rate,
            connections: completed.connections,
            cpu_s: end_cpu - start_cpu,
            peak_rss_kib,
            ..Sample::default()
        };
        for (id, name, ns, cnt) in &end_stats {
            let (ns0, cnt0) = start_stats
                .iter()
                .find(|p| p.0 == *id)
                .map_or((0, 0), |p| (p.2, p.3));
            sample.programs.push((name.clone(), ns - ns0, cnt - cnt0));
        }
        if let Some(tracer) = tracer.as_mut() {
            if let Some(port) = tracer.metrics_port {
                sample.lost = Some(
                    scrape_lost(port)
                        .with_context(|| format!("scraping {}'s metrics", self.config.name()))?,
                );
            }
            let pid = libc::pid_t::try_from(tracer.child.id()).unwrap_or(0);
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGINT) };
            tracer.child.wait()?;
        }
        self.read_report(&out, &mut sample);
        let _ = fs::remove_file(&out);
        // Let TIME_WAIT from this configuration not weigh on the next: the
        // kernel caps them (tcp_max_tw_buckets); a pause lets softirqs settle.
        thread::sleep(Duration::from_millis(300));
        Ok(sample)
    }

    /// Events and losses from what the tracer printed, where it prints them.
    fn read_report(&self, out: &Path, sample: &mut Sample) {
        match self.config {
            Config::TwtraceTrace | Config::TwtraceSummary => {
                let text = fs::read_to_string(out).unwrap_or_default();
                let summary = match self.config {
                    Config::TwtraceTrace => text.lines().last().unwrap_or_default().to_owned(),
                    _ => text,
                };
                let v: Value = serde_json::from_str(&summary).unwrap_or(Value::Null);
                sample.events = v["events"].as_u64();
                sample.lost = v["lost"]["events"].as_u64();
            }
            // tcpstates emits one event per run of its single program.
            Config::Tcpstates => sample.events = Some(sample.runs()),
            _ => {}
        }
    }
}
