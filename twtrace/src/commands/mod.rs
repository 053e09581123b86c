//! One module per subcommand, and what they share: checking the filters,
//! turning arguments into tracer options, and how a command ends.

pub mod doctor;
pub mod ports;
pub mod record;
pub mod serve;
pub mod sockets;
pub mod summary;
pub mod top;
pub mod trace;

use std::path::Path;

use anyhow::bail;

use crate::{
    cli::{CapacityArgs, Command, FilterArgs, TopArgs},
    loader::TracerOptions,
};

/// How the process should end.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Exit(u8),
    /// `record`'s command died of this signal: die of it too, as a shell
    /// would report it.
    Signal(i32),
}

/// Runs the subcommand (`None`: the live view).
pub async fn run(
    command: Option<Command>,
    top_args: TopArgs,
    kernel_log: Option<log::LevelFilter>,
) -> anyhow::Result<Outcome> {
    let done = Ok(Outcome::Exit(0));
    match command {
        None => top::run(top_args, kernel_log).await.and(done),
        Some(Command::Top(args)) => top::run(args, kernel_log).await.and(done),
        Some(Command::Trace(args)) => trace::run(args, kernel_log).await.and(done),
        Some(Command::Summary(args)) => summary::run(args, kernel_log).await.and(done),
        Some(Command::Record(args)) => record::run(args, kernel_log).await,
        Some(Command::Doctor(args)) => doctor::run(&args),
        Some(Command::Ports(args)) => ports::run(args, kernel_log).await.and(done),
        Some(Command::Serve(args)) => serve::run(args, kernel_log).await.and(done),
        Some(Command::Sockets(args)) => sockets::run(&args),
    }
}

/// Rejects pids that name no process: a typo would otherwise trace
/// nothing, silently.
pub fn check_pids_exist(filter: &FilterArgs) -> anyhow::Result<()> {
    for pid in &filter.pids {
        if !Path::new("/proc").join(pid.to_string()).exists() {
            bail!("no process with pid {pid}");
        }
    }
    Ok(())
}

/// The tracer's options from the arguments; fails when `--netns` names
/// no namespace.
pub fn tracer_options(
    filter: &FilterArgs,
    capacity: &CapacityArgs,
    all_states: bool,
    kernel_log: Option<log::LevelFilter>,
) -> anyhow::Result<TracerOptions> {
    let netns = filter
        .netns
        .as_deref()
        .map(crate::netns::resolve)
        .transpose()?
        .map(|inode| u32::try_from(inode).unwrap_or(u32::MAX));
    Ok(TracerOptions {
        pids: filter.pids.clone(),
        ports: filter.ports.clone(),
        family: filter.family(),
        all_states,
        ring_bytes: capacity.ring_kib.map(|kib| kib * 1024),
        max_sockets: capacity.max_sockets,
        max_time_wait: capacity.max_time_wait,
        kernel_log,
        follow_forks: false,
        netns,
        ..TracerOptions::default()
    })
}
