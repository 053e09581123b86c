//! The real binary: `trace` and `summary` JSON, missing privileges and
//! tracefs, and the live view in tmux.

use std::time::{Duration, Instant};

use crate::{
    Test,
    peer::{Ending, Netns, Peer},
    support::{Exchange, interrupt, spawn_twtrace},
};

pub const TESTS: &[Test] = crate::tests![
    cli_trace_json_streams_and_summarises,
    cli_summary_json_has_per_state_histograms,
    unprivileged_user_is_told_what_is_missing,
    tracefs_is_mounted_when_missing,
    top_view_in_tmux_shows_the_closer_and_quits_cleanly,
];

/// Runs `twtrace trace -o json` (and `also`, if given) around one exchange
/// whose namespace is deleted at the end; stops them with SIGINT once the
/// stream shows the mini-socket's end (namespace clean-up runs in a kernel
/// worker, sometimes seconds later). Returns both outputs.
fn run_cli_around_exchange(also: Option<&[&str]>) -> (String, Option<String>, Exchange) {
    use std::io::BufRead;
    let mut ex = Exchange::new(
        "127.0.0.1:0",
        Ending::CloseFirst,
        Ending::CloseAfterPeer { wait_ms: 0 },
    );
    let mut watcher = spawn_twtrace(&["trace", "-o", "json"], &ex);
    let other = also.map(|args| spawn_twtrace(args, &ex));
    ex.run_then_end();
    let stdout = watcher.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if lines_tx.send(line.expect("stdout line")).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stream = Vec::new();
    while let Ok(line) = lines_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        // The mini-socket's end: the last of the exchange.
        let ended = line.contains("\"end\":\"cancelled\"") || line.contains("\"end\":\"expired\"");
        stream.push(line);
        if ended {
            break;
        }
    }
    interrupt(&watcher);
    if let Some(child) = &other {
        interrupt(child);
    }
    stream.extend(lines_rx.iter());
    let status = watcher.wait().expect("twtrace exit");
    assert!(status.success(), "{status}");
    let other_out = other.map(|child| {
        let out = child.wait_with_output().expect("twtrace output");
        assert!(out.status.success(), "{}", out.status);
        String::from_utf8(out.stdout).expect("utf-8")
    });
    (stream.join("\n"), other_out, ex)
}

