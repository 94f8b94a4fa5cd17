//! Whole-image operations behind `ferrovirt img`: check, map, convert, commit, rebase, resize.

use crate::chain::{open_chain, open_chain_with, probe, resolve_backing, ChainOpts};
use crate::file::ImageFile;
use crate::qcow2::meta::{Mapping, L1_OFFSET_MASK, RT_OFFSET_MASK};
use crate::qcow2::{LayerStatus, Qcow2};
use crate::{create, BlockBackend, CreateOptions, DiskError, Format, Image, Preallocation};
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

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
    if h.nb_snapshots > 0 {
        return Err(DiskError::Unsupported {
            path: path.into(),
            feature: "checking images with internal snapshots".into(),
        });
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

/// One run of qemu-img map's output.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub compressed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The file holding the data (human output only).
    #[serde(skip)]
    pub filename: String,
}

/// Status of the chain at `pos`: the layer that decides it and how far it holds.
fn chain_status(top: &Arc<Image>, pos: u64, max_len: u64) -> Result<MapEntry, DiskError> {
    let mut len = max_len;
    let mut depth = 0;
    let mut cur = top;
    loop {
        let (st, n) = cur.layer_status(pos, len)?;
        len = len.min(n.max(1));
        let entry = |present, zero, data, compressed, offset| MapEntry {
            start: pos,
            length: len,
            depth,
            present,
            zero,
            data,
            compressed,
            offset,
            filename: cur.path().display().to_string(),
        };
        match st {
            LayerStatus::Zero => return Ok(entry(true, true, false, false, None)),
            LayerStatus::Data { host, compressed } => {
                return Ok(entry(true, false, true, compressed, host))
            }
            LayerStatus::Unallocated => match cur.backing() {
                Some(b) if pos < b.size() => {
                    len = len.min(b.size() - pos);
                    cur = b;
                    depth += 1;
                }
                Some(_) => return Ok(entry(false, true, false, false, None)),
                None => return Ok(entry(false, true, false, false, None)),
            },
        }
    }
}

/// Allocation map of the whole chain, merged into runs like qemu-img map.
pub fn map(path: &Path) -> Result<Vec<MapEntry>, DiskError> {
    let top = open_chain_with(
        path,
        None,
        ChainOpts {
            read_only: true,
            no_locks: true,
            ..Default::default()
        },
    )?;
    let size = top.size();
    let mut out: Vec<MapEntry> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let e = chain_status(&top, pos, size - pos)?;
        pos += e.length;
        if let Some(last) = out.last_mut() {
            let contiguous = match (last.offset, e.offset) {
                (Some(a), Some(b)) => a + last.length == b,
                (None, None) => true,
                _ => false,
            };
            if contiguous
                && last.depth == e.depth
                && last.present == e.present
                && last.zero == e.zero
                && last.data == e.data
                && last.compressed == e.compressed
                && last.filename == e.filename
            {
                last.length += e.length;
                continue;
            }
        }
        out.push(e);
    }
    Ok(out)
}

/// Copies the whole chain of `src` into a new standalone image, skipping zeros.
pub fn convert(
    src: &Path,
    src_format: Option<Format>,
    dst: &Path,
    opts: &CreateOptions,
) -> Result<(), DiskError> {
    let s = open_chain(src, src_format, true, false)?;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(src), std::fs::metadata(dst)) {
        if a.dev() == b.dev() && a.ino() == b.ino() {
            return Err(DiskError::InvalidArgument(
                "source and destination are the same file".into(),
            ));
        }
    }
    let mut o = opts.clone();
    o.size = s.size();
    o.backing = None;
    create(dst, &o)?;
    let d = open_chain(dst, Some(opts.format), false, false)?;
    copy_data(&s, &*d, |_| true)?;
    d.flush()
}

/// Copies every run of `src` whose chain status is data (and non-zero) into `dst`.
fn copy_data(
    src: &Arc<Image>,
    dst: &dyn BlockBackend,
    mut want: impl FnMut(&MapEntry) -> bool,
) -> Result<(), DiskError> {
    const CHUNK: u64 = 1 << 20;
    const ZERO_GRAIN: usize = 4096;
    let size = src.size().min(dst.size());
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let e = chain_status(src, pos, size - pos)?;
        // Runs without data are skipped whole; data is copied a chunk at a time.
        let n = if e.data {
            e.length.min(CHUNK)
        } else {
            e.length
        };
        if e.data && want(&e) {
            let b = &mut buf[..n as usize];
            src.read_at(b, pos)?;
            // Keep the copy sparse: write only grains that hold data.
            let mut i = 0;
            while i < b.len() {
                let g = ZERO_GRAIN.min(b.len() - i);
                if b[i..i + g].iter().all(|&x| x == 0) {
                    i += g;
                    continue;
                }
                let mut j = i + g;
                while j < b.len() && !b[j..(j + ZERO_GRAIN).min(b.len())].iter().all(|&x| x == 0) {
                    j = (j + ZERO_GRAIN).min(b.len());
                }
                dst.write_at(&b[i..j], pos + i as u64)?;
                i = j;
            }
        }
        pos += n;
    }
    Ok(())
}

