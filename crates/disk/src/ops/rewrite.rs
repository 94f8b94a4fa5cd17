//! Operations that write images: convert, commit, rebase, resize.

use super::map::{chain_status, MapEntry};
use crate::chain::{open_chain, open_chain_with, probe, resolve_backing, ChainOpts};
use crate::file::ImageFile;
use crate::qcow2::LayerStatus;
use crate::{create, BlockBackend, CreateOptions, DiskError, Format, Image, Preallocation};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

/// Copies the whole chain of `src` into a new standalone image, skipping zeros.
pub fn convert(
    src: &Path,
    src_format: Option<Format>,
    dst: &Path,
    opts: &CreateOptions,
) -> Result<(), DiskError> {
    let s = open_chain(src, src_format, true, false)?;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(src), std::fs::metadata(dst)) {
        if a.dev() == b.dev() && a.ino() == b.ino() {
            return Err(DiskError::InvalidArgument(
                "source and destination are the same file".into(),
            ));
        }
    }
    let mut o = opts.clone();
    o.size = s.size();
    o.backing = None;
    create(dst, &o)?;
    let d = open_chain(dst, Some(opts.format), false, false)?;
    copy_data(&s, &*d, |_| true)?;
    d.flush()
}

/// Copies every run of `src` whose chain status is data (and non-zero) into `dst`.
fn copy_data(
    src: &Arc<Image>,
    dst: &dyn BlockBackend,
    mut want: impl FnMut(&MapEntry) -> bool,
) -> Result<(), DiskError> {
    const CHUNK: u64 = 1 << 20;
    const ZERO_GRAIN: usize = 4096;
    let size = src.size().min(dst.size());
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let e = chain_status(src, pos, size - pos)?;
        // Runs without data are skipped whole; data is copied a chunk at a time.
        let n = if e.data {
            e.length.min(CHUNK)
        } else {
            e.length
        };
        if e.data && want(&e) {
            let b = &mut buf[..n as usize];
            src.read_at(b, pos)?;
            // Keep the copy sparse: write only grains that hold data.
            let mut i = 0;
            while i < b.len() {
                let g = ZERO_GRAIN.min(b.len() - i);
                if b[i..i + g].iter().all(|&x| x == 0) {
                    i += g;
                    continue;
                }
                let mut j = i + g;
                while j < b.len() && !b[j..(j + ZERO_GRAIN).min(b.len())].iter().all(|&x| x == 0) {
                    j = (j + ZERO_GRAIN).min(b.len());
                }
                dst.write_at(&b[i..j], pos + i as u64)?;
                i = j;
            }
        }
        pos += n;
    }
    Ok(())
}

/// Writes the overlay's own data into its backing file, then empties the overlay.
pub fn commit(path: &Path) -> Result<(), DiskError> {
    let top = open_chain_with(
        path,
        None,
        ChainOpts {
            backing_writable: true,
            ..Default::default()
        },
    )?;
    let Image::Qcow2(q) = &*top else {
        return Err(DiskError::InvalidArgument(format!(
            "{}: a raw image has no backing file to commit into",
            path.display()
        )));
    };
    let Some(base) = q.backing() else {
        return Err(DiskError::InvalidArgument(format!(
            "{}: the image has no backing file to commit into",
            path.display()
        )));
    };
    if base.size() < top.size() {
        grow_image(base, top.size())?;
    }
    let size = top.size();
    // The map first (metadata only), then the data runs copied by a few threads, so
    // that reading the overlay and writing the base overlap as in qemu-img.
    let mut data = Vec::new();
    let mut pos = 0;
    while pos < size {
        let (st, n) = top.layer_status(pos, size - pos)?;
        match st {
            LayerStatus::Unallocated => {}
            LayerStatus::Zero => base.write_zeroes(pos, n, false)?,
            LayerStatus::Data { .. } => {
                let mut p = pos;
                while p < pos + n {
                    let k = (pos + n - p).min(COPY_CHUNK);
                    data.push((p, k));
                    p += k;
                }
            }
        }
        pos += n;
    }
    copy_runs(&top, base, &data)?;
    base.flush()?;
    q.make_empty()
}

