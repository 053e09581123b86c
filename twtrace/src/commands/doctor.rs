//! `twtrace doctor`: prerequisites and TIME_WAIT health, in seconds.

use std::io::{self, Write};

use serde::Serialize;

use crate::{
    cli::DoctorArgs,
    commands::Outcome,
    doctor::{self, Finding, HostSnapshot, Severity},
    output::Format,
};

#[derive(Serialize)]
struct Report<'a> {
    schema: &'static str,
    kernel: &'a str,
    healthy: bool,
    exit_code: u8,
    findings: &'a [Finding],
    host: &'a HostSnapshot,
}

pub fn run(args: &DoctorArgs) -> anyhow::Result<Outcome> {
    let host = HostSnapshot::read(u64::try_from(args.leak_after.as_nanos()).unwrap_or(u64::MAX));
    let findings = doctor::assess(&host);
    let code = doctor::exit_code(&findings);
    let mut out = io::stdout().lock();
    match args.output {
        Format::Json => {
            serde_json::to_writer_pretty(
                &mut out,
                &Report {
                    schema: "twtrace-doctor/1",
                    kernel: &host.kernel,
                    healthy: code == 0,
                    exit_code: code,
                    findings: &findings,
                    host: &host,
                },
            )?;
            writeln!(out)?;
        }
        Format::Text => {
            writeln!(out, "twtrace doctor — kernel {}", host.kernel)?;
            for f in &findings {
                let mark = match f.severity {
                    Severity::Ok => "ok  ",
                    Severity::Info => "info",
                    Severity::Warn => "WARN",
                    Severity::Error => "FAIL",
                };
                writeln!(out, "[{mark}] {}: {}", f.title, f.value)?;
                if f.severity != Severity::Ok {
                    writeln!(out, "       {}", f.meaning)?;
                    if !f.advice.is_empty() {
                        writeln!(out, "       → {}", f.advice)?;
                    }
                }
            }
            writeln!(
                out,
                "\nThe real fixes for TIME_WAIT pile-ups: reuse connections (pooling, keep-alive) and let the client close first."
            )?;
            writeln!(
                out,
                "{}",
                match code {
                    0 => "healthy (exit 0)",
                    4 => "warnings (exit 4)",
                    _ => "twtrace cannot trace on this host as it is (exit 5)",
                }
            )?;
        }
    }
    out.flush()?;
    Ok(Outcome::Exit(code))
}
