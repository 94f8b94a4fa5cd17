//! The PVH boot ABI: `hvm_start_info`, its memory map and the initrd as module 0.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use super::{BootSpec, CmdlineInfo, InitrdInfo};
use crate::error::{Error, Result};
use crate::layout;
use crate::memory::GuestMemoryMmap;

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

pub(super) fn write_start_info(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    cmdline: CmdlineInfo,
    initrd: Option<InitrdInfo>,
) -> Result<GuestAddress> {
    let info_addr = GuestAddress(layout::PVH_INFO_START);
    let memmap_addr = info_addr.0 + std::mem::size_of::<hvm_start_info>() as u64;
    let map: Vec<hvm_memmap_table_entry> = layout::e820_map(spec.mem_bytes)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let modlist_addr =
        memmap_addr + (map.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;

    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: cmdline.addr.0,
        rsdp_paddr: spec.rsdp.0,
        memmap_paddr: memmap_addr,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new::<hvm_start_info>(&info, info_addr);
    params.set_sections::<hvm_memmap_table_entry>(&map, GuestAddress(memmap_addr));
    if let Some(initrd) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
        params = BootParams::new::<hvm_start_info>(&info, info_addr);
        params.set_sections::<hvm_memmap_table_entry>(&map, GuestAddress(memmap_addr));
        let module = hvm_modlist_entry {
            paddr: initrd.addr.0,
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules::<hvm_modlist_entry>(&[module], GuestAddress(modlist_addr));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|e| Error::host(format!("cannot write hvm_start_info: {e}")))?;
    Ok(info_addr)
}
