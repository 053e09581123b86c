//! Kernel tests: load the real eBPF program, drive real loopback
//! connections whose teardown the test controls, and assert what the
//! kernel reports — transitions, owners and durations.
//!
//! Each connection lives in a network namespace the test creates; deleting
//! it ends the TIME_WAIT sockets early, so the whole teardown is seen
//! without waiting 60 s (one test does wait, for a real expiry).
//!
//! Run as root (`cargo xtask test` does). Without root every test is
//! reported as ignored, with the reason.

mod peer;
mod reliability;
mod support;

use std::{
    net::SocketAddr,
    os::unix::process::ExitStatusExt,
    process::ExitCode,
    time::{Duration, Instant},
};

use libtest_mimic::{Arguments, Completion, Trial};
use peer::{Ending, Netns, Peer};
use support::{ACTIVE_CLOSE, PASSIVE_CLOSE, of_socket, steps, trace_until, trace_while};
use twtrace::{
    event::{EventKind, TcpState, Transition, TwEnd},
    loader::TracerOptions,
};

/// Every kernel test, by name.
const TESTS: &[(&str, fn())] = &[
    ("active_closer_is_seen_whole_ipv4", active_close_ipv4),
    ("active_closer_is_seen_whole_ipv6", active_close_ipv6),
    ("owner_is_the_process_not_the_cpu_task", owners_per_process),
    (
        "close_wait_lasts_as_long_as_the_peer_waits",
        close_wait_duration,
    ),
    (
        "fin_wait2_after_shutdown_lasts_until_peer_fin",
        fin_wait2_after_shutdown,
    ),
    (
        "close_after_shutdown_is_not_a_transition",
        close_after_shutdown,
    ),
    ("pid_filter_keeps_only_the_client_socket", pid_filter_client),
    (
        "pid_filter_keeps_only_the_accepted_socket",
        pid_filter_server,
    ),
    ("cli_trace_json_streams_and_summarises", cli_trace_json),
    (
        "cli_summary_json_has_per_state_histograms",
        cli_summary_json,
    ),
    (
        "unprivileged_user_is_told_what_is_missing",
        unprivileged_user,
    ),
    ("tracefs_is_mounted_when_missing", tracefs_missing),
    (
        "netns_deletion_cancels_every_time_wait",
        netns_deletion_cancels,
    ),
    (
        "orphaned_fin_wait2_then_time_wait_at_peer_fin",
        orphaned_fin_wait2,
    ),
    ("three_closers_own_their_time_waits", three_closers),
    (
        "time_wait_expires_after_60s_when_the_wheel_fires",
        time_wait_expiry,
    ),
    (
        "top_view_in_tmux_shows_the_closer_and_quits_cleanly",
        top_in_tmux,
    ),
    (
        "record_counts_exactly_the_workloads_connections",
        record_counts_the_workload,
    ),
    ("record_threshold_breaks_with_exit_3", record_thresholds),
    (
        "record_passes_the_commands_exit_through",
        record_exit_passthrough,
    ),
    ("record_ctrl_c_stops_the_command_and_reports", record_ctrl_c),
    (
        "record_bad_output_fails_before_the_command",
        record_bad_output,
    ),
    ("readme_ci_snippet_runs", readme_ci_snippet),
    ("doctor_matches_sysctl_and_nstat", doctor_matches_the_host),
    ("ports_held_matches_ss_within_one_percent", ports_match_ss),
    ("metrics_scrape_matches_the_summary", metrics_match_summary),
    (
        "nothing_stays_loaded_after_any_exit",
        reliability::nothing_stays_loaded,
    ),
    (
        "two_instances_are_independent",
        reliability::two_instances_are_independent,
    ),
    (
        "reader_stall_is_counted_and_recovered",
        reliability::reader_stall_is_counted_and_recovered,
    ),
    (
        "traced_pid_exits_mid_run_and_tracing_goes_on",
        reliability::traced_pid_exits_mid_run,
    ),
    (
        "exact_capabilities_suffice_and_each_missing_one_is_named",
        reliability::exact_capabilities,
    ),
];

