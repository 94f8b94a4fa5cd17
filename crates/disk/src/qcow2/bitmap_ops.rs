//! Persistent dirty bitmaps on an open qcow2 image.
//!
//! As in QEMU: a read-write open loads every consistent bitmap, marks the enabled ones
//! in use on disk (so a crash leaves them marked, and they are then reported as
//! inconsistent and never trusted), tracks every write, discard and zero-write into the
//! enabled ones, and stores them when the image is closed: new data clusters, tables
//! and directory first, then the header extension, then the old clusters are freed.
//! A bitmap found in use when the image is opened is kept as it is until removed.

use super::bitmaps::{
    self, bit_count, encode_directory, table_entries, BitmapEntry, AUTOCLEAR_BITMAPS, EXT_BITMAPS,
    FLAG_AUTO, FLAG_IN_USE, MAX_BITMAPS, MAX_GRANULARITY_BITS, MAX_NAME, MIN_GRANULARITY_BITS,
    TABLE_OFFSET_MASK, TYPE_DIRTY_TRACKING,
};
use super::Qcow2;
use crate::file::ImageFile;
use crate::{BlockBackend, DiskError};
use serde::Serialize;
use std::sync::atomic::Ordering;

/// The most bitmap memory one bitmap may take when loaded (2^29 bits: 32 TiB at 64 KiB).
const MAX_BITMAP_BYTES: u64 = 64 << 20;

/// A bitmap as `info` and `bitmap_list` report it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// Left in use by a process that did not close the image: not to be trusted.
    pub in_use: bool,
    /// Enabled: writes are recorded in it.
    pub auto: bool,
}

pub(crate) struct Live {
    name: String,
    granularity_bits: u8,
    enabled: bool,
    bits: Vec<u64>,
}

#[derive(Default)]
pub(crate) struct BitmapState {
    /// The directory as on disk (at open or at the last store).
    disk: Vec<BitmapEntry>,
    /// Entries kept verbatim (in use at open, or of a kind we do not interpret).
    kept: Vec<BitmapEntry>,
    /// Bitmaps loaded for change (read-write opens only).
    live: Vec<Live>,
    needs_store: bool,
}

fn set_bits(bits: &mut [u64], first: u64, last: u64) {
    let mut i = first;
    while i <= last {
        let w = (i / 64) as usize;
        if w >= bits.len() {
            break;
        }
        if i.is_multiple_of(64) && last - i >= 63 {
            bits[w] = u64::MAX;
            i += 64;
        } else {
            bits[w] |= 1 << (i % 64);
            i += 1;
        }
    }
}

/// Runs of set bits as byte ranges of the disk.
fn extents(bits: &[u64], granularity_bits: u8, size: u64) -> Vec<(u64, u64)> {
    let g = 1u64 << granularity_bits;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in bits.iter().enumerate() {
        if word == 0 {
            continue;
        }
        for b in 0..64 {
            if word & (1 << b) == 0 {
                continue;
            }
            let start = (w as u64 * 64 + b) * g;
            if start >= size {
                break;
            }
            let len = g.min(size - start);
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l += len,
                _ => out.push((start, len)),
            }
        }
    }
    out
}

fn load_bits(
    f: &ImageFile,
    e: &BitmapEntry,
    size: u64,
    cs: u64,
) -> Result<Option<Vec<u64>>, DiskError> {
    let nbits = bit_count(size, e.granularity_bits);
    if e.table_size as u64 != table_entries(size, e.granularity_bits, cs)
        || nbits.div_ceil(8) > MAX_BITMAP_BYTES
    {
        return Ok(None);
    }
    let table = bitmaps::read_table(f, e, cs)?;
    let mut bytes = vec![0u8; (nbits.div_ceil(64) * 8) as usize];
    let per = cs as usize;
    for (i, &x) in table.iter().enumerate() {
        let lo = i * per;
        if lo >= bytes.len() {
            break;
        }
        let hi = (lo + per).min(bytes.len());
        let off = x & TABLE_OFFSET_MASK;
        if off != 0 {
            f.read_at(&mut bytes[lo..hi], off)?;
        } else if x & 1 != 0 {
            bytes[lo..hi].fill(0xff);
        }
    }
    let mut bits: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    // Bits past the end of the disk are not ours to report.
    if !nbits.is_multiple_of(64) {
        if let Some(last) = bits.last_mut() {
            *last &= (1u64 << (nbits % 64)) - 1;
        }
    }
    Ok(Some(bits))
}

