//! The Linux 64-bit boot protocol: a zero page (`boot_params`) for the kernel.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{ByteValued, GuestAddress};

use super::{BootSpec, CmdlineInfo, InitrdInfo};
use crate::error::{Error, Result};
use crate::layout;
use crate::memory::GuestMemoryMmap;

/// `boot_params` as plain bytes for guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: boot_params is a repr(C, packed) struct of integers and arrays of integers:
// every byte pattern is a valid value and it has no padding the guest could not see.
unsafe impl ByteValued for ZeroPage {}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Writes the zero page; `header` is the bzImage's setup header, or None for an ELF vmlinux.
pub(super) fn write_boot_params(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    header: Option<setup_header>,
    cmdline: CmdlineInfo,
    initrd: Option<InitrdInfo>,
) -> Result<GuestAddress> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = cmdline.addr.0 as u32;
    params.hdr.cmdline_size = cmdline.len as u32 + 1;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = spec.rsdp.0;

    let map = layout::e820_map(spec.mem_bytes);
    if map.len() > params.e820_table.len() {
        return Err(Error::host("too many e820 entries"));
    }
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len() as u8;

    let zero_page = GuestAddress(layout::ZERO_PAGE_START);
    let boot = BootParams::new::<ZeroPage>(&ZeroPage(params), zero_page);
    LinuxBootConfigurator::write_bootparams(&boot, mem)
        .map_err(|e| Error::host(format!("cannot write boot_params: {e}")))?;
    Ok(zero_page)
}
