//! An image file: positioned I/O (pread/pwrite), durability, hole punching, O_DIRECT,
//! and the test-only write-counting fault hook.

use crate::journal::{self, Event};
use crate::DiskError;
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Environment variable read by the crash-consistency tests: the process aborts right
/// before the Nth write (counted over every image file of the process) reaches the file,
/// which is how a `kill -9` at an arbitrary point looks to the image.
pub const FAULT_ENV: &str = "FERROVIRT_DISK_FAULT_AFTER_WRITES";

static WRITE_COUNT: AtomicU64 = AtomicU64::new(0);

fn fault_limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| std::env::var(FAULT_ENV).ok()?.parse().ok())
}

/// Writes counted so far by the fault hook (only counted while FAULT_ENV is set).
#[doc(hidden)]
pub fn fault_write_count() -> u64 {
    WRITE_COUNT.load(Ordering::SeqCst)
}

fn count_write() {
    if let Some(limit) = fault_limit() {
        if WRITE_COUNT.fetch_add(1, Ordering::SeqCst) + 1 >= limit {
            std::process::abort();
        }
    }
}

const DIRECT_ALIGN: usize = 4096;

pub(crate) struct ImageFile {
    path: PathBuf,
    file: File,
    /// A second descriptor opened with O_DIRECT (cache=none); used for aligned data I/O.
    direct: Option<File>,
    /// End of the range known to lie inside the file (see `reserve_for_direct`).
    reserved_end: AtomicU64,
    reserve_lock: std::sync::Mutex<()>,
    /// Set before every change to the file, cleared by a sync: a sync with nothing
    /// written since the last one is skipped.
    unsynced: std::sync::atomic::AtomicBool,
}

