//! Reads the notes of an ELF64 little-endian file (e.g. the PVH entry note of a vmlinux).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::{Context, Error, Result};

const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit physical PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfNote {
    pub name: String,
    pub kind: u32,
    pub desc: Vec<u8>,
}

/// All notes in the file's PT_NOTE segments.
pub fn elf_notes(path: &Path) -> Result<Vec<ElfNote>> {
    let mut file = File::open(path).context(|| format!("cannot open {}", path.display()))?;
    let bad = |why: &str| {
        Error::new(format!(
            "{}: not a usable ELF64 file: {why}",
            path.display()
        ))
    };
    let mut ehdr = [0u8; 64];
    file.read_exact(&mut ehdr)
        .map_err(|_| bad("shorter than an ELF header"))?;
    if &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(bad("no ELF64 little-endian magic"));
    }
    let phoff = u64_at(&ehdr, 0x20);
    let phentsize = u16_at(&ehdr, 0x36) as u64;
    let phnum = u16_at(&ehdr, 0x38) as u64;
    if phentsize < 56 {
        return Err(bad("program header entries too small"));
    }
    let mut notes = Vec::new();
    for i in 0..phnum {
        let mut phdr = [0u8; 56];
        file.seek(SeekFrom::Start(phoff + i * phentsize))
            .and_then(|_| file.read_exact(&mut phdr))
            .map_err(|_| bad("truncated program headers"))?;
        if u32_at(&phdr, 0) != PT_NOTE {
            continue;
        }
        let (offset, size) = (u64_at(&phdr, 0x08), u64_at(&phdr, 0x20));
        if size > 1 << 20 {
            return Err(bad("note segment larger than 1 MiB"));
        }
        let mut data = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut data))
            .map_err(|_| bad("truncated note segment"))?;
        parse_notes(&data, &mut notes).map_err(bad)?;
    }
    Ok(notes)
}

/// The PVH entry address, if the file has a `Xen` note of type 18.
pub fn pvh_entry(path: &Path) -> Result<Option<u64>> {
    Ok(elf_notes(path)?
        .into_iter()
        .find(|n| n.name == "Xen" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY)
        .map(|n| match n.desc.len() {
            4 => u32_at(&n.desc, 0) as u64,
            8 => u64_at(&n.desc, 0),
            _ => 0,
        }))
}

fn parse_notes(mut data: &[u8], notes: &mut Vec<ElfNote>) -> std::result::Result<(), &'static str> {
    let align4 = |n: usize| (n + 3) & !3;
    while data.len() >= 12 {
        let namesz = u32_at(data, 0) as usize;
        let descsz = u32_at(data, 4) as usize;
        let kind = u32_at(data, 8);
        let name_end = 12 + align4(namesz);
        let desc_end = name_end + align4(descsz);
        if desc_end > data.len() || name_end < 12 + namesz {
            return Err("note runs past its segment");
        }
        let name = &data[12..12 + namesz];
        let name = name.strip_suffix(b"\0").unwrap_or(name);
        notes.push(ElfNote {
            name: String::from_utf8_lossy(name).into_owned(),
            kind,
            desc: data[name_end..name_end + descsz].to_vec(),
        });
        data = &data[desc_end..];
    }
    Ok(())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_note_list() {
        let mut seg = Vec::new();
        seg.extend_from_slice(&4u32.to_le_bytes());
        seg.extend_from_slice(&4u32.to_le_bytes());
        seg.extend_from_slice(&18u32.to_le_bytes());
        seg.extend_from_slice(b"Xen\0");
        seg.extend_from_slice(&0x0100_0000u32.to_le_bytes());
        let mut notes = Vec::new();
        parse_notes(&seg, &mut notes).unwrap();
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].name, "Xen");
        assert_eq!(notes[0].kind, 18);
        assert_eq!(notes[0].desc, 0x0100_0000u32.to_le_bytes());
    }

    #[test]
    fn truncated_note_is_an_error() {
        let mut seg = Vec::new();
        seg.extend_from_slice(&4u32.to_le_bytes());
        seg.extend_from_slice(&64u32.to_le_bytes());
        seg.extend_from_slice(&18u32.to_le_bytes());
        seg.extend_from_slice(b"Xen\0");
        assert!(parse_notes(&seg, &mut Vec::new()).is_err());
    }

    #[test]
    fn non_elf_is_rejected() {
        let err = elf_notes(Path::new("/proc/self/cmdline")).unwrap_err();
        assert!(err.message().contains("not a usable ELF64"), "{err}");
    }
}
