//! `cargo xtask bench`: overhead and capacity of twtrace against a
//! baseline and libbpf-tools' tcpstates, measured side by side in one
//! invocation, alternating configurations round after round.

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::workspace_root;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    Baseline,
    TwtraceTrace,
    TwtraceSummary,
    Tcpstates,
}

impl Config {
    const ALL: [Self; 4] = [
        Self::Baseline,
        Self::TwtraceTrace,
        Self::TwtraceSummary,
        Self::Tcpstates,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::TwtraceTrace => "twtrace trace -o json",
            Self::TwtraceSummary => "twtrace summary",
            Self::Tcpstates => "tcpstates",
        }
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
    pub closer: String,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let root = workspace_root();
    let twtrace = root.join("target/release/twtrace");
    let churn = root.join("target/release/churn");
    let tcpstates = ensure_tcpstates()?;
    let scratch = PathBuf::from("/dev/shm/twtrace-bench");
    fs::create_dir_all(&scratch)?;
    // Run-time statistics cost a little for every BPF program; on for all
    // configurations alike (baseline has no programs of its own).
    let stats_before = fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("enabling kernel.bpf_stats_enabled (root needed)")?;
    let result = (|| {
        let mut samples: BTreeMap<usize, Vec<Sample>> = BTreeMap::new();
        for round in 0..opts.rounds {
            for (i, config) in Config::ALL.iter().enumerate() {
                eprintln!(
                    "bench: round {}/{} {}",
                    round + 1,
                    opts.rounds,
                    config.name()
                );
                let sample = measure(*config, opts, &twtrace, &churn, &tcpstates, &scratch)?;
                samples.entry(i).or_default().push(sample);
            }
        }
        Ok::<_, anyhow::Error>(samples)
    })();
    let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
    let samples = result?;
    let report = summarise(&samples, opts);
    println!("{}", table(&report));
    let out = root.join("target/bench");
    fs::create_dir_all(&out)?;
    fs::write(
        out.join("latest.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    eprintln!("bench: wrote {}", out.join("latest.json").display());
    Ok(())
}

fn ensure_tcpstates() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from("/usr/sbin/tcpstates");
    if !path.exists() {
        eprintln!("bench: installing libbpf-tools (tcpstates)");
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "libbpf-tools"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
        };
        if !install().is_ok_and(|s| s.success()) {
            Command::new("apt-get").arg("update").status()?;
            if !install()?.success() {
                bail!("could not install libbpf-tools");
            }
        }
    }
    Ok(path)
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

fn start_tracer(
    config: Config,
    twtrace: &Path,
    tcpstates: &Path,
    out: &Path,
) -> anyhow::Result<Option<Child>> {
    let file = || fs::File::create(out);
    let child = match config {
        Config::Baseline => return Ok(None),
        Config::TwtraceTrace => Command::new(twtrace)
            .args(["trace", "-o", "json"])
            .stdout(file()?)
            .stderr(Stdio::null())
            .spawn()?,
        Config::TwtraceSummary => Command::new(twtrace)
            .args(["summary", "-o", "json"])
            .stdout(file()?)
            .stderr(Stdio::null())
            .spawn()?,
        Config::Tcpstates => Command::new(tcpstates)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    };
    Ok(Some(child))
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

fn measure(
    config: Config,
    opts: &Options,
    twtrace: &Path,
    churn: &Path,
    tcpstates: &Path,
    scratch: &Path,
) -> anyhow::Result<Sample> {
    let before: HashSet<u64> = programs()?.into_iter().map(|p| p.0).collect();
    let out = scratch.join("tracer.out");
    let mut tracer = start_tracer(config, twtrace, tcpstates, &out)?;
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
                bail!("{} did not load its programs", config.name());
            }
            thread::sleep(Duration::from_millis(50));
        }
        thread::sleep(Duration::from_millis(500));
    }
    let start_stats = mine(&before)?;
    let start_cpu = tracer.as_ref().map_or(0.0, |c| usage(c.id()).0);
    let churned = Command::new(churn)
        .args([format!("{}", opts.seconds), opts.closer.clone(), "2".into()])
        .output()
        .context("running the churn workload")?;
    let result: Value = serde_json::from_slice(&churned.stdout).context("churn output")?;
    let end_stats = mine(&before)?;
    let (end_cpu, peak_rss_kib) = tracer.as_ref().map_or((0.0, 0), |c| usage(c.id()));
    let mut sample = Sample {
        rate: result["rate"].as_f64().unwrap_or(0.0),
        connections: result["connections"].as_u64().unwrap_or(0),
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
    if let Some(child) = tracer.as_mut() {
        let pid = libc::pid_t::try_from(child.id()).unwrap_or(0);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGINT) };
        child.wait()?;
    }
    if matches!(config, Config::TwtraceTrace | Config::TwtraceSummary) {
        let text = fs::read_to_string(&out).unwrap_or_default();
        let summary = match config {
            Config::TwtraceTrace => text.lines().last().unwrap_or_default().to_owned(),
            _ => text,
        };
        let v: Value = serde_json::from_str(&summary).unwrap_or(Value::Null);
        sample.events = v["events"].as_u64();
        sample.lost = v["lost"]["events"].as_u64();
    } else if config == Config::Tcpstates {
        // tcpstates emits one event per run of its single program.
        sample.events = Some(sample.runs());
    }
    let _ = fs::remove_file(&out);
    // Let TIME_WAIT from this configuration not weigh on the next: the
    // kernel caps them (tcp_max_tw_buckets); a pause lets softirqs settle.
    thread::sleep(Duration::from_millis(300));
    Ok(sample)
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        f64::midpoint(values[mid - 1], values[mid])
    } else {
        values[mid]
    }
}

