//! Changes `qemu-img amend` makes to an open qcow2 image: the version (with zero
//! clusters expanded for version 2), the lazy-refcounts bit, the header rewrite.

use super::header::{Header, COMPAT_LAZY_REFCOUNTS, V3_HEADER_LEN};
use super::meta::{Mapping, COPIED, L1_OFFSET_MASK};
use super::Qcow2;
use crate::{BlockBackend, DiskError};

impl Qcow2 {
    /// Writes the header cluster anew from `change(header)` (padded with zeros, so no
    /// bytes of a longer old header survive); durable on return.
    pub(crate) fn rewrite_header(&self, change: impl FnOnce(&mut Header)) -> Result<(), DiskError> {
        self.check_writable()?;
        self.flush()?;
        let mut meta = self.lock();
        let mut h = meta.header.clone();
        change(&mut h);
        let mut bytes = h.serialize().map_err(DiskError::InvalidArgument)?;
        bytes.resize(self.cluster_size as usize, 0);
        self.file.write_at(&bytes, 0)?;
        self.file.sync()?;
        meta.header = h;
        Ok(())
    }

    /// Version 2 has no zero clusters: every zero entry of the active L1 table becomes
    /// unallocated (no backing file) or a cluster written with zeros, as QEMU's
    /// qcow2_expand_zero_clusters does. Zero entries in internal snapshots are refused.
    pub(crate) fn expand_zero_clusters(&self) -> Result<(), DiskError> {
        self.check_writable()?;
        let has_backing = self.lock().header.backing_file.is_some();
        {
            let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
            let mut meta = self.lock();
            let snaps = meta.snapshots.clone();
            for sn in &snaps {
                drop(meta);
                let l1 = self.read_l1(sn.l1_table_offset, sn.l1_size)?;
                meta = self.lock();
                for e in l1 {
                    let off = e & L1_OFFSET_MASK;
                    let geo = meta.geo;
                    let zero = |x: &u64| matches!(Mapping::decode(*x, &geo), Mapping::Zero { .. });
                    if off != 0 && meta.read_l2(&self.file, off)?.iter().any(zero) {
                        return Err(DiskError::InvalidArgument(format!(
                            "snapshot '{}' has zero clusters, which compat=0.10 cannot hold; delete it first",
                            sn.name
                        )));
                    }
                }
            }
            let per = meta.geo.l2_entries;
            let cs = self.cluster_size;
            let clusters = (meta.l1_len() as u64) * per;
            let mut gc = 0;
            while gc < clusters {
                if !meta.l2_entry_exists(gc) {
                    gc += per;
                    continue;
                }
                let e = meta.l2_entry(&self.file, gc)?;
                let m = Mapping::decode(e, &meta.geo);
                if matches!(m, Mapping::Zero { .. }) {
                    let new = match m {
                        Mapping::Zero { host: Some(h) } => {
                            self.file.zero_range(h, cs)?;
                            h | (e & COPIED)
                        }
                        _ if !has_backing => 0,
                        _ => {
                            let (c, _) = meta.alloc(&self.file, 1)?;
                            let h = c << self.cluster_bits;
                            // Written, not fallocated: the cluster may lie past the end.
                            self.file.write_zeros(h, cs)?;
                            h | COPIED
                        }
                    };
                    meta.set_l2_entry(&self.file, gc, new)?;
                }
                gc += 1;
            }
        }
        self.flush()
    }

    /// Turns the image into version `to` (2 or 3) as `qemu-img amend -o compat=` does.
    pub(crate) fn set_version(&self, to: u32) -> Result<(), DiskError> {
        let h = self.header();
        if h.version == to {
            return Ok(());
        }
        if to == 3 {
            if h.nb_snapshots > 0 && self.snapshots().iter().any(|s| s.disk_size.is_none()) {
                return Err(DiskError::Unsupported {
                    path: self.file.path().into(),
                    feature: "upgrading a snapshot table without disk sizes".into(),
                });
            }
            return self.rewrite_header(|h| {
                h.version = 3;
                h.header_length = V3_HEADER_LEN;
                h.refcount_order = 4;
                h.incompatible_features = 0;
                h.compatible_features = 0;
                h.autoclear_features = 0;
            });
        }
        let size = self.size();
        if self
            .snapshots()
            .iter()
            .any(|s| s.vm_state_size > u32::MAX as u64 || s.disk_size.is_some_and(|d| d != size))
        {
            return Err(DiskError::InvalidArgument(
                "Internal snapshots prevent downgrade of image".into(),
            ));
        }
        if h.refcount_order != 4 {
            return Err(DiskError::InvalidArgument(
                "compat=0.10 requires refcount_bits=16".into(),
            ));
        }
        if h.compression != super::header::Compression::Zlib {
            return Err(DiskError::InvalidArgument(
                "compat=0.10 cannot hold the zstd compression type; convert the image instead"
                    .into(),
            ));
        }
        // In-use flags of bitmaps are cleared first; QEMU keeps the extension too.
        self.store_bitmaps()?;
        self.expand_zero_clusters()?;
        self.rewrite_header(|h| {
            h.version = 2;
            h.incompatible_features = 0;
            h.compatible_features = 0;
            h.autoclear_features = 0;
            h.header_length = super::header::V2_HEADER_LEN as u32;
        })
    }

    /// Sets or clears the lazy-refcounts bit (version 3 only). Refcounts are always
    /// written eagerly here, so the bit never leaves the image dirty.
    pub(crate) fn set_lazy_refcounts(&self, on: bool) -> Result<(), DiskError> {
        let h = self.header();
        if on && h.version < 3 {
            return Err(DiskError::InvalidArgument(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into(),
            ));
        }
        if (h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0) == on {
            return Ok(());
        }
        self.rewrite_header(|h| {
            if on {
                h.compatible_features |= COMPAT_LAZY_REFCOUNTS;
            } else {
                h.compatible_features &= !COMPAT_LAZY_REFCOUNTS;
            }
        })
    }
}
