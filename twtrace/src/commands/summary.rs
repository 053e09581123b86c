//! `twtrace summary`: histograms only, printed once at the end.

use std::io::{self, Write};

use crate::{
    cli::SummaryArgs,
    commands::session,
    histogram::TeardownStats,
    output::{stream::Format, summary::SummaryReport},
};

pub async fn run(args: SummaryArgs, kernel_log: Option<log::LevelFilter>) -> anyhow::Result<()> {
    session::check_pids_exist(&args.filter)?;
    let options = session::tracer_options(&args.filter, &args.capacity, false, kernel_log);
    let mut stats = TeardownStats::default();
    let end = session::run(
        &options,
        args.duration,
        |t| {
            stats.record(t);
            Ok(())
        },
        || Ok(()),
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
    let mut out = io::stdout().lock();
    match args.output {
        Format::Json => report.write_json_pretty(&mut out)?,
        Format::Text => report.write_text(&mut out)?,
    }
    out.flush()?;
    Ok(())
}
