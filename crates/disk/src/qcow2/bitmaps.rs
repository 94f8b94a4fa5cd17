//! The qcow2 bitmaps extension (persistent dirty bitmaps): the header extension, the
//! bitmap directory and bitmap tables, parsed with QEMU's limits.

use super::header::Header;
use super::meta::{be_u64s, Geometry};
use crate::file::ImageFile;
use crate::DiskError;

pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const AUTOCLEAR_BITMAPS: u64 = 1;
pub const FLAG_IN_USE: u32 = 1;
pub const FLAG_AUTO: u32 = 2;
pub const FLAG_EXTRA_COMPAT: u32 = 4;
pub const TYPE_DIRTY_TRACKING: u8 = 1;
pub const MAX_BITMAPS: u32 = 65535;
pub const MAX_NAME: usize = 1023;
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * 65535;
pub const MIN_GRANULARITY_BITS: u8 = 9;
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Bitmap table entries: bits 9..55 hold the data cluster's offset.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    pub name: String,
    pub extra: Vec<u8>,
}

impl BitmapEntry {
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }
    /// A bitmap we can interpret (type, granularity, extra data).
    pub fn understood(&self) -> bool {
        self.kind == TYPE_DIRTY_TRACKING
            && (MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits)
            && (self.extra.is_empty() || self.flags & FLAG_EXTRA_COMPAT != 0)
    }
}

/// The extension's fields: (number of bitmaps, directory size, directory offset).
pub fn parse_ext(h: &Header) -> Option<Result<(u32, u64, u64), String>> {
    let data = h
        .other_extensions
        .iter()
        .find(|(t, _)| *t == EXT_BITMAPS)
        .map(|(_, d)| d)?;
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return None;
    }
    Some((|| {
        if data.len() < 24 {
            return Err("bitmaps extension is shorter than 24 bytes".to_string());
        }
        let nb = u32::from_be_bytes(data[0..4].try_into().unwrap_or([0; 4]));
        let size = u64::from_be_bytes(data[8..16].try_into().unwrap_or([0; 8]));
        let off = u64::from_be_bytes(data[16..24].try_into().unwrap_or([0; 8]));
        if nb > MAX_BITMAPS || size > MAX_DIRECTORY_BYTES {
            return Err(format!(
                "{nb} bitmaps / a {size}-byte directory exceed the limits"
            ));
        }
        Ok((nb, size, off))
    })())
}

pub fn ext_bytes(nb: u32, size: u64, off: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&nb.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&off.to_be_bytes());
    v
}

/// Reads the directory the header points at (empty without a valid extension).
pub fn read_directory(f: &ImageFile, h: &Header) -> Result<Vec<BitmapEntry>, DiskError> {
    let Some(ext) = parse_ext(h) else {
        return Ok(Vec::new());
    };
    let bad = |r: String| DiskError::invalid_qcow2(f.path(), r);
    let (nb, size, off) = ext.map_err(bad)?;
    if nb == 0 {
        return Ok(Vec::new());
    }
    let cs = h.cluster_size();
    if !off.is_multiple_of(cs) || off < cs || off.saturating_add(size) > f.len()? {
        return Err(bad(format!(
            "bitmap directory at {off:#x} ({size} bytes) is unaligned or outside the file"
        )));
    }
    let mut b = vec![0u8; size as usize];
    f.read_at(&mut b, off)?;
    parse_directory(&b, nb, cs).map_err(bad)
}