impl Qcow2 {
    /// Reads the bitmap directory at open; read-write opens load the bitmaps and mark
    /// the enabled ones in use on disk.
    pub(super) fn open_bitmaps(&self) -> Result<(), DiskError> {
        let (h, geo) = {
            let m = self.lock();
            (m.header.clone(), m.geo)
        };
        // A directory that cannot be read gives no bitmaps (read-write opens have
        // already marked such an extension stale).
        let disk = bitmaps::read_directory(&self.file, &h).unwrap_or_default();
        let mut st = BitmapState {
            disk: disk.clone(),
            ..Default::default()
        };
        if self.read_only {
            st.kept = disk;
            *self.bitmap_state() = st;
            return Ok(());
        }
        let cs = geo.cluster_size;
        let mut marked = disk.clone();
        for (i, e) in disk.iter().enumerate() {
            let bits = if e.understood() && !e.in_use() {
                load_bits(&self.file, e, h.size, cs).ok().flatten()
            } else {
                None
            };
            match bits {
                Some(bits) => {
                    if e.auto() {
                        marked[i].flags |= FLAG_IN_USE;
                    }
                    st.live.push(Live {
                        name: e.name.clone(),
                        granularity_bits: e.granularity_bits,
                        enabled: e.auto(),
                        bits,
                    })
                }
                None => st.kept.push(e.clone()),
            }
        }
        if marked != disk {
            // Same length: only flags change, so the directory is rewritten in place.
            if let Some(Ok((_, _, off))) = bitmaps::parse_ext(&h) {
                self.file.write_at(&encode_directory(&marked), off)?;
                self.file.sync()?;
            }
            st.disk = marked;
            st.needs_store = true;
        }
        self.tracking
            .store(st.live.iter().any(|l| l.enabled), Ordering::Release);
        *self.bitmap_state() = st;
        Ok(())
    }

    fn bitmap_state(&self) -> std::sync::MutexGuard<'_, BitmapState> {
        self.bitmaps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a write of [offset, offset+len) in every enabled bitmap.
    pub(super) fn mark_dirty(&self, offset: u64, len: u64) {
        if len == 0 || !self.tracking.load(Ordering::Acquire) {
            return;
        }
        let mut st = self.bitmap_state();
        for l in st.live.iter_mut().filter(|l| l.enabled) {
            let g = l.granularity_bits;
            set_bits(&mut l.bits, offset >> g, (offset + len - 1) >> g);
        }
    }

    /// The image's bitmaps, as they are now.
    pub fn bitmap_list(&self) -> Vec<BitmapInfo> {
        let st = self.bitmap_state();
        let mut out: Vec<BitmapInfo> = st
            .live
            .iter()
            .map(|l| BitmapInfo {
                name: l.name.clone(),
                granularity: 1 << l.granularity_bits,
                in_use: false,
                auto: l.enabled,
            })
            .collect();
        out.extend(st.kept.iter().map(|e| BitmapInfo {
            name: e.name.clone(),
            granularity: 1u64 << e.granularity_bits.min(63),
            in_use: e.in_use(),
            auto: e.auto(),
        }));
        out
    }

