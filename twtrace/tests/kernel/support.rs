//! Running the real tracer around a test connection and collecting what
//! the kernel reports.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use twtrace::{
    event::{KernelEvent, TcpState, Transition, TwEnd},
    loader::{LossReport, Tracer, TracerOptions},
    model::TeardownModel,
    sys,
};

pub type Step = (TcpState, TcpState);

/// Why a kernel test cannot run here, if it cannot.
/// The payload of `skip`: why the running kernel cannot give what a test
/// checks.
pub struct Skip(pub String);

/// Ends the calling test as skipped, with the reason (the harness catches
/// this). Only for what the kernel truly cannot provide.
pub fn skip(reason: impl Into<String>) -> ! {
    std::panic::panic_any(Skip(reason.into()))
}

/// Keeps the panic hook from printing a skip as if it were a failure.
pub fn quiet_skips() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.payload().is::<Skip>() {
            default(info);
        }
    }));
}

/// TIME_WAIT mini-sockets are seen through their timer, whose handler
/// twtrace finds by name; a kernel without it cannot show them.
pub fn require_time_wait() {
    if !matches!(
        twtrace::sys::kallsyms_lookup("tw_timer_handler"),
        Ok(Some(_))
    ) {
        skip("no symbol tw_timer_handler in /proc/kallsyms: TIME_WAIT cannot be followed");
    }
}

pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("kernel tests load eBPF programs: run them as root".into());
    }
    None
}

/// What one traced run produced.
pub struct Traced {
    /// The kernel's own events, before the teardown model.
    pub raw: Vec<KernelEvent>,
    pub transitions: Vec<Transition>,
}

/// Starts the tracer, runs `drive` (which makes the traffic), then collects
/// transitions until `done` says the picture is complete or `limit` passes.
/// `drive` gets a callback that reports what has been seen so far, for
/// steps that must wait on the kernel.
pub fn trace_until(
    options: &TracerOptions,
    limit: Duration,
    drive: impl FnOnce(),
    done: impl Fn(&[Transition]) -> bool,
) -> Traced {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let mut tracer = Tracer::start(options).expect("loading and attaching twtrace");
        drive();
        let deadline = Instant::now() + limit;
        let mut model = TeardownModel::new(sys::kernel_hz());
        let mut raw = Vec::new();
        let mut batch = Vec::new();
        let mut seen = Vec::new();
        while !done(&seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let wait = left.min(Duration::from_millis(50));
            let _ = tokio::time::timeout(wait, tracer.next_batch(&mut batch)).await;
            for event in batch.drain(..) {
                raw.push(event.clone());
                model.push(event, &mut seen);
            }
            model.flush(sys::monotonic_ns(), &mut seen);
        }
        // Anything late (e.g. a stray duplicate) must show up in assertions.
        tokio::time::sleep(Duration::from_millis(100)).await;
        tracer.drain(&mut batch);
        for event in batch.drain(..) {
            raw.push(event.clone());
            model.push(event, &mut seen);
        }
        model.finish(&mut seen);
        let loss = tracer.loss().expect("reading loss counters");
        // Recursion misses are not asserted: with several tracers loaded at
        // once (tests run in parallel), the kernel skips a tracing program
        // whenever a tracepoint fires in an interrupt while any classic
        // tracepoint program runs on that CPU, mostly for unrelated timers.
        // A miss that mattered fails the content assertions instead.
        let unexplained = LossReport {
            recursion_misses: 0,
            ..loss
        };
        assert_eq!(unexplained.events_lost(), 0, "events lost: {loss:?}");
        Traced {
            raw,
            transitions: seen,
        }
    })
}

pub fn trace_while(
    options: &TracerOptions,
    drive: impl FnOnce(),
    done: impl Fn(&[Transition]) -> bool,
) -> Vec<Transition> {
    trace_until(options, Duration::from_secs(10), drive, done).transitions
}

/// True once `n` TIME_WAIT (or FIN_WAIT2) mini-sockets have ended.
pub fn mini_sockets_ended(seen: &[Transition], n: usize) -> bool {
    seen.iter().filter(|t| t.end.is_some()).count() >= n
}

pub fn ended(t: &Transition) -> Option<TwEnd> {
    t.end
}

/// Transitions of the socket whose local address is `local`, in order.
pub fn of_socket(seen: &[Transition], local: SocketAddr) -> Vec<&Transition> {
    seen.iter().filter(|t| t.src == local).collect()
}

pub fn steps(transitions: &[&Transition]) -> Vec<Step> {
    transitions.iter().map(|t| (t.old, t.new)).collect()
}

/// Every socket seen, keyed by local address, for failure messages.
pub fn by_socket(seen: &[Transition]) -> BTreeMap<SocketAddr, Vec<Step>> {
    let mut map: BTreeMap<SocketAddr, Vec<Step>> = BTreeMap::new();
    for t in seen {
        map.entry(t.src).or_default().push((t.old, t.new));
    }
    map
}

/// The active closer, seen whole: the full socket's FIN_WAIT2 -> CLOSE is
/// only its hand-over to the TIME_WAIT mini-socket, which ends at CLOSE.
pub const ACTIVE_CLOSE: [Step; 4] = [
    (TcpState::Established, TcpState::FinWait1),
    (TcpState::FinWait1, TcpState::FinWait2),
    (TcpState::FinWait2, TcpState::TimeWait),
    (TcpState::TimeWait, TcpState::Close),
];

pub const PASSIVE_CLOSE: [Step; 3] = [
    (TcpState::Established, TcpState::CloseWait),
    (TcpState::CloseWait, TcpState::LastAck),
    (TcpState::LastAck, TcpState::Close),
];
