//! ACPI tables: RSDP → XSDT → FADT (PM1a blocks, FACS, DSDT with \_S5) and MADT.
//!
//! The guest finds the RSDP through the boot parameters or by scanning the BIOS
//! area; everything the tables describe is emulated by `devices::acpi_pm`.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::layout;
use crate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"FERROV";
const OEM_TABLE_ID: [u8; 8] = *b"FERROVMM";
const OEM_REVISION: u32 = 1;

/// IAPC_BOOT_ARCH: an 8042 keyboard controller is present.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// MADT flag: the machine also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT interrupt source override flags: active high, level triggered.
const MPS_INTI_ACTIVE_HIGH_LEVEL: u16 = 0x000d;
/// RTC century register in CMOS.
const CMOS_CENTURY_INDEX: u8 = 0x32;

/// Places tables one after another in the BIOS area.
struct TableWriter<'a> {
    mem: &'a GuestMemoryMmap,
    next: u64,
}

impl TableWriter<'_> {
    fn place(&mut self, bytes: &[u8], align: u64) -> Result<u64> {
        let addr = (self.next + align - 1) & !(align - 1);
        let end = addr + bytes.len() as u64;
        if end > layout::ACPI_TABLES_END {
            return Err(Error::host("ACPI tables do not fit in the BIOS area"));
        }
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::host(format!("cannot write ACPI tables: {e}")))?;
        self.next = end;
        Ok(addr)
    }
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

fn dsdt() -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // \_S5: SLP_TYPa and SLP_TYPb that put the machine in soft-off.
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![
            &(layout::S5_SLEEP_TYPE as u8),
            &(layout::S5_SLEEP_TYPE as u8),
            &0u8,
            &0u8,
        ]),
    );
    // COM1, so the OS knows its port and interrupt without probing.
    let com1_io = aml::IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, layout::COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let hid_value = aml::EISAName::new("PNP0501");
    let hid = aml::Name::new("_HID".into(), &hid_value);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    let sb = aml::Scope::new("_SB_".into(), vec![]);
    dsdt.append_slice(&aml_bytes(&sb));
    dsdt.append_slice(&aml_bytes(&com1));
    dsdt.append_slice(&pci_host_bridge());
    dsdt.append_slice(&aml_bytes(&s5));
    dsdt
}

/// The PCI host bridge: bus 0, the config ports, all other I/O ports and the 32-bit BAR window.
fn pci_host_bridge() -> Vec<u8> {
    let buses = aml::AddressSpace::<u16>::new_bus_number(0, 0);
    let cfg_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::<u16>::new_io(0x0000, 0x0cf7, None);
    let io_high = aml::AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO_START as u32,
        (layout::PCI_MMIO_END - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&buses, &cfg_ports, &io_low, &io_high, &mmio]);
    let hid_v = aml::EISAName::new("PNP0A08");
    let cid_v = aml::EISAName::new("PNP0A03");
    let hid = aml::Name::new("_HID".into(), &hid_v);
    let cid = aml::Name::new("_CID".into(), &cid_v);
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    aml_bytes(&aml::Device::new(
        "_SB_.PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs],
    ))
}

