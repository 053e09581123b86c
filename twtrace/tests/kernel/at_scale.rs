//! TIME_WAIT at the kernel's own limits: 100 000 mini-sockets born on one
//! CPU, then on all of them, then a churn at this machine's top rate for
//! over two TIME_WAIT lengths — each in a namespace of its own, with
//! twtrace's counts held to the kernel's (`TcpExtTW` + `TcpExtTWKilled`
//! births, `TcpExtTCPTimeWaitOverflow`, sockstat's `tw`) and nothing lost.

use std::{
    collections::HashMap,
    io,
    ops::ControlFlow,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::Receiver,
    },
    time::{Duration, Instant},
};

use twtrace::{
    event::{EventKind, KernelEvent, Transition, TwEnd},
    loader::{LossReport, Tracer, TracerOptions},
    session::{self, Announce, Consumer, SessionEnd, Status},
};

use crate::{
    Test,
    peer::{Amount, Netns, Peer},
    support::{self, command_stdout},
};

pub const TESTS: &[Test] = crate::tests![
    at_scale_100k_time_wait_born_on_one_cpu_match_the_kernel,
    at_scale_100k_time_wait_born_on_every_cpu_match_the_kernel,
    at_scale_time_wait_now_matches_sockstat_through_two_lifetimes,
];

/// The namespace's own limit in the first two tests, and the connections
/// that overrun it.
const LIMIT: u64 = 100_000;
const CONNECTIONS: u64 = 110_000;
/// The churn of the third test: more than twice TIME_WAIT's 60 s.
const CHURN_SECS: u64 = 130;

/// 100 000 TIME_WAIT born on CPU 0, then the namespace deleted.
fn at_scale_100k_time_wait_born_on_one_cpu_match_the_kernel() {
    at_the_limit(Some("0"));
}

/// The same with the births spread over every CPU.
fn at_scale_100k_time_wait_born_on_every_cpu_match_the_kernel() {
    at_the_limit(None);
}

fn at_the_limit(cpus: Option<&str>) {
    require_birth_counters();
    require_scale_tests();
    support::require_time_wait();
    let mut netns = Netns::new();
    sysctl_in(&netns, "net.ipv4.tcp_max_tw_buckets", LIMIT);
    let mut flood = Peer::flood(&netns, Amount::Connections(CONNECTIONS), 2, cpus);
    let before = Kernel::read(&netns.name);
    let mut after = None;
    let end = trace(&mut flood, Duration::from_mins(5), None, |count| {
        // The flood is over: the kernel's counts, then every mini-socket
        // ended by deleting the namespace.
        after = Some(Kernel::read(&netns.name));
        netns.delete();
        count
    });
    let (count, end) = end;
    let after = after.expect("the flood finished in time");

    let births = after.births() - before.births();
    let overflowed = after.overflows - before.overflows;
    eprintln!(
        "kernel: {births} TIME_WAIT births, {overflowed} overflows; twtrace: {} births, {} ends, {} skipped TIME_WAIT; {:?} {:?}",
        count.births, count.ends, end.time_wait.skipped, end.loss, end.time_wait
    );
    assert!(
        births >= LIMIT - 1_000,
        "the flood made only {births} TIME_WAIT"
    );
    // In some runs (on one CPU 1 in 15 at worst, none in 100 at other
    // times; on every CPU too) the kernel skips both programs of a
    // hand-over (a state change, nested three deep), and one connection of
    // 110 000 is not reported. Such a birth is counted (`tw_births_missed`) when its
    // mini-socket ends, as is one whose owner was never learnt under the
    // pid filter; `births` must then equal what twtrace reported plus what
    // it counted. Silent shortfalls (a skipped TIME_WAIT the
    // kernel counted but twtrace did not see; one in 46 runs, before the
    // owner-unknown count, none since) pass by default up to
    // `RARE_SHORTFALL`, exact on request; anything like the map-size
    // losses this test was written for (thousands) fails.
    // Births counted rather than reported: hand-overs no program saw, and
    // (under the test's pid filter) those whose owner was never learnt.
    let missed = end.loss.tw_births_missed + end.loss.tw_births_owner_unknown;
    let shortfall =
        births.abs_diff(count.births + missed) + overflowed.abs_diff(end.time_wait.skipped);
    let allowed = if std::env::var_os("TWTRACE_SCALE_EXACT").is_some() {
        0
    } else {
        RARE_SHORTFALL
    };
    assert!(
        count.births + missed <= births
            && end.time_wait.skipped <= overflowed
            && shortfall <= allowed,
        "births {} (and {missed} counted missed) against the kernel's {births} (TcpExtTW + TcpExtTWKilled), skipped TIME_WAIT {} against {overflowed} (TcpExtTCPTimeWaitOverflow): {shortfall} short without a count, {allowed} allowed",
        count.births,
        end.time_wait.skipped
    );
    assert_eq!(count.ends, count.births, "every birth reported has an end");
    count.assert_one_end_per_birth();
    // A hand-over both programs were skipped for is a recursion miss, and
    // its mini-socket's end an end without a record; nothing else is lost.
    let mut loss = end.loss;
    loss.recursion_misses = loss.recursion_misses.saturating_sub(shortfall + missed);
    loss.tw_untracked_ends = loss.tw_untracked_ends.saturating_sub(missed);
    loss.tw_births_missed = 0;
    loss.tw_births_owner_unknown = 0;
    assert_eq!(loss, LossReport::default(), "lost: {:?}", end.loss);
}

