//! Installing the eBPF toolchain from nothing, idempotently.
//!
//! bpf-linker must link the same LLVM major as the nightly rustc that
//! emits the bitcode. Debian's LLVM is too old, so bpf-linker is built
//! against the nightly toolchain's own shared libLLVM through a fake LLVM
//! prefix of two symlinks (see shared/notes/toolchain.md).

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::workspace_root;

const BPF_LINKER_VERSION: &str = "0.13.0";
const EBPF_TARGET: &str = "bpfel-unknown-none";

/// What setup installed, for later tasks.
pub struct Tools {
    pub toolchain: String,
    pub bpf_linker: PathBuf,
}

impl Tools {
    /// A cargo command building the eBPF crate with the pinned nightly.
    pub fn ebpf_cargo(&self, cargo_args: &[&str]) -> Command {
        let (subcommand, rest) = cargo_args.split_first().expect("a cargo subcommand");
        let mut command = Command::new("rustup");
        command
            .current_dir(workspace_root())
            .args(["run", &self.toolchain, "cargo", subcommand])
            .args(["--release", "--locked", "--package", "twtrace-ebpf"])
            .args(["-Z", "build-std=core", "--target", EBPF_TARGET])
            .arg("--target-dir")
            .arg(workspace_root().join("target/ebpf"))
            .args(rest)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("CARGO")
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                format!("-Clinker={}", self.bpf_linker.display()),
            );
        command
    }
}

pub fn run() -> anyhow::Result<Tools> {
    let toolchain = env::var("TWTRACE_EBPF_TOOLCHAIN")
        .context("TWTRACE_EBPF_TOOLCHAIN is unset: run through `cargo xtask` from the checkout")?;
    let tools_dir = PathBuf::from(
        env::var_os("TWTRACE_TOOLS_DIR")
            .context("TWTRACE_TOOLS_DIR is unset: run through `cargo xtask` from the checkout")?,
    );

    step(1, &format!("{toolchain} with rust-src and clippy"), || {
        ensure_toolchain(&toolchain)
    })?;
    let bpf_linker = tools_dir.join("bin/bpf-linker");
    step(
        2,
        &format!("bpf-linker {BPF_LINKER_VERSION} against {toolchain}'s LLVM"),
        || ensure_bpf_linker(&toolchain, &tools_dir),
    )?;
    Ok(Tools {
        toolchain,
        bpf_linker,
    })
}

/// Programs the kernel tests drive, and the Debian packages that have them.
/// A name with a `/` is a file the package has (a library, a start file).
const TEST_TOOLS: [(&str, &str); 18] = [
    ("bpftool", "bpftool"),
    ("tmux", "tmux"),
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("setpriv", "util-linux"),
    ("unshare", "util-linux"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    // The unit's sandbox is rated by `systemd-analyze security --offline`.
    ("systemd-analyze", "systemd"),
    // The real server scrapes `twtrace serve` for per-pod series.
    ("prometheus", "prometheus"),
    // What `cargo xtask bench` measures against, and with (its smoke run
    // is part of `test`).
    ("tcpstates", "libbpf-tools"),
    ("nginx", "nginx-light"),
    ("wrk", "wrk"),
    // The real server whose clients abort, for how connections end.
    ("redis-server", "redis-server"),
    // The arm64 guest: its emulator, the cross linker with its C library,
    // and readelf, which finds what a foreign binary loads.
    ("qemu-system-aarch64", "qemu-system-arm"),
    ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    (
        "/usr/aarch64-linux-gnu/lib/Scrt1.o",
        "libc6-dev-arm64-cross",
    ),
    ("readelf", "binutils"),
];

/// The Kubernetes schema validator from `PyPI`, for the `DaemonSet` manifest: the
/// version the deploy test was written against.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// Installs the test tools that are missing (Debian's apt), for `test`.
pub fn test_tools() -> anyhow::Result<()> {
    step(
        3,
        "test tools (tmux, iproute2, util-linux, bpftool, qemu, busybox, systemd-analyze, prometheus, nginx, wrk, tcpstates, redis-server, the arm64 cross compiler)",
        || install_missing(&TEST_TOOLS),
    )?;
    step(4, KUBERNETES_VALIDATE, install_kubernetes_validate)?;
    step(
        5,
        &format!("Rust's {ARM64_TARGET} target"),
        ensure_arm64_target,
    )
}

/// The packages, from Debian's apt, of the `(program, package)` pairs
/// whose program is not installed; whether anything was installed.
fn install_missing(tools: &[(&str, &str)]) -> anyhow::Result<bool> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(program, _)| {
            if program.contains('/') {
                !Path::new(program).exists()
            } else {
                !on_path(program)
            }
        })
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(false);
    }
    eprintln!();
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    if !install().is_ok_and(|s| s.success()) {
        // A fresh machine's package lists may be empty or stale.
        let updated = Command::new("apt-get").arg("update").status()?;
        if !updated.success() || !install()?.success() {
            bail!(
                "apt-get install {} failed; install them by hand",
                missing.join(" ")
            );
        }
    }
    Ok(true)
}

