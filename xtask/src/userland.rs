//! The programs a guest runs besides twtrace and its tests, with the
//! libraries they load: the host's own for a guest of the host's
//! architecture, Debian's packages of the guest's architecture unpacked
//! under `target/vm` for a foreign one (arm64 on an x86-64 host), where
//! `ldd` cannot run.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::{apt, cpio, workspace_root};

pub enum Userland {
    Host,
    /// Packages unpacked into `root`, for a machine whose libraries live in
    /// the multiarch directories of `triplet`.
    Unpacked {
        root: PathBuf,
        triplet: &'static str,
    },
}

/// Where a guest looks for programs.
const PROGRAM_DIRS: [&str; 4] = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

impl Userland {
    /// `packages` of Debian's `suite` for `arch`, with their dependencies,
    /// unpacked once (again when the list changes).
    pub fn debian(
        suite: &'static str,
        arch: &'static str,
        triplet: &'static str,
        packages: &[&str],
    ) -> anyhow::Result<Self> {
        let root = workspace_root()
            .join("target/vm")
            .join(format!("userland-{suite}-{arch}"));
        let stamp = root.join(".twtrace-packages");
        let wanted = packages.join(" ");
        if fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
            let debs = apt::Suite::new(suite, arch)?.download_with_dependencies(packages)?;
            if root.exists() {
                fs::remove_dir_all(&root)
                    .with_context(|| format!("removing {}", root.display()))?;
            }
            fs::create_dir_all(&root)?;
            eprintln!(
                "xtask: unpacking {} packages into {}",
                debs.len(),
                root.display()
            );
            for deb in &debs {
                apt::unpack(deb, &root)?;
            }
            fs::write(&stamp, wanted)?;
        }
        Ok(Self::Unpacked { root, triplet })
    }

    /// A program of the guest's system, as a guest path.
    pub fn program(&self, name: &str) -> anyhow::Result<PathBuf> {
        match self {
            Self::Host => {
                let path = std::env::var_os("PATH").unwrap_or_default();
                std::env::split_paths(&path)
                    .chain(PROGRAM_DIRS.iter().map(PathBuf::from))
                    .map(|dir| dir.join(name))
                    .find(|candidate| candidate.is_file())
                    .with_context(|| {
                        format!("{name} is not installed (the VM tests copy it into the guest)")
                    })
            }
            Self::Unpacked { root, .. } => PROGRAM_DIRS
                .iter()
                .map(|dir| Path::new(dir).join(name))
                .find(|guest| {
                    cpio::resolve(root, guest, 0).is_ok_and(|p| on_host(root, &p).is_file())
                })
                .with_context(|| format!("no package unpacked in {} has {name}", root.display())),
        }
    }

    /// Where a guest path's file is on the host, symlinks followed.
    fn host_file(&self, guest: &Path) -> anyhow::Result<PathBuf> {
        match self {
            Self::Host => Ok(guest.to_path_buf()),
            Self::Unpacked { root, .. } => Ok(on_host(root, &cpio::resolve(root, guest, 0)?)),
        }
    }

    /// Adds a program of the guest's system, with its libraries.
    pub fn add_program(&self, archive: &mut cpio::Archive, name: &str) -> anyhow::Result<()> {
        let path = self.program(name)?;
        match self {
            Self::Host => archive.host_path(&path)?,
            Self::Unpacked { root, .. } => archive.rooted_path(root, &path)?,
        }
        self.add_libraries(archive, &self.host_file(&path)?)
    }

    /// busybox, which runs `/init` before anything is mounted: it must
    /// load no library.
    pub fn static_busybox(&self) -> anyhow::Result<Vec<u8>> {
        let binary = self.host_file(&self.program("busybox")?)?;
        let loads_libraries = match self {
            Self::Host => !ldd(&binary)?.is_empty(),
            Self::Unpacked { root, triplet } => !needed(&binary, root, triplet)?.is_empty(),
        };
        if loads_libraries {
            bail!(
                "{} is dynamically linked; install busybox-static",
                binary.display()
            );
        }
        fs::read(&binary).with_context(|| format!("reading {}", binary.display()))
    }

    /// Adds a binary built on the host for the guest (at its host path),
    /// with the guest system's libraries it loads.
    pub fn add_built(&self, archive: &mut cpio::Archive, binary: &Path) -> anyhow::Result<()> {
        archive.host_path(binary)?;
        self.add_libraries(archive, binary)
    }

    /// `binary` is a host path; its libraries come from the guest's system.
    fn add_libraries(&self, archive: &mut cpio::Archive, binary: &Path) -> anyhow::Result<()> {
        match self {
            Self::Host => {
                for library in ldd(binary)? {
                    archive.host_path(&library)?;
                }
            }
            Self::Unpacked { root, triplet } => {
                let mut pending = vec![binary.to_path_buf()];
                let mut seen: Vec<PathBuf> = Vec::new();
                while let Some(elf) = pending.pop() {
                    for guest in needed(&elf, root, triplet)? {
                        if seen.contains(&guest) {
                            continue;
                        }
                        archive.rooted_path(root, &guest)?;
                        pending.push(self.host_file(&guest)?);
                        seen.push(guest);
                    }
                }
            }
        }
        Ok(())
    }
}

