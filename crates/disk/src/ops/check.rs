//! `check`: recount every reference and compare with the stored refcounts; repair.

use crate::chain::{open_chain_with, ChainOpts};
use crate::qcow2::meta::{be_u64s, Mapping, COPIED, L1_OFFSET_MASK, RT_OFFSET_MASK, ZERO};
use crate::qcow2::refs::{count_l2_trees, l2_multiplicity, Refs};
use crate::qcow2::snapshot::encode_table;
use crate::qcow2::Qcow2;
use crate::{DiskError, Image};
use serde::Serialize;
use std::path::Path;

/// How much `check` may repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    Leaks,
    All,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    // Fields in the order qemu-img 7.2's --output=json prints them.
    pub image_end_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub compressed_clusters: u64,
    pub total_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    pub check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    pub allocated_clusters: u64,
    pub filename: String,
    pub format: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub fragmented_clusters: u64,
    /// One line per problem found, in qemu-img's wording.
    #[serde(skip)]
    pub messages: Vec<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl CheckReport {
    /// qemu-img check's exit code: 0 clean, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.corruptions > 0 || self.check_errors > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// Upper bound on the clusters `check` tracks (keeps a hostile sparse file from
/// making it allocate without bound).
const MAX_CHECK_CLUSTERS: u64 = 1 << 28;

/// Checks a qcow2 image's metadata (refcounts against references) and optionally repairs it.
pub fn check(path: &Path, repair: Option<Repair>) -> Result<CheckReport, DiskError> {
    let img = open_chain_with(
        path,
        None,
        ChainOpts {
            read_only: repair.is_none(),
            top_only: true,
            repairing: repair.is_some(),
            // A plain check only reads metadata; it may run on an image in use.
            no_locks: repair.is_none(),
            ..Default::default()
        },
    )?;
    let Image::Qcow2(q) = &*img else {
        return Err(DiskError::InvalidArgument(format!(
            "{}: raw images have no metadata to check",
            path.display()
        )));
    };
    let (mut report, mut found) = check_qcow2(q, path)?;
    if let Some(mode) = repair {
        let mut fixed = Vec::new();
        let mut corruptions = 0;
        if mode == Repair::All && !found.entries.is_empty() {
            // References that cannot be right go first; the refcounts follow them.
            corruptions += repair_entries(q, &found.entries, &mut fixed)?;
            found = check_qcow2(q, path)?.1;
        }
        if let (Repair::All, Some(refs)) = (mode, &found.rebuild) {
            fixed.push("Rebuilding refcount structure".into());
            rebuild_refcounts(q, refs)?;
            corruptions += 1;
            found = check_qcow2(q, path)?.1;
        }
        let (leaks, c) = repair_refcounts(q, found.mismatches, mode)?;
        corruptions += c;
        if mode == Repair::All {
            // OFLAG_COPIED against the repaired refcounts, as QEMU does after them.
            let (_, again) = check_qcow2(q, path)?;
            corruptions += repair_flags(q, &again.flags, &mut fixed)?;
        }
        let (mut after, _) = check_qcow2(q, path)?;
        after.leaks_fixed = leaks;
        after.corruptions_fixed = corruptions;
        fixed.append(&mut after.messages);
        after.messages = fixed;
        after
            .messages
            .splice(0..0, std::mem::take(&mut report.messages));
        if after.corruptions == 0 && after.check_errors == 0 {
            q.clear_repair_bits()?;
        }
        report = after;
    }
    Ok(report)
}

/// Refcount mismatches to repair: (cluster, on-disk refcount, references).
type Mismatches = Vec<(u64, u64, u64)>;

/// An L1 or L2 entry whose OFLAG_COPIED disagrees with its cluster's refcount.
struct FlagFix {
    /// File offset of the entry.
    at: u64,
    entry: u64,
    want_copied: bool,
    refcount: u64,
    /// Set for L1 entries (L2 tables).
    l1_index: Option<usize>,
}

/// A table entry rewritten by `-r all` (a reference that cannot be right).
struct EntryFix {
    at: u64,
    new: u64,
    l1_index: Option<usize>,
    what: String,
}

struct Findings {
    mismatches: Mismatches,
    flags: Vec<FlagFix>,
    entries: Vec<EntryFix>,
    /// References per cluster, when the refcount structures must be rebuilt.
    rebuild: Option<Vec<u16>>,
}

fn check_qcow2(q: &Qcow2, path: &Path) -> Result<(CheckReport, Findings), DiskError> {
    let f = q.file();
    let mut meta = q.lock();
    let h = meta.header.clone();
    let geo = meta.geo;
    let cs = geo.cluster_size;
    let file_len = f.len()?;
    let file_clusters = file_len.div_ceil(cs);
    if file_clusters > MAX_CHECK_CLUSTERS {
        return Err(DiskError::InvalidArgument(format!(
            "{}: file has {file_clusters} clusters, too many to check",
            path.display()
        )));
    }
    let mut r = CheckReport {
        filename: path.display().to_string(),
        format: "qcow2".into(),
        total_clusters: h.size.div_ceil(cs),
        ..Default::default()
    };
    let mut refs = vec![0u16; file_clusters as usize];
    let mut inc = |r: &mut CheckReport, first: u64, n: u64, what: &str| {
        for c in first..first + n {
            match refs.get_mut(c as usize) {
                Some(v) => *v = v.saturating_add(1),
                None => {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR {what} at offset {:#x} is past the end of the image file",
                        c * cs
                    ));
                }
            }
        }
    };
    inc(&mut r, 0, 1, "header");
    let l1_clusters = (h.l1_size as u64 * 8).div_ceil(cs);
    inc(&mut r, h.l1_table_offset / cs, l1_clusters, "L1 table");
    inc(
        &mut r,
        h.refcount_table_offset / cs,
        h.refcount_table_clusters as u64,
        "refcount table",
    );
    // Refcount structures that cannot be read make -r all rebuild them from scratch.
    let mut rebuild = false;
    let mut rc_structure = vec![(
        h.refcount_table_offset / cs,
        h.refcount_table_clusters as u64,
    )];
    for (i, &e) in meta.refcount_table().to_vec().iter().enumerate() {
        let off = e & RT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) {
            r.corruptions += 1;
            rebuild = true;
            r.messages.push(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table corrupted"
            ));
            continue;
        }
        if off >= file_len || off < cs {
            r.corruptions += 1;
            rebuild = true;
            r.messages
                .push(format!("ERROR refcount block {i} is outside image"));
            continue;
        }
        inc(&mut r, off / cs, 1, "refcount block");
        rc_structure.push((off / cs, 1));
    }
    // Guest mappings, plus the OFLAG_COPIED expectations to verify afterwards.
    // (cluster, entry, where the entry is in the file, L1 index for L2 tables)
    let mut copied_checks: Vec<(u64, u64, u64, Option<usize>)> = Vec::new();
    let mut last_host: Option<u64>;
    let mut seen_l2 = std::collections::HashSet::new();
    // Clusters no L2 table or data cluster may be: header, tables, refcount blocks.
    let mut metadata = std::collections::HashSet::new();
    metadata.insert(0u64);
    metadata.extend(h.l1_table_offset / cs..h.l1_table_offset / cs + l1_clusters);
    metadata.extend(
        h.refcount_table_offset / cs
            ..h.refcount_table_offset / cs + h.refcount_table_clusters as u64,
    );
    for &e in meta.refcount_table() {
        if e & RT_OFFSET_MASK != 0 {
            metadata.insert((e & RT_OFFSET_MASK) / cs);
        }
    }
    for sn in &meta.snapshots {
        let first = sn.l1_table_offset / cs;
        // Bounded: a hostile snapshot entry may claim any L1 size.
        let n = (sn.l1_size as u64 * 8).min(crate::qcow2::header::MAX_L1_BYTES);
        metadata.extend(first..first.saturating_add(n.div_ceil(cs)));
    }
    let l2_tables: std::collections::HashSet<u64> = meta
        .l1
        .iter()
        .map(|e| (e & L1_OFFSET_MASK) / cs)
        .filter(|&c| c != 0)
        .collect();
    let mut entries = Vec::new();
    let zero_entry = if h.version >= 3 { ZERO } else { 0 };
    for (i, &l1e) in meta.l1.clone().iter().enumerate() {
        let l2_off = l1e & L1_OFFSET_MASK;
        let at = h.l1_table_offset + i as u64 * 8;
        let drop_l1 = |r: &mut CheckReport, entries: &mut Vec<EntryFix>, why: &str| {
            r.corruptions += 1;
            r.messages
                .push(format!("ERROR L1 entry {i} ({l1e:#x}): {why}"));
            entries.push(EntryFix {
                at,
                new: 0,
                l1_index: Some(i),
                what: format!("L1 entry {i} ({l1e:#x}): {why}; dropped"),
            });
        };
        if l2_off == 0 {
            if l1e != 0 {
                // Flags without a table: reads see no L2 table (as in QEMU's read path).
                drop_l1(&mut r, &mut entries, "flags set but no L2 table");
            }
            continue;
        }
        if l1e & !(L1_OFFSET_MASK | COPIED) != 0 {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR L1 entry {i} ({l1e:#x}) has reserved bits set"
            ));
            entries.push(EntryFix {
                at,
                new: l1e & (L1_OFFSET_MASK | COPIED),
                l1_index: Some(i),
                what: format!("L1 entry {i} ({l1e:#x}): reserved bits cleared"),
            });
        }
        if !l2_off.is_multiple_of(cs) || l2_off >= file_len {
            drop_l1(
                &mut r,
                &mut entries,
                "L2 table unaligned or past the end of the file",
            );
            continue;
        }
        if metadata.contains(&(l2_off / cs)) {
            drop_l1(
                &mut r,
                &mut entries,
                "the L2 table would be the image's own metadata",
            );
            continue;
        }
        inc(&mut r, l2_off / cs, 1, "L2 table");
        if !seen_l2.insert(l2_off) {
            // Shared L2 tables are already flagged by their refcount; scanning them
            // again would only multiply the work a hostile image can cause.
            continue;
        }
        copied_checks.push((l2_off / cs, l1e, h.l1_table_offset + i as u64 * 8, Some(i)));
        last_host = None;
        let mut bytes = vec![0u8; cs as usize];
        f.read_at(&mut bytes, l2_off)?;
        for (j, e) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_be_bytes(e.try_into().unwrap_or([0; 8]));
            let guest = i as u64 * geo.l2_entries + j as u64;
            let m = Mapping::decode(e, &geo);
            match m {
                Mapping::Data { host, .. } | Mapping::Zero { host: Some(host) }
                    if host >= file_len
                        || metadata.contains(&(host / cs))
                        || l2_tables.contains(&(host / cs)) =>
                {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR cluster {guest}: offset {host:#x} is past the end of the file or metadata"
                    ));
                    entries.push(EntryFix {
                        at: l2_off + j as u64 * 8,
                        new: zero_entry,
                        l1_index: None,
                        what: format!(
                            "L2 entry of guest cluster {guest} ({e:#x}): past the end of the file or metadata; reads zeros now"
                        ),
                    });
                }
                Mapping::Data { host, .. } | Mapping::Zero { host: Some(host) } => {
                    if host % cs != 0 {
                        r.corruptions += 1;
                        r.messages.push(format!(
                            "ERROR cluster {guest}: offset {host:#x} is not cluster aligned"
                        ));
                        continue;
                    }
                    inc(&mut r, host / cs, 1, "data cluster");
                    copied_checks.push((host / cs, e, l2_off + j as u64 * 8, None));
                    // As QEMU counts them: preallocated zero clusters are allocated
                    // too, and contiguity is judged within one L2 table.
                    if guest < r.total_clusters {
                        r.allocated_clusters += 1;
                        if last_host.is_some_and(|p: u64| p + cs != host) {
                            r.fragmented_clusters += 1;
                        }
                        last_host = Some(host);
                    }
                }
                Mapping::Compressed { .. } => {
                    if let Some((first, n)) = m.host_clusters(&geo) {
                        inc(&mut r, first, n, "compressed cluster");
                    }
                    r.allocated_clusters += 1;
                    r.compressed_clusters += 1;
                    // QEMU: compressed clusters are fragmented by nature.
                    r.fragmented_clusters += 1;
                }
                _ => {}
            }
        }
    }
    // Persistent bitmaps: directory, tables and data clusters.
    match crate::qcow2::bitmaps::referenced_clusters(f, &h, &geo) {
        Ok(list) => {
            for (first, n) in list {
                inc(&mut r, first, n, "bitmap cluster");
            }
        }
        Err(e) => {
            r.corruptions += 1;
            r.messages.push(format!("ERROR bitmaps extension: {e}"));
        }
    }
    // Snapshots: the table, their L1 tables, and each L2 tree once per L1 entry that
    // reaches it (shared tables are read once).
    if h.nb_snapshots > 0 {
        let table_len = encode_table(&meta.snapshots).len() as u64;
        inc(
            &mut r,
            h.snapshots_offset / cs,
            table_len.div_ceil(cs),
            "snapshot table",
        );
        let mut l1s = Vec::new();
        for sn in meta.snapshots.clone() {
            let bytes = sn.l1_size as u64 * 8;
            inc(
                &mut r,
                sn.l1_table_offset / cs,
                bytes.div_ceil(cs),
                "snapshot L1 table",
            );
            if sn.l1_table_offset + bytes > file_len {
                continue;
            }
            let mut b = vec![0u8; bytes as usize];
            f.read_at(&mut b, sn.l1_table_offset)?;
            l1s.push(be_u64s(&b));
        }
        let views: Vec<&[u64]> = l1s.iter().map(|v| v.as_slice()).collect();
        let mut snap_refs = Refs::new(file_clusters);
        count_l2_trees(
            &geo,
            file_clusters,
            &l2_multiplicity(&views),
            &mut snap_refs,
            |off| meta.read_l2(f, off),
        )?;
        r.corruptions += snap_refs.problems.len() as u64;
        r.messages.append(&mut snap_refs.problems);
        for (c, &n) in snap_refs.counts.iter().enumerate() {
            if n > 0 {
                if let Some(v) = refs.get_mut(c) {
                    *v = v.saturating_add(n.min(u16::MAX as u32) as u16);
                }
            }
        }
    }
    // Compare with the stored refcounts over the file and whatever the table covers.
    let covered = meta.refcount_table().len() as u64 * geo.rc_per_block;
    let last = file_clusters.max(covered.min(file_clusters + geo.rc_per_block));
    let max_rc = geo.max_refcount();
    let mut mismatches = Vec::new();
    let mut end_cluster = 0;
    for c in 0..last {
        let rc = match meta.refcount(f, c) {
            Ok(v) => v,
            Err(e) => {
                // One message per refcount block, not per cluster.
                if c % geo.rc_per_block == 0 || c == 0 {
                    r.corruptions += 1;
                    r.messages
                        .push(format!("ERROR cannot read refcount of cluster {c}: {e}"));
                }
                rebuild = true;
                continue;
            }
        };
        let refs_c = refs.get(c as usize).copied().unwrap_or(0) as u64;
        if rc > 0 || refs_c > 0 {
            end_cluster = c + 1;
        }
        if refs_c > max_rc {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR cluster {c} has {refs_c} references, more than {}-bit refcounts can hold (refcount overflow)",
                1 << geo.refcount_order
            ));
            continue;
        }
        if rc != refs_c {
            if rc > refs_c {
                r.leaks += 1;
                r.messages.push(format!(
                    "Leaked cluster {c} refcount={rc} reference={refs_c}"
                ));
            } else {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR cluster {c} refcount={rc} reference={refs_c}"
                ));
            }
            mismatches.push((c, rc, refs_c));
        }
    }
    let mut flags = Vec::new();
    for (c, entry, at, l1_index) in copied_checks {
        let rc = meta.refcount(f, c).unwrap_or(0);
        let copied = entry & COPIED != 0;
        // As QEMU: a refcount of 0 is a refcount error, not a flag error.
        if rc == 0 || (rc == 1) == copied {
            continue;
        }
        r.corruptions += 1;
        r.messages.push(match l1_index {
            Some(i) => format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={entry:x} refcount={rc}"
            ),
            None => format!("ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"),
        });
        flags.push(FlagFix {
            at,
            entry,
            want_copied: rc == 1,
            refcount: rc,
            l1_index,
        });
    }
    r.image_end_offset = end_cluster * cs;
    // For a rebuild: the references without the old refcount structures.
    let rebuild = rebuild.then(|| {
        let mut plain = refs.clone();
        for (first, n) in rc_structure {
            for c in first..first + n {
                if let Some(v) = plain.get_mut(c as usize) {
                    *v = v.saturating_sub(1);
                }
            }
        }
        plain
    });
    Ok((
        r,
        Findings {
            mismatches,
            flags,
            entries,
            rebuild,
        },
    ))
}