const COPY_CHUNK: u64 = 1 << 20;
const COPY_THREADS: usize = 4;

/// Copies the (offset, length) runs from `src` to `dst` with a few threads.
fn copy_runs(src: &Arc<Image>, dst: &Arc<Image>, runs: &[(u64, u64)]) -> Result<(), DiskError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        let workers: Vec<_> = (0..COPY_THREADS.min(runs.len()))
            .map(|_| {
                sc.spawn(|| -> Result<(), DiskError> {
                    let mut buf = crate::file::AlignedBuf::zeroed(COPY_CHUNK as usize);
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(pos, n)) = runs.get(i) else {
                            return Ok(());
                        };
                        if failed.load(std::sync::atomic::Ordering::Relaxed) {
                            return Ok(());
                        }
                        let b = &mut buf[..n as usize];
                        let r = src.read_at(b, pos).and_then(|()| dst.write_at(b, pos));
                        if r.is_err() {
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                            return r;
                        }
                    }
                })
            })
            .collect();
        let mut result = Ok(());
        for w in workers {
            let r = w.join().unwrap_or_else(|_| {
                Err(DiskError::InvalidArgument("a copy thread panicked".into()))
            });
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

fn grow_image(img: &Image, new_size: u64) -> Result<(), DiskError> {
    match img {
        Image::Qcow2(q) => q.grow(new_size),
        Image::Raw(r) => {
            r.file().set_len(new_size)?;
            r.file().sync()
        }
    }
}

/// Changes the backing file. Unless `unsafe_only`, first copies into the image every
/// cluster whose contents would change under the new backing file.
pub fn rebase(
    path: &Path,
    new_backing: &str,
    new_format: Option<Format>,
    unsafe_only: bool,
) -> Result<(), DiskError> {
    let new_name = (!new_backing.is_empty()).then(|| new_backing.to_string());
    let new_path = match &new_name {
        Some(n) => Some(resolve_backing(path, n)?),
        None => None,
    };
    let fmt = match (new_format, &new_path) {
        (Some(f), _) => Some(f),
        (None, Some(p)) if p.exists() => Some(probe(&ImageFile::open(p, false, false)?)?),
        _ => None,
    };
    if unsafe_only {
        let top = open_chain_with(
            path,
            None,
            ChainOpts {
                top_only: true,
                ..Default::default()
            },
        )?;
        let Image::Qcow2(q) = &*top else {
            return Err(DiskError::InvalidArgument(
                "rebase applies to qcow2 images only".into(),
            ));
        };
        return q.set_backing(new_name, fmt.map(|f| f.as_str().to_string()));
    }
    let top = open_chain(path, None, false, false)?;
    let Image::Qcow2(q) = &*top else {
        return Err(DiskError::InvalidArgument(
            "rebase applies to qcow2 images only".into(),
        ));
    };
    let new_base = match &new_path {
        Some(p) => {
            let b = open_chain(p, fmt, true, false)?;
            // The new chain must not contain the image itself.
            let me = std::fs::metadata(path).map_err(|e| DiskError::io(path, e))?;
            let mut cur = Some(&b);
            while let Some(l) = cur {
                if let Ok(m) = std::fs::metadata(l.path()) {
                    if m.dev() == me.dev() && m.ino() == me.ino() {
                        return Err(DiskError::BackingChain {
                            path: path.into(),
                            reason: "the new backing chain contains the image itself (a loop)"
                                .into(),
                        });
                    }
                }
                cur = l.backing();
            }
            Some(b)
        }
        None => None,
    };
    let size = top.size();
    let cs = q.cluster_size();
    let mut old = vec![0u8; cs as usize];
    let mut new = vec![0u8; cs as usize];
    let mut pos = 0;
    while pos < size {
        let (st, n) = top.layer_status(pos, size - pos)?;
        if st != LayerStatus::Unallocated {
            pos += n;
            continue;
        }
        // Inside a run the image does not map itself: compare what the old chain and
        // the new backing file show, skipping stretches where both read as zeros.
        let run_end = pos + n;
        while pos < run_end {
            let old_e = chain_status(&top, pos, run_end - pos)?;
            let (new_data, new_len) = match &new_base {
                Some(b) if pos < b.size() => {
                    let e = chain_status(b, pos, run_end - pos)?;
                    (e.data, e.length)
                }
                _ => (false, run_end - pos),
            };
            let m = old_e.length.min(new_len).max(1);
            if !old_e.data && !new_data {
                pos += m;
                continue;
            }
            let k = m.min(cs - pos % cs);
            let o = &mut old[..k as usize];
            top.read_at(o, pos)?;
            let nb = &mut new[..k as usize];
            nb.fill(0);
            if let Some(b) = &new_base {
                if pos < b.size() {
                    let avail = (b.size() - pos).min(k) as usize;
                    b.read_at(&mut nb[..avail], pos)?;
                }
            }
            if o != nb {
                top.write_at(o, pos)?;
            }
            pos += k;
        }
    }
    top.flush()?;
    q.set_backing(new_name, fmt.map(|f| f.as_str().to_string()))
}

/// Grows an image to `new_size` bytes (shrinking is refused: it would destroy data).
pub fn resize(path: &Path, new_size: u64) -> Result<(), DiskError> {
    crate::create::check_size(new_size)?;
    let img = open_chain_with(
        path,
        None,
        ChainOpts {
            top_only: true,
            ..Default::default()
        },
    )?;
    let cur = img.size();
    let new_size = if img.format() == Format::Qcow2 {
        new_size.div_ceil(512) * 512
    } else {
        new_size
    };
    if new_size < cur {
        return Err(DiskError::InvalidArgument(format!(
            "shrinking {} from {cur} to {new_size} bytes would destroy data and is not supported",
            path.display()
        )));
    }
    if new_size == cur {
        return Ok(());
    }
    grow_image(&img, new_size)
}

/// Creates options for `convert` from the CLI words.
pub fn convert_options(
    format: Format,
    cluster_size: Option<u32>,
    preallocation: Preallocation,
) -> CreateOptions {
    CreateOptions {
        format,
        size: 0,
        cluster_size,
        preallocation,
        backing: None,
    }
}

/// `dd`: copies `count` blocks of `bs` bytes (all when None) from block `skip` of the
/// input into a new image of that size (sparse: runs without data are not written).
pub fn dd(
    input: &Path,
    in_format: Option<Format>,
    output: &Path,
    out_format: Format,
    bs: u64,
    count: Option<u64>,
    skip: u64,
) -> Result<(), DiskError> {
    let src = open_chain(input, in_format, true, false)?;
    let size = src.size();
    let start = skip.checked_mul(bs).filter(|&s| s <= size).ok_or_else(|| {
        DiskError::InvalidArgument(format!("skip={skip} is past the end of the input"))
    })?;
    let mut len = size - start;
    if let Some(c) = count {
        len = len.min(c.saturating_mul(bs));
    }
    create(
        output,
        &CreateOptions {
            format: out_format,
            size: len,
            cluster_size: None,
            preallocation: Preallocation::Off,
            backing: None,
        },
    )?;
    let dst = open_chain(output, Some(out_format), false, false)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let e = chain_status(&src, start + pos, len - pos)?;
        let n = e.length.max(1).min(len - pos);
        if !e.data {
            pos += n;
            continue;
        }
        let n = n.min(buf.len() as u64);
        let b = &mut buf[..n as usize];
        src.read_at(b, start + pos)?;
        if b.iter().any(|&x| x != 0) {
            dst.write_at(b, pos)?;
        }
        pos += n;
    }
    dst.flush()
}
