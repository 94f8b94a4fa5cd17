//! In-memory qcow2 metadata: the L1 table, cached L2 tables and refcount blocks,
//! the cluster allocator, and ordered write-back.
//!
//! Crash-consistency rule: on disk, a cluster's refcount is raised before any table
//! points at it, and lowered only after no table points at it any more. Metadata
//! changes live in memory until write-back, which writes refcount blocks (then the
//! refcount table), L2 tables, then the L1 table, with an fdatasync between the stages.
//! Freed clusters stay referenced until the tables that dropped them are durable,
//! so a crash at any point leaves at worst leaked clusters.

use super::header::Header;
use crate::file::ImageFile;
use crate::DiskError;
use std::collections::HashMap;

pub const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const RT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO: u64 = 1;

/// Upper bound for the bytes kept in each metadata cache before write-back and eviction.
const CACHE_BYTES: u64 = 32 << 20;

/// Test hook: a smaller cache limit, so that tests exercise eviction.
pub const CACHE_ENV: &str = "FERROVIRT_DISK_CACHE_BYTES";

fn cache_bytes() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var(CACHE_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(CACHE_BYTES)
    })
}

#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    pub l2_entries: u64,
    pub refcount_order: u32,
    pub rc_per_block: u64,
}

impl Geometry {
    pub fn new(h: &Header) -> Geometry {
        let cs = h.cluster_size();
        Geometry {
            cluster_bits: h.cluster_bits,
            cluster_size: cs,
            l2_entries: cs / 8,
            refcount_order: h.refcount_order,
            rc_per_block: (cs * 8) >> h.refcount_order,
        }
    }

    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.refcount_order)) - 1
        }
    }
}

/// What an L2 entry says about one guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster kept for later writes.
    Zero {
        host: Option<u64>,
    },
    Data {
        host: u64,
        copied: bool,
    },
    Compressed {
        host: u64,
        len: u64,
    },
}

impl Mapping {
    pub fn decode(entry: u64, geo: &Geometry) -> Mapping {
        if entry & COMPRESSED != 0 {
            let shift = 62 - (geo.cluster_bits - 8);
            let host = entry & ((1u64 << shift) - 1);
            let sectors = (entry >> shift) & ((1u64 << (geo.cluster_bits - 8)) - 1);
            let len = (sectors + 1) * 512 - (host & 511);
            return Mapping::Compressed { host, len };
        }
        let host = entry & L2_OFFSET_MASK;
        if entry & ZERO != 0 {
            return Mapping::Zero {
                host: (host != 0).then_some(host),
            };
        }
        if host == 0 {
            return Mapping::Unallocated;
        }
        Mapping::Data {
            host,
            copied: entry & COPIED != 0,
        }
    }

    /// Host clusters this entry holds a reference to (first cluster index, count).
    pub fn host_clusters(&self, geo: &Geometry) -> Option<(u64, u64)> {
        match *self {
            Mapping::Data { host, .. } | Mapping::Zero { host: Some(host) } => {
                Some((host >> geo.cluster_bits, 1))
            }
            Mapping::Compressed { host, len } => {
                let first = host >> geo.cluster_bits;
                let last = (host + len - 1) >> geo.cluster_bits;
                Some((first, last - first + 1))
            }
            _ => None,
        }
    }
}

struct Table {
    entries: Vec<u64>,
    dirty: bool,
}

struct Block {
    bytes: Vec<u8>,
    dirty: bool,
}

pub struct Meta {
    pub header: Header,
    pub geo: Geometry,
    pub l1: Vec<u64>,
    l1_dirty: Option<(usize, usize)>,
    l2: HashMap<u64, Table>,
    rt: Vec<u64>,
    rt_dirty: bool,
    rt_moved: bool,
    rb: HashMap<u64, Block>,
    pub pending_free: Vec<u64>,
    /// Guest clusters whose allocating write is filling its new host cluster.
    pub inflight: std::collections::HashSet<u64>,
    free_hint: u64,
    /// First cluster index past everything in the file or allocated so far.
    pub end: u64,
    /// Clusters at or past this index were never written: they read as zeros.
    fresh_from: u64,
    /// The internal snapshots, as the snapshot table lists them.
    pub snapshots: Vec<super::snapshot::Snapshot>,
}

