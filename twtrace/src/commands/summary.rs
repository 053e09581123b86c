//! `twtrace summary`: histograms only, printed once at the end.

use std::io::{self, Write};

use crate::{
    cli::SummaryArgs,
    commands,
    histogram::TeardownStats,
    output::{Format, metrics::Metrics, summary::SummaryReport},
    session,
};

pub async fn run(args: SummaryArgs, kernel_log: Option<log::LevelFilter>) -> anyhow::Result<()> {
    let run = &args.run;
    commands::check_pids_exist(&run.filter)?;
    let options = commands::tracer_options(&run.filter, &run.capacity, false, kernel_log)?;
    let metrics = Metrics::serve_if(args.metrics_addr).await?;
    let mut consumer = (TeardownStats::default(), metrics);
    let end = session::run(
        &options,
        run.duration,
        session::Announce::OnStderr,
        &mut consumer,
    )
    .await?;
    let report = SummaryReport::of_session(&consumer.0, &end, run.group.by);
    let mut out = io::stdout().lock();
    match run.output {
        Format::Json => report.write_json_pretty(&mut out)?,
        Format::Text => report.write_text(&mut out)?,
    }
    out.flush()?;
    Ok(())
}
