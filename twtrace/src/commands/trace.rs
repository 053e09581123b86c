//! `twtrace trace`: stream transitions until stopped, then summarise.

use std::{
    io::{self, BufWriter, StdoutLock},
    ops::ControlFlow,
};

use crate::{
    cli::TraceArgs,
    commands,
    event::Transition,
    histogram::TeardownStats,
    output::{Format, stream::StreamWriter, summary::SummaryReport},
    session::{self, Consumer, Status},
    sys,
};

/// Each transition printed, and counted for the closing summary; output
/// flushed after every batch.
struct Stream {
    out: StreamWriter<BufWriter<StdoutLock<'static>>>,
    stats: TeardownStats,
}

impl Consumer for Stream {
    fn transition(&mut self, t: &Transition) -> io::Result<()> {
        self.stats.record(t);
        self.out.transition(t)
    }

    fn tick(&mut self, _status: &Status) -> io::Result<ControlFlow<()>> {
        self.out.flush().map(|()| ControlFlow::Continue(()))
    }
}

pub async fn run(args: TraceArgs, kernel_log: Option<log::LevelFilter>) -> anyhow::Result<()> {
    let run = &args.run;
    commands::check_pids_exist(&run.filter)?;
    let options =
        commands::tracer_options(&run.filter, &run.capacity, args.all_states, kernel_log)?;
    let mut stream = Stream {
        out: StreamWriter::new(
            BufWriter::with_capacity(64 * 1024, io::stdout().lock()),
            run.output,
            sys::realtime_minus_monotonic_ns(),
        ),
        stats: TeardownStats::default(),
    };
    stream.out.header()?;
    stream.out.flush()?;
    let end = session::run(
        &options,
        run.duration,
        session::Announce::OnStderr,
        &mut stream,
    )
    .await?;
    let report = SummaryReport::of_session(&stream.stats, &end, run.group.by);
    let out = stream.out.inner();
    match run.output {
        Format::Json => report.write_json_line(out)?,
        Format::Text => {
            io::Write::write_all(out, b"\n")?;
            report.write_text(out)?;
        }
    }
    stream.out.flush()?;
    Ok(())
}
