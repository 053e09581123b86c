//! `twtrace summary`: histograms only, printed once at the end.

use std::{
    io::{self, Write},
    ops::ControlFlow,
};

use crate::{
    cli::SummaryArgs,
    commands::session,
    histogram::TeardownStats,
    output::{metrics::Metrics, stream::Format, summary::SummaryReport},
};

pub async fn run(args: SummaryArgs, kernel_log: Option<log::LevelFilter>) -> anyhow::Result<()> {
    let run = &args.run;
    session::check_pids_exist(&run.filter)?;
    let options = session::tracer_options(&run.filter, &run.capacity, false, kernel_log);
    let mut stats = TeardownStats::default();
    let metrics = Metrics::serve_if(args.metrics_addr).await?;
    let end = session::run(
        &options,
        run.duration,
        session::Announce::OnStderr,
        |_| Ok(()),
        |t| {
            stats.record(t);
            if let Some(m) = &metrics {
                m.record(t);
            }
            Ok(())
        },
        |status| {
            if let Some(m) = &metrics {
                m.update(status);
            }
            Ok(ControlFlow::Continue(()))
        },
    )
    .await?;
    let report = SummaryReport::of_session(&stats, &end);
    let mut out = io::stdout().lock();
    match run.output {
        Format::Json => report.write_json_pretty(&mut out)?,
        Format::Text => report.write_text(&mut out)?,
    }
    out.flush()?;
    Ok(())
}
