//! Just enough of a BTF reader to find member offsets of kernel structs.
//!
//! twtrace reads two fields of the TIME_WAIT mini-socket and one of its
//! timer with `bpf_probe_read_kernel`; their offsets differ between kernel
//! builds, so they come from the running kernel's `/sys/kernel/btf/vmlinux`
//! (no CO-RE relocations needed, no compiler headers).

use std::{collections::HashMap, fs, path::Path};

use anyhow::{Context, bail};

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Bit offset within the containing struct.
    bit_offset: u32,
}

#[derive(Debug)]
struct Composite {
    members: Vec<Member>,
}

/// The structs and unions of one BTF blob, by type id.
pub struct Btf {
    strings: Vec<u8>,
    composites: HashMap<u32, Composite>,
    by_name: HashMap<String, u32>,
}

impl Btf {
    pub fn from_sys_fs() -> anyhow::Result<Self> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let data = fs::read(path).with_context(|| {
            format!(
                "reading {} (the kernel needs CONFIG_DEBUG_INFO_BTF)",
                path.display()
            )
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> anyhow::Result<Self> {
        let u16_at = |off: usize| -> anyhow::Result<u16> {
            Ok(u16::from_le_bytes(
                data.get(off..off + 2)
                    .context("BTF truncated")?
                    .try_into()?,
            ))
        };
        let u32_at = |off: usize| -> anyhow::Result<u32> {
            Ok(u32::from_le_bytes(
                data.get(off..off + 4)
                    .context("BTF truncated")?
                    .try_into()?,
            ))
        };
        if u16_at(0)? != MAGIC {
            bail!("not little-endian BTF (bad magic)");
        }
        let hdr_len = u32_at(4)? as usize;
        let type_off = u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let str_off = u32_at(16)? as usize;
        let str_len = u32_at(20)? as usize;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF string section out of bounds")?
            .to_vec();

        let mut composites = HashMap::new();
        let mut by_name = HashMap::new();
        let mut pos = hdr_len + type_off;
        let end = pos + type_len;
        let mut id = 1u32;
        while pos < end {
            let name_off = u32_at(pos)?;
            let info = u32_at(pos + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            pos += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => vlen * 12, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => vlen * 8,           // ENUM, FUNC_PROTO
                _ => 0,
            };
            if kind == KIND_STRUCT || kind == KIND_UNION {
                let mut members = Vec::with_capacity(vlen);
                for i in 0..vlen {
                    let m = pos + i * 12;
                    let offset = u32_at(m + 8)?;
                    members.push(Member {
                        name_off: u32_at(m)?,
                        type_id: u32_at(m + 4)?,
                        // With kind_flag the top 8 bits hold a bitfield size.
                        bit_offset: if kind_flag {
                            offset & 0x00ff_ffff
                        } else {
                            offset
                        },
                    });
                }
                if name_off != 0 {
                    let name = string_at(&strings, name_off).to_owned();
                    // The first definition wins; later ones are duplicates.
                    by_name.entry(name).or_insert(id);
                }
                composites.insert(id, Composite { members });
            }
            pos += extra;
            id += 1;
        }
        Ok(Self {
            strings,
            composites,
            by_name,
        })
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous
    /// structs and unions as C does.
    pub fn member_offset(&self, name: &str, member: &str) -> anyhow::Result<u32> {
        let id = self
            .by_name
            .get(name)
            .with_context(|| format!("kernel BTF has no struct {name}"))?;
        let bits = self
            .find(*id, member, 0)
            .with_context(|| format!("kernel BTF: struct {name} has no member {member}"))?;
        if bits % 8 != 0 {
            bail!("kernel BTF: {name}.{member} is a bitfield");
        }
        Ok(bits / 8)
    }

    fn find(&self, id: u32, member: &str, base_bits: u32) -> Option<u32> {
        let composite = self.composites.get(&id)?;
        for m in &composite.members {
            let bits = base_bits + m.bit_offset;
            if m.name_off == 0 {
                // Anonymous members are structs or unions directly: BTF
                // puts no modifiers on them.
                if let Some(found) = self.find(m.type_id, member, bits) {
                    return Some(found);
                }
            } else if string_at(&self.strings, m.name_off) == member {
                return Some(bits);
            }
        }
        None
    }
}

fn string_at(strings: &[u8], off: u32) -> &str {
    let bytes = strings.get(off as usize..).unwrap_or_default();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    std::str::from_utf8(&bytes[..end]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built BTF blob: `struct outer { int a; union { int b; long c; }; }`
    /// with `c` at byte 8 (through the anonymous union at byte 8).
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0".to_vec();
        let (int, outer, a, b, c) = (1u32, 5u32, 11u32, 13u32, 15u32);
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // id 1: INT "int", size 4, encoding word
        push(&[int, 1 << 24, 4, 32]);
        // id 2: UNION (anonymous), 2 members, size 8
        push(&[0, (5 << 24) | 2, 8, b, 1, 0, c, 1, 0]);
        // id 3: STRUCT outer, 2 members: a @0, anonymous union @64 bits
        push(&[outer, (4 << 24) | 2, 16, a, 1, 0, 0, 2, 64]);
        let mut data = Vec::new();
        data.extend_from_slice(&MAGIC.to_le_bytes());
        data.extend_from_slice(&[1, 0]);
        let len = |v: &Vec<u8>| u32::try_from(v.len()).unwrap();
        for w in [24u32, 0, len(&types), len(&types), len(&strings)] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        data.extend(types);
        data.extend(strings);
        data
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.member_offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "b").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "c").unwrap(), 8);
        assert!(btf.member_offset("outer", "d").is_err());
        assert!(btf.member_offset("inner", "a").is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, clearly").is_err());
        assert!(Btf::parse(&blob()[..30]).is_err());
    }

    #[test]
    fn reads_the_running_kernel() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("no /sys/kernel/btf/vmlinux here; skipped");
            return;
        };
        // struct timer_list starts with a two-pointer hlist_node.
        assert_eq!(btf.member_offset("timer_list", "expires").unwrap(), 16);
        let substate = btf
            .member_offset("inet_timewait_sock", "tw_substate")
            .unwrap();
        let timer = btf.member_offset("inet_timewait_sock", "tw_timer").unwrap();
        assert!(substate < timer, "{substate} {timer}");
    }
}
