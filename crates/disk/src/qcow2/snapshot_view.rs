//! A read-only view of an internal snapshot: the disk as it was when the snapshot was
//! taken (its own L1 table; clusters it does not map come from the backing chain).

use super::header::Header;
use super::meta::{Mapping, L1_OFFSET_MASK};
use super::{snapshot, Qcow2};
use crate::ops::chain_status;
use crate::{BlockBackend, DiskError, Image};
use std::sync::{Arc, Mutex};

pub struct SnapshotView {
    img: Arc<Image>,
    l1: Vec<u64>,
    size: u64,
    /// The last L2 table read (sequential reads stay within one).
    last_l2: Mutex<Option<(u64, Arc<Vec<u64>>)>>,
}

impl SnapshotView {
    /// The snapshot `id_or_name` of the qcow2 layer `img` (open read-only or not).
    pub fn open(img: Arc<Image>, id_or_name: &str) -> Result<SnapshotView, DiskError> {
        let Image::Qcow2(q) = &*img else {
            return Err(DiskError::InvalidArgument(
                "raw images have no internal snapshots".into(),
            ));
        };
        let snaps = q.snapshots();
        let (_, s) = snapshot::find(&snaps, id_or_name).ok_or_else(|| {
            DiskError::InvalidArgument(format!("no snapshot with id or name '{id_or_name}'"))
        })?;
        let size = s.disk_size.unwrap_or_else(|| q.cur_size());
        let mut l1 = q.read_l1(s.l1_table_offset, s.l1_size)?;
        // Only the disk's part of the table: the VM state area is not disk data.
        l1.truncate(Header::l1_entries_for(size, q.cluster_bits) as usize);
        Ok(SnapshotView {
            img: img.clone(),
            l1,
            size,
            last_l2: Mutex::new(None),
        })
    }

    fn q(&self) -> &Qcow2 {
        match &*self.img {
            Image::Qcow2(q) => q,
            // open() accepted qcow2 layers only.
            Image::Raw(_) => unreachable!("snapshot views are made of qcow2 layers"),
        }
    }

    fn mapping(&self, gc: u64) -> Result<Mapping, DiskError> {
        let q = self.q();
        let meta = q.lock();
        let per = meta.geo.l2_entries;
        let l2 = self
            .l1
            .get((gc / per) as usize)
            .map_or(0, |e| e & L1_OFFSET_MASK);
        if l2 == 0 {
            return Ok(Mapping::Unallocated);
        }
        let mut last = self.last_l2.lock().unwrap_or_else(|p| p.into_inner());
        let table = match &*last {
            Some((off, t)) if *off == l2 => t.clone(),
            _ => {
                meta.check_host(q.file(), "snapshot L2 table", l2)?;
                let t = Arc::new(meta.read_l2(q.file(), l2)?);
                *last = Some((l2, t.clone()));
                t
            }
        };
        let m = Mapping::decode(table[(gc % per) as usize], &meta.geo);
        if let Mapping::Data { host, .. } = m {
            meta.check_host(q.file(), "data cluster", host)?;
        }
        Ok(m)
    }

    /// Whether [pos, pos+n) holds data, for the longest n of the same answer found.
    pub fn data_status(&self, pos: u64, max_len: u64) -> Result<(bool, u64), DiskError> {
        let cs = self.q().cluster_size();
        let end = pos + max_len.min(self.size.saturating_sub(pos));
        let mut at = pos;
        let mut first: Option<bool> = None;
        while at < end {
            let gc = at / cs;
            let n = (cs - at % cs).min(end - at);
            let data = match self.mapping(gc)? {
                Mapping::Data { .. } | Mapping::Compressed { .. } => true,
                Mapping::Zero { .. } => false,
                Mapping::Unallocated => match self.q().backing() {
                    Some(b) if at < b.size() => chain_status(b, at, n)?.data,
                    _ => false,
                },
            };
            match first {
                None => first = Some(data),
                Some(f) if f != data => break,
                _ => {}
            }
            at += n;
        }
        Ok((first.unwrap_or(false), (at - pos).max(1)))
    }
}

impl BlockBackend for SnapshotView {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(DiskError::OutOfRange {
                offset,
                len: buf.len() as u64,
                size: self.size,
            });
        }
        let q = self.q();
        let cs = q.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_c = pos % cs;
            let n = ((cs - in_c) as usize).min(buf.len() - done);
            let chunk = &mut buf[done..done + n];
            match self.mapping(pos / cs)? {
                Mapping::Data { host, .. } => q.file().read_at(chunk, host + in_c)?,
                Mapping::Compressed { host, len } => {
                    let c = q.decompress(host, len)?;
                    chunk.copy_from_slice(&c[in_c as usize..in_c as usize + n]);
                }
                Mapping::Zero { .. } => chunk.fill(0),
                Mapping::Unallocated => q.read_backing(chunk, pos)?,
            }
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly {
            path: self.img.path().into(),
        })
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), DiskError> {
        self.write_at(&[], 0)
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), DiskError> {
        self.write_at(&[], 0)
    }
}
