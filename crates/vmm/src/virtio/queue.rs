//! Helpers over virtio-queue for devices: completing chains and signalling.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::GuestMem;
use super::VirtioInterrupt;
use crate::memory::GuestMemoryMmap;

/// Puts `head` on the used ring with `len` bytes written and interrupts the
/// guest if it wants to know. A used ring we cannot write is the guest's
/// problem: the chain is dropped and logged.
pub fn complete(
    queue: &Mutex<Queue>,
    mem: &GuestMemoryMmap,
    interrupt: &Arc<dyn VirtioInterrupt>,
    index: u16,
    head: u16,
    len: u32,
) {
    let notify = {
        let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = q.add_used(mem, head, len) {
            log::warn!("virtio queue {index}: cannot return descriptor {head}: {e}");
            return;
        }
        q.needs_notification(mem).unwrap_or(true)
    };
    if notify {
        interrupt.signal_used_queue(index);
    }
}

/// Takes every available chain off the queue (the lock is held only for that).
/// An available index the driver could not have written puts the device in
/// DEVICE_NEEDS_RESET.
pub fn pop_all(
    queue: &Mutex<Queue>,
    mem: &GuestMem,
    interrupt: &Arc<dyn VirtioInterrupt>,
) -> Vec<virtio_queue::DescriptorChain<GuestMem>> {
    let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
    let mut chains = Vec::new();
    match q.iter(mem.clone()) {
        Ok(iter) => chains.extend(iter),
        Err(e) => {
            // Stop serving this queue until the driver resets the device.
            q.set_ready(false);
            interrupt.device_error(&format!("bad available ring: {e}"));
        }
    }
    chains
}