fn repair_refcounts(
    q: &Qcow2,
    mismatches: Mismatches,
    mode: Repair,
) -> Result<(u64, u64), DiskError> {
    let f = q.file();
    let mut meta = q.lock();
    // New refcount blocks must not land on clusters that are in use but uncounted.
    let beyond = mismatches.iter().map(|m| m.0 + 1).max().unwrap_or(0);
    meta.raise_end(beyond);
    let end = meta.end;
    meta.set_free_hint(end);
    let (mut leaks, mut corr) = (0, 0);
    for (c, rc, refs) in mismatches {
        if rc > refs {
            meta.set_refcount(f, c, refs)?;
            leaks += 1;
        } else if mode == Repair::All {
            meta.set_refcount(f, c, refs)?;
            corr += 1;
        }
    }
    meta.writeback(f)?;
    f.sync()?;
    meta.drop_caches();
    Ok((leaks, corr))
}

/// Sets or clears OFLAG_COPIED in the entries that disagree with their refcounts.
fn repair_flags(q: &Qcow2, fixes: &[FlagFix], msgs: &mut Vec<String>) -> Result<u64, DiskError> {
    if fixes.is_empty() {
        return Ok(0);
    }
    let f = q.file();
    let mut meta = q.lock();
    for fx in fixes {
        let new = if fx.want_copied {
            fx.entry | COPIED
        } else {
            fx.entry & !COPIED
        };
        f.write_at(&new.to_be_bytes(), fx.at)?;
        msgs.push(match fx.l1_index {
            Some(i) => {
                if let Some(e) = meta.l1.get_mut(i) {
                    *e = new;
                }
                format!(
                    "Repairing OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} refcount={}",
                    fx.entry, fx.refcount
                )
            }
            None => format!(
                "Repairing OFLAG_COPIED data cluster: l2_entry={:x} refcount={}",
                fx.entry, fx.refcount
            ),
        });
    }
    f.sync()?;
    meta.drop_caches();
    Ok(fixes.len() as u64)
}

