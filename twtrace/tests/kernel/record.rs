//! `twtrace record -- CMD`: exactly the workload's connections, thresholds,
//! exit status, Ctrl-C, bad output paths, and the README's CI snippet.

use std::{
    os::unix::process::ExitStatusExt,
    time::{Duration, Instant},
};

use crate::{
    Test,
    peer::{self},
    support::{interrupt, scratch_dir},
};

pub const TESTS: &[Test] = crate::tests![
    record_counts_exactly_the_workloads_connections,
    record_threshold_breaks_with_exit_3,
    record_passes_the_commands_exit_through,
    record_ctrl_c_stops_the_command_and_reports,
    record_bad_output_fails_before_the_command,
    readme_ci_snippet_runs,
];

/// `sh -c` running the test binary as a workload that makes `count`
/// connections in a *grandchild* of twtrace (sh forks it), then sleeps so
/// that unrelated traffic overlaps the recording.
fn workload(count: usize, then: &str) -> Vec<String> {
    workload_with(peer::auto_maker_env(count), then)
}

pub fn workload_with((var, value): (&str, String), then: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "{var}='{value}' '{bin}' & wait; {then}",
            bin = std::env::current_exe().expect("test binary").display()
        ),
    ]
}

pub fn record(args: &[&str], command: &[String]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_twtrace"))
        .arg("record")
        .args(args)
        .arg("--")
        .args(command)
        .output()
        .expect("running twtrace record")
}

pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("report written");
    serde_json::from_str(&text).expect("report is JSON")
}

/// Only the command's processes count, including ones it forks after
/// the start; the test's own connections made meanwhile do not.
fn record_counts_exactly_the_workloads_connections() {
    let dir = scratch_dir("record");
    let json = dir.join("report.json");
    let noise = std::thread::spawn(|| {
        // Unrelated loopback connections from this (unfollowed) process.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        for _ in 0..20 {
            let c = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (a, _) = listener.accept().unwrap();
            drop(c);
            drop(a);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let out = record(
        &["--json", json.to_str().unwrap()],
        &workload(12, "sleep 0.5"),
    );
    noise.join().expect("noise thread");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = read_json(&json);
    assert_eq!(v["schema"], "twtrace-record/2");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["active_closes"], 12, "{v}");
    assert_eq!(v["passive_closes"], 12, "{v}");
    assert_eq!(v["time_wait_peak"], 12, "{v}");
    let fin_wait1 = v["states"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["state"] == "FIN_WAIT1")
        .expect("FIN_WAIT1 stats");
    assert_eq!(fin_wait1["count"], 12);
    let me = std::process::id();
    for p in v["processes"].as_array().unwrap() {
        assert_ne!(
            p["pid"], me,
            "the test's own connections were recorded: {p}"
        );
    }
    assert!(v["kernel"].as_str().is_some_and(|k| !k.is_empty()));
    assert!(v["duration_ns"].as_u64().is_some_and(|d| d >= 500_000_000));
}

fn record_threshold_breaks_with_exit_3() {
    let broken = record(&["--fail-if", "active_closes > 3"], &workload(5, "true"));
    assert_eq!(
        broken.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&broken.stderr)
    );
    let err = String::from_utf8_lossy(&broken.stderr);
    assert!(
        err.contains("--fail-if 'active_closes > 3': BROKEN (actual 5)"),
        "{err}"
    );
    let held = record(
        &["--fail-if", "active_closes > 100", "--fail-if", "lost > 0"],
        &workload(5, "true"),
    );
    assert_eq!(
        held.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&held.stderr)
    );
    // Malformed: rejected before the command starts, with the column.
    let dir = scratch_dir("threshold");
    let marker = dir.join("ran");
    let bad = record(
        &["--fail-if", "p99(FIN_WAIT3) > 50ms"],
        &["touch".into(), marker.display().to_string()],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("at column 5"));
    assert!(!marker.exists(), "the command ran");
}

