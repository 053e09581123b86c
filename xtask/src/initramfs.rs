//! The guest's initramfs: an `/init` that mounts what a system has and runs
//! the kernel tests, the test binaries, the programs the tests call with
//! their libraries (the guest architecture's), and the kernel's modules.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::{cpio::Archive, userland::Userland, workspace_root};

/// Tools the kernel tests run, with their libraries.
pub const GUEST_TOOLS: &[&str] = &[
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
    // The real scraper of `twtrace serve`'s per-pod series.
    "prometheus",
];

/// Kernel modules the tests need that distribution kernels build as
/// modules (`ss` asks the kernel through `sock_diag`).
const GUEST_MODULES: &[&str] = &["inet_diag", "tcp_diag"];

/// What goes into one guest besides its userland.
pub struct Contents<'a> {
    pub kernel_tests: &'a Path,
    pub twtrace: &'a Path,
    pub modules: &'a Path,
    pub test_args: &'a [String],
    /// When the guest reports what is still running, if anything is.
    pub watchdog: std::time::Duration,
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
# Containers' and pods' cgroups, as on a systemd host (the cgroup tests
# make their own under it).
mount -t cgroup2 cgroup2 /sys/fs/cgroup
for m in /vm/modules/*.ko; do [ -e "$m" ] && insmod "$m"; done
ip link set lo up
hostname twtrace-vm
echo
echo "twtrace-vm: kernel $(uname -r)"
cd /root
# Shortly before the host's limit, what is stuck, for the log: the tests
# under way, the tasks blocked in the kernel (sysrq w, into the kernel's
# log), and each process's state and kernel stack.
(
    sleep "$(cat /vm/watchdog-seconds)"
    echo "twtrace-vm: under way:" $(ls /run/tests-under-way)
    echo "twtrace-vm: blocked tasks and where each process waits:"
    echo w > /proc/sysrq-trigger
    dmesg | tail -n 120
    for p in /proc/[0-9]*; do
        echo "$(cut -d' ' -f1,3 "$p/stat" 2>/dev/null) $(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)"
        head -n 8 "$p/stack" 2>/dev/null | sed 's/^/    /'
    done
    # One line each for the host's report: every twtrace, and every task
    # in uninterruptible sleep, with where in the kernel it waits.
    for p in /proc/[0-9]*; do
        comm=$(cat "$p/comm" 2>/dev/null)
        state=$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "$p/status" 2>/dev/null)
        case "$comm:$state" in
        twtrace:*|*:D)
            echo "twtrace-vm: waiting: $comm($(basename "$p")) $state $(head -n 1 "$p/stack" 2>/dev/null | sed 's/^.*\] //')"
            ;;
        esac
    done
) &
# The harness keeps a file per test under way here, for the list above.
mkdir -p /run/tests-under-way
export TWTRACE_TESTS_UNDER_WAY=/run/tests-under-way
"$(cat /vm/test-binary)" $(cat /vm/test-args) --test-threads 2 --color never
echo "twtrace-vm: exit $?"
sync
reboot -f
"#;

pub fn build(path: &Path, userland: &Userland, contents: &Contents) -> anyhow::Result<()> {
    let mut archive = Archive::create(path)?;
    archive.file(Path::new("/init"), 0o755, INIT.as_bytes())?;
    archive.file(Path::new("/vm/busybox"), 0o755, &userland.static_busybox()?)?;
    for binary in [contents.kernel_tests, contents.twtrace] {
        userland.add_built(&mut archive, binary)?;
    }
    for tool in GUEST_TOOLS {
        userland.add_program(&mut archive, tool)?;
    }
    // The README-snippet test reads the README through the crate's
    // directory, which must exist for `..` to resolve.
    let root = workspace_root();
    archive.dir(&root.join("twtrace"))?;
    archive.host_path(&root.join("README.md"))?;
    // Users and groups for `setpriv --reuid nobody`; terminfo for tmux.
    // A UTF-8 locale: tmux refuses to start without one. All of it data
    // that reads the same on either architecture.
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
    for (index, module) in module_load_order(contents.modules, GUEST_MODULES)?
        .iter()
        .enumerate()
    {
        let name = format!("/vm/modules/{index:02}-{}.ko", module_name(module));
        archive.file(Path::new(&name), 0o644, &read_module(module)?)?;
    }
    archive.file(
        Path::new("/vm/test-binary"),
        0o644,
        contents.kernel_tests.as_os_str().as_encoded_bytes(),
    )?;
    archive.file(
        Path::new("/vm/test-args"),
        0o644,
        contents.test_args.join(" ").as_bytes(),
    )?;
    archive.file(
        Path::new("/vm/watchdog-seconds"),
        0o644,
        contents.watchdog.as_secs().to_string().as_bytes(),
    )?;
    archive.finish()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_dependencies_come_from_modinfo() {
        let module = b"\x7fELF...\0license=GPL\0depends=inet_diag,sock_diag\0intree=Y\0";
        assert_eq!(module_depends(module), ["inet_diag", "sock_diag"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert_eq!(module_name(Path::new("/m/tcp-diag.ko.xz")), "tcp_diag");
    }
}
