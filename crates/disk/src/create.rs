//! Creating raw and qcow2 images.

use crate::chain::{open_chain_with, resolve_backing, ChainOpts};
use crate::file::ImageFile;
use crate::qcow2::header::{Compression, Header, V3_HEADER_LEN};
use crate::qcow2::Qcow2;
use crate::{BlockBackend, DiskError, Format};
use std::path::Path;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preallocation {
    #[default]
    Off,
    /// qcow2: allocate every L2 table and data cluster, leave the data sparse.
    Metadata,
    /// Reserve host blocks with fallocate.
    Falloc,
    /// Write zeros over the whole data area.
    Full,
}

impl Preallocation {
    pub fn parse(s: &str) -> Result<Preallocation, DiskError> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            other => Err(DiskError::InvalidArgument(format!(
                "unknown preallocation mode '{other}': use off, metadata, falloc or full"
            ))),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub format: Format,
    /// Virtual size in bytes; 0 with a backing file means "the backing file's size".
    pub size: u64,
    /// qcow2 only; default 64 KiB.
    pub cluster_size: Option<u32>,
    pub preallocation: Preallocation,
    /// Backing file name as written in the header, and its format (qcow2 only).
    pub backing: Option<(String, Format)>,
}

pub const DEFAULT_CLUSTER_SIZE: u32 = 65536;

/// The largest image size: a file offset (i64) rounded down to whole sectors, as
/// sizes are rounded up to 512 bytes.
pub const MAX_IMAGE_SIZE: u64 = i64::MAX as u64 & !511;

/// Refuses sizes no file can have (before any rounding could overflow).
pub fn check_size(size: u64) -> Result<(), DiskError> {
    if size > MAX_IMAGE_SIZE {
        return Err(DiskError::InvalidArgument(format!(
            "invalid image size {size}: it must be between 0 and {MAX_IMAGE_SIZE} bytes"
        )));
    }
    Ok(())
}

/// Creates (or overwrites) an image.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), DiskError> {
    check_size(opts.size)?;
    let mut size = opts.size;
    if let Some((name, fmt)) = &opts.backing {
        if opts.format != Format::Qcow2 {
            return Err(DiskError::InvalidArgument(
                "a backing file needs the qcow2 format".into(),
            ));
        }
        let bpath = resolve_backing(path, name)?;
        // Only the size is read: no locks, so overlays can be made of images in use.
        let ro = ChainOpts {
            read_only: true,
            no_locks: true,
            ..Default::default()
        };
        let b = open_chain_with(&bpath, Some(*fmt), ro).map_err(|e| DiskError::BackingChain {
            path: path.into(),
            reason: format!("cannot open backing file {}: {e}", bpath.display()),
        })?;
        if size == 0 {
            size = b.size();
        }
    }
    let existed = std::fs::symlink_metadata(path).is_ok();
    let made = match opts.format {
        Format::Raw => create_raw(path, size, opts),
        Format::Qcow2 => create_qcow2(path, size, opts),
    };
    if made.is_err() && !existed && std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        // No half-made image is left behind (e.g. a size the file system cannot hold).
        let _ = std::fs::remove_file(path);
    }
    made
}

fn create_raw(path: &Path, size: u64, opts: &CreateOptions) -> Result<(), DiskError> {
    if opts.cluster_size.is_some() {
        return Err(DiskError::InvalidArgument(
            "cluster_size applies to qcow2 images only".into(),
        ));
    }
    if opts.preallocation == Preallocation::Metadata {
        return Err(DiskError::InvalidArgument(
            "preallocation=metadata applies to qcow2 images only; use off, falloc or full".into(),
        ));
    }
    // Disks are made of 512-byte sectors, as with qemu-img.
    let size = size.div_ceil(512) * 512;
    let f = ImageFile::create(path)?;
    f.set_len(size)?;
    match opts.preallocation {
        Preallocation::Falloc => f.allocate(0, size)?,
        Preallocation::Full => f.write_zeros(0, size)?,
        _ => {}
    }
    f.sync()
}

fn create_qcow2(path: &Path, size: u64, opts: &CreateOptions) -> Result<(), DiskError> {
    let cs = opts.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE) as u64;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(DiskError::InvalidArgument(format!(
            "cluster size {cs} is invalid: use a power of two from 512 bytes to 2 MiB (default 64K)"
        )));
    }
    if size > crate::qcow2::header::MAX_VIRTUAL_SIZE {
        return Err(DiskError::InvalidArgument(format!(
            "size {size} is too large for qcow2"
        )));
    }
    let size = size.div_ceil(512) * 512;
    let cluster_bits = cs.trailing_zeros();
    let l1_entries = Header::l1_entries_for(size, cluster_bits);
    if l1_entries * 8 > crate::qcow2::header::MAX_L1_BYTES {
        return Err(DiskError::InvalidArgument(format!(
            "size {size} needs an L1 table above 32 MiB with {cs}-byte clusters; use a larger cluster size"
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let header = Header {
        version: 3,
        backing_file: opts.backing.as_ref().map(|(n, _)| n.clone()),
        cluster_bits,
        size,
        l1_size: l1_entries as u32,
        l1_table_offset: 3 * cs,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: V3_HEADER_LEN,
        compression: Compression::Zlib,
        backing_format: opts.backing.as_ref().map(|(_, f)| f.as_str().to_string()),
        feature_names: Vec::new(),
        other_extensions: Vec::new(),
    };
    let hbytes = header.serialize().map_err(DiskError::InvalidArgument)?;
    let f = ImageFile::create(path)?;
    let used = 3 + l1_clusters;
    let per_block = cs / 2;
    // Refcount table entry 0 -> block at cluster 2, which counts the first clusters.
    let mut rt = vec![0u8; cs as usize];
    rt[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    let mut rb = vec![0u8; cs as usize];
    for c in 0..used.min(per_block) {
        rb[c as usize * 2..c as usize * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    f.set_len(used * cs)?;
    f.write_at(&rt, cs)?;
    f.write_at(&rb, 2 * cs)?;
    f.write_at(&hbytes, 0)?;
    f.sync()?;
    drop(f);
    if used > per_block || opts.preallocation != Preallocation::Off {
        let f = ImageFile::open(path, true, false)?;
        let q = Qcow2::open(f, None, false, false)?;
        q.finish_create(per_block.min(used), used, opts.preallocation)?;
        q.flush()?;
    }
    Ok(())
}
