//! ferrovirt-disk: raw and qcow2 disk images with backing chains.
//!
//! [`open`] gives a thread-safe [`BlockBackend`] over a whole backing chain; the
//! functions of [`ops`] (check, convert, commit, rebase, resize, map) and [`create`] /
//! [`info`] are the library face of `ferrovirt img`.

mod chain;
mod create;
mod error;
mod file;
pub mod img_cli;
mod img_verbs;
mod info;
pub mod jobs;
#[doc(hidden)]
pub mod journal;
mod lock;
pub mod nbd;
pub mod ops;
mod qcow2;
mod raw;

pub use create::{create, CreateOptions, Preallocation};
pub use error::DiskError;
pub use file::{fault_write_count, FAULT_ENV};
pub use info::{info, BitmapJson, FormatSpecific, ImageInfo, Qcow2Specific, SnapshotInfo};
pub use jobs::{open_disk, Disk, JobHandle, JobOutcome, JobProgress};

use std::path::Path;
use std::sync::Arc;

/// Longest backing chain accepted (the image itself plus this many backing files).
pub const MAX_BACKING_DEPTH: usize = 32;

/// The image format: the project's one format type, shared with domain definitions and
/// ferrovmm's `--disk` through ferrovmm-api.
pub use ferrovmm_api::DiskFormat as Format;

#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// None: probe the file (qcow2 magic, otherwise raw).
    pub format: Option<Format>,
    pub read_only: bool,
    /// O_DIRECT for aligned data I/O (cache=none).
    pub direct: bool,
}

/// A virtual disk. All methods may be called from several threads at once.
pub trait BlockBackend: Send + Sync {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError>;
    /// Durable on return: data, then metadata, each fdatasync'ed in order.
    fn flush(&self) -> Result<(), DiskError>;
    /// Releases the range; it reads as zeros afterwards.
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError>;
}

/// One opened layer of a chain.
// Layers always live in an Arc, so the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Image {
    Raw(raw::Raw),
    Qcow2(qcow2::Qcow2),
}

impl Image {
    fn inner(&self) -> &dyn BlockBackend {
        match self {
            Image::Raw(r) => r,
            Image::Qcow2(q) => q,
        }
    }

    pub(crate) fn format(&self) -> Format {
        match self {
            Image::Raw(_) => Format::Raw,
            Image::Qcow2(_) => Format::Qcow2,
        }
    }

    pub(crate) fn backing(&self) -> Option<&Arc<Image>> {
        match self {
            Image::Raw(_) => None,
            Image::Qcow2(q) => q.backing(),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.file().path()
    }

    pub(crate) fn file(&self) -> &file::ImageFile {
        match self {
            Image::Raw(r) => r.file(),
            Image::Qcow2(q) => q.file(),
        }
    }

    /// Status of this layer alone for the run starting at `offset`.
    pub(crate) fn layer_status(
        &self,
        offset: u64,
        max_len: u64,
    ) -> Result<(qcow2::LayerStatus, u64), DiskError> {
        match self {
            Image::Raw(r) => {
                let (data, n) = r.status(offset, max_len);
                let st = if data {
                    qcow2::LayerStatus::Data {
                        host: Some(offset),
                        compressed: false,
                    }
                } else {
                    qcow2::LayerStatus::Zero
                };
                Ok((st, n))
            }
            Image::Qcow2(q) => q.layer_status(offset, max_len),
        }
    }
}

impl BlockBackend for Image {
    fn size(&self) -> u64 {
        self.inner().size()
    }
    fn read_only(&self) -> bool {
        self.inner().read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.inner().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.inner().write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.inner().flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.inner().discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError> {
        self.inner().write_zeroes(offset, len, may_unmap)
    }
}

/// Opens an image and its whole backing chain (backing files read-only).
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Arc<dyn BlockBackend>, DiskError> {
    let img = chain::open_chain(path, opts.format, opts.read_only, opts.direct)?;
    Ok(img)
}
