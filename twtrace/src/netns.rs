//! The host's network namespaces, and reading what the kernel keeps per
//! namespace (sysctls, `/proc/net/*`) from inside each one. Every
//! namespace has its own `tcp_max_tw_buckets`, sockstat and counters, and
//! `/proc/sys/net` shows the reader's own.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

/// One network namespace, by the inode `ip netns identify` and `lsns` show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub inode: u64,
    /// A file that names it: `/run/netns/NAME` or `/proc/PID/ns/net`.
    pub path: PathBuf,
}

/// Every network namespace a process lives in or `ip netns` holds, named
/// mounts first; twtrace's own included.
#[must_use]
pub fn all() -> Vec<Namespace> {
    let mut found: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let named = fs::read_dir("/run/netns").into_iter().flatten().flatten();
    let processes = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        });
    let paths = named
        .map(|e| e.path())
        .chain(processes.map(|e| e.path().join("ns/net")));
    for path in paths {
        // A process may exit while we look: skip it.
        if let Ok(meta) = fs::metadata(&path) {
            found.entry(meta.ino()).or_insert(path);
        }
    }
    found
        .into_iter()
        .map(|(inode, path)| Namespace { inode, path })
        .collect()
}

/// Runs `read` on a thread that has entered `ns` (network namespaces are
/// per thread), so `/proc/sys/net` and `/proc/net` are that namespace's.
pub fn read_in<T: Send>(ns: &Namespace, read: impl FnOnce() -> T + Send) -> io::Result<T> {
    let file = File::open(&ns.path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on an open namespace file of ours, for
                // this thread only; it ends with the scope.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(read())
            })
            .join()
            .map_err(|_| io::Error::other("reading inside a network namespace panicked"))?
    })
}

/// The sum over every namespace of what `read` finds there. Entering a
/// namespace takes CAP_SYS_ADMIN: without it, only our own counts.
#[must_use]
pub fn sum_over_all(read: impl Fn() -> Option<u64> + Sync) -> Option<u64> {
    let values: Vec<u64> = all()
        .iter()
        .filter_map(|ns| read_in(ns, &read).ok().flatten())
        .collect();
    if values.is_empty() {
        read()
    } else {
        Some(values.iter().sum())
    }
}

/// TIME_WAIT sockets now in every namespace (sockstat's `tw` of each).
/// A namespace a process lives in is read through `/proc/PID/net` (no
/// thread, no `setns`: cheap enough for every second); one only `ip netns`
/// holds is entered.
#[must_use]
pub fn time_wait_sockets_everywhere() -> Option<u64> {
    let mut total = None;
    for ns in all() {
        let through_process = ns
            .path
            .parent()
            .filter(|dir| dir.ends_with("ns"))
            .and_then(Path::parent)
            .map(|process| process.join("net/sockstat"));
        let count = match through_process {
            Some(sockstat) => fs::read_to_string(sockstat)
                .ok()
                .and_then(|text| crate::sys::parse_sockstat_tw(&text)),
            None => read_in(&ns, || crate::sys::time_wait_sockets_now().ok())
                .ok()
                .flatten(),
        };
        if let Some(count) = count {
            *total.get_or_insert(0) += count;
        }
    }
    total.or_else(|| crate::sys::time_wait_sockets_now().ok())
}

/// The namespace a `--netns` argument names: an inode number, a name
/// under `/run/netns` (as `ip netns` shows it), or `pid:N` for the
/// namespace of process N.
pub fn resolve(spec: &str) -> anyhow::Result<u64> {
    use anyhow::Context;
    let path = if let Some(pid) = spec.strip_prefix("pid:") {
        let pid: u32 = pid
            .parse()
            .with_context(|| format!("--netns {spec}: `{pid}` is not a pid"))?;
        PathBuf::from(format!("/proc/{pid}/ns/net"))
    } else if let Ok(inode) = spec.parse::<u64>() {
        return if all().iter().any(|ns| ns.inode == inode) {
            Ok(inode)
        } else {
            anyhow::bail!("--netns {spec}: no network namespace has that inode (see `lsns -t net`)")
        };
    } else {
        if spec.contains('/') {
            anyhow::bail!("--netns {spec}: give a name from `ip netns list`, an inode or pid:N");
        }
        Path::new("/run/netns").join(spec)
    };
    let meta = fs::metadata(&path).with_context(|| {
        format!(
            "--netns {spec}: {} not found (see `ip netns list` or `lsns -t net`)",
            path.display()
        )
    })?;
    Ok(meta.ino())
}

/// A name users know the namespace by: its name under `/run/netns`, else
/// `pid:N` of a process in it; `None` when neither exists.
#[must_use]
pub fn name_of(inode: u64, namespaces: &[Namespace]) -> Option<String> {
    let ns = namespaces.iter().find(|ns| ns.inode == inode)?;
    if let Ok(rest) = ns.path.strip_prefix("/run/netns") {
        return Some(rest.display().to_string());
    }
    let pid = ns.path.parent()?.parent()?.file_name()?.to_str()?;
    Some(format!("pid:{pid}"))
}

/// The port settings of the namespace with this inode (0 or our own:
/// ours), read inside it; `None` when it cannot be entered.
#[must_use]
pub fn port_settings_of(inode: u64) -> Option<crate::sys::PortSettings> {
    if inode == 0 || own().ok() == Some(inode) {
        return crate::sys::PortSettings::read().ok();
    }
    let ns = all().into_iter().find(|ns| ns.inode == inode)?;
    read_in(&ns, || crate::sys::PortSettings::read().ok()).ok()?
}

/// The namespace of this process.
pub fn own() -> io::Result<u64> {
    Ok(fs::metadata(Path::new("/proc/self/ns/net"))?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_is_named_by_inode_or_pid_and_bad_names_say_why() {
        let own = own().unwrap();
        assert_eq!(
            resolve(&format!("pid:{}", std::process::id())).unwrap(),
            own
        );
        let err = resolve("no-such-namespace-here").unwrap_err().to_string();
        assert!(err.contains("ip netns list"), "{err}");
        assert!(resolve("pid:x").is_err());
        assert!(resolve("../etc").is_err());
        let all = all();
        let name = name_of(own, &all).expect("a name");
        assert!(name.starts_with("pid:") || !name.is_empty(), "{name}");
    }

    #[test]
    fn our_own_namespace_is_among_them_and_readable_inside() {
        let own = own().unwrap();
        let all = all();
        let ours = all.iter().find(|ns| ns.inode == own).expect("ours listed");
        // Inside our own namespace the same file names the same one.
        let inside = read_in(ours, || {
            fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino())
        });
        match inside {
            Ok(inode) => assert_eq!(inode.unwrap(), own),
            // Without CAP_SYS_ADMIN setns is refused: nothing to check.
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}"),
        }
    }
}
