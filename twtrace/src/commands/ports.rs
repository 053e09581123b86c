//! `twtrace ports`: trace for a while, then forecast port exhaustion per
//! local address and destination.

use std::{
    cell::RefCell,
    io::{self, Write},
    ops::ControlFlow,
};

use serde::Serialize;

use crate::{
    cli::PortsArgs,
    commands::session::{self, Announce},
    output::stream::Format,
    ports, sys,
};

#[derive(Serialize)]
struct Report {
    schema: &'static str,
    duration_ns: u64,
    port_range: Option<(u16, u16)>,
    usable_ports: u64,
    routes: Vec<ports::Forecast>,
}

pub async fn run(args: PortsArgs, kernel_log: Option<log::LevelFilter>) -> anyhow::Result<()> {
    session::check_pids_exist(&args.filter)?;
    let options = session::tracer_options(&args.filter, &args.capacity, false, kernel_log);
    let range = sys::local_port_range().ok();
    let usable = sys::usable_ephemeral_ports().unwrap_or(0);
    let closes = RefCell::new(ports::CloseCounter::default());
    let held = RefCell::new(std::collections::HashMap::new());
    let end = session::run(
        &options,
        Some(args.duration),
        Announce::OnStderr,
        |_| Ok(()),
        |t| {
            closes.borrow_mut().record(t, range);
            Ok(())
        },
        |status| {
            held.borrow_mut().clone_from(&status.held_by_route);
            Ok(ControlFlow::Continue(()))
        },
    )
    .await?;
    #[expect(clippy::cast_precision_loss, reason = "seconds")]
    let seconds = end.duration_ns as f64 / 1e9;
    let routes = closes.borrow().forecasts(&held.borrow(), usable, seconds);
    let mut out = io::stdout().lock();
    match args.output {
        Format::Json => {
            serde_json::to_writer_pretty(
                &mut out,
                &Report {
                    schema: "twtrace-ports/1",
                    duration_ns: end.duration_ns,
                    port_range: range,
                    usable_ports: usable,
                    routes,
                },
            )?;
            writeln!(out)?;
        }
        Format::Text => {
            if routes.is_empty() {
                writeln!(
                    out,
                    "no ephemeral port held in TIME_WAIT by connections that closed while traced"
                )?;
            }
            for f in &routes {
                writeln!(out, "{}", ports::describe(f))?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
