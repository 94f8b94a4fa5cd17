//! Snapshots of a running QEMU over QMP (QEMU 7.2).
//!
//! Memory goes into a small qcow2 image of its own through `snapshot-save` (vmstate node and
//! device list: only that image), not through a migration to a file: a finished migration
//! leaves the source's block nodes inactive until the next `cont`, which is what makes block
//! jobs on a paused VM fail in libvirt ("Block node is read-only"). snapshot-save keeps them
//! active. Revert starts a fresh QEMU with `-S`, that image attached, and runs `snapshot-load`.
//!
//! Disks are found by the image they have open (`query-block`), images by file name
//! (`query-named-block-nodes`): the definition's `-drive`s get QEMU's automatic names.

use std::path::Path;
use std::time::Duration;

use ferrovirt_api::ApiError;
use serde_json::{json, Value};

use super::{QemuDriver, SOCKET_APPEARS};
use crate::deadline::Deadline;
use crate::driver::qmp::Qmp;
use crate::driver::{LiveDiskKind, LiveDiskSnapshot, Started, VmCtx, VmRef};
use crate::files::same_file;
use crate::runtime::kill;

/// The block node of a memory image while it is attached.
const MEMORY_NODE: &str = "fv-memory";

fn memory_blockdev(path: &Path) -> Value {
    json!({
        "node-name": MEMORY_NODE,
        "driver": "qcow2",
        "file": {"driver": "file", "filename": path.to_string_lossy()},
    })
}

/// The QEMU device (BlockBackend name) whose active image is `image`.
fn device_of(qmp: &mut Qmp, image: &Path, deadline: &Deadline) -> Result<String, ApiError> {
    let blocks = qmp.execute("query-block", None, deadline)?;
    for b in blocks.as_array().into_iter().flatten() {
        let file = b.pointer("/inserted/file").and_then(Value::as_str);
        if file.is_some_and(|f| Path::new(f) == image || same_file(Path::new(f), image)) {
            if let Some(d) = b.get("device").and_then(Value::as_str) {
                return Ok(d.to_string());
            }
        }
    }
    Err(ApiError::driver(format!(
        "the running VM has no disk with {} open (was it changed behind ferrovirtd?)",
        image.display()
    )))
}

/// The format node (qcow2/raw, not the protocol node) of `image`.
fn node_of(qmp: &mut Qmp, image: &Path, deadline: &Deadline) -> Result<String, ApiError> {
    let nodes = qmp.execute("query-named-block-nodes", None, deadline)?;
    for n in nodes.as_array().into_iter().flatten() {
        let drv = n.get("drv").and_then(Value::as_str).unwrap_or("");
        let file = n.get("file").and_then(Value::as_str);
        if drv != "file"
            && file.is_some_and(|f| Path::new(f) == image || same_file(Path::new(f), image))
        {
            if let Some(name) = n.get("node-name").and_then(Value::as_str) {
                return Ok(name.to_string());
            }
        }
    }
    Err(ApiError::driver(format!(
        "the running VM has no block node for {}",
        image.display()
    )))
}

