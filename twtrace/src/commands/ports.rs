//! `twtrace ports`: trace for a while, then forecast port exhaustion per
//! local address and destination.

use std::{
    io::{self, Write},
    ops::ControlFlow,
};

use serde::Serialize;

use crate::{
    cli::PortsArgs,
    commands,
    event::Transition,
    netns,
    output::Format,
    ports,
    session::{self, Announce, Consumer, Status},
    sys,
};

#[derive(Serialize)]
struct Report {
    schema: &'static str,
    duration_ns: u64,
    /// The host's own namespace's settings.
    port_range: Option<(u16, u16)>,
    usable_ports: u64,
    /// The settings of each namespace a route lives in.
    namespaces: Vec<NamespaceSettings>,
    routes: Vec<ports::Forecast>,
}

#[derive(Serialize)]
struct NamespaceSettings {
    netns: u64,
    /// Its name under `/run/netns`, else `pid:N` of a process in it.
    name: Option<String>,
    usable_ports: u64,
    #[serde(flatten)]
    settings: sys::PortSettings,
}

/// The last status: what the forecast is made of.
#[derive(Default)]
struct Routes {
    status: Status,
}

impl Consumer for Routes {
    fn transition(&mut self, _: &Transition) -> io::Result<()> {
        Ok(())
    }

    fn tick(&mut self, status: &Status) -> io::Result<ControlFlow<()>> {
        self.status.clone_from(status);
        Ok(ControlFlow::Continue(()))
    }
}

pub async fn run(args: PortsArgs, kernel_log: Option<log::LevelFilter>) -> anyhow::Result<()> {
    commands::check_pids_exist(&args.filter)?;
    let options = commands::tracer_options(&args.filter, &args.capacity, false, kernel_log)?;
    let mut routes = Routes::default();
    let end = session::run(
        &options,
        Some(args.duration),
        Announce::OnStderr,
        &mut routes,
    )
    .await?;
    #[expect(clippy::cast_precision_loss, reason = "seconds")]
    let seconds = end.duration_ns as f64 / 1e9;
    let status = &routes.status;
    let forecasts = ports::forecasts(
        &status.route_counts,
        &status.held_by_route,
        &status.port_settings,
        status.host_settings.as_ref(),
        seconds,
    );
    let mut out = io::stdout().lock();
    match args.output {
        Format::Json => {
            let known = netns::all();
            let mut namespaces: Vec<NamespaceSettings> = status
                .port_settings
                .iter()
                .filter(|(inode, _)| forecasts.iter().any(|f| f.netns == **inode))
                .map(|(&netns, &settings)| NamespaceSettings {
                    netns,
                    name: netns::name_of(netns, &known),
                    usable_ports: settings.usable(),
                    settings,
                })
                .collect();
            namespaces.sort_by_key(|n| n.netns);
            let report = Report {
                schema: "twtrace-ports/2",
                duration_ns: end.duration_ns,
                port_range: status.host_settings.map(|s| s.port_range),
                usable_ports: status.host_settings.map_or(0, |s| s.usable()),
                namespaces,
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
