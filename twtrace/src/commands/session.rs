//! One tracing run: load, attach, feed every transition to a consumer until
//! the duration ends or a signal arrives, then say what was lost.

use std::{io, ops::ControlFlow, path::Path, time::Duration};

use anyhow::{Context, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{Instant, MissedTickBehavior, interval, sleep_until},
};

use crate::{
    cli::{CapacityArgs, FilterArgs},
    event::Transition,
    loader::{LossReport, Tracer, TracerOptions},
    model::TeardownModel,
    sys,
};

/// Rejects pids that name no process: a typo would otherwise trace
/// nothing, silently.
pub fn check_pids_exist(filter: &FilterArgs) -> anyhow::Result<()> {
    for pid in &filter.pids {
        if !Path::new("/proc").join(pid.to_string()).exists() {
            bail!("no process with pid {pid}");
        }
    }
    Ok(())
}

#[must_use]
pub fn tracer_options(
    filter: &FilterArgs,
    capacity: &CapacityArgs,
    all_states: bool,
    kernel_log: Option<log::LevelFilter>,
) -> TracerOptions {
    TracerOptions {
        pids: filter.pids.clone(),
        ports: filter.ports.clone(),
        family: filter.family(),
        all_states,
        ring_bytes: capacity.ring_kib * 1024,
        max_sockets: capacity.max_sockets,
        kernel_log,
        follow_forks: false,
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct SessionEnd {
    pub events: u64,
    pub duration_ns: u64,
    pub loss: LossReport,
    pub tw_evictions: u64,
    pub time_wait_tracking: bool,
    /// Most TIME_WAIT mini-sockets (in either substate) alive at once.
    pub mini_socket_peak: u64,
}

/// How often pending mini-socket cancels are checked (so an early end
/// shows within ~50 ms), and how often a live consumer is called back.
const FLUSH_EVERY: Duration = Duration::from_millis(25);
/// How often loss counters are read for live consumers.
const STATUS_EVERY_NS: u64 = 1_000_000_000;

/// What a live consumer (the top view) shows besides transitions.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub loss: LossReport,
    pub tw_evictions: u64,
    pub time_wait_tracking: bool,
    pub warnings: Vec<String>,
    /// Mini-sockets alive per owner pid (see `TeardownModel::held_by_pid`).
    pub held_by_pid: std::collections::HashMap<u32, u64>,
    /// Ephemeral ports held per route (see `TeardownModel::held_by_route`).
    pub held_by_route: std::collections::HashMap<crate::model::Route, u64>,
}

/// Whether to print the start line and warnings on stderr; the top view
/// shows them itself, as nothing may write over it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Announce {
    OnStderr,
    Silently,
}

/// Runs until `duration` passes, SIGINT/SIGTERM, or `after_batch` says to
/// stop; calls `on_transition` for each transition and `after_batch` after
/// each batch and at least every 25 ms (to flush output, or draw).
pub async fn run(
    options: &TracerOptions,
    duration: Option<Duration>,
    announce: Announce,
    on_attached: impl FnOnce(&mut Tracer) -> anyhow::Result<()>,
    mut on_transition: impl FnMut(&Transition) -> io::Result<()>,
    mut after_batch: impl FnMut(&Status) -> io::Result<ControlFlow<()>>,
) -> anyhow::Result<SessionEnd> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut tracer = Tracer::start(options)?;
    if announce == Announce::OnStderr {
        for warning in tracer.warnings() {
            eprintln!("twtrace: warning: {warning}");
        }
        eprintln!("twtrace: tracing TCP teardown; Ctrl-C to stop");
    }
    let mut status = Status {
        time_wait_tracking: tracer.time_wait_enabled(),
        warnings: tracer.warnings().to_vec(),
        ..Status::default()
    };
    let mut status_read_ns = 0;
    on_attached(&mut tracer)?;

    let started_ns = sys::monotonic_ns();
    let deadline = duration.map(|d| Instant::now() + d);
    let mut model =
        TeardownModel::new(sys::kernel_hz()).with_port_range(sys::local_port_range().ok());
    let mut flush = interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut raw = Vec::with_capacity(1024);
    let mut transitions = Vec::with_capacity(1024);
    let mut events = 0u64;
    let panic_at = injected_panic_at();
    loop {
        tokio::select! {
            ready = tracer.next_batch(&mut raw) => ready?,
            _ = flush.tick() => {}
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => break,
        }
        for event in raw.drain(..) {
            model.push(event, &mut transitions);
        }
        let now = sys::monotonic_ns();
        model.flush(now, &mut transitions);
        events += deliver(&mut transitions, &mut on_transition)?;
        if now.saturating_sub(status_read_ns) >= STATUS_EVERY_NS {
            status.loss = tracer.loss()?;
            status.tw_evictions = tracer.tw_evictions()?;
            status.held_by_pid.clone_from(model.held_by_pid());
            status.held_by_route.clone_from(model.held_by_route());
            status_read_ns = now;
        }
        if after_batch(&status)?.is_break() {
            break;
        }
        assert!(
            panic_at.is_none_or(|at| Instant::now() < at),
            "TWTRACE_FAULT=panic-after-1s: injected panic"
        );
    }
    // What the kernel streamed before the stop is still reported.
    tracer.drain(&mut raw);
    for event in raw.drain(..) {
        model.push(event, &mut transitions);
    }
    model.finish(&mut transitions);
    events += deliver(&mut transitions, &mut on_transition)?;
    status.loss = tracer.loss()?;
    status.held_by_pid.clone_from(model.held_by_pid());
    status.held_by_route.clone_from(model.held_by_route());
    let _ = after_batch(&status)?;
    Ok(SessionEnd {
        events,
        duration_ns: sys::monotonic_ns().saturating_sub(started_ns),
        loss: tracer.loss()?,
        tw_evictions: tracer.tw_evictions()?,
        time_wait_tracking: tracer.time_wait_enabled(),
        mini_socket_peak: model.mini_sockets().1,
    })
}

/// Fault injection for the leak tests: `TWTRACE_FAULT=panic-after-1s`
/// panics in the middle of tracing, to show that a panic leaves nothing
/// loaded in the kernel and the terminal restored.
fn injected_panic_at() -> Option<Instant> {
    (std::env::var_os("TWTRACE_FAULT")? == "panic-after-1s")
        .then(|| Instant::now() + Duration::from_secs(1))
}

fn deliver(
    transitions: &mut Vec<Transition>,
    on_transition: &mut impl FnMut(&Transition) -> io::Result<()>,
) -> io::Result<u64> {
    let n = transitions.len() as u64;
    for t in transitions.drain(..) {
        on_transition(&t)?;
    }
    Ok(n)
}
