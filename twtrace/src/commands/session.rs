//! One tracing run: load, attach, feed every transition to a consumer until
//! the duration ends or a signal arrives, then say what was lost.

use std::{io, path::Path, time::Duration};

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
}

/// How often pending mini-socket cancels are checked: a little more than
/// the model's grace period, so an early end shows within ~50 ms.
const FLUSH_EVERY: Duration = Duration::from_millis(25);

/// Runs until `duration` passes or SIGINT/SIGTERM, calling `on_transition`
/// for each transition and `on_batch_end` after each batch (to flush output).
pub async fn run(
    options: &TracerOptions,
    duration: Option<Duration>,
    mut on_transition: impl FnMut(&Transition) -> io::Result<()>,
    mut on_batch_end: impl FnMut() -> io::Result<()>,
) -> anyhow::Result<SessionEnd> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut tracer = Tracer::start(options)?;
    for warning in tracer.warnings() {
        eprintln!("twtrace: warning: {warning}");
    }
    eprintln!("twtrace: tracing TCP teardown; Ctrl-C to stop");

    let started_ns = sys::monotonic_ns();
    let deadline = duration.map(|d| Instant::now() + d);
    let mut model = TeardownModel::new(sys::kernel_hz());
    let mut flush = interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut raw = Vec::with_capacity(1024);
    let mut transitions = Vec::with_capacity(1024);
    let mut events = 0u64;
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
        model.flush(sys::monotonic_ns(), &mut transitions);
        events += deliver(&mut transitions, &mut on_transition)?;
        on_batch_end()?;
    }
    // What the kernel streamed before the stop is still reported.
    tracer.drain(&mut raw);
    for event in raw.drain(..) {
        model.push(event, &mut transitions);
    }
    model.finish(&mut transitions);
    events += deliver(&mut transitions, &mut on_transition)?;
    on_batch_end()?;
    Ok(SessionEnd {
        events,
        duration_ns: sys::monotonic_ns().saturating_sub(started_ns),
        loss: tracer.loss()?,
        tw_evictions: tracer.tw_evictions()?,
        time_wait_tracking: tracer.time_wait_enabled(),
    })
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
