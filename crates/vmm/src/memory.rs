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

/// Total bytes of guest RAM in `mem` (the size of a memory snapshot file).
pub fn total_bytes(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

const PAGE: usize = 4096;

fn is_zero(page: &[u8]) -> bool {
    // OR-folding fixed-size chunks vectorizes; this runs over all of guest RAM.
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// Which pages of `region` can hold anything but zeros: those resident in memory
/// (touched by the guest, or read by us) and, for RAM mapped from a snapshot file,
/// those where that file has data. Everything else reads as zeros without our
/// having to fault it in, which under nested virtualization costs more than the copy.
fn pages_worth_reading(region: &vm_memory::GuestRegionMmap<()>) -> Vec<bool> {
    use std::os::fd::AsRawFd;
    let len = region.len() as usize;
    let pages = len.div_ceil(PAGE);
    let mut resident = vec![0u8; pages];
    // SAFETY: the region is a page-aligned live mapping of `len` bytes and `resident`
    // has one byte per page, as mincore(2) requires.
    let rc = unsafe { libc::mincore(region.as_ptr().cast(), len, resident.as_mut_ptr()) };
    if rc != 0 {
        return vec![true; pages]; // cannot tell: read everything
    }
    let mut worth: Vec<bool> = resident.iter().map(|r| r & 1 != 0).collect();
    if let Some(fo) = region.file_offset() {
        let fd = fo.file().as_raw_fd();
        let (start, end) = (fo.start() as i64, fo.start() as i64 + len as i64);
        let mut pos = start;
        while pos < end {
            // SAFETY: lseek on a descriptor the mapping keeps open; no memory involved.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 || data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) }.clamp(data, end);
            let first = ((data - start) as usize) / PAGE;
            let last = ((hole - start) as usize).div_ceil(PAGE).min(pages);
            worth[first..last].iter_mut().for_each(|w| *w = true);
            pos = hole.max(data + 1);
        }
    }
    worth
}

/// Writes guest RAM to `file`, regions back to back; pages that are all zero are
/// skipped, leaving holes, so a guest that touched little makes a small file.
/// Returns the bytes actually written.
pub fn write_to_file(mem: &GuestMemoryMmap, file: &std::fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let total = total_bytes(mem);
    file.set_len(total)?;
    let mut file_offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let worth = pages_worth_reading(region);
        // SAFETY: the region is a live mapping of `len` bytes owned by `mem`; the VM is
        // paused and device I/O is held, so nothing writes it while we read.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr() as *const u8, len) };
        let has_data =
            |page: usize| worth[page / PAGE] && !is_zero(&bytes[page..(page + PAGE).min(len)]);
        let mut page = 0;
        while page < len {
            // Coalesce runs of non-zero pages into one write.
            let start = page;
            while page < len && has_data(page) {
                page += PAGE;
            }
            if page > start {
                let end = page.min(len);
                file.write_all_at(&bytes[start..end], file_offset + start as u64)?;
                written += (end - start) as u64;
            } else {
                page += PAGE;
            }
        }
        file_offset += len as u64;
    }
    Ok(written)
}

/// Maps guest RAM of `mem_bytes` from a memory snapshot file. Without `eager`, the
/// file is mapped copy-on-write (MAP_PRIVATE): pages are read when the guest first
/// touches them and its writes never reach the file. With `eager`, RAM is anonymous
/// and the whole file is read into it up front.
pub fn map_from_file(
    path: &std::path::Path,
    mem_bytes: u64,
    eager: bool,
) -> Result<GuestMemoryMmap> {
    use std::os::unix::fs::FileExt;
    use vm_memory::mmap::MmapRegionBuilder;
    let file = std::fs::File::open(path)
        .map_err(|e| Error::usage(format!("snapshot memory {}: {e}", path.display())))?;
    let len = file
        .metadata()
        .map_err(|e| Error::usage(format!("snapshot memory {}: {e}", path.display())))?
        .len();
    let ranges = layout::ram_regions(mem_bytes);
    let total: u64 = ranges.iter().map(|(_, size)| *size).sum();
    if len != total {
        return Err(Error::usage(format!(
            "snapshot memory {}: {len} bytes, but the machine has {total} bytes of RAM (truncated or from another snapshot)",
            path.display()
        )));
    }
    if eager {
        let mem = create_guest_memory(mem_bytes)?;
        let mut offset = 0u64;
        for region in mem.iter() {
            let size = region.len() as usize;
            // SAFETY: a fresh anonymous mapping of `size` bytes that only we use yet.
            let bytes = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), size) };
            file.read_exact_at(bytes, offset)
                .map_err(|e| Error::host(format!("snapshot memory {}: {e}", path.display())))?;
            offset += size as u64;
        }
        return Ok(mem);
    }
    let file = std::sync::Arc::new(file);
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for (start, size) in ranges {
        let mapping = MmapRegionBuilder::new(size as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(vm_memory::FileOffset::from_arc(file.clone(), offset))
            .build()
            .map_err(|e| Error::host(format!("cannot map snapshot memory: {e}")))?;
        regions.push(
            vm_memory::GuestRegionMmap::new(mapping, GuestAddress(start))
                .ok_or_else(|| Error::host("snapshot memory region overflows"))?,
        );
        offset += size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| Error::host(format!("snapshot memory: {e}")))
}

/// Turns KVM's dirty page logging on or off for every RAM slot (the slots keep
/// their numbers and mappings; only the flag changes).
pub fn set_dirty_logging(vm: &VmFd, mem: &GuestMemoryMmap, on: bool) -> Result<()> {
    let mut regions = slots(mem);
    for r in &mut regions {
        r.flags = if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
    }
    register_slots(vm, &regions)
}

/// The pages written by the guest since the last call (or since logging started),
/// per region, as page indexes within the region. Reading the log also clears it.
pub fn take_dirty_pages(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<Vec<usize>>> {
    let mut out = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let bitmap = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|e| Error::host(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        let mut pages = Vec::new();
        for (word_index, word) in bitmap.iter().enumerate() {
            let mut w = *word;
            while w != 0 {
                let bit = w.trailing_zeros() as usize;
                pages.push(word_index * 64 + bit);
                w &= w - 1;
            }
        }
        out.push(pages);
    }
    Ok(out)
}

/// Page indexes of `region` that may hold anything but zeros (for a first full copy).
pub fn nonzero_pages(region: &vm_memory::GuestRegionMmap<()>) -> Vec<usize> {
    let len = region.len() as usize;
    let worth = pages_worth_reading(region);
    // SAFETY: the region is a live mapping of `len` bytes owned by the caller's memory.
    let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr() as *const u8, len) };
    (0..len / PAGE)
        .filter(|&p| worth[p] && !is_zero(&bytes[p * PAGE..(p + 1) * PAGE]))
        .collect()
}

pub const PAGE_SIZE: usize = PAGE;
