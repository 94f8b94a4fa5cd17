//! The `test` driver: an in-process simulated hypervisor (like libvirt's test:///default).
//! Guests "run" instantly and obey shutdown at once, so the daemon's logic can be tested fast.

use ferrovirt_api::{ApiError, DomainDef};

use super::{Driver, Started, VmCtx, VmRef};
use crate::runtime::{ExitKind, Runtime};

pub struct TestDriver;

impl Driver for TestDriver {
    fn start(&self, ctx: VmCtx) -> Result<Started, ApiError> {
        Ok(Started {
            runtime: Runtime {
                id: ctx.id,
                pid: None,
                vnc_port: None,
                vnc_listen: None,
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

    fn destroy(&self, _vm: &VmRef) -> Result<(), ApiError> {
        Ok(())
    }

    fn shutdown(&self, _vm: &VmRef) -> Result<Option<ExitKind>, ApiError> {
        Ok(Some(ExitKind::Poweroff))
    }

    fn suspend(&self, _vm: &VmRef) -> Result<(), ApiError> {
        Ok(())
    }

    fn resume(&self, _vm: &VmRef) -> Result<(), ApiError> {
        Ok(())
    }

    fn reset(&self, _vm: &VmRef) -> Result<(), ApiError> {
        Ok(())
    }

    fn check(&self, _def: &DomainDef) -> Result<(), ApiError> {
        Ok(())
    }
}
