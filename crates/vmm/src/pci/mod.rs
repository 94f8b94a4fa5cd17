//! PCI: configuration space, the root bus with its CF8/CFC and ECAM access
//! paths, BARs on the MMIO bus, and MSI-X.

pub mod config;
pub mod msix;
pub mod root;

pub use config::{BarRegion, PciConfiguration};
pub use root::PciRoot;

/// A PCI function on bus 0.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfiguration;
    fn config_mut(&mut self) -> &mut PciConfiguration;
    /// Called after the guest wrote config dword `reg` (side effects such as MSI-X enable).
    fn config_written(&mut self, _reg: usize) {}
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// The guest moved a BAR; addresses derived from it (ioeventfds) must follow.
    fn bar_moved(&mut self, _bar: usize, _old: u64, _new: u64) {}
}
