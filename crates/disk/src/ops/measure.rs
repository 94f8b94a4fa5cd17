//! `measure`: how large a new image would be, with QEMU's formulas (qcow2_measure and
//! raw_measure of QEMU 7.2), so that the figures equal `qemu-img measure`'s.

use super::map::chain_status;
use crate::chain::{open_chain_with, ChainOpts};
use crate::{BlockBackend, DiskError, Format, Image, Preallocation};
use serde::Serialize;
use std::path::Path;

/// What the new image would be (`-O` and `-o` of `qemu-img measure`).
#[derive(Clone, Debug)]
pub struct MeasureOptions {
    pub format: Format,
    /// qcow2: 64 KiB when None.
    pub cluster_size: Option<u64>,
    /// qcow2: 2 for compat=0.10, 3 (the default) for compat=1.1.
    pub version: u32,
    /// qcow2: 16 when None.
    pub refcount_bits: Option<u64>,
    pub preallocation: Preallocation,
    /// qcow2: a backing file is named (every cluster is then counted as required).
    pub backing: bool,
    /// qcow2: extended L2 entries (16 bytes each).
    pub extended_l2: bool,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        MeasureOptions {
            format: Format::Raw,
            cluster_size: None,
            version: 3,
            refcount_bits: None,
            preallocation: Preallocation::Off,
            backing: false,
            extended_l2: false,
        }
    }
}

/// `qemu-img measure`'s figures, in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Measurement {
    /// Present when source and destination could both hold persistent bitmaps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<u64>,
    pub required: u64,
    #[serde(rename = "fully-allocated")]
    pub fully_allocated: u64,
}

/// What is measured: an existing image (with its backing chain) or a bare size.
pub enum MeasureSource<'a> {
    Image {
        path: &'a Path,
        format: Option<Format>,
    },
    Size(u64),
}

const L1E_SIZE: u64 = 8;
const REFTABLE_ENTRY_SIZE: u64 = 8;

/// QEMU's qcow2_refcount_metadata_size: the fixed point of refcount blocks and table
/// clusters needed to count `clusters` clusters plus themselves.
fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let blocks_per_table_cluster = cs / REFTABLE_ENTRY_SIZE;
    let refcounts_per_block = cs * 8 / (1 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(refcounts_per_block);
        table = blocks.div_ceil(blocks_per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

/// QEMU's qcow2_calc_prealloc_size: every cluster of a fully allocated image.
fn prealloc_size(total: u64, cs: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let l2e_size = if extended_l2 { 16 } else { 8 };
    let aligned = total.div_ceil(cs) * cs;
    let mut meta = cs;
    let nl2e = (aligned / cs).div_ceil(cs / l2e_size) * (cs / l2e_size);
    meta += nl2e * l2e_size;
    let nl1e = (nl2e * l2e_size / cs).div_ceil(cs / L1E_SIZE) * (cs / L1E_SIZE);
    meta += nl1e * L1E_SIZE;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_order);
    meta + aligned
}

fn invalid(msg: String) -> DiskError {
    DiskError::InvalidArgument(msg)
}

/// Validates qcow2 options as qemu-img does; returns (cluster size, refcount order).
fn qcow2_params(o: &MeasureOptions) -> Result<(u64, u32), DiskError> {
    let cs = o.cluster_size.unwrap_or(65536);
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(invalid(format!(
            "Cluster size must be a power of two between 512 and 2048k (got {cs})"
        )));
    }
    if o.extended_l2 && cs < 16384 {
        return Err(invalid(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                .into(),
        ));
    }
    let bits = o.refcount_bits.unwrap_or(16);
    if !bits.is_power_of_two() || bits > 64 {
        return Err(invalid(
            "Refcount width must be a power of two and may not exceed 64 bits".into(),
        ));
    }
    if o.version < 3 && bits != 16 {
        return Err(invalid(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into(),
        ));
    }
    if o.version < 3 && o.extended_l2 {
        return Err(invalid(
            "Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into(),
        ));
    }
    Ok((cs, bits.trailing_zeros()))
}

