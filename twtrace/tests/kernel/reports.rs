//! `doctor`, `ports` and the metrics endpoint against the kernel's own
//! numbers (sysctls, nstat, ss) and the summary.

use std::time::{Duration, Instant};

use crate::{
    Test,
    peer::{Ending, Netns, Peer},
    support::{self, Exchange, command_stdout, interrupt, nstat_value, spawn_twtrace},
};

pub const TESTS: &[Test] = crate::tests![
    ports_held_matches_ss_within_one_percent,
    doctor_matches_sysctl_and_nstat,
    metrics_scrape_matches_the_summary,
];

/// `twtrace ports` counts the TIME_WAIT ports toward one destination as
/// the kernel's own socket table does.
fn ports_held_matches_ss_within_one_percent() {
    const SOCKETS: usize = 1000;
    support::require_time_wait();
    let netns = Netns::new();
    let mut maker = Peer::time_wait_maker(&netns, SOCKETS);
    let child = support::spawn_attached(
        std::process::Command::new(env!("CARGO_BIN_EXE_twtrace"))
            .args([
                "ports",
                "--duration",
                "5s",
                "-o",
                "json",
                "--pid",
                &maker.pid.to_string(),
            ])
            .stdout(std::process::Stdio::piped()),
    );
    maker.go();
    maker.wait_done();
    // Under software emulation the last FINs and ACKs can land after the
    // maker says done: wait (within twtrace's 5 s) for the kernel's count.
    let settle = Instant::now() + Duration::from_secs(3);
    let mut in_ss = time_waits_in(&netns);
    while in_ss + recycled_in(&netns) < SOCKETS && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(100));
        in_ss = time_waits_in(&netns);
    }
    let out = child.wait_with_output().expect("twtrace ports output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ports JSON");
    let routes = v["routes"].as_array().expect("routes");
    let held: u64 = routes.iter().map(|r| r["held"].as_u64().unwrap()).sum();
    assert!(
        in_ss + recycled_in(&netns) >= SOCKETS,
        "ss shows {in_ss} TIME_WAIT; {}",
        where_they_went(&netns)
    );
    let in_ss = in_ss as u64;
    assert!(
        held.abs_diff(in_ss) * 100 <= in_ss,
        "twtrace {held}, ss {in_ss}: {v}"
    );
    let top = &routes[0];
    assert!(
        top["remote"]
            .as_str()
            .is_some_and(|r| r.starts_with("127.0.0.1:")),
        "{top}"
    );
    assert!(
        top["closes_per_s"].as_f64().is_some_and(|r| r > 0.0),
        "{top}"
    );
}

/// What `command` prints, run inside `netns`.
fn in_netns(netns: &Netns, command: &[&str]) -> String {
    let args: Vec<&str> = ["netns", "exec", netns.name.as_str()]
        .into_iter()
        .chain(command.iter().copied())
        .collect();
    command_stdout("ip", &args)
}

