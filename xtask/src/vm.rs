//! `cargo xtask vm-test`: twtrace's kernel tests on the kernels SREs run,
//! each booted under qemu with an initramfs that holds the test binary,
//! twtrace, and the host tools the tests call; plus the host kernel, natively.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{apt, cargo, console::GuestConsole, initramfs, userland::Userland, workspace_root};

/// The machine a guest emulates.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    fn debian(self) -> &'static str {
        match self {
            Self::X86_64 => "amd64",
            Self::Aarch64 => "arm64",
        }
    }

    /// Where Debian keeps its libraries.
    fn triplet(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-linux-gnu",
            Self::Aarch64 => "aarch64-linux-gnu",
        }
    }

    /// The emulator, and the Debian package that has it.
    fn qemu(self) -> (&'static str, &'static str) {
        match self {
            Self::X86_64 => ("qemu-system-x86_64", "qemu-system-x86"),
            Self::Aarch64 => ("qemu-system-aarch64", "qemu-system-arm"),
        }
    }

    fn machine(self) -> &'static [&'static str] {
        match self {
            Self::X86_64 => &[],
            Self::Aarch64 => &["-machine", "virt"],
        }
    }

    fn console(self) -> &'static str {
        match self {
            Self::X86_64 => "ttyS0",
            Self::Aarch64 => "ttyAMA0",
        }
    }

    /// Rust's target for it, when it is not the host's.
    fn cross_target(self) -> Option<&'static str> {
        match self {
            Self::X86_64 => None,
            Self::Aarch64 => Some("aarch64-unknown-linux-gnu"),
        }
    }
}

/// Where a kernel comes from.
enum Source {
    /// The running kernel: the tests run natively.
    Host,
    /// A Debian suite's kernel: a package holding `/boot/vmlinuz-*` (a
    /// metapackage such as `linux-image-cloud-amd64` is resolved to the
    /// suite's image package of today).
    Debian {
        suite: &'static str,
        package: &'static str,
    },
}

struct Kernel {
    name: &'static str,
    arch: Arch,
    source: Source,
    /// How long its whole run may take before the VM is killed.
    limit: Duration,
    /// Under software emulation, one host thread for both CPUs.
    /// Multi-threaded emulation of x86 lets one CPU run kernel code another
    /// has just rewritten (Linux rewrites itself at every static key flip
    /// and tracepoint attach): Debian 13's 6.12 took an int3 Oops in
    /// `sched_clock_cpu` from it, and Debian 11's 5.10 hung once in CI.
    /// One thread costs about half again in time. Debian 12's 6.1 never
    /// crashed so, and on one thread it slowed threefold, to where the
    /// kernel ended loopback TIME_WAIT sockets early by resets the tests did not
    /// set up; it keeps a thread per CPU, as arm64 does.
    one_thread: bool,
}

/// The matrix: the long-term kernels fleets run, one line each. Under
/// software emulation the x86-64 suite takes 6–9 minutes (one test waits
/// 63 s for a real expiry); arm64 is emulated instruction by instruction
/// on an x86-64 host, several times slower again.
const KERNELS: &[Kernel] = &[
    Kernel {
        name: "host",
        arch: Arch::X86_64,
        source: Source::Host,
        limit: Duration::from_mins(30),
        one_thread: false,
    },
    Kernel {
        name: "debian11-cloud",
        arch: Arch::X86_64,
        source: Source::Debian {
            suite: "bullseye",
            package: "linux-image-cloud-amd64",
        },
        limit: Duration::from_mins(20),
        one_thread: true,
    },
    Kernel {
        name: "debian12-cloud",
        arch: Arch::X86_64,
        source: Source::Debian {
            suite: "bookworm",
            package: "linux-image-cloud-amd64",
        },
        limit: Duration::from_mins(20),
        one_thread: false,
    },
    Kernel {
        name: "debian13-cloud",
        arch: Arch::X86_64,
        source: Source::Debian {
            suite: "trixie",
            package: "linux-image-cloud-amd64",
        },
        limit: Duration::from_mins(20),
        one_thread: true,
    },
    Kernel {
        name: "debian12-cloud-arm64",
        arch: Arch::Aarch64,
        source: Source::Debian {
            suite: "bookworm",
            package: "linux-image-cloud-arm64",
        },
        limit: Duration::from_mins(30),
        one_thread: false,
    },
    Kernel {
        name: "debian13-cloud-arm64",
        arch: Arch::Aarch64,
        source: Source::Debian {
            suite: "trixie",
            package: "linux-image-cloud-arm64",
        },
        limit: Duration::from_mins(30),
        one_thread: false,
    },
];