/// What the first two tests let pass by default (see `at_the_limit`).
const RARE_SHORTFALL: u64 = 2;

/// At the top rate this machine reaches, for over twice TIME_WAIT's 60 s,
/// so births and expiries overlap: every second, twtrace's TIME_WAIT now
/// equals the namespace's sockstat `tw` within what was born or ended in
/// the second around the kernel's count.
fn at_scale_time_wait_now_matches_sockstat_through_two_lifetimes() {
    // Its lag of 1–3 behind sockstat (3 of 5 runs, long ago) was a peer's
    // FIN overtaking a hand-over, fixed; on request until it has passed
    // often enough to risk CI on it (2 of 2 since the fix).
    if std::env::var_os("TWTRACE_SCALE_CHURN").is_none() {
        support::skip("the churn against sockstat runs with TWTRACE_SCALE_CHURN=1 (135 s, alone)");
    }
    require_scale_tests();
    support::require_time_wait();
    let mut netns = Netns::new();
    let mut flood = Peer::flood(&netns, Amount::Seconds(CHURN_SECS), 2, None);
    let live = Arc::new(Live::default());
    let watch = Sampler::start(netns.name.clone(), live.clone());
    let mut seen = Vec::new();
    let (count, end) = trace(&mut flood, Duration::from_mins(5), Some(live), |count| {
        seen = watch.stop();
        netns.delete();
        count
    });
    let samples = seen;
    eprintln!(
        "{} samples, last {:?}; twtrace: {} births, {} ends; {:?} {:?}",
        samples.len(),
        samples.last(),
        count.births,
        count.ends,
        end.loss,
        end.time_wait
    );
    assert!(samples.len() >= 100, "too few samples: {}", samples.len());
    for s in &samples {
        for (when, twtrace) in [("before", s.before), ("after", s.after)] {
            assert!(
                s.kernel.abs_diff(twtrace) <= s.moved,
                "at {:?}: sockstat tw {} vs twtrace's {twtrace} {when} ({} born or ended meanwhile): {s:?}",
                s.at,
                s.kernel,
                s.moved
            );
        }
    }
    let expired = samples.last().map_or(0, |s| s.expired);
    assert!(expired > 0, "no TIME_WAIT expired during the churn");
    assert_eq!(count.ends, count.births, "every birth has an end");
    count.assert_one_end_per_birth();
    assert_nothing_lost(&end);
}

/// Connections a second a churn must reach for these tests: half this
/// host's ~16 000, twice what qemu's emulation reaches (3 300–3 800). At
/// 3 700, an emulated run sometimes passed it, and there, with programs ~100×
/// slower, interrupts nest three deep and the kernel skips both programs
/// of a pair (a counted loss these tests fail on).
const MIN_RATE: u64 = 8_000;

