//! Opening an image with its backing chain: QEMU's relative-path rule, format probing,
//! a depth limit and loop detection. Only the files named by the chain are opened.

use crate::file::ImageFile;
use crate::lock::LockMode;
use crate::qcow2::{read_header, Qcow2};
use crate::raw::Raw;
use crate::{DiskError, Format, Image, MAX_BACKING_DEPTH};
use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where QEMU looks for a backing file: absolute names as they are, relative names
/// next to the overlay (relative to the overlay's directory as it was named).
pub(crate) fn resolve_backing(overlay: &Path, name: &str) -> Result<PathBuf, DiskError> {
    let chain_err = |reason: String| DiskError::BackingChain {
        path: overlay.into(),
        reason,
    };
    if name.starts_with("json:") {
        return Err(chain_err(format!(
            "backing file '{name}' uses QEMU's json: syntax, which is not supported"
        )));
    }
    if let Some(colon) = name.find(':') {
        let proto = &name[..colon];
        if !proto.is_empty()
            && !proto.contains('/')
            && proto
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return Err(chain_err(format!(
                "backing file '{name}' names a protocol ({proto}:), which is not supported; only local files are"
            )));
        }
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(match overlay.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    })
}

pub(crate) fn probe(file: &ImageFile) -> Result<Format, DiskError> {
    let mut magic = [0u8; 4];
    file.read_at(&mut magic, 0)?;
    Ok(
        if u32::from_be_bytes(magic) == crate::qcow2::header::MAGIC {
            Format::Qcow2
        } else {
            Format::Raw
        },
    )
}

struct Walk {
    seen: HashSet<(u64, u64)>,
    depth: usize,
    top: PathBuf,
    direct: bool,
    follow_backing: bool,
    repairing: bool,
    locking: bool,
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ChainOpts {
    pub read_only: bool,
    pub direct: bool,
    /// Open the first backing file read-write (commit).
    pub backing_writable: bool,
    /// Open only the named image, not its backing files (info, check, resize, rebase -u).
    pub top_only: bool,
    /// Open a dirty or corrupt-marked image read-write to repair it (check -r).
    pub repairing: bool,
    /// Take no image locks (reports such as info and map on images in use).
    pub no_locks: bool,
}

pub(crate) fn open_chain_with(
    path: &Path,
    format: Option<Format>,
    o: ChainOpts,
) -> Result<Arc<Image>, DiskError> {
    let mut w = Walk {
        seen: HashSet::new(),
        depth: 0,
        top: path.to_path_buf(),
        direct: o.direct,
        follow_backing: !o.top_only,
        repairing: o.repairing,
        locking: !o.no_locks,
    };
    open_layer(&mut w, path, format, o.read_only, o.backing_writable)
}

pub(crate) fn open_chain(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
    direct: bool,
) -> Result<Arc<Image>, DiskError> {
    open_chain_with(
        path,
        format,
        ChainOpts {
            read_only,
            direct,
            ..Default::default()
        },
    )
}

fn open_layer(
    w: &mut Walk,
    path: &Path,
    format: Option<Format>,
    read_only: bool,
    backing_writable: bool,
) -> Result<Arc<Image>, DiskError> {
    if w.depth > MAX_BACKING_DEPTH {
        return Err(DiskError::BackingChain {
            path: w.top.clone(),
            reason: format!("more than {MAX_BACKING_DEPTH} backing files; the chain is too deep (flatten it with `ferrovirt img convert`)"),
        });
    }
    let md = std::fs::metadata(path).map_err(|e| {
        if w.depth == 0 {
            DiskError::io(path, e)
        } else {
            DiskError::BackingChain {
                path: w.top.clone(),
                reason: format!("backing file {}: {e}", path.display()),
            }
        }
    })?;
    // Only regular files and block devices: opening a FIFO would block, and character
    // devices (/dev/zero, ...) are not disks.
    let ft = md.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        let what = if ft.is_dir() {
            "a directory"
        } else {
            "not a regular file or block device"
        };
        return Err(DiskError::InvalidArgument(format!(
            "{} is {what}, not a disk image",
            path.display()
        )));
    }
    if !w.seen.insert((md.dev(), md.ino())) {
        return Err(DiskError::BackingChain {
            path: w.top.clone(),
            reason: format!(
                "{} appears twice: the backing chain has a loop",
                path.display()
            ),
        });
    }
    let file = ImageFile::open(path, !read_only, w.direct)?;
    if w.locking {
        let mode = if read_only {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        };
        crate::lock::lock(file.raw_fd(), path, mode)?;
    }
    let format = match format {
        Some(f) => f,
        None => probe(&file)?,
    };
    let img = match format {
        Format::Raw => Image::Raw(Raw::open(file, read_only)?),
        Format::Qcow2 => {
            let h = read_header(&file)?;
            let backing = match &h.backing_file {
                Some(name) if !name.is_empty() && w.follow_backing => {
                    let bpath = resolve_backing(path, name)?;
                    let bfmt = match h.backing_format.as_deref() {
                        Some(f) => Some(Format::parse(f).map_err(|_| DiskError::BackingChain {
                            path: path.into(),
                            reason: format!(
                                "backing file format '{f}' is not supported (qcow2 or raw)"
                            ),
                        })?),
                        None => None,
                    };
                    w.depth += 1;
                    Some(open_layer(w, &bpath, bfmt, !backing_writable, false)?)
                }
                _ => None,
            };
            Image::Qcow2(Qcow2::open(file, backing, read_only, w.repairing)?)
        }
    };
    Ok(Arc::new(img))
}
