//! The driver set: `VirtType -> Arc<dyn Driver>`, built once from the host's capabilities and
//! handed to the manager, so a driver is added here and nowhere else (and a test can hand the
//! manager a fake one).

use std::sync::Arc;

use ferrovirt_api::host::HostVirt;
use ferrovirt_api::{ApiError, VirtType};

use super::kvm::KvmDriver;
use super::qemu::QemuDriver;
use super::test::TestDriver;
use super::Driver;

#[derive(Clone, Default)]
pub struct Drivers {
    entries: Vec<(VirtType, Arc<dyn Driver>)>,
}

impl Drivers {
    /// The drivers of this host: `test` always; `qemu` with KVM acceleration where the hardware
    /// has it and TCG elsewhere; `kvm` (ferrovmm), whose start says what is missing on a host
    /// without /dev/kvm.
    pub fn for_host(host: &HostVirt) -> Drivers {
        Drivers::default()
            .with(VirtType::Test, Arc::new(TestDriver))
            .with(
                VirtType::Qemu,
                Arc::new(QemuDriver::from_env(host.default_accel())),
            )
            .with(VirtType::Kvm, Arc::new(KvmDriver::from_env()))
    }

    /// Add a driver, or replace the one of that type.
    pub fn with(mut self, t: VirtType, driver: Arc<dyn Driver>) -> Drivers {
        self.entries.retain(|(k, _)| *k != t);
        self.entries.push((t, driver));
        self
    }

    pub fn get(&self, t: VirtType) -> Result<Arc<dyn Driver>, ApiError> {
        self.entries
            .iter()
            .find(|(k, _)| *k == t)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| {
                ApiError::not_supported(format!(
                    "this ferrovirtd has no '{}' driver (it has: {})",
                    t.as_str(),
                    self.names().join(", ")
                ))
            })
    }

    /// Driver names, sorted (`GET /v1/version`).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .entries
            .iter()
            .map(|(k, _)| k.as_str().to_string())
            .collect();
        names.sort();
        names
    }
}
