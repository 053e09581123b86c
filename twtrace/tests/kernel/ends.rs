//! How each connection ended: an orderly FIN, a reset this host sent (and
//! why), a reset received, a timeout — each driven for real by two
//! processes whose teardown the test controls, and held to what the
//! kernel itself says (its errno to the process, `nstat`'s counters).

use std::{net::SocketAddr, os::unix::fs::MetadataExt, process::Command};

use twtrace::{
    event::{ConnectionEnd, ResetReason, TcpState, Transition, TwEnd},
    loader::TracerOptions,
};
use twtrace_common::reset_reason;

use crate::{
    Test,
    peer::{Ending, Netns, Peer},
    support::{
        self, Exchange, client_local, command_stdout, interrupt, of_socket, spawn_attached,
        trace_until, trace_while,
    },
};

pub const TESTS: &[Test] = crate::tests![
    a_zero_linger_close_is_a_reset_sent_by_the_closer_and_received_by_the_peer,
    the_raw_tracepoints_tell_a_zero_linger_reset_the_same,
    close_with_unread_data_resets_the_connection,
    data_after_shutdown_is_a_reset_sent_by_the_shut_side_from_softirq,
    an_orderly_close_ends_in_fin_on_the_passive_side,
    a_peer_that_stops_answering_ends_in_a_timeout,
    an_unanswered_keepalive_ends_in_a_timeout_after_its_reset,
    syns_to_a_closed_port_are_resets_without_a_connection,
    thousands_of_aborts_match_the_kernels_reset_counters,
    summary_names_the_client_that_aborts_its_redis_connections,
];

fn reason(code: u8) -> ResetReason {
    ResetReason::from_code(code).expect("a reset reason")
}

fn ended(seen: &[Transition]) -> Vec<&Transition> {
    seen.iter().filter(|t| t.ending.is_some()).collect()
}

/// The last transition of the socket at `local`.
fn last_of(seen: &[Transition], local: SocketAddr) -> &Transition {
    of_socket(seen, local)
        .last()
        .copied()
        .unwrap_or_else(|| panic!("no transition of {local}: {seen:#?}"))
}

/// Runs an exchange whose client ends as `client` and server as `server`;
/// returns what was seen once both connections' ends are in.
fn reset_exchange(client: Ending, server: Ending, raw: bool) -> (Exchange, Vec<Transition>) {
    let mut ex = Exchange::new("127.0.0.1:0", client, server);
    let options = TracerOptions {
        raw_tracepoints: raw,
        ..ex.options()
    };
    let seen = trace_while(
        &options,
        || ex.run_then_end(),
        |seen| ended(seen).len() >= 2,
    );
    (ex, seen)
}

/// The closer's last transition is a reset sent, for `why`, owned by the
/// client process that closed; the server's is the reset received.
fn assert_reset_from_client(ex: &Exchange, seen: &[Transition], why: u8) {
    let closer = last_of(seen, client_local(seen, ex.server_addr));
    assert_eq!(
        (closer.old, closer.new, closer.ending),
        (
            TcpState::Established,
            TcpState::Close,
            Some(ConnectionEnd::ResetSent(reason(why)))
        ),
        "{seen:#?}"
    );
    assert_eq!(closer.owner.map(|o| o.pid), Some(ex.client_pid));
    let peer = last_of(seen, ex.server_addr);
    assert_eq!(
        (peer.old, peer.new, peer.ending),
        (
            TcpState::Established,
            TcpState::Close,
            Some(ConnectionEnd::ResetReceived)
        ),
        "{seen:#?}"
    );
    assert_eq!(peer.owner.map(|o| o.pid), Some(ex.server_pid));
    assert_eq!(ended(seen).len(), 2, "nothing else ended: {seen:#?}");
    assert!(
        seen.iter().all(|t| t.end.is_none()),
        "no TIME_WAIT: {seen:#?}"
    );
}

fn a_zero_linger_close_is_a_reset_sent_by_the_closer_and_received_by_the_peer() {
    let (ex, seen) = reset_exchange(Ending::Abort, Ending::AwaitEnd, false);
    assert_reset_from_client(&ex, &seen, reset_reason::LINGER_ZERO);
}

fn the_raw_tracepoints_tell_a_zero_linger_reset_the_same() {
    let (ex, seen) = reset_exchange(Ending::Abort, Ending::AwaitEnd, true);
    assert_reset_from_client(&ex, &seen, reset_reason::LINGER_ZERO);
}

