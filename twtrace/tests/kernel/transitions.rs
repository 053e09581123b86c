//! Transitions and owners: the exact teardown sequence of each side, the
//! owner on every step, time in state against the peer's known wait, and
//! the pid filter.

use twtrace::{
    event::{TcpState, Transition, TwEnd},
    loader::TracerOptions,
};

use crate::{
    Test,
    peer::Ending,
    support::{
        self, ACTIVE_CLOSE, Exchange, PASSIVE_CLOSE, client_local, of_socket, steps, trace_while,
        whole_teardown,
    },
};

pub const TESTS: &[Test] = crate::tests![
    active_closer_is_seen_whole_ipv4,
    active_closer_is_seen_whole_ipv6,
    owner_is_the_process_not_the_cpu_task,
    close_wait_lasts_as_long_as_the_peer_waits,
    fin_wait2_after_shutdown_lasts_until_peer_fin,
    close_after_shutdown_is_not_a_transition,
    pid_filter_keeps_only_the_client_socket,
    pid_filter_keeps_only_the_accepted_socket,
    the_raw_tracepoint_pairs_see_the_same_teardown,
];

fn active_close(bind: &str) -> Vec<Transition> {
    active_close_through(bind, StateChanges::AsTheKernelAllows)
}

/// Which programs follow the state changes and the mini-sockets' timers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StateChanges {
    /// The typed pairs (`tp_btf`) where the kernel loads them.
    AsTheKernelAllows,
    /// The raw pairs, as on kernels that refuse the typed ones.
    Raw,
}

fn active_close_through(bind: &str, programs: StateChanges) -> Vec<Transition> {
    let mut ex = Exchange::new(
        bind,
        Ending::CloseFirst,
        Ending::CloseAfterPeer { wait_ms: 0 },
    );
    let options = TracerOptions {
        raw_tracepoints: programs == StateChanges::Raw,
        ..ex.options()
    };
    let expected = match programs {
        StateChanges::AsTheKernelAllows => ["inet_sock_set_state_btf", "timer_start_btf"],
        StateChanges::Raw => ["inet_sock_set_state_raw", "timer_start_raw"],
    };
    let mut loaded = String::new();
    let drive = || {
        loaded = support::command_stdout("bpftool", &["prog", "show"]);
        ex.run_then_end();
    };
    let seen = trace_while(&options, drive, whole_teardown);
    // Every kernel of the matrix loads the typed pairs: a refusal there is
    // a regression (twtrace -v says why), not a fallback to accept.
    for program in expected {
        assert!(
            loaded.contains(&format!("name {program} ")),
            "{program} was not loaded"
        );
    }
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

fn active_closer_is_seen_whole_ipv4() {
    let seen = active_close("127.0.0.1:0");
    assert!(seen.iter().all(|t| t.family() == "ipv4"));
}

fn active_closer_is_seen_whole_ipv6() {
    let seen = active_close("[::1]:0");
    assert!(seen.iter().all(|t| t.family() == "ipv6"));
    assert!(seen.iter().all(|t| t.src.ip().to_string() == "::1"));
}

/// The raw pairs do the typed pairs' work, field by field through the
/// helper: forced here, the same whole teardown (the mini-socket's end
/// included), IPv4 and IPv6.
fn the_raw_tracepoint_pairs_see_the_same_teardown() {
    let v4 = active_close_through("127.0.0.1:0", StateChanges::Raw);
    assert!(v4.iter().all(|t| t.family() == "ipv4"));
    let v6 = active_close_through("[::1]:0", StateChanges::Raw);
    assert!(v6.iter().all(|t| t.src.ip().to_string() == "::1"));
}

fn owner_is_the_process_not_the_cpu_task() {
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

fn close_wait_lasts_as_long_as_the_peer_waits() {
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

fn fin_wait2_after_shutdown_lasts_until_peer_fin() {
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
fn close_after_shutdown_is_not_a_transition() {
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

fn pid_filter_keeps_only_the_client_socket() {
    pid_filter(true);
}

fn pid_filter_keeps_only_the_accepted_socket() {
    pid_filter(false);
}