/// TIME_WAIT sockets in `netns`, as ss lists them.
fn time_waits_in(netns: &Netns) -> usize {
    in_netns(netns, &["ss", "-Htan", "state", "time-wait"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// TIME_WAIT sockets of `netns` that a `connect()` took over: one older
/// than a second may be (`tcp_tw_reuse`, on for loopback by default), and
/// under emulation the maker runs that long.
fn recycled_in(netns: &Netns) -> usize {
    in_netns(netns, &["nstat", "-az", "TcpExtTWRecycled"])
        .lines()
        .find_map(|l| l.strip_prefix("TcpExtTWRecycled"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Every state in `netns` and its TIME_WAIT counters, for a shortfall.
fn where_they_went(netns: &Netns) -> String {
    let counters = in_netns(
        netns,
        &["nstat", "-az", "TcpExtTW*", "TcpExtTCPTimeWaitOverflow"],
    );
    // sockstat's `tw` is the kernel's own count of live mini-sockets: it
    // tells a TIME_WAIT that really ended early from one ss's dump missed.
    let sockstat = in_netns(netns, &["cat", "/proc/net/sockstat"]);
    let tcp = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .unwrap_or("");
    format!(
        "by state: {}; counters: {}; sockstat {tcp}",
        states_in(netns),
        counters.split_whitespace().collect::<Vec<_>>().join(" ")
    )
}

/// How many sockets of `netns` are in each state, as ss names them.
fn states_in(netns: &Netns) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for line in in_netns(netns, &["ss", "-Htan"]).lines() {
        if let Some(state) = line.split_whitespace().next() {
            *counts.entry(state.to_owned()).or_default() += 1;
        }
    }
    format!("{counts:?}")
}

/// doctor's numbers are the host's: sysctls as `sysctl` reads them,
/// counters as `nstat` does (they may grow in between, so bracketed).
fn doctor_matches_sysctl_and_nstat() {
    const COUNTERS: [&str; 4] = [
        "TcpExtTW",
        "TcpExtTCPTimeWaitOverflow",
        "TcpOutRsts",
        "TcpEstabResets",
    ];
    let before: Vec<u64> = COUNTERS.iter().map(|n| nstat_value(n)).collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_twtrace"))
        .args(["doctor", "-o", "json"])
        .output()
        .expect("twtrace doctor");
    let after: Vec<u64> = COUNTERS.iter().map(|n| nstat_value(n)).collect();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    assert_eq!(v["schema"], "twtrace-doctor/1");
    assert_eq!(
        v["exit_code"].as_i64().and_then(|c| i32::try_from(c).ok()),
        out.status.code()
    );
    assert!(
        [0, 4].contains(&v["exit_code"].as_u64().unwrap()),
        "root on this kernel: {v}"
    );
    let host = &v["host"];
    let sysctl = |name: &str| -> u64 {
        command_stdout("sysctl", &["-n", name])
            .trim()
            .parse()
            .expect(name)
    };
    assert_eq!(
        host["max_tw_buckets"],
        sysctl("net.ipv4.tcp_max_tw_buckets")
    );
    assert_eq!(host["tw_reuse"], sysctl("net.ipv4.tcp_tw_reuse"));
    assert_eq!(host["fin_timeout"], sysctl("net.ipv4.tcp_fin_timeout"));
    assert_eq!(host["timestamps"], sysctl("net.ipv4.tcp_timestamps"));
    let range: Vec<u64> = command_stdout("sysctl", &["-n", "net.ipv4.ip_local_port_range"])
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(host["port_range"], serde_json::json!(range));
    let doctor_said = [
        &host["netstat"]["TW"],
        &host["netstat"]["TCPTimeWaitOverflow"],
        &host["tcp"]["OutRsts"],
        &host["tcp"]["EstabResets"],
    ];
    for (i, (name, got)) in COUNTERS.iter().zip(doctor_said).enumerate() {
        let got = got.as_u64().expect(name);
        assert!(
            (before[i]..=after[i]).contains(&got),
            "{name}: {} <= {got} <= {}",
            before[i],
            after[i]
        );
    }
    assert_eq!(host["tw_recycle_exists"], false);
    let ids: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    for id in [
        "privileges",
        "tracefs",
        "btf",
        "tcp_max_tw_buckets",
        "ports",
        "tcp_tw_reuse",
        "tcp_fin_timeout",
        "tcp_tw_recycle",
        "resets",
    ] {
        assert!(ids.contains(&id), "{id} missing: {ids:?}");
    }
    for f in v["findings"].as_array().unwrap() {
        for key in ["severity", "title", "value", "meaning", "advice"] {
            assert!(f[key].is_string(), "{f}");
        }
    }
}

fn scrape(port: u16) -> Option<prometheus_parse::Scrape> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).ok()
}

/// Histogram count per state label, from the `+Inf` bucket.
fn counts_by_state(scrape: &prometheus_parse::Scrape) -> std::collections::BTreeMap<String, u64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "twtrace_time_in_state_seconds")
        .filter_map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) => {
                let total = buckets.iter().find(|b| b.less_than.is_infinite())?.count;
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a count"
                )]
                Some((s.labels.get("state")?.to_owned(), total as u64))
            }
            _ => None,
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// The endpoint, scraped over loopback and parsed by a real exposition
/// parser, counts what the summary counts.
fn metrics_scrape_matches_the_summary() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut ex = Exchange::new(
        "127.0.0.1:0",
        Ending::CloseFirst,
        Ending::CloseAfterPeer { wait_ms: 0 },
    );
    let addr = format!("127.0.0.1:{port}");
    let summary = spawn_twtrace(&["summary", "-o", "json", "--metrics-addr", &addr], &ex);
    ex.run_then_end();
    // Until the namespace's clean-up ends the TIME_WAIT socket and the
    // next status refresh (1 s) has published everything.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = std::collections::BTreeMap::new();
    while Instant::now() < deadline {
        if let Some(s) = scrape(port) {
            last = counts_by_state(&s);
            if last.contains_key("TIME_WAIT") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(last.contains_key("TIME_WAIT"), "{last:?}");
    let final_scrape = scrape(port).expect("scrape");
    let closes: f64 = final_scrape
        .samples
        .iter()
        .filter(|s| s.metric == "twtrace_closes_total")
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert!(
        (closes - 2.0).abs() < f64::EPSILON,
        "active + passive closes: {closes}"
    );
    let scraped = counts_by_state(&final_scrape);
    interrupt(&summary);
    let out = summary.wait_with_output().expect("summary output");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary JSON");
    let from_summary: std::collections::BTreeMap<String, u64> = v["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["state"].as_str().unwrap().to_owned(),
                s["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(scraped, from_summary);
}
