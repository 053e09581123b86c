//! `cargo xtask <task>`: everything twtrace needs beyond `cargo build`,
//! starting from a fresh machine.

mod apt;
mod bench;
mod console;
mod cpio;
mod fuzz;
mod initramfs;
mod setup;
mod soak;
mod userland;
mod vm;

use std::{
    collections::BTreeMap,
    env,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building twtrace needs: the pinned nightly with rust-src,
    /// and bpf-linker built against that nightly's LLVM. A no-op when done.
    Setup,
    /// Set up, then build the release binary (eBPF object embedded).
    Build,
    /// Set up, build, then run twtrace with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every check and test: formatting, clippy (host and
    /// eBPF), unit tests and the kernel tests (these need root), a 0.5-second
    /// smoke run of the benchmark (every workload and configuration), and the kernel tests on every kernel of
    /// the VM matrix.
    Test,
    /// A steady churn for minutes with `twtrace summary` and `twtrace trace
    /// -o json` attached: no crash, no loss, flat RSS, bounded maps (root).
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Connections per second.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
    },
    /// Fuzz the ring-buffer decoder and the teardown model (cargo fuzz,
    /// installed into .tools on first use).
    Fuzz {
        /// How long to fuzz.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// The kernel tests on each kernel of the matrix: the host's natively,
    /// Debian 11's 5.10, 12's 6.1 and 13's 6.12 booted under qemu, and
    /// Debian 12's and 13's arm64 6.1 and 6.12 emulated, with twtrace
    /// cross-built (root;
    /// installs qemu, busybox and the arm64 cross compiler; kernels and
    /// arm64 packages are fetched once into target/vm).
    VmTest {
        /// Only this kernel of the list (repeatable).
        #[arg(long)]
        kernel: Vec<String>,
        /// Arguments for the kernel test binary (a name filter, `--skip`).
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Overhead and capacity against a baseline and libbpf-tools'
    /// tcpstates, side by side, on the churn workload (either side closing)
    /// and on nginx under wrk (root; installs libbpf-tools, bpftool, nginx
    /// and wrk).
    Bench {
        /// Seconds of each workload per configuration and round.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Rounds; configurations alternate within each.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Only these workloads (repeatable): churn-server, churn-client,
        /// nginx. All by default.
        #[arg(long, value_parser = parse_workload)]
        workload: Vec<bench::Workload>,
        /// Churn connections carry no request and reply (they do by default,
        /// as real ones do).
        #[arg(long)]
        no_data: bool,
    },
}

fn parse_workload(key: &str) -> Result<bench::Workload, String> {
    bench::Workload::ALL
        .into_iter()
        .find(|w| w.key() == key)
        .ok_or_else(|| {
            let keys: Vec<&str> = bench::Workload::ALL.iter().map(|w| w.key()).collect();
            format!("one of {}", keys.join(", "))
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run().map(|_| ()),
        Task::Build => setup::run().and_then(|_| build()),
        Task::Run { args } => setup::run().and_then(|_| build()).and_then(|()| run(&args)),
        Task::Test => setup::run()
            .and_then(|tools| setup::test_tools().map(|()| tools))
            .and_then(|tools| test(&tools)),
        Task::Soak { minutes, rate } => setup::run()
            .and_then(|_| setup::test_tools())
            .and_then(|()| build_bench())
            .and_then(|()| soak::run(&soak::Options { minutes, rate })),
        Task::Fuzz { seconds } => setup::run().and_then(|tools| fuzz::run(&tools, seconds)),
        Task::VmTest { kernel, test_args } => setup::run()
            .and_then(|_| setup::test_tools())
            .and_then(|()| build())
            .and_then(|()| {
                vm::run(
                    &vm::Options {
                        kernels: kernel,
                        test_args,
                    },
                    None,
                )
            }),
        Task::Bench {
            seconds,
            rounds,
            workload,
            no_data,
        } => setup::run()
            .and_then(|_| setup::test_tools())
            .and_then(|()| build_bench())
            .and_then(|()| {
                bench::run(&bench::Options {
                    seconds,
                    rounds,
                    workloads: if workload.is_empty() {
                        bench::Workload::ALL.to_vec()
                    } else {
                        workload
                    },
                    exchange: !no_data,
                })
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// The cargo that runs us, so nested builds use the same toolchain.
fn cargo() -> Command {
    let mut command = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn check(command: &mut Command, what: &str) -> anyhow::Result<()> {
    eprintln!("xtask: {what}");
    let status = command
        .status()
        .with_context(|| format!("starting: {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    check(
        cargo().args(["build", "--release", "--locked"]),
        "cargo build --release",
    )
}

fn build_bench() -> anyhow::Result<()> {
    check(
        cargo().args([
            "build",
            "--release",
            "--locked",
            "-p",
            "twtrace",
            "-p",
            "xtask",
            "--bins",
        ]),
        "cargo build --release (twtrace and the churn workload)",
    )
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let binary = workspace_root().join("target/release/twtrace");
    let status = Command::new(&binary)
        .args(args)
        .status()
        .with_context(|| format!("running {}", binary.display()))?;
    if !status.success() {
        bail!("twtrace exited with {status}");
    }
    Ok(())
}

/// The test build of twtrace: with the fault injection the leak tests use
/// (`TWTRACE_FAULT`), which release builds never have.
pub const TEST_FEATURES: [&str; 2] = ["--features", "twtrace/fault-injection"];

fn test(tools: &setup::Tools) -> anyhow::Result<()> {
    lint(tools)?;
    build_bench()?;
    // Release: loading from a debug build takes ~3x longer, and the kernel
    // tests load the program once per test.
    let (totals, host_results) = run_tests(
        cargo()
            .args(["test", "--release", "--locked", "--no-fail-fast"])
            .args(TEST_FEATURES),
    )?;
    // The benchmark harness must not rot: a tiny run of every configuration.
    let smoke = bench::run(&bench::Options {
        seconds: 0.5,
        rounds: 1,
        workloads: bench::Workload::ALL.to_vec(),
        exchange: true,
    });
    let smoke_ok = smoke.is_ok();
    if let Err(error) = smoke {
        eprintln!("xtask: bench smoke run failed: {error:#}");
    }
    // A short soak: steady load, both tracers attached, long enough for
    // the first TIME_WAIT expiries (60 s in), which come in bursts.
    let soaked = soak::run(&soak::Options {
        minutes: 1.5,
        rate: 2000,
    });
    let soak_ok = soaked.is_ok();
    if let Err(error) = soaked {
        eprintln!("xtask: soak failed: {error:#}");
    }
    // Hostile ring-buffer records, for a bounded time.
    let fuzzed = fuzz::run(tools, 60);
    let fuzz_ok = fuzzed.is_ok();
    if let Err(error) = fuzzed {
        eprintln!("xtask: fuzzing failed: {error:#}");
    }
    // The same kernel tests on the other kernels of the matrix; the host's
    // column is the run above.
    let matrix = vm::run(
        &vm::Options {
            kernels: Vec::new(),
            test_args: Vec::new(),
        },
        Some(host_results),
    );
    let matrix_ok = matrix.is_ok();
    if let Err(error) = matrix {
        eprintln!("xtask: VM test matrix failed: {error:#}");
    }
    // One closing line for the whole suite: cargo's own last line belongs
    // to whichever test binary happened to run last.
    let extra = [smoke_ok, soak_ok, fuzz_ok, matrix_ok];
    let passed = totals.passed + extra.iter().filter(|ok| **ok).count() as u64;
    let failed = totals.failed + extra.iter().filter(|ok| !**ok).count() as u64;
    println!(
        "{passed} passed, {failed} failed, {} skipped",
        totals.ignored
    );
    if failed > 0 {
        bail!("{failed} tests failed");
    }
    Ok(())
}

/// Formatting and clippy with warnings denied, on both sides.
fn lint(tools: &setup::Tools) -> anyhow::Result<()> {
    check(
        cargo().args(["fmt", "--all", "--check"]),
        "cargo fmt --check",
    )?;
    check(
        cargo().args([
            "clippy",
            "--release",
            "--locked",
            "--all-targets",
            TEST_FEATURES[0],
            TEST_FEATURES[1],
            "--",
            "-D",
            "warnings",
        ]),
        "cargo clippy (userspace)",
    )?;
    check(
        &mut tools.ebpf_cargo(&["clippy", "--", "-D", "warnings"]),
        "cargo clippy (eBPF program)",
    )?;
    Ok(())
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds one libtest `test result:` line.
    fn add_result_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split([';', '.']) {
            let mut words = part.split_whitespace();
            let (Some(count), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

/// Runs cargo test, echoing its output; returns the totals and each test's
/// outcome by name.
fn run_tests(command: &mut Command) -> anyhow::Result<(Totals, BTreeMap<String, vm::Outcome>)> {
    eprintln!("xtask: cargo test --release (unit and kernel tests)");
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let mut totals = Totals::default();
    let mut outcomes = BTreeMap::new();
    for line in BufReader::new(child.stdout.take().context("cargo test stdout")?).lines() {
        let line = line?;
        println!("{line}");
        totals.add_result_line(&line);
        if let Some((test, outcome)) = vm::parse_test_line(&line) {
            outcomes.insert(test, outcome);
        }
    }
    let status = child.wait()?;
    if !status.success() && totals.failed == 0 {
        bail!("cargo test failed ({status})");
    }
    Ok((totals, outcomes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_libtest_result_lines() {
        let mut totals = Totals::default();
        totals.add_result_line("test result: ok. 25 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        totals.add_result_line("test result: FAILED. 7 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 4.18s");
        totals.add_result_line("running 8 tests");
        assert_eq!(
            totals,
            Totals {
                passed: 32,
                failed: 1,
                ignored: 2
            }
        );
    }
}
