//! qcow2 images: read/write with copy-on-write from a backing image, zero clusters,
//! discard, compressed-cluster reads, and the block-status walk used by map/convert.

mod amend;
mod bitmap_ops;
pub mod bitmaps;
pub mod header;
mod io;
mod maintain;
pub mod meta;
pub mod refs;
pub mod snapshot;
mod snapshot_ops;
mod snapshot_view;

pub use bitmap_ops::BitmapInfo;
pub use snapshot_ops::SnapshotParams;
pub use snapshot_view::SnapshotView;

use crate::file::{AlignedBuf, ImageFile};
use crate::{BlockBackend, DiskError, Image};
use header::{
    Compression, Header, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
};
use meta::{Mapping, Meta, COPIED, ZERO};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

pub struct Qcow2 {
    file: ImageFile,
    /// Virtual size; changes only when a snapshot of another size is applied.
    size: AtomicU64,
    cluster_bits: u32,
    cluster_size: u64,
    read_only: bool,
    backing: Option<Arc<Image>>,
    compression: Compression,
    meta: Mutex<Meta>,
    /// Signalled when an allocating write has mapped its cluster.
    alloc_done: Condvar,
    /// Data I/O holds this shared; making freed clusters reusable holds it exclusively,
    /// so no request in flight can land in a cluster that was handed to another one.
    gate: RwLock<()>,
    /// Persistent dirty bitmaps (see bitmap_ops).
    bitmaps: Mutex<bitmap_ops::BitmapState>,
    /// Whether any bitmap records writes (checked without the lock on every write).
    tracking: std::sync::atomic::AtomicBool,
}

/// What one layer says about a run of guest bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerStatus {
    /// Not in this layer: look in the backing image.
    Unallocated,
    Zero,
    Data {
        host: Option<u64>,
        compressed: bool,
    },
}

pub(crate) fn read_header(file: &ImageFile) -> Result<Header, DiskError> {
    let len = file.len()?;
    // Only the header cluster: its size is in the first bytes (a 2 MiB read per
    // opened file showed in commit's time when the page cache was cold).
    let mut first = [0u8; 24];
    file.read_at(&mut first, 0)?;
    let bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
    let cluster = if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
        1u64 << bits
    } else {
        2 << 20
    };
    let mut b = vec![0u8; cluster.min(len) as usize];
    file.read_at(&mut b, 0)?;
    // Parse once to learn the cluster size, then only the first cluster counts.
    let h = Header::parse(file.path(), &b, len)?;
    let cs = h.cluster_size() as usize;
    if b.len() > cs {
        b.truncate(cs);
        return Header::parse(file.path(), &b, len);
    }
    Ok(h)
}

