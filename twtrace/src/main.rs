use std::{io, process::ExitCode};

use clap::Parser;
use twtrace::{
    cli::Cli,
    commands::{self, Outcome},
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
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
    let result = runtime.block_on(commands::run(cli.command, cli.top, kernel_log));
    drop(runtime);
    match result {
        Ok(Outcome::Exit(code)) => ExitCode::from(code),
        Ok(Outcome::Signal(signal)) => die_of(signal),
        // `twtrace trace | head` closing the pipe is a normal way to stop.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("twtrace: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version as clap prints them; a usage error as one line on
/// stderr (clap's own spreads over several), exit 2.
fn usage_error(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = error.print();
        return if error.use_stderr() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    eprintln!("{}", one_line(&error.to_string()));
    ExitCode::from(2)
}

/// clap's message without its usage and "try --help" lines, joined.
fn one_line(message: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for line in message.lines().map(str::trim) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line);
        }
    }
    let mut line = parts.join(" ");
    line.push_str(" (see --help)");
    line
}

/// Ends this process with the signal that ended the recorded command, as
/// `strace` and `perf` do, so callers see the same wait status.
fn die_of(signal: i32) -> ExitCode {
    // SAFETY: restoring the default action and raising a signal have no
    // memory-safety preconditions; with the default action the process
    // ends here, or the fallback below applies.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
    ExitCode::from(u8::try_from(128 + signal).unwrap_or(255))
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(|io_error| io_error.kind() == io::ErrorKind::BrokenPipe)
}