fn close_with_unread_data_resets_the_connection() {
    let (ex, seen) = reset_exchange(
        Ending::CloseUnread { wait_ms: 100 },
        Ending::SendMoreThenAwaitEnd,
        false,
    );
    assert_reset_from_client(&ex, &seen, reset_reason::UNREAD_DATA);
}

/// The kernel closes a socket shut for reading that receives data through
/// `tcp_reset()`, as if a reset had come in, then resets the peer — in the
/// softirq of the peer's send. The shut side's owner sent it.
fn data_after_shutdown_is_a_reset_sent_by_the_shut_side_from_softirq() {
    let (ex, seen) = reset_exchange(
        Ending::ShutdownBothThenWait { wait_ms: 300 },
        Ending::SendAfterPeerFin,
        false,
    );
    let shut = last_of(&seen, client_local(&seen, ex.server_addr));
    assert_eq!(
        (shut.old, shut.new, shut.ending),
        (
            TcpState::FinWait2,
            TcpState::Close,
            Some(ConnectionEnd::ResetSent(reason(
                reset_reason::DATA_AFTER_CLOSE
            )))
        ),
        "{seen:#?}"
    );
    assert_eq!(shut.owner.map(|o| o.pid), Some(ex.client_pid));
    let peer = last_of(&seen, ex.server_addr);
    assert_eq!(
        (peer.old, peer.new, peer.ending),
        (
            TcpState::CloseWait,
            TcpState::Close,
            Some(ConnectionEnd::ResetReceived)
        ),
        "{seen:#?}"
    );
    assert_eq!(peer.owner.map(|o| o.pid), Some(ex.server_pid));
    assert_eq!(ended(&seen).len(), 2, "{seen:#?}");
}

fn an_orderly_close_ends_in_fin_on_the_passive_side() {
    let mut ex = Exchange::new(
        "127.0.0.1:0",
        Ending::CloseFirst,
        Ending::CloseAfterPeer { wait_ms: 0 },
    );
    let options = ex.options();
    let seen = trace_while(
        &options,
        || ex.run_then_end(),
        |seen| seen.iter().any(|t| t.end.is_some()) && !ended(seen).is_empty(),
    );
    let passive = last_of(&seen, ex.server_addr);
    assert_eq!(
        (passive.old, passive.new, passive.ending),
        (TcpState::LastAck, TcpState::Close, Some(ConnectionEnd::Fin))
    );
    // The active side ends with its mini-socket (the namespace's deletion
    // cancels it), not with a connection end of its full socket.
    let active = last_of(&seen, client_local(&seen, ex.server_addr));
    assert_eq!(
        (active.old, active.new, active.end, active.ending),
        (
            TcpState::TimeWait,
            TcpState::Close,
            Some(TwEnd::Cancelled),
            None
        ),
        "{seen:#?}"
    );
    assert_eq!(ended(&seen).len(), 1, "{seen:#?}");
}

/// A connection whose client ends as `ending` (`UserTimeout` or
/// `Keepalive`): once the request is answered the namespace's loopback
/// goes down, so nothing the client sends gets through. Returns the
/// client's last transition and the errno its read gave up with.
fn cut_off(ending: Ending) -> (Transition, i32, u32) {
    let netns = Netns::new();
    let server = Peer::server(&netns, "127.0.0.1:0", Ending::AwaitEnd);
    let server_addr = server.addr.expect("server address");
    let mut client = Peer::client(&netns, server_addr, ending);
    let options = TracerOptions {
        ports: vec![server_addr.port()],
        pids: vec![client.pid, server.pid],
        ..TracerOptions::default()
    };
    let client_pid = client.pid;
    let traced = trace_until(
        &options,
        std::time::Duration::from_secs(20),
        || {
            client.tell("go");
            assert_eq!(client.read_line(), "exchanged");
            ip(&["-n", &netns.name, "link", "set", "lo", "down"]);
            client.tell("cut");
        },
        |seen| {
            seen.iter()
                .any(|t| t.dst == server_addr && t.ending.is_some())
        },
    );
    let errno: i32 = client.read_line().parse().expect("the client's errno");
    // Let the server's close reach the client's (closed) end, which
    // resets it: nothing stays behind in the namespace.
    ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
    drop(server);
    let seen = traced.transitions;
    let last = seen
        .iter()
        .rev()
        .find(|t| t.dst == server_addr)
        .cloned()
        .unwrap_or_else(|| panic!("no client transition: {seen:#?}"));
    (last, errno, client_pid)
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("running ip");
    assert!(status.success(), "ip {args:?}: {status}");
}

