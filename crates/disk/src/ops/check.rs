//! `check`: recount every reference and compare with the stored refcounts; repair.

use crate::chain::{open_chain_with, ChainOpts};
use crate::qcow2::meta::{be_u64s, Mapping, L1_OFFSET_MASK, RT_OFFSET_MASK};
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
    pub filename: String,
    pub format: String,
    pub check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
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
    let (mut report, mismatches) = check_qcow2(q, path)?;
    if let Some(mode) = repair {
        let (leaks, corruptions) = repair_refcounts(q, mismatches, mode)?;
        let (mut after, _) = check_qcow2(q, path)?;
        after.leaks_fixed = leaks;
        after.corruptions_fixed = corruptions;
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

fn check_qcow2(q: &Qcow2, path: &Path) -> Result<(CheckReport, Mismatches), DiskError> {
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
    for (i, &e) in meta.refcount_table().to_vec().iter().enumerate() {
        let off = e & RT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table corrupted"
            ));
            continue;
        }
        inc(&mut r, off / cs, 1, "refcount block");
    }
    // Guest mappings, plus the OFLAG_COPIED expectations to verify afterwards.
    let mut copied_checks: Vec<(u64, bool, String)> = Vec::new();
    let mut last_host = None;
    let mut seen_l2 = std::collections::HashSet::new();
    for (i, &l1e) in meta.l1.clone().iter().enumerate() {
        let l2_off = l1e & L1_OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        if !l2_off.is_multiple_of(cs) || l2_off >= file_len {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR L2 table {i} at offset {l2_off:#x} is unaligned or past the end of the file"
            ));
            continue;
        }
        inc(&mut r, l2_off / cs, 1, "L2 table");
        if !seen_l2.insert(l2_off) {
            // Shared L2 tables are already flagged by their refcount; scanning them
            // again would only multiply the work a hostile image can cause.
            continue;
        }
        copied_checks.push((
            l2_off / cs,
            l1e & crate::qcow2::meta::COPIED != 0,
            format!("L1 entry {i}"),
        ));
        let mut bytes = vec![0u8; cs as usize];
        f.read_at(&mut bytes, l2_off)?;
        for (j, e) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_be_bytes(e.try_into().unwrap_or([0; 8]));
            let guest = i as u64 * geo.l2_entries + j as u64;
            let m = Mapping::decode(e, &geo);
            match m {
                Mapping::Data { host, .. } | Mapping::Zero { host: Some(host) } => {
                    if host % cs != 0 {
                        r.corruptions += 1;
                        r.messages.push(format!(
                            "ERROR cluster {guest}: offset {host:#x} is not cluster aligned"
                        ));
                        continue;
                    }
                    inc(&mut r, host / cs, 1, "data cluster");
                    let copied = e & crate::qcow2::meta::COPIED != 0;
                    copied_checks.push((
                        host / cs,
                        copied,
                        format!("L2 entry of guest cluster {guest}"),
                    ));
                    if let Mapping::Data { .. } = m {
                        if guest < r.total_clusters {
                            r.allocated_clusters += 1;
                            if last_host.is_some_and(|p: u64| p + cs != host) {
                                r.fragmented_clusters += 1;
                            }
                            last_host = Some(host);
                        }
                    }
                }
                Mapping::Compressed { .. } => {
                    if let Some((first, n)) = m.host_clusters(&geo) {
                        inc(&mut r, first, n, "compressed cluster");
                    }
                    r.allocated_clusters += 1;
                    r.compressed_clusters += 1;
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
                r.corruptions += 1;
                r.messages
                    .push(format!("ERROR cannot read refcount of cluster {c}: {e}"));
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
    for (c, copied, what) in copied_checks {
        let rc = meta.refcount(f, c).unwrap_or(0);
        if (rc == 1) != copied {
            r.corruptions += 1;
            r.messages
                .push(format!("ERROR OFLAG_COPIED in {what}: refcount={rc}"));
        }
    }
    r.image_end_offset = end_cluster * cs;
    Ok((r, mismatches))
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
