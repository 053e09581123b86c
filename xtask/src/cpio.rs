//! A minimal writer of the `newc` cpio format, the one the kernel unpacks as
//! an initramfs. Written here rather than shelling out to `cpio` so that the
//! VM tests need no extra package and so that symlinks are copied as links
//! (the guest must see the host's merged-/usr layout to find the dynamic
//! loader).

use std::{
    collections::HashSet,
    fs::{self, File},
    io::{self, BufWriter, Write},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Component, Path, PathBuf},
};

use std::fmt::Write as _;

use anyhow::Context;

pub struct Archive {
    out: BufWriter<File>,
    next_ino: u32,
    written: HashSet<PathBuf>,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

impl Archive {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let out = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            out: BufWriter::new(out),
            next_ino: 1,
            written: HashSet::new(),
        })
    }

    fn entry(&mut self, path: &Path, mode: u32, data: &[u8]) -> io::Result<()> {
        let name = path
            .strip_prefix("/")
            .unwrap_or(path)
            .as_os_str()
            .as_encoded_bytes();
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).map_err(io::Error::other)?,
            0,
            0,
            0,
            0,
            u32::try_from(name.len() + 1).map_err(io::Error::other)?,
            0,
        ];
        let mut header = String::from("070701");
        for field in fields {
            let _ = write!(header, "{field:08x}");
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name)?;
        self.out.write_all(&[0])?;
        self.pad(header.len() + name.len() + 1)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let zeros = [0u8; 3];
        self.out.write_all(&zeros[..(4 - len % 4) % 4])
    }

    /// Whether `path` is new to the archive (and marks it written).
    fn first_time(&mut self, path: &Path) -> bool {
        self.written.insert(path.to_path_buf())
    }

    /// A directory and its parents.
    pub fn dir(&mut self, path: &Path) -> anyhow::Result<()> {
        if path == Path::new("/") || path.as_os_str().is_empty() {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            self.dir(parent)?;
        }
        if self.first_time(path) {
            self.entry(path, S_IFDIR | 0o755, &[])?;
        }
        Ok(())
    }

    /// A file with the given contents (parents created).
    pub fn file(&mut self, path: &Path, mode: u32, data: &[u8]) -> anyhow::Result<()> {
        if let Some(parent) = path.parent() {
            self.dir(parent)?;
        }
        if self.first_time(path) {
            self.entry(path, S_IFREG | (mode & 0o7777), data)?;
        }
        Ok(())
    }

    pub fn symlink(&mut self, path: &Path, target: &Path) -> anyhow::Result<()> {
        if let Some(parent) = path.parent() {
            self.dir(parent)?;
        }
        if self.first_time(path) {
            self.entry(path, S_IFLNK | 0o777, target.as_os_str().as_encoded_bytes())?;
        }
        Ok(())
    }

    /// Copies a host path into the archive at the same place, keeping every
    /// symlink met on the way (in the path itself or as its target) so that
    /// the guest resolves it exactly as the host does.
    /// A directory comes with everything under it.
    pub fn host_path(&mut self, path: &Path) -> anyhow::Result<()> {
        self.rooted_path(Path::new("/"), path)
    }

    /// As `host_path`, for a guest path whose files are under `root` (an
    /// unpacked foreign system): its symlinks, absolute ones included,
    /// resolve inside `root`, as they will in the guest.
    pub fn rooted_path(&mut self, root: &Path, path: &Path) -> anyhow::Result<()> {
        self.rooted_path_inner(root, path, true, 0)
    }

    fn rooted_path_inner(
        &mut self,
        root: &Path,
        path: &Path,
        whole_dir: bool,
        depth: u32,
    ) -> anyhow::Result<()> {
        // The kernel's own limit on symlinks followed in one lookup.
        if depth > 40 {
            anyhow::bail!("too many levels of symlinks at {}", path.display());
        }
        let mut current = PathBuf::from("/");
        let mut components = path.components().skip(1).peekable();
        while let Some(component) = components.next() {
            let next = current.join(component);
            let source = on_host(root, &next);
            let meta = fs::symlink_metadata(&source)
                .with_context(|| format!("reading {}", source.display()))?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&source)?;
                self.symlink(&next, &target)?;
                let resolved = normalize(&current.join(&target));
                let last = components.peek().is_none();
                self.rooted_path_inner(root, &resolved, whole_dir && last, depth + 1)?;
                current = resolve(root, &resolved, depth + 1)?;
            } else if meta.is_dir() {
                self.dir(&next)?;
                if whole_dir && components.peek().is_none() {
                    self.tree(root, &next)?;
                }
                current = next;
            } else {
                let data =
                    fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
                self.file(&next, meta.permissions().mode(), &data)?;
                current = next;
            }
        }
        Ok(())
    }

    /// Everything under a directory of `root`.
    fn tree(&mut self, root: &Path, dir: &Path) -> anyhow::Result<()> {
        for entry in fs::read_dir(on_host(root, dir))? {
            let entry = entry?;
            let path = dir.join(entry.file_name());
            let meta = fs::symlink_metadata(entry.path())?;
            if meta.file_type().is_symlink() {
                self.symlink(&path, &fs::read_link(entry.path())?)?;
            } else if meta.is_dir() {
                self.dir(&path)?;
                self.tree(root, &path)?;
            } else if meta.is_file() && meta.nlink() > 0 {
                self.file(&path, meta.permissions().mode(), &fs::read(entry.path())?)?;
            }
        }
        Ok(())
    }

    pub fn finish(mut self) -> anyhow::Result<()> {
        self.entry(Path::new("TRAILER!!!"), 0, &[])?;
        self.out.flush()?;
        Ok(())
    }
}

