//! Block jobs on a disk in use: mirror (copy the whole chain to a new image, then
//! switch to it), active commit (merge the top overlay into its backing file, then
//! switch to the backing file) and stream (pull the backing data up into the top
//! overlay, then drop the backing file from its header).
//!
//! A [`Disk`] is the pivotable handle the writer (the VMM) uses. Mirror and commit
//! record the writes that happen while they copy (a dirty-grain set, marked after each
//! write completes, cleared by the job before it reads a grain), copy those grains
//! again until few remain, then hold the disk's gate exclusively (no request in
//! flight), copy the rest, flush the target and switch the disk to it. Stream copies
//! cluster by cluster through the image's own allocation path, which waits for and
//! yields to guest writes of the same cluster; a cluster the guest wrote is skipped.

use crate::chain::{open_chain_with, ChainOpts};
use crate::ops::chain_status;
use crate::qcow2::LayerStatus;
use crate::{create, BlockBackend, CreateOptions, DiskError, Format, Image, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

/// Size of the grains the dirty set tracks and of a copy chunk.
const GRAIN: u64 = 64 << 10;
const CHUNK: u64 = 1 << 20;
/// Dirty passes before the final, exclusive one.
const MAX_PASSES: usize = 8;
/// Below this many dirty grains the job stops the writers and finishes.
const FINAL_GRAINS: usize = 64;

/// A disk that block jobs can switch to another image while it is in use.
pub struct Disk {
    current: RwLock<Arc<Image>>,
    /// Held shared by every request and exclusively by a job's final pass and switch.
    gate: RwLock<()>,
    tracker: RwLock<Option<Arc<Tracker>>>,
}

struct Tracker {
    bits: Mutex<Vec<u64>>,
}

impl Tracker {
    fn new(size: u64) -> Tracker {
        Tracker {
            bits: Mutex::new(vec![0; size.div_ceil(GRAIN).div_ceil(64) as usize]),
        }
    }

    fn mark(&self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut b = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        for g in off / GRAIN..=(off + len - 1) / GRAIN {
            if let Some(w) = b.get_mut((g / 64) as usize) {
                *w |= 1 << (g % 64);
            }
        }
    }

    /// Takes (and clears) every dirty grain.
    fn take(&self) -> Vec<u64> {
        let mut b = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (i, w) in b.iter_mut().enumerate() {
            let mut x = std::mem::take(w);
            while x != 0 {
                let t = x.trailing_zeros() as u64;
                out.push(i as u64 * 64 + t);
                x &= x - 1;
            }
        }
        out
    }
}

/// Opens an image (and its backing chain) as a disk that jobs can work on.
pub fn open_disk(path: &Path, opts: &OpenOptions) -> Result<Arc<Disk>, DiskError> {
    let img = crate::chain::open_chain(path, opts.format, opts.read_only, opts.direct)?;
    Ok(Arc::new(Disk {
        current: RwLock::new(img),
        gate: RwLock::new(()),
        tracker: RwLock::new(None),
    }))
}

impl Disk {
    fn image(&self) -> Arc<Image> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The file the disk currently reads and writes.
    pub fn path(&self) -> PathBuf {
        self.image().path().to_path_buf()
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn mark(&self, off: u64, len: u64) {
        if let Some(t) = &*self.tracker.read().unwrap_or_else(|p| p.into_inner()) {
            t.mark(off, len);
        }
    }
}

impl BlockBackend for Disk {
    fn size(&self) -> u64 {
        self.image().size()
    }
    fn read_only(&self) -> bool {
        self.image().read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let _g = self.shared();
        self.image().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        let _g = self.shared();
        let r = self.image().write_at(buf, offset);
        // Marked after the write: a job that cleared the grain before reading it either
        // saw this write or sees the mark.
        self.mark(offset, buf.len() as u64);
        r
    }
    fn flush(&self) -> Result<(), DiskError> {
        let _g = self.shared();
        self.image().flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let _g = self.shared();
        let r = self.image().discard(offset, len);
        self.mark(offset, len);
        r
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError> {
        let _g = self.shared();
        let r = self.image().write_zeroes(offset, len, may_unmap);
        self.mark(offset, len);
        r
    }
}

/// Bytes done and bytes known to do (the total grows while writes keep coming).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobProgress {
    pub done: u64,
    pub total: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// Finished; mirror and commit have switched the disk to their target.
    Completed,
    /// Stopped on request; the disk still uses its old image.
    Cancelled,
}

#[derive(Default)]
struct JobShared {
    done: AtomicU64,
    total: AtomicU64,
    cancel: AtomicBool,
}

impl JobShared {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }
    fn add_total(&self, n: u64) {
        self.total.fetch_add(n, Ordering::AcqRel);
    }
    fn add_done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::AcqRel);
    }
}

/// A running job: poll its progress, cancel it, wait for its result.
pub struct JobHandle {
    shared: Arc<JobShared>,
    thread: Option<JoinHandle<Result<JobOutcome, DiskError>>>,
}