pub fn rc_get(block: &[u8], idx: u64, order: u32) -> u64 {
    let i = idx as usize;
    match order {
        0..=3 => {
            let bits = 1usize << order;
            let bit = i * bits;
            ((block[bit / 8] >> (bit % 8)) as u64) & ((1u64 << bits) - 1)
        }
        4 => u16::from_be_bytes([block[i * 2], block[i * 2 + 1]]) as u64,
        5 => u32::from_be_bytes(block[i * 4..i * 4 + 4].try_into().unwrap_or([0; 4])) as u64,
        _ => u64::from_be_bytes(block[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8])),
    }
}

pub fn rc_set(block: &mut [u8], idx: u64, order: u32, value: u64) {
    let i = idx as usize;
    match order {
        0..=3 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            block[bit / 8] = (block[bit / 8] & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
        4 => block[i * 2..i * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[i * 4..i * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[i * 8..i * 8 + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

pub fn be_u64s(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

pub fn to_be_bytes(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|e| e.to_be_bytes()).collect()
}

impl Meta {
    pub fn load(f: &ImageFile, header: Header) -> Result<Meta, DiskError> {
        let geo = Geometry::new(&header);
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        f.read_at(&mut l1_bytes, header.l1_table_offset)?;
        let l1 = be_u64s(&l1_bytes);
        let mut rt_bytes =
            vec![0u8; (header.refcount_table_clusters as u64 * geo.cluster_size) as usize];
        f.read_at(&mut rt_bytes, header.refcount_table_offset)?;
        let rt = be_u64s(&rt_bytes);
        let end = f.len()?.div_ceil(geo.cluster_size);
        let snapshots = super::snapshot::read_table(
            f,
            header.snapshots_offset,
            header.nb_snapshots,
            geo.cluster_size,
            header.version,
        )?;
        Ok(Meta {
            snapshots,
            header,
            geo,
            l1,
            l1_dirty: None,
            l2: HashMap::new(),
            rt,
            rt_dirty: false,
            rt_moved: false,
            rb: HashMap::new(),
            pending_free: Vec::new(),
            inflight: std::collections::HashSet::new(),
            free_hint: 0,
            end,
            fresh_from: end,
        })
    }

    fn corrupt(&self, f: &ImageFile, reason: String) -> DiskError {
        DiskError::Corrupt {
            path: f.path().to_path_buf(),
            reason,
        }
    }

    /// A metadata or data cluster offset read from a table must be aligned, past the
    /// header, and inside the file.
    pub fn check_host(&self, f: &ImageFile, what: &str, host: u64) -> Result<(), DiskError> {
        if !host.is_multiple_of(self.geo.cluster_size) || host < self.geo.cluster_size {
            return Err(self.corrupt(
                f,
                format!("{what} offset {host:#x} is unaligned or points into the header"),
            ));
        }
        if host >> self.geo.cluster_bits >= self.end {
            return Err(self.corrupt(
                f,
                format!("{what} offset {host:#x} is past the end of the file"),
            ));
        }
        Ok(())
    }

    fn l2_table(&mut self, f: &ImageFile, l2_off: u64) -> Result<&mut Table, DiskError> {
        if !self.l2.contains_key(&l2_off) {
            self.check_host(f, "L2 table", l2_off)?;
            self.maybe_evict(f)?;
            let mut bytes = vec![0u8; self.geo.cluster_size as usize];
            f.read_at(&mut bytes, l2_off)?;
            self.l2.insert(
                l2_off,
                Table {
                    entries: be_u64s(&bytes),
                    dirty: false,
                },
            );
        }
        self.l2
            .get_mut(&l2_off)
            .ok_or_else(|| DiskError::InvalidArgument("L2 cache lost an entry".into()))
    }

    /// The raw L2 entry for a guest cluster (0 when no L2 table exists).
    pub fn l2_entry(&mut self, f: &ImageFile, guest_cluster: u64) -> Result<u64, DiskError> {
        let l1_idx = (guest_cluster / self.geo.l2_entries) as usize;
        let Some(&l1e) = self.l1.get(l1_idx) else {
            return Ok(0);
        };
        let l2_off = l1e & L1_OFFSET_MASK;
        if l2_off == 0 {
            return Ok(0);
        }
        let idx = (guest_cluster % self.geo.l2_entries) as usize;
        Ok(self.l2_table(f, l2_off)?.entries[idx])
    }

    /// Whether the L1 table points at an L2 table for this guest cluster.
    pub fn l2_entry_exists(&self, guest_cluster: u64) -> bool {
        let l1_idx = (guest_cluster / self.geo.l2_entries) as usize;
        self.l1.get(l1_idx).is_some_and(|e| e & L1_OFFSET_MASK != 0)
    }

    pub fn lookup(&mut self, f: &ImageFile, guest_cluster: u64) -> Result<Mapping, DiskError> {
        let e = self.l2_entry(f, guest_cluster)?;
        let m = Mapping::decode(e, &self.geo);
        match m {
            Mapping::Data { host, .. } | Mapping::Zero { host: Some(host) } => {
                self.check_host(f, "data cluster", host)?
            }
            Mapping::Compressed { host, .. }
                if host >> self.geo.cluster_bits >= self.end || host < self.geo.cluster_size =>
            {
                return Err(self.corrupt(
                    f,
                    format!("compressed cluster offset {host:#x} is outside the file"),
                ))
            }
            _ => {}
        }
        Ok(m)
    }

    /// Sets the L2 entry of a guest cluster, allocating the L2 table if needed.
    pub fn set_l2_entry(
        &mut self,
        f: &ImageFile,
        guest_cluster: u64,
        entry: u64,
    ) -> Result<(), DiskError> {
        let l1_idx = (guest_cluster / self.geo.l2_entries) as usize;
        if l1_idx >= self.l1.len() {
            return Err(DiskError::InvalidArgument(format!(
                "guest cluster {guest_cluster} is beyond the L1 table"
            )));
        }
        let mut l2_off = self.l1[l1_idx] & L1_OFFSET_MASK;
        if l2_off != 0 && self.l1[l1_idx] & COPIED == 0 {
            // Shared with a snapshot: write a private copy and drop our reference to
            // the shared one once the L1 table points at the copy.
            let entries = self.l2_table(f, l2_off)?.entries.clone();
            let (idx, _) = self.alloc(f, 1)?;
            let copy = idx << self.geo.cluster_bits;
            self.maybe_evict(f)?;
            self.l2.insert(
                copy,
                Table {
                    entries,
                    dirty: true,
                },
            );
            self.l1[l1_idx] = copy | COPIED;
            self.mark_l1_dirty(l1_idx);
            self.free_later(l2_off >> self.geo.cluster_bits, 1);
            l2_off = copy;
        }
        if l2_off == 0 {
            let (idx, _) = self.alloc(f, 1)?;
            l2_off = idx << self.geo.cluster_bits;
            self.maybe_evict(f)?;
            self.l2.insert(
                l2_off,
                Table {
                    entries: vec![0; self.geo.l2_entries as usize],
                    dirty: true,
                },
            );
            self.l1[l1_idx] = l2_off | COPIED;
            self.mark_l1_dirty(l1_idx);
        }
        let idx = (guest_cluster % self.geo.l2_entries) as usize;
        let t = self.l2_table(f, l2_off)?;
        t.entries[idx] = entry;
        t.dirty = true;
        Ok(())
    }

    fn mark_l1_dirty(&mut self, idx: usize) {
        self.l1_dirty = Some(match self.l1_dirty {
            None => (idx, idx),
            Some((a, b)) => (a.min(idx), b.max(idx)),
        });
    }

    fn rc_block(&mut self, f: &ImageFile, off: u64) -> Result<&mut Block, DiskError> {
        if !self.rb.contains_key(&off) {
            self.check_host(f, "refcount block", off)?;
            let mut bytes = vec![0u8; self.geo.cluster_size as usize];
            f.read_at(&mut bytes, off)?;
            self.rb.insert(
                off,
                Block {
                    bytes,
                    dirty: false,
                },
            );
        }
        self.rb
            .get_mut(&off)
            .ok_or_else(|| DiskError::InvalidArgument("refcount cache lost an entry".into()))
    }

    pub fn refcount(&mut self, f: &ImageFile, cluster: u64) -> Result<u64, DiskError> {
        let rt_idx = (cluster / self.geo.rc_per_block) as usize;
        let Some(&rte) = self.rt.get(rt_idx) else {
            return Ok(0);
        };
        let off = rte & RT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let order = self.geo.refcount_order;
        let i = cluster % self.geo.rc_per_block;
        Ok(rc_get(&self.rc_block(f, off)?.bytes, i, order))
    }

    pub fn set_refcount(
        &mut self,
        f: &ImageFile,
        cluster: u64,
        value: u64,
    ) -> Result<(), DiskError> {
        if value > self.geo.max_refcount() {
            return Err(self.corrupt(
                f,
                format!(
                    "refcount of cluster {cluster} would overflow the {}-bit refcount width",
                    1 << self.geo.refcount_order
                ),
            ));
        }
        let rt_idx = (cluster / self.geo.rc_per_block) as usize;
        if rt_idx >= self.rt.len() {
            self.grow_refcount_table(f, rt_idx + 1)?;
        }
        if self.rt[rt_idx] & RT_OFFSET_MASK == 0 {
            let b = self.bump(f, 1)?;
            let off = b << self.geo.cluster_bits;
            self.rb.insert(
                off,
                Block {
                    bytes: vec![0; self.geo.cluster_size as usize],
                    dirty: true,
                },
            );
            self.rt[rt_idx] = off;
            self.rt_dirty = true;
            self.set_refcount(f, b, 1)?;
        }
        let off = self.rt[rt_idx] & RT_OFFSET_MASK;
        let order = self.geo.refcount_order;
        let i = cluster % self.geo.rc_per_block;
        let blk = self.rc_block(f, off)?;
        rc_set(&mut blk.bytes, i, order, value);
        blk.dirty = true;
        Ok(())
    }

    /// Takes `n` clusters from the end of the image (skipping any that are already
    /// referenced, e.g. leaked past the end of file) without touching refcounts.
    fn bump(&mut self, f: &ImageFile, n: u64) -> Result<u64, DiskError> {
        'search: loop {
            for i in 0..n {
                if self.refcount(f, self.end + i)? != 0 {
                    self.end += i + 1;
                    continue 'search;
                }
            }
            let first = self.end;
            self.end += n;
            return Ok(first);
        }
    }

    fn grow_refcount_table(&mut self, f: &ImageFile, min_entries: usize) -> Result<(), DiskError> {
        let cs = self.geo.cluster_size;
        let per = self.geo.rc_per_block;
        // Size the new table so that it also covers itself and the blocks it may need.
        let mut clusters = (min_entries as u64 * 8)
            .div_ceil(cs)
            .max(self.header.refcount_table_clusters as u64 + 1);
        loop {
            let entries = clusters * cs / 8;
            let needed = (self.end + clusters + 2 * (clusters + 2)).div_ceil(per) + 1;
            if entries >= needed.max(min_entries as u64) {
                break;
            }
            clusters += 1;
        }
        if clusters * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(DiskError::InvalidArgument(format!(
                "{}: the refcount table would exceed its 8 MiB limit; use a larger cluster size",
                f.path().display()
            )));
        }
        let first = self.bump(f, clusters)?;
        let old_first = self.header.refcount_table_offset >> self.geo.cluster_bits;
        let old_clusters = self.header.refcount_table_clusters as u64;
        self.rt.resize((clusters * cs / 8) as usize, 0);
        self.header.refcount_table_offset = first << self.geo.cluster_bits;
        self.header.refcount_table_clusters = clusters as u32;
        self.rt_dirty = true;
        self.rt_moved = true;
        for c in first..first + clusters {
            self.set_refcount(f, c, 1)?;
        }
        self.pending_free
            .extend(old_first..old_first + old_clusters);
        Ok(())
    }

    /// Allocates `n` contiguous clusters with refcount 1. Returns the first index and
    /// whether the clusters were never written (so they read as zeros).
    pub fn alloc(&mut self, f: &ImageFile, n: u64) -> Result<(u64, bool), DiskError> {
        let mut start = self.free_hint;
        let mut run = 0;
        let mut idx = self.free_hint;
        let mut found = None;
        while idx < self.end {
            if self.refcount(f, idx)? == 0 && idx != 0 {
                if run == 0 {
                    start = idx;
                }
                run += 1;
                if run == n {
                    found = Some(start);
                    break;
                }
            } else {
                run = 0;
            }
            idx += 1;
        }
        let (first, fresh) = match found {
            Some(s) => {
                self.free_hint = s + n;
                (s, false)
            }
            None => {
                let b = self.bump(f, n)?;
                self.free_hint = self.end;
                (b, b >= self.fresh_from)
            }
        };
        for c in first..first + n {
            self.set_refcount(f, c, 1)?;
        }
        Ok((first, fresh))
    }

    /// Queues host clusters for release once the tables that dropped them are durable.
    pub fn free_later(&mut self, first: u64, count: u64) {
        self.pending_free.extend(first..first + count);
    }

    pub fn has_dirty(&self) -> bool {
        self.rt_dirty
            || self.l1_dirty.is_some()
            || self.l2.values().any(|t| t.dirty)
            || self.rb.values().any(|b| b.dirty)
    }

    fn maybe_evict(&mut self, f: &ImageFile) -> Result<(), DiskError> {
        let limit = (cache_bytes() / self.geo.cluster_size).max(16) as usize;
        if self.l2.len() < limit && self.rb.len() < limit {
            return Ok(());
        }
        self.writeback(f)?;
        if self.l2.len() >= limit {
            self.l2.clear();
        }
        if self.rb.len() >= limit {
            self.rb.clear();
        }
        Ok(())
    }

    /// Writes every dirty table in crash-safe order; durable on return.
    pub fn writeback(&mut self, f: &ImageFile) -> Result<(), DiskError> {
        if !self.has_dirty() {
            return Ok(());
        }
        let mut blocks: Vec<u64> = self
            .rb
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(o, _)| *o)
            .collect();
        blocks.sort_unstable();
        for off in blocks {
            if let Some(b) = self.rb.get_mut(&off) {
                f.write_at(&b.bytes, off)?;
                b.dirty = false;
            }
        }
        if self.rt_dirty {
            // New refcount blocks are durable before the table points at them.
            f.sync()?;
            f.write_at(&to_be_bytes(&self.rt), self.header.refcount_table_offset)?;
            if self.rt_moved {
                f.sync()?;
                let mut fields = [0u8; 12];
                fields[..8].copy_from_slice(&self.header.refcount_table_offset.to_be_bytes());
                fields[8..].copy_from_slice(&self.header.refcount_table_clusters.to_be_bytes());
                f.write_at(&fields, 48)?;
                self.rt_moved = false;
            }
            self.rt_dirty = false;
        }
        // One barrier: refcounts and the data of new clusters are durable before any
        // table points at them.
        f.sync()?;
        let mut tables: Vec<u64> = self
            .l2
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(o, _)| *o)
            .collect();
        tables.sort_unstable();
        for off in tables {
            if let Some(t) = self.l2.get_mut(&off) {
                f.write_at(&to_be_bytes(&t.entries), off)?;
                t.dirty = false;
            }
        }
        if let Some((a, b)) = self.l1_dirty.take() {
            f.sync()?;
            // Whole 512-byte sectors around the changed entries.
            let first = a / 64 * 64;
            let last = ((b / 64 + 1) * 64).min(self.l1.len());
            f.write_at(
                &to_be_bytes(&self.l1[first..last]),
                self.header.l1_table_offset + first as u64 * 8,
            )?;
        }
        // Callers that promise durability (flush) sync after this; eviction needs only the order.
        Ok(())
    }

    /// Drops the references queued by `free_later`; call only after `writeback`, with
    /// no data I/O in flight (the freed clusters may be reused right after).
    pub fn apply_frees(&mut self, f: &ImageFile) -> Result<(), DiskError> {
        if self.pending_free.is_empty() {
            return Ok(());
        }
        // The tables that dropped these clusters must be durable first.
        f.sync()?;
        let mut frees = std::mem::take(&mut self.pending_free);
        frees.sort_unstable();
        let mut released = Vec::new();
        for &c in &frees {
            let rc = self.refcount(f, c)?;
            if rc == 0 {
                continue;
            }
            self.set_refcount(f, c, rc - 1)?;
            if rc == 1 {
                released.push(c);
                self.free_hint = self.free_hint.min(c);
            }
        }
        self.writeback(f)?;
        // Give the host blocks back, in runs.
        let mut i = 0;
        while i < released.len() {
            let mut j = i + 1;
            while j < released.len() && released[j] == released[j - 1] + 1 {
                j += 1;
            }
            let off = released[i] << self.geo.cluster_bits;
            f.release(off, (j - i) as u64 * self.geo.cluster_size)?;
            i = j;
        }
        Ok(())
    }

    /// Replaces the L1 table with a larger one (for resize); durable on return.
    pub fn grow_l1(&mut self, f: &ImageFile, entries: u64) -> Result<(), DiskError> {
        if entries * 8 > super::header::MAX_L1_BYTES {
            return Err(DiskError::InvalidArgument(
                "the new size needs an L1 table above the 32 MiB limit; use a larger cluster size"
                    .into(),
            ));
        }
        let cs = self.geo.cluster_size;
        let have_clusters = (self.header.l1_size as u64 * 8).div_ceil(cs);
        let need_clusters = (entries * 8).div_ceil(cs);
        self.l1.resize(entries as usize, 0);
        if need_clusters > have_clusters || self.header.l1_table_offset == 0 {
            let (first, _) = self.alloc(f, need_clusters)?;
            let mut bytes = to_be_bytes(&self.l1);
            bytes.resize((need_clusters * cs) as usize, 0);
            self.writeback(f)?;
            f.sync()?;
            f.write_at(&bytes, first << self.geo.cluster_bits)?;
            f.sync()?;
            let old = self.header.l1_table_offset >> self.geo.cluster_bits;
            let mut fields = [0u8; 12];
            fields[..4].copy_from_slice(&(entries as u32).to_be_bytes());
            fields[4..].copy_from_slice(&(first << self.geo.cluster_bits).to_be_bytes());
            f.write_at(&fields, 36)?;
            f.sync()?;
            if self.header.l1_table_offset != 0 {
                self.free_later(old, have_clusters);
            }
            self.header.l1_table_offset = first << self.geo.cluster_bits;
        } else {
            self.writeback(f)?;
            f.sync()?;
            let mut bytes = to_be_bytes(&self.l1);
            bytes.resize((need_clusters * cs) as usize, 0);
            f.write_at(&bytes, self.header.l1_table_offset)?;
            f.sync()?;
            f.write_at(&(entries as u32).to_be_bytes(), 36)?;
            f.sync()?;
        }
        self.header.l1_size = entries as u32;
        Ok(())
    }

    pub fn l1_len(&self) -> usize {
        self.l1.len()
    }

    /// Forgets all cached tables (after an external rewrite such as repair).
    pub fn drop_caches(&mut self) {
        self.l2.retain(|_, t| t.dirty);
        self.rb.retain(|_, b| b.dirty);
    }

    pub fn raise_end(&mut self, end: u64) {
        if end > self.end {
            self.end = end;
            self.fresh_from = self.fresh_from.max(end);
        }
    }

    pub fn set_free_hint(&mut self, hint: u64) {
        self.free_hint = hint;
    }

    /// An L2 table's entries, from the cache or the file (without caching it).
    pub fn read_l2(&self, f: &ImageFile, l2_off: u64) -> Result<Vec<u64>, DiskError> {
        if let Some(t) = self.l2.get(&l2_off) {
            return Ok(t.entries.clone());
        }
        let mut bytes = vec![0u8; self.geo.cluster_size as usize];
        f.read_at(&mut bytes, l2_off)?;
        Ok(be_u64s(&bytes))
    }

    /// Takes a refcount table written elsewhere (check's rebuild) as the image's.
    pub fn replace_refcount_table(&mut self, offset: u64, clusters: u32, rt: Vec<u64>, end: u64) {
        self.header.refcount_table_offset = offset;
        self.header.refcount_table_clusters = clusters;
        self.rt = rt;
        self.rb.clear();
        self.rt_dirty = false;
        self.rt_moved = false;
        self.raise_end(end);
        self.free_hint = 0;
    }

    pub fn refcount_table(&self) -> &[u64] {
        &self.rt
    }
}

#[cfg(test)]
mod tests {
    use super::{rc_get, rc_set};

    #[test]
    fn refcounts_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let entries = 512 * 8 / bits as u64;
            for i in 0..entries {
                rc_set(&mut block, i, order, (i * 7 + 1) & max);
            }
            for i in 0..entries {
                assert_eq!(
                    rc_get(&block, i, order),
                    (i * 7 + 1) & max,
                    "order {order} entry {i}"
                );
            }
        }
        // 16-bit refcounts are big-endian, as the qcow2 specification says.
        let mut b = vec![0u8; 4];
        rc_set(&mut b, 1, 4, 0x0102);
        assert_eq!(b, [0, 0, 1, 2]);
    }
}
