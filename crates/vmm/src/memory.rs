//! Guest RAM: anonymous mappings registered with KVM as memory slots.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, Result};
use crate::layout;

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Maps `mem_bytes` of guest RAM (pages are allocated on first touch).
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mem_bytes)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| {
        Error::host(format!(
            "cannot map {} MiB of guest memory: {e}",
            mem_bytes >> 20
        ))
    })
}

/// Tells KVM about every region of guest RAM.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        // SAFETY: advice on a mapping we own; MADV_DONTFORK only keeps guest RAM
        // out of children (see teardown.rs), it does not change its contents.
        unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_DONTFORK,
            )
        };
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM
        // (both are kept by `Machine` until the process exits), and slots do not overlap.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(|e| Error::host(format!("KVM_SET_USER_MEMORY_REGION failed: {e}")))?;
    }
    Ok(())
}
