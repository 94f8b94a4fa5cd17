//! snapshot-revert: the VM (if any) is taken down, every disk continues on a new image that
//! shows the snapshot's state (an overlay of its frozen image; for an internal snapshot the
//! holder itself when nothing else needs it as it is, else a private copy), the snapshot's
//! definition comes back, and a snapshot with memory starts again where it was. The images
//! the current state used before are dropped when nothing else needs them (images::collect).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrovirt_api::snapshot::{Location, RevertRequest, SnapshotResponse, SnapshotState};
use ferrovirt_api::{ApiError, DomainState, ErrorCode, StateReason};

use super::images::{self, Refs};
use super::no_snapshot;
use super::store::Tree;

use crate::manager::{DomainCopy, Manager};

/// A free file name beside `near` for a disk's new image after a revert.
fn fresh_image(near: &Path, domain: &str, target: &str, snap: &str) -> PathBuf {
    let dir = near.parent().unwrap_or(Path::new("/"));
    (1..)
        .map(|n| dir.join(format!("{domain}-{target}.{snap}.r{n}.qcow2")))
        .find(|p| !p.exists())
        .unwrap_or_else(|| dir.join(format!("{domain}-{target}.{snap}.qcow2")))
}

/// Whether the internal snapshot's holder may be rewound in place: no snapshot has it as its
/// frozen state, and no image but the current one (dropped by the revert) is based on it.
fn holder_is_free(tree: &Tree, dom: &DomainCopy, holder: &Path) -> Result<bool, ApiError> {
    let refs = Refs::of(tree, &dom.def);
    let snapshot_states: Vec<&PathBuf> = tree
        .snaps
        .values()
        .flat_map(|s| s.info.disks.iter())
        .filter(|d| d.snapshot == Location::External)
        .filter_map(|d| d.base.as_ref())
        .collect();
    if snapshot_states.iter().any(|b| b.as_path() == holder) {
        return Ok(false);
    }
    let current: Vec<&PathBuf> = dom.def.disks.iter().map(|d| &d.path).collect();
    for img in tree
        .owned
        .iter()
        .chain(refs.states.iter())
        .chain(refs.holders.iter())
    {
        if img.as_path() == holder || !img.exists() {
            continue;
        }
        // The current tops go away unless a snapshot holds them.
        let dropped = current.contains(&img) && !refs.holders.contains(img);
        if !dropped && images::backing_of(img)?.as_deref() == Some(holder) {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Manager {
    /// `POST /v1/domains/{name}/snapshots/{snap}/revert`.
    pub fn snapshot_revert(
        &self,
        domain: &str,
        snap: &str,
        req: RevertRequest,
        wait: Option<Duration>,
    ) -> Result<SnapshotResponse, ApiError> {
        if req.running && req.paused {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "--running and --paused exclude each other",
            ));
        }
        let snap = snap.to_string();
        let asked = snap.clone();
        let name = self.feature_job(
            domain,
            "snapshot-revert",
            false,
            wait,
            self.feature_limit(),
            move |mgr, job, deadline, dom| {
                let mut tree = mgr.snapshots.load(&dom.name)?;
                let target = tree
                    .snaps
                    .get(&snap)
                    .cloned()
                    .ok_or_else(|| no_snapshot(&dom.name, &snap))?;
                let s = &target.info;
                if let Some(m) = &s.memory_file {
                    if !m.exists() {
                        return Err(images::storage(format!(
                            "the memory file {} of snapshot '{snap}' is gone; revert is impossible (delete the snapshot)",
                            m.display()
                        )));
                    }
                }
                for d in &s.disks {
                    let img = match d.snapshot {
                        Location::External => d.base.as_ref(),
                        Location::Internal => d.file.as_ref(),
                        Location::No => None,
                    };
                    if let Some(img) = img.filter(|p| !p.exists()) {
                        return Err(images::storage(format!(
                            "image {} of snapshot '{snap}' is gone",
                            img.display()
                        )));
                    }
                }
                // Decide in-place rewinds while the current images still count as in use.
                let mut in_place = Vec::new();
                for d in s.disks.iter().filter(|d| d.snapshot == Location::Internal) {
                    if let Some(h) = &d.file {
                        if holder_is_free(&tree, &dom, h)? {
                            in_place.push(h.clone());
                        }
                    }
                }
                if dom.state.is_active() {
                    super::phase(job, "stopping the VM");
                    mgr.stop_for_job(&dom, job, deadline)?;
                }
                super::phase(job, "preparing the disks");
                let mut def = target.def.clone();
                def.name = dom.def.name.clone();
                def.uuid = dom.def.uuid.clone();
                for (i, disk) in def.disks.iter_mut().enumerate() {
                    let t = target.def.disk_target(i);
                    let Some(sd) = s.disks.iter().find(|d| d.target == t) else {
                        continue;
                    };
                    match (sd.snapshot, &sd.base, &sd.file) {
                        (Location::External, Some(base), _) => {
                            let img = fresh_image(base, &dom.name, &t, &snap);
                            images::create_overlay(&img, base)?;
                            tree.owned.insert(img.clone());
                            disk.path = img;
                        }
                        (Location::Internal, _, Some(holder)) if in_place.contains(holder) => {
                            images::internal_apply(holder, &snap)?;
                            disk.path = holder.clone();
                        }
                        (Location::Internal, _, Some(holder)) => {
                            let img = fresh_image(holder, &dom.name, &t, &snap);
                            images::internal_copy(holder, &snap, &img)?;
                            tree.owned.insert(img.clone());
                            disk.path = img;
                        }
                        _ => {
                            // Not in the snapshot: the disk keeps its current image.
                            if let Some(cur) = (0..dom.def.disks.len())
                                .find(|&j| dom.def.disk_target(j) == t)
                                .map(|j| dom.def.disks[j].path.clone())
                            {
                                disk.path = cur;
                            }
                        }
                    }
                }
                tree.current = Some(snap.clone());
                let log = images::collect(&mut tree, &mut def, None)?;
                for line in log {
                    eprintln!("ferrovirtd: domain '{}': {line}", dom.name);
                }
                mgr.commit_definition(&dom.name, job, def)?;
                mgr.snapshots.store.save(&dom.name, &tree)?;
                // Start again as the snapshot was (or as asked).
                let run = match (s.state, req.running, req.paused) {
                    (_, true, _) => Some(DomainState::Running),
                    (_, _, true) => Some(DomainState::Paused),
                    (SnapshotState::Running, _, _) => Some(DomainState::Running),
                    (SnapshotState::Paused, _, _) => Some(DomainState::Paused),
                    _ => None,
                };
                let Some(run) = run else {
                    return Ok(dom.name.clone());
                };
                let name = dom.name.clone();
                super::phase(job, "starting the VM");
                match &s.memory_file {
                    Some(memory) => {
                        let tag = snap.clone();
                        mgr.start_for_job(&name, job, deadline, &|driver, ctx| {
                            driver.start_from_memory(ctx, memory, &tag)
                        })?;
                    }
                    None => mgr.start_for_job(&name, job, deadline, &|driver, ctx| {
                        driver.start(ctx)
                    })?,
                }
                // The VM waits paused after loading its memory; a boot runs at once.
                let now = mgr.domain_info(&name)?;
                let fresh = DomainCopy {
                    state: now.state,
                    runtime: mgr.runtime_of(&name)?,
                    def: mgr.definition(&name)?,
                    ..dom
                };
                let vm_dir = mgr.paths.vm_dir(&name);
                let vm = fresh.vm(&vm_dir, deadline);
                match (run, s.memory_file.is_some()) {
                    (DomainState::Running, true) => {
                        fresh.driver.resume(&vm)?;
                        mgr.commit_state(&name, job, DomainState::Running, StateReason::FromSnapshot)?;
                    }
                    (DomainState::Paused, false) => {
                        fresh.driver.suspend(&vm)?;
                        mgr.commit_state(&name, job, DomainState::Paused, StateReason::FromSnapshot)?;
                    }
                    (DomainState::Paused, true) => {
                        mgr.commit_state(&name, job, DomainState::Paused, StateReason::FromSnapshot)?;
                    }
                    _ => {}
                }
                Ok(name)
            },
        )?;
        Ok(SnapshotResponse {
            snapshot: self.snapshot_get(&name, &asked).ok(),
            domain: self.domain_info(&name)?,
        })
    }
}
