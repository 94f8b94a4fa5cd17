//! Domain snapshots (libvirt's model and verbs): metadata in the daemon's store ([`store`]),
//! image files and the rule that protects them ([`images`]), and the operations, each a job of
//! its domain: [`create`], [`revert`], [`delete`]. [`api`] has the /v1 routes.
//!
//! A shut-off domain's snapshots are made with the disk library; a running VM's through its
//! driver (qemu: QMP, see driver/qemu/snapshot.rs). External snapshots (the default) freeze the
//! disk's image and continue on a new overlay; a revert always continues on a new overlay of
//! the snapshot's frozen image (or a private copy of an internal snapshot's holder), so any
//! snapshot can be reverted to, any number of times, and deleted afterwards in any order.

pub mod api;
mod create;
mod delete;
pub mod images;
mod revert;
pub mod store;

use std::path::{Path, PathBuf};

use ferrovirt_api::snapshot::{EditRequest, SnapshotInfo, MAX_DESCRIPTION};
use ferrovirt_api::{ApiError, DomainDef, ErrorCode};

use crate::deadline::Deadline;
use crate::driver::Driver;
use crate::manager::Manager;
use crate::runtime::{Paths, Runtime};
use images::LiveChain;
use store::{SnapStore, Tree};

/// The daemon's snapshot metadata (one per manager).
pub struct Snapshots {
    store: SnapStore,
    /// Default folder of memory files: state-dir/snapshots/DOMAIN/.
    dir: PathBuf,
}

pub fn no_snapshot(domain: &str, snap: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NoSnapshot,
        format!(
            "domain '{domain}' has no snapshot '{snap}' (see `ferrovirt snapshot-list {domain}`)"
        ),
    )
}

/// Show what a snapshot job does now (domjobinfo).
fn phase(job: &crate::manager::jobs::JobHandle, text: &str) {
    job.set_progress(Some(ferrovirt_api::JobProgress {
        phase: Some(text.to_string()),
        done: 0,
        total: None,
        unit: "steps".into(),
    }));
}

/// Snapshot names: what a domain name may be (they become parts of file names).
fn check_name(name: &str) -> Result<(), ApiError> {
    ferrovirt_api::def::validate_name(name).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidArgument,
            e.message.replace("domain name", "snapshot name"),
        )
    })
}

fn check_description(d: &Option<String>) -> Result<(), ApiError> {
    match d {
        Some(d) if d.len() > MAX_DESCRIPTION => Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("the description is longer than {MAX_DESCRIPTION} bytes"),
        )),
        _ => Ok(()),
    }
}

impl Snapshots {
    pub fn open(paths: &Paths) -> Result<Snapshots, String> {
        Ok(Snapshots {
            store: SnapStore::open(&paths.db())?,
            dir: paths.state_dir.join("snapshots"),
        })
    }

    fn memory_dir(&self, domain: &str) -> PathBuf {
        self.dir.join(domain)
    }

    /// undefine refuses a domain with snapshots unless asked to forget them (virsh).
    pub fn check_undefine(&self, domain: &str, forget: bool) -> Result<(), ApiError> {
        let n = self.store.count(domain)?;
        if n > 0 && !forget {
            return Err(ApiError::wrong_state(format!(
                "domain '{domain}' has {n} snapshot(s); delete them first or undefine with --snapshots-metadata (their images and memory files stay)"
            )));
        }
        Ok(())
    }

    /// Whether the store has anything about snapshots of `domain` (a read: no fsync).
    pub fn has_metadata(&self, domain: &str) -> Result<bool, ApiError> {
        self.store.has_any(domain)
    }

    pub fn forget_domain(&self, domain: &str) -> Result<(), ApiError> {
        self.store.forget(domain)
    }

    fn load(&self, domain: &str) -> Result<Tree, ApiError> {
        self.store.load(domain)
    }
}

