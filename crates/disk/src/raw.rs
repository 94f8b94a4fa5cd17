//! Raw images: the file is the disk.

use crate::file::ImageFile;
use crate::{BlockBackend, DiskError};

pub struct Raw {
    file: ImageFile,
    size: u64,
    read_only: bool,
}

impl Raw {
    pub fn open(file: ImageFile, read_only: bool) -> Result<Raw, DiskError> {
        let size = file.len()?;
        Ok(Raw {
            file,
            size,
            read_only,
        })
    }

    pub fn file(&self) -> &ImageFile {
        &self.file
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> Result<(), DiskError> {
        if write && self.read_only {
            return Err(DiskError::ReadOnly {
                path: self.file.path().into(),
            });
        }
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(DiskError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Data/hole status from the host file system: (is data, run length).
    pub fn status(&self, offset: u64, max_len: u64) -> (bool, u64) {
        let end = (offset + max_len).min(self.size);
        let fd = self.file.raw_fd();
        // SAFETY: lseek on a valid descriptor has no memory effects.
        let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: only a hole remains; other errors: report data.
            let hole = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
            return (!hole, end - offset);
        }
        let data = data as u64;
        if data > offset {
            return (false, data.min(end) - offset);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        (true, hole.max(offset + 1).min(end) - offset)
    }
}

impl BlockBackend for Raw {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.check(offset, buf.len() as u64, false)?;
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.check(offset, buf.len() as u64, true)?;
        self.file.write_at(buf, offset)
    }

    fn flush(&self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check(offset, len, true)?;
        if !self.file.punch_hole(offset, len)? {
            self.file.write_zeros(offset, len)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError> {
        self.check(offset, len, true)?;
        if may_unmap && self.file.punch_hole(offset, len)? {
            return Ok(());
        }
        self.file.zero_range(offset, len)
    }
}