fn a_peer_that_stops_answering_ends_in_a_timeout() {
    let (last, errno, client_pid) = cut_off(Ending::UserTimeout { ms: 1000 });
    assert_eq!(errno, libc::ETIMEDOUT, "the kernel gave up with ETIMEDOUT");
    assert_eq!(
        (last.old, last.new, last.ending),
        (
            TcpState::Established,
            TcpState::Close,
            Some(ConnectionEnd::Timeout(None))
        )
    );
    assert_eq!(last.owner.map(|o| o.pid), Some(client_pid));
}

/// Whether this kernel's `tcp_send_reset` says why (6.10+).
fn kernel_gives_reset_reasons() -> bool {
    std::fs::read_to_string("/sys/kernel/tracing/events/tcp/tcp_send_reset/format")
        .or_else(|_| {
            std::fs::read_to_string("/sys/kernel/debug/tracing/events/tcp/tcp_send_reset/format")
        })
        .is_ok_and(|format| format.contains("field:enum sk_rst_reason reason"))
}

fn an_unanswered_keepalive_ends_in_a_timeout_after_its_reset() {
    let (last, errno, _) = cut_off(Ending::Keepalive);
    assert_eq!(errno, libc::ETIMEDOUT);
    // The keepalive timer resets the connection, then fails it: where the
    // kernel names the reset's reason, the timeout carries it.
    let why = kernel_gives_reset_reasons().then(|| reason(reset_reason::KEEPALIVE_TIMEOUT));
    assert_eq!(
        (last.old, last.new, last.ending),
        (
            TcpState::Established,
            TcpState::Close,
            Some(ConnectionEnd::Timeout(why))
        )
    );
}

/// `nstat`'s absolute value of `name` inside `netns`.
fn nstat_in(netns: &Netns, name: &str) -> u64 {
    command_stdout("ip", &["netns", "exec", &netns.name, "nstat", "-az", name])
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("nstat has no {name}"))
}

fn syns_to_a_closed_port_are_resets_without_a_connection() {
    const SYNS: usize = 20;
    let netns = Netns::new();
    let inode = std::fs::metadata(format!("/run/netns/{}", netns.name))
        .expect("the namespace's file")
        .ino();
    // Nothing listens in a namespace just made.
    let port = 9;
    let mut refused = Peer::refused(&netns, port, SYNS);
    let resets_before = nstat_in(&netns, "TcpOutRsts");
    let options = TracerOptions {
        netns: Some(u32::try_from(inode).expect("an inode")),
        pids: vec![refused.pid],
        ..TracerOptions::default()
    };
    let traced = trace_while_collecting(&options, || {
        refused.go();
        refused.wait_done();
    });
    let resets = nstat_in(&netns, "TcpOutRsts") - resets_before;
    assert_eq!(resets, SYNS as u64, "the kernel's count");
    // Each connect() ended refused: the reset came in on SYN_SENT.
    let ends: Vec<_> = traced
        .transitions
        .iter()
        .filter(|t| t.ending.is_some())
        .map(|t| (t.old, t.new, t.ending, t.owner.map(|o| o.pid)))
        .collect();
    let refusal = (
        TcpState::SynSent,
        TcpState::Close,
        Some(ConnectionEnd::ResetReceived),
        Some(refused.pid),
    );
    assert_eq!(ends, vec![refusal; SYNS], "{:#?}", traced.transitions);
    // The resets that answered them ended no connection of this host.
    let apart = traced.resets_apart;
    if !kernel_gives_reset_reasons() {
        // Before 6.10 the kernel traces no reset sent without a socket
        // (twtrace says so when it starts): nothing may be counted.
        assert_eq!(apart.total(), 0, "{}", apart.describe());
        support::skip(
            "Linux before 6.10 does not trace resets sent without a socket (the refusals were checked)",
        );
    }
    assert_eq!(
        apart.0[usize::from(reset_reason::NO_SOCKET)],
        resets,
        "{}",
        apart.describe()
    );
    assert_eq!(apart.total(), resets, "{}", apart.describe());
}

/// Traces while `drive` runs, until every refused connection has ended.
fn trace_while_collecting(options: &TracerOptions, drive: impl FnOnce()) -> crate::support::Traced {
    trace_until(options, std::time::Duration::from_secs(10), drive, |seen| {
        seen.iter().filter(|t| t.ending.is_some()).count() >= 20
    })
}

