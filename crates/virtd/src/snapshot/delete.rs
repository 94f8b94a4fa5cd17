//! snapshot-delete: forget the snapshot (its children move up to its parent), drop its internal
//! snapshots and memory file, then let images::collect merge or delete what nothing needs any
//! more, online through the driver when the image is in the running VM's chain.

use std::time::Duration;

use ferrovirt_api::snapshot::Location;
use ferrovirt_api::ApiError;

use super::images;
use super::{no_snapshot, Running};
use crate::manager::Manager;

/// What to delete.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeleteWhat {
    /// The snapshot and all its descendants (--children).
    pub children: bool,
    /// Only its descendants (--children-only).
    pub children_only: bool,
    /// Only the metadata: every image and file stays (--metadata).
    pub metadata_only: bool,
}

impl Manager {
    /// `DELETE /v1/domains/{name}/snapshots/{snap}`.
    pub fn snapshot_delete(
        &self,
        domain: &str,
        snap: &str,
        what: DeleteWhat,
        wait: Option<Duration>,
    ) -> Result<(), ApiError> {
        let snap = snap.to_string();
        self.feature_job(
            domain,
            "snapshot-delete",
            false,
            wait,
            self.feature_limit(),
            move |mgr, job, deadline, dom| {
                let mut tree = mgr.snapshots.load(&dom.name)?;
                if !tree.snaps.contains_key(&snap) {
                    return Err(no_snapshot(&dom.name, &snap));
                }
                let mut victims = Vec::new();
                if what.children || what.children_only {
                    victims.extend(tree.descendants(&snap));
                }
                if !what.children_only {
                    victims.push(snap.clone());
                }
                let active = dom.state.is_active();
                let vm_dir = mgr.paths.vm_dir(&dom.name);
                let running = Running {
                    driver: &*dom.driver,
                    def: &dom.def,
                    runtime: &dom.runtime,
                    vm_dir: &vm_dir,
                    deadline,
                };
                for v in &victims {
                    let Some(gone) = tree.snaps.remove(v) else {
                        continue;
                    };
                    for s in tree.snaps.values_mut() {
                        if s.info.parent.as_deref() == Some(v.as_str()) {
                            s.info.parent = gone.info.parent.clone();
                        }
                    }
                    if tree.current.as_deref() == Some(v.as_str()) {
                        tree.current = gone.info.parent.clone();
                    }
                    if what.metadata_only {
                        continue;
                    }
                    for d in gone.info.disks.iter().filter(|d| d.snapshot == Location::Internal) {
                        let Some(holder) = &d.file else { continue };
                        if !holder.exists() {
                            continue;
                        }
                        let is_top = dom.def.disks.iter().any(|x| &x.path == holder);
                        let in_chain = active && images::LiveChain::active_over(&running, &dom.def, holder).is_some();
                        if active && is_top {
                            dom.driver
                                .delete_internal_live(&dom.vm(&vm_dir, deadline), holder, v)?;
                        } else if in_chain {
                            // Open read-only by the running VM: the snapshot stays in the file
                            // (it costs space only) rather than change an image QEMU reads.
                            eprintln!(
                                "ferrovirtd: domain '{}': internal snapshot '{v}' stays in {} (a backing file of the running VM)",
                                dom.name,
                                holder.display()
                            );
                        } else {
                            images::internal_delete(holder, v)?;
                        }
                    }
                    if let Some(m) = &gone.info.memory_file {
                        let _ = std::fs::remove_file(m);
                    }
                }
                let mut def = dom.def.clone();
                if !what.metadata_only {
                    super::phase(job, "merging and removing images");
                    let live = active.then_some(&running as &dyn images::LiveChain);
                    let log = images::collect(&mut tree, &mut def, live)?;
                    for line in log {
                        eprintln!("ferrovirtd: domain '{}': {line}", dom.name);
                    }
                }
                if def != dom.def {
                    mgr.commit_definition(&dom.name, job, def)?;
                }
                mgr.snapshots.store.save(&dom.name, &tree)
            },
        )
    }
}
