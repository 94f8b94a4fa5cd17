//! Whole-image maintenance on an open qcow2 image: finishing creation (preallocation),
//! growing, emptying (commit), rewriting the backing file name, clearing repair bits.

use super::header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::meta::{Mapping, COPIED};
use super::Qcow2;
use crate::{BlockBackend, DiskError};

impl Qcow2 {
    /// Drops every mapping of this layer (used by commit to empty the overlay).
    pub fn make_empty(&self) -> Result<(), DiskError> {
        self.check_writable()?;
        {
            let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
            let mut meta = self.lock();
            let clusters = self.cur_size().div_ceil(self.cluster_size);
            let per = meta.geo.l2_entries;
            // Only the ranges that have an L2 table can hold mappings.
            let mapped: Vec<u64> = (0..meta.l1_len() as u64)
                .filter(|&i| meta.l2_entry_exists(i * per))
                .collect();
            for gc in mapped
                .into_iter()
                .flat_map(|i| i * per..((i + 1) * per).min(clusters))
            {
                let m = meta.lookup(&self.file, gc)?;
                if m == Mapping::Unallocated {
                    continue;
                }
                if let Some((first, n)) = m.host_clusters(&meta.geo) {
                    meta.free_later(first, n);
                }
                meta.set_l2_entry(&self.file, gc, 0)?;
            }
        }
        self.flush()
    }

    /// Grows the virtual size (the L1 table moves if it must).
    pub fn grow(&self, new_size: u64) -> Result<(), DiskError> {
        self.check_writable()?;
        self.bitmaps_allow_resize(new_size)?;
        let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let mut meta = self.lock();
        let entries = Header::l1_entries_for(new_size, self.cluster_bits);
        if entries > meta.l1_len() as u64 {
            meta.grow_l1(&self.file, entries)?;
        }
        meta.writeback(&self.file)?;
        self.file.sync()?;
        self.file.write_at(&new_size.to_be_bytes(), 24)?;
        self.file.sync()?;
        meta.header.size = new_size;
        drop(meta);
        // Bitmaps cover the new size before any write can reach it.
        self.resize_bitmaps(new_size);
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Rewrites the header cluster with a new backing file name and format.
    pub fn set_backing(
        &self,
        name: Option<String>,
        format: Option<String>,
    ) -> Result<(), DiskError> {
        self.check_writable()?;
        self.flush()?;
        let mut meta = self.lock();
        let mut h = meta.header.clone();
        h.backing_file = name;
        h.backing_format = format;
        let bytes = h.serialize().map_err(DiskError::InvalidArgument)?;
        self.file.write_at(&bytes, 0)?;
        self.file.sync()?;
        meta.header = h;
        Ok(())
    }

    /// Completes a freshly created image: refcounts for the L1 clusters the first
    /// refcount block could not cover, then the requested preallocation.
    pub(crate) fn finish_create(
        &self,
        counted: u64,
        used: u64,
        prealloc: crate::Preallocation,
    ) -> Result<(), DiskError> {
        use crate::Preallocation as P;
        let cs = self.cluster_size;
        let mut meta = self.lock();
        for c in counted..used {
            meta.set_refcount(&self.file, c, 1)?;
        }
        if prealloc == P::Off {
            return meta.writeback(&self.file);
        }
        let clusters = self.cur_size().div_ceil(cs);
        let per = meta.geo.l2_entries;
        let mut gc = 0;
        let mut data_runs = Vec::new();
        while gc < clusters {
            let n = (per - gc % per).min(clusters - gc);
            // Allocate the L2 table first so that its data clusters follow it.
            meta.set_l2_entry(&self.file, gc, 0)?;
            let (first, _) = meta.alloc(&self.file, n)?;
            for i in 0..n {
                meta.set_l2_entry(
                    &self.file,
                    gc + i,
                    ((first + i) << self.cluster_bits) | COPIED,
                )?;
            }
            data_runs.push((first << self.cluster_bits, n * cs));
            gc += n;
        }
        meta.writeback(&self.file)?;
        let end = meta.end * cs;
        drop(meta);
        for (off, len) in data_runs {
            match prealloc {
                P::Falloc => self.file.allocate(off, len)?,
                P::Full => self.file.write_zeros(off, len)?,
                _ => {}
            }
        }
        if self.file.len()? < end {
            self.file.set_len(end)?;
        }
        Ok(())
    }

    /// Clears the dirty and corrupt bits after a successful repair.
    pub(crate) fn clear_repair_bits(&self) -> Result<(), DiskError> {
        self.check_writable()?;
        let mut meta = self.lock();
        if meta.header.version < 3 {
            return Ok(());
        }
        let bits = meta.header.incompatible_features & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
        if bits != meta.header.incompatible_features {
            self.file.sync()?;
            self.file.write_at(&bits.to_be_bytes(), 72)?;
            self.file.sync()?;
            meta.header.incompatible_features = bits;
        }
        Ok(())
    }
}
