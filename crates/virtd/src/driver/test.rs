//! The `test` driver: an in-process simulated hypervisor (like libvirt's test:///default).
//! Guests "run" instantly and obey shutdown at once, so the daemon's logic can be tested fast.

use ferrovirt_api::{ApiError, DomainDef};

use std::io::{Read, Write};

use super::{Driver, Progress, Started, VmCtx, VmRef};
use crate::runtime::{ExitKind, Runtime};

pub struct TestDriver;

/// The whole "memory" of a simulated guest, as its save payload.
const STATE: &[u8] = b"ferrovirt test driver state\n";

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

    fn save(
        &self,
        _vm: &VmRef,
        out: &mut std::fs::File,
        progress: Progress,
    ) -> Result<(), ApiError> {
        out.write_all(STATE)
            .map_err(|e| ApiError::driver(format!("cannot write the state: {e}")))?;
        progress(STATE.len() as u64, Some(STATE.len() as u64));
        Ok(())
    }

    fn restore(
        &self,
        ctx: VmCtx,
        input: &mut std::fs::File,
        len: u64,
        _progress: Progress,
    ) -> Result<Started, ApiError> {
        let mut state = Vec::new();
        input
            .take(len.min(STATE.len() as u64 + 1))
            .read_to_end(&mut state)
            .map_err(|e| ApiError::driver(format!("cannot read the state: {e}")))?;
        if state != STATE {
            return Err(ApiError::driver("the saved state is not a test driver's"));
        }
        self.start(ctx)
    }
}
