//! snapshot-create(-as): check everything first (one clear error, nothing changed), make the
//! files, take the snapshot (disk library for a shut-off domain, the driver for a running VM),
//! then record it. A failure after files were made removes them again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrovirt_api::def::DiskDevice;
use ferrovirt_api::snapshot::{
    Location, SnapshotDisk, SnapshotInfo, SnapshotRequest, SnapshotResponse, SnapshotState,
};
use ferrovirt_api::{ApiError, DomainState, ErrorCode};

use super::images::{self, storage};
use super::store::Stored;
use super::{check_description, check_name};
use crate::driver::{LiveDiskKind, LiveDiskSnapshot};
use crate::manager::{DomainCopy, Manager};
use crate::runtime::now_ms;

/// One disk's part of the plan.
struct DiskPlan {
    target: String,
    current: PathBuf,
    format: String,
    kind: Location,
    /// External: the new overlay.
    overlay: Option<PathBuf>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidArgument, message)
}

/// Decide what happens to every disk; refuse bad input before anything is touched.
fn plan(dom: &DomainCopy, name: &str, req: &SnapshotRequest) -> Result<Vec<DiskPlan>, ApiError> {
    let targets: Vec<String> = (0..dom.def.disks.len())
        .map(|i| dom.def.disk_target(i))
        .collect();
    for spec in &req.disks {
        if !targets.contains(&spec.target) {
            return Err(invalid(format!(
                "domain '{}' has no disk '{}' (its disks: {})",
                dom.name,
                spec.target,
                targets.join(", ")
            )));
        }
    }
    let mut out = Vec::new();
    for (d, target) in dom.def.disks.iter().zip(targets) {
        let spec = req.disks.iter().find(|s| s.target == target);
        let fixed = d.readonly || d.device == DiskDevice::Cdrom;
        let kind = match spec {
            Some(s) => s.snapshot,
            None if fixed => Location::No,
            None => Location::External,
        };
        if kind != Location::No && fixed {
            return Err(invalid(format!(
                "disk {target} is read-only (or a CD-ROM): it cannot have a snapshot; use --diskspec {target},snapshot=no"
            )));
        }
        let format = if kind == Location::No {
            String::new()
        } else {
            images::format_of(&d.path)?
        };
        let overlay = match kind {
            Location::External => {
                let file = match spec.and_then(|s| s.file.clone()) {
                    Some(f) if !f.is_absolute() => {
                        return Err(invalid(format!(
                            "the overlay file of {target} must be an absolute path (got {})",
                            f.display()
                        )))
                    }
                    Some(f) => f,
                    None => d
                        .path
                        .parent()
                        .unwrap_or(Path::new("/"))
                        .join(format!("{}-{target}.{name}.qcow2", dom.name)),
                };
                if file.exists() {
                    return Err(storage(format!(
                        "the overlay file {} for {target} already exists; remove it or name another with --diskspec {target},file=PATH",
                        file.display()
                    )));
                }
                Some(file)
            }
            Location::Internal => {
                if format != "qcow2" {
                    return Err(invalid(format!(
                        "disk {target} ({}) is a {format} image: only qcow2 images can hold an internal snapshot; use --diskspec {target},snapshot=external",
                        d.path.display()
                    )));
                }
                if images::internal_names(&d.path)?.iter().any(|n| n == name) {
                    return Err(storage(format!(
                        "{} already holds an internal snapshot named '{name}'",
                        d.path.display()
                    )));
                }
                None
            }
            Location::No => None,
        };
        out.push(DiskPlan {
            target,
            current: d.path.clone(),
            format,
            kind,
            overlay,
        });
    }
    let overlays: Vec<&PathBuf> = out.iter().filter_map(|p| p.overlay.as_ref()).collect();
    if overlays
        .iter()
        .enumerate()
        .any(|(i, a)| overlays[..i].contains(a))
    {
        return Err(invalid("two disks would get the same overlay file"));
    }
    if out.iter().all(|p| p.kind == Location::No) {
        return Err(invalid(format!(
            "domain '{}' has no disk to snapshot (every disk is snapshot=no)",
            dom.name
        )));
    }
    Ok(out)
}

/// Remove what a failed snapshot made.
fn undo(plan: &[DiskPlan], made: &[PathBuf], name: &str, internal_done: bool) {
    for f in made {
        let _ = std::fs::remove_file(f);
    }
    if internal_done {
        for p in plan.iter().filter(|p| p.kind == Location::Internal) {
            let _ = images::internal_delete(&p.current, name);
        }
    }
}

