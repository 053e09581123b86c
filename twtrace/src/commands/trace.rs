//! `twtrace trace`: stream transitions until stopped.

use std::{
    io::{self, BufWriter, IsTerminal},
    path::Path,
};

use anyhow::{Context, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{Instant, sleep_until},
};

use crate::{
    cli::{FilterArgs, TraceArgs},
    loader::{Tracer, TracerOptions},
    output::stream::{StreamSummary, StreamWriter},
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

pub async fn run(args: TraceArgs, kernel_log: Option<log::LevelFilter>) -> anyhow::Result<()> {
    check_pids_exist(&args.filter)?;
    let options = TracerOptions {
        pids: args.filter.pids.clone(),
        ports: args.filter.ports.clone(),
        family: args.filter.family(),
        all_states: args.all_states,
        ring_bytes: args.capacity.ring_kib * 1024,
        max_sockets: args.capacity.max_sockets,
        kernel_log,
    };
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut tracer = Tracer::start(&options)?;
    for warning in tracer.warnings() {
        eprintln!("twtrace: warning: {warning}");
    }
    if io::stderr().is_terminal() || args.duration.is_none() {
        eprintln!("twtrace: tracing TCP teardown; Ctrl-C to stop");
    }

    let started_ns = sys::monotonic_ns();
    let deadline = args.duration.map(|d| Instant::now() + d);
    let mut out = StreamWriter::new(
        BufWriter::with_capacity(64 * 1024, io::stdout().lock()),
        args.output,
        sys::realtime_minus_monotonic_ns(),
    );
    out.header()?;
    out.flush()?;
    let mut batch = Vec::with_capacity(1024);
    let mut events = 0u64;
    loop {
        tokio::select! {
            ready = tracer.next_batch(&mut batch) => ready?,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => break,
        }
        events += write_batch(&mut out, &mut batch)?;
        out.flush()?;
    }
    // What the kernel streamed before the stop is still reported.
    tracer.drain(&mut batch);
    events += write_batch(&mut out, &mut batch)?;
    let summary = StreamSummary {
        events,
        duration_ns: sys::monotonic_ns().saturating_sub(started_ns),
        loss: tracer.loss()?,
    };
    out.summary(&summary)?;
    out.flush()?;
    Ok(())
}

fn write_batch<W: io::Write>(
    out: &mut StreamWriter<W>,
    batch: &mut Vec<crate::event::Transition>,
) -> io::Result<u64> {
    let n = batch.len() as u64;
    for transition in batch.drain(..) {
        out.transition(&transition)?;
    }
    Ok(n)
}
