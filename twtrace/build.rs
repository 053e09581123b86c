//! Builds the eBPF program with the pinned nightly and bpf-linker, so that
//! `cargo build` alone yields a self-contained `twtrace` binary.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

const EBPF_PACKAGE: &str = "twtrace-ebpf";
const EBPF_TARGET: &str = "bpfel-unknown-none";

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);

    for watched in [
        "twtrace-ebpf/src",
        "twtrace-ebpf/Cargo.toml",
        "twtrace-common/src",
        "twtrace-common/Cargo.toml",
        "Cargo.lock",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    for var in ["TWTRACE_EBPF_TOOLCHAIN", "TWTRACE_TOOLS_DIR", "BPF_LINKER"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let toolchain = env::var("TWTRACE_EBPF_TOOLCHAIN")
        .context("TWTRACE_EBPF_TOOLCHAIN is unset; build from the workspace root so .cargo/config.toml applies")?;
    let linker = find_bpf_linker()?;
    println!("cargo:rerun-if-changed={}", linker.display());

    let target_dir = out_dir.join("ebpf-target");
    let mut rustflags = OsString::from("-Clinker=");
    rustflags.push(&linker);
    // BTF lets the kernel (and bpftool) show the program's types and source.
    rustflags.push("\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf");

    let mut cargo = Command::new("rustup");
    cargo
        .current_dir(&workspace)
        .args([
            "run",
            &toolchain,
            "cargo",
            "build",
            "--release",
            "--package",
            EBPF_PACKAGE,
        ])
        .args(["-Z", "build-std=core", "--target", EBPF_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The outer build's compiler and flags belong to the host toolchain.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cargo.env_remove(var);
    }
    let status = cargo.status().with_context(|| {
        format!("running `rustup run {toolchain} cargo build` for the eBPF program")
    })?;
    if !status.success() {
        bail!(
            "building the eBPF program failed ({status}); run `cargo xtask setup` to install the pinned toolchain and bpf-linker"
        );
    }
    let object = target_dir.join(EBPF_TARGET).join("release").join("twtrace");
    std::fs::copy(&object, out_dir.join("twtrace.bpf.o"))
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}

fn find_bpf_linker() -> anyhow::Result<PathBuf> {
    if let Some(explicit) = env::var_os("BPF_LINKER") {
        return Ok(PathBuf::from(explicit));
    }
    if let Some(tools) = env::var_os("TWTRACE_TOOLS_DIR") {
        let installed = Path::new(&tools).join("bin").join("bpf-linker");
        if installed.exists() {
            return Ok(installed);
        }
    }
    let on_path = env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.exists());
    on_path.context("bpf-linker not found; run `cargo xtask setup` (it builds one against the pinned nightly's LLVM)")
}
