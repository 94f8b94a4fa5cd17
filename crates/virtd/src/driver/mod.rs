//! Hypervisor drivers: `test` (in-process simulation), `qemu` (qemu-system-x86_64 over QMP),
//! `kvm` (ferrovmm over its API socket). The manager finds them in a [`registry::Drivers`].
//!
//! Every call that waits on a VM carries a [`Deadline`]: a driver never blocks past it.

pub mod kvm;
pub mod qemu;
pub mod qmp;
pub mod registry;
pub mod test;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrovirt_api::{ApiError, DomainDef};

use crate::console::ConsoleHub;
use crate::deadline::Deadline;
use crate::runtime::{kill_and_wait, pid_alive, pid_has_arg, ExitKind, Runtime};

/// Called once by a driver's monitor when the VM ends by itself (not through destroy).
pub type ExitNotifier = Box<dyn FnOnce(ExitKind) + Send>;

/// What a driver needs to start or reattach a VM.
pub struct VmCtx<'a> {
    pub def: &'a DomainDef,
    pub id: u32,
    /// Per-VM runtime folder (sockets, pidfile, VMM log), exists.
    pub vm_dir: PathBuf,
    pub console_log: PathBuf,
    pub on_exit: ExitNotifier,
    /// The start (or reattach) must be done by then; it also carries the job's cancel token.
    pub deadline: Deadline,
}

/// A running VM, for the operations on it.
pub struct VmRef<'a> {
    pub def: &'a DomainDef,
    pub vm_dir: &'a Path,
    pub runtime: &'a Runtime,
    pub deadline: &'a Deadline,
}

/// How far a save or restore got: (bytes done, total when known). Called from the driver's
/// thread; the manager shows it as the job's progress.
pub type Progress<'a> = &'a (dyn Fn(u64, Option<u64>) + Sync);

/// A started or reattached VM.
pub struct Started {
    pub runtime: Runtime,
    pub console: Option<Arc<ConsoleHub>>,
}

pub trait Driver: Send + Sync {
    /// Start the VM; returns once it runs.
    fn start(&self, ctx: VmCtx) -> Result<Started, ApiError>;
    /// Reconnect to a VM that was running when the daemon stopped; None when it is gone.
    fn reattach(&self, ctx: VmCtx, runtime: &Runtime) -> Option<Started>;
    /// Force the VM off; returns once the process is gone.
    fn destroy(&self, vm: &VmRef) -> Result<(), ApiError>;
    /// Ask the guest to power off (ACPI power button). Some(kind) when it ended right away.
    fn shutdown(&self, vm: &VmRef) -> Result<Option<ExitKind>, ApiError>;
    fn suspend(&self, vm: &VmRef) -> Result<(), ApiError>;
    fn resume(&self, vm: &VmRef) -> Result<(), ApiError>;
    /// Hard reset, the VM keeps running.
    fn reset(&self, vm: &VmRef) -> Result<(), ApiError>;
    /// Write the VM's memory and device state to `out` from its current position (the save
    /// file's payload; see crate::save). The VM is paused for it and stays paused on success
    /// (the manager then destroys it); on failure it runs (or stays paused) as before.
    fn save(
        &self,
        vm: &VmRef,
        out: &mut std::fs::File,
        progress: Progress,
    ) -> Result<(), ApiError> {
        let _ = (vm, out, progress);
        Err(ApiError::not_supported("this driver cannot save a VM"))
    }
    /// Start the VM from a payload `save::format::open` checked (`input` is at its start,
    /// `len` bytes long), paused: the manager resumes it unless asked not to.
    fn restore(
        &self,
        ctx: VmCtx,
        input: &mut std::fs::File,
        len: u64,
        progress: Progress,
    ) -> Result<Started, ApiError> {
        let _ = (ctx, input, len, progress);
        Err(ApiError::not_supported("this driver cannot restore a VM"))
    }
    /// Refuse a definition this driver cannot run, with a clear message (checked at define/start).
    fn check(&self, def: &DomainDef) -> Result<(), ApiError>;
    /// SIGKILL the VM process without talking to it: how destroy gets past an operation stuck
    /// on a VM that does not answer (its calls then fail at once). Only a live process whose
    /// command line names the domain is killed (a recorded pid may have been reused).
    fn kill(&self, vm: &VmRef) -> Result<(), ApiError> {
        match vm.runtime.pid {
            Some(pid) if pid_alive(pid) && pid_has_arg(pid, &vm.def.name) => {
                kill_and_wait(pid, "VM")
            }
            _ => Ok(()),
        }
    }

    // Snapshots of running VMs (crate::snapshot). Shut-off domains need no driver: their
    // images are changed with the disk library. A driver without these answers not_supported.

    /// Snapshot the running VM's disks atomically (external overlays are already created),
    /// after saving its memory into `memory` (a qcow2 image; internal snapshot `tag`) when
    /// given. The VM is paused while memory and disks are taken and continues if it ran.
    fn snapshot_live(
        &self,
        vm: &VmRef,
        disks: &[LiveDiskSnapshot],
        memory: Option<(&Path, &str)>,
    ) -> Result<(), ApiError> {
        let _ = (disks, memory);
        Err(live_snapshots_unsupported(vm))
    }

    /// Start the VM paused, its memory and devices loaded from `memory` (internal snapshot `tag`).
    fn start_from_memory(&self, ctx: VmCtx, memory: &Path, tag: &str) -> Result<Started, ApiError> {
        let _ = (memory, tag);
        Err(ApiError::not_supported(format!(
            "domain '{}': reverting to a snapshot with memory is not supported by the {} driver yet (the qemu driver has it)",
            ctx.def.name,
            ctx.def.virt_type.map(|t| t.as_str()).unwrap_or("this")
        )))
    }

    /// Merge image `top` of the running VM's disk whose active image is `active` into its
    /// backing file `base`; afterwards `base` takes `top`'s place in the chain.
    fn commit_live(
        &self,
        vm: &VmRef,
        active: &Path,
        top: &Path,
        base: &Path,
    ) -> Result<(), ApiError> {
        let _ = (active, top, base);
        Err(live_snapshots_unsupported(vm))
    }

    /// Delete the internal snapshot `name` of `image`, the active image of a running disk.
    fn delete_internal_live(&self, vm: &VmRef, image: &Path, name: &str) -> Result<(), ApiError> {
        let _ = (image, name);
        Err(live_snapshots_unsupported(vm))
    }
}

/// One disk of a live snapshot; the VM's disk is the one whose active image is `current`.
#[derive(Debug, Clone)]
pub struct LiveDiskSnapshot {
    pub current: PathBuf,
    pub kind: LiveDiskKind,
}

#[derive(Debug, Clone)]
pub enum LiveDiskKind {
    /// Switch the disk to this overlay (created, backed by `current`).
    External { overlay: PathBuf },
    /// An internal snapshot of `current` with this name.
    Internal { name: String },
}

fn live_snapshots_unsupported(vm: &VmRef) -> ApiError {
    let driver = vm
        .runtime
        .engine
        .map(|e| e.driver().as_str())
        .unwrap_or("this");
    ApiError::not_supported(format!(
        "domain '{}': snapshots of a running VM are not supported by the {driver} driver yet (the qemu driver has them); shut the domain off for a disk snapshot",
        vm.def.name
    ))
}
