//! `twtrace serve`: headless tracing behind a Prometheus endpoint.

use std::ops::ControlFlow;

use crate::{
    cli::ServeArgs,
    commands::session::{self, Announce},
    output::metrics::Metrics,
};

pub async fn run(args: ServeArgs, kernel_log: Option<log::LevelFilter>) -> anyhow::Result<()> {
    session::check_pids_exist(&args.filter)?;
    let options = session::tracer_options(&args.filter, &args.capacity, false, kernel_log);
    let metrics = Metrics::new();
    metrics.clone().serve(args.metrics_addr).await?;
    eprintln!(
        "twtrace: serving metrics on http://{}/metrics",
        args.metrics_addr
    );
    session::run(
        &options,
        None,
        Announce::OnStderr,
        |_| Ok(()),
        |t| {
            metrics.record(t);
            Ok(())
        },
        |status| {
            metrics.update(status);
            Ok(ControlFlow::Continue(()))
        },
    )
    .await?;
    Ok(())
}