#[expect(clippy::cast_precision_loss, reason = "report figures")]
fn summarise(samples: &BTreeMap<usize, Vec<Sample>>, opts: &Options) -> Value {
    let baseline = &samples[&0];
    let mut configs = Vec::new();
    for (i, config) in Config::ALL.iter().enumerate() {
        let runs = &samples[&i];
        // Ratio to the baseline of the same round, then the median.
        let ratio = median(
            runs.iter()
                .zip(baseline)
                .map(|(s, b)| if b.rate > 0.0 { s.rate / b.rate } else { 0.0 })
                .collect(),
        );
        let ns_per_run = median(
            runs.iter()
                .filter(|s| s.runs() > 0)
                .map(|s| s.kernel_ns() as f64 / s.runs() as f64)
                .collect(),
        );
        let ns_per_conn = median(
            runs.iter()
                .filter(|s| s.connections > 0)
                .map(|s| s.kernel_ns() as f64 / s.connections as f64)
                .collect(),
        );
        let cpu_per_m = median(
            runs.iter()
                .filter_map(|s| {
                    s.events
                        .filter(|&e| e > 0)
                        .map(|e| s.cpu_s / e as f64 * 1e6)
                })
                .collect(),
        );
        let mut per_program: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for s in runs {
            for (name, ns, cnt) in &s.programs {
                let e = per_program.entry(name.clone()).or_default();
                e.0 += ns;
                e.1 += cnt;
            }
        }
        configs.push(json!({
            "config": config.name(),
            "connections_per_s": median(runs.iter().map(|s| s.rate).collect()),
            "ratio_to_baseline": ratio,
            "kernel_ns_per_program_run": ns_per_run,
            "kernel_ns_per_connection": ns_per_conn,
            "programs": per_program.iter().map(|(name, (ns, cnt))| json!({
                "name": name,
                "run_cnt": cnt,
                "ns_per_run": if *cnt > 0 { *ns as f64 / *cnt as f64 } else { 0.0 },
            })).collect::<Vec<_>>(),
            "events": runs.iter().filter_map(|s| s.events).sum::<u64>(),
            "events_lost": runs.iter().filter_map(|s| s.lost).sum::<u64>(),
            "user_cpu_s_per_million_events": cpu_per_m,
            "peak_rss_mib": runs.iter().map(|s| s.peak_rss_kib).max().unwrap_or(0) as f64 / 1024.0,
        }));
    }
    json!({
        "seconds_per_run": opts.seconds,
        "rounds": opts.rounds,
        "closer": opts.closer,
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "configs": configs,
    })
}

fn table(report: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>8} {:>10} {:>10} {:>10} {:>8} {:>12} {:>8}",
        "config", "conn/s", "ratio", "ns/run", "ns/conn", "events", "lost", "cpu s/Mev", "RSS MiB"
    );
    for c in report["configs"].as_array().into_iter().flatten() {
        let f = |k: &str| c[k].as_f64().unwrap_or(0.0);
        let _ = writeln!(
            out,
            "{:<22} {:>10.0} {:>8.3} {:>10.0} {:>10.0} {:>10} {:>8} {:>12.2} {:>8.1}",
            c["config"].as_str().unwrap_or("?"),
            f("connections_per_s"),
            f("ratio_to_baseline"),
            f("kernel_ns_per_program_run"),
            f("kernel_ns_per_connection"),
            c["events"].as_u64().unwrap_or(0),
            c["events_lost"].as_u64().unwrap_or(0),
            f("user_cpu_s_per_million_events"),
            f("peak_rss_mib"),
        );
    }
    out
}
