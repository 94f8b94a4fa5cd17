//! KVM's part of the VM state: per vCPU the registers, FPU/XSAVE, LAPIC, MSRs and
//! pending events; per VM the in-kernel PIC/IOAPIC, PIT and kvmclock.
//!
//! Saved on the vCPU's own thread while it is parked (see vcpu.rs); loaded into
//! freshly created vCPUs before their threads start, in the order KVM needs.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Everything KVM keeps for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest's TSC frequency; None where KVM cannot tell.
    pub tsc_khz: Option<u32>,
}

/// The VM-wide in-kernel devices and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// The MSRs KVM can save and restore on this host (KVM_GET_MSR_INDEX_LIST).
pub fn msr_index_list(kvm: &Kvm) -> Result<Vec<u32>, String> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(err("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

/// Reads `indices` in chunks; an MSR that KVM lists but refuses to read for this
/// vCPU (an unsupported feature's MSR) is left out, so the rest still get saved.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, String> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
        let n = fd.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // KVM stops at the first MSR it cannot read: skip that one.
        let consumed = if n < chunk.len() { n + 1 } else { n };
        if n < chunk.len() {
            log::debug!(
                "MSR {:#x} is not readable on this vCPU; not saved",
                chunk[n]
            );
        }
        rest = &rest[consumed..];
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running.
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, String> {
        let mp_state = fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().ok();
        let debug_regs = fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        let msrs = read_msrs(fd, msr_indices)?;
        let vcpu_events = fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let tsc_khz = fd.get_tsc_khz().ok();
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Loads the state into a freshly created vCPU. The order matters to KVM:
    /// CPUID first (it decides which MSRs and XSAVE features exist), special
    /// registers before the LAPIC (the APIC base MSR lives in sregs), MSRs after
    /// the LAPIC (TSC deadline), and pending events last.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), String> {
        if self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(format!("{} CPUID entries is too many", self.cpuid.len()));
        }
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|e| format!("CPUID: {e:?}"))?;
        fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz).map_err(|e| {
                    format!(
                        "the guest's TSC runs at {khz} kHz and this host cannot scale its TSC to that ({e})"
                    )
                })?;
            }
        }
        fd.set_mp_state(self.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(err("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(err("KVM_SET_SREGS"))?;
        // SAFETY: the buffer is a whole kvm_xsave read by KVM_GET_XSAVE (4 KiB, the
        // legacy size, which is what KVM_SET_XSAVE reads without XSAVE2).
        unsafe { fd.set_xsave(&self.xsave) }.map_err(|e| {
            format!(
                "KVM_SET_XSAVE: {e} (this host's CPU may lack an extended state the guest used)"
            )
        })?;
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(|e| {
                format!("KVM_SET_XCRS: {e} (this host's CPU lacks a feature the guest enabled)")
            })?;
        }
        fd.set_debug_regs(&self.debug_regs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(err("KVM_SET_LAPIC"))?;
        for chunk in self.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|e| format!("MSR list: {e:?}"))?;
            let n = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
            if n < chunk.len() {
                return Err(format!(
                    "this host's KVM refuses MSR {:#x}, which the guest's state needs",
                    chunk[n].index
                ));
            }
        }
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        // Tell a guest using kvmclock that it was stopped, so its watchdogs do not
        // count the pause as a lockup. EINVAL means the guest has no kvmclock.
        if let Err(e) = fd.kvmclock_ctrl() {
            if e.errno() != libc::EINVAL {
                log::debug!("KVM_KVMCLOCK_CTRL: {e}");
            }
        }
        Ok(())
    }
}

fn irqchip(vm: &VmFd, chip: u32) -> Result<kvm_irqchip, String> {
    let mut c = kvm_irqchip {
        chip_id: chip,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(err("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

impl VmState {
    pub fn save(vm: &VmFd) -> Result<VmState, String> {
        Ok(VmState {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(err("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(err("KVM_GET_CLOCK"))?,
        })
    }

    /// Loads the state into a VM whose irqchip and PIT exist. The clock is set to
    /// the saved value, so the guest's time does not jump by the snapshot's age.
    pub fn restore(&self, vm: &VmFd) -> Result<(), String> {
        for (chip, want) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != want {
                return Err(format!(
                    "irqchip state for chip {} in slot {want}",
                    chip.chip_id
                ));
            }
            vm.set_irqchip(chip).map_err(err("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(err("KVM_SET_PIT2"))?;
        let mut clock = self.clock;
        // Only the value is restored; the flags describe the old host's clock source.
        clock.flags = 0;
        vm.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
        Ok(())
    }
}