/// Poll a job until it reaches `until` (or concluded); an error of the job is returned.
/// The job is dismissed once concluded. On the deadline (or a cancel) it is cancelled.
fn wait_job(qmp: &mut Qmp, id: &str, until: &str, deadline: &Deadline) -> Result<(), ApiError> {
    loop {
        let jobs = qmp.execute("query-jobs", None, deadline)?;
        let job = jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j.get("id").and_then(Value::as_str) == Some(id))
            .cloned();
        let Some(job) = job else {
            return Err(ApiError::driver(format!("QEMU job {id} vanished")));
        };
        let status = job.get("status").and_then(Value::as_str).unwrap_or("");
        if status == "concluded" {
            let _ = qmp.execute("job-dismiss", Some(json!({ "id": id })), deadline);
            if let Some(err) = job.get("error").and_then(Value::as_str) {
                return Err(ApiError::driver(format!("QEMU job {id}: {err}")));
            }
            return Ok(());
        }
        if status == until {
            return Ok(());
        }
        if let Err(e) = deadline.check() {
            let cancel = Deadline::after(Duration::from_secs(5), "job-cancel");
            let _ = qmp.execute("job-cancel", Some(json!({ "id": id })), &cancel);
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_running(qmp: &mut Qmp, deadline: &Deadline) -> Result<bool, ApiError> {
    let st = qmp.execute("query-status", None, deadline)?;
    Ok(st.get("running").and_then(Value::as_bool).unwrap_or(false))
}

impl QemuDriver {
    fn qmp(&self, vm: &VmRef) -> Result<Qmp, ApiError> {
        Qmp::connect(&vm.vm_dir.join("qmp.sock"), SOCKET_APPEARS, vm.deadline)
    }

    pub(super) fn snapshot_running(
        &self,
        vm: &VmRef,
        disks: &[LiveDiskSnapshot],
        memory: Option<(&Path, &str)>,
    ) -> Result<(), ApiError> {
        let deadline = vm.deadline;
        let mut qmp = self.qmp(vm)?;
        let mut actions = Vec::new();
        for d in disks {
            let device = device_of(&mut qmp, &d.current, deadline)?;
            actions.push(match &d.kind {
                LiveDiskKind::External { overlay } => json!({
                    "type": "blockdev-snapshot-sync",
                    "data": {"device": device, "snapshot-file": overlay.to_string_lossy(),
                             "format": "qcow2", "mode": "existing"},
                }),
                LiveDiskKind::Internal { name } => json!({
                    "type": "blockdev-snapshot-internal-sync",
                    "data": {"device": device, "name": name},
                }),
            });
        }
        let was_running = is_running(&mut qmp, deadline)?;
        if memory.is_some() && was_running {
            qmp.execute("stop", None, deadline)?;
        }
        let result = (|| {
            if let Some((file, tag)) = memory {
                qmp.execute("blockdev-add", Some(memory_blockdev(file)), deadline)?;
                let saved = qmp
                    .execute(
                        "snapshot-save",
                        Some(
                            json!({"job-id": "fv-save", "tag": tag, "vmstate": MEMORY_NODE,
                                    "devices": [MEMORY_NODE]}),
                        ),
                        deadline,
                    )
                    .and_then(|_| wait_job(&mut qmp, "fv-save", "concluded", deadline));
                let detach = Deadline::after(Duration::from_secs(10), "detach the memory image");
                let detached = qmp.execute(
                    "blockdev-del",
                    Some(json!({ "node-name": MEMORY_NODE })),
                    &detach,
                );
                saved?;
                detached?;
            }
            if !actions.is_empty() {
                qmp.execute("transaction", Some(json!({ "actions": actions })), deadline)?;
            }
            Ok(())
        })();
        if memory.is_some() && was_running {
            // Whatever happened, a VM that ran runs on (on its old disks if the snapshot failed).
            let resume = Deadline::after(Duration::from_secs(10), "resume after the snapshot");
            let resumed = qmp.execute("cont", None, &resume);
            result?;
            resumed?;
            return Ok(());
        }
        result
    }

    pub(super) fn start_loading(
        &self,
        ctx: VmCtx,
        memory: &Path,
        tag: &str,
    ) -> Result<Started, ApiError> {
        let dir = ctx.vm_dir.clone();
        let deadline = ctx.deadline.clone();
        let blockdev = format!(
            "driver=qcow2,node-name={MEMORY_NODE},file.driver=file,file.filename={}",
            memory.to_string_lossy().replace(',', ",,")
        );
        let started = self.launch(ctx, &["-S", "-blockdev", &blockdev])?;
        let loaded = (|| {
            let mut qmp = Qmp::connect(&dir.join("qmp.sock"), SOCKET_APPEARS, &deadline)?;
            qmp.execute(
                "snapshot-load",
                Some(
                    json!({"job-id": "fv-load", "tag": tag, "vmstate": MEMORY_NODE,
                            "devices": [MEMORY_NODE]}),
                ),
                &deadline,
            )?;
            wait_job(&mut qmp, "fv-load", "concluded", &deadline)?;
            qmp.execute(
                "blockdev-del",
                Some(json!({ "node-name": MEMORY_NODE })),
                &deadline,
            )?;
            Ok(())
        })();
        if let Err(e) = loaded {
            if let Some(pid) = started.runtime.pid {
                kill(pid, libc::SIGKILL);
            }
            return Err(e);
        }
        Ok(started)
    }

    pub(super) fn commit_running(
        &self,
        vm: &VmRef,
        active: &Path,
        top: &Path,
        base: &Path,
    ) -> Result<(), ApiError> {
        let deadline = vm.deadline;
        let mut qmp = self.qmp(vm)?;
        let device = device_of(&mut qmp, active, deadline)?;
        let base_node = node_of(&mut qmp, base, deadline)?;
        let mut args = json!({"job-id": "fv-commit", "device": device, "base-node": base_node,
                              "auto-dismiss": false});
        let is_active = top == active || same_file(top, active);
        if !is_active {
            args["top-node"] = json!(node_of(&mut qmp, top, deadline)?);
        }
        qmp.execute("block-commit", Some(args), deadline)?;
        if is_active {
            // An active commit mirrors new writes until told to pivot onto the base.
            wait_job(&mut qmp, "fv-commit", "ready", deadline)?;
            qmp.execute("job-complete", Some(json!({"id": "fv-commit"})), deadline)?;
        }
        wait_job(&mut qmp, "fv-commit", "concluded", deadline)
    }

    pub(super) fn delete_internal_running(
        &self,
        vm: &VmRef,
        image: &Path,
        name: &str,
    ) -> Result<(), ApiError> {
        let mut qmp = self.qmp(vm)?;
        let device = device_of(&mut qmp, image, vm.deadline)?;
        qmp.execute(
            "blockdev-snapshot-delete-internal-sync",
            Some(json!({"device": device, "name": name})),
            vm.deadline,
        )
        .map(|_| ())
    }
}