pub fn parse_directory(b: &[u8], nb: u32, cs: u64) -> Result<Vec<BitmapEntry>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for i in 0..nb {
        if at + 24 > b.len() {
            return Err(format!(
                "bitmap directory entry {i} runs past the directory"
            ));
        }
        let e = &b[at..at + 24];
        let table_offset = u64::from_be_bytes(e[0..8].try_into().unwrap_or([0; 8]));
        let table_size = u32::from_be_bytes(e[8..12].try_into().unwrap_or([0; 4]));
        let flags = u32::from_be_bytes(e[12..16].try_into().unwrap_or([0; 4]));
        let name_len = u16::from_be_bytes([e[18], e[19]]) as usize;
        let extra_len = u32::from_be_bytes(e[20..24].try_into().unwrap_or([0; 4])) as usize;
        if name_len > MAX_NAME || extra_len > 1024 {
            return Err(format!("bitmap {i}: name or extra data too long"));
        }
        let end = at + 24 + extra_len + name_len;
        if end > b.len() {
            return Err(format!(
                "bitmap directory entry {i} runs past the directory"
            ));
        }
        if !table_offset.is_multiple_of(cs) || table_offset < cs {
            return Err(format!(
                "bitmap {i}'s table offset {table_offset:#x} is invalid"
            ));
        }
        if table_size as u64 * 8 > 64 << 20 {
            return Err(format!(
                "bitmap {i}'s table of {table_size} entries is too large"
            ));
        }
        let name = String::from_utf8(b[at + 24 + extra_len..end].to_vec())
            .map_err(|_| format!("bitmap {i}'s name is not UTF-8"))?;
        if out.iter().any(|x: &BitmapEntry| x.name == name) {
            return Err(format!("two bitmaps are named '{name}'"));
        }
        out.push(BitmapEntry {
            table_offset,
            table_size,
            flags,
            kind: e[16],
            granularity_bits: e[17],
            name,
            extra: b[at + 24..at + 24 + extra_len].to_vec(),
        });
        at = end.div_ceil(8) * 8;
    }
    Ok(out)
}

pub fn encode_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(e.kind);
        out.push(e.granularity_bits);
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(e.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&e.extra);
        out.extend_from_slice(e.name.as_bytes());
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out
}

/// Bits of a bitmap of `size` bytes at this granularity.
pub fn bit_count(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1u64 << granularity_bits)
}

/// Entries in the bitmap table (one data cluster per cluster_size*8 bits).
pub fn table_entries(size: u64, granularity_bits: u8, cs: u64) -> u64 {
    bit_count(size, granularity_bits).div_ceil(cs * 8)
}

/// A bitmap table's entries, checked against the file.
pub fn read_table(f: &ImageFile, e: &BitmapEntry, cs: u64) -> Result<Vec<u64>, DiskError> {
    let bytes = e.table_size as u64 * 8;
    if e.table_offset.saturating_add(bytes) > f.len()? {
        return Err(DiskError::invalid_qcow2(
            f.path(),
            format!("bitmap '{}' table lies outside the file", e.name),
        ));
    }
    let mut b = vec![0u8; bytes as usize];
    f.read_at(&mut b, e.table_offset)?;
    let t = be_u64s(&b);
    for &x in &t {
        let off = x & TABLE_OFFSET_MASK;
        if off != 0 && (!off.is_multiple_of(cs) || off < cs) {
            return Err(DiskError::invalid_qcow2(
                f.path(),
                format!("bitmap '{}' data cluster {off:#x} is invalid", e.name),
            ));
        }
    }
    Ok(t)
}

/// Clusters the bitmaps extension holds: directory, tables, data (first, count).
pub fn referenced_clusters(
    f: &ImageFile,
    h: &Header,
    geo: &Geometry,
) -> Result<Vec<(u64, u64)>, DiskError> {
    let Some(Ok((nb, size, off))) = parse_ext(h) else {
        return Ok(Vec::new());
    };
    if nb == 0 {
        return Ok(Vec::new());
    }
    let cs = geo.cluster_size;
    let mut out = vec![(off / cs, size.div_ceil(cs))];
    for e in read_directory(f, h)? {
        out.push((e.table_offset / cs, (e.table_size as u64 * 8).div_ceil(cs)));
        for x in read_table(f, &e, cs)? {
            let d = x & TABLE_OFFSET_MASK;
            if d != 0 {
                out.push((d / cs, 1));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_round_trips_and_rejects_garbage() {
        let e = vec![
            BitmapEntry {
                table_offset: 1 << 16,
                table_size: 1,
                flags: FLAG_AUTO,
                kind: 1,
                granularity_bits: 16,
                name: "b0".into(),
                extra: vec![],
            },
            BitmapEntry {
                table_offset: 2 << 16,
                table_size: 3,
                flags: 0,
                kind: 1,
                granularity_bits: 12,
                name: "second".into(),
                extra: vec![],
            },
        ];
        let b = encode_directory(&e);
        assert_eq!(parse_directory(&b, 2, 1 << 16).unwrap(), e);
        for len in 0..b.len() {
            let _ = parse_directory(&b[..len], 2, 1 << 16);
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20000 {
            let mut c = b.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % c.len() as u64) as usize;
                c[i] = (x >> 40) as u8;
            }
            let _ = parse_directory(&c, (x % 4) as u32, 1 << 16);
        }
    }
}
