//! Finding tracefs and reading tracepoint record layouts from it.
//!
//! Field offsets of tracepoint records change between kernels (`timer_start`
//! gained `bucket_expiry` in 5.x, shifting `now`), so they are read from the
//! running kernel's `format` files, never assumed.

use std::{
    collections::HashMap,
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Where one field sits in a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u16,
    pub size: u16,
}

/// The fields of one tracepoint, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFormat {
    pub fields: HashMap<String, Field>,
}

impl EventFormat {
    /// The offset of `name`, checking it has the size twtrace reads.
    pub fn offset(&self, event: &str, name: &str, size: u16) -> anyhow::Result<u16> {
        let field = self
            .fields
            .get(name)
            .with_context(|| format!("tracepoint {event} has no field `{name}` on this kernel"))?;
        if field.size != size {
            bail!(
                "tracepoint {event} field `{name}` is {} bytes on this kernel, twtrace expects {size}",
                field.size
            );
        }
        Ok(field.offset)
    }
}

/// The tracefs mount point, mounting tracefs at /sys/kernel/tracing if no
/// mount is found (twtrace runs as root, so it may).
pub fn root() -> anyhow::Result<PathBuf> {
    if let Some(found) = CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.join("events").is_dir())
    {
        return Ok(found.to_path_buf());
    }
    let target = Path::new(CANDIDATES[0]);
    if !target.is_dir() {
        bail!(
            "tracefs is not available ({} does not exist): this kernel needs CONFIG_TRACING",
            target.display()
        );
    }
    mount_tracefs(target).with_context(|| {
        format!(
            "tracefs is not mounted and mounting it failed; run `mount -t tracefs tracefs {}` as root",
            target.display()
        )
    })?;
    Ok(target.to_path_buf())
}

fn mount_tracefs(target: &Path) -> anyhow::Result<()> {
    let source = CString::new("tracefs")?;
    let target_c = CString::new(target.as_os_str().as_encoded_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the
    // call; a null `data` is allowed for tracefs.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Whether `category:name` exists on this kernel.
#[must_use]
pub fn has_event(root: &Path, category: &str, name: &str) -> bool {
    root.join("events").join(category).join(name).is_dir()
}

/// Reads `events/<category>/<name>/format`.
pub fn read_format_text(root: &Path, category: &str, name: &str) -> anyhow::Result<String> {
    let path = root.join("events").join(category).join(name).join("format");
    fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (does this kernel have the {category}:{name} tracepoint?)",
            path.display()
        )
    })
}

/// Parses the `field:TYPE NAME; offset:N; size:N; signed:N;` lines of a
/// tracefs format file. Lines it cannot read are skipped: a kernel adding
/// a field shape twtrace does not know must not stop it.
#[must_use]
pub fn parse_format(text: &str) -> EventFormat {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in line.trim().split(';') {
            let part = part.trim();
            if let Some(rest) = part.strip_prefix("field:") {
                decl = Some(rest);
            } else if let Some(rest) = part.strip_prefix("offset:") {
                offset = rest.parse::<u16>().ok();
            } else if let Some(rest) = part.strip_prefix("size:") {
                size = rest.parse::<u16>().ok();
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        // "__u8 saddr[4]" → "saddr"; "const void * skaddr" → "skaddr".
        let Some(last) = decl.split_whitespace().last() else {
            continue;
        };
        let name = last
            .split('[')
            .next()
            .unwrap_or(last)
            .trim_start_matches('*');
        fields.insert(name.to_owned(), Field { offset, size });
    }
    EventFormat { fields }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_STATE: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;

print fmt: \"family=%s\", REC->family
";

    #[test]
    fn parses_scalar_pointer_and_array_fields() {
        let format = parse_format(SET_STATE);
        assert_eq!(format.fields["skaddr"], Field { offset: 8, size: 8 });
        assert_eq!(
            format.fields["oldstate"],
            Field {
                offset: 16,
                size: 4
            }
        );
        assert_eq!(
            format.fields["saddr_v6"],
            Field {
                offset: 40,
                size: 16
            }
        );
        assert_eq!(format.fields["common_type"], Field { offset: 0, size: 2 });
        assert_eq!(format.fields.len(), 4);
    }

    #[test]
    fn offset_rejects_missing_and_resized_fields() {
        let format = parse_format(SET_STATE);
        assert_eq!(format.offset("sock:x", "oldstate", 4).unwrap(), 16);
        let missing = format.offset("sock:x", "newstate", 4).unwrap_err();
        assert!(
            missing.to_string().contains("no field `newstate`"),
            "{missing}"
        );
        let resized = format.offset("sock:x", "oldstate", 8).unwrap_err();
        assert!(resized.to_string().contains("is 4 bytes"), "{resized}");
    }
}
