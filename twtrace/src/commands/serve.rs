//! `twtrace serve`: headless tracing behind a Prometheus endpoint.

use crate::{
    cli::ServeArgs,
    commands,
    output::metrics::Metrics,
    session::{self, Announce},
};

pub async fn run(args: ServeArgs, kernel_log: Option<log::LevelFilter>) -> anyhow::Result<()> {
    commands::check_pids_exist(&args.filter)?;
    let options = commands::tracer_options(&args.filter, &args.capacity, false, kernel_log)?;
    let mut metrics = Metrics::new();
    metrics.clone().serve(args.metrics_addr).await?;
    eprintln!(
        "twtrace: serving metrics on http://{}/metrics",
        args.metrics_addr
    );
    session::run(&options, None, Announce::OnStderr, &mut metrics).await?;
    Ok(())
}
