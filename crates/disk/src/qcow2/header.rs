//! qcow2 header (versions 2 and 3) and its extensions: parsing with bounds checks
//! against hostile input, and serialisation of the header cluster.

use crate::DiskError;
use std::path::Path;

pub const MAGIC: u32 = 0x5146_49fb;
pub const V2_HEADER_LEN: usize = 72;
pub const V3_HEADER_LEN: u32 = 112;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;

/// Limits that keep a hostile header from making us allocate unbounded memory
/// (the same orders of magnitude QEMU enforces).
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_BACKING_NAME: u32 = 1023;
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// 2^61 bytes keeps every offset computation inside u64.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub backing_file: Option<String>,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    pub backing_format: Option<String>,
    /// Names of feature bits from the feature-name table: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// Extensions we do not interpret, kept verbatim when the header is rewritten.
    pub other_extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// L1 entries needed to map `size` bytes with this cluster size.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        let bytes_per_l2 = 1u64 << (cluster_bits * 2 - 3);
        size.div_ceil(bytes_per_l2)
    }

    /// Parses the header from the first bytes of the file (at least one cluster's
    /// worth or the whole file if smaller) and checks every field against `file_len`.
    pub fn parse(path: &Path, b: &[u8], file_len: u64) -> Result<Header, DiskError> {
        let bad = |reason: String| DiskError::invalid_qcow2(path, reason);
        if b.len() < V2_HEADER_LEN {
            return Err(bad(format!(
                "file is {} bytes, too short for a qcow2 header",
                b.len()
            )));
        }
        if be32(b, 0) != MAGIC {
            return Err(bad("missing the QFI\\xfb magic".into()));
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(DiskError::Unsupported {
                path: path.into(),
                feature: format!("qcow2 version {version} (versions 2 and 3 are supported)"),
            });
        }
        let cluster_bits = be32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!(
                "cluster size 2^{cluster_bits} is outside 512 bytes..2 MiB"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let crypt = be32(b, 32);
        if crypt != 0 {
            return Err(DiskError::Unsupported {
                path: path.into(),
                feature: "encrypted qcow2 images".into(),
            });
        }
        let mut h = Header {
            version,
            backing_file: None,
            cluster_bits,
            size: be64(b, 24),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression: Compression::Zlib,
            backing_format: None,
            feature_names: Vec::new(),
            other_extensions: Vec::new(),
        };
        if version == 3 {
            if b.len() < 104 {
                return Err(bad("file too short for a version 3 header".into()));
            }
            h.incompatible_features = be64(b, 72);
            h.compatible_features = be64(b, 80);
            h.autoclear_features = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < 104
                || h.header_length as u64 > cluster_size
                || h.header_length as usize > b.len()
            {
                return Err(bad(format!("header length {} is invalid", h.header_length)));
            }
            if h.header_length > 104 {
                h.compression = match b[104] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    t => {
                        return Err(DiskError::Unsupported {
                            path: path.into(),
                            feature: format!("compression type {t}"),
                        })
                    }
                };
            }
            if h.compression != Compression::Zlib
                && h.incompatible_features & INCOMPAT_COMPRESSION == 0
            {
                return Err(bad(
                    "compression type set without the compression-type feature bit".into(),
                ));
            }
        }
        if h.refcount_order > 6 {
            return Err(bad(format!(
                "refcount order {} is above 6",
                h.refcount_order
            )));
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(bad(format!("virtual size {} is too large", h.size)));
        }
        let needed_l1 = Header::l1_entries_for(h.size, cluster_bits);
        if (h.l1_size as u64) < needed_l1 {
            return Err(bad(format!(
                "L1 table has {} entries but the virtual size needs {needed_l1}",
                h.l1_size
            )));
        }
        let l1_bytes = h.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad(format!(
                "L1 table of {l1_bytes} bytes is larger than the 32 MiB limit"
            )));
        }
        check_region(
            path,
            "L1 table",
            h.l1_table_offset,
            l1_bytes,
            cluster_size,
            file_len,
        )?;
        let rt_bytes = h.refcount_table_clusters as u64 * cluster_size;
        if h.refcount_table_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(bad(format!(
                "refcount table of {} clusters is empty or larger than the 8 MiB limit",
                h.refcount_table_clusters
            )));
        }
        check_region(
            path,
            "refcount table",
            h.refcount_table_offset,
            rt_bytes,
            cluster_size,
            file_len,
        )?;
        if l1_bytes > 0
            && overlaps(
                h.l1_table_offset,
                l1_bytes,
                h.refcount_table_offset,
                rt_bytes,
            )
        {
            return Err(bad("L1 table and refcount table overlap".into()));
        }
        if h.nb_snapshots > 0 {
            check_region(
                path,
                "snapshot table",
                h.snapshots_offset,
                1,
                cluster_size,
                file_len,
            )?;
        }

        let backing_off = be64(b, 8);
        let backing_len = be32(b, 16);
        let ext_end = if backing_off != 0 {
            backing_off.min(cluster_size)
        } else {
            cluster_size
        };
        h.parse_extensions(path, b, ext_end as usize)?;
        if backing_off != 0 && backing_len > 0 {
            if backing_len > MAX_BACKING_NAME
                || backing_off + backing_len as u64 > cluster_size
                || backing_off as usize + backing_len as usize > b.len()
            {
                return Err(bad(
                    "backing file name lies outside the header cluster".into()
                ));
            }
            let raw = &b[backing_off as usize..backing_off as usize + backing_len as usize];
            let name = String::from_utf8(raw.to_vec())
                .map_err(|_| bad("backing file name is not valid UTF-8".into()))?;
            h.backing_file = Some(name);
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, path: &Path, b: &[u8], end: usize) -> Result<(), DiskError> {
        let bad = |reason: &str| DiskError::invalid_qcow2(path, reason.to_string());
        let mut at = self.header_length as usize;
        let end = end.min(b.len());
        loop {
            if at + 8 > end {
                // v2 images may have no end marker at all.
                return Ok(());
            }
            let ty = be32(b, at);
            let len = be32(b, at + 4) as usize;
            at += 8;
            if ty == EXT_END {
                return Ok(());
            }
            if len > end.saturating_sub(at) {
                return Err(bad("header extension runs past the header cluster"));
            }
            let data = &b[at..at + len];
            match ty {
                EXT_BACKING_FORMAT => {
                    let f = String::from_utf8(data.to_vec())
                        .map_err(|_| bad("backing format is not UTF-8"))?;
                    self.backing_format = Some(f.trim_end_matches('\0').to_string());
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name_end = e[2..].iter().position(|&c| c == 0).map_or(48, |p| p + 2);
                        let name = String::from_utf8_lossy(&e[2..name_end]).into_owned();
                        self.feature_names.push((e[0], e[1], name));
                    }
                }
                _ => self.other_extensions.push((ty, data.to_vec())),
            }
            at += len.div_ceil(8) * 8;
        }
    }

    /// Name of an incompatible feature bit, from the image's feature table if present.
    pub fn incompatible_name(&self, bit: u8) -> String {
        self.feature_names
            .iter()
            .find(|(t, b, _)| *t == 0 && *b == bit)
            .map(|(_, _, n)| n.clone())
            .unwrap_or_else(|| format!("unknown incompatible feature bit {bit}"))
    }

    /// The whole header cluster as written to offset 0 (header, extensions, backing name).
    /// The feature-name table is optional and left out when the cluster is too small.
    pub fn serialize(&self) -> Result<Vec<u8>, String> {
        self.serialize_with(true)
            .or_else(|_| self.serialize_with(false))
    }

    fn serialize_with(&self, feature_table: bool) -> Result<Vec<u8>, String> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; V3_HEADER_LEN as usize];
        let v3 = self.version == 3;
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if v3 {
            b[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&V3_HEADER_LEN.to_be_bytes());
            b[104] = match self.compression {
                Compression::Zlib => 0,
                Compression::Zstd => 1,
            };
        } else {
            b.truncate(V2_HEADER_LEN);
        }
        let push_ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(f) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
        }
        // The bitmaps extension first, so that it stays inside the first sector.
        for (ty, data) in self
            .other_extensions
            .iter()
            .filter(|(t, _)| *t == 0x2385_2875)
        {
            push_ext(&mut b, *ty, data);
        }
        if v3 && feature_table {
            let mut table = Vec::new();
            for (ty, bit, name) in [
                (0u8, 0u8, "dirty bit"),
                (0, 1, "corrupt bit"),
                (0, 2, "external data file"),
                (0, 3, "compression type"),
                (0, 4, "extended L2 entries"),
                (1, 0, "lazy refcounts"),
                (2, 0, "bitmaps"),
                (2, 1, "raw external data"),
            ] {
                let mut e = [0u8; 48];
                e[0] = ty;
                e[1] = bit;
                e[2..2 + name.len()].copy_from_slice(name.as_bytes());
                table.extend_from_slice(&e);
            }
            push_ext(&mut b, EXT_FEATURE_TABLE, &table);
        }
        for (ty, data) in self
            .other_extensions
            .iter()
            .filter(|(t, _)| *t != 0x2385_2875)
        {
            push_ext(&mut b, *ty, data);
        }
        if v3 || self.backing_file.is_some() {
            b.extend_from_slice(&[0u8; 8]);
        }
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err(format!(
                    "backing file name is longer than {MAX_BACKING_NAME} bytes"
                ));
            }
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() > cs {
            return Err(format!(
                "header, extensions and backing file name need {} bytes, more than one {cs}-byte cluster",
                b.len()
            ));
        }
        Ok(b)
    }
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