/// The suite of a foreign guest's programs: the one whose C library the
/// host's cross compiler links against (Debian 12's gcc-aarch64-linux-gnu).
const USERLAND_SUITE: &str = "bookworm";

/// The arm64 guest's programs: Debian's packages of the tools the tests
/// call (`initramfs::GUEST_TOOLS`), its C library, busybox for `/init`.
const ARM64_USERLAND: &[&str] = &[
    "libc6",
    "libgcc-s1",
    "busybox-static",
    "dash",
    "coreutils",
    "procps",
    "iproute2",
    "util-linux",
    "tmux",
    "bpftool",
    "redis-server",
    "prometheus",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    Skip(String),
}

/// One kernel's column of the matrix.
pub struct Column {
    kernel: String,
    release: String,
    outcomes: BTreeMap<String, Outcome>,
    /// Set when the run itself broke (the VM did not boot or finish).
    broken: Option<String>,
    /// How long its run took (none for the host's run reused from
    /// `cargo xtask test`).
    took: Option<Duration>,
}

pub struct Options {
    pub kernels: Vec<String>,
    /// Passed to the test binary (a name filter, `--skip NAME`…).
    pub test_args: Vec<String>,
}

/// `cargo xtask vm-test`: every kernel in the list (or those named), then
/// the matrix. `host_results`, when given, are the host's outcomes from a
/// run already made, so the host is not tested twice.
pub fn run(
    options: &Options,
    host_results: Option<BTreeMap<String, Outcome>>,
) -> anyhow::Result<()> {
    for name in &options.kernels {
        if !KERNELS.iter().any(|k| k.name == name) {
            let known: Vec<_> = KERNELS.iter().map(|k| k.name).collect();
            bail!("unknown kernel {name:?}; the list has {}", known.join(", "));
        }
    }
    let chosen: Vec<&Kernel> = KERNELS
        .iter()
        .filter(|k| options.kernels.is_empty() || options.kernels.iter().any(|n| n == k.name))
        .collect();
    let mut host_results = host_results;
    let mut columns = Vec::new();
    let mut builds: Vec<(Arch, TestBinaries)> = Vec::new();
    for kernel in chosen {
        if !builds.iter().any(|(arch, _)| *arch == kernel.arch) {
            builds.push((kernel.arch, TestBinaries::build(kernel.arch)?));
        }
        let binaries = &builds
            .iter()
            .find(|(arch, _)| *arch == kernel.arch)
            .expect("built above")
            .1;
        eprintln!("xtask: kernel tests on {}", kernel.name);
        let started = Instant::now();
        let mut reused = false;
        let mut column = match &kernel.source {
            Source::Host => match host_results.take() {
                Some(mut outcomes) => {
                    // cargo test ran the unit tests too: keep the kernel ones.
                    let names = binaries.test_names()?;
                    outcomes.retain(|test, _| names.contains(test));
                    reused = true;
                    Column {
                        kernel: kernel.name.into(),
                        release: host_release(),
                        outcomes,
                        broken: None,
                        took: None,
                    }
                }
                None => run_native(kernel.name, binaries, &options.test_args)?,
            },
            Source::Debian { suite, package } => {
                let image = fetch_debian_kernel(suite, kernel.arch, package)?;
                run_in_vm(kernel, &image, binaries, &options.test_args)?
            }
        };
        if !reused {
            column.took = Some(started.elapsed());
            eprintln!(
                "xtask: {} took {:.0} s",
                kernel.name,
                started.elapsed().as_secs_f64()
            );
        }
        columns.push(column);
    }
    let matrix = render(&columns);
    println!("{matrix}");
    let dir = workspace_root().join("target/vm");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("matrix.txt"), &matrix)?;
    let broken: Vec<String> = columns
        .iter()
        .filter_map(|c| c.broken.as_ref().map(|why| format!("{}: {why}", c.kernel)))
        .collect();
    let failed: usize = columns
        .iter()
        .map(|c| c.outcomes.values().filter(|o| **o == Outcome::Fail).count())
        .sum();
    if !broken.is_empty() {
        bail!("{}", broken.join("; "));
    }
    if failed > 0 {
        bail!("{failed} kernel tests failed in the matrix");
    }
    Ok(())
}

/// The kernel test binary and the twtrace binary it runs.
struct TestBinaries {
    kernel_tests: PathBuf,
    twtrace: PathBuf,
}