/// These need a machine that churns connections at a real server's rate;
/// under software emulation (the VM matrix) they would take many minutes,
/// so there they are skipped, with the rate measured.
pub fn require_scale_tests() {
    static RATE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let rate = *RATE.get_or_init(|| {
        let netns = Netns::new();
        let mut flood = Peer::flood(&netns, Amount::Seconds(2), 2, None);
        flood.go();
        flood.wait_done();
        // Every connection left a TIME_WAIT, none expired yet: sockstat
        // counts them on every kernel (TcpExtTW counts births only from
        // Linux 5.18).
        sockstat_tw(&netns.name).unwrap_or(0) / 2
    });
    if rate < MIN_RATE {
        support::skip(format!(
            "this machine churns {rate} connections/s (software emulation?); the at-scale tests need {MIN_RATE}"
        ));
    }
}

/// The kernel's own TIME_WAIT counters in one namespace.
pub struct Kernel {
    tw: u64,
    tw_killed: u64,
    overflows: u64,
}

impl Kernel {
    pub fn read(netns: &str) -> Self {
        let text = command_stdout("ip", &["netns", "exec", netns, "cat", "/proc/net/netstat"]);
        let counters = twtrace::sys::parse_netstat(&text);
        let get = |name: &str| {
            counters
                .get(name)
                .copied()
                .unwrap_or_else(|| panic!("no TcpExt {name}"))
        };
        Self {
            tw: get("TW"),
            tw_killed: get("TWKilled"),
            overflows: get("TCPTimeWaitOverflow"),
        }
    }

    /// Mini-sockets born: the kernel counts each in one of the two, by its
    /// first timeout.
    pub fn births(&self) -> u64 {
        self.tw + self.tw_killed
    }
}

/// For the tests that hold births to `TcpExtTW` + `TcpExtTWKilled`: before
/// Linux 5.18 those count expiries, and the kernel counts no births.
pub fn require_birth_counters() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if !twtrace::sys::tw_counters_count_births(release.trim()) {
        support::skip(
            "Linux before 5.18 counts TIME_WAIT expiries, not births, in TcpExtTW/TcpExtTWKilled: no kernel count of births to hold twtrace to",
        );
    }
}

fn sockstat_tw(netns: &str) -> Option<u64> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "cat", "/proc/net/sockstat"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "tw")?;
    words.next()?.parse().ok()
}

pub fn sysctl_in(netns: &Netns, name: &str, value: u64) {
    let setting = format!("{name}={value}");
    command_stdout(
        "ip",
        &["netns", "exec", &netns.name, "sysctl", "-q", "-w", &setting],
    );
}

/// Births and ends as twtrace reports them, by full-socket address.
#[derive(Default)]
pub struct Count {
    pub births: u64,
    pub ends: u64,
    expired: u64,
    born_by_sock: HashMap<u64, u64>,
    ended_by_sock: HashMap<u64, u64>,
}

impl Count {
    /// Every mini-socket ended once: none merged with another (which would
    /// leave one without an end), none ended twice.
    pub fn assert_one_end_per_birth(&self) {
        let wrong: Vec<(u64, u64, u64)> = self
            .born_by_sock
            .iter()
            .filter_map(|(sock, born)| {
                let ended = self.ended_by_sock.get(sock).copied().unwrap_or(0);
                (ended != *born).then_some((*sock, *born, ended))
            })
            .take(10)
            .collect();
        assert!(wrong.is_empty(), "(socket, births, ends): {wrong:x?}");
    }
}

/// twtrace's live counts, for the sampler.
#[derive(Default)]
pub struct Live {
    alive: AtomicU64,
    moved: AtomicU64,
    expired: AtomicU64,
}

/// The session's consumer: counts, starts the flood once attached, runs
/// `then` when the flood is done, and stops once every birth has ended
/// and nothing moved for a second.
struct Run<F> {
    count: Count,
    go: Option<Box<dyn FnOnce() + Send>>,
    done: Receiver<()>,
    then: Option<F>,
    live: Option<Arc<Live>>,
    finished: bool,
    last_move: (u64, Instant),
}

impl<F: FnOnce(Count) -> Count> Run<F> {
    fn publish(&self) {
        if let Some(live) = &self.live {
            let c = &self.count;
            live.alive
                .store(c.births.saturating_sub(c.ends), Ordering::Relaxed);
            live.moved.store(c.births + c.ends, Ordering::Relaxed);
            live.expired.store(c.expired, Ordering::Relaxed);
        }
    }
}