/// The required and fully allocated sizes of a new image holding `src`'s data.
pub fn measure(src: &MeasureSource<'_>, o: &MeasureOptions) -> Result<Measurement, DiskError> {
    let qcow2 = match o.format {
        Format::Qcow2 => Some(qcow2_params(o)?),
        Format::Raw => None,
    };
    let img = match src {
        MeasureSource::Image { path, format } => Some(open_chain_with(
            path,
            *format,
            ChainOpts {
                read_only: true,
                no_locks: true,
                ..Default::default()
            },
        )?),
        MeasureSource::Size(_) => None,
    };
    let Some((cs, refcount_order)) = qcow2 else {
        let required = match (&img, src) {
            (Some(i), _) => i.size(),
            (None, MeasureSource::Size(s)) => s.div_ceil(512) * 512,
            (None, _) => 0,
        };
        return Ok(Measurement {
            bitmaps: None,
            required,
            fully_allocated: required,
        });
    };
    let (virtual_size, mut required) = match (&img, src) {
        (Some(i), _) => {
            let size = i.size();
            let aligned = size.div_ceil(cs) * cs;
            let req = if o.backing {
                // The new backing file may share nothing with the source.
                aligned
            } else {
                data_clusters(i, cs)? * cs
            };
            (aligned, req)
        }
        (None, MeasureSource::Size(s)) => (s.div_ceil(cs) * cs, 0),
        (None, _) => (0, 0),
    };
    let l2e_size = if o.extended_l2 { 16 } else { 8 };
    let l2_tables = (virtual_size / cs).div_ceil(cs / l2e_size);
    if l2_tables * L1E_SIZE > crate::qcow2::header::MAX_L1_BYTES {
        return Err(invalid(
            "The image size is too large (try using a larger cluster size)".into(),
        ));
    }
    if matches!(o.preallocation, Preallocation::Full | Preallocation::Falloc) {
        required = virtual_size;
    }
    let fully_allocated = prealloc_size(virtual_size, cs, refcount_order, o.extended_l2);
    let bitmaps = match &img {
        Some(i) if o.version >= 3 => source_bitmaps_size(i, cs)?,
        _ => None,
    };
    Ok(Measurement {
        bitmaps,
        required: fully_allocated - virtual_size + required,
        fully_allocated,
    })
}

/// Clusters (of the new image's size) that hold data anywhere in the source chain.
fn data_clusters(img: &std::sync::Arc<Image>, cs: u64) -> Result<u64, DiskError> {
    let size = img.size();
    let (mut pos, mut count, mut counted_to) = (0u64, 0u64, 0u64);
    while pos < size {
        let e = chain_status(img, pos, size - pos)?;
        let len = e.length.max(1);
        if e.data {
            let first = (pos / cs).max(counted_to);
            let end = (pos + len).div_ceil(cs);
            if end > first {
                count += end - first;
                counted_to = end;
            }
        }
        pos += len;
    }
    Ok(count)
}

/// QEMU's qcow2_get_persistent_dirty_bitmap_size for a qcow2 v3 source (None when the
/// source cannot hold persistent bitmaps).
fn source_bitmaps_size(img: &Image, cs: u64) -> Result<Option<u64>, DiskError> {
    let Image::Qcow2(q) = img else {
        return Ok(None);
    };
    if q.header().version < 3 {
        return Ok(None);
    }
    let size = img.size();
    let (mut total, mut dir) = (0u64, 0u64);
    for b in q.bitmap_list() {
        let bytes = size.div_ceil(b.granularity.max(1)).div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        total += clusters * cs;
        total += (clusters * 8).div_ceil(cs) * cs;
        dir += (24 + b.name.len() as u64).div_ceil(8) * 8;
    }
    Ok(Some(total + dir.div_ceil(cs) * cs))
}

#[cfg(test)]
mod tests {
    use super::prealloc_size;

    #[test]
    fn fully_allocated_sizes_match_qemu_img_measure() {
        // `qemu-img measure --size S -O qcow2 [-o cluster_size=C]` (QEMU 7.2).
        assert_eq!(prealloc_size(1 << 30, 65536, 4, false), 1074135040);
        assert_eq!(prealloc_size(1 << 30, 65536, 4, false) - (1 << 30), 393216);
    }
}