const ARM64_TARGET: &str = "aarch64-unknown-linux-gnu";

/// The standard library for arm64, for the toolchain building twtrace (the
/// one cargo runs xtask with).
fn ensure_arm64_target() -> anyhow::Result<bool> {
    let out = Command::new("rustc")
        .args(["--print", "target-libdir", "--target", ARM64_TARGET])
        .output()
        .context("running rustc")?;
    let libdir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && libdir.is_dir() {
        return Ok(false);
    }
    let status = Command::new("rustup")
        .args(["target", "add", ARM64_TARGET])
        .status()
        .context("running rustup")?;
    if !status.success() {
        bail!("rustup target add {ARM64_TARGET} failed");
    }
    Ok(true)
}

/// Into `.tools/python` (the deploy test looks there), with pip, once.
fn install_kubernetes_validate() -> anyhow::Result<bool> {
    let target = PathBuf::from(
        env::var_os("TWTRACE_TOOLS_DIR")
            .context("TWTRACE_TOOLS_DIR is unset: run through `cargo xtask` from the checkout")?,
    )
    .join("python");
    if target.join("bin/kubernetes-validate").is_file() {
        return Ok(false);
    }
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg("--target")
        .arg(&target)
        .arg(KUBERNETES_VALIDATE)
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .status()
        .context("running python3 -m pip (install python3 and pip)")?;
    if !status.success() {
        bail!("pip install {KUBERNETES_VALIDATE} failed");
    }
    Ok(true)
}

fn on_path(program: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|dir| Path::new(dir).join(program).is_file())
}

/// Prints one progress line per step: what, and whether it did anything.
fn step(n: u32, what: &str, f: impl FnOnce() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    eprint!("setup [{n}] {what} … ");
    let installed = f().with_context(|| format!("setting up {what}"))?;
    eprintln!("{}", if installed { "installed" } else { "ok" });
    Ok(())
}

fn sysroot(toolchain: &str) -> Option<PathBuf> {
    let out = Command::new("rustc")
        .args([&format!("+{toolchain}"), "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Returns whether anything had to be installed.
fn ensure_toolchain(toolchain: &str) -> anyhow::Result<bool> {
    let complete = |root: &Path| {
        root.join("lib/rustlib/src/rust/library/core/Cargo.toml")
            .exists()
            && root.join("bin/cargo-clippy").exists()
    };
    if sysroot(toolchain).is_some_and(|root| complete(&root)) {
        return Ok(false);
    }
    eprintln!();
    let status = Command::new("rustup")
        .args(["toolchain", "install", toolchain, "--profile", "minimal"])
        .args(["--component", "rust-src,clippy", "--no-self-update"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .context("running rustup (is it installed and on PATH?)")?;
    if !status.success() {
        bail!("rustup toolchain install {toolchain} failed ({status})");
    }
    let root = sysroot(toolchain).context("the toolchain is installed but rustc does not run")?;
    if !complete(&root) {
        bail!("{toolchain} is installed but lacks rust-src or clippy");
    }
    Ok(true)
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` → 22.
fn llvm_major(soname: &str) -> Option<u32> {
    soname
        .strip_prefix("libLLVM.so.")?
        .split(['.', '-'])
        .next()?
        .parse()
        .ok()
}

/// Returns whether anything had to be built.
fn ensure_bpf_linker(toolchain: &str, tools_dir: &Path) -> anyhow::Result<bool> {
    let sysroot = sysroot(toolchain).context("the pinned nightly does not run")?;
    let libllvm = fs::read_dir(sysroot.join("lib"))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .context("the nightly ships no libLLVM.so.*")?;
    let major = llvm_major(&libllvm)
        .with_context(|| format!("cannot read an LLVM major from {libllvm}"))?;

    // The stamp names everything the binary depends on; a new nightly
    // (another libLLVM) makes it stale and triggers a rebuild.
    let stamp_path = tools_dir.join("bpf-linker.stamp");
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION} llvm-{major} {}",
        sysroot.join("lib").join(&libllvm).display()
    );
    let linker = tools_dir.join("bin/bpf-linker");
    if linker.exists() && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(false);
    }
    eprintln!("(building, about a minute)");

    // The fake LLVM prefix: one link to link against, one for the runtime
    // loader (bpf-linker's RUNPATH points at this lib directory).
    let prefix = tools_dir.join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib)?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(sysroot.join("lib").join(&libllvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let status = Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .arg("--root")
        .arg(tools_dir)
        .env("RUSTUP_TOOLCHAIN", toolchain)
        .env("LLVM_PREFIX", &prefix)
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed ({status})");
    }
    let works = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if !works {
        bail!("{} was built but does not run", linker.display());
    }
    fs::write(&stamp_path, stamp)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn llvm_major_comes_from_the_soname() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM.so.23-rust-1.101.0-nightly"), Some(23));
        assert_eq!(llvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
    }
}