fn main() -> ExitCode {
    if let Some(code) = peer::run_if_peer() {
        return code;
    }
    let args = Arguments::from_args();
    let skip = support::skip_reason();
    if let Some(reason) = &skip {
        eprintln!("kernel tests skipped: {reason}");
    }
    support::quiet_skips();
    let trials = TESTS
        .iter()
        .map(|&(name, test)| {
            let skip = skip.clone();
            Trial::ignorable_test(name, move || {
                if let Some(reason) = skip {
                    return Ok(Completion::ignored_with(reason));
                }
                // A test that finds the running kernel cannot give what it
                // checks says so with `support::skip`, and is reported as
                // ignored with that reason rather than passed or failed.
                match std::panic::catch_unwind(test) {
                    Ok(()) => Ok(Completion::Completed),
                    Err(payload) => match payload.downcast::<support::Skip>() {
                        Ok(skip) => Ok(Completion::ignored_with(skip.0)),
                        Err(payload) => std::panic::resume_unwind(payload),
                    },
                }
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// A client and a server process in a namespace of their own.
struct Exchange {
    netns: Netns,
    client: Option<Peer>,
    server: Option<Peer>,
    client_pid: u32,
    server_pid: u32,
    server_addr: SocketAddr,
}

impl Exchange {
    fn new(bind: &str, client_ending: Ending, server_ending: Ending) -> Self {
        let netns = Netns::new();
        let server = Peer::server(&netns, bind, server_ending);
        let server_addr = server.addr.expect("server address");
        let client = Peer::client(&netns, server_addr, client_ending);
        Self {
            client_pid: client.pid,
            server_pid: server.pid,
            client: Some(client),
            server: Some(server),
            netns,
            server_addr,
        }
    }

    /// Ports repeat across namespaces and pids do not: filter on both, so
    /// tests running in parallel never see each other's sockets.
    fn options(&self) -> TracerOptions {
        TracerOptions {
            ports: vec![self.server_addr.port()],
            pids: vec![self.client_pid, self.server_pid],
            ..TracerOptions::default()
        }
    }

    /// Lets the client connect, waits for both ends to finish, then deletes
    /// the namespace, which ends the TIME_WAIT socket early.
    fn run_then_end(&mut self) {
        self.client.as_mut().expect("client").go();
        self.client.take().expect("client").finish();
        self.server.take().expect("server").finish();
        std::thread::sleep(Duration::from_millis(50));
        self.netns.delete();
    }
}

/// True once the client's mini-socket and the server's socket have ended.
fn whole_teardown(seen: &[Transition]) -> bool {
    seen.iter().any(|t| t.end.is_some())
        && seen
            .iter()
            .any(|t| t.old == TcpState::LastAck && t.new == TcpState::Close)
}

/// The client's local address: the one socket that talks to the server
/// port from elsewhere.
fn client_local(seen: &[Transition], server: SocketAddr) -> SocketAddr {
    match seen.iter().find(|t| t.dst == server) {
        Some(t) => t.src,
        None => panic!("no client socket seen: {:?}", support::by_socket(seen)),
    }
}

fn active_close(bind: &str) -> Vec<Transition> {
    let mut ex = Exchange::new(
        bind,
        Ending::CloseFirst,
        Ending::CloseAfterPeer { wait_ms: 0 },
    );
    let seen = trace_while(&ex.options(), || ex.run_then_end(), whole_teardown);
    let client = client_local(&seen, ex.server_addr);
    let all = support::by_socket(&seen);
    assert_eq!(
        steps(&of_socket(&seen, client)),
        ACTIVE_CLOSE,
        "client; all: {all:?}"
    );
    assert_eq!(
        steps(&of_socket(&seen, ex.server_addr)),
        PASSIVE_CLOSE,
        "server; all: {all:?}"
    );
    assert_eq!(seen.len(), 7, "nothing else: {all:?}");
    let last = of_socket(&seen, client)[3];
    assert_eq!(last.end, Some(TwEnd::Cancelled));
    seen
}

fn active_close_ipv4() {
    let seen = active_close("127.0.0.1:0");
    assert!(seen.iter().all(|t| t.family() == "ipv4"));
}

fn active_close_ipv6() {
    let seen = active_close("[::1]:0");
    assert!(seen.iter().all(|t| t.family() == "ipv6"));
    assert!(seen.iter().all(|t| t.src.ip().to_string() == "::1"));
}

fn owners_per_process() {
    let mut ex = Exchange::new(
        "127.0.0.1:0",
        Ending::CloseFirst,
        Ending::CloseAfterPeer { wait_ms: 50 },
    );
    let seen = trace_while(&ex.options(), || ex.run_then_end(), whole_teardown);
    let client = client_local(&seen, ex.server_addr);
    let owner_pids = |local| {
        of_socket(&seen, local)
            .iter()
            .map(|t| t.owner.as_ref().map(|o| o.pid))
            .collect::<Vec<_>>()
    };
    // Includes FIN_WAIT1→FIN_WAIT2, the TIME_WAIT ones, ESTABLISHED→CLOSE_WAIT
    // and LAST_ACK→CLOSE, which run in softirq (often in the *other*
    // process's context on loopback) or in the namespace's cleanup worker.
    assert_eq!(owner_pids(client), [Some(ex.client_pid); 4]);
    assert_eq!(owner_pids(ex.server_addr), [Some(ex.server_pid); 3]);
}

fn close_wait_duration() {
    let mut ex = Exchange::new(
        "127.0.0.1:0",
        Ending::CloseFirst,
        Ending::CloseAfterPeer { wait_ms: 200 },
    );
    let seen = trace_while(&ex.options(), || ex.run_then_end(), whole_teardown);
    let server = of_socket(&seen, ex.server_addr);
    let close_wait = server
        .iter()
        .find(|t| t.old == TcpState::CloseWait && t.new == TcpState::LastAck)
        .expect("CLOSE_WAIT -> LAST_ACK");
    let ns = close_wait.in_state_ns.expect("time in CLOSE_WAIT measured");
    assert!(
        (200_000_000..1_000_000_000).contains(&ns),
        "CLOSE_WAIT lasted {ns} ns"
    );
}

fn fin_wait2_after_shutdown() {
    let mut ex = Exchange::new(
        "127.0.0.1:0",
        Ending::ShutdownFirst,
        Ending::CloseAfterPeer { wait_ms: 200 },
    );
    let seen = trace_while(&ex.options(), || ex.run_then_end(), whole_teardown);
    let client = of_socket(&seen, client_local(&seen, ex.server_addr));
    assert_eq!(steps(&client), ACTIVE_CLOSE);
    // Not orphaned: the full socket itself waits in FIN_WAIT2, then hands
    // over straight to TIME_WAIT when the peer's FIN comes.
    let ns = client[2].in_state_ns.expect("time in FIN_WAIT2 measured");
    assert!(
        (200_000_000..1_000_000_000).contains(&ns),
        "FIN_WAIT2 lasted {ns} ns"
    );
}

/// `shutdown()` then `close()` makes the kernel set `FIN_WAIT1` twice; twtrace
/// reports one `FIN_WAIT1` whose time runs from the shutdown.
fn close_after_shutdown() {
    let mut ex = Exchange::new(
        "127.0.0.1:0",
        Ending::ShutdownThenClose,
        // The server's ACK of the FIN is then delayed (~40 ms), so the
        // client's close() lands while it is still in FIN_WAIT1.
        Ending::SleepThenClose { wait_ms: 100 },
    );
    let seen = trace_while(&ex.options(), || ex.run_then_end(), whole_teardown);
    let client = client_local(&seen, ex.server_addr);
    assert_eq!(steps(&of_socket(&seen, client)), ACTIVE_CLOSE);
    assert_eq!(steps(&of_socket(&seen, ex.server_addr)), PASSIVE_CLOSE);
}

fn pid_filter(keep_client: bool) {
    let mut ex = Exchange::new(
        "127.0.0.1:0",
        Ending::CloseFirst,
        Ending::CloseAfterPeer { wait_ms: 0 },
    );
    let kept_pid = if keep_client {
        ex.client_pid
    } else {
        ex.server_pid
    };
    let options = TracerOptions {
        pids: vec![kept_pid],
        ..ex.options()
    };
    let done = move |seen: &[Transition]| {
        if keep_client {
            seen.iter().any(|t| t.end.is_some())
        } else {
            seen.iter().any(|t| t.new == TcpState::Close)
        }
    };
    let seen = trace_while(&options, || ex.run_then_end(), done);
    assert!(
        seen.iter()
            .all(|t| t.owner.as_ref().map(|o| o.pid) == Some(kept_pid))
    );
    let all: Vec<&Transition> = seen.iter().collect();
    if keep_client {
        assert_eq!(steps(&all), ACTIVE_CLOSE);
        assert!(seen.iter().all(|t| t.dst == ex.server_addr));
    } else {
        assert_eq!(steps(&all), PASSIVE_CLOSE);
        assert!(seen.iter().all(|t| t.src == ex.server_addr));
    }
}

fn pid_filter_client() {
    pid_filter(true);
}

fn pid_filter_server() {
    pid_filter(false);
}

/// Starts the real binary with `args`, filtered to the exchange's sockets.
fn spawn_twtrace(args: &[&str], ex: &Exchange) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_twtrace"))
        .args(args)
        .args(["--port", &ex.server_addr.port().to_string()])
        .args(["--pid", &ex.client_pid.to_string()])
        .args(["--pid", &ex.server_pid.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting twtrace")
}

/// Waits for twtrace's "tracing" line on stderr: it is attached.
fn wait_attached(child: &mut std::process::Child) {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line.expect("stderr line");
        if line.contains("tracing TCP teardown") {
            break;
        }
        // A warning names a feature this kernel lacks; anything else before
        // the "tracing" line is a failure to start.
        assert!(line.starts_with("twtrace: warning:"), "{line}");
    }
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
}

fn interrupt(child: &std::process::Child) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
}

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
    let mut other = also.map(|args| spawn_twtrace(args, &ex));
    wait_attached(&mut watcher);
    if let Some(child) = other.as_mut() {
        wait_attached(child);
    }
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
        let ended = line.contains("\"end\":");
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
fn cli_trace_json() {
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

fn cli_summary_json() {
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
}

/// As `nobody`, with no capabilities: one line naming them, exit 1.
fn unprivileged_user() {
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
fn tracefs_missing() {
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

/// Deleting a namespace destroys its TIME_WAIT sockets: one early end per
/// socket, each having lived less than the time the test waited.
fn netns_deletion_cancels() {
    const SOCKETS: usize = 20;
    support::require_time_wait();
    let mut netns = Netns::new();
    let mut maker = Peer::time_wait_maker(&netns, SOCKETS);
    let options = TracerOptions {
        pids: vec![maker.pid],
        ..TracerOptions::default()
    };
    let mut made_at = None;
    let traced = trace_until(
        &options,
        Duration::from_secs(15),
        || {
            maker.go();
            maker.wait_done();
            std::thread::sleep(Duration::from_millis(300));
            made_at = Some(Instant::now());
            netns.delete();
        },
        |seen| support::mini_sockets_ended(seen, SOCKETS),
    );
    let waited = made_at.expect("made").elapsed();
    let ends: Vec<&Transition> = traced
        .transitions
        .iter()
        .filter(|t| t.end.is_some())
        .collect();
    assert_eq!(
        ends.len(),
        SOCKETS,
        "{:?}",
        support::by_socket(&traced.transitions)
    );
    for end in &ends {
        assert_eq!(
            (end.old, end.new),
            (TcpState::TimeWait, TcpState::Close),
            "{end:?}"
        );
        assert_eq!(support::ended(end), Some(TwEnd::Cancelled));
        assert_eq!(end.owner.as_ref().map(|o| o.pid), Some(maker.pid));
        let lived = Duration::from_nanos(end.in_state_ns.expect("lifetime measured"));
        // Born before `made_at` (+300 ms), ended before `waited` after it.
        assert!(
            lived < waited + Duration::from_millis(400) && lived >= Duration::from_millis(300),
            "lived {lived:?}, waited {waited:?}"
        );
    }
    // One end per socket: every client socket of the maker, once.
    let mut socks: Vec<SocketAddr> = ends.iter().map(|t| t.src).collect();
    socks.sort();
    socks.dedup();
    assert_eq!(socks.len(), SOCKETS);
}

/// `close()` while the peer keeps its side open 300 ms: the mini-socket
/// waits in FIN_WAIT2 for 300 ms, then TIME_WAIT begins when the peer's
/// FIN arrives — recovered from the timer even if its re-arm is untraced.
fn orphaned_fin_wait2() {
    support::require_time_wait();
    let mut ex = Exchange::new(
        "127.0.0.1:0",
        Ending::CloseFirst,
        Ending::CloseAfterPeer { wait_ms: 300 },
    );
    let seen = trace_while(&ex.options(), || ex.run_then_end(), whole_teardown);
    let client_addr = client_local(&seen, ex.server_addr);
    let client = of_socket(&seen, client_addr);
    assert_eq!(
        steps(&client),
        ACTIVE_CLOSE,
        "{:?}",
        support::by_socket(&seen)
    );
    let tick_ns = 1_000_000_000 / twtrace::sys::kernel_hz().expect("HZ");
    let fin_wait2 = client[2].in_state_ns.expect("FIN_WAIT2 measured");
    assert!(
        fin_wait2 + tick_ns >= 300_000_000 && fin_wait2 < 300_000_000 + 100_000_000,
        "FIN_WAIT2 lasted {fin_wait2} ns"
    );
    // TIME_WAIT began when the peer sent its FIN: its CLOSE_WAIT -> LAST_ACK.
    let peer_fin = of_socket(&seen, ex.server_addr)
        .iter()
        .find(|t| t.new == TcpState::LastAck)
        .expect("server LAST_ACK")
        .ts_ns;
    let began = client[2].ts_ns;
    assert!(
        began.abs_diff(peer_fin) <= 2 * tick_ns,
        "TIME_WAIT began {began}, peer FIN {peer_fin}"
    );
    assert_eq!(
        client[3].ts_ns - client[3].in_state_ns.expect("TW measured"),
        began
    );
}

/// Three processes close connections concurrently to one server: each
/// TIME_WAIT belongs to the process that closed first, none to pid 0.
fn three_closers() {
    const PER_CLIENT: usize = 10;
    support::require_time_wait();
    let netns = Netns::new();
    let mut makers: Vec<Peer> = (0..3)
        .map(|_| Peer::time_wait_maker(&netns, PER_CLIENT))
        .collect();
    let pids: Vec<u32> = makers.iter().map(|m| m.pid).collect();
    let options = TracerOptions {
        pids: pids.clone(),
        ..TracerOptions::default()
    };
    let traced = trace_until(
        &options,
        Duration::from_secs(10),
        || {
            for m in &mut makers {
                m.go();
            }
            for m in &mut makers {
                m.wait_done();
            }
        },
        // Each maker's sockets reach TIME_WAIT (births or traced moves) or
        // at least hand over; the namespace is deleted after.
        |seen| seen.iter().filter(|t| t.new == TcpState::LastAck).count() >= 3 * PER_CLIENT,
    );
    drop(netns);
    let births: Vec<_> = traced
        .raw
        .iter()
        .filter(|e| e.kind == EventKind::TwBirth)
        .collect();
    // Every client socket handed over to a mini-socket; servers never.
    assert_eq!(
        births.len(),
        3 * PER_CLIENT,
        "{:?}",
        support::by_socket(&traced.transitions)
    );
    for pid in &pids {
        let own = births
            .iter()
            .filter(|e| e.transition.owner.as_ref().map(|o| o.pid) == Some(*pid))
            .count();
        assert_eq!(own, PER_CLIENT, "pid {pid}");
    }
    // Who closed first: each maker's client sockets went FIN_WAIT1.
    for t in &traced.transitions {
        assert!(t.owner.is_some(), "{t:?}");
    }
}

/// A TIME_WAIT socket left alone lives 60 s and ends when the timer wheel
/// fires its bucket — and leaves `ss` at that moment.
fn time_wait_expiry() {
    support::require_time_wait();
    let mut ex = Exchange::new(
        "127.0.0.1:0",
        Ending::ShutdownFirst,
        Ending::CloseAfterPeer { wait_ms: 0 },
    );
    let netns_name = ex.netns.name.clone();
    let time_waits = |netns: &str| {
        let ss = std::process::Command::new("ip")
            .args(["netns", "exec", netns, "ss", "-Htan", "state", "time-wait"])
            .output()
            .expect("ss");
        String::from_utf8_lossy(&ss.stdout).into_owned()
    };
    let before_expiry = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let traced = trace_until(
        &ex.options(),
        Duration::from_secs(75),
        || {
            ex.client.as_mut().expect("client").go();
            ex.client.take().expect("client").finish();
            ex.server.take().expect("server").finish();
            let (name, slot) = (netns_name.clone(), before_expiry.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(58));
                *slot.lock().expect("slot") = time_waits(&name);
            });
        },
        |seen| seen.iter().any(|t| t.end.is_some()),
    );
    let birth = traced
        .raw
        .iter()
        .find(|e| e.kind == EventKind::TwBirth)
        .expect("a TIME_WAIT birth");
    let tw = birth.tw.expect("timer facts");
    let end = traced
        .transitions
        .iter()
        .find(|t| t.end.is_some())
        .expect("an end");
    assert_eq!(end.end, Some(TwEnd::Expired));
    assert_eq!((end.old, end.new), (TcpState::TimeWait, TcpState::Close));
    let lived = end.in_state_ns.expect("lifetime");
    assert!(lived >= 60_000_000_000, "lived {lived} ns");
    let hz = twtrace::sys::kernel_hz().expect("HZ");
    let tick_ns = 1_000_000_000 / hz;
    if tw.bucket_expiry != 0 {
        // The wheel fires the bucket at `bucket_expiry`; allow one tick for
        // the softirq to run.
        let fires_ns = tw.birth_ns + (tw.bucket_expiry - tw.birth_jiffies) * tick_ns;
        assert!(
            end.ts_ns <= fires_ns + tick_ns,
            "ended {} ns after the bucket fired",
            end.ts_ns.saturating_sub(fires_ns)
        );
    }
    // Gone from the kernel's socket table too.
    let ss = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns_name,
            "ss",
            "-Htan",
            "state",
            "time-wait",
        ])
        .output()
        .expect("ss");
    let listing = String::from_utf8_lossy(&ss.stdout);
    assert!(
        !listing.contains(&end.src.to_string()),
        "still in ss after expiry: {listing}"
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
fn top_in_tmux() {
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
    assert_eq!(row[4], "30", "TW NOW: {row:?}");
    assert_eq!(row.last(), Some(&"60"), "CLOSES: {row:?}");

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

fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("twtrace-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// `sh -c` running the test binary as a workload that makes `count`
/// connections in a *grandchild* of twtrace (sh forks it), then sleeps so
/// that unrelated traffic overlaps the recording.
fn workload(count: usize, then: &str) -> Vec<String> {
    let (var, value) = peer::auto_maker_env(count);
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "{var}='{value}' '{bin}' & wait; {then}",
            bin = std::env::current_exe().expect("test binary").display()
        ),
    ]
}

fn record(args: &[&str], command: &[String]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_twtrace"))
        .arg("record")
        .args(args)
        .arg("--")
        .args(command)
        .output()
        .expect("running twtrace record")
}

fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("report written");
    serde_json::from_str(&text).expect("report is JSON")
}

/// Only the command's processes count, including ones it forks after
/// the start; the test's own connections made meanwhile do not.
fn record_counts_the_workload() {
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
    assert_eq!(v["schema"], "twtrace-record/1");
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

fn record_thresholds() {
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

fn record_exit_passthrough() {
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
fn record_ctrl_c() {
    let dir = scratch_dir("ctrl-c");
    let json = dir.join("report.json");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_twtrace"))
        .args([
            "record",
            "--json",
            json.to_str().unwrap(),
            "--",
            "sleep",
            "30",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("twtrace record");
    std::thread::sleep(Duration::from_millis(1500));
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
fn record_bad_output() {
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
fn readme_ci_snippet() {
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

fn command_stdout(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn nstat_value(name: &str) -> u64 {
    // -a: absolute values since boot; -z: print zeros too.
    command_stdout("nstat", &["-az", name])
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("nstat has no {name}"))
}

/// doctor's numbers are the host's: sysctls as `sysctl` reads them,
/// counters as `nstat` does (they may grow in between, so bracketed).
fn doctor_matches_the_host() {
    let before: Vec<u64> = ["TcpExtTW", "TcpExtTCPTimeWaitOverflow"]
        .iter()
        .map(|n| nstat_value(n))
        .collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_twtrace"))
        .args(["doctor", "-o", "json"])
        .output()
        .expect("twtrace doctor");
    let after: Vec<u64> = ["TcpExtTW", "TcpExtTCPTimeWaitOverflow"]
        .iter()
        .map(|n| nstat_value(n))
        .collect();
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
    for (i, name) in ["TW", "TCPTimeWaitOverflow"].iter().enumerate() {
        let got = host["netstat"][name].as_u64().expect(name);
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
    ] {
        assert!(ids.contains(&id), "{id} missing: {ids:?}");
    }
    for f in v["findings"].as_array().unwrap() {
        for key in ["severity", "title", "value", "meaning", "advice"] {
            assert!(f[key].is_string(), "{f}");
        }
    }
}

/// `twtrace ports` counts the TIME_WAIT ports toward one destination as
/// the kernel's own socket table does.
fn ports_match_ss() {
    const SOCKETS: usize = 1000;
    support::require_time_wait();
    let netns = Netns::new();
    let mut maker = Peer::time_wait_maker(&netns, SOCKETS);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_twtrace"))
        .args([
            "ports",
            "--duration",
            "5s",
            "-o",
            "json",
            "--pid",
            &maker.pid.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("twtrace ports");
    wait_attached(&mut child);
    maker.go();
    maker.wait_done();
    let ss = command_stdout(
        "ip",
        &[
            "netns",
            "exec",
            &netns.name,
            "ss",
            "-Htan",
            "state",
            "time-wait",
        ],
    );
    let in_ss = ss.lines().filter(|l| !l.trim().is_empty()).count();
    let out = child.wait_with_output().expect("twtrace ports output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ports JSON");
    let routes = v["routes"].as_array().expect("routes");
    let held: u64 = routes.iter().map(|r| r["held"].as_u64().unwrap()).sum();
    assert!(in_ss >= SOCKETS, "ss shows {in_ss}");
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
fn metrics_match_summary() {
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
    let mut summary = spawn_twtrace(&["summary", "-o", "json", "--metrics-addr", &addr], &ex);
    wait_attached(&mut summary);
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
