//! Debian suites and architectures the machine's own apt does not name
//! (bullseye's 5.10, trixie's 6.12, arm64), read through a private apt
//! state under `target/vm/apt`, leaving the machine's configuration alone.
//! The package lists are fetched once and refreshed only when a download
//! fails (the archive keeps only a suite's newest kernel).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use crate::workspace_root;

const MIRROR: &str = "http://deb.debian.org";

/// One suite of one architecture, with its security updates (where a
/// suite's newest kernel is).
pub struct Suite {
    name: &'static str,
    arch: &'static str,
    dir: PathBuf,
}

impl Suite {
    pub fn new(suite: &'static str, arch: &'static str) -> anyhow::Result<Self> {
        let dir = workspace_root()
            .join("target/vm/apt")
            .join(format!("{suite}-{arch}"));
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let sources = format!(
            "deb {MIRROR}/debian {suite} main\ndeb {MIRROR}/debian-security {suite}-security main\n"
        );
        fs::write(dir.join("sources.list"), sources)?;
        // No package counts as installed: a download takes every dependency.
        fs::write(dir.join("status"), "")?;
        Ok(Self {
            name: suite,
            arch,
            dir,
        })
    }

    /// `apt-get` or `apt-cache` on this suite alone.
    fn apt(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        let option = |name: &str, value: &Path| format!("{name}={}", value.display());
        command
            .arg("-o")
            .arg(option(
                "Dir::Etc::SourceList",
                &self.dir.join("sources.list"),
            ))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null"])
            .arg("-o")
            .arg(option("Dir::State::Lists", &self.dir.join("lists")))
            .arg("-o")
            .arg(option("Dir::Cache", &self.dir.join("cache")))
            .arg("-o")
            .arg(option("Dir::State::status", &self.dir.join("status")))
            .arg("-o")
            .arg(format!("APT::Architecture={}", self.arch))
            .arg("-o")
            .arg(format!("APT::Architectures::={}", self.arch))
            // The private state is root's own files; apt's sandbox user
            // could not write them.
            .args(["-o", "APT::Sandbox::User=root", "-o", "Debug::NoLocking=1"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        command
    }

    fn has_lists(&self) -> bool {
        fs::read_dir(self.dir.join("lists")).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
    }

    fn update(&self) -> anyhow::Result<()> {
        eprintln!("xtask: apt-get update ({} {})", self.name, self.arch);
        self.apt_get(&["update", "-q"], "apt-get update")
    }

    /// `apt-get ARGS`, quiet; what it complained of when it fails.
    fn apt_get(&self, args: &[&str], what: &str) -> anyhow::Result<()> {
        let out = self
            .apt("apt-get")
            .args(args)
            .stdout(Stdio::null())
            .output()
            .with_context(|| format!("running {what}"))?;
        if !out.status.success() {
            bail!(
                "{what} for Debian {} ({}) failed: {}",
                self.name,
                self.arch,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Runs `attempt`; when it fails on lists fetched earlier, refreshes
    /// them once and tries again.
    fn with_lists<T>(&self, attempt: impl Fn() -> anyhow::Result<T>) -> anyhow::Result<T> {
        if !self.has_lists() {
            self.update()?;
            return attempt();
        }
        attempt().or_else(|_| {
            self.update()?;
            attempt()
        })
    }

    /// `linux-image-cloud-amd64` → `linux-image-6.1.0-57-cloud-amd64`: the
    /// image package a metapackage names today.
    pub fn resolve(&self, package: &str) -> anyhow::Result<String> {
        self.with_lists(|| {
            let out = self
                .apt("apt-cache")
                .args(["depends", package])
                .output()
                .context("running apt-cache depends")?;
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() || text.trim().is_empty() {
                bail!(
                    "Debian {} ({}) has no package {package}",
                    self.name,
                    self.arch
                );
            }
            Ok(image_package(&text).unwrap_or(package).to_string())
        })
    }

    /// Downloads one package into `dir`; its `.deb`.
    pub fn download(&self, package: &str, dir: &Path) -> anyhow::Result<PathBuf> {
        fs::create_dir_all(dir)?;
        self.with_lists(|| {
            eprintln!("xtask: apt-get download {package} ({})", self.name);
            let status = self
                .apt("apt-get")
                .args(["download", "-q", package])
                .current_dir(dir)
                .status()
                .context("running apt-get download")?;
            if !status.success() {
                bail!(
                    "apt-get download {package} from Debian {} failed",
                    self.name
                );
            }
            debs(dir)?
                .into_iter()
                .next()
                .with_context(|| format!("apt-get download {package} left no .deb"))
        })
    }

    /// The packages and everything they depend on, downloaded (reused when
    /// already there); the `.deb` files.
    pub fn download_with_dependencies(&self, packages: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
        self.with_lists(|| {
            eprintln!(
                "xtask: apt-get install --download-only ({} {}): {}",
                self.name,
                self.arch,
                packages.join(" ")
            );
            let mut args = vec![
                "install",
                "-q",
                "-y",
                "--download-only",
                "--no-install-recommends",
            ];
            args.extend_from_slice(packages);
            self.apt_get(&args, &format!("downloading {}", packages.join(" ")))?;
            debs(&self.dir.join("cache/archives"))
        })
    }
}

/// The first `Depends: linux-image-<version>…` of `apt-cache depends`.
fn image_package(depends: &str) -> Option<&str> {
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|dep| dep.split(':').next().unwrap_or(dep))
        .find(|dep| dep.starts_with("linux-image-") && dep.chars().any(|c| c.is_ascii_digit()))
}

fn debs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    found.sort();
    Ok(found)
}

/// Unpacks a `.deb` under `root` (no maintainer scripts run).
pub fn unpack(deb: &Path, root: &Path) -> anyhow::Result<()> {
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(root)
        .status()
        .context("running dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed", deb.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metapackage_resolves_to_its_image() {
        let amd64 = "linux-image-cloud-amd64\n  Depends: linux-image-5.10.0-46-cloud-amd64\n";
        assert_eq!(
            image_package(amd64),
            Some("linux-image-5.10.0-46-cloud-amd64")
        );
        let arm64 =
            "linux-image-cloud-arm64:arm64\n  Depends: linux-image-6.1.0-57-cloud-arm64:arm64\n";
        assert_eq!(
            image_package(arm64),
            Some("linux-image-6.1.0-57-cloud-arm64")
        );
        assert_eq!(image_package("foo\n  Depends: libc6\n"), None);
    }
}
