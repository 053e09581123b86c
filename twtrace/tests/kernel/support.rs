//! Running the real tracer around a test connection and collecting what
//! the kernel reports.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use twtrace::{
    event::{TcpState, Transition},
    loader::{Tracer, TracerOptions},
};

pub type Step = (TcpState, TcpState);

/// Why a kernel test cannot run here, if it cannot.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("kernel tests load eBPF programs: run them as root".into());
    }
    None
}

/// Starts the tracer, runs `drive` (which makes the traffic), then collects
/// transitions until `done` says the picture is complete or 10 s pass.
pub fn trace_while(
    options: &TracerOptions,
    drive: impl FnOnce(),
    done: impl Fn(&[Transition]) -> bool,
) -> Vec<Transition> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let mut tracer = Tracer::start(options).expect("loading and attaching twtrace");
        drive();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while !done(&seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = tokio::time::timeout(left, tracer.next_batch(&mut seen)).await;
        }
        // Anything late (e.g. a stray duplicate) must show up in assertions.
        tokio::time::sleep(Duration::from_millis(100)).await;
        tracer.drain(&mut seen);
        let loss = tracer.loss().expect("reading loss counters");
        assert_eq!(loss.events_lost(), 0, "events lost: {loss:?}");
        seen
    })
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

/// True once two sockets (client and server side) have reached CLOSE.
pub fn two_closed(seen: &[Transition]) -> bool {
    seen.iter().filter(|t| t.new == TcpState::Close).count() >= 2
}

pub const ACTIVE_CLOSE: [Step; 3] = [
    (TcpState::Established, TcpState::FinWait1),
    (TcpState::FinWait1, TcpState::FinWait2),
    (TcpState::FinWait2, TcpState::Close),
];

pub const PASSIVE_CLOSE: [Step; 3] = [
    (TcpState::Established, TcpState::CloseWait),
    (TcpState::CloseWait, TcpState::LastAck),
    (TcpState::LastAck, TcpState::Close),
];