/// At scale, against the kernel's own counters in the namespace: every
/// connection leaving ESTABLISHED for CLOSE (`TcpEstabResets`), the
/// resets sent (`TcpOutRsts`), the zero-linger aborts (which the kernel
/// counts as `TCPAbortOnData`) and the closes with data unread
/// (`TCPAbortOnClose`).
fn thousands_of_aborts_match_the_kernels_reset_counters() {
    const CONNECTIONS: usize = 10_000;
    let netns = Netns::new();
    let mut aborter = Peer::aborter(&netns, CONNECTIONS);
    let counters = [
        "TcpEstabResets",
        "TcpOutRsts",
        "TcpExtTCPAbortOnData",
        "TcpExtTCPAbortOnClose",
    ];
    let before = counters.map(|name| nstat_in(&netns, name));
    let options = TracerOptions {
        pids: vec![aborter.pid],
        // Room for every end of the run at once: under emulation the
        // reader falls behind (a smaller ring counts what it drops).
        ring_bytes: Some(16 << 20),
        ..TracerOptions::default()
    };
    let traced = trace_until(
        &options,
        std::time::Duration::from_mins(1),
        || {
            aborter.go();
            aborter.wait_done();
        },
        |seen| ended(seen).len() >= 2 * CONNECTIONS,
    );
    let after = counters.map(|name| nstat_in(&netns, name));
    let delta = |i: usize| after[i] - before[i];
    let count = |end: ConnectionEnd| {
        traced
            .transitions
            .iter()
            .filter(|t| t.ending == Some(end))
            .count() as u64
    };
    let linger = count(ConnectionEnd::ResetSent(reason(reset_reason::LINGER_ZERO)));
    let unread = count(ConnectionEnd::ResetSent(reason(reset_reason::UNREAD_DATA)));
    let received = count(ConnectionEnd::ResetReceived);
    let half = CONNECTIONS as u64 / 2;
    assert_eq!((linger, unread, received), (half, half, 2 * half));
    assert_eq!(
        ended(&traced.transitions).len(),
        CONNECTIONS * 2,
        "nothing else"
    );
    assert_eq!(delta(0), linger + unread + received, "TcpEstabResets");
    assert_eq!(delta(1), linger + unread, "TcpOutRsts");
    assert_eq!(delta(2), linger, "TCPAbortOnData (a zero linger)");
    assert_eq!(delta(3), unread, "TCPAbortOnClose (data unread)");
}

/// Debian's redis-server, in a namespace of its own, and a client that
/// aborts each connection after a `PING`: `twtrace summary`, run as a
/// user would, names the client, the count and the reason, and the
/// server's side as the resets it received.
fn summary_names_the_client_that_aborts_its_redis_connections() {
    const PINGS: usize = 50;
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        support::skip("redis-server is not installed (cargo xtask test installs Debian's)");
    }
    let netns = Netns::new();
    let port = 6379;
    let mut redis = Command::new("ip")
        .args(["netns", "exec", &netns.name, "redis-server"])
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("starting redis-server");
    let redis_pid = redis.id();
    wait_until_listening(&netns, port);
    let mut client = Peer::redis_aborter(&netns, port, PINGS);
    let summary = spawn_attached(
        Command::new(env!("CARGO_BIN_EXE_twtrace"))
            .args(["summary", "-o", "json", "--netns", &netns.name])
            .args(["--port", &port.to_string()])
            .stdout(std::process::Stdio::piped()),
    );
    client.go();
    client.wait_done();
    std::thread::sleep(std::time::Duration::from_millis(200));
    interrupt(&summary);
    let out = summary.wait_with_output().expect("summary");
    let _ = redis.kill();
    let _ = redis.wait();
    assert!(out.status.success(), "{}", out.status);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary JSON");
    let process = |pid: u32| {
        v["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .find(|p| p["pid"] == pid)
            .unwrap_or_else(|| panic!("pid {pid} missing: {v:#}"))
            .clone()
    };
    let aborting = process(client.pid);
    assert_eq!(
        (
            &aborting["ends"]["by_end"],
            &aborting["ends"]["reset_reasons"]
        ),
        (
            &serde_json::json!({"reset_sent": PINGS}),
            &serde_json::json!({"linger_zero": PINGS})
        ),
        "{v:#}"
    );
    let server = process(redis_pid);
    assert_eq!(server["comm"], "redis-server");
    assert_eq!(
        server["ends"]["by_end"],
        serde_json::json!({"reset_received": PINGS}),
        "{v:#}"
    );
    assert_eq!(
        v["ends"]["by_end"],
        serde_json::json!({"reset_sent": PINGS, "reset_received": PINGS}),
        "{v:#}"
    );
}

fn wait_until_listening(netns: &Netns, port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let wanted = format!(":{port} ");
    while !command_stdout("ip", &["netns", "exec", &netns.name, "ss", "-Htln"]).contains(&wanted) {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server did not listen on {port} within 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
