//! `twtrace record -- CMD`: trace exactly one workload (the command and
//! every process it forks, followed in the kernel), then write reports and
//! exit like the command did.

use std::{
    cell::{Cell, RefCell},
    fs::File,
    io::{self, BufWriter, Write},
    ops::ControlFlow,
    os::unix::process::ExitStatusExt,
    path::Path,
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;

use crate::{
    cli::RecordArgs,
    commands::session::{self, Announce},
    event::TcpState,
    histogram::TeardownStats,
    output::{
        record::{self, RecordReport, RunMeta},
        summary::SummaryReport,
    },
};

/// Exit code when the command succeeded but a `--fail-if` threshold broke.
pub const EXIT_THRESHOLD_BROKEN: u8 = 3;

/// How `record` wants the process to end.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Exit(u8),
    /// The command died of this signal: die of it too, like a shell would
    /// report it.
    Signal(i32),
}

/// Creates an output file now, so a bad path fails before the command
/// runs, not after (when the measurements would be lost).
fn create(path: Option<&Path>, what: &str) -> anyhow::Result<Option<BufWriter<File>>> {
    path.map(|p| {
        File::create(p)
            .map(BufWriter::new)
            .with_context(|| format!("cannot write the {what} to {}", p.display()))
    })
    .transpose()
}

pub async fn run(
    args: RecordArgs,
    kernel_log: Option<log::LevelFilter>,
) -> anyhow::Result<Outcome> {
    let mut json = create(args.json.as_deref(), "JSON report")?;
    let mut hlog = create(args.hlog.as_deref(), "interval log")?;
    let mut bench = create(args.bench_json.as_deref(), "benchmark file")?;
    let mut options = session::tracer_options(&args.filter, &args.capacity, false, kernel_log);
    options.follow_forks = !args.all;

    let start = SystemTime::now();
    let started = Instant::now();
    let child: RefCell<Option<Child>> = RefCell::new(None);
    let exit: Cell<Option<ExitStatus>> = Cell::new(None);
    let stats = RefCell::new(TeardownStats::default());
    let (time_wait_now, time_wait_peak) = (Cell::new(0u64), Cell::new(0u64));
    let end = session::run(
        &options,
        None,
        Announce::OnStderr,
        |tracer| {
            // Follow ourselves across the fork, then only the command: the
            // kernel adds the child before it can run a single instruction.
            let me = std::process::id();
            if !args.all {
                tracer.follow(me)?;
            }
            let spawned = Command::new(&args.command[0])
                .args(&args.command[1..])
                .spawn()
                .with_context(|| format!("cannot run `{}`", args.command[0]));
            if !args.all {
                tracer.unfollow(me)?;
            }
            *child.borrow_mut() = Some(spawned?);
            Ok(())
        },
        |t| {
            stats.borrow_mut().record(t);
            if t.new == TcpState::TimeWait {
                time_wait_now.set(time_wait_now.get() + 1);
                time_wait_peak.set(time_wait_peak.get().max(time_wait_now.get()));
            }
            if t.old == TcpState::TimeWait {
                time_wait_now.set(time_wait_now.get().saturating_sub(1));
            }
            Ok(())
        },
        |_| {
            let mut child = child.borrow_mut();
            let Some(running) = child.as_mut() else {
                return Ok(ControlFlow::Continue(()));
            };
            Ok(match running.try_wait()? {
                Some(status) => {
                    exit.set(Some(status));
                    ControlFlow::Break(())
                }
                None => ControlFlow::Continue(()),
            })
        },
    )
    .await;
    // Stopped by a signal (or an error): stop the command too, and still
    // report what was measured.
    if let Some(mut running) = child.borrow_mut().take() {
        if exit.get().is_none() {
            exit.set(Some(stop(&mut running)?));
        }
    }
    let end = end?;
    let status = exit.get().context("the command never ran")?;
    let stats = stats.into_inner();
    let summary = SummaryReport::of_session(&stats, &end);
    let mut report = RecordReport::new(
        summary.clone(),
        RunMeta {
            command: args.command.clone(),
            all: args.all,
            start,
            kernel: record::kernel_release(),
            exit_code: status.code(),
            exit_signal: status.signal(),
        },
        time_wait_peak.get(),
    );
    let broken = report.check(&args.fail_if);

    if let Some(out) = json.as_mut() {
        report.write_json(out)?;
        out.flush()?;
    }
    if let Some(out) = bench.as_mut() {
        report.write_bench_json(out)?;
        out.flush()?;
    }
    if let Some(out) = hlog.as_mut() {
        record::write_hlog(&stats, start, started.elapsed(), &args.command, out)?;
        out.flush()?;
    }
    let mut err = io::stderr().lock();
    summary.write_text(&mut err)?;
    for t in &report.thresholds {
        writeln!(
            err,
            "twtrace: --fail-if '{}': {} (actual {})",
            t.expr,
            if t.broken { "BROKEN" } else { "ok" },
            t.actual
        )?;
    }
    Ok(match (status.code(), status.signal()) {
        (Some(0), _) if broken => Outcome::Exit(EXIT_THRESHOLD_BROKEN),
        (Some(code), _) => Outcome::Exit(u8::try_from(code).unwrap_or(1)),
        (None, Some(signal)) => Outcome::Signal(signal),
        (None, None) => Outcome::Exit(1),
    })
}

/// Asks the command to stop (SIGINT, as Ctrl-C would), then insists.
fn stop(child: &mut Child) -> anyhow::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(pid, libc::SIGINT) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?;
    Ok(child.wait()?)
}
