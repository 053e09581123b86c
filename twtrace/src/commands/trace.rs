//! `twtrace trace`: stream transitions until stopped, then summarise.

use std::io::{self, BufWriter};

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
    session::check_pids_exist(&args.filter)?;
    let options =
        session::tracer_options(&args.filter, &args.capacity, args.all_states, kernel_log);
    let out = std::cell::RefCell::new(StreamWriter::new(
        BufWriter::with_capacity(64 * 1024, io::stdout().lock()),
        args.output,
        sys::realtime_minus_monotonic_ns(),
    ));
    out.borrow_mut().header()?;
    out.borrow_mut().flush()?;
    let mut stats = TeardownStats::default();
    let end = session::run(
        &options,
        args.duration,
        |t| {
            stats.record(t);
            out.borrow_mut().transition(t)
        },
        || out.borrow_mut().flush(),
    )
    .await?;
    let report = SummaryReport::new(
        &stats,
        end.events,
        end.duration_ns,
        &end.loss,
        end.tw_evictions,
        end.time_wait_tracking,
    );
    let mut out = out.into_inner();
    match args.output {
        Format::Json => report.write_json_line(out.inner())?,
        Format::Text => {
            io::Write::write_all(out.inner(), b"\n")?;
            report.write_text(out.inner())?;
        }
    }
    out.flush()?;
    Ok(())
}