impl ImageFile {
    pub fn open(path: &Path, writable: bool, direct: bool) -> Result<Self, DiskError> {
        let file = FsOpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| DiskError::io(path, e))?;
        let direct = if direct {
            Some(
                FsOpenOptions::new()
                    .read(true)
                    .write(writable)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .map_err(|e| {
                        DiskError::io(
                            path,
                            std::io::Error::new(
                                e.kind(),
                                format!("cannot open with O_DIRECT (cache=none): {e}"),
                            ),
                        )
                    })?,
            )
        } else {
            None
        };
        Ok(ImageFile {
            path: path.to_path_buf(),
            file,
            direct,
            reserved_end: AtomicU64::new(0),
            reserve_lock: std::sync::Mutex::new(()),
            unsynced: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Creates or empties a file for a new image. An existing image that another
    /// process (e.g. a running VM) has open is refused, not truncated.
    pub fn create(path: &Path) -> Result<Self, DiskError> {
        if let Ok(md) = std::fs::metadata(path) {
            if !md.is_file() {
                return Err(DiskError::InvalidArgument(format!(
                    "{} exists and is not a regular file; images are created as regular files only",
                    path.display()
                )));
            }
        }
        let file = FsOpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| DiskError::io(path, e))?;
        crate::lock::lock(file.as_raw_fd(), path, crate::lock::LockMode::Exclusive)?;
        file.set_len(0).map_err(|e| DiskError::io(path, e))?;
        Ok(ImageFile {
            path: path.to_path_buf(),
            file,
            direct: None,
            reserved_end: AtomicU64::new(0),
            reserve_lock: std::sync::Mutex::new(()),
            unsynced: std::sync::atomic::AtomicBool::new(true),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn raw_fd(&self) -> std::os::unix::io::RawFd {
        self.file.as_raw_fd()
    }

    fn err(&self, e: std::io::Error) -> DiskError {
        DiskError::io(&self.path, e)
    }

    pub fn len(&self) -> Result<u64, DiskError> {
        let meta = self.file.metadata().map_err(|e| self.err(e))?;
        if meta.file_type().is_file() {
            return Ok(meta.len());
        }
        // Block devices report 0 in metadata; seeking to the end gives their size.
        // SAFETY: lseek on a valid descriptor has no memory effects.
        let end = unsafe { libc::lseek(self.file.as_raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(self.err(std::io::Error::last_os_error()));
        }
        Ok(end as u64)
    }

    /// Bytes actually allocated on the host (what `du` shows).
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    fn aligned(buf_ptr: usize, len: usize, offset: u64) -> bool {
        buf_ptr.is_multiple_of(DIRECT_ALIGN)
            && len.is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
    }

    /// Reads exactly `buf.len()` bytes; bytes past the end of the file read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let file = match &self.direct {
            Some(d) if Self::aligned(buf.as_ptr() as usize, buf.len(), offset) => d,
            _ => &self.file,
        };
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(e)),
            }
        }
        Ok(())
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        count_write();
        self.unsynced.store(true, Ordering::SeqCst);
        let file = match &self.direct {
            Some(d) if Self::aligned(buf.as_ptr() as usize, buf.len(), offset) => d,
            _ => &self.file,
        };
        file.write_all_at(buf, offset).map_err(|e| self.err(e))?;
        self.journal(Event::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    /// Test-only: the change or sync as it reached the file (see journal.rs).
    fn journal(&self, event: Event) {
        journal::record(&self.path, &event);
    }

    /// fdatasync: every completed write is durable on return.
    pub fn sync(&self) -> Result<(), DiskError> {
        // Writers set the flag before they write, so a write that completed before
        // this call is either synced here or left the flag set for this check.
        if !self.unsynced.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        if let Err(e) = self.file.sync_data() {
            self.unsynced.store(true, Ordering::SeqCst);
            return Err(self.err(e));
        }
        self.journal(Event::Sync);
        Ok(())
    }

    pub fn set_len(&self, len: u64) -> Result<(), DiskError> {
        count_write();
        self.unsynced.store(true, Ordering::SeqCst);
        self.file.set_len(len).map_err(|e| self.err(e))?;
        self.journal(Event::SetLen { len });
        Ok(())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: fallocate on a valid descriptor has no memory effects.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Gives back the host blocks of clusters no table references any more. Nobody
    /// reads them again (a reused cluster is written whole), so this need not be
    /// durable and does not make the next sync do work (an fdatasync after freeing a
    /// 256 MiB overlay cost up to half a second of journal commit here).
    /// Call only while nothing else writes the file (qcow2 callers hold the image's
    /// I/O gate exclusively and its metadata lock), or a write's flag could be lost.
    pub fn release(&self, offset: u64, len: u64) -> Result<bool, DiskError> {
        let was = self.unsynced.load(Ordering::SeqCst);
        let r = self.punch_hole(offset, len);
        if !was {
            self.unsynced.store(false, Ordering::SeqCst);
        }
        r
    }

    /// Frees the host blocks of a range (reads as zeros afterwards); false if unsupported.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<bool, DiskError> {
        if len == 0 {
            return Ok(true);
        }
        count_write();
        self.unsynced.store(true, Ordering::SeqCst);
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => {
                self.journal(Event::Zero { offset, len });
                Ok(true)
            }
            Err(e) if is_unsupported(&e) => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Zeroes a range, keeping it allocated; falls back to writing zeros.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if len == 0 {
            return Ok(());
        }
        count_write();
        self.unsynced.store(true, Ordering::SeqCst);
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => {
                self.journal(Event::Zero { offset, len });
                Ok(())
            }
            Err(e) if is_unsupported(&e) => self.write_zeros(offset, len),
            Err(e) => Err(self.err(e)),
        }
    }

    pub fn write_zeros(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// With O_DIRECT, makes sure a range lies inside the file before writing into it:
    /// O_DIRECT writes that extend a file are slow (the file system serialises them), so
    /// the file is extended with fallocate ahead of use, 1 MiB at a time. A no-op for
    /// buffered files and where fallocate is unsupported.
    pub fn reserve_for_direct(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        const AHEAD: u64 = 1 << 20;
        if self.direct.is_none() || offset + len <= self.reserved_end.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = self.reserve_lock.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.reserved_end.load(Ordering::Acquire).max(self.len()?);
        if offset + len <= cur {
            self.reserved_end.store(cur, Ordering::Release);
            return Ok(());
        }
        let new_end = (offset + len + AHEAD).div_ceil(AHEAD) * AHEAD;
        count_write();
        self.unsynced.store(true, Ordering::SeqCst);
        match self.fallocate(0, cur, new_end - cur) {
            Ok(()) => {
                self.journal(Event::Allocate {
                    offset: cur,
                    len: new_end - cur,
                });
                self.reserved_end.store(new_end, Ordering::Release)
            }
            Err(e) if is_unsupported(&e) => {}
            Err(e) => return Err(self.err(e)),
        }
        Ok(())
    }

    /// Reserves host blocks for a range (preallocation=full/falloc).
    pub fn allocate(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if len == 0 {
            return Ok(());
        }
        count_write();
        self.unsynced.store(true, Ordering::SeqCst);
        self.fallocate(0, offset, len).map_err(|e| self.err(e))?;
        self.journal(Event::Allocate { offset, len });
        Ok(())
    }
}

impl Drop for ImageFile {
    fn drop(&mut self) {
        crate::lock::unlock_all(self.file.as_raw_fd());
    }
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// A zeroed byte buffer whose start is page aligned, so that copy-on-write buffers
/// can go straight to an O_DIRECT descriptor.
pub(crate) struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let start = storage
            .as_ptr()
            .align_offset(DIRECT_ALIGN)
            .min(DIRECT_ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}
