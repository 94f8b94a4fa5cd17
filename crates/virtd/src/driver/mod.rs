//! Hypervisor drivers: `test` (in-process simulation), `qemu` (qemu-system-x86_64 over QMP),
//! `kvm` (ferrovmm over its API socket).

pub mod kvm;
pub mod qemu;
pub mod qmp;
pub mod test;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrovirt_api::def::Accel;
use ferrovirt_api::{ApiError, DomainDef};

use crate::console::ConsoleHub;
use crate::runtime::{ExitKind, Runtime};

/// Called once by a driver's monitor when the VM ends by itself (not through destroy).
pub type ExitNotifier = Box<dyn FnOnce(ExitKind) + Send>;

/// What a driver needs to start or reattach a VM.
pub struct VmCtx<'a> {
    pub def: &'a DomainDef,
    pub id: u32,
    /// Per-VM runtime folder (sockets, pidfile, VMM log), exists.
    pub vm_dir: PathBuf,
    pub console_log: PathBuf,
    pub accel: Accel,
    pub on_exit: ExitNotifier,
}

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
    fn destroy(&self, def: &DomainDef, vm_dir: &Path, runtime: &Runtime) -> Result<(), ApiError>;
    /// Ask the guest to power off (ACPI power button). Some(kind) when it ended right away.
    fn shutdown(
        &self,
        def: &DomainDef,
        vm_dir: &Path,
        runtime: &Runtime,
    ) -> Result<Option<ExitKind>, ApiError>;
    fn suspend(&self, def: &DomainDef, vm_dir: &Path, runtime: &Runtime) -> Result<(), ApiError>;
    fn resume(&self, def: &DomainDef, vm_dir: &Path, runtime: &Runtime) -> Result<(), ApiError>;
    /// Hard reset, the VM keeps running.
    fn reset(&self, def: &DomainDef, vm_dir: &Path, runtime: &Runtime) -> Result<(), ApiError>;
    /// Refuse a definition this driver cannot run, with a clear message (checked at define/start).
    fn check(&self, def: &DomainDef) -> Result<(), ApiError>;
}
