//! `cargo xtask fuzz`: the ring-buffer decoder and the teardown model
//! under libFuzzer (cargo fuzz, with the pinned nightly), for a bounded
//! time, starting from and adding to the corpus kept in `fuzz/corpus`.

use std::{path::Path, process::Command};

use anyhow::{Context, bail};

use crate::{check, setup::Tools, workspace_root};

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Installs cargo-fuzz into the tools directory when missing.
fn ensure_cargo_fuzz(tools_dir: &Path) -> anyhow::Result<()> {
    if tools_dir.join("bin/cargo-fuzz").is_file() {
        return Ok(());
    }
    check(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "--locked",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
            ])
            .arg("--root")
            .arg(tools_dir),
        &format!("cargo install cargo-fuzz {CARGO_FUZZ_VERSION}"),
    )
}

pub fn run(tools: &Tools, seconds: u64) -> anyhow::Result<()> {
    let tools_dir = workspace_root()
        .join(std::env::var_os("TWTRACE_TOOLS_DIR").context("TWTRACE_TOOLS_DIR is unset")?);
    ensure_cargo_fuzz(&tools_dir)?;
    let path = std::env::join_paths(std::iter::once(tools_dir.join("bin")).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    let fuzz_dir = workspace_root().join("fuzz");
    let cargo_fuzz = |args: &[&str]| {
        let mut command = Command::new("rustup");
        command
            .args(["run", &tools.toolchain, "cargo", "fuzz"])
            .args(args)
            .current_dir(&fuzz_dir)
            .env("PATH", &path)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("CARGO");
        command
    };
    // Built first, on its own: a target that no longer compiles is not a
    // crash the fuzzer found.
    eprintln!("xtask: building the fuzz target");
    if !cargo_fuzz(&["build", "decode"])
        .status()
        .context("running cargo fuzz build")?
        .success()
    {
        bail!("the fuzz target does not build (fuzz/fuzz_targets/decode.rs)");
    }
    eprintln!("xtask: fuzzing the decoder for {seconds} s");
    let status = cargo_fuzz(&["run", "decode", "--", &format!("-max_total_time={seconds}")])
        .status()
        .context("running cargo fuzz")?;
    if !status.success() {
        bail!(
            "the fuzzer found a crash ({status}); the input is in {}",
            fuzz_dir.join("artifacts/decode").display()
        );
    }
    Ok(())
}