impl Manager {
    /// `POST /v1/domains/{name}/snapshots`.
    pub fn snapshot_create(
        &self,
        domain: &str,
        req: SnapshotRequest,
        wait: Option<Duration>,
    ) -> Result<SnapshotResponse, ApiError> {
        if req.quiesce {
            return Err(ApiError::not_supported(
                "--quiesce needs a guest agent, and ferrovirt has none yet; take the snapshot without --quiesce (crash-consistent) or sync in the guest first",
            ));
        }
        check_description(&req.description)?;
        let created = now_ms();
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| (created / 1000).to_string());
        check_name(&name)?;
        let info = self.feature_job(
            domain,
            "snapshot-create",
            true,
            wait,
            self.feature_limit(),
            move |mgr, job, deadline, dom| {
                let mut tree = mgr.snapshots.load(&dom.name)?;
                if tree.snaps.contains_key(&name) {
                    return Err(ApiError::new(
                        ErrorCode::OperationInvalid,
                        format!("domain '{}' already has a snapshot '{name}'", dom.name),
                    ));
                }
                let plan = plan(&dom, &name, &req)?;
                let active = dom.state.is_active();
                let with_memory =
                    active && !req.disk_only && req.memory != Some(Location::No);
                let state = match (active, with_memory, dom.state) {
                    (false, _, _) => SnapshotState::Shutoff,
                    (true, false, _) => SnapshotState::DiskSnapshot,
                    (true, true, DomainState::Paused) => SnapshotState::Paused,
                    (true, true, _) => SnapshotState::Running,
                };
                let memory = if with_memory {
                    let file = match &req.memory_file {
                        Some(f) if !f.is_absolute() => {
                            return Err(invalid(format!(
                                "the memory file must be an absolute path (got {})",
                                f.display()
                            )))
                        }
                        Some(f) => f.clone(),
                        None => mgr
                            .snapshots
                            .memory_dir(&dom.name)
                            .join(format!("{name}.mem")),
                    };
                    if file.exists() {
                        return Err(storage(format!(
                            "the memory file {} already exists; remove it or name another with --memspec file=PATH",
                            file.display()
                        )));
                    }
                    Some(file)
                } else {
                    None
                };
                // Files first; nothing of the domain changed yet.
                let mut made = Vec::new();
                let prepared = (|| {
                    for p in &plan {
                        if let Some(o) = &p.overlay {
                            images::create_overlay(o, &p.current)?;
                            made.push(o.clone());
                        }
                    }
                    if let Some(m) = &memory {
                        if let Some(dir) = m.parent() {
                            crate::files::private_dir(dir).map_err(storage)?;
                        }
                        images::create_memory_image(m)?;
                        made.push(m.clone());
                    }
                    deadline.check()
                })();
                if let Err(e) = prepared {
                    undo(&plan, &made, &name, false);
                    return Err(e);
                }
                let taken = if active {
                    let live: Vec<LiveDiskSnapshot> = plan
                        .iter()
                        .filter_map(|p| {
                            let kind = match p.kind {
                                Location::External => LiveDiskKind::External {
                                    overlay: p.overlay.clone()?,
                                },
                                Location::Internal => LiveDiskKind::Internal { name: name.clone() },
                                Location::No => return None,
                            };
                            Some(LiveDiskSnapshot {
                                current: p.current.clone(),
                                kind,
                            })
                        })
                        .collect();
                    let vm_dir = mgr.paths.vm_dir(&dom.name);
                    super::phase(
                        job,
                        if with_memory {
                            "saving memory and disks"
                        } else {
                            "switching disks to overlays"
                        },
                    );
                    dom.driver.snapshot_live(
                        &dom.vm(&vm_dir, deadline),
                        &live,
                        memory.as_deref().map(|m| (m, name.as_str())),
                    )
                } else {
                    plan.iter()
                        .filter(|p| p.kind == Location::Internal)
                        .try_for_each(|p| images::internal_create(&p.current, &name))
                };
                if let Err(e) = taken {
                    undo(&plan, &made, &name, !active);
                    return Err(e);
                }
                // The VM (or the next start) continues on the overlays.
                let mut def = dom.def.clone();
                for (d, p) in def.disks.iter_mut().zip(&plan) {
                    if let Some(o) = &p.overlay {
                        d.path = o.clone();
                    }
                }
                if def != dom.def {
                    mgr.commit_definition(&dom.name, job, def)?;
                }
                let disks = plan
                    .iter()
                    .map(|p| SnapshotDisk {
                        target: p.target.clone(),
                        snapshot: p.kind,
                        file: match p.kind {
                            Location::External => p.overlay.clone(),
                            Location::Internal => Some(p.current.clone()),
                            Location::No => None,
                        },
                        base: (p.kind == Location::External).then(|| p.current.clone()),
                        format: (p.kind != Location::No).then(|| p.format.clone()),
                    })
                    .collect();
                let info = SnapshotInfo {
                    name: name.clone(),
                    domain: dom.name.clone(),
                    parent: tree.current.clone(),
                    created_ms: created,
                    state,
                    description: req.description.clone(),
                    memory_file: memory,
                    disks,
                    current: true,
                    children: Vec::new(),
                    descendants: 0,
                    domain_xml: None,
                };
                if req.no_metadata {
                    return Ok(info);
                }
                tree.owned.extend(plan.iter().filter_map(|p| p.overlay.clone()));
                tree.adopted.extend(
                    plan.iter()
                        .filter(|p| p.kind != Location::No && !tree.owned.contains(&p.current))
                        .map(|p| p.current.clone()),
                );
                tree.snaps.insert(
                    name.clone(),
                    Stored {
                        info: info.clone(),
                        def: dom.def.clone(),
                    },
                );
                tree.current = Some(name.clone());
                mgr.snapshots.store.save(&dom.name, &tree)?;
                Ok(info)
            },
        )?;
        Ok(SnapshotResponse {
            domain: self.domain_info(&info.domain)?,
            snapshot: Some(info),
        })
    }
}
