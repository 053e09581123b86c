//! `twtrace record -- CMD`: trace exactly one workload (the command and
//! every process it forks, followed in the kernel), then write reports and
//! exit like the command did.

use std::{
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
    commands::{self, Outcome},
    event::Transition,
    histogram::TeardownStats,
    loader::Tracer,
    output::{
        record::{self, RecordReport, RunMeta},
        summary::SummaryReport,
    },
    session::{self, Announce, Consumer, Status},
};

/// Exit code when the command succeeded but a `--fail-if` threshold broke.
pub const EXIT_THRESHOLD_BROKEN: u8 = 3;

/// Fails before tracing when the command cannot be run: a path that is no
/// executable file, or a name not found on `PATH`.
fn runnable(program: &str) -> anyhow::Result<()> {
    let executable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| {
            m.is_file() && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
        })
    };
    let found = if program.contains('/') {
        executable(Path::new(program))
    } else {
        std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|dir| executable(&dir.join(program)))
        })
    };
    if !found {
        anyhow::bail!("cannot run `{program}`: no such executable (checked before tracing)");
    }
    Ok(())
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

/// The command, started once twtrace is attached, and what its
/// connections did; the run stops when it exits.
struct Workload<'a> {
    command: &'a [String],
    /// Follow the command and its children only (not `--all`).
    follow: bool,
    child: Option<Child>,
    exit: Option<ExitStatus>,
    stats: TeardownStats,
}

impl Consumer for Workload<'_> {
    fn attached(&mut self, tracer: &mut Tracer) -> anyhow::Result<()> {
        // Follow ourselves across the fork, then only the command: the
        // kernel adds the child before it can run a single instruction.
        let me = std::process::id();
        if self.follow {
            tracer.follow(me)?;
        }
        let spawned = Command::new(&self.command[0])
            .args(&self.command[1..])
            .spawn()
            .with_context(|| format!("cannot run `{}`", self.command[0]));
        if self.follow {
            tracer.unfollow(me)?;
        }
        self.child = Some(spawned?);
        Ok(())
    }

    fn transition(&mut self, t: &Transition) -> io::Result<()> {
        self.stats.record(t);
        Ok(())
    }

    fn tick(&mut self, _status: &Status) -> io::Result<ControlFlow<()>> {
        let Some(running) = self.child.as_mut() else {
            return Ok(ControlFlow::Continue(()));
        };
        Ok(match running.try_wait()? {
            Some(status) => {
                self.exit = Some(status);
                ControlFlow::Break(())
            }
            None => ControlFlow::Continue(()),
        })
    }
}

pub async fn run(
    args: RecordArgs,
    kernel_log: Option<log::LevelFilter>,
) -> anyhow::Result<Outcome> {
    runnable(&args.command[0])?;
    let outputs = Outputs {
        json: create(args.json.as_deref(), "JSON report")?,
        hlog: create(args.hlog.as_deref(), "interval log")?,
        bench: create(args.bench_json.as_deref(), "benchmark file")?,
    };
    let mut options = commands::tracer_options(&args.filter, &args.capacity, false, kernel_log)?;
    options.follow_forks = !args.all;
    let start = SystemTime::now();
    let started = Instant::now();
    let mut workload = Workload {
        command: &args.command,
        follow: !args.all,
        child: None,
        exit: None,
        stats: TeardownStats::default(),
    };
    let end = session::run(&options, None, Announce::OnStderr, &mut workload).await;
    // Stopped by a signal (or an error): stop the command too, and still
    // report what was measured.
    if let Some(mut running) = workload.child.take()
        && workload.exit.is_none()
    {
        workload.exit = Some(stop(&mut running)?);
    }
    let session = end?;
    let status = workload.exit.context("the command never ran")?;
    let summary = SummaryReport::of_session(&workload.stats, &session, args.group.by);
    let meta = RunMeta {
        command: args.command.clone(),
        all: args.all,
        start,
        kernel: record::kernel_release(),
        exit_code: status.code(),
        exit_signal: status.signal(),
    };
    let mut report = RecordReport::new(summary.clone(), meta, session.mini_socket_peak);
    let broken = report.check(&args.fail_if);
    outputs.write(
        &report,
        &workload.stats,
        start,
        started.elapsed(),
        &args.command,
    )?;
    tell(&summary, &report)?;
    Ok(match (status.code(), status.signal()) {
        (Some(0), _) if broken => Outcome::Exit(EXIT_THRESHOLD_BROKEN),
        (Some(code), _) => Outcome::Exit(u8::try_from(code).unwrap_or(1)),
        (None, Some(signal)) => Outcome::Signal(signal),
        (None, None) => Outcome::Exit(1),
    })
}

/// The summary and each threshold's verdict, on stderr (stdout is the
/// command's).
fn tell(summary: &SummaryReport, report: &RecordReport) -> io::Result<()> {
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
    Ok(())
}

/// The report files, opened before the command started.
struct Outputs {
    json: Option<BufWriter<File>>,
    hlog: Option<BufWriter<File>>,
    bench: Option<BufWriter<File>>,
}

impl Outputs {
    fn write(
        mut self,
        report: &RecordReport,
        stats: &TeardownStats,
        start: SystemTime,
        elapsed: Duration,
        command: &[String],
    ) -> anyhow::Result<()> {
        if let Some(out) = self.json.as_mut() {
            report.write_json(out)?;
            out.flush()?;
        }
        if let Some(out) = self.bench.as_mut() {
            report.write_bench_json(out)?;
            out.flush()?;
        }
        if let Some(out) = self.hlog.as_mut() {
            record::write_hlog(stats, start, elapsed, command, out)?;
            out.flush()?;
        }
        Ok(())
    }
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