/// The real binary, as a user runs it: JSON Lines, then a summary object.
fn cli_trace_json_streams_and_summarises() {
    let (stdout, _, ex) = run_cli_around_exchange(None);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let (summary, transitions) = lines.split_last().expect("some output");
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["events"], 7);
    assert_eq!(
        summary["lost"]["events"], summary["lost"]["recursion_misses"],
        "only recursion misses are tolerated (see support::trace_until): {summary}"
    );
    assert_eq!(summary["active_closes"], 1);
    assert_eq!(summary["passive_closes"], 1);
    assert_eq!(transitions.len(), 7);
    for t in transitions {
        assert_eq!(t["type"], "transition");
        assert_eq!(t["family"], "ipv4");
        assert!(
            t["ts_ns"]
                .as_i64()
                .is_some_and(|ns| ns > 1_700_000_000_000_000_000)
        );
        assert!(t["pid"].as_u64().is_some_and(|pid| pid > 0), "{t}");
        assert!(t["in_state_ns"].is_u64(), "{t}");
    }
    let client: Vec<(&str, &str, Option<&str>)> = transitions
        .iter()
        .filter(|t| t["dst"] == ex.server_addr.to_string())
        .map(|t| {
            (
                t["old_state"].as_str().unwrap(),
                t["new_state"].as_str().unwrap(),
                t["end"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        client,
        [
            ("ESTABLISHED", "FIN_WAIT1", None),
            ("FIN_WAIT1", "FIN_WAIT2", None),
            ("FIN_WAIT2", "TIME_WAIT", None),
            ("TIME_WAIT", "CLOSE", Some("cancelled")),
        ]
    );
}

fn cli_summary_json_has_per_state_histograms() {
    let (_, summary, ex) = run_cli_around_exchange(Some(&["summary", "-o", "json"]));
    let summary = summary.expect("summary output");
    let v: serde_json::Value = serde_json::from_str(&summary).expect("one JSON document");
    assert_eq!(v["type"], "summary");
    let states: Vec<&str> = v["states"]
        .as_array()
        .expect("states")
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        [
            "FIN_WAIT1",
            "FIN_WAIT2",
            "TIME_WAIT",
            "CLOSE_WAIT",
            "LAST_ACK"
        ]
    );
    for s in v["states"].as_array().unwrap() {
        assert_eq!(s["count"], 1, "{s}");
        assert!(s["min_ns"].as_u64() <= s["max_ns"].as_u64());
    }
    let processes = v["processes"].as_array().expect("processes");
    let by_pid = |pid: u32| {
        processes
            .iter()
            .find(|p| p["pid"] == pid)
            .unwrap_or_else(|| panic!("pid {pid} missing: {v}"))
    };
    assert_eq!(by_pid(ex.client_pid)["active_closes"], 1);
    assert_eq!(by_pid(ex.client_pid)["passive_closes"], 0);
    assert_eq!(by_pid(ex.server_pid)["passive_closes"], 1);
    // How each side's connection ended: the client's through its
    // mini-socket (cancelled with the namespace), the server's by FIN.
    assert_eq!(
        by_pid(ex.client_pid)["ends"]["by_end"],
        serde_json::json!({"cancelled": 1})
    );
    assert_eq!(
        by_pid(ex.server_pid)["ends"]["by_end"],
        serde_json::json!({"fin": 1})
    );
    assert_eq!(
        v["ends"]["by_end"],
        serde_json::json!({"cancelled": 1, "fin": 1})
    );
}

/// As `nobody`, with no capabilities: one line naming them, exit 1.
fn unprivileged_user_is_told_what_is_missing() {
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args([env!("CARGO_BIN_EXE_twtrace"), "trace", "--duration", "1s"])
        .output()
        .expect("running setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("CAP_BPF, CAP_PERFMON"), "{err}");
    assert!(err.contains("run twtrace as root"), "{err}");
}

/// In a private mount namespace without tracefs, twtrace mounts it itself
/// and traces normally; the host's mounts are untouched.
fn tracefs_is_mounted_when_missing() {
    let script = format!(
        "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; \
         umount /sys/kernel/debug 2>/dev/null; \
         test ! -e /sys/kernel/tracing/events || exit 90; \
         {} trace --duration 1s",
        env!("CARGO_BIN_EXE_twtrace")
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("running unshare (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(90), "could not hide tracefs: {err}");
    assert!(out.status.success(), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .last()
            .is_some_and(|l| l.contains("transitions in")),
        "{stdout}"
    );
}

/// A tmux session of the test's own, killed however the test ends.
struct Tmux {
    name: String,
}

impl Tmux {
    fn run(args: &[&str]) -> String {
        let out = std::process::Command::new("tmux")
            .args(args)
            .output()
            .expect("running tmux (cargo xtask test installs it)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        Self::run(&["capture-pane", "-p", "-t", &self.name])
    }

    /// Polls the screen until `wanted` holds, or panics after `limit`.
    fn wait_for(&self, limit: Duration, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let screen = self.screen();
            if wanted(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "waiting for {what}; screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn keys(&self, keys: &str) {
        Self::run(&["send-keys", "-t", &self.name, keys]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .status();
    }
}

/// The real binary in a real terminal: the process making connections
/// shows up as the closer, keys work, and `q` restores the terminal.
fn top_view_in_tmux_shows_the_closer_and_quits_cleanly() {
    let netns = Netns::new();
    let mut maker = Peer::time_wait_maker(&netns, 30);
    let dir = std::env::temp_dir().join(format!("twtrace-tmux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let script = format!(
        "stty -g > {d}/before; {bin} --pid {pid}; echo $? > {d}/status; stty -g > {d}/after; sleep 30",
        d = dir.display(),
        bin = env!("CARGO_BIN_EXE_twtrace"),
        pid = maker.pid,
    );
    let tmux = Tmux {
        name: format!("twtrace-top-{}", std::process::id()),
    };
    Tmux::run(&[
        "new-session",
        "-d",
        "-s",
        &tmux.name,
        "-x",
        "160",
        "-y",
        "30",
        "sh",
        "-c",
        &script,
    ]);
    tmux.wait_for(Duration::from_secs(15), "the view", |s| {
        s.contains("who closes first")
    });

    maker.go();
    maker.wait_done();
    let pid = maker.pid.to_string();
    // 30 connections: 30 client sockets closed first (each now holding a
    // TIME_WAIT mini-socket), 30 accepted ones closed second: 60 closes.
    let screen = tmux.wait_for(Duration::from_secs(10), "the maker's row", |s| {
        s.lines().any(|l| l.contains(&pid) && l.contains(" 60 "))
    });
    let row: Vec<&str> = screen
        .lines()
        .find(|l| l.contains(&pid))
        .expect("row")
        .trim_matches('│')
        .split_whitespace()
        .collect();
    assert_eq!(row[5], "30", "TW NOW: {row:?}");
    assert_eq!(row.last(), Some(&"60"), "CLOSES: {row:?}");
    // Below the table, the trends: the closes just made show as bars.
    tmux.wait_for(Duration::from_secs(5), "the charts", |s| {
        s.contains("closes/s active") && s.chars().any(|c| "▁▂▃▄▅▆▇█".contains(c))
    });

    tmux.keys("?");
    tmux.wait_for(Duration::from_secs(5), "help", |s| {
        s.contains("pause the display")
    });
    tmux.keys("Escape");
    tmux.keys("Enter");
    tmux.wait_for(Duration::from_secs(5), "detail", |s| {
        s.contains("time in state")
    });
    tmux.keys("Escape");
    tmux.keys("q");
    let status_file = dir.join("status");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status_file.exists() {
        assert!(
            Instant::now() < deadline,
            "twtrace did not quit on q: {}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(200));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect(name);
    assert_eq!(read("status").trim(), "0");
    assert_eq!(read("before"), read("after"), "terminal modes not restored");
    let after = tmux.screen();
    assert!(
        !after.contains("who closes first"),
        "view still on screen:\n{after}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
