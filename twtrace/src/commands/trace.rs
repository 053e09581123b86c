//! `twtrace trace`: stream transitions until stopped, then summarise.

use std::{
    io::{self, BufWriter},
    ops::ControlFlow,
};

use crate::{
    cli::TraceArgs,
    commands::session,
    histogram::TeardownStats,
    output::{
        stream::{Format, StreamWriter},
        summary::SummaryReport,
    },
    sys,
};

pub async fn run(args: TraceArgs, kernel_log: Option<log::LevelFilter>) -> anyhow::Result<()> {
    let run = &args.run;
    session::check_pids_exist(&run.filter)?;
    let options = session::tracer_options(&run.filter, &run.capacity, args.all_states, kernel_log);
    let out = std::cell::RefCell::new(StreamWriter::new(
        BufWriter::with_capacity(64 * 1024, io::stdout().lock()),
        run.output,
        sys::realtime_minus_monotonic_ns(),
    ));
    out.borrow_mut().header()?;
    out.borrow_mut().flush()?;
    let mut stats = TeardownStats::default();
    let end = session::run(
        &options,
        run.duration,
        session::Announce::OnStderr,
        |_| Ok(()),
        |t| {
            stats.record(t);
            out.borrow_mut().transition(t)
        },
        |_| out.borrow_mut().flush().map(|()| ControlFlow::Continue(())),
    )
    .await?;
    let report = SummaryReport::of_session(&stats, &end);
    let mut out = out.into_inner();
    match run.output {
        Format::Json => report.write_json_line(out.inner())?,
        Format::Text => {
            io::Write::write_all(out.inner(), b"\n")?;
            report.write_text(out.inner())?;
        }
    }
    out.flush()?;
    Ok(())
}
