//! Every device of the machine in one place, for what concerns all of them at
//! once: holding still while a snapshot is taken, saving, and loading state into
//! a machine built from the same configuration. A new device adds one field here
//! and one to `DevicesState`.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::devices::acpi_pm::{AcpiPm, AcpiPmState};
use crate::devices::cmos::{Cmos, CmosState};
use crate::devices::i8042::{I8042State, I8042};
use crate::devices::serial::{SerialPort, SerialSnapshot};
use crate::pci_devices::PciBus;
use crate::persist::Persist;
use crate::virtio::transport::VirtioPciState;

pub struct Devices {
    pub serial: Arc<Mutex<SerialPort>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    pub pci: PciBus,
}

/// The state of every device, in the order the machine builder creates them.
#[derive(Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialSnapshot,
    pub i8042: I8042State,
    pub cmos: CmosState,
    pub acpi_pm: AcpiPmState,
    /// The CF8 CONFIG_ADDRESS latch of the PCI configuration ports.
    pub pci_config_address: u32,
    /// The virtio functions, in command-line order.
    pub virtio: Vec<VirtioPciState>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Devices {
    /// Stops device-side work (event loop, disk I/O) so that guest memory and the
    /// queues hold still; in-flight disk requests complete first.
    pub fn pause_io(&self) {
        self.pci.event_loop.pause();
        for (_, d) in &self.pci.virtio {
            lock(d).pause_io();
        }
    }

    pub fn resume_io(&self) {
        for (_, d) in &self.pci.virtio {
            lock(d).resume_io();
        }
        self.pci.event_loop.resume();
    }

    /// One round of announcing every NIC's MAC on its network (see `announce`).
    pub fn announce(&self) {
        for (_, d) in &self.pci.virtio {
            lock(d).announce();
        }
    }

    pub fn save(&self) -> DevicesState {
        DevicesState {
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
            cmos: lock(&self.cmos).save(),
            acpi_pm: lock(&self.acpi_pm).save(),
            pci_config_address: lock(&self.pci.config_io).address(),
            virtio: self
                .pci
                .virtio
                .iter()
                .map(|(_, d)| lock(d).save())
                .collect(),
        }
    }

    /// Loads `state` into the devices of a machine just built from the saved
    /// configuration (guest memory already loaded, vCPUs not yet running).
    pub fn restore(&self, state: DevicesState) -> Result<(), String> {
        if state.virtio.len() != self.pci.virtio.len() {
            return Err(format!(
                "the snapshot has {} virtio devices, the machine {}",
                state.virtio.len(),
                self.pci.virtio.len()
            ));
        }
        lock(&self.serial).restore(state.serial)?;
        lock(&self.i8042).restore(state.i8042)?;
        lock(&self.cmos).restore(state.cmos)?;
        lock(&self.acpi_pm).restore(state.acpi_pm)?;
        lock(&self.pci.config_io).set_address(state.pci_config_address);
        for ((slot, device), saved) in self.pci.virtio.iter().zip(state.virtio) {
            lock(device).restore(saved)?;
            // The guest may have moved the BAR: map it (and its notifications) there.
            self.pci.root.follow_bars(*slot);
        }
        Ok(())
    }
}
