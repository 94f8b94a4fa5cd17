//! The image files behind snapshots, and the one rule that keeps them safe: an image a
//! snapshot or the current state needs (as its state, its internal snapshot's holder, or a
//! backing file of one of those) is never deleted, and its content never changes.
//!
//! [`collect`] runs after every delete and revert: an overlay snapshots made that nothing
//! needs any more is deleted; an image of the domain's (ours, or a disk a snapshot froze)
//! that nothing refers to and whose only dependent is such an overlay gets that overlay merged
//! into it (a block commit: online when the overlay is in the
//! running VM's chain, else with the disk library), and takes its place everywhere.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ferrovirt_api::snapshot::Location;
use ferrovirt_api::{ApiError, DomainDef, ErrorCode};
use ferrovirt_disk::{CreateOptions, Format, Preallocation};

use super::store::Tree;

pub fn storage(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::StorageError, message)
}

fn disk_err(path: &Path, e: ferrovirt_disk::DiskError) -> ApiError {
    storage(format!("{}: {e}", path.display()))
}

/// The image's backing file (absolute), if it has one.
pub fn backing_of(path: &Path) -> Result<Option<PathBuf>, ApiError> {
    let info = ferrovirt_disk::info(path, false).map_err(|e| disk_err(path, e))?;
    let Some(i) = info.into_iter().next() else {
        return Ok(None);
    };
    let Some(name) = i.full_backing_filename.or(i.backing_filename) else {
        return Ok(None);
    };
    let p = PathBuf::from(name);
    Ok(Some(if p.is_absolute() {
        p
    } else {
        path.parent().unwrap_or(Path::new("/")).join(p)
    }))
}

/// "qcow2" or "raw", as the image's header says.
pub fn format_of(path: &Path) -> Result<String, ApiError> {
    let info = ferrovirt_disk::info(path, false).map_err(|e| disk_err(path, e))?;
    Ok(info
        .into_iter()
        .next()
        .map(|i| i.format)
        .unwrap_or_else(|| "raw".into()))
}

/// Names of the image's internal snapshots (read like `qemu-img info`: works while a VM has
/// the image open).
pub fn internal_names(path: &Path) -> Result<Vec<String>, ApiError> {
    let info = ferrovirt_disk::info(path, false).map_err(|e| disk_err(path, e))?;
    Ok(info
        .into_iter()
        .next()
        .map(|i| i.snapshots.into_iter().map(|s| s.name).collect())
        .unwrap_or_default())
}

/// A new, empty qcow2 overlay on `backing`; an existing file is an error (never overwritten).
pub fn create_overlay(path: &Path, backing: &Path) -> Result<(), ApiError> {
    if path.exists() {
        return Err(storage(format!(
            "{} already exists; pick another file or remove it",
            path.display()
        )));
    }
    let fmt = if format_of(backing)? == "qcow2" {
        Format::Qcow2
    } else {
        Format::Raw
    };
    ferrovirt_disk::create(
        path,
        &CreateOptions {
            format: Format::Qcow2,
            size: 0,
            cluster_size: None,
            preallocation: Preallocation::Off,
            backing: Some((backing.to_string_lossy().into_owned(), fmt)),
        },
    )
    .map_err(|e| disk_err(path, e))
}

/// A small qcow2 image that will hold a VM's memory as an internal snapshot.
pub fn create_memory_image(path: &Path) -> Result<(), ApiError> {
    if path.exists() {
        return Err(storage(format!(
            "memory file {} already exists; pick another file or remove it",
            path.display()
        )));
    }
    ferrovirt_disk::create(
        path,
        &CreateOptions {
            format: Format::Qcow2,
            size: 1 << 20,
            cluster_size: None,
            preallocation: Preallocation::Off,
            backing: None,
        },
    )
    .map_err(|e| disk_err(path, e))
}

pub fn internal_create(path: &Path, name: &str) -> Result<(), ApiError> {
    ferrovirt_disk::ops::snapshot_create(path, name)
        .map(|_| ())
        .map_err(|e| disk_err(path, e))
}

pub fn internal_apply(path: &Path, name: &str) -> Result<(), ApiError> {
    ferrovirt_disk::ops::snapshot_apply(path, name)
        .map(|_| ())
        .map_err(|e| disk_err(path, e))
}

pub fn internal_delete(path: &Path, name: &str) -> Result<(), ApiError> {
    ferrovirt_disk::ops::snapshot_delete(path, name)
        .map(|_| ())
        .map_err(|e| disk_err(path, e))
}

/// A private copy of `holder` with its internal snapshot `name` applied and its other internal
/// snapshots dropped: how a revert gets an internal snapshot's state when the holder itself
/// must not change (another snapshot or the current state needs it as it is).
pub fn internal_copy(holder: &Path, name: &str, to: &Path) -> Result<(), ApiError> {
    if to.exists() {
        return Err(storage(format!("{} already exists", to.display())));
    }
    std::fs::copy(holder, to).map_err(|e| {
        storage(format!(
            "copy {} to {}: {e}",
            holder.display(),
            to.display()
        ))
    })?;
    let done = (|| {
        internal_apply(to, name)?;
        for other in internal_names(to)? {
            internal_delete(to, &other)?;
        }
        Ok(())
    })();
    if done.is_err() {
        let _ = std::fs::remove_file(to);
    }
    done
}

/// What the snapshots and the current state refer to directly.
pub struct Refs {
    /// Images whose content must stay as it is: external snapshots' states, the current tops.
    pub states: BTreeSet<PathBuf>,
    /// Images holding internal snapshots (their active content may change; the file stays).
    pub holders: BTreeSet<PathBuf>,
}

