//! The bench's figures: medians over rounds, per workload and
//! configuration, against issue 17's targets; as JSON and as tables.

use std::{collections::BTreeMap, fmt::Write as _, fs, thread};

use serde_json::{Value, json};

use super::{Config, Options, Sample};

/// Kernel time per connection issue 17 asks for, at most.
const TARGET_NS_PER_CONNECTION: f64 = 1000.0;
/// Peak resident memory of twtrace issue 17 asks for, at most.
const TARGET_RSS_MIB: f64 = 64.0;

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

/// `samples` by (workload, configuration) index.
pub fn summarise(samples: &BTreeMap<(usize, usize), Vec<Sample>>, opts: &Options) -> Value {
    let workloads: Vec<Value> = opts
        .workloads
        .iter()
        .enumerate()
        .map(|(w, workload)| {
            let baseline = &samples[&(w, 0)];
            let configs: Vec<Value> = Config::ALL
                .iter()
                .enumerate()
                .map(|(c, config)| configuration(*config, &samples[&(w, c)], baseline))
                .collect();
            json!({ "workload": workload.name(), "configs": configs })
        })
        .collect();
    json!({
        "seconds_per_run": opts.seconds,
        "rounds": opts.rounds,
        "exchange": opts.exchange,
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "workloads": workloads,
    })
}

#[expect(clippy::cast_precision_loss, reason = "report figures")]
fn configuration(config: Config, runs: &[Sample], baseline: &[Sample]) -> Value {
    // Ratio to the baseline of the same round, then the median.
    let ratio = median(
        runs.iter()
            .zip(baseline)
            .map(|(s, b)| if b.rate > 0.0 { s.rate / b.rate } else { 0.0 })
            .collect(),
    );
    let per_connection = |f: fn(&Sample) -> u64| {
        median(
            runs.iter()
                .filter(|s| s.connections > 0)
                .map(|s| f(s) as f64 / s.connections as f64)
                .collect(),
        )
    };
    let ns_per_run = median(
        runs.iter()
            .filter(|s| s.runs() > 0)
            .map(|s| s.kernel_ns() as f64 / s.runs() as f64)
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
    let connections: u64 = runs.iter().map(|s| s.connections).sum();
    let mut per_program: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for s in runs {
        for (name, ns, cnt) in &s.programs {
            let e = per_program.entry(name.clone()).or_default();
            e.0 += ns;
            e.1 += cnt;
        }
    }
    let ns_per_conn = per_connection(Sample::kernel_ns);
    let lost: Option<u64> = runs.iter().map(|s| s.lost).sum();
    let rss = runs.iter().map(|s| s.peak_rss_kib).max().unwrap_or(0) as f64 / 1024.0;
    let mut missed = Vec::new();
    if let Some(target) = config.target_ratio() {
        if ratio < target {
            missed.push(format!("ratio {ratio:.3} < {target}"));
        }
        if ns_per_conn > TARGET_NS_PER_CONNECTION {
            missed.push(format!(
                "{ns_per_conn:.0} ns/conn > {TARGET_NS_PER_CONNECTION}"
            ));
        }
        if lost.is_some_and(|l| l > 0) {
            missed.push(format!("{} lost", lost.unwrap_or(0)));
        }
        if rss > TARGET_RSS_MIB {
            missed.push(format!("RSS {rss:.1} MiB > {TARGET_RSS_MIB}"));
        }
    }
    json!({
        "config": config.name(),
        "connections_per_s": median(runs.iter().map(|s| s.rate).collect()),
        "ratio_to_baseline": ratio,
        "kernel_ns_per_program_run": ns_per_run,
        "kernel_ns_per_connection": ns_per_conn,
        "program_runs_per_connection": per_connection(Sample::runs),
        "programs": per_program.iter().map(|(name, (ns, cnt))| json!({
            "name": name,
            "run_cnt": cnt,
            "ns_per_run": if *cnt > 0 { *ns as f64 / *cnt as f64 } else { 0.0 },
            "runs_per_connection": if connections > 0 { *cnt as f64 / connections as f64 } else { 0.0 },
        })).collect::<Vec<_>>(),
        "events": runs.iter().filter_map(|s| s.events).sum::<u64>(),
        "events_lost": lost,
        "user_cpu_s_per_million_events": cpu_per_m,
        "peak_rss_mib": rss,
        "targets_missed": (config.is_twtrace()).then_some(missed),
    })
}

/// Per workload: the configurations side by side, then per program.
pub fn table(report: &Value) -> String {
    let mut out = String::new();
    for w in report["workloads"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "\n{}", w["workload"].as_str().unwrap_or("?"));
        let _ = writeln!(
            out,
            "{:<22} {:>8} {:>7} {:>7} {:>8} {:>9} {:>9} {:>6} {:>9} {:>7}",
            "config",
            "conn/s",
            "ratio",
            "ns/run",
            "ns/conn",
            "runs/conn",
            "events",
            "lost",
            "cpu s/Mev",
            "RSS MiB"
        );
        let configs = w["configs"].as_array().into_iter().flatten();
        for c in configs.clone() {
            let f = |k: &str| c[k].as_f64().unwrap_or(0.0);
            let lost = c["events_lost"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |l| l.to_string());
            let _ = writeln!(
                out,
                "{:<22} {:>8.0} {:>7.3} {:>7.0} {:>8.0} {:>9.1} {:>9} {:>6} {:>9.2} {:>7.1}",
                c["config"].as_str().unwrap_or("?"),
                f("connections_per_s"),
                f("ratio_to_baseline"),
                f("kernel_ns_per_program_run"),
                f("kernel_ns_per_connection"),
                f("program_runs_per_connection"),
                c["events"].as_u64().unwrap_or(0),
                lost,
                f("user_cpu_s_per_million_events"),
                f("peak_rss_mib"),
            );
        }
        for c in configs.clone() {
            let missed = c["targets_missed"].as_array().into_iter().flatten();
            let missed: Vec<&str> = missed.filter_map(Value::as_str).collect();
            if !missed.is_empty() {
                let _ = writeln!(
                    out,
                    "  targets missed by {}: {}",
                    c["config"].as_str().unwrap_or("?"),
                    missed.join(", ")
                );
            }
        }
        let _ = writeln!(out, "  per program (summary): ns/run, runs/conn");
        if let Some(summary) = configs
            .clone()
            .find(|c| c["config"] == Config::TwtraceSummary.name())
        {
            for p in summary["programs"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "  {:<24} {:>7.0} {:>6.2}",
                    p["name"].as_str().unwrap_or("?"),
                    p["ns_per_run"].as_f64().unwrap_or(0.0),
                    p["runs_per_connection"].as_f64().unwrap_or(0.0),
                );
            }
        }
    }
    out
}