impl TestBinaries {
    /// For the host, the same build as `cargo xtask test`'s own run (so
    /// nothing rebuilds); for another architecture, the kernel tests and
    /// twtrace cross-built (the eBPF object inside is the same).
    fn build(arch: Arch) -> anyhow::Result<Self> {
        let mut command = cargo();
        command.args([
            "test",
            "--release",
            "--locked",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ]);
        command.args(crate::TEST_FEATURES);
        if let Some(target) = arch.cross_target() {
            command.args([
                "--target",
                target,
                "--package",
                "twtrace",
                "--test",
                "kernel",
            ]);
        }
        eprintln!("xtask: building the kernel tests for {}", arch.debian());
        let out = command
            .stderr(Stdio::inherit())
            .output()
            .context("building the kernel tests")?;
        if !out.status.success() {
            bail!(
                "building the kernel tests for {} failed ({})",
                arch.debian(),
                out.status
            );
        }
        let messages: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        // A binary's own unit tests are a `bin` target too, built with
        // the test profile.
        let executable = |name: &str, kind: &str| {
            messages
                .iter()
                .filter(|m| m["target"]["name"] == name && m["target"]["kind"][0] == kind)
                .filter(|m| kind == "test" || m["profile"]["test"] == false)
                .find_map(|m| m["executable"].as_str().map(PathBuf::from))
                .with_context(|| format!("cargo did not name the {name} {kind} executable"))
        };
        Ok(Self {
            kernel_tests: executable("kernel", "test")?,
            twtrace: executable("twtrace", "bin")?,
        })
    }
}

impl TestBinaries {
    /// The kernel tests' names, as the binary lists them.
    fn test_names(&self) -> anyhow::Result<Vec<String>> {
        let out = Command::new(&self.kernel_tests)
            .arg("--list")
            .output()
            .context("listing the kernel tests")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.strip_suffix(": test"))
            .map(String::from)
            .collect())
    }
}

fn host_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn run_native(name: &str, binaries: &TestBinaries, args: &[String]) -> anyhow::Result<Column> {
    let mut child = Command::new(&binaries.kernel_tests)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("running the kernel tests")?;
    let mut outcomes = BTreeMap::new();
    for line in BufReader::new(child.stdout.take().context("test output")?).lines() {
        let line = line?;
        println!("[{name}] {line}");
        if let Some((test, outcome)) = parse_test_line(&line) {
            outcomes.insert(test, outcome);
        }
    }
    child.wait()?;
    Ok(Column {
        kernel: name.into(),
        release: host_release(),
        outcomes,
        broken: None,
        took: None,
    })
}

/// A libtest line: `test NAME ... ok`, `... FAILED`, `... ignored[, reason]`.
pub fn parse_test_line(line: &str) -> Option<(String, Outcome)> {
    let rest = line.trim_end().strip_prefix("test ")?;
    let (name, result) = rest.split_once(" ... ")?;
    let outcome = match result {
        "ok" => Outcome::Pass,
        "FAILED" => Outcome::Fail,
        // libtest-mimic writes `ignored (reason)`, libtest `ignored, reason`.
        ignored if ignored.starts_with("ignored") => {
            let reason = ignored
                .trim_start_matches("ignored")
                .trim_start_matches([',', ' ']);
            let reason = reason
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or(reason);
            Outcome::Skip(reason.to_string())
        }
        _ => return None,
    };
    // libtest-mimic pads names to a column: the name is what --list says.
    Some((name.trim_end().to_string(), outcome))
}

/// A kernel image from Debian's archive, unpacked under `target/vm`
/// (fetched once; a new image package is fetched when the metapackage
/// moves on).
struct KernelImage {
    vmlinuz: PathBuf,
    modules: PathBuf,
}