/// Writes the overlay's own data into its backing file, then empties the overlay.
pub fn commit(path: &Path) -> Result<(), DiskError> {
    let top = open_chain_with(
        path,
        None,
        ChainOpts {
            backing_writable: true,
            ..Default::default()
        },
    )?;
    let Image::Qcow2(q) = &*top else {
        return Err(DiskError::InvalidArgument(format!(
            "{}: a raw image has no backing file to commit into",
            path.display()
        )));
    };
    let Some(base) = q.backing() else {
        return Err(DiskError::InvalidArgument(format!(
            "{}: the image has no backing file to commit into",
            path.display()
        )));
    };
    if base.size() < top.size() {
        grow_image(base, top.size())?;
    }
    let size = top.size();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let (st, n) = top.layer_status(pos, size - pos)?;
        let n = if matches!(st, LayerStatus::Data { .. }) {
            n.min(buf.len() as u64)
        } else {
            n
        };
        match st {
            LayerStatus::Unallocated => {}
            LayerStatus::Zero => base.write_zeroes(pos, n, false)?,
            LayerStatus::Data { .. } => {
                let b = &mut buf[..n as usize];
                top.read_at(b, pos)?;
                base.write_at(b, pos)?;
            }
        }
        pos += n;
    }
    base.flush()?;
    q.make_empty()
}

fn grow_image(img: &Image, new_size: u64) -> Result<(), DiskError> {
    match img {
        Image::Qcow2(q) => q.grow(new_size),
        Image::Raw(r) => {
            r.file().set_len(new_size)?;
            r.file().sync()
        }
    }
}

/// Changes the backing file. Unless `unsafe_only`, first copies into the image every
/// cluster whose contents would change under the new backing file.
pub fn rebase(
    path: &Path,
    new_backing: &str,
    new_format: Option<Format>,
    unsafe_only: bool,
) -> Result<(), DiskError> {
    let new_name = (!new_backing.is_empty()).then(|| new_backing.to_string());
    let new_path = match &new_name {
        Some(n) => Some(resolve_backing(path, n)?),
        None => None,
    };
    let fmt = match (new_format, &new_path) {
        (Some(f), _) => Some(f),
        (None, Some(p)) if p.exists() => Some(probe(&ImageFile::open(p, false, false)?)?),
        _ => None,
    };
    if unsafe_only {
        let top = open_chain_with(
            path,
            None,
            ChainOpts {
                top_only: true,
                ..Default::default()
            },
        )?;
        let Image::Qcow2(q) = &*top else {
            return Err(DiskError::InvalidArgument(
                "rebase applies to qcow2 images only".into(),
            ));
        };
        return q.set_backing(new_name, fmt.map(|f| f.name().to_string()));
    }
    let top = open_chain(path, None, false, false)?;
    let Image::Qcow2(q) = &*top else {
        return Err(DiskError::InvalidArgument(
            "rebase applies to qcow2 images only".into(),
        ));
    };
    let new_base = match &new_path {
        Some(p) => {
            let b = open_chain(p, fmt, true, false)?;
            // The new chain must not contain the image itself.
            let me = std::fs::metadata(path).map_err(|e| DiskError::io(path, e))?;
            let mut cur = Some(&b);
            while let Some(l) = cur {
                if let Ok(m) = std::fs::metadata(l.path()) {
                    if m.dev() == me.dev() && m.ino() == me.ino() {
                        return Err(DiskError::BackingChain {
                            path: path.into(),
                            reason: "the new backing chain contains the image itself (a loop)"
                                .into(),
                        });
                    }
                }
                cur = l.backing();
            }
            Some(b)
        }
        None => None,
    };
    let size = top.size();
    let cs = q.cluster_size();
    let mut old = vec![0u8; cs as usize];
    let mut new = vec![0u8; cs as usize];
    let mut pos = 0;
    while pos < size {
        let (st, n) = top.layer_status(pos, size - pos)?;
        if st != LayerStatus::Unallocated {
            pos += n;
            continue;
        }
        // Inside a run the image does not map itself: compare what the old chain and
        // the new backing file show, skipping stretches where both read as zeros.
        let run_end = pos + n;
        while pos < run_end {
            let old_e = chain_status(&top, pos, run_end - pos)?;
            let (new_data, new_len) = match &new_base {
                Some(b) if pos < b.size() => {
                    let e = chain_status(b, pos, run_end - pos)?;
                    (e.data, e.length)
                }
                _ => (false, run_end - pos),
            };
            let m = old_e.length.min(new_len).max(1);
            if !old_e.data && !new_data {
                pos += m;
                continue;
            }
            let k = m.min(cs - pos % cs);
            let o = &mut old[..k as usize];
            top.read_at(o, pos)?;
            let nb = &mut new[..k as usize];
            nb.fill(0);
            if let Some(b) = &new_base {
                if pos < b.size() {
                    let avail = (b.size() - pos).min(k) as usize;
                    b.read_at(&mut nb[..avail], pos)?;
                }
            }
            if o != nb {
                top.write_at(o, pos)?;
            }
            pos += k;
        }
    }
    top.flush()?;
    q.set_backing(new_name, fmt.map(|f| f.name().to_string()))
}

/// Grows an image to `new_size` bytes (shrinking is refused: it would destroy data).
pub fn resize(path: &Path, new_size: u64) -> Result<(), DiskError> {
    let img = open_chain_with(
        path,
        None,
        ChainOpts {
            top_only: true,
            ..Default::default()
        },
    )?;
    let cur = img.size();
    let new_size = if img.format() == Format::Qcow2 {
        new_size.div_ceil(512) * 512
    } else {
        new_size
    };
    if new_size < cur {
        return Err(DiskError::InvalidArgument(format!(
            "shrinking {} from {cur} to {new_size} bytes would destroy data and is not supported",
            path.display()
        )));
    }
    if new_size == cur {
        return Ok(());
    }
    grow_image(&img, new_size)
}

/// Creates options for `convert` from the CLI words.
pub fn convert_options(
    format: Format,
    cluster_size: Option<u32>,
    preallocation: Preallocation,
) -> CreateOptions {
    CreateOptions {
        format,
        size: 0,
        cluster_size,
        preallocation,
        backing: None,
    }
}