/// The running VM as [`images::collect`] sees it.
struct Running<'a> {
    driver: &'a dyn Driver,
    def: &'a DomainDef,
    runtime: &'a Runtime,
    vm_dir: &'a Path,
    deadline: &'a Deadline,
}

impl LiveChain for Running<'_> {
    fn active_over(&self, def: &DomainDef, image: &Path) -> Option<PathBuf> {
        for d in &def.disks {
            let mut cur = Some(d.path.clone());
            for _ in 0..=ferrovirt_disk::MAX_BACKING_DEPTH {
                let Some(p) = cur else { break };
                if p == image {
                    return Some(d.path.clone());
                }
                cur = images::backing_of(&p).ok().flatten();
            }
        }
        None
    }

    fn commit(&self, active: &Path, top: &Path, base: &Path) -> Result<(), ApiError> {
        let vm = crate::driver::VmRef {
            def: self.def,
            vm_dir: self.vm_dir,
            runtime: self.runtime,
            deadline: self.deadline,
        };
        self.driver.commit_live(&vm, active, top, base)
    }
}

impl Manager {
    pub fn snapshot_list(&self, domain: &str) -> Result<Vec<SnapshotInfo>, ApiError> {
        let domain = self.resolve_name(domain)?;
        let tree = self.snapshots.load(&domain)?;
        let mut out: Vec<SnapshotInfo> = tree.snaps.keys().filter_map(|n| tree.info(n)).collect();
        out.sort_by(|a, b| (a.created_ms, &a.name).cmp(&(b.created_ms, &b.name)));
        Ok(out)
    }

    pub fn snapshot_get(&self, domain: &str, snap: &str) -> Result<SnapshotInfo, ApiError> {
        let domain = self.resolve_name(domain)?;
        let tree = self.snapshots.load(&domain)?;
        tree.info(snap).ok_or_else(|| no_snapshot(&domain, snap))
    }

    /// snapshot-dumpxml: the snapshot with the domain's definition at that time.
    pub fn snapshot_xml(&self, domain: &str, snap: &str) -> Result<String, ApiError> {
        let domain = self.resolve_name(domain)?;
        let tree = self.snapshots.load(&domain)?;
        let mut info = tree.info(snap).ok_or_else(|| no_snapshot(&domain, snap))?;
        let def = &tree.snaps[snap].def;
        info.domain_xml = Some(ferrovirt_api::xml::emit(def, self.default_type));
        Ok(info.to_xml())
    }

    pub fn snapshot_current(&self, domain: &str) -> Result<SnapshotInfo, ApiError> {
        let domain = self.resolve_name(domain)?;
        let tree = self.snapshots.load(&domain)?;
        let cur = tree.current.clone().ok_or_else(|| {
            ApiError::new(
                ErrorCode::NoSnapshot,
                format!("domain '{domain}' has no current snapshot"),
            )
        })?;
        tree.info(&cur).ok_or_else(|| no_snapshot(&domain, &cur))
    }

    /// snapshot-edit: the description, or make it the current snapshot.
    pub fn snapshot_edit(
        &self,
        domain: &str,
        snap: &str,
        req: EditRequest,
    ) -> Result<SnapshotInfo, ApiError> {
        check_description(&req.description)?;
        let snap = snap.to_string();
        self.feature_job(
            domain,
            "snapshot-edit",
            false,
            None,
            self.feature_limit(),
            move |mgr, _job, _deadline, dom| {
                let mut tree = mgr.snapshots.load(&dom.name)?;
                let s = tree
                    .snaps
                    .get_mut(&snap)
                    .ok_or_else(|| no_snapshot(&dom.name, &snap))?;
                if let Some(d) = req.description {
                    s.info.description = Some(d);
                }
                if req.current {
                    tree.current = Some(snap.clone());
                }
                mgr.snapshots.store.save(&dom.name, &tree)?;
                tree.info(&snap)
                    .ok_or_else(|| no_snapshot(&dom.name, &snap))
            },
        )
    }
}
