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

use crate::{cargo, cpio::Archive, workspace_root};

/// Where a kernel comes from.
enum Source {
    /// The running kernel: the tests run natively.
    Host,
    /// A Debian package holding `/boot/vmlinuz-*` (a metapackage such as
    /// `linux-image-cloud-amd64` is resolved to today's image package).
    Debian(&'static str),
}

struct Kernel {
    name: &'static str,
    source: Source,
}

/// The matrix. Adding a kernel is one line.
const KERNELS: &[Kernel] = &[
    Kernel {
        name: "host",
        source: Source::Host,
    },
    Kernel {
        name: "debian12-cloud",
        source: Source::Debian("linux-image-cloud-amd64"),
    },
];

/// How long one VM may take before it is killed: the kernel suite takes
/// about two minutes under KVM (one test waits 63 s for a real expiry);
/// software emulation is several times slower.
const VM_LIMIT: Duration = Duration::from_mins(30);

/// Tools the kernel tests run, copied from the host with their libraries.
const GUEST_TOOLS: &[&str] = &[
    "sh",
    "ip",
    "ss",
    "nstat",
    "sysctl",
    "tmux",
    "setpriv",
    "unshare",
    "stty",
    "sleep",
    "false",
    "true",
    "cat",
    "env",
    "kill",
    "bpftool",
    // The real server whose clients abort (`cargo xtask test` installs it).
    "redis-server",
];

/// Kernel modules the tests need that distribution kernels build as
/// modules (`ss` asks the kernel through `sock_diag`).
const GUEST_MODULES: &[&str] = &["inet_diag", "tcp_diag"];

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
    let binaries = TestBinaries::build()?;
    let mut host_results = host_results;
    let mut columns = Vec::new();
    for kernel in chosen {
        eprintln!("xtask: kernel tests on {}", kernel.name);
        let column = match &kernel.source {
            Source::Host => match host_results.take() {
                Some(mut outcomes) => {
                    // cargo test ran the unit tests too: keep the kernel ones.
                    let names = binaries.test_names()?;
                    outcomes.retain(|test, _| names.contains(test));
                    Column {
                        kernel: kernel.name.into(),
                        release: host_release(),
                        outcomes,
                        broken: None,
                    }
                }
                None => run_native(kernel.name, &binaries, &options.test_args)?,
            },
            Source::Debian(package) => {
                let image = fetch_debian_kernel(package)?;
                run_in_vm(kernel.name, &image, &binaries, &options.test_args)?
            }
        };
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
    fn build() -> anyhow::Result<Self> {
        eprintln!("xtask: building the kernel tests");
        let out = cargo()
            // The same flags as `cargo xtask test`'s run, so nothing rebuilds.
            .args([
                "test",
                "--release",
                "--locked",
                "--no-run",
                "--message-format=json-render-diagnostics",
            ])
            .args(crate::TEST_FEATURES)
            .stderr(Stdio::inherit())
            .output()
            .context("building the kernel tests")?;
        if !out.status.success() {
            bail!("building the kernel tests failed ({})", out.status);
        }
        let kernel_tests = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|message| {
                message["target"]["name"] == "kernel" && message["target"]["kind"][0] == "test"
            })
            .find_map(|message| message["executable"].as_str().map(PathBuf::from))
            .context("cargo did not name the kernel test executable")?;
        Ok(Self {
            kernel_tests,
            twtrace: workspace_root().join("target/release/twtrace"),
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

fn fetch_debian_kernel(package: &str) -> anyhow::Result<KernelImage> {
    let image_package = resolve_metapackage(package)?;
    let dir = workspace_root().join("target/vm").join(&image_package);
    let unpacked = dir.join("root");
    if !unpacked.join("boot").is_dir() {
        fs::create_dir_all(&dir)?;
        eprintln!("xtask: apt-get download {image_package}");
        let status = Command::new("apt-get")
            .args(["download", &image_package])
            .current_dir(&dir)
            .status()
            .context("running apt-get download")?;
        if !status.success() {
            bail!("apt-get download {image_package} failed; try apt-get update");
        }
        let deb = fs::read_dir(&dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&unpacked)
            .status()
            .context("running dpkg-deb")?;
        if !status.success() {
            bail!("dpkg-deb -x {} failed", deb.display());
        }
    }
    let vmlinuz = fs::read_dir(unpacked.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{image_package} has no /boot/vmlinuz-*"))?;
    let modules = fs::read_dir(unpacked.join("lib/modules"))
        .with_context(|| format!("{image_package} has no /lib/modules"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .next()
        .with_context(|| format!("{image_package} has an empty /lib/modules"))?;
    Ok(KernelImage { vmlinuz, modules })
}

/// `linux-image-cloud-amd64` → `linux-image-6.1.0-56-cloud-amd64`; an image
/// package names itself.
fn resolve_metapackage(package: &str) -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", package])
        .output()
        .context("running apt-cache depends")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.trim().is_empty() {
        bail!("apt-cache knows no package {package}; try apt-get update");
    }
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|dep| dep.starts_with("linux-image-") && dep.chars().any(|c| c.is_ascii_digit()))
        .unwrap_or(package)
        .to_string())
}

/// The guest's `/init`: mounts what a system has, loads the modules, runs
/// the tests, prints markers the host parses, and powers off.
const INIT: &str = r#"#!/vm/busybox sh
/vm/busybox mkdir -p /vm/bin /proc /sys /dev /tmp /run /root
/vm/busybox --install -s /vm/bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/vm/bin
export HOME=/root TERM=xterm LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
# No tmpfs on /tmp: the initramfs root is writable already, and a
# checkout under /tmp (CI's clones) would be hidden by it.
chmod 1777 /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing
for m in /vm/modules/*.ko; do [ -e "$m" ] && insmod "$m"; done
ip link set lo up
hostname twtrace-vm
echo
echo "twtrace-vm: kernel $(uname -r)"
cd /root
"$(cat /vm/test-binary)" $(cat /vm/test-args) --test-threads 2 --color never
echo "twtrace-vm: exit $?"
sync
reboot -f
"#;

fn build_initramfs(
    path: &Path,
    kernel: &KernelImage,
    binaries: &TestBinaries,
    args: &[String],
) -> anyhow::Result<()> {
    let mut archive = Archive::create(path)?;
    archive.file(Path::new("/init"), 0o755, INIT.as_bytes())?;
    let busybox = which("busybox")?;
    if !ldd(&busybox)?.is_empty() {
        bail!(
            "{} is dynamically linked; install busybox-static",
            busybox.display()
        );
    }
    archive.file(Path::new("/vm/busybox"), 0o755, &fs::read(&busybox)?)?;
    let mut binaries_needed = vec![binaries.kernel_tests.clone(), binaries.twtrace.clone()];
    for tool in GUEST_TOOLS {
        binaries_needed.push(which(tool)?);
    }
    for binary in &binaries_needed {
        archive.host_path(binary)?;
        for library in ldd(binary)? {
            archive.host_path(&library)?;
        }
    }
    // The README-snippet test reads the README through the crate's
    // directory, which must exist for `..` to resolve.
    let root = workspace_root();
    archive.dir(&root.join("twtrace"))?;
    archive.host_path(&root.join("README.md"))?;
    // Users and groups for `setpriv --reuid nobody`; terminfo for tmux.
    // A UTF-8 locale: tmux refuses to start without one.
    for path in [
        "/etc/passwd",
        "/etc/group",
        "/usr/lib/terminfo",
        "/usr/lib/locale/C.utf8",
    ] {
        if Path::new(path).exists() {
            archive.host_path(Path::new(path))?;
        }
    }
    for (index, module) in module_load_order(&kernel.modules, GUEST_MODULES)?
        .iter()
        .enumerate()
    {
        let name = format!("/vm/modules/{index:02}-{}.ko", module_name(module));
        archive.file(Path::new(&name), 0o644, &read_module(module)?)?;
    }
    archive.file(
        Path::new("/vm/test-binary"),
        0o644,
        binaries.kernel_tests.as_os_str().as_encoded_bytes(),
    )?;
    archive.file(Path::new("/vm/test-args"), 0o644, args.join(" ").as_bytes())?;
    archive.finish()
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .with_context(|| {
            format!("{program} is not installed (the VM tests copy it into the guest)")
        })
}

/// The shared libraries a binary loads, the dynamic loader included.
fn ldd(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once(" => ") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// The wanted modules and what they depend on, dependencies first. A
/// Debian package ships no `modules.dep` (depmod makes it at install), so
/// the dependencies come from each module's own `.modinfo` `depends=`. A
/// module built into the kernel is not found and needs nothing.
fn module_load_order(modules_dir: &Path, wanted: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    fn index(dir: &Path, found: &mut BTreeMap<String, PathBuf>) -> std::io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                index(&path, found)?;
            } else if path.to_string_lossy().contains(".ko") {
                found.insert(module_name(&path), path);
            }
        }
        Ok(())
    }
    fn visit(
        name: &str,
        files: &BTreeMap<String, PathBuf>,
        order: &mut Vec<PathBuf>,
    ) -> anyhow::Result<()> {
        let Some(path) = files.get(name) else {
            return Ok(());
        };
        if order.contains(path) {
            return Ok(());
        }
        for dep in module_depends(&read_module(path)?) {
            visit(&dep, files, order)?;
        }
        order.push(path.clone());
        Ok(())
    }
    let mut files = BTreeMap::new();
    index(&modules_dir.join("kernel"), &mut files)
        .with_context(|| format!("reading {}", modules_dir.display()))?;
    let mut order = Vec::new();
    for name in wanted {
        visit(name, &files, &mut order)?;
    }
    Ok(order)
}

/// The `depends=` entry of a module's `.modinfo` strings.
fn module_depends(module: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(start) = module.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let value = &module[start + key.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect()
}

/// `tcp_diag.ko.xz` → `tcp_diag` (module names use `_` where files may
/// use `-`).
fn module_name(path: &Path) -> String {
    let file = path.file_name().unwrap_or_default().to_string_lossy();
    file.split('.').next().unwrap_or_default().replace('-', "_")
}

/// A module file, decompressed: busybox's insmod takes plain ELF.
fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let decompressor = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let out = Command::new(decompressor)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {decompressor}"))?;
    if !out.status.success() {
        bail!("{decompressor} -dc {} failed", path.display());
    }
    Ok(out.stdout)
}

/// KVM first when the host lets us open it, then software emulation. A
/// nested KVM can open fine and still never boot (seen here: the guest
/// hangs after the BIOS), so each accelerator must boot within
/// `BOOT_LIMIT` or the next is tried.
fn accelerators() -> Vec<Accelerator> {
    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    // `arch-capabilities` off: nested KVM refuses to set that MSR.
    // A KVM guest boots in about a second; software emulation boots
    // Debian's cloud kernel in about 3 s.
    let mut list = Vec::new();
    if kvm {
        list.push(Accelerator {
            name: "kvm",
            cpu: "host,-arch-capabilities",
            boot_limit: Duration::from_secs(15),
        });
    }
    list.push(Accelerator {
        name: "tcg",
        cpu: "max",
        boot_limit: Duration::from_secs(90),
    });
    list
}

struct Accelerator {
    name: &'static str,
    cpu: &'static str,
    /// How long until the guest's first line, or it is taken as not booting.
    boot_limit: Duration,
}

fn run_in_vm(
    name: &str,
    kernel: &KernelImage,
    binaries: &TestBinaries,
    args: &[String],
) -> anyhow::Result<Column> {
    let dir = workspace_root().join("target/vm");
    fs::create_dir_all(&dir)?;
    let initramfs = dir.join(format!("{name}.cpio"));
    build_initramfs(&initramfs, kernel, binaries, args)?;
    let mut column = Column {
        kernel: name.into(),
        release: String::new(),
        outcomes: BTreeMap::new(),
        broken: Some("the VM did not boot".into()),
    };
    for accel in accelerators() {
        eprintln!(
            "xtask: booting {} under qemu ({})",
            kernel.vmlinuz.display(),
            accel.name
        );
        if boot(name, kernel, &initramfs, &accel, &mut column)? {
            break;
        }
        eprintln!(
            "xtask: the guest did not boot under {} within {:?}",
            accel.name, accel.boot_limit
        );
    }
    if column.outcomes.is_empty() && column.broken.is_none() {
        column.broken = Some("the VM ran no tests".into());
    }
    Ok(column)
}

/// One boot; false when the guest never came up.
fn boot(
    name: &str,
    kernel: &KernelImage,
    initramfs: &Path,
    accel: &Accelerator,
    column: &mut Column,
) -> anyhow::Result<bool> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", accel.name, "-cpu", accel.cpu])
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
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=3",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (cargo xtask test installs qemu-system-x86)")?;
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
    let mut booted = false;
    loop {
        let limit = if booted { VM_LIMIT } else { accel.boot_limit };
        let left = (started + limit).saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                println!("[{name}] {line}");
                // The firmware's escape sequences may precede the marker.
                if let Some(at) = line.find("twtrace-vm: kernel ") {
                    column.release = line[at + 19..].to_string();
                    column.broken = Some("the VM stopped before the tests finished".into());
                    booted = true;
                } else if line.contains("twtrace-vm: exit ") {
                    column.broken = None;
                } else if let Some((test, outcome)) = parse_test_line(line) {
                    column.outcomes.insert(test, outcome);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if booted {
                    column.broken = Some(format!("killed after {VM_LIMIT:?}"));
                }
                let _ = child.kill();
                break;
            }
        }
    }
    child.wait()?;
    Ok(booted)
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
    fn module_dependencies_come_from_modinfo() {
        let module = b"\x7fELF...\0license=GPL\0depends=inet_diag,sock_diag\0intree=Y\0";
        assert_eq!(module_depends(module), ["inet_diag", "sock_diag"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert_eq!(module_name(Path::new("/m/tcp-diag.ko.xz")), "tcp_diag");
    }

    #[test]
    fn the_matrix_names_every_skip_reason() {
        let column = |kernel: &str, outcome: Outcome| Column {
            kernel: kernel.into(),
            release: "6.x".into(),
            outcomes: [("t".to_string(), outcome)].into(),
            broken: None,
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
    }
}
