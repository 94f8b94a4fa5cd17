//! The `test` driver: an in-process simulated hypervisor (like libvirt's test:///default).
//! Guests "run" instantly and obey shutdown at once, so the daemon's logic can be tested fast.

use std::path::Path;

use ferrovirt_api::{ApiError, DomainDef};

use super::{Driver, Started, VmCtx};
use crate::runtime::{ExitKind, Runtime};

pub struct TestDriver;

impl Driver for TestDriver {
    fn start(&self, ctx: VmCtx) -> Result<Started, ApiError> {
        Ok(Started {
            runtime: Runtime {
                id: ctx.id,
                pid: None,
                vnc_port: None,
                engine: None,
            },
            console: None,
        })
    }

    fn reattach(&self, _ctx: VmCtx, runtime: &Runtime) -> Option<Started> {
        // A simulated guest lives in the daemon's memory: it cannot survive a daemon restart,
        // except that the test hypervisor is defined to keep its guests running (like a real one).
        Some(Started {
            runtime: runtime.clone(),
            console: None,
        })
    }

    fn destroy(
        &self,
        _def: &DomainDef,
        _vm_dir: &Path,
        _runtime: &Runtime,
    ) -> Result<(), ApiError> {
        Ok(())
    }

    fn shutdown(&self, _: &DomainDef, _: &Path, _: &Runtime) -> Result<Option<ExitKind>, ApiError> {
        Ok(Some(ExitKind::Poweroff))
    }

    fn suspend(&self, _: &DomainDef, _: &Path, _: &Runtime) -> Result<(), ApiError> {
        Ok(())
    }

    fn resume(&self, _: &DomainDef, _: &Path, _: &Runtime) -> Result<(), ApiError> {
        Ok(())
    }

    fn reset(&self, _: &DomainDef, _: &Path, _: &Runtime) -> Result<(), ApiError> {
        Ok(())
    }

    fn check(&self, _def: &DomainDef) -> Result<(), ApiError> {
        Ok(())
    }
}