impl JobHandle {
    pub fn progress(&self) -> JobProgress {
        JobProgress {
            done: self.shared.done.load(Ordering::Acquire),
            total: self.shared.total.load(Ordering::Acquire),
        }
    }

    /// Asks the job to stop at its next chunk; `wait` then returns `Cancelled`.
    pub fn cancel(&self) {
        self.shared.cancel.store(true, Ordering::Release);
    }

    pub fn wait(mut self) -> Result<JobOutcome, DiskError> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => Err(DiskError::InvalidArgument(
                "the block job thread panicked".into(),
            )),
        }
    }
}

fn spawn(
    name: &str,
    f: impl FnOnce(&JobShared) -> Result<JobOutcome, DiskError> + Send + 'static,
) -> Result<JobHandle, DiskError> {
    let shared = Arc::new(JobShared::default());
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("disk-{name}"))
        .spawn(move || f(&s))
        .map_err(|e| DiskError::InvalidArgument(format!("cannot start the {name} job: {e}")))?;
    Ok(JobHandle {
        shared,
        thread: Some(thread),
    })
}

/// Copies the whole chain of `disk` into a new standalone image at `target`
/// (created with `opts`; its size is the disk's), then switches the disk to it.
pub fn start_mirror(
    disk: &Arc<Disk>,
    target: &Path,
    opts: &CreateOptions,
) -> Result<JobHandle, DiskError> {
    if disk.read_only() {
        return Err(DiskError::InvalidArgument(
            "a read-only disk cannot be mirrored".into(),
        ));
    }
    let mut o = opts.clone();
    o.size = disk.size();
    o.backing = None;
    create(target, &o)?;
    let tgt = open_chain_with(target, Some(opts.format), ChainOpts::default())?;
    let disk = disk.clone();
    spawn("mirror", move |job| copy_and_switch(&disk, tgt, false, job))
}

/// Active commit: writes the top overlay's data into its backing file while the disk
/// is in use, then switches the disk to the backing file (the overlay is left as is).
pub fn start_commit(disk: &Arc<Disk>) -> Result<JobHandle, DiskError> {
    let top = disk.image();
    let Image::Qcow2(q) = &*top else {
        return Err(DiskError::InvalidArgument(
            "a raw image has no backing file to commit into".into(),
        ));
    };
    let Some(base) = q.backing() else {
        return Err(DiskError::InvalidArgument(format!(
            "{}: the image has no backing file to commit into",
            top.path().display()
        )));
    };
    if top.read_only() {
        return Err(DiskError::InvalidArgument(
            "a read-only disk cannot be committed".into(),
        ));
    }
    if base.size() < top.size() {
        return Err(DiskError::InvalidArgument(
            "the backing file is smaller than the overlay; grow it first".into(),
        ));
    }
    // A second, writable opening of the backing file. Our own read-only opening of it
    // holds its lock, so this one takes none; the data it writes is only read through
    // the overlay until the switch.
    let tgt = open_chain_with(
        base.path(),
        Some(base.format()),
        ChainOpts {
            no_locks: true,
            ..Default::default()
        },
    )?;
    let disk = disk.clone();
    spawn("commit", move |job| copy_and_switch(&disk, tgt, true, job))
}

/// Pulls everything the backing chain holds into the top overlay, then removes the
/// backing file from the overlay's header. The disk keeps running on the overlay.
pub fn start_stream(disk: &Arc<Disk>) -> Result<JobHandle, DiskError> {
    let top = disk.image();
    let Image::Qcow2(q) = &*top else {
        return Err(DiskError::InvalidArgument(
            "a raw image has no backing file to stream from".into(),
        ));
    };
    if q.backing().is_none() {
        return Err(DiskError::InvalidArgument(format!(
            "{}: the image has no backing file to stream from",
            top.path().display()
        )));
    }
    if top.read_only() {
        return Err(DiskError::InvalidArgument(
            "a read-only disk cannot be streamed into".into(),
        ));
    }
    spawn("stream", move |job| stream(&top, job))
}

fn stream(top: &Arc<Image>, job: &JobShared) -> Result<JobOutcome, DiskError> {
    let Image::Qcow2(q) = &**top else {
        return Err(DiskError::InvalidArgument("not a qcow2 image".into()));
    };
    let Some(base) = q.backing().cloned() else {
        return Ok(JobOutcome::Completed);
    };
    let size = top.size();
    let cs = q.cluster_size();
    job.add_total(size);
    let mut pos = 0;
    while pos < size {
        if job.cancelled() {
            return Ok(JobOutcome::Cancelled);
        }
        let (st, n) = top.layer_status(pos, size - pos)?;
        let n = n.max(1).min(size - pos);
        if st == LayerStatus::Unallocated && pos < base.size() {
            // Only what the backing chain holds as data needs copying.
            let mut p = pos;
            let end = pos + n;
            while p < end {
                let e = chain_status(&base, p, end.min(base.size()).saturating_sub(p).max(1))?;
                let len = e.length.max(1).min(end - p);
                if e.data {
                    let first = p / cs;
                    let last = (p + len - 1) / cs;
                    for c in first..=last {
                        q.copy_up(c)?;
                    }
                }
                p += len;
            }
        }
        job.add_done(n);
        pos += n;
    }
    top.flush()?;
    q.set_backing(None, None)?;
    Ok(JobOutcome::Completed)
}

