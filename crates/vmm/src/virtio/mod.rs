//! Virtio 1.x devices on the modern PCI transport.
//!
//! A device (block, net, console, rng) implements `VirtioDevice`; the PCI
//! transport owns feature negotiation, queue setup and MSI-X, and hands the
//! device its queues when the driver sets DRIVER_OK. Queue processing runs on
//! the device event loop, never on a vCPU thread.

pub mod block;
pub mod console;
pub mod event_loop;
pub mod net;
pub mod queue;
pub mod rng;
pub mod tap;
pub mod transport;

use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use event_loop::EventLoop;

use crate::memory::GuestMemoryMmap;

/// Guest memory as devices share it (queues, worker threads).
pub type GuestMem = Arc<GuestMemoryMmap>;

pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Interrupts a device raises; the transport maps them to MSI-X vectors.
pub trait VirtioInterrupt: Send + Sync {
    fn signal_used_queue(&self, queue_index: u16);
    fn signal_config_change(&self);
    /// The driver broke the queue protocol: set DEVICE_NEEDS_RESET and tell it.
    fn device_error(&self, why: &str);
}

/// One queue as a device sees it after activation.
pub struct DeviceQueue {
    pub index: u16,
    pub queue: Arc<Mutex<Queue>>,
    /// Written by the guest's notification (through an ioeventfd).
    pub kick: EventFd,
}

/// What a device gets when the driver is ready.
pub struct ActivateContext {
    pub mem: GuestMem,
    pub queues: Vec<DeviceQueue>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Features the driver accepted.
    pub features: u64,
    pub event_loop: Arc<EventLoop>,
}

pub trait VirtioDevice: Send {
    /// Virtio device ID (1 net, 2 block, 3 console, 4 rng).
    fn device_type(&self) -> u32;
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered, VIRTIO_F_VERSION_1 included.
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts processing; an error makes the transport set DEVICE_NEEDS_RESET.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), String>;
    /// Stops processing and forgets the queues (device reset by the driver).
    fn reset(&mut self);

    /// Finishes the requests in flight and takes no new ones until `resume_io`,
    /// so queues and guest memory hold still for a snapshot. Devices that only
    /// run on the event loop need nothing here: the machine pauses the loop.
    fn pause_io(&mut self) {}
    fn resume_io(&mut self) {}

    /// A NIC tells its network where the guest's MAC is now (after a restore or a
    /// migration); other devices have nothing to say.
    fn announce(&self) {}

    /// The device's own state beyond its queues and feature bits (which the
    /// transport saves), as a serde value; see `persist::Persist`.
    fn save_state(&self) -> serde_json::Value;
    /// Loads what `save_state` returned, before the transport re-activates the device.
    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), String>;
}

/// `save_state`/`restore_state` for a device that implements `Persist`.
pub fn save_persist<P: crate::persist::Persist>(device: &P) -> serde_json::Value {
    serde_json::to_value(device.save()).unwrap_or(serde_json::Value::Null)
}

pub fn restore_persist<P: crate::persist::Persist>(
    device: &mut P,
    state: serde_json::Value,
) -> Result<(), String> {
    let state = serde_json::from_value(state).map_err(|e| format!("device state: {e}"))?;
    device.restore(state)
}

/// Copies `src` (a device's config structure) into a config read at `offset`.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start < src.len() {
        let n = data.len().min(src.len() - start);
        data[..n].copy_from_slice(&src[start..start + n]);
    }
}