fn on_host(root: &Path, guest: &Path) -> PathBuf {
    root.join(guest.strip_prefix("/").unwrap_or(guest))
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

/// The guest paths of what a foreign binary loads directly (its
/// interpreter and `DT_NEEDED` libraries), found in `root`'s library
/// directories as the guest's loader will.
fn needed(binary: &Path, root: &Path, triplet: &str) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("readelf")
        .args(["--dynamic", "--program-headers", "--wide"])
        .arg(binary)
        .output()
        .context("running readelf (binutils)")?;
    if !out.status.success() {
        bail!("readelf {} failed", binary.display());
    }
    let (interpreter, libraries) = parse_readelf(&String::from_utf8_lossy(&out.stdout));
    let dirs = [
        format!("/lib/{triplet}"),
        format!("/usr/lib/{triplet}"),
        "/lib".to_string(),
        "/usr/lib".to_string(),
    ];
    let mut found: Vec<PathBuf> = interpreter.into_iter().collect();
    for library in libraries {
        let guest = dirs
            .iter()
            .map(|dir| Path::new(dir).join(&library))
            .find(|guest| cpio::resolve(root, guest, 0).is_ok_and(|p| on_host(root, &p).is_file()))
            .with_context(|| {
                format!(
                    "{} needs {library}, which no package unpacked in {} has",
                    binary.display(),
                    root.display()
                )
            })?;
        found.push(guest);
    }
    Ok(found)
}

/// `readelf --dynamic --program-headers`: the interpreter and the
/// `NEEDED` names.
fn parse_readelf(text: &str) -> (Option<PathBuf>, Vec<String>) {
    let bracketed = |line: &str, marker: &str| {
        let rest = &line[line.find(marker)? + marker.len()..];
        Some(rest[..rest.find(']')?].to_string())
    };
    let interpreter = text
        .lines()
        .find_map(|l| bracketed(l, "Requesting program interpreter: "))
        .map(PathBuf::from);
    let libraries = text
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| bracketed(l, "Shared library: ["))
        .collect();
    (interpreter, libraries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readelf_names_the_loader_and_the_libraries() {
        let text = "\
      [Requesting program interpreter: /lib/ld-linux-aarch64.so.1]
 0x0000000000000001 (NEEDED)             Shared library: [libgcc_s.so.1]
 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]
 0x000000000000001d (RUNPATH)            Library runpath: [$ORIGIN]
";
        let (interpreter, libraries) = parse_readelf(text);
        assert_eq!(
            interpreter,
            Some(PathBuf::from("/lib/ld-linux-aarch64.so.1"))
        );
        assert_eq!(libraries, ["libgcc_s.so.1", "libc.so.6"]);
    }
}