    /// The byte ranges a bitmap marks dirty. A bitmap left in use is refused.
    pub fn bitmap_dirty_extents(&self, name: &str) -> Result<Vec<(u64, u64)>, DiskError> {
        let size = self.cur_size();
        let st = self.bitmap_state();
        if let Some(l) = st.live.iter().find(|l| l.name == name) {
            return Ok(extents(&l.bits, l.granularity_bits, size));
        }
        let e = st
            .kept
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| no_bitmap(name))?;
        if e.in_use() {
            return Err(inconsistent(self, name));
        }
        if !e.understood() {
            return Err(DiskError::Unsupported {
                path: self.file.path().into(),
                feature: format!("bitmap '{name}' of type {} or with extra data", e.kind),
            });
        }
        let bits = load_bits(&self.file, e, size, self.cluster_size)?.ok_or_else(|| {
            DiskError::Corrupt {
                path: self.file.path().into(),
                reason: format!("bitmap '{name}' does not match the disk size"),
            }
        })?;
        Ok(extents(&bits, e.granularity_bits, size))
    }

    /// Adds an empty bitmap (`granularity` None: the cluster size within 4 KiB..64 KiB).
    pub fn bitmap_add(
        &self,
        name: &str,
        granularity: Option<u64>,
        enabled: bool,
    ) -> Result<(), DiskError> {
        self.check_writable()?;
        let g = granularity.unwrap_or(self.cluster_size.clamp(4096, 65536));
        let bits = g.trailing_zeros() as u8;
        if !g.is_power_of_two() || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&bits) {
            return Err(DiskError::InvalidArgument(format!(
                "granularity {g} must be a power of two from 512 bytes to 2 GiB"
            )));
        }
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(DiskError::InvalidArgument(format!(
                "a bitmap name has 1 to {MAX_NAME} bytes"
            )));
        }
        if self.lock().header.version < 3 {
            return Err(DiskError::InvalidArgument(
                "persistent bitmaps need a version 3 (compat 1.1) image".into(),
            ));
        }
        let mut st = self.bitmap_state();
        if st.live.iter().any(|l| l.name == name) || st.kept.iter().any(|e| e.name == name) {
            return Err(DiskError::InvalidArgument(format!(
                "Bitmap already exists: {name}"
            )));
        }
        if st.live.len() + st.kept.len() >= MAX_BITMAPS as usize {
            return Err(DiskError::InvalidArgument("too many bitmaps".into()));
        }
        let nbits = bit_count(self.cur_size(), bits);
        if nbits.div_ceil(8) > MAX_BITMAP_BYTES {
            return Err(DiskError::InvalidArgument(format!(
                "granularity {g} is too fine for this disk size"
            )));
        }
        st.live.push(Live {
            name: name.into(),
            granularity_bits: bits,
            enabled,
            bits: vec![0; nbits.div_ceil(64) as usize],
        });
        st.needs_store = true;
        self.tracking
            .store(st.live.iter().any(|l| l.enabled), Ordering::Release);
        Ok(())
    }

    pub fn bitmap_remove(&self, name: &str) -> Result<(), DiskError> {
        self.check_writable()?;
        let mut st = self.bitmap_state();
        let before = st.live.len() + st.kept.len();
        st.live.retain(|l| l.name != name);
        st.kept.retain(|e| e.name != name);
        if st.live.len() + st.kept.len() == before {
            return Err(no_bitmap(name));
        }
        st.needs_store = true;
        self.tracking
            .store(st.live.iter().any(|l| l.enabled), Ordering::Release);
        Ok(())
    }

    fn with_live<T>(&self, name: &str, f: impl FnOnce(&mut Live) -> T) -> Result<T, DiskError> {
        self.check_writable()?;
        let mut st = self.bitmap_state();
        let Some(l) = st.live.iter_mut().find(|l| l.name == name) else {
            if st.kept.iter().any(|e| e.name == name) {
                return Err(inconsistent(self, name));
            }
            return Err(no_bitmap(name));
        };
        let r = f(l);
        st.needs_store = true;
        self.tracking
            .store(st.live.iter().any(|l| l.enabled), Ordering::Release);
        Ok(r)
    }

    pub fn bitmap_clear(&self, name: &str) -> Result<(), DiskError> {
        self.with_live(name, |l| l.bits.fill(0))
    }

    pub fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<(), DiskError> {
        self.with_live(name, |l| l.enabled = enabled)
    }

    /// Marks in `dst` every range `src` marks (granularities may differ).
    pub fn bitmap_merge(&self, src: &str, dst: &str) -> Result<(), DiskError> {
        let extents = self.bitmap_dirty_extents(src)?;
        self.with_live(dst, |l| {
            let g = l.granularity_bits;
            for (s, n) in extents {
                set_bits(&mut l.bits, s >> g, (s + n - 1) >> g);
            }
        })
    }

    /// Before a resize: QEMU refuses it while a bitmap cannot follow the new size (one
    /// left in use by a crash, or of a kind not loaded).
    pub(super) fn bitmaps_allow_resize(&self, new_size: u64) -> Result<(), DiskError> {
        let st = self.bitmap_state();
        if let Some(e) = st.kept.first() {
            return Err(DiskError::InvalidArgument(if e.in_use() {
                format!(
                    "Bitmap '{}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk",
                    e.name
                )
            } else {
                "Cannot resize qcow2 with persistent bitmaps that are not loaded".into()
            }));
        }
        for l in &st.live {
            if bit_count(new_size, l.granularity_bits).div_ceil(8) > MAX_BITMAP_BYTES {
                return Err(DiskError::InvalidArgument(format!(
                    "bitmap '{}' would be too large for the new size; remove it or use a coarser granularity",
                    l.name
                )));
            }
        }
        Ok(())
    }

    /// After a resize: every loaded bitmap covers the new size (new bits clean).
    pub(super) fn resize_bitmaps(&self, new_size: u64) {
        let mut st = self.bitmap_state();
        if st.live.is_empty() {
            return;
        }
        for l in st.live.iter_mut() {
            let words = bit_count(new_size, l.granularity_bits).div_ceil(64) as usize;
            l.bits.resize(words, 0);
        }
        st.needs_store = true;
    }

    /// Writes the bitmaps back and clears their in-use flags (at close).
    pub(crate) fn store_bitmaps(&self) -> Result<(), DiskError> {
        if self.read_only || !self.bitmap_state().needs_store {
            return Ok(());
        }
        self.flush()?;
        let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let mut st = self.bitmap_state();
        let mut meta = self.lock();
        let f = &self.file;
        let cs = self.cluster_size;
        let size = meta.header.size;
        let mut dir: Vec<BitmapEntry> = Vec::new();
        for l in &st.live {
            let entries = table_entries(size, l.granularity_bits, cs);
            let bytes: Vec<u8> = l.bits.iter().flat_map(|w| w.to_le_bytes()).collect();
            let mut table = vec![0u64; entries as usize];
            for (i, t) in table.iter_mut().enumerate() {
                let lo = i * cs as usize;
                let chunk = &bytes[lo.min(bytes.len())..(lo + cs as usize).min(bytes.len())];
                if chunk.iter().all(|&b| b == 0) {
                    continue;
                }
                let (c, _) = meta.alloc(f, 1)?;
                let mut data = chunk.to_vec();
                data.resize(cs as usize, 0);
                f.write_at(&data, c * cs)?;
                *t = c * cs;
            }
            let tclusters = (entries * 8).div_ceil(cs).max(1);
            let (tc, _) = meta.alloc(f, tclusters)?;
            f.write_at(&super::meta::to_be_bytes(&table), tc * cs)?;
            dir.push(BitmapEntry {
                table_offset: tc * cs,
                table_size: entries as u32,
                flags: if l.enabled { FLAG_AUTO } else { 0 },
                kind: TYPE_DIRTY_TRACKING,
                granularity_bits: l.granularity_bits,
                name: l.name.clone(),
                extra: Vec::new(),
            });
        }
        dir.extend(st.kept.iter().cloned());
        let dir_bytes = encode_directory(&dir);
        let dir_off = if dir.is_empty() {
            0
        } else {
            let (c, _) = meta.alloc(f, (dir_bytes.len() as u64).div_ceil(cs))?;
            f.write_at(&dir_bytes, c * cs)?;
            c * cs
        };
        // New clusters and their refcounts are durable before the header points at them.
        meta.writeback(f)?;
        f.sync()?;
        let mut h = meta.header.clone();
        let old_ext = bitmaps::parse_ext(&h).and_then(|r| r.ok());
        h.other_extensions.retain(|(t, _)| *t != EXT_BITMAPS);
        if dir.is_empty() {
            h.autoclear_features &= !AUTOCLEAR_BITMAPS;
        } else {
            h.other_extensions.insert(
                0,
                (
                    EXT_BITMAPS,
                    bitmaps::ext_bytes(dir.len() as u32, dir_bytes.len() as u64, dir_off),
                ),
            );
            h.autoclear_features |= AUTOCLEAR_BITMAPS;
        }
        let header_bytes = h.serialize().map_err(DiskError::InvalidArgument)?;
        f.write_at(&header_bytes, 0)?;
        f.sync()?;
        meta.header = h;
        // The old directory, tables and data clusters of every bitmap not kept as is.
        if let Some((_, dsize, doff)) = old_ext {
            if dsize > 0 {
                meta.free_later(doff / cs, dsize.div_ceil(cs));
            }
        }
        for e in st.disk.iter().filter(|e| !st.kept.contains(e)) {
            if let Ok(t) = bitmaps::read_table(f, e, cs) {
                for x in t {
                    let d = x & TABLE_OFFSET_MASK;
                    if d != 0 {
                        meta.free_later(d / cs, 1);
                    }
                }
            }
            meta.free_later(
                e.table_offset / cs,
                (e.table_size as u64 * 8).div_ceil(cs).max(1),
            );
        }
        meta.writeback(f)?;
        meta.apply_frees(f)?;
        f.sync()?;
        st.disk = dir;
        st.needs_store = false;
        Ok(())
    }
}

fn no_bitmap(name: &str) -> DiskError {
    DiskError::InvalidArgument(format!("Dirty bitmap '{name}' not found"))
}

fn inconsistent(q: &Qcow2, name: &str) -> DiskError {
    DiskError::Corrupt {
        path: q.file.path().into(),
        reason: format!(
            "bitmap '{name}' is inconsistent (left in use by a process that did not close the image); remove it"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{extents, set_bits};

    #[test]
    fn bits_and_extents() {
        let mut b = vec![0u64; 4];
        set_bits(&mut b, 3, 70);
        set_bits(&mut b, 200, 1000);
        assert_eq!(
            extents(&b, 9, 256 * 512),
            vec![(3 * 512, 68 * 512), (200 * 512, 56 * 512)]
        );
    }
}