impl Qcow2 {
    pub fn open(
        file: ImageFile,
        backing: Option<Arc<Image>>,
        read_only: bool,
        repairing: bool,
    ) -> Result<Qcow2, DiskError> {
        let mut header = read_header(&file)?;
        let path = file.path().to_path_buf();
        let known_incompat = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
        if header.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(DiskError::Unsupported {
                path,
                feature:
                    "external data files (convert the image to a standalone qcow2 with qemu-img)"
                        .into(),
            });
        }
        let unknown = header.incompatible_features & !known_incompat;
        if unknown != 0 {
            let bit = unknown.trailing_zeros() as u8;
            return Err(DiskError::Unsupported {
                path,
                feature: header.incompatible_name(bit),
            });
        }
        if !read_only && !repairing {
            if header.incompatible_features & INCOMPAT_CORRUPT != 0 {
                return Err(DiskError::Corrupt {
                    path,
                    reason: "the header's corrupt bit is set, so it cannot be opened read-write"
                        .into(),
                });
            }
            if header.incompatible_features & INCOMPAT_DIRTY != 0 {
                return Err(DiskError::Corrupt {
                    path,
                    reason: "the dirty bit is set (lazy refcounts were not written back)".into(),
                });
            }
            if header.refcount_order > 6 {
                return Err(DiskError::Unsupported {
                    path,
                    feature: "refcount width".into(),
                });
            }
        }
        if !read_only && header.autoclear_features != 0 {
            // We maintain the bitmaps extension and no other autoclear extension:
            // clearing their bits tells other software those extensions are stale.
            let keep = match bitmaps::parse_ext(&header) {
                Some(Ok(_)) if bitmaps::read_directory(&file, &header).is_ok() => {
                    bitmaps::AUTOCLEAR_BITMAPS
                }
                _ => 0,
            };
            let bits = header.autoclear_features & keep;
            if bits != header.autoclear_features {
                header.autoclear_features = bits;
                file.write_at(&bits.to_be_bytes(), 88)?;
                file.sync()?;
            }
        }
        let meta = Meta::load(&file, header)?;
        let h = &meta.header;
        let q = Qcow2 {
            size: AtomicU64::new(h.size),
            cluster_bits: h.cluster_bits,
            cluster_size: h.cluster_size(),
            compression: h.compression,
            read_only,
            backing,
            meta: Mutex::new(meta),
            alloc_done: Condvar::new(),
            file,
            gate: RwLock::new(()),
            bitmaps: Mutex::new(Default::default()),
            tracking: std::sync::atomic::AtomicBool::new(false),
        };
        q.open_bitmaps()?;
        Ok(q)
    }

    pub(crate) fn cur_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn file(&self) -> &ImageFile {
        &self.file
    }

    pub fn backing(&self) -> Option<&Arc<Image>> {
        self.backing.as_ref()
    }

    pub fn header(&self) -> Header {
        self.lock().header.clone()
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if offset.checked_add(len).is_none_or(|e| e > self.cur_size()) {
            return Err(DiskError::OutOfRange {
                offset,
                len,
                size: self.cur_size(),
            });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly {
                path: self.file.path().into(),
            });
        }
        Ok(())
    }

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        match &self.backing {
            Some(b) => {
                let bsize = b.size();
                let n = if offset >= bsize {
                    0
                } else {
                    (bsize - offset).min(buf.len() as u64) as usize
                };
                if n > 0 {
                    b.read_at(&mut buf[..n], offset)?;
                }
                buf[n..].fill(0);
                Ok(())
            }
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn decompress(&self, host: u64, len: u64) -> Result<Vec<u8>, DiskError> {
        let cs = self.cluster_size as usize;
        let len = len.min(2 * self.cluster_size) as usize;
        let mut input = vec![0u8; len];
        self.file.read_at(&mut input, host)?;
        let mut out = vec![0u8; cs];
        let corrupt = |why: String| DiskError::Corrupt {
            path: self.file.path().into(),
            reason: format!("compressed cluster at {host:#x}: {why}"),
        };
        match self.compression {
            Compression::Zlib => {
                let mut d = flate2::Decompress::new(false);
                d.decompress(&input, &mut out, flate2::FlushDecompress::Finish)
                    .map_err(|e| corrupt(e.to_string()))?;
                if d.total_out() as usize != cs {
                    return Err(corrupt(format!(
                        "inflated to {} bytes instead of {cs}",
                        d.total_out()
                    )));
                }
            }
            Compression::Zstd => {
                use std::io::Read;
                let mut src: &[u8] = &input;
                let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut src)
                    .map_err(|e| corrupt(e.to_string()))?;
                dec.read_exact(&mut out)
                    .map_err(|e| corrupt(e.to_string()))?;
            }
        }
        Ok(out)
    }

    /// Contents of a whole guest cluster as currently mapped (for copy-on-write).
    fn cluster_contents(
        &self,
        m: Mapping,
        guest_cluster: u64,
    ) -> Result<Option<AlignedBuf>, DiskError> {
        let cs = self.cluster_size as usize;
        Ok(match m {
            Mapping::Zero { .. } => None,
            Mapping::Unallocated if self.backing.is_none() => None,
            Mapping::Unallocated => {
                let mut b = AlignedBuf::zeroed(cs);
                let start = guest_cluster * self.cluster_size;
                let n = (self.cur_size() - start).min(self.cluster_size) as usize;
                self.read_backing(&mut b[..n], start)?;
                Some(b)
            }
            Mapping::Compressed { host, len } => {
                let mut b = AlignedBuf::zeroed(cs);
                b.copy_from_slice(&self.decompress(host, len)?);
                Some(b)
            }
            Mapping::Data { host, .. } => {
                let mut b = AlignedBuf::zeroed(cs);
                self.file.read_at(&mut b, host)?;
                Some(b)
            }
        })
    }

    fn ensure_not_metadata(&self, meta: &Meta, host: u64) -> Result<(), DiskError> {
        let h = &meta.header;
        let l1_end = h.l1_table_offset + h.l1_size as u64 * 8;
        let rt_end = h.refcount_table_offset + h.refcount_table_clusters as u64 * self.cluster_size;
        let hits = |s: u64, e: u64| host < e && s < host + self.cluster_size;
        if host < self.cluster_size
            || hits(h.l1_table_offset, l1_end)
            || hits(h.refcount_table_offset, rt_end)
        {
            return Err(DiskError::Corrupt {
                path: self.file.path().into(),
                reason: format!("data cluster at {host:#x} overlaps the image's metadata"),
            });
        }
        Ok(())
    }

    /// A write into a cluster that is not yet a plain data cluster of this image:
    /// reserve a host cluster, fill it (copying the old contents around the new bytes)
    /// without holding the metadata lock, then map it. Other writers to the same guest
    /// cluster wait until it is mapped.
    fn allocating_write(
        &self,
        mut meta: MutexGuard<'_, Meta>,
        guest_cluster: u64,
        in_cluster: u64,
        data: &[u8],
        m: Mapping,
    ) -> Result<(), DiskError> {
        let (host, fresh, reused) = match m {
            Mapping::Zero { host: Some(h) }
                if meta.l2_entry(&self.file, guest_cluster)? & COPIED != 0 =>
            {
                (h, false, true)
            }
            // Everything else, including clusters shared with a snapshot (Data without
            // COPIED), gets a new cluster: copy-on-write.
            _ => {
                let (i, fr) = meta.alloc(&self.file, 1)?;
                (i << self.cluster_bits, fr, false)
            }
        };
        self.ensure_not_metadata(&meta, host)?;
        meta.inflight.insert(guest_cluster);
        drop(meta);
        let filled = self.fill_cluster(guest_cluster, in_cluster, data, m, host, fresh);
        let mut meta = self.lock();
        meta.inflight.remove(&guest_cluster);
        let mapped = filled.and_then(|()| {
            // The old mapping's reference is dropped once the new one is durable.
            if !reused {
                if let Some((first, n)) = m.host_clusters(&meta.geo) {
                    meta.free_later(first, n);
                }
            }
            // On failure the reserved cluster stays counted but unused: a leak, not corruption.
            meta.set_l2_entry(&self.file, guest_cluster, host | COPIED)
        });
        drop(meta);
        self.alloc_done.notify_all();
        mapped
    }

    /// Writes a newly reserved host cluster: the new bytes plus the old contents.
    fn fill_cluster(
        &self,
        guest_cluster: u64,
        in_cluster: u64,
        data: &[u8],
        m: Mapping,
        host: u64,
        fresh: bool,
    ) -> Result<(), DiskError> {
        let cs = self.cluster_size;
        let valid = (self.cur_size() - guest_cluster * cs).min(cs);
        let full = in_cluster == 0 && data.len() as u64 >= valid;
        if fresh {
            // O_DIRECT writes that extend the file are slow (the file system serialises
            // them); reserving the cluster first makes the data write an overwrite.
            self.file.reserve_for_direct(host, cs)?;
        }
        let old = if full {
            None
        } else {
            self.cluster_contents(m, guest_cluster)?
        };
        match old {
            None if full || fresh => self.file.write_at(data, host + in_cluster),
            None => {
                let mut b = AlignedBuf::zeroed(cs as usize);
                b[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
                self.file.write_at(&b[..valid as usize], host)
            }
            Some(mut b) => {
                b[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
                self.file.write_at(&b[..valid as usize], host)
            }
        }
    }

    /// Copies a guest cluster the image does not map from the backing chain into the
    /// image (stream). A cluster the guest has written meanwhile is left alone: the
    /// check and the mapping happen under the same rules as an allocating write.
    pub(crate) fn copy_up(&self, guest_cluster: u64) -> Result<bool, DiskError> {
        self.check_writable()?;
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let mut meta = self.lock_settled(guest_cluster);
        let m = meta.lookup(&self.file, guest_cluster)?;
        if m != Mapping::Unallocated || self.backing.is_none() {
            return Ok(false);
        }
        self.allocating_write(meta, guest_cluster, 0, &[], m)?;
        Ok(true)
    }

    /// The metadata lock, once no allocating write to `guest_cluster` is in flight.
    fn lock_settled(&self, guest_cluster: u64) -> MutexGuard<'_, Meta> {
        let mut meta = self.lock();
        while meta.inflight.contains(&guest_cluster) {
            meta = self
                .alloc_done
                .wait(meta)
                .unwrap_or_else(|p| p.into_inner());
        }
        meta
    }

    /// Splits [offset, offset+len) into per-cluster pieces: (guest cluster, offset in cluster, length).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let cs = self.cluster_size;
        let bits = self.cluster_bits;
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let in_c = pos & (cs - 1);
            let n = (cs - in_c).min(end - pos);
            let item = (pos >> bits, in_c, n);
            pos += n;
            Some(item)
        })
    }

    /// Status of the run of guest bytes starting at `offset` in this layer only
    /// (runs are merged across clusters with the same status and contiguous host offsets).
    pub fn layer_status(&self, offset: u64, max_len: u64) -> Result<(LayerStatus, u64), DiskError> {
        let cs = self.cluster_size;
        let max_len = max_len.min(self.cur_size().saturating_sub(offset));
        let end = offset + max_len;
        let span = cs * (cs / 8); // guest bytes mapped by one L2 table
        let mut meta = self.lock();
        let mut first: Option<LayerStatus> = None;
        let mut len = 0;
        while offset + len < end {
            let pos = offset + len;
            let gc = pos >> self.cluster_bits;
            let in_c = pos & (cs - 1);
            let (st, n) = if meta.l2_entry_exists(gc) {
                let st = match meta.lookup(&self.file, gc)? {
                    Mapping::Unallocated => LayerStatus::Unallocated,
                    Mapping::Zero { .. } => LayerStatus::Zero,
                    Mapping::Data { host, .. } => LayerStatus::Data {
                        host: Some(host + in_c),
                        compressed: false,
                    },
                    Mapping::Compressed { .. } => LayerStatus::Data {
                        host: None,
                        compressed: true,
                    },
                };
                (st, (cs - in_c).min(end - pos))
            } else {
                // No L2 table: the whole range it would map is unallocated.
                (LayerStatus::Unallocated, (span - pos % span).min(end - pos))
            };
            match first {
                None => first = Some(st),
                Some(f) => {
                    let same = match (f, st) {
                        (
                            LayerStatus::Data {
                                host: Some(h0),
                                compressed: false,
                            },
                            LayerStatus::Data {
                                host: Some(h),
                                compressed: false,
                            },
                        ) => h == h0 + len,
                        (a, b) => a == b && !matches!(a, LayerStatus::Data { .. }),
                    };
                    if !same {
                        break;
                    }
                }
            }
            len += n;
        }
        Ok((first.unwrap_or(LayerStatus::Zero), len))
    }

    fn write_zeroes_impl(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let cs = self.cluster_size;
        let v3 = self.lock().header.version >= 3;
        for (gc, in_c, n) in self.pieces(offset, len) {
            let valid = (self.cur_size() - gc * cs).min(cs);
            let whole = in_c == 0 && n >= valid;
            let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
            let mut meta = self.lock_settled(gc);
            let m = meta.lookup(&self.file, gc)?;
            let reads_zero = matches!(m, Mapping::Zero { .. })
                || (m == Mapping::Unallocated && self.backing.is_none());
            if reads_zero && !(whole && may_unmap && matches!(m, Mapping::Zero { host: Some(_) })) {
                continue;
            }
            if whole && (v3 || self.backing.is_none()) {
                let unalloc = if self.backing.is_some() { ZERO } else { 0 };
                let entry = match m {
                    Mapping::Data { host, copied: true } if !may_unmap && v3 => {
                        host | ZERO | COPIED
                    }
                    _ => {
                        if let Some((first, count)) = m.host_clusters(&meta.geo) {
                            meta.free_later(first, count);
                        }
                        unalloc
                    }
                };
                meta.set_l2_entry(&self.file, gc, entry)?;
                continue;
            }
            drop(meta);
            drop(_g);
            let zeros = vec![0u8; n as usize];
            self.write_at(&zeros, gc * cs + in_c)?;
        }
        Ok(())
    }
}

impl BlockBackend for Qcow2 {
    fn size(&self) -> u64 {
        self.cur_size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.read_impl(buf, offset)
            .map_err(|e| self.note_corruption(e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.mark_dirty(offset, buf.len() as u64);
        self.write_impl(buf, offset)
            .map_err(|e| self.note_corruption(e))
    }

    fn flush(&self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        let has_frees = !self.lock().pending_free.is_empty();
        let _g = has_frees.then(|| self.gate.write().unwrap_or_else(|p| p.into_inner()));
        let mut meta = self.lock();
        meta.writeback(&self.file)?;
        if has_frees {
            meta.apply_frees(&self.file)?;
        }
        self.file.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.mark_dirty(offset, len);
        self.write_zeroes_impl(offset, len, true)
            .map_err(|e| self.note_corruption(e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError> {
        self.mark_dirty(offset, len);
        self.write_zeroes_impl(offset, len, may_unmap)
            .map_err(|e| self.note_corruption(e))
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if !self.read_only {
            // Best effort: callers that care call flush() (and close_bitmaps()) and see
            // their errors.
            let _ = self.store_bitmaps();
            let _ = self.flush();
        }
    }
}