/// Copies the source's data into `target`, then the writes that raced with the copy,
/// then (writers stopped) the last of them, and switches the disk to `target`.
/// `commit_only_top`: copy only what the top layer maps (the target is its backing file).
fn copy_and_switch(
    disk: &Disk,
    target: Arc<Image>,
    commit_only_top: bool,
    job: &JobShared,
) -> Result<JobOutcome, DiskError> {
    let src = disk.image();
    let size = src.size();
    let tracker = Arc::new(Tracker::new(size));
    *disk.tracker.write().unwrap_or_else(|p| p.into_inner()) = Some(tracker.clone());
    let result = (|| {
        job.add_total(size);
        let mut buf = vec![0u8; CHUNK as usize];
        let mut pos = 0;
        while pos < size {
            if job.cancelled() {
                return Ok(JobOutcome::Cancelled);
            }
            let (copy, zero, n) = if commit_only_top {
                let (st, n) = src.layer_status(pos, size - pos)?;
                (
                    matches!(st, LayerStatus::Data { .. }),
                    st == LayerStatus::Zero,
                    n,
                )
            } else {
                let e = chain_status(&src, pos, size - pos)?;
                (e.data, false, e.length)
            };
            let n = n.max(1).min(size - pos);
            let n = if copy { n.min(CHUNK) } else { n };
            if copy {
                let b = &mut buf[..n as usize];
                src.read_at(b, pos)?;
                target.write_at(b, pos)?;
            } else if zero {
                target.write_zeroes(pos, n, false)?;
            }
            job.add_done(n);
            pos += n;
        }
        // Grains written while we copied, until few are left.
        for _ in 0..MAX_PASSES {
            if job.cancelled() {
                return Ok(JobOutcome::Cancelled);
            }
            let dirty = tracker.take();
            let few = dirty.len() <= FINAL_GRAINS;
            copy_grains(&src, &target, &dirty, size, commit_only_top, job)?;
            if few {
                break;
            }
        }
        // Stop the writers, copy the rest, switch.
        let _excl = disk.gate.write().unwrap_or_else(|p| p.into_inner());
        if job.cancelled() {
            return Ok(JobOutcome::Cancelled);
        }
        let dirty = tracker.take();
        copy_grains(&src, &target, &dirty, size, commit_only_top, job)?;
        src.flush()?;
        target.flush()?;
        if commit_only_top {
            // The backing file's writable opening took no locks (our read-only one held
            // them); it becomes the disk, so it locks the file as a writer before the
            // old chain lets go of it.
            let f = target.file();
            crate::lock::take_over(f.raw_fd(), f.path(), crate::lock::LockMode::Exclusive)?;
        }
        *disk.current.write().unwrap_or_else(|p| p.into_inner()) = target.clone();
        Ok(JobOutcome::Completed)
    })();
    *disk.tracker.write().unwrap_or_else(|p| p.into_inner()) = None;
    result
}

/// Copies dirty grains; for commit only the parts the top layer maps (the rest of the
/// backing file is read through its other, read-only opening and must not move).
fn copy_grains(
    src: &Arc<Image>,
    target: &Arc<Image>,
    grains: &[u64],
    size: u64,
    commit_only_top: bool,
    job: &JobShared,
) -> Result<(), DiskError> {
    let mut buf = vec![0u8; GRAIN as usize];
    job.add_total(grains.len() as u64 * GRAIN);
    for &g in grains {
        let start = g * GRAIN;
        let end = (start + GRAIN).min(size);
        let mut off = start;
        while off < end {
            let (mapped, n) = if commit_only_top {
                let (st, n) = src.layer_status(off, end - off)?;
                (st != LayerStatus::Unallocated, n.max(1).min(end - off))
            } else {
                (true, end - off)
            };
            if mapped {
                let b = &mut buf[..n as usize];
                src.read_at(b, off)?;
                if b.iter().all(|&x| x == 0) {
                    target.write_zeroes(off, n, false)?;
                } else {
                    target.write_at(b, off)?;
                }
            }
            off += n;
        }
        job.add_done(GRAIN);
    }
    Ok(())
}

/// `img stream`: pulls the backing data into FILE and drops its backing file (offline).
pub fn stream_offline(path: &Path) -> Result<(), DiskError> {
    let disk = open_disk(
        path,
        &OpenOptions {
            format: Some(Format::Qcow2),
            read_only: false,
            direct: false,
        },
    )?;
    start_stream(&disk)?.wait()?;
    disk.flush()
}