fn fetch_debian_kernel(
    suite: &'static str,
    arch: Arch,
    package: &str,
) -> anyhow::Result<KernelImage> {
    let archive = apt::Suite::new(suite, arch.debian())?;
    let image_package = archive.resolve(package)?;
    let dir = workspace_root().join("target/vm").join(&image_package);
    let unpacked = dir.join("root");
    if !unpacked.join("boot").is_dir() {
        let deb = archive.download(&image_package, &dir)?;
        apt::unpack(&deb, &unpacked)?;
    }
    let vmlinuz = fs::read_dir(unpacked.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{image_package} has no /boot/vmlinuz-*"))?;
    // Debian 13's packages ship them under the merged /usr.
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| unpacked.join(dir))
        .find(|dir| dir.is_dir())
        .with_context(|| format!("{image_package} has no /lib/modules"))?;
    let modules = fs::read_dir(&modules_dir)
        .with_context(|| format!("reading {}", modules_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .next()
        .with_context(|| format!("{image_package} has an empty /lib/modules"))?;
    Ok(KernelImage { vmlinuz, modules })
}

/// KVM first when the host lets us open it (and the guest is of the host's
/// architecture), then software emulation. A nested KVM can open fine and
/// still never boot (seen here: the guest hangs after the BIOS), so each
/// accelerator must boot within its limit or the next is tried.
fn accelerators(arch: Arch, one_thread: bool) -> Vec<Accelerator> {
    let kvm = arch.cross_target().is_none()
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
    // `arch-capabilities` off: nested KVM refuses to set that MSR.
    // A KVM guest boots in about a second; software emulation boots
    // Debian's cloud kernel in about 3 s (x86-64) or 20 s (arm64).
    let mut list = Vec::new();
    if kvm {
        list.push(Accelerator {
            name: "kvm",
            options: "kvm",
            cpu: "host,-arch-capabilities",
            boot_limit: Duration::from_secs(15),
            attempts: 1,
        });
    }
    list.push(Accelerator {
        name: "tcg",
        // Why: `Kernel::one_thread`.
        options: if one_thread {
            "tcg,thread=single"
        } else {
            "tcg"
        },
        cpu: match arch {
            Arch::X86_64 => "max",
            // Every feature an arm64 server has (LSE atomics, which the
            // BPF JIT uses, among them), with the cheap pointer
            // authentication: the architected one costs emulation dearly.
            Arch::Aarch64 => "max,pauth-impdef=on",
        },
        boot_limit: Duration::from_mins(3),
        // A guest that dies before its first line costs little to boot
        // again, and one emulator fault must not fail a whole matrix.
        attempts: 3,
    });
    list
}

struct Accelerator {
    name: &'static str,
    /// qemu's `-accel` argument.
    options: &'static str,
    cpu: &'static str,
    /// How long until the guest's first line, or it is taken as not booting.
    boot_limit: Duration,
    /// Boots tried before the next accelerator.
    attempts: u32,
}

fn run_in_vm(
    kernel: &Kernel,
    image: &KernelImage,
    binaries: &TestBinaries,
    args: &[String],
) -> anyhow::Result<Column> {
    let dir = workspace_root().join("target/vm");
    fs::create_dir_all(&dir)?;
    let initramfs = dir.join(format!("{}.cpio", kernel.name));
    let userland = match kernel.arch.cross_target() {
        None => Userland::Host,
        Some(_) => Userland::debian(
            USERLAND_SUITE,
            kernel.arch.debian(),
            kernel.arch.triplet(),
            ARM64_USERLAND,
        )?,
    };
    initramfs::build(
        &initramfs,
        &userland,
        &initramfs::Contents {
            kernel_tests: &binaries.kernel_tests,
            twtrace: &binaries.twtrace,
            modules: &image.modules,
            test_args: args,
            // A minute before the host's limit: time to print it all.
            watchdog: kernel.limit.saturating_sub(Duration::from_mins(1)),
        },
    )?;
    let mut column = Column {
        kernel: kernel.name.into(),
        release: String::new(),
        outcomes: BTreeMap::new(),
        broken: Some("the VM did not boot".into()),
        took: None,
    };
    'accelerators: for accel in accelerators(kernel.arch, kernel.one_thread) {
        for attempt in 1..=accel.attempts {
            eprintln!(
                "xtask: booting {} under qemu ({})",
                image.vmlinuz.display(),
                accel.name
            );
            if boot(kernel, image, &initramfs, &accel, &mut column)? {
                break 'accelerators;
            }
            eprintln!(
                "xtask: the guest did not come up under {} within {:?} (attempt {attempt} of {})",
                accel.name, accel.boot_limit, accel.attempts
            );
        }
    }
    if column.outcomes.is_empty() && column.broken.is_none() {
        column.broken = Some("the VM ran no tests".into());
    }
    Ok(column)
}

/// One boot; false when the guest never came up.
fn boot(
    kernel: &Kernel,
    image: &KernelImage,
    initramfs: &Path,
    accel: &Accelerator,
    column: &mut Column,
) -> anyhow::Result<bool> {
    let name = kernel.name;
    let (qemu, package) = kernel.arch.qemu();
    let mut child = Command::new(qemu)
        .args(kernel.arch.machine())
        .args(["-accel", accel.options, "-cpu", accel.cpu])
        .args(["-smp", "2", "-m", "2048"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
            "-monitor",
            "none",
        ])
        .arg("-kernel")
        .arg(&image.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(format!(
            "console={} rdinit=/init panic=-1 quiet loglevel=4",
            kernel.arch.console()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {qemu} (cargo xtask test installs {package})"))?;
    let stdout = child.stdout.take().context("qemu output")?;
    let (lines_tx, lines_rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut console = GuestConsole::default();
    let killed = loop {
        let limit = if console.release.is_some() {
            kernel.limit
        } else {
            accel.boot_limit
        };
        let left = (started + limit).saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                println!("[{name}] {line}");
                console.read(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break false,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                break true;
            }
        }
    };
    child.wait()?;
    let Some(release) = console.release.take() else {
        return Ok(false);
    };
    column.release = release;
    column.broken = match (console.exited, killed) {
        (true, _) => None,
        (false, true) => Some(format!(
            "killed after {:?}; {}",
            kernel.limit,
            console.when_it_stopped()
        )),
        (false, false) => Some(format!(
            "the VM stopped before the tests finished; {}",
            console.when_it_stopped()
        )),
    };
    column.outcomes = std::mem::take(&mut console.outcomes);
    Ok(true)
}

/// kernel × test → pass / FAIL / skip (reason), as text.
fn render(columns: &[Column]) -> String {
    let mut tests: Vec<&String> = columns.iter().flat_map(|c| c.outcomes.keys()).collect();
    tests.sort();
    tests.dedup();
    let width = tests.iter().map(|t| t.len()).max().unwrap_or(4).max(4);
    let mut out = String::new();
    let _ = write!(out, "{:width$}", "test");
    for column in columns {
        let _ = write!(
            out,
            "  {:<24}",
            format!("{} ({})", column.kernel, column.release)
        );
    }
    out.push('\n');
    let mut reasons: Vec<String> = Vec::new();
    for test in tests {
        let _ = write!(out, "{test:width$}");
        for column in columns {
            let cell = match column.outcomes.get(test) {
                Some(Outcome::Pass) => "pass".to_string(),
                Some(Outcome::Fail) => "FAIL".to_string(),
                Some(Outcome::Skip(reason)) => {
                    reasons.push(format!("{} / {test}: {reason}", column.kernel));
                    format!("skip ({})", reasons.len())
                }
                None => "-".to_string(),
            };
            let _ = write!(out, "  {cell:<24}");
        }
        out.push('\n');
    }
    for (index, reason) in reasons.iter().enumerate() {
        let _ = writeln!(out, "({}) {reason}", index + 1);
    }
    let took: Vec<String> = columns
        .iter()
        .filter_map(|c| {
            c.took
                .map(|t| format!("{} {:.0} s", c.kernel, t.as_secs_f64()))
        })
        .collect();
    if !took.is_empty() {
        let _ = writeln!(out, "took: {}", took.join(", "));
    }
    for column in columns {
        if let Some(why) = &column.broken {
            let _ = writeln!(out, "{}: {why}", column.kernel);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_lines_parse_with_skip_reasons() {
        assert_eq!(
            parse_test_line("test a_b ... ok"),
            Some(("a_b".into(), Outcome::Pass))
        );
        assert_eq!(
            parse_test_line("test a_b ... FAILED"),
            Some(("a_b".into(), Outcome::Fail))
        );
        assert_eq!(
            parse_test_line("test a_b ... ignored, no tcp_sendmsg_locked"),
            Some(("a_b".into(), Outcome::Skip("no tcp_sendmsg_locked".into())))
        );
        assert_eq!(
            parse_test_line("test a_b ... ignored (no BTF)"),
            Some(("a_b".into(), Outcome::Skip("no BTF".into())))
        );
        assert_eq!(
            parse_test_line("test a_b                  ... ok"),
            Some(("a_b".into(), Outcome::Pass))
        );
        assert_eq!(parse_test_line("running 3 tests"), None);
        assert_eq!(parse_test_line("test result: ok. 3 passed"), None);
    }

    #[test]
    fn the_matrix_names_every_skip_reason() {
        let column = |kernel: &str, outcome: Outcome| Column {
            kernel: kernel.into(),
            release: "6.x".into(),
            outcomes: [("t".to_string(), outcome)].into(),
            broken: None,
            took: Some(Duration::from_secs(90)),
        };
        let text = render(&[
            column("host", Outcome::Pass),
            column("old", Outcome::Skip("why".into())),
        ]);
        assert!(text.contains("pass"), "{text}");
        assert!(
            text.contains("skip (1)") && text.contains("(1) old / t: why"),
            "{text}"
        );
        assert!(text.contains("took: host 90 s, old 90 s"), "{text}");
    }
}
