//! Kernel tests: load the real eBPF program, drive real loopback
//! connections whose teardown the test controls, and assert what the
//! kernel reports — transitions, owners and durations.
//!
//! Run as root (`cargo xtask test` does). Without root every test is
//! reported as ignored, with the reason.

mod peer;
mod support;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use libtest_mimic::{Arguments, Failed, Trial};
use peer::{Ending, Peer};
use support::{ACTIVE_CLOSE, PASSIVE_CLOSE, of_socket, steps, trace_while};
use twtrace::{event::TcpState, loader::TracerOptions};

fn main() -> ExitCode {
    if let Some(code) = peer::run_if_peer() {
        return code;
    }
    let args = Arguments::from_args();
    let skip = support::skip_reason();
    if let Some(reason) = &skip {
        eprintln!("kernel tests skipped: {reason}");
    }
    let tests: [(&str, fn()); 11] = [
        (
            "active_closer_sees_fin_wait_then_close_ipv4",
            active_close_ipv4,
        ),
        (
            "active_closer_sees_fin_wait_then_close_ipv6",
            active_close_ipv6,
        ),
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
            "unprivileged_user_is_told_what_is_missing",
            unprivileged_user,
        ),
        ("tracefs_is_mounted_when_missing", tracefs_missing),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            Trial::test(name, move || {
                test();
                Ok::<(), Failed>(())
            })
            .with_ignored_flag(skip.is_some())
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// A client and a server process on `bind`; the client closes first and
/// the server closes `wait_ms` after seeing its FIN.
struct Exchange {
    client: Peer,
    server: Peer,
    server_addr: SocketAddr,
}

impl Exchange {
    fn new(bind: &str, client_ending: Ending, server_ending: Ending) -> Self {
        let server = Peer::server(bind, server_ending);
        let server_addr = server.addr.expect("server address");
        let client = Peer::client(server_addr, client_ending);
        Self {
            client,
            server,
            server_addr,
        }
    }

    fn options(&self) -> TracerOptions {
        TracerOptions {
            ports: vec![self.server_addr.port()],
            ..TracerOptions::default()
        }
    }
}

/// The client's local address: the one socket that talks to the server
/// port from elsewhere.
fn client_local(seen: &[twtrace::event::Transition], server: SocketAddr) -> SocketAddr {
    seen.iter().find(|t| t.dst == server).map_or_else(
        || panic!("no client socket seen: {:?}", support::by_socket(seen)),
        |t| t.src,
    )
}

fn active_close(bind: &str) -> Vec<twtrace::event::Transition> {
    let mut ex = Exchange::new(
        bind,
        Ending::CloseFirst,
        Ending::CloseAfterPeer { wait_ms: 0 },
    );
    let seen = trace_while(&ex.options(), || ex.client.go(), support::two_closed);
    let client = client_local(&seen, ex.server_addr);
    assert_eq!(
        steps(&of_socket(&seen, client)),
        ACTIVE_CLOSE,
        "client socket; all: {:?}",
        support::by_socket(&seen)
    );
    assert_eq!(
        steps(&of_socket(&seen, ex.server_addr)),
        PASSIVE_CLOSE,
        "server socket; all: {:?}",
        support::by_socket(&seen)
    );
    assert_eq!(
        seen.len(),
        6,
        "nothing else: {:?}",
        support::by_socket(&seen)
    );
    let Exchange { client, server, .. } = ex;
    client.finish();
    server.finish();
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
    let seen = trace_while(&ex.options(), || ex.client.go(), support::two_closed);
    let client = client_local(&seen, ex.server_addr);
    let owner_pids = |local| {
        of_socket(&seen, local)
            .iter()
            .map(|t| t.owner.as_ref().map(|o| o.pid))
            .collect::<Vec<_>>()
    };
    // Includes FIN_WAIT1→FIN_WAIT2, FIN_WAIT2→CLOSE, ESTABLISHED→CLOSE_WAIT
    // and LAST_ACK→CLOSE, which run in softirq (often in the *other*
    // process's context on loopback).
    assert_eq!(owner_pids(client), [Some(ex.client.pid); 3]);
    assert_eq!(owner_pids(ex.server_addr), [Some(ex.server.pid); 3]);
    let Exchange { client, server, .. } = ex;
    client.finish();
    server.finish();
}

fn close_wait_duration() {
    let mut ex = Exchange::new(
        "127.0.0.1:0",
        Ending::CloseFirst,
        Ending::CloseAfterPeer { wait_ms: 200 },
    );
    let seen = trace_while(&ex.options(), || ex.client.go(), support::two_closed);
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
    let Exchange { client, server, .. } = ex;
    client.finish();
    server.finish();
}

fn fin_wait2_after_shutdown() {
    let mut ex = Exchange::new(
        "127.0.0.1:0",
        Ending::ShutdownFirst,
        Ending::CloseAfterPeer { wait_ms: 200 },
    );
    let seen = trace_while(&ex.options(), || ex.client.go(), support::two_closed);
    let client = of_socket(&seen, client_local(&seen, ex.server_addr));
    assert_eq!(steps(&client), ACTIVE_CLOSE);
    let ns = client[2].in_state_ns.expect("time in FIN_WAIT2 measured");
    assert!(
        (200_000_000..1_000_000_000).contains(&ns),
        "FIN_WAIT2 lasted {ns} ns"
    );
    let Exchange { client, server, .. } = ex;
    client.finish();
    server.finish();
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
    let seen = trace_while(&ex.options(), || ex.client.go(), support::two_closed);
    let client = client_local(&seen, ex.server_addr);
    assert_eq!(steps(&of_socket(&seen, client)), ACTIVE_CLOSE);
    assert_eq!(steps(&of_socket(&seen, ex.server_addr)), PASSIVE_CLOSE);
    let Exchange { client, server, .. } = ex;
    client.finish();
    server.finish();
}

fn pid_filter(keep_client: bool) {
    let mut ex = Exchange::new(
        "127.0.0.1:0",
        Ending::CloseFirst,
        Ending::CloseAfterPeer { wait_ms: 0 },
    );
    let kept_pid = if keep_client {
        ex.client.pid
    } else {
        ex.server.pid
    };
    let options = TracerOptions {
        pids: vec![kept_pid],
        ..ex.options()
    };
    let seen = trace_while(
        &options,
        || ex.client.go(),
        |seen| seen.iter().any(|t| t.new == TcpState::Close),
    );
    assert_eq!(seen.len(), 3, "{:?}", support::by_socket(&seen));
    assert!(
        seen.iter()
            .all(|t| t.owner.as_ref().map(|o| o.pid) == Some(kept_pid))
    );
    let expected = if keep_client {
        ACTIVE_CLOSE
    } else {
        PASSIVE_CLOSE
    };
    assert_eq!(steps(&seen.iter().collect::<Vec<_>>()), expected);
    if keep_client {
        assert!(seen.iter().all(|t| t.dst == ex.server_addr));
    } else {
        assert!(seen.iter().all(|t| t.src == ex.server_addr));
    }
    let Exchange { client, server, .. } = ex;
    client.finish();
    server.finish();
}

fn pid_filter_client() {
    pid_filter(true);
}

fn pid_filter_server() {
    pid_filter(false);
}

/// The real binary, as a user runs it: JSON Lines, then a summary object.
fn cli_trace_json() {
    let mut ex = Exchange::new(
        "127.0.0.1:0",
        Ending::CloseFirst,
        Ending::CloseAfterPeer { wait_ms: 0 },
    );
    let port = ex.server_addr.port().to_string();
    let twtrace = std::process::Command::new(env!("CARGO_BIN_EXE_twtrace"))
        .args(["trace", "-o", "json", "--duration", "3s", "--port", &port])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting twtrace");
    // Attach takes well under a second from a release build.
    std::thread::sleep(Duration::from_millis(1500));
    ex.client.go();
    let out = twtrace.wait_with_output().expect("twtrace output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let (summary, transitions) = lines.split_last().expect("some output");
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["events"], 6);
    assert_eq!(summary["lost"], 0);
    assert_eq!(transitions.len(), 6);
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
    let names: Vec<(&str, &str)> = transitions
        .iter()
        .filter(|t| t["dst"] == ex.server_addr.to_string())
        .map(|t| {
            (
                t["old_state"].as_str().unwrap(),
                t["new_state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("ESTABLISHED", "FIN_WAIT1"),
            ("FIN_WAIT1", "FIN_WAIT2"),
            ("FIN_WAIT2", "CLOSE")
        ]
    );
    let Exchange { client, server, .. } = ex;
    client.finish();
    server.finish();
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
        stdout.lines().last().is_some_and(|l| l.starts_with("# ")),
        "{stdout}"
    );
}
