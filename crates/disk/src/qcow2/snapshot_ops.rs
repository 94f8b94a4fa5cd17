//! Internal snapshots: create, apply (revert), delete, and the VM state area.
//!
//! Every snapshot operation is one metadata transaction. The new state (active L1
//! table, the L2 tables whose COPIED flags change, snapshot L1 tables, the snapshot
//! table and a complete new refcount structure counted from the references) is written
//! into clusters that are free in the old state; then a single 48-byte write of the
//! header (virtual size, L1 table, refcount table, snapshot table) switches from the old
//! state to the new one. An interruption at any write leaves either the old image or
//! the new one, each consistent; clusters written before the switch are unreferenced
//! space that later allocations reuse.

use super::header::Header;
use super::meta::{
    be_u64s, rc_set, to_be_bytes, Mapping, Meta, COPIED, L1_OFFSET_MASK, RT_OFFSET_MASK,
};
use super::refs::{count_l2_trees, l2_multiplicity, Refs};
use super::snapshot::{self, Snapshot, MAX_SNAPSHOTS, MAX_TABLE_BYTES};
use super::Qcow2;
use crate::{BlockBackend, DiskError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

/// Upper bound on the snapshot L1 bytes read by one transaction (memory bound).
const MAX_TXN_L1_BYTES: u64 = 512 << 20;
/// Upper bound on clusters a transaction tracks (as `check`).
const MAX_TXN_CLUSTERS: u64 = 1 << 28;

/// What the caller of [`Qcow2::create_snapshot`] records with the snapshot.
#[derive(Clone, Debug, Default)]
pub struct SnapshotParams<'a> {
    pub name: &'a str,
    /// The VM state (device and RAM state of a running guest), saved with the snapshot.
    pub vm_state: Option<&'a [u8]>,
    pub vm_clock_nsec: u64,
    pub icount: Option<u64>,
}

/// A snapshot of the new state: its L1 table is either the one on disk or new entries.
struct Draft {
    snap: Snapshot,
    new_l1: Option<Vec<u64>>,
}

/// Clusters handed out by a transaction: free (refcount 0) in the old state.
struct Alloc {
    taken: BTreeSet<u64>,
    hint: u64,
}

impl Alloc {
    fn run(&mut self, meta: &mut Meta, q: &Qcow2, n: u64) -> Result<u64, DiskError> {
        let mut start = self.hint.max(1);
        let mut len = 0;
        let mut c = start;
        loop {
            if c >= MAX_TXN_CLUSTERS {
                return Err(DiskError::InvalidArgument(format!(
                    "{}: the image file is too large for a snapshot operation",
                    q.file.path().display()
                )));
            }
            if !self.taken.contains(&c) && meta.refcount(&q.file, c)? == 0 {
                if len == 0 {
                    start = c;
                }
                len += 1;
                if len == n {
                    break;
                }
            } else {
                len = 0;
            }
            c += 1;
        }
        self.taken.extend(start..start + n);
        if start == self.hint.max(1) {
            self.hint = start + n;
        }
        Ok(start)
    }
}

