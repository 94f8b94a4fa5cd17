//! The read and write paths of qcow2 images.

use super::header::INCOMPAT_CORRUPT;
use super::meta::Mapping;
use super::Qcow2;
use crate::DiskError;

impl Qcow2 {
    pub(super) fn read_impl(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.check_range(offset, buf.len() as u64)?;
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let mut done = 0usize;
        let cs = self.cluster_size;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_c = pos & (cs - 1);
            let remaining = (buf.len() - done) as u64;
            // Merge clusters that map contiguously into one host read.
            let (m, mut n) = {
                let mut meta = self.lock();
                let m = meta.lookup(&self.file, pos >> self.cluster_bits)?;
                let mut n = (cs - in_c).min(remaining);
                while n < remaining {
                    let next = meta.lookup(&self.file, (pos + n) >> self.cluster_bits)?;
                    let cont = match (m, next) {
                        (Mapping::Data { host: h0, .. }, Mapping::Data { host: h, .. }) => {
                            h == h0 + in_c + n
                        }
                        (Mapping::Unallocated, Mapping::Unallocated) => true,
                        (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
                        _ => false,
                    };
                    if !cont {
                        break;
                    }
                    n += cs.min(remaining - n);
                }
                (m, n)
            };
            n = n.min(remaining);
            let chunk = &mut buf[done..done + n as usize];
            match m {
                Mapping::Unallocated => self.read_backing(chunk, pos)?,
                Mapping::Zero { .. } => chunk.fill(0),
                Mapping::Data { host, .. } => self.file.read_at(chunk, host + in_c)?,
                Mapping::Compressed { host, len } => {
                    let c = self.decompress(host, len)?;
                    chunk.copy_from_slice(&c[in_c as usize..(in_c + n) as usize]);
                }
            }
            done += n as usize;
        }
        Ok(())
    }

    pub(super) fn write_impl(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let cs = self.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let gc = pos >> self.cluster_bits;
            let in_c = pos & (cs - 1);
            let remaining = (buf.len() - done) as u64;
            let first = (cs - in_c).min(remaining);
            let mut meta = self.lock_settled(gc);
            let m = meta.lookup(&self.file, gc)?;
            if let Mapping::Data { host, copied: true } = m {
                self.ensure_not_metadata(&meta, host)?;
                // Extend over following clusters that are mapped right after this one.
                let mut n = first;
                while n < remaining {
                    let next = (pos + n) >> self.cluster_bits;
                    if meta.inflight.contains(&next) {
                        break;
                    }
                    match meta.lookup(&self.file, next)? {
                        Mapping::Data {
                            host: h,
                            copied: true,
                        } if h == host + in_c + n => {
                            self.ensure_not_metadata(&meta, h)?;
                            n += cs.min(remaining - n);
                        }
                        _ => break,
                    }
                }
                drop(meta);
                self.file
                    .write_at(&buf[done..done + n as usize], host + in_c)?;
                done += n as usize;
                continue;
            }
            self.allocating_write(meta, gc, in_c, &buf[done..done + first as usize], m)?;
            done += first as usize;
        }
        Ok(())
    }

    /// Metadata found inconsistent while the image is open read-write: set the header's
    /// corrupt bit (as QEMU does) so that nothing writes to it again before a repair.
    pub(super) fn note_corruption(&self, e: DiskError) -> DiskError {
        if let DiskError::Corrupt { .. } = e {
            if !self.read_only {
                let mut meta = self.lock();
                if meta.header.version >= 3
                    && meta.header.incompatible_features & INCOMPAT_CORRUPT == 0
                {
                    let bits = meta.header.incompatible_features | INCOMPAT_CORRUPT;
                    if self
                        .file
                        .write_at(&bits.to_be_bytes(), 72)
                        .and_then(|()| self.file.sync())
                        .is_ok()
                    {
                        meta.header.incompatible_features = bits;
                    }
                }
            }
        }
        e
    }
}