fn check_region(
    path: &Path,
    what: &str,
    off: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), DiskError> {
    if !off.is_multiple_of(cluster_size) {
        return Err(DiskError::invalid_qcow2(
            path,
            format!("{what} offset {off:#x} is not cluster aligned"),
        ));
    }
    if off < cluster_size && len > 0 {
        return Err(DiskError::invalid_qcow2(
            path,
            format!("{what} overlaps the header cluster"),
        ));
    }
    if off.saturating_add(len) > file_len {
        return Err(DiskError::invalid_qcow2(
            path,
            format!("{what} at {off:#x} ({len} bytes) extends past the end of the file ({file_len} bytes)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file: Some("base.qcow2".into()),
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression: Compression::Zlib,
            backing_format: Some("qcow2".into()),
            feature_names: Vec::new(),
            other_extensions: vec![(0x1234_5678, vec![1, 2, 3])],
        }
    }

    #[test]
    fn header_round_trips_with_extensions() {
        let h = sample();
        let b = h.serialize().unwrap();
        let p = Header::parse(Path::new("t"), &b, 4 << 16).unwrap();
        assert_eq!(p.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(p.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(p.size, 1 << 30);
        assert_eq!(p.other_extensions, vec![(0x1234_5678, vec![1, 2, 3])]);
        assert_eq!(p.incompatible_name(1), "corrupt bit");
    }

    #[test]
    fn truncated_headers_are_rejected_without_panic() {
        let b = sample().serialize().unwrap();
        for len in 0..b.len() {
            assert!(
                Header::parse(Path::new("t"), &b[..len], 4 << 16).is_err(),
                "a header cut to {len} of {} bytes was accepted",
                b.len()
            );
        }
    }
}