impl Qcow2 {
    /// The snapshots listed in the image's snapshot table.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.lock().snapshots.clone()
    }

    /// Takes an internal snapshot of the current contents (and of `vm_state` if given).
    pub fn create_snapshot(&self, p: &SnapshotParams<'_>) -> Result<Snapshot, DiskError> {
        self.check_writable()?;
        if p.name.len() > u16::MAX as usize {
            return Err(DiskError::InvalidArgument(
                "a snapshot name is at most 65535 bytes".into(),
            ));
        }
        self.transaction(|q, meta, alloc| {
            if meta.snapshots.len() as u32 >= MAX_SNAPSHOTS {
                return Err(DiskError::InvalidArgument(format!(
                    "the image already has {MAX_SNAPSHOTS} snapshots, the most qcow2 allows"
                )));
            }
            let size = meta.header.size;
            let base = Header::l1_entries_for(size, q.cluster_bits) as usize;
            let mut active = meta.l1.clone();
            // The VM state area (past the disk) belongs to snapshots, not to the active layer.
            for e in active.iter_mut().skip(base) {
                *e = 0;
            }
            let mut snap_l1: Vec<u64> = active.iter().map(|e| e & L1_OFFSET_MASK).collect();
            let vm_state_size = match p.vm_state {
                Some(state) if !state.is_empty() => {
                    q.write_vm_state(meta, alloc, &mut snap_l1, base, state)?;
                    state.len() as u64
                }
                _ => 0,
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let snap = Snapshot {
                l1_table_offset: 0,
                l1_size: snap_l1.len() as u32,
                id: snapshot::next_id(&meta.snapshots),
                name: p.name.to_string(),
                date_sec: now.as_secs() as u32,
                // Microseconds, as QEMU records the time.
                date_nsec: now.subsec_micros() * 1000,
                vm_clock_nsec: p.vm_clock_nsec,
                vm_state_size,
                disk_size: Some(size),
                icount: p.icount,
                extra_tail: Vec::new(),
            };
            let mut drafts: Vec<Draft> = meta
                .snapshots
                .iter()
                .map(|s| Draft {
                    snap: s.clone(),
                    new_l1: None,
                })
                .collect();
            drafts.push(Draft {
                snap,
                new_l1: Some(snap_l1),
            });
            Ok((active, drafts, size))
        })?;
        self.lock()
            .snapshots
            .last()
            .cloned()
            .ok_or_else(|| DiskError::InvalidArgument("snapshot table lost its entry".into()))
    }

    /// Reverts the image to a snapshot (by id, else by name). The snapshot stays.
    pub fn apply_snapshot(&self, id_or_name: &str) -> Result<Snapshot, DiskError> {
        self.check_writable()?;
        let mut applied = None;
        self.transaction(|q, meta, _| {
            let (_, s) = snapshot::find(&meta.snapshots, id_or_name).ok_or_else(|| {
                DiskError::InvalidArgument(format!("no snapshot with id or name '{id_or_name}'"))
            })?;
            let s = s.clone();
            let size = s.disk_size.unwrap_or(meta.header.size);
            let base = Header::l1_entries_for(size, q.cluster_bits) as usize;
            let mut l1 = q.read_l1(s.l1_table_offset, s.l1_size)?;
            l1.resize(l1.len().max(meta.l1.len()).max(base), 0);
            for (i, e) in l1.iter_mut().enumerate() {
                *e = if i < base { *e & L1_OFFSET_MASK } else { 0 };
            }
            let drafts = meta
                .snapshots
                .iter()
                .map(|s| Draft {
                    snap: s.clone(),
                    new_l1: None,
                })
                .collect();
            applied = Some(s);
            Ok((l1, drafts, size))
        })?;
        applied.ok_or_else(|| DiskError::InvalidArgument("no snapshot applied".into()))
    }

    /// Deletes a snapshot (by id, else by name), releasing the clusters only it used.
    pub fn delete_snapshot(&self, id_or_name: &str) -> Result<Snapshot, DiskError> {
        self.check_writable()?;
        let mut deleted = None;
        self.transaction(|_, meta, _| {
            let (idx, _) = snapshot::find(&meta.snapshots, id_or_name).ok_or_else(|| {
                DiskError::InvalidArgument(format!("no snapshot with id or name '{id_or_name}'"))
            })?;
            let mut drafts: Vec<Draft> = meta
                .snapshots
                .iter()
                .map(|s| Draft {
                    snap: s.clone(),
                    new_l1: None,
                })
                .collect();
            deleted = Some(drafts.remove(idx).snap);
            Ok((meta.l1.clone(), drafts, meta.header.size))
        })?;
        deleted.ok_or_else(|| DiskError::InvalidArgument("no snapshot deleted".into()))
    }

    /// The VM state saved with a snapshot (empty when it has none).
    pub fn read_vm_state(&self, id_or_name: &str) -> Result<Vec<u8>, DiskError> {
        let _g = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let meta = self.lock();
        let (_, s) = snapshot::find(&meta.snapshots, id_or_name).ok_or_else(|| {
            DiskError::InvalidArgument(format!("no snapshot with id or name '{id_or_name}'"))
        })?;
        let s = s.clone();
        if s.vm_state_size > 1 << 40 {
            return Err(DiskError::Corrupt {
                path: self.file.path().into(),
                reason: format!(
                    "snapshot {} claims {} bytes of VM state",
                    s.id, s.vm_state_size
                ),
            });
        }
        let size = s.disk_size.unwrap_or(meta.header.size);
        let geo = meta.geo;
        let l1 = self.read_l1(s.l1_table_offset, s.l1_size)?;
        let start = Header::l1_entries_for(size, self.cluster_bits) * geo.l2_entries;
        let mut out = vec![0u8; s.vm_state_size as usize];
        let cs = geo.cluster_size as usize;
        let mut cached: Option<(u64, Vec<u64>)> = None;
        for (i, chunk) in out.chunks_mut(cs).enumerate() {
            let gc = start + i as u64;
            let l2 = l1
                .get((gc / geo.l2_entries) as usize)
                .map_or(0, |e| e & L1_OFFSET_MASK);
            if l2 == 0 {
                continue;
            }
            if cached.as_ref().is_none_or(|(o, _)| *o != l2) {
                meta.check_host(&self.file, "L2 table", l2)?;
                cached = Some((l2, meta.read_l2(&self.file, l2)?));
            }
            let e = cached
                .as_ref()
                .map_or(0, |(_, t)| t[(gc % geo.l2_entries) as usize]);
            match Mapping::decode(e, &geo) {
                Mapping::Data { host, .. } => {
                    meta.check_host(&self.file, "VM state cluster", host)?;
                    self.file.read_at(chunk, host)?
                }
                Mapping::Compressed { host, len } => {
                    let c = self.decompress(host, len)?;
                    chunk.copy_from_slice(&c[..chunk.len()]);
                }
                _ => {}
            }
        }
        Ok(out)
    }

    pub(super) fn read_l1(&self, offset: u64, entries: u32) -> Result<Vec<u64>, DiskError> {
        let mut b = vec![0u8; entries as usize * 8];
        if self.file.len()? < offset + b.len() as u64 {
            return Err(DiskError::Corrupt {
                path: self.file.path().into(),
                reason: format!(
                    "snapshot L1 table at {offset:#x} extends past the end of the file"
                ),
            });
        }
        self.file.read_at(&mut b, offset)?;
        Ok(be_u64s(&b))
    }

    /// Writes a VM state into new clusters mapped by new L2 tables of a snapshot's L1.
    fn write_vm_state(
        &self,
        meta: &mut Meta,
        alloc: &mut Alloc,
        l1: &mut Vec<u64>,
        base: usize,
        state: &[u8],
    ) -> Result<(), DiskError> {
        let geo = meta.geo;
        let cs = geo.cluster_size;
        let clusters = (state.len() as u64).div_ceil(cs);
        let tables = clusters.div_ceil(geo.l2_entries);
        if (base as u64 + tables) * 8 > super::header::MAX_L1_BYTES {
            return Err(DiskError::InvalidArgument(
                "the VM state is too large for this image's L1 table".into(),
            ));
        }
        let data = alloc.run(meta, self, clusters)?;
        let mut padded = state.to_vec();
        padded.resize((clusters * cs) as usize, 0);
        self.file.write_at(&padded, data * cs)?;
        l1.resize(l1.len().max(base + tables as usize), 0);
        for t in 0..tables {
            let off = alloc.run(meta, self, 1)? * cs;
            let mut entries = vec![0u64; geo.l2_entries as usize];
            for (j, e) in entries.iter_mut().enumerate() {
                let c = t * geo.l2_entries + j as u64;
                if c < clusters {
                    *e = ((data + c) * cs) | COPIED;
                }
            }
            self.file.write_at(&to_be_bytes(&entries), off)?;
            l1[base + t as usize] = off;
        }
        Ok(())
    }

    /// Runs one snapshot transaction: `plan` returns the new active L1 entries, the new
    /// snapshot list and the new virtual size; this writes and switches to that state.
    fn transaction<F>(&self, plan: F) -> Result<(), DiskError>
    where
        F: FnOnce(&Qcow2, &mut Meta, &mut Alloc) -> Result<(Vec<u64>, Vec<Draft>, u64), DiskError>,
    {
        // Everything in flight becomes durable, and no data I/O runs until the switch.
        self.flush()?;
        let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let mut meta = self.lock();
        meta.writeback(&self.file)?;
        meta.apply_frees(&self.file)?;
        self.file.sync()?;
        self.check_old_state(&mut meta)?;
        let mut alloc = Alloc {
            taken: BTreeSet::new(),
            hint: 1,
        };
        let (active, drafts, size) = plan(self, &mut meta, &mut alloc)?;
        let (header, refs) = self.write_new_state(&mut meta, &mut alloc, active, drafts, size)?;
        // The switch: one write inside the header's first sector.
        let mut fields = [0u8; 48];
        fields[0..8].copy_from_slice(&header.size.to_be_bytes());
        fields[8..12].copy_from_slice(&0u32.to_be_bytes()); // crypt_method
        fields[12..16].copy_from_slice(&header.l1_size.to_be_bytes());
        fields[16..24].copy_from_slice(&header.l1_table_offset.to_be_bytes());
        fields[24..32].copy_from_slice(&header.refcount_table_offset.to_be_bytes());
        fields[32..36].copy_from_slice(&header.refcount_table_clusters.to_be_bytes());
        fields[36..40].copy_from_slice(&header.nb_snapshots.to_be_bytes());
        fields[40..48].copy_from_slice(&header.snapshots_offset.to_be_bytes());
        self.file.sync()?;
        self.file.write_at(&fields, 24)?;
        self.file.sync()?;
        self.release_unreferenced(&mut meta, &refs);
        let new_meta = Meta::load(&self.file, header)?;
        *meta = new_meta;
        self.size.store(meta.header.size, Ordering::Release);
        Ok(())
    }

    /// Refuses to build on an image whose stored refcounts are below its references.
    fn check_old_state(&self, meta: &mut Meta) -> Result<(), DiskError> {
        let refs = self.count_refs(meta, &meta.l1.clone(), &meta.snapshots.clone(), None, true)?;
        for c in 0..refs.end() {
            let want = refs.get(c) as u64;
            if want > 0 && meta.refcount(&self.file, c)? < want {
                return Err(DiskError::Corrupt {
                    path: self.file.path().into(),
                    reason: format!("cluster {c} has fewer references counted than it is used"),
                });
            }
        }
        Ok(())
    }

    /// References of a whole state: header, active L1, refcount structure (old state
    /// only), snapshot table, snapshot L1 tables and every L2 tree.
    fn count_refs(
        &self,
        meta: &Meta,
        active: &[u64],
        snaps: &[Snapshot],
        snap_table: Option<(u64, u64)>,
        with_refcount_structure: bool,
    ) -> Result<Refs, DiskError> {
        let geo = meta.geo;
        let cs = geo.cluster_size;
        let mut refs = Refs::new(MAX_TXN_CLUSTERS);
        refs.add(0, 1, 1, "header");
        let h = &meta.header;
        refs.add(
            h.l1_table_offset / cs,
            (active.len() as u64 * 8).div_ceil(cs),
            1,
            "L1 table",
        );
        if with_refcount_structure {
            refs.add(
                h.refcount_table_offset / cs,
                h.refcount_table_clusters as u64,
                1,
                "refcount table",
            );
            for &e in meta.refcount_table() {
                let off = e & RT_OFFSET_MASK;
                if off != 0 {
                    refs.add(off / cs, 1, 1, "refcount block");
                }
            }
        }
        let (st_off, st_len) = snap_table.unwrap_or((
            h.snapshots_offset,
            snapshot::encode_table(&meta.snapshots).len() as u64,
        ));
        if !snaps.is_empty() {
            refs.add(st_off / cs, st_len.div_ceil(cs), 1, "snapshot table");
        }
        let mut l1s = vec![active.to_vec()];
        let mut l1_bytes = 0;
        for s in snaps {
            l1_bytes += s.l1_size as u64 * 8;
            if l1_bytes > MAX_TXN_L1_BYTES {
                return Err(DiskError::InvalidArgument(
                    "the snapshots' L1 tables are too large together".into(),
                ));
            }
            refs.add(
                s.l1_table_offset / cs,
                (s.l1_size as u64 * 8).div_ceil(cs),
                1,
                "snapshot L1 table",
            );
            l1s.push(self.read_l1(s.l1_table_offset, s.l1_size)?);
        }
        for (first, n) in super::bitmaps::referenced_clusters(&self.file, h, &geo)? {
            refs.add(first, n, 1, "bitmap cluster");
        }
        let views: Vec<&[u64]> = l1s.iter().map(|v| v.as_slice()).collect();
        let mult = l2_multiplicity(&views);
        let file_clusters = self.file.len()?.div_ceil(cs);
        count_l2_trees(&geo, file_clusters, &mult, &mut refs, |off| {
            meta.read_l2(&self.file, off)
        })?;
        if let Some(p) = refs.problems.first() {
            return Err(DiskError::Corrupt {
                path: self.file.path().into(),
                reason: p.clone(),
            });
        }
        Ok(refs)
    }

    /// Writes every structure of the new state into free clusters; returns its header.
    fn write_new_state(
        &self,
        meta: &mut Meta,
        alloc: &mut Alloc,
        mut active: Vec<u64>,
        mut drafts: Vec<Draft>,
        size: u64,
    ) -> Result<(Header, Refs), DiskError> {
        let geo = meta.geo;
        let cs = geo.cluster_size;
        let clusters_for = |bytes: u64| bytes.div_ceil(cs).max(1);
        // New snapshot L1 tables (snapshot L1 entries carry no COPIED flags).
        for d in drafts.iter_mut() {
            if let Some(l1) = &d.new_l1 {
                let bytes: Vec<u8> =
                    to_be_bytes(&l1.iter().map(|e| e & L1_OFFSET_MASK).collect::<Vec<_>>());
                let off = alloc.run(meta, self, clusters_for(bytes.len() as u64))? * cs;
                self.file.write_at(&bytes, off)?;
                d.snap.l1_table_offset = off;
                d.snap.l1_size = l1.len() as u32;
            }
        }
        let snaps: Vec<Snapshot> = drafts.into_iter().map(|d| d.snap).collect();
        let table = snapshot::encode_table(&snaps);
        if table.len() as u64 > MAX_TABLE_BYTES {
            return Err(DiskError::InvalidArgument(
                "the snapshot table would exceed its 64 MiB limit".into(),
            ));
        }
        let table_off = if snaps.is_empty() {
            0
        } else {
            let off = alloc.run(meta, self, clusters_for(table.len() as u64))? * cs;
            self.file.write_at(&table, off)?;
            off
        };
        let l1_off = alloc.run(meta, self, clusters_for(active.len() as u64 * 8))? * cs;
        let mut header = meta.header.clone();
        header.size = size;
        header.l1_size = active.len() as u32;
        header.l1_table_offset = l1_off;
        header.nb_snapshots = snaps.len() as u32;
        header.snapshots_offset = table_off;
        let saved = std::mem::replace(&mut meta.header, header.clone());
        let counted = self.count_refs(
            meta,
            &active,
            &snaps,
            Some((table_off, table.len() as u64)),
            false,
        );
        meta.header = saved;
        let mut refs = counted?;
        // The active L2 tables must carry COPIED exactly where the refcount is 1;
        // tables that need a change get a corrected copy (never rewritten in place).
        for e in active.iter_mut() {
            let l2 = *e & L1_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let entries = meta.read_l2(&self.file, l2)?;
            let fixed: Vec<u64> = entries
                .iter()
                .map(|&x| match Mapping::decode(x, &geo) {
                    Mapping::Data { host, .. } | Mapping::Zero { host: Some(host) } => {
                        if refs.get(host / cs) == 1 {
                            x | COPIED
                        } else {
                            x & !COPIED
                        }
                    }
                    _ => x,
                })
                .collect();
            let l2 = if fixed != entries {
                let copy = alloc.run(meta, self, 1)? * cs;
                self.file.write_at(&to_be_bytes(&fixed), copy)?;
                refs.sub(l2 / cs, 1);
                refs.add(copy / cs, 1, 1, "L2 table");
                copy
            } else {
                l2
            };
            *e = if refs.get(l2 / cs) == 1 {
                l2 | COPIED
            } else {
                l2
            };
        }
        let mut l1_bytes = to_be_bytes(&active);
        l1_bytes.resize((clusters_for(l1_bytes.len() as u64) * cs) as usize, 0);
        self.file.write_at(&l1_bytes, l1_off)?;
        let (rt_off, rt_clusters) = self.write_refcounts(meta, alloc, &mut refs)?;
        header.refcount_table_offset = rt_off;
        header.refcount_table_clusters = rt_clusters as u32;
        Ok((header, refs))
    }

    /// Allocates, fills and writes a complete refcount structure for `refs`, counting
    /// its own clusters. Returns the table's offset and length in clusters.
    fn write_refcounts(
        &self,
        meta: &mut Meta,
        alloc: &mut Alloc,
        refs: &mut Refs,
    ) -> Result<(u64, u64), DiskError> {
        let geo = meta.geo;
        let cs = geo.cluster_size;
        let per = geo.rc_per_block;
        let mut blocks: BTreeMap<u64, u64> = BTreeMap::new();
        let mut table: Option<(u64, u64)> = None;
        loop {
            let end = refs.end();
            let needed: BTreeSet<u64> = (0..end.div_ceil(per))
                .filter(|&b| {
                    let lo = (b * per) as usize;
                    let hi = ((b + 1) * per).min(end) as usize;
                    refs.counts[lo..hi].iter().any(|&v| v > 0)
                })
                .collect();
            let entries = needed.iter().next_back().map_or(1, |b| b + 1);
            // Room for growth, so that most later allocations need no new table.
            let want_clusters = (entries * 8).div_ceil(cs) + 1;
            let mut changed = false;
            if table.is_none_or(|(_, n)| n * cs / 8 < entries) {
                if let Some((off, n)) = table.take() {
                    for c in off..off + n {
                        refs.sub(c, 1);
                    }
                }
                let first = alloc.run(meta, self, want_clusters)?;
                refs.add(first, want_clusters, 1, "refcount table");
                table = Some((first, want_clusters));
                changed = true;
            }
            for b in needed {
                if let std::collections::btree_map::Entry::Vacant(v) = blocks.entry(b) {
                    let c = alloc.run(meta, self, 1)?;
                    refs.add(c, 1, 1, "refcount block");
                    v.insert(c);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let (rt_first, rt_clusters) = table.unwrap_or((0, 0));
        let max = geo.max_refcount();
        if let Some(c) = (0..refs.end()).find(|&c| refs.get(c) as u64 > max) {
            return Err(DiskError::InvalidArgument(format!(
                "cluster {c} would need {} references, more than {}-bit refcounts hold",
                refs.get(c),
                1 << geo.refcount_order
            )));
        }
        let mut rt = vec![0u64; (rt_clusters * cs / 8) as usize];
        let mut bytes = vec![0u8; cs as usize];
        for (&b, &c) in &blocks {
            bytes.fill(0);
            for i in 0..per {
                let v = refs.get(b * per + i) as u64;
                if v > 0 {
                    rc_set(&mut bytes, i, geo.refcount_order, v);
                }
            }
            self.file.write_at(&bytes, c * cs)?;
            rt[b as usize] = c * cs;
        }
        self.file.write_at(&to_be_bytes(&rt), rt_first * cs)?;
        Ok((rt_first * cs, rt_clusters))
    }

    /// After the switch: gives the host back the blocks of clusters that were in use
    /// and no longer are (best effort; they are free in the new refcounts either way).
    fn release_unreferenced(&self, old: &mut Meta, new_refs: &Refs) {
        let cs = old.geo.cluster_size;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in 1..old.end {
            let freed = new_refs.get(c) == 0 && old.refcount(&self.file, c).unwrap_or(0) > 0;
            if !freed {
                continue;
            }
            match runs.last_mut() {
                Some((s, n)) if *s + *n == c => *n += 1,
                _ => runs.push((c, 1)),
            }
        }
        for (s, n) in runs {
            let _ = self.file.release(s * cs, n * cs);
        }
    }
}
