//! Kernel image containers for tiny test guests: ELF (with or without a PVH note) and bzImage.
//! Shared by ferrovmm's tests and the daemon's kvm-driver tests.

use std::path::{Path, PathBuf};

/// Bytes to load at a guest physical address.
pub struct Segment {
    pub addr: u64,
    pub data: Vec<u8>,
}

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn push_phdr(out: &mut Vec<u8>, p_type: u32, offset: u64, addr: u64, size: u64, align: u64) {
    out.extend_from_slice(&p_type.to_le_bytes());
    out.extend_from_slice(&5u32.to_le_bytes()); // R+X
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&addr.to_le_bytes()); // vaddr
    out.extend_from_slice(&addr.to_le_bytes()); // paddr
    out.extend_from_slice(&size.to_le_bytes()); // filesz
    out.extend_from_slice(&size.to_le_bytes()); // memsz
    out.extend_from_slice(&align.to_le_bytes());
}

/// An ELF64 executable; with `pvh_entry` it carries the Xen PVH entry note.
pub fn elf(segments: &[Segment], entry: u64, pvh_entry: Option<u32>) -> Vec<u8> {
    let note: Vec<u8> = match pvh_entry {
        Some(e) => {
            let mut n = Vec::new();
            // As Linux emits it: name "Xen", an 8-byte descriptor holding the entry.
            n.extend_from_slice(&4u32.to_le_bytes());
            n.extend_from_slice(&8u32.to_le_bytes());
            n.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
            n.extend_from_slice(b"Xen\0");
            n.extend_from_slice(&u64::from(e).to_le_bytes());
            n
        }
        None => Vec::new(),
    };
    let phnum = segments.len() + usize::from(!note.is_empty());
    let mut offset = (EHDR_SIZE + phnum * PHDR_SIZE) as u64;
    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF");
    out.extend_from_slice(&[2, 1, 1, 0]);
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // flags
    out.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    out.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    out.extend_from_slice(&(phnum as u16).to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    for s in segments {
        push_phdr(
            &mut out,
            PT_LOAD,
            offset,
            s.addr,
            s.data.len() as u64,
            0x1000,
        );
        offset += s.data.len() as u64;
    }
    if !note.is_empty() {
        push_phdr(&mut out, PT_NOTE, offset, 0, note.len() as u64, 4);
    }
    for s in segments {
        out.extend_from_slice(&s.data);
    }
    out.extend_from_slice(&note);
    out
}

/// A minimal bzImage: a setup header and a protected-mode payload whose 64-bit
/// entry (offset 0x200) is `code64`.
pub fn bzimage(code64: &[u8]) -> Vec<u8> {
    let setup_sects = 1u8;
    let mut out = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    out[0x1f1] = setup_sects;
    out[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    out[0x202..0x206].copy_from_slice(b"HdrS");
    out[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    out[0x211] = 0x01; // LOADED_HIGH
    out[0x214..0x218].copy_from_slice(&0x0010_0000u32.to_le_bytes()); // code32_start
    out[0x230..0x234].copy_from_slice(&0x0100_0000u32.to_le_bytes()); // kernel_alignment
    out[0x236..0x238].copy_from_slice(&0x0001u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    let mut payload = vec![0xf4u8; 0x200]; // 32-bit entry area: hlt
    payload.extend_from_slice(code64);
    out.extend_from_slice(&payload);
    out
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write guest image");
    p
}

/// Where [`pvh_kernel`] loads and enters its code.
pub const PVH_CODE_BASE: u64 = 0x10_0000;

/// A PVH ELF kernel whose 32-bit entry at [`PVH_CODE_BASE`] is `code`, written to `dir/name`.
pub fn pvh_kernel(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    let segments = [Segment {
        addr: PVH_CODE_BASE,
        data: code.to_vec(),
    }];
    write(
        dir,
        name,
        &elf(&segments, PVH_CODE_BASE, Some(PVH_CODE_BASE as u32)),
    )
}
