//! TIME_WAIT mini-sockets: births, orphaned FIN_WAIT2, early ends when a
//! namespace goes, several closers at once, and a real 60 s expiry.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use twtrace::{
    event::{EventKind, TcpState, Transition, TwEnd},
    loader::{LossReport, TracerOptions},
};

use crate::{
    Test,
    at_scale::{self, Kernel},
    peer::{Ending, Netns, Peer},
    support::{
        self, ACTIVE_CLOSE, Exchange, client_local, of_socket, steps, trace_until, trace_while,
        whole_teardown,
    },
};

pub const TESTS: &[Test] = crate::tests![
    netns_deletion_cancels_every_time_wait,
    orphaned_fin_wait2_then_time_wait_at_peer_fin,
    three_closers_own_their_time_waits,
    time_wait_expires_after_60s_when_the_wheel_fires,
];

/// Run with nothing beside them (`MACHINE`): the overtaken hand-overs
/// because the kernel side counts races host-wide, and their slowed
/// hand-overs would slow every other run's.
pub const ALONE: &[Test] = crate::tests![
    births_whose_hand_over_went_unseen_are_counted_when_they_end,
    fins_that_overtake_the_hand_over_leave_no_birth_unreported,
    resets_that_overtake_the_hand_over_leave_no_birth_unreported,
];

/// Deleting a namespace destroys its TIME_WAIT sockets: one early end per
/// socket, each having lived less than the time the test waited.
fn netns_deletion_cancels_every_time_wait() {
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
fn orphaned_fin_wait2_then_time_wait_at_peer_fin() {
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
fn three_closers_own_their_time_waits() {
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
fn time_wait_expires_after_60s_when_the_wheel_fires() {
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

/// The kernel skipping both programs of a hand-over, made certain: the
/// state-change hooks are unloaded once attached, so each of the maker's
/// mini-sockets is armed (seen) but handed over unseen. None is reported;
/// when its namespace is deleted, each is counted as a birth missed, one
/// per socket. Alone: every mini-socket on the host whose hand-over goes
/// unseen meanwhile would count.
fn births_whose_hand_over_went_unseen_are_counted_when_they_end() {
    const SOCKETS: u64 = 10;
    if !cfg!(feature = "fault-injection") {
        support::skip("needs a build with --features fault-injection (cargo xtask test has it)");
    }
    support::require_time_wait();
    let mut netns = Netns::new();
    let maker = Peer::time_wait_maker(&netns, usize::try_from(SOCKETS).unwrap());
    let options = TracerOptions {
        pids: vec![maker.pid],
        ..TracerOptions::default()
    };
    let mut unseen = Unseen {
        maker,
        births: 0,
        deleted_at: None,
        netns: &mut netns,
        expected: SOCKETS,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let end = runtime
        .block_on(twtrace::session::run(
            &options,
            Some(Duration::from_secs(30)),
            twtrace::session::Announce::Silently,
            &mut unseen,
        ))
        .expect("loading and attaching twtrace");
    assert_eq!(unseen.births, 0, "births reported without their hand-over");
    assert_eq!(end.loss.tw_births_missed, SOCKETS, "{:?}", end.loss);
}

struct Unseen<'a> {
    maker: Peer,
    births: u64,
    deleted_at: Option<Instant>,
    netns: &'a mut Netns,
    expected: u64,
}

impl twtrace::session::Consumer for Unseen<'_> {
    fn attached(&mut self, tracer: &mut twtrace::loader::Tracer) -> anyhow::Result<()> {
        #[cfg(feature = "fault-injection")]
        tracer.unload_state_changes()?;
        #[cfg(not(feature = "fault-injection"))]
        let _ = tracer;
        self.maker.go();
        self.maker.wait_done();
        // Their timers are cancelled with the namespace.
        self.netns.delete();
        self.deleted_at = Some(Instant::now());
        Ok(())
    }

    fn kernel_event(&mut self, event: &twtrace::event::KernelEvent) {
        self.births += u64::from(event.kind == EventKind::TwBirth);
    }

    fn transition(&mut self, _t: &Transition) -> std::io::Result<()> {
        Ok(())
    }

    fn tick(
        &mut self,
        status: &twtrace::session::Status,
    ) -> std::io::Result<std::ops::ControlFlow<()>> {
        let counted = status.loss.tw_births_missed >= self.expected;
        let waited = self
            .deleted_at
            .is_some_and(|at| at.elapsed() > Duration::from_secs(10));
        Ok(if counted || waited {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        })
    }
}

/// A peer's FIN can reach a new mini-socket on another CPU before the
/// closing CPU has run its hand-over (`tcp_done` after `tcp_time_wait`):
/// the churn test lost one birth in ~360 000 that way, counted as
/// missed and never reported. Here the hand-over is slowed (fault
/// injection) while each client's FIN comes from CPU 1 a little later
/// every time, so the FIN overtakes it again and again: every birth must
/// be reported (as the TIME_WAIT the FIN made it), and end.
fn fins_that_overtake_the_hand_over_leave_no_birth_unreported() {
    overtaken_hand_overs(false);
}

/// The same with an RST (the client aborts): it ends the mini-socket
/// before its hand-over, which must report it born and cancelled.
fn resets_that_overtake_the_hand_over_leave_no_birth_unreported() {
    overtaken_hand_overs(true);
}

fn overtaken_hand_overs(reset: bool) {
    const CONNECTIONS: u64 = 400;
    if !cfg!(feature = "fault-injection") {
        support::skip("needs a build with --features fault-injection (cargo xtask test has it)");
    }
    support::require_time_wait();
    // Under emulation (1 000-3 800 connections/s) the hand-over can come
    // later than the 2 ms a race is recognised in, and the FIN too late.
    at_scale::require_birth_counters();
    at_scale::require_scale_tests();
    if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        support::skip("needs two CPUs: the FIN and the hand-over race on different ones");
    }
    let mut netns = Netns::new();
    // An orphaned FIN_WAIT2 mini-socket then waits 10 s, so the FIN's
    // re-arm to TIME_WAIT's 60 s moves its timer, which the kernel traces.
    at_scale::sysctl_in(&netns, "net.ipv4.tcp_fin_timeout", 10);
    let mut racer = Peer::racer(&netns, usize::try_from(CONNECTIONS).unwrap(), reset);
    let before = Kernel::read(&netns.name);
    let mut after = None;
    let options = TracerOptions {
        #[cfg(feature = "fault-injection")]
        slow_hand_over_ns: 300_000,
        ..TracerOptions::default()
    };
    let (count, end) = at_scale::trace_with(
        &options,
        &mut racer,
        Duration::from_mins(1),
        None,
        |count| {
            after = Some(Kernel::read(&netns.name));
            netns.delete();
            count
        },
    );
    let births = after.expect("the racer finished").births() - before.births();
    eprintln!(
        "kernel: {births} births; twtrace: {} births, {} ends, {} overtaken; {:?}",
        count.births, count.ends, end.time_wait.hand_overs_raced, end.loss
    );
    if reset {
        // An RST that comes before close() ends the full socket itself.
        assert!(births > 0, "no TIME_WAIT at all");
    } else {
        assert_eq!(births, CONNECTIONS, "one TIME_WAIT per connection");
    }
    assert_eq!(count.births, births, "births reported against the kernel's");
    assert!(
        end.time_wait.hand_overs_raced > 0,
        "no packet overtook a hand-over: the test proved nothing"
    );
    assert_eq!(count.ends, count.births, "every birth reported has an end");
    count.assert_one_end_per_birth();
    assert_eq!(end.loss, LossReport::default(), "lost: {:?}", end.loss);
}
