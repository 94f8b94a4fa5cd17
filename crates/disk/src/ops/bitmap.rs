//! `bitmap`: persistent dirty bitmaps of a qcow2 image (as `qemu-img bitmap`).

use crate::chain::{open_chain_with, ChainOpts};
pub use crate::qcow2::BitmapInfo;
use crate::{DiskError, Image};
use std::path::Path;
use std::sync::Arc;

/// One change to a bitmap; several may be applied in one call, in this order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BitmapOp {
    /// A new empty bitmap; `granularity` None: the cluster size within 4 KiB..64 KiB.
    Add {
        granularity: Option<u64>,
        disabled: bool,
    },
    Clear,
    /// Marks in the bitmap everything the named bitmap of the same image marks.
    Merge(String),
    Enable,
    Disable,
    Remove,
}

fn open_top(path: &Path, read_only: bool) -> Result<Arc<Image>, DiskError> {
    let img = open_chain_with(
        path,
        None,
        ChainOpts {
            read_only,
            top_only: true,
            no_locks: read_only,
            ..Default::default()
        },
    )?;
    if !matches!(&*img, Image::Qcow2(_)) {
        return Err(DiskError::InvalidArgument(format!(
            "{}: persistent bitmaps need a qcow2 image (this one is raw)",
            path.display()
        )));
    }
    Ok(img)
}

/// Applies `ops` to bitmap `name`, then stores the bitmaps.
pub fn bitmap(path: &Path, name: &str, ops: &[BitmapOp]) -> Result<(), DiskError> {
    let img = open_top(path, false)?;
    let Image::Qcow2(q) = &*img else {
        return Err(DiskError::InvalidArgument("not a qcow2 image".into()));
    };
    for op in ops {
        match op {
            BitmapOp::Add {
                granularity,
                disabled,
            } => q.bitmap_add(name, *granularity, !disabled)?,
            BitmapOp::Clear => q.bitmap_clear(name)?,
            BitmapOp::Merge(src) => q.bitmap_merge(src, name)?,
            BitmapOp::Enable => q.bitmap_set_enabled(name, true)?,
            BitmapOp::Disable => q.bitmap_set_enabled(name, false)?,
            BitmapOp::Remove => q.bitmap_remove(name)?,
        }
    }
    q.store_bitmaps()
}

/// The bitmaps of an image as stored on disk (works on images in use).
pub fn bitmap_list(path: &Path) -> Result<Vec<BitmapInfo>, DiskError> {
    let img = open_top(path, true)?;
    match &*img {
        Image::Qcow2(q) => Ok(q.bitmap_list()),
        Image::Raw(_) => Ok(Vec::new()),
    }
}

/// The byte ranges (offset, length) a bitmap marks dirty; refused for a bitmap left
/// in use (inconsistent).
pub fn bitmap_extents(path: &Path, name: &str) -> Result<Vec<(u64, u64)>, DiskError> {
    let img = open_top(path, true)?;
    match &*img {
        Image::Qcow2(q) => q.bitmap_dirty_extents(name),
        Image::Raw(_) => Err(DiskError::InvalidArgument(
            "raw images have no bitmaps".into(),
        )),
    }
}