impl<F: FnOnce(Count) -> Count> Consumer for Run<F> {
    fn attached(&mut self, _tracer: &mut Tracer) -> anyhow::Result<()> {
        if let Some(go) = self.go.take() {
            go();
        }
        Ok(())
    }

    fn kernel_event(&mut self, event: &KernelEvent) {
        if event.kind == EventKind::TwBirth {
            self.count.births += 1;
            *self
                .count
                .born_by_sock
                .entry(event.transition.sock_id)
                .or_default() += 1;
            self.publish();
        }
    }

    fn transition(&mut self, t: &Transition) -> io::Result<()> {
        if let Some(end) = t.end {
            self.count.ends += 1;
            self.count.expired += u64::from(end == TwEnd::Expired);
            *self.count.ended_by_sock.entry(t.sock_id).or_default() += 1;
            self.publish();
        }
        Ok(())
    }

    fn tick(&mut self, _status: &Status) -> io::Result<ControlFlow<()>> {
        if !self.finished && self.done.try_recv().is_ok() {
            let then = self.then.take().expect("then runs once");
            self.count = then(std::mem::take(&mut self.count));
            self.finished = true;
        }
        let moved = self.count.births + self.count.ends;
        if moved != self.last_move.0 {
            self.last_move = (moved, Instant::now());
        }
        let quiet = self.last_move.1.elapsed() >= Duration::from_secs(1);
        let all_ended = self.count.ends >= self.count.births;
        Ok(if self.finished && all_ended && quiet {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    }
}

/// Traces `flood`'s sockets for at most `limit`; see `Run`.
fn trace(
    flood: &mut Peer,
    limit: Duration,
    live: Option<Arc<Live>>,
    then: impl FnOnce(Count) -> Count,
) -> (Count, SessionEnd) {
    trace_with(&TracerOptions::default(), flood, limit, live, then)
}

/// The same, from `options` (their pids and ports set to `flood`'s).
pub fn trace_with(
    options: &TracerOptions,
    flood: &mut Peer,
    limit: Duration,
    live: Option<Arc<Live>>,
    then: impl FnOnce(Count) -> Count,
) -> (Count, SessionEnd) {
    let options = TracerOptions {
        pids: vec![flood.pid],
        ports: vec![flood.addr.expect("flood port").port()],
        ..options.clone()
    };
    let mut run = Run {
        count: Count::default(),
        go: Some(Box::new(flood.go_signal())),
        done: flood.done_signal(),
        then: Some(then),
        live,
        finished: false,
        last_move: (0, Instant::now()),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let end = runtime
        .block_on(session::run(
            &options,
            Some(limit),
            Announce::Silently,
            &mut run,
        ))
        .expect("loading and attaching twtrace");
    assert!(run.finished, "the flood did not finish within {limit:?}");
    (run.count, end)
}

fn assert_nothing_lost(end: &SessionEnd) {
    let loss = &end.loss;
    assert_eq!(*loss, LossReport::default(), "lost: {loss:?}");
    assert_eq!(end.loss.tw_untracked_ends, 0, "{:?}", end.loss);
}

/// One look at the kernel's count, between two of twtrace's.
#[derive(Debug)]
struct Sample {
    at: Duration,
    kernel: u64,
    before: u64,
    after: u64,
    /// Births and ends twtrace saw between its two counts.
    moved: u64,
    expired: u64,
}

/// Reads sockstat every second in the namespace, bracketed by twtrace's
/// counts half a second either side: the status tick the kernel's count
/// falls in (twtrace's pipeline lags the kernel by tens of ms, and the
/// kernel counts a mini-socket from its allocation to its last reference,
/// a little apart from the timer events twtrace sees).
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(netns: String, live: Arc<Live>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let before = live.alive.load(Ordering::Relaxed);
                    let moved = live.moved.load(Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(500));
                    let Some(kernel) = sockstat_tw(&netns) else {
                        break;
                    };
                    std::thread::sleep(Duration::from_millis(500));
                    samples.push(Sample {
                        at: started.elapsed(),
                        kernel,
                        before,
                        after: live.alive.load(Ordering::Relaxed),
                        moved: live.moved.load(Ordering::Relaxed) - moved,
                        expired: live.expired.load(Ordering::Relaxed),
                    });
                }
                samples
            })
        };
        Self { stop, thread }
    }

    fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler")
    }
}
