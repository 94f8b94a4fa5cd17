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

/// The KVM memory slots that describe `mem`. Keeping guest RAM out of fork()ed
/// children (see teardown.rs) is set up here too.
pub fn slots(mem: &GuestMemoryMmap) -> Vec<kvm_userspace_memory_region> {
    mem.iter()
        .enumerate()
        .map(|(slot, region)| {
            // SAFETY: advice on a mapping we own; MADV_DONTFORK only keeps guest RAM
            // out of children, it does not change its contents.
            unsafe {
                libc::madvise(
                    region.as_ptr().cast(),
                    region.len() as usize,
                    libc::MADV_DONTFORK,
                )
            };
            kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            }
        })
        .collect()
}

/// Registers the slots with KVM. This can run on another thread while the
/// loader fills guest memory: it only needs the mapping to exist.
pub fn register_slots(vm: &VmFd, slots: &[kvm_userspace_memory_region]) -> Result<()> {
    for region in slots {
        // SAFETY: each slot describes a live mapping owned by the machine's guest memory,
        // which outlives the VM (both live until the process exits); slots do not overlap.
        unsafe { vm.set_user_memory_region(*region) }
            .map_err(|e| Error::host(format!("KVM_SET_USER_MEMORY_REGION failed: {e}")))?;
    }
    Ok(())
}