impl Refs {
    pub fn of(tree: &Tree, def: &DomainDef) -> Refs {
        let mut states = BTreeSet::new();
        let mut holders = BTreeSet::new();
        for s in tree.snaps.values() {
            for d in &s.info.disks {
                match (d.snapshot, &d.base, &d.file) {
                    (Location::External, Some(base), _) => {
                        states.insert(base.clone());
                    }
                    (Location::Internal, _, Some(file)) => {
                        holders.insert(file.clone());
                    }
                    _ => {}
                }
            }
        }
        for d in &def.disks {
            states.insert(d.path.clone());
        }
        Refs { states, holders }
    }

    pub fn needs(&self, p: &Path) -> bool {
        self.states.contains(p) || self.holders.contains(p)
    }
}

/// The running VM's part in [`collect`]: which images it has open and how to merge them.
pub trait LiveChain {
    /// The active image of the running disk (of `def`, the definition as it is now) whose
    /// chain contains `image`, if any.
    fn active_over(&self, def: &DomainDef, image: &Path) -> Option<PathBuf>;
    /// Merge `top` into its backing file `base` in the running VM.
    fn commit(&self, active: &Path, top: &Path, base: &Path) -> Result<(), ApiError>;
}

/// Replace every reference to `from` by `to` (after `from` was merged into `to`).
fn replace_refs(tree: &mut Tree, def: &mut DomainDef, from: &Path, to: &Path) {
    for s in tree.snaps.values_mut() {
        for d in &mut s.info.disks {
            if d.base.as_deref() == Some(from) {
                d.base = Some(to.to_path_buf());
            }
        }
    }
    for d in &mut def.disks {
        if d.path == from {
            d.path = to.to_path_buf();
        }
    }
}

/// Delete the overlays nobody needs and merge chains back (see the module comment). Returns
/// what it did, for the daemon's log.
pub fn collect(
    tree: &mut Tree,
    def: &mut DomainDef,
    live: Option<&dyn LiveChain>,
) -> Result<Vec<String>, ApiError> {
    let mut log = Vec::new();
    // Each round changes one image; a tree has few, so this ends quickly.
    for _ in 0..256 {
        let refs = Refs::of(tree, def);
        let known: BTreeSet<PathBuf> = tree
            .owned
            .iter()
            .chain(refs.states.iter())
            .chain(refs.holders.iter())
            .filter(|p| p.exists())
            .cloned()
            .collect();
        let mut backing = Vec::new();
        for p in &known {
            backing.push((p.clone(), backing_of(p)?));
        }
        let dependents = |b: &Path| -> Vec<PathBuf> {
            backing
                .iter()
                .filter(|(_, bk)| bk.as_deref() == Some(b))
                .map(|(p, _)| p.clone())
                .collect()
        };
        // 1. An overlay of ours that nothing needs and nothing is based on: delete it.
        if let Some(orphan) = tree
            .owned
            .iter()
            .find(|p| !refs.needs(p) && dependents(p).is_empty())
            .cloned()
        {
            if orphan.exists() {
                std::fs::remove_file(&orphan)
                    .map_err(|e| storage(format!("remove {}: {e}", orphan.display())))?;
                log.push(format!("deleted {}", orphan.display()));
            }
            tree.owned.remove(&orphan);
            continue;
        }
        // 2. An image nothing needs whose only dependent is an overlay of ours: merge down.
        let mut merge = None;
        for (c, b) in &backing {
            let Some(b) = b else { continue };
            if !tree.owned.contains(c) || refs.needs(b) || refs.holders.contains(c) {
                continue;
            }
            // Only into the domain's own images: a shared base below them is never written.
            if !tree.owned.contains(b) && !tree.adopted.contains(b) {
                continue;
            }
            if dependents(b).len() != 1 || !internal_names(c)?.is_empty() {
                continue;
            }
            merge = Some((c.clone(), b.clone()));
            break;
        }
        let Some((top, base)) = merge else {
            return Ok(log);
        };
        let above = dependents(&top);
        match live.and_then(|l| l.active_over(def, &top).map(|a| (l, a))) {
            Some((l, active)) => {
                l.commit(&active, &top, &base)?;
                // QEMU rewrote the backing name of the image above `top` in its chain; the
                // others (other branches) are rebased here.
                for d in above.iter().filter(|d| l.active_over(def, d).is_none()) {
                    rebase_unsafe(d, &base)?;
                }
            }
            None => {
                ferrovirt_disk::ops::commit(&top).map_err(|e| disk_err(&top, e))?;
                for d in &above {
                    rebase_unsafe(d, &base)?;
                }
            }
        }
        replace_refs(tree, def, &top, &base);
        std::fs::remove_file(&top)
            .map_err(|e| storage(format!("remove {}: {e}", top.display())))?;
        tree.owned.remove(&top);
        log.push(format!("merged {} into {}", top.display(), base.display()));
    }
    Ok(log)
}

/// Point `image` at `base` without copying: their contents are the same (after a commit).
fn rebase_unsafe(image: &Path, base: &Path) -> Result<(), ApiError> {
    let fmt = match format_of(base)?.as_str() {
        "qcow2" => Format::Qcow2,
        _ => Format::Raw,
    };
    ferrovirt_disk::ops::rebase(image, &base.to_string_lossy(), Some(fmt), true)
        .map_err(|e| disk_err(image, e))
}