/// Where a guest path's file is on the host.
fn on_host(root: &Path, guest: &Path) -> PathBuf {
    root.join(guest.strip_prefix("/").unwrap_or(guest))
}

/// A guest path with every symlink in it followed inside `root`.
pub fn resolve(root: &Path, path: &Path, depth: u32) -> anyhow::Result<PathBuf> {
    if depth > 40 {
        anyhow::bail!("too many levels of symlinks at {}", path.display());
    }
    let mut current = PathBuf::from("/");
    for component in path.components().skip(1) {
        let next = current.join(component);
        match fs::read_link(on_host(root, &next)) {
            Ok(target) => current = resolve(root, &normalize(&current.join(target)), depth + 1)?,
            Err(_) => current = next,
        }
    }
    Ok(current)
}

/// `a/b/../c` → `a/c`, without touching the file system (the host path may
/// go through symlinks that are resolved separately).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_drops_dot_dot_lexically() {
        assert_eq!(
            normalize(Path::new("/usr/lib64/../lib/x86_64-linux-gnu/ld.so")),
            PathBuf::from("/usr/lib/x86_64-linux-gnu/ld.so")
        );
    }

    #[test]
    fn symlinks_of_an_unpacked_root_resolve_inside_it() {
        let root = std::env::temp_dir().join(format!("xtask-root-{}", std::process::id()));
        let lib = root.join("lib/aarch64-linux-gnu");
        fs::create_dir_all(&lib).unwrap();
        fs::write(lib.join("ld-linux-aarch64.so.1"), b"loader").unwrap();
        // Debian's loader link is absolute: it must not reach the host's /lib.
        std::os::unix::fs::symlink(
            "/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1",
            root.join("lib/ld-linux-aarch64.so.1"),
        )
        .unwrap();
        assert_eq!(
            resolve(&root, Path::new("/lib/ld-linux-aarch64.so.1"), 0).unwrap(),
            PathBuf::from("/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1")
        );
        let path = root.join("a.cpio");
        let mut archive = Archive::create(&path).unwrap();
        archive
            .rooted_path(&root, Path::new("/lib/ld-linux-aarch64.so.1"))
            .unwrap();
        archive.finish().unwrap();
        let text = String::from_utf8_lossy(&fs::read(&path).unwrap()).into_owned();
        // The link as it is, then its target's file from inside the root.
        assert!(text.contains("lib/ld-linux-aarch64.so.1\0"), "{text}");
        assert!(
            text.contains("lib/aarch64-linux-gnu/ld-linux-aarch64.so.1\0"),
            "{text}"
        );
        assert!(text.contains("loader"), "{text}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn entries_are_padded_to_four_bytes() {
        let dir = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.cpio");
        let mut archive = Archive::create(&path).unwrap();
        archive.file(Path::new("/x/y"), 0o644, b"hello").unwrap();
        archive.finish().unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        // The directory `x` comes before its file, and the trailer last.
        let text = String::from_utf8_lossy(&bytes);
        let x = text.find("x\0").unwrap();
        let y = text.find("x/y\0").unwrap();
        assert!(x < y && text.contains("hello") && text.ends_with("TRAILER!!!\0\0\0\0"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
