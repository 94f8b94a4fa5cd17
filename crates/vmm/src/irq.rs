//! KVM GSI routing: the legacy PIC/IOAPIC routes plus one MSI route per MSI-X
//! vector. KVM replaces the whole table on each update, so we keep all of it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

use crate::error::{Error, Result};

/// GSIs 0-23 are the IOAPIC pins; MSI routes start after them.
pub const FIRST_MSI_GSI: u32 = 24;
/// KVM's default routing table size limit on x86 is 4096 entries.
const MAX_GSI: u32 = 4095;

/// Where a device raises its interrupts; KVM or (in tests) something else.
pub trait MsiRouter: Send + Sync {
    /// Reserves `count` consecutive GSIs for MSI routes.
    fn allocate(&self, count: u32) -> Result<u32>;
    /// Points `gsi` at an MSI message.
    fn set_msi(&self, gsi: u32, address: u64, data: u32) -> Result<()>;
}

pub struct KvmGsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

struct RouterState {
    msi: BTreeMap<u32, kvm_irq_routing_entry>,
    next_gsi: u32,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl KvmGsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        KvmGsiRouter {
            vm,
            state: Mutex::new(RouterState {
                msi: BTreeMap::new(),
                next_gsi: FIRST_MSI_GSI,
            }),
        }
    }

    fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
        let mut routes = Vec::new();
        for gsi in 0..24 {
            routes.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < 8 && gsi != 2 {
                routes.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if (8..16).contains(&gsi) {
                routes.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
        }
        routes
    }

    fn commit(&self, state: &RouterState) -> Result<()> {
        let mut entries = Self::legacy_routes();
        entries.extend(state.msi.values().copied());
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| Error::host(format!("GSI routing table: {e:?}")))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| Error::host(format!("KVM_SET_GSI_ROUTING failed: {e}")))
    }
}

impl MsiRouter for KvmGsiRouter {
    fn allocate(&self, count: u32) -> Result<u32> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let base = st.next_gsi;
        if base + count > MAX_GSI {
            return Err(Error::host("out of interrupt routes (GSIs)"));
        }
        st.next_gsi += count;
        Ok(base)
    }

    fn set_msi(&self, gsi: u32, address: u64, data: u32) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = address as u32;
        e.u.msi.address_hi = (address >> 32) as u32;
        e.u.msi.data = data;
        let unchanged = st.msi.get(&gsi).is_some_and(|old| {
            // SAFETY: every entry in `msi` was written through the `msi` member.
            unsafe {
                old.u.msi.address_lo == e.u.msi.address_lo
                    && old.u.msi.address_hi == e.u.msi.address_hi
                    && old.u.msi.data == data
            }
        });
        if unchanged {
            return Ok(());
        }
        st.msi.insert(gsi, e);
        self.commit(&st)
    }
}
