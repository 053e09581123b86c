//! `twtrace ports`: trace for a while, then forecast port exhaustion per
//! local address and destination.

use std::{
    collections::HashMap,
    io::{self, Write},
    ops::ControlFlow,
};

use serde::Serialize;

use crate::{
    cli::PortsArgs,
    commands,
    event::Transition,
    model::Route,
    output::Format,
    ports,
    session::{self, Announce, Consumer, Status},
    sys,
};

#[derive(Serialize)]
struct Report {
    schema: &'static str,
    duration_ns: u64,
    port_range: Option<(u16, u16)>,
    usable_ports: u64,
    routes: Vec<ports::Forecast>,
}

/// Closes per route, and the ports held at the last status.
struct Routes {
    range: Option<(u16, u16)>,
    closes: ports::CloseCounter,
    held: HashMap<Route, u64>,
}

impl Consumer for Routes {
    fn transition(&mut self, t: &Transition) -> io::Result<()> {
        self.closes.record(t, self.range);
        Ok(())
    }

    fn tick(&mut self, status: &Status) -> io::Result<ControlFlow<()>> {
        self.held.clone_from(&status.held_by_route);
        Ok(ControlFlow::Continue(()))
    }
}

pub async fn run(args: PortsArgs, kernel_log: Option<log::LevelFilter>) -> anyhow::Result<()> {
    commands::check_pids_exist(&args.filter)?;
    let options = commands::tracer_options(&args.filter, &args.capacity, false, kernel_log)?;
    let range = sys::local_port_range().ok();
    let usable = sys::usable_ephemeral_ports().unwrap_or(0);
    let mut routes = Routes {
        range,
        closes: ports::CloseCounter::default(),
        held: HashMap::new(),
    };
    let end = session::run(
        &options,
        Some(args.duration),
        Announce::OnStderr,
        &mut routes,
    )
    .await?;
    #[expect(clippy::cast_precision_loss, reason = "seconds")]
    let seconds = end.duration_ns as f64 / 1e9;
    let forecasts = routes.closes.forecasts(&routes.held, usable, seconds);
    let mut out = io::stdout().lock();
    match args.output {
        Format::Json => {
            let report = Report {
                schema: "twtrace-ports/1",
                duration_ns: end.duration_ns,
                port_range: range,
                usable_ports: usable,
                routes: forecasts,
            };
            serde_json::to_writer_pretty(&mut out, &report)?;
            writeln!(out)?;
        }
        Format::Text => {
            if forecasts.is_empty() {
                writeln!(
                    out,
                    "no ephemeral port held in TIME_WAIT by connections that closed while traced"
                )?;
            }
            for f in &forecasts {
                writeln!(out, "{}", ports::describe(f))?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