fn record_passes_the_commands_exit_through() {
    let out = record(&[], &["sh".into(), "-c".into(), "exit 7".into()]);
    assert_eq!(out.status.code(), Some(7));
    // A threshold cannot hide the command's own failure.
    let out = record(&["--fail-if", "lost >= 0"], &["false".into()]);
    assert_eq!(out.status.code(), Some(1));
    // Killed by a signal: twtrace dies of the same signal.
    let out = record(&[], &["sh".into(), "-c".into(), "kill -TERM $$".into()]);
    assert_eq!(out.status.signal(), Some(libc::SIGTERM), "{:?}", out.status);
    let missing = record(&[], &["/nonexistent/command".into()]);
    assert_eq!(missing.status.code(), Some(1));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("cannot run `/nonexistent/command`"), "{err}");
}

/// SIGINT to twtrace: the command is stopped, the report still written.
fn record_ctrl_c_stops_the_command_and_reports() {
    let dir = scratch_dir("ctrl-c");
    let json = dir.join("report.json");
    // Interrupted once attached (READY=1), when the command runs: under
    // software emulation loading alone can take longer than a fixed wait.
    let child = crate::support::spawn_attached(
        std::process::Command::new(env!("CARGO_BIN_EXE_twtrace")).args([
            "record",
            "--json",
            json.to_str().unwrap(),
            "--",
            "sleep",
            "30",
        ]),
    );
    std::thread::sleep(Duration::from_millis(200));
    interrupt(&child);
    let started = Instant::now();
    let out = child.wait_with_output().expect("twtrace exit");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "sleep was not stopped"
    );
    assert_eq!(out.status.signal(), Some(libc::SIGINT), "{:?}", out.status);
    let v = read_json(&json);
    assert_eq!(v["exit_signal"], libc::SIGINT);
    assert!(v["exit_code"].is_null());
}

/// An unwritable report path is an error before the command runs, not a
/// silent loss after it.
fn record_bad_output_fails_before_the_command() {
    let dir = scratch_dir("bad-output");
    let marker = dir.join("ran");
    let out = record(
        &["--json", "/nonexistent-dir/report.json"],
        &["touch".into(), marker.display().to_string()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot write the JSON report to /nonexistent-dir/report.json"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!marker.exists(), "the command ran");
}

/// The README's CI example, as a CI job would run it.
fn readme_ci_snippet_runs() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let start = readme
        .find("<!-- ci-snippet -->")
        .expect("ci-snippet marker");
    let block = &readme[start..];
    let code_start = block.find("```sh\n").expect("sh block") + 6;
    let code_end = code_start + block[code_start..].find("```").expect("block end");
    let snippet = &block[code_start..code_end];
    let dir = scratch_dir("readme");
    let load = dir.join("load-test.sh");
    let (var, value) = peer::auto_maker_env(10);
    std::fs::write(
        &load,
        format!(
            "#!/bin/sh\n{var}='{value}' '{}'\n",
            std::env::current_exe().unwrap().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&load, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_twtrace"))
        .parent()
        .unwrap();
    let status = std::process::Command::new("sh")
        .args(["-ec", snippet])
        .current_dir(&dir)
        .env(
            "PATH",
            format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
        )
        .status()
        .expect("running the snippet");
    assert!(status.success(), "snippet failed: {status}\n{snippet}");
    let report = read_json(&dir.join("teardown.json"));
    assert_eq!(report["active_closes"], 10);
    let bench = read_json(&dir.join("bench.json"));
    assert!(bench.as_array().is_some_and(|a| {
        a.iter()
            .all(|e| e["unit"].is_string() && e["value"].is_u64())
    }));
    let hlog = std::fs::read_to_string(dir.join("teardown.hlog")).unwrap();
    assert!(hlog.contains("Tag=FIN_WAIT1"), "{hlog}");
}
