use std::{io, process::ExitCode};

use clap::Parser;
use twtrace::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    // Logs go to stderr so they never mix with the stream on stdout.
    // The kernel program logs under the `twtrace` target too; aya's own
    // loader chatter stays at warnings unless asked for with -vvv.
    let libraries = if cli.verbose > 2 {
        level
    } else {
        log::LevelFilter::Warn
    };
    env_logger::Builder::new()
        .filter_level(libraries)
        .filter_module("twtrace", level)
        .format_timestamp(None)
        .target(env_logger::Target::Stderr)
        .init();
    let kernel_log = (cli.verbose > 0).then_some(level);

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("twtrace: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            None => twtrace::commands::top::run(cli.top, kernel_log).await,
            Some(Command::Top(args)) => twtrace::commands::top::run(args, kernel_log).await,
            Some(Command::Trace(args)) => twtrace::commands::trace::run(args, kernel_log).await,
            Some(Command::Summary(args)) => twtrace::commands::summary::run(args, kernel_log).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `twtrace trace | head` closing the pipe is a normal way to stop.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("twtrace: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(|io_error| io_error.kind() == io::ErrorKind::BrokenPipe)
}