/// Rewrites the entries `check` found pointing where no reference may point.
fn repair_entries(q: &Qcow2, fixes: &[EntryFix], msgs: &mut Vec<String>) -> Result<u64, DiskError> {
    let f = q.file();
    let mut meta = q.lock();
    for fx in fixes {
        f.write_at(&fx.new.to_be_bytes(), fx.at)?;
        if let Some(e) = fx.l1_index.and_then(|i| meta.l1.get_mut(i)) {
            *e = fx.new;
        }
        msgs.push(format!("Repairing {}", fx.what));
    }
    f.sync()?;
    meta.drop_caches();
    Ok(fixes.len() as u64)
}

/// Writes a new refcount table and blocks past everything in use, counting `refs`
/// (and themselves), then points the header at them (QEMU's rebuild_refcount_structure).
fn rebuild_refcounts(q: &Qcow2, refs: &[u16]) -> Result<(), DiskError> {
    use crate::qcow2::meta::{rc_set, to_be_bytes};
    let f = q.file();
    let mut meta = q.lock();
    let geo = meta.geo;
    let cs = geo.cluster_size;
    let used = refs
        .iter()
        .rposition(|&v| v > 0)
        .map_or(1, |p| p as u64 + 1);
    let start = used.max(f.len()?.div_ceil(cs));
    let per = geo.rc_per_block;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let nb = (start + blocks + table).div_ceil(per);
        let nt = (nb * 8).div_ceil(cs);
        if (nb, nt) == (blocks, table) {
            break;
        }
        (blocks, table) = (nb, nt);
    }
    if table * cs > crate::qcow2::header::MAX_REFTABLE_BYTES {
        return Err(DiskError::InvalidArgument(
            "the rebuilt refcount table would exceed its 8 MiB limit".into(),
        ));
    }
    let total = start + blocks + table;
    let mut rt = vec![0u64; (table * cs / 8) as usize];
    for (b, slot) in rt.iter_mut().enumerate().take(blocks as usize) {
        let mut blk = vec![0u8; cs as usize];
        for k in 0..per {
            let c = b as u64 * per + k;
            if c >= total {
                break;
            }
            let v = if c >= start {
                1
            } else {
                refs.get(c as usize).copied().unwrap_or(0) as u64
            };
            if v > 0 {
                rc_set(&mut blk, k, geo.refcount_order, v.min(geo.max_refcount()));
            }
        }
        let at = (start + b as u64) * cs;
        f.write_at(&blk, at)?;
        *slot = at;
    }
    let table_at = (start + blocks) * cs;
    f.write_at(&to_be_bytes(&rt), table_at)?;
    f.sync()?;
    let mut fields = [0u8; 12];
    fields[..8].copy_from_slice(&table_at.to_be_bytes());
    fields[8..].copy_from_slice(&(table as u32).to_be_bytes());
    f.write_at(&fields, 48)?;
    f.sync()?;
    meta.replace_refcount_table(table_at, table as u32, rt, total);
    Ok(())
}
