//! Guest physical address map of the ferrovmm x86_64 machine.
//!
//! Low memory holds the boot structures a loader builds (GDT, page tables,
//! zero page or PVH start info, command line); the BIOS area holds the ACPI
//! tables where Linux looks for an RSDP; kernels load at 1 MiB.

/// GDT for the boot vCPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT (the guest sets up its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by the memory map and module list.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry (PML4, PDPT, PD).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept (Linux's COMMAND_LINE_SIZE on x86).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area: usable RAM below 1 MiB ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS area, where Linux also scans for the RSDP.
pub const ACPI_TABLES_START: u64 = 0xe0000;
pub const ACPI_TABLES_END: u64 = 0x100000;
/// Kernels load at 1 MiB.
pub const HIMEM_START: u64 = 0x100000;
/// The 32-bit MMIO hole (IOAPIC, LAPIC, later PCI) runs from here to 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// 32-bit PCI BARs are allocated from this window.
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO_END: u64 = 0xe000_0000;
/// PCI Express enhanced configuration space (ECAM), bus 0 only.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;

/// Port I/O addresses of the legacy devices.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
pub const CMOS_PORT: u16 = 0x70;
/// ACPI PM1a event block (status + enable, 2 bytes each) and control block.
pub const PM1A_EVT_PORT: u16 = 0x600;
pub const PM1A_EVT_LEN: u8 = 4;
pub const PM1A_CNT_PORT: u16 = 0x604;
pub const PM1A_CNT_LEN: u8 = 2;
/// ACPI system control interrupt.
pub const SCI_IRQ: u32 = 9;
/// SLP_TYP value our DSDT's \_S5 announces.
pub const S5_SLEEP_TYPE: u16 = 5;

/// Guest RAM regions for `mem_bytes` of memory: below the MMIO hole, and the
/// rest above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (FOUR_GIB, mem_bytes - MMIO_HOLE_START),
        ]
    }
}

/// E820 type for usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type for reserved ranges.
pub const E820_RESERVED: u32 = 2;

/// The e820 map the guest sees: (address, size, type).
pub fn e820_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, size) in ram_regions(mem_bytes) {
        let start = start.max(HIMEM_START);
        let end = if start == HIMEM_START {
            size
        } else {
            start + size
        };
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    // Linux only trusts ECAM (MMCONFIG) that the firmware reserved.
    map.push((PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
    map.sort_by_key(|e| e.0);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        let map = e820_map(256 << 20);
        assert_eq!(map[2], (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM));
        assert_eq!(
            map.last(),
            Some(&(PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED))
        );
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let regions = ram_regions(4 << 30);
        assert_eq!(
            regions,
            vec![
                (0, MMIO_HOLE_START),
                (FOUR_GIB, (4 << 30) - MMIO_HOLE_START)
            ]
        );
        let map = e820_map(4 << 30);
        assert_eq!(
            map[2],
            (HIMEM_START, MMIO_HOLE_START - HIMEM_START, E820_RAM)
        );
        assert_eq!(map[3], (PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
        assert_eq!(map[4], (FOUR_GIB, (4 << 30) - MMIO_HOLE_START, E820_RAM));
    }
}