/// MCFG: where ECAM lives (segment 0, bus 0).
fn mcfg() -> Sdt {
    let mut mcfg = Sdt::new(*b"MCFG", 44, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut alloc = Vec::with_capacity(16);
    alloc.extend_from_slice(&layout::PCI_ECAM_START.to_le_bytes());
    alloc.extend_from_slice(&0u16.to_le_bytes()); // segment
    alloc.push(0); // start bus
    alloc.push(0); // end bus
    alloc.extend_from_slice(&0u32.to_le_bytes());
    mcfg.append_slice(&alloc);
    mcfg
}

fn facs() -> Vec<u8> {
    let mut facs = vec![0u8; 64];
    facs[0..4].copy_from_slice(b"FACS");
    facs[4..8].copy_from_slice(&64u32.to_le_bytes());
    facs[32] = 2; // version
    facs
}

fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .firmware_ctrl_32(facs as u32)
        .dsdt_32(dsdt as u32)
        .flag(Flags::Wbinvd)
        // No fixed-feature sleep button; the power button is the fixed one in PM1.
        .flag(Flags::SlpButton);
    fadt.sci_int = (layout::SCI_IRQ as u16).into();
    fadt.pm1a_evt_blk = u32::from(layout::PM1A_EVT_PORT).into();
    fadt.pm1_evt_len = layout::PM1A_EVT_LEN;
    fadt.pm1a_cnt_blk = u32::from(layout::PM1A_CNT_PORT).into();
    fadt.pm1_cnt_len = layout::PM1A_CNT_LEN;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_8042.into();
    fadt.century = CMOS_CENTURY_INDEX;
    aml_bytes(&fadt.finalize())
}

fn madt(vcpus: u32) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 44, 4, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, layout::LAPIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..vcpus {
        if id < 255 {
            // Processor Local APIC: type 0, length 8, UID, APIC ID, flags = enabled.
            madt.append_slice(&[0, 8, id as u8, id as u8, 1, 0, 0, 0]);
        } else {
            // Processor Local x2APIC: type 9, length 16.
            let mut x2 = vec![9, 16, 0, 0];
            x2.extend_from_slice(&id.to_le_bytes());
            x2.extend_from_slice(&1u32.to_le_bytes());
            x2.extend_from_slice(&id.to_le_bytes());
            madt.append_slice(&x2);
        }
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base.
    let mut ioapic = vec![1, 12, 0, 0];
    ioapic.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    madt.append_slice(&ioapic);
    // Interrupt source override: the SCI is level triggered, active high.
    let mut iso = vec![2, 10, 0, layout::SCI_IRQ as u8];
    iso.extend_from_slice(&layout::SCI_IRQ.to_le_bytes());
    iso.extend_from_slice(&MPS_INTI_ACTIVE_HIGH_LEVEL.to_le_bytes());
    madt.append_slice(&iso);
    // Local APIC NMI on LINT1 for every processor.
    madt.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt
}

/// Writes all tables; returns the RSDP address.
pub fn write_tables(mem: &GuestMemoryMmap, vcpus: u32) -> Result<GuestAddress> {
    let mut w = TableWriter {
        mem,
        next: layout::ACPI_TABLES_START,
    };
    let rsdp_addr = layout::ACPI_TABLES_START;
    w.next += Rsdp::len() as u64;

    let facs_addr = w.place(&facs(), 64)?;
    let dsdt_addr = w.place(dsdt().as_slice(), 16)?;
    let fadt_addr = w.place(&fadt(facs_addr, dsdt_addr), 16)?;
    let madt_addr = w.place(madt(vcpus).as_slice(), 16)?;
    let mcfg_addr = w.place(mcfg().as_slice(), 16)?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt_addr = w.place(&aml_bytes(&xsdt), 16)?;

    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(&aml_bytes(&rsdp), GuestAddress(rsdp_addr))
        .map_err(|e| Error::host(format!("cannot write the RSDP: {e}")))?;
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        let d = dsdt();
        assert!(checksum_ok(d.as_slice()));
        assert_eq!(
            u32::from_le_bytes(d.as_slice()[4..8].try_into().unwrap()) as usize,
            d.as_slice().len()
        );
        let m = madt(3);
        assert!(checksum_ok(m.as_slice()));
        let m = mcfg();
        assert!(checksum_ok(m.as_slice()));
        assert_eq!(m.as_slice().len(), 60);
        let f = fadt(0xe0040, 0xe0080);
        assert!(checksum_ok(&f));
        assert_eq!(&f[0..4], b"FACP");
        // PM1a control block at offset 64 of the FADT.
        assert_eq!(
            u32::from_le_bytes(f[64..68].try_into().unwrap()),
            u32::from(layout::PM1A_CNT_PORT)
        );
    }
}
