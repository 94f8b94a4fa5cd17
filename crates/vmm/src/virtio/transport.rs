//! The virtio modern PCI transport: capabilities, common configuration,
//! notifications through ioeventfds, ISR, device configuration and MSI-X,
//! all in one 32-bit memory BAR.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, DeviceQueue, EventLoop, GuestMem, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::pci::config::PciIds;
use crate::pci::msix::{MsixTable, MSIX_CAP_ID};
use crate::pci::{PciConfiguration, PciDevice};

pub const BAR_SIZE: u32 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x1000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;

const VIRTIO_PCI_CAP_VNDR: u8 = 0x09;
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;

pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

struct QueueSlot {
    queue: Queue,
    vector: u16,
    kick: EventFd,
    /// The queue the active device works on (its indices move on; `queue` does not).
    live: Option<Arc<Mutex<Queue>>>,
}

/// Queue and config interrupts through the device's MSI-X table.
struct PciInterrupt {
    msix: Arc<Mutex<MsixTable>>,
    isr: Arc<AtomicU8>,
    /// Set by the device side when the driver broke the protocol; folded into the status.
    needs_reset: std::sync::atomic::AtomicBool,
    vectors: Mutex<Vec<u16>>,
    config_vector: Mutex<u16>,
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_used_queue(&self, queue_index: u16) {
        self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        let v = self
            .vectors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(usize::from(queue_index))
            .copied();
        if let Some(v) = v.filter(|v| *v != VIRTIO_MSI_NO_VECTOR) {
            self.msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .trigger(v);
        }
    }

    fn device_error(&self, why: &str) {
        // A guest can break its rings at will: say so a few times, then only at debug level.
        static REPORTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        match REPORTED.fetch_add(1, Ordering::Relaxed) {
            0..=4 => log::warn!("virtio: {why}; the device needs a reset"),
            5 => log::warn!("virtio: {why}; the device needs a reset (further such errors are logged at debug level)"),
            _ => log::debug!("virtio: {why}; the device needs a reset"),
        }
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change();
    }

    fn signal_config_change(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        let v = *self.config_vector.lock().unwrap_or_else(|p| p.into_inner());
        if v != VIRTIO_MSI_NO_VECTOR {
            self.msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .trigger(v);
        }
    }
}

/// Registers queue notifications with KVM so a guest kick never exits to userspace.
pub trait NotifyRegistrar: Send {
    fn register(&self, kick: &EventFd, addr: u64) -> Result<(), String>;
    fn unregister(&self, kick: &EventFd, addr: u64);
}

impl NotifyRegistrar for Arc<VmFd> {
    fn register(&self, kick: &EventFd, addr: u64) -> Result<(), String> {
        self.register_ioevent(kick, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| format!("KVM_IOEVENTFD at {addr:#x}: {e}"))
    }
    fn unregister(&self, kick: &EventFd, addr: u64) {
        let _ = self.unregister_ioevent(kick, &IoEventAddress::Mmio(addr), NoDatamatch);
    }
}

pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    event_loop: Arc<EventLoop>,
    registrar: Option<Box<dyn NotifyRegistrar>>,
    msix: Arc<Mutex<MsixTable>>,
    msix_cap_offset: usize,
    interrupt: Arc<PciInterrupt>,
    queues: Vec<QueueSlot>,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    config_generation: u8,
    activated: bool,
}

impl VirtioPciDevice {
    /// `bar_addr` is where BAR0 starts; `msix` has one vector per queue plus one for config.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMem,
        event_loop: Arc<EventLoop>,
        msix: MsixTable,
        bar_addr: u32,
        registrar: Option<Box<dyn NotifyRegistrar>>,
    ) -> Result<Self, String> {
        let device_type = device.device_type();
        let (class, subclass) = match device_type {
            1 => (0x02, 0x00), // network
            2 => (0x01, 0x80), // mass storage
            3 => (0x07, 0x80), // communication
            _ => (0xff, 0x00),
        };
        let mut config = PciConfiguration::new(&PciIds {
            vendor: 0x1af4,
            device: 0x1040 + device_type as u16,
            class,
            subclass,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_mem32_bar(0, bar_addr, BAR_SIZE);
        let cap = |cfg_type: u8, offset: u64, len: u64, extra: Option<u32>| {
            let mut body = vec![if extra.is_some() { 20 } else { 16 }, cfg_type, 0, 0, 0, 0];
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&(len as u32).to_le_bytes());
            if let Some(x) = extra {
                body.extend_from_slice(&x.to_le_bytes());
            }
            body
        };
        let queue_sizes = device.queue_max_sizes();
        config.add_capability(
            VIRTIO_PCI_CAP_VNDR,
            &cap(CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LEN, None),
            &[],
        );
        config.add_capability(
            VIRTIO_PCI_CAP_VNDR,
            &cap(CAP_ISR_CFG, ISR_OFFSET, 1, None),
            &[],
        );
        config.add_capability(
            VIRTIO_PCI_CAP_VNDR,
            &cap(CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN, None),
            &[],
        );
        let notify_len = (queue_sizes.len() as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)).max(4);
        config.add_capability(
            VIRTIO_PCI_CAP_VNDR,
            &cap(
                CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                notify_len,
                Some(NOTIFY_OFF_MULTIPLIER),
            ),
            &[],
        );
        let msix_body = msix.capability_body(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_cap_offset =
            config.add_capability(MSIX_CAP_ID, &msix_body, &[MsixTable::CAPABILITY_WMASK]);

        let mut queues = Vec::with_capacity(queue_sizes.len());
        for (i, size) in queue_sizes.iter().enumerate() {
            let queue = Queue::new(*size).map_err(|e| format!("queue {i}: {e}"))?;
            let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
            if let Some(r) = &registrar {
                r.register(
                    &kick,
                    u64::from(bar_addr)
                        + NOTIFY_OFFSET
                        + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                )?;
            }
            queues.push(QueueSlot {
                queue,
                vector: VIRTIO_MSI_NO_VECTOR,
                kick,
                live: None,
            });
        }
        let msix = Arc::new(Mutex::new(msix));
        let interrupt = Arc::new(PciInterrupt {
            msix: msix.clone(),
            isr: Arc::new(AtomicU8::new(0)),
            needs_reset: std::sync::atomic::AtomicBool::new(false),
            vectors: Mutex::new(vec![VIRTIO_MSI_NO_VECTOR; queues.len()]),
            config_vector: Mutex::new(VIRTIO_MSI_NO_VECTOR),
        });
        Ok(VirtioPciDevice {
            config,
            device,
            mem,
            event_loop,
            registrar,
            msix,
            msix_cap_offset,
            interrupt,
            queues,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The guest-visible interrupt path, for devices driven from outside (tests, benchmarks).
    pub fn interrupt(&self) -> Arc<dyn VirtioInterrupt> {
        self.interrupt.clone()
    }

    fn selected(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.queue.reset();
            q.vector = VIRTIO_MSI_NO_VECTOR;
            q.live = None;
        }
        self.sync_vectors();
        *self
            .interrupt
            .config_vector
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = VIRTIO_MSI_NO_VECTOR;
        self.interrupt.isr.store(0, Ordering::SeqCst);
        self.interrupt.needs_reset.store(false, Ordering::SeqCst);
    }

    fn sync_vectors(&self) {
        let mut v = self
            .interrupt
            .vectors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (i, q) in self.queues.iter().enumerate() {
            v[i] = q.vector;
        }
    }

    fn fail(&mut self, why: &str) {
        self.interrupt
            .device_error(&format!("device type {}: {why}", self.device.device_type()));
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            // Refuse features we never offered, and legacy drivers.
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                value &= !STATUS_FEATURES_OK;
            }
        }
        self.status = value | (self.status & STATUS_NEEDS_RESET);
        if value & STATUS_DRIVER_OK != 0 && value & STATUS_FAILED == 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & STATUS_FEATURES_OK == 0 {
            return self.fail("driver set DRIVER_OK without FEATURES_OK");
        }
        let mut device_queues = Vec::new();
        for (i, slot) in self.queues.iter_mut().enumerate() {
            if !slot.queue.ready() {
                continue;
            }
            if !slot.queue.is_valid(self.mem.as_ref()) {
                return self.fail(&format!(
                    "queue {i} lies outside guest memory or is misaligned"
                ));
            }
            let kick = match slot.kick.try_clone() {
                Ok(k) => k,
                Err(e) => return self.fail(&format!("eventfd: {e}")),
            };
            let queue = match Queue::try_from(slot.queue.state()) {
                Ok(q) => q,
                Err(e) => return self.fail(&format!("queue {i}: {e}")),
            };
            let queue = Arc::new(Mutex::new(queue));
            slot.live = Some(queue.clone());
            device_queues.push(DeviceQueue {
                index: i as u16,
                queue,
                kick,
            });
        }
        self.sync_vectors();
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues: device_queues,
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
            event_loop: self.event_loop.clone(),
        };
        match self.device.activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => self.fail(&e),
        }
    }

    fn common_read(&mut self, offset: u64) -> u32 {
        let features = self.device.features();
        match offset {
            0x00 => self.device_feature_select,
            0x04 => match self.device_feature_select {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            0x08 => self.driver_feature_select,
            0x0c => match self.driver_feature_select {
                0 => self.driver_features as u32,
                1 => (self.driver_features >> 32) as u32,
                _ => 0,
            },
            0x10 => u32::from(
                *self
                    .interrupt
                    .config_vector
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            ),
            0x12 => self.queues.len() as u32,
            0x14 => {
                if self.interrupt.needs_reset.load(Ordering::SeqCst) {
                    self.status |= STATUS_NEEDS_RESET;
                }
                u32::from(self.status)
            }
            0x15 => u32::from(self.config_generation),
            0x16 => u32::from(self.queue_select),
            0x18 => self.selected().map_or(0, |q| u32::from(q.queue.size())),
            0x1a => self
                .selected()
                .map_or(u32::from(VIRTIO_MSI_NO_VECTOR), |q| u32::from(q.vector)),
            0x1c => self.selected().map_or(0, |q| u32::from(q.queue.ready())),
            0x1e => u32::from(self.queue_select),
            0x20 => self.selected().map_or(0, |q| q.queue.desc_table() as u32),
            0x24 => self
                .selected()
                .map_or(0, |q| (q.queue.desc_table() >> 32) as u32),
            0x28 => self.selected().map_or(0, |q| q.queue.avail_ring() as u32),
            0x2c => self
                .selected()
                .map_or(0, |q| (q.queue.avail_ring() >> 32) as u32),
            0x30 => self.selected().map_or(0, |q| q.queue.used_ring() as u32),
            0x34 => self
                .selected()
                .map_or(0, |q| (q.queue.used_ring() >> 32) as u32),
            0x38 => u32::from(self.queue_select),
            _ => 0,
        }
    }

    fn common_write(&mut self, offset: u64, value: u32) {
        // Queue registers may only change while the driver sets up, not while the device runs.
        let queue_locked = self.activated;
        let vectors = self
            .msix
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .vectors();
        let valid_vector = |v: u16| if v < vectors { v } else { VIRTIO_MSI_NO_VECTOR };
        match offset {
            0x00 => self.device_feature_select = value,
            0x08 => self.driver_feature_select = value,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => match self.driver_feature_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            0x10 => {
                *self
                    .interrupt
                    .config_vector
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = valid_vector(value as u16)
            }
            0x14 => self.set_status(value as u8),
            0x16 => self.queue_select = value as u16,
            0x18 if !queue_locked => {
                if let Some(q) = self.selected() {
                    // A size that is not a power of two up to the maximum is ignored.
                    q.queue.set_size(value as u16);
                }
            }
            0x1a => {
                if let Some(q) = self.selected() {
                    q.vector = valid_vector(value as u16);
                }
                self.sync_vectors();
            }
            0x1c if !queue_locked => {
                if let Some(q) = self.selected() {
                    q.queue.set_ready(value == 1);
                }
            }
            0x20 if !queue_locked => self
                .selected()
                .into_iter()
                .for_each(|q| q.queue.set_desc_table_address(Some(value), None)),
            0x24 if !queue_locked => self
                .selected()
                .into_iter()
                .for_each(|q| q.queue.set_desc_table_address(None, Some(value))),
            0x28 if !queue_locked => self
                .selected()
                .into_iter()
                .for_each(|q| q.queue.set_avail_ring_address(Some(value), None)),
            0x2c if !queue_locked => self
                .selected()
                .into_iter()
                .for_each(|q| q.queue.set_avail_ring_address(None, Some(value))),
            0x30 if !queue_locked => self
                .selected()
                .into_iter()
                .for_each(|q| q.queue.set_used_ring_address(Some(value), None)),
            0x34 if !queue_locked => self
                .selected()
                .into_iter()
                .for_each(|q| q.queue.set_used_ring_address(None, Some(value))),
            _ => {}
        }
    }
}

fn to_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn config_written(&mut self, reg: usize) {
        if reg == self.msix_cap_offset / 4 {
            let ctrl = self.config.read_u16(self.msix_cap_offset + 2);
            self.msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_message_control(ctrl);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => {
                // Each register is read at its own offset with its own width.
                let value = self.common_read(o);
                let n = data.len().min(4);
                data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
            }
            ISR_OFFSET => data[0] = self.interrupt.isr.swap(0, Ordering::SeqCst),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .table_read(o - MSIX_TABLE_OFFSET, data),
            o if (MSIX_PBA_OFFSET..u64::from(BAR_SIZE)).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pba_read(o - MSIX_PBA_OFFSET, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 || data.is_empty() || data.len() > 8 {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => {
                if data.len() == 8 {
                    self.common_write(o, to_u32(&data[..4]));
                    self.common_write(o + 4, to_u32(&data[4..]));
                } else {
                    self.common_write(o, to_u32(data));
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // Only reached without an ioeventfd (tests): forward the kick.
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                if let Some(slot) = self.queues.get(q) {
                    let _ = slot.kick.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .table_write(o - MSIX_TABLE_OFFSET, data),
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, old: u64, new: u64) {
        if bar != 0 {
            return;
        }
        let Some(r) = &self.registrar else { return };
        for (i, q) in self.queues.iter().enumerate() {
            let off = NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
            r.unregister(&q.kick, old + off);
            if let Err(e) = r.register(&q.kick, new + off) {
                log::warn!("virtio queue {i}: {e}");
            }
        }
    }
}

/// One virtqueue as the driver set it up, with the device's progress through it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub vector: u16,
}

impl QueueSnapshot {
    fn from_queue(q: &Queue, vector: u16) -> Self {
        let s = q.state();
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            vector,
        }
    }

    fn to_queue(&self) -> Result<Queue, String> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("virtqueue state: {e}"))
    }
}

/// The transport (PCI function, MSI-X, feature negotiation, queues) and the device's own state.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VirtioPciState {
    pub device_type: u32,
    pub offered_features: u64,
    pub config: crate::pci::config::PciConfigState,
    pub msix: crate::pci::msix::MsixState,
    pub status: u8,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub config_generation: u8,
    pub config_vector: u16,
    pub isr: u8,
    pub needs_reset: bool,
    pub activated: bool,
    pub queues: Vec<QueueSnapshot>,
    pub device: serde_json::Value,
}

impl VirtioPciDevice {
    /// See `VirtioDevice::pause_io`.
    pub fn pause_io(&mut self) {
        if self.activated {
            self.device.pause_io();
        }
    }

    pub fn resume_io(&mut self) {
        if self.activated {
            self.device.resume_io();
        }
    }

    /// See `VirtioDevice::announce`: whether or not the guest's driver runs the device,
    /// the MAC is the guest's and the network should find it here.
    pub fn announce(&self) {
        self.device.announce();
    }
}

impl crate::persist::Persist for VirtioPciDevice {
    type State = VirtioPciState;

    fn save(&self) -> VirtioPciState {
        let queues = self
            .queues
            .iter()
            .map(|slot| match &slot.live {
                Some(live) => QueueSnapshot::from_queue(
                    &live.lock().unwrap_or_else(|p| p.into_inner()),
                    slot.vector,
                ),
                None => QueueSnapshot::from_queue(&slot.queue, slot.vector),
            })
            .collect();
        VirtioPciState {
            device_type: self.device.device_type(),
            offered_features: self.device.features(),
            config: self.config.save(),
            msix: self.msix.lock().unwrap_or_else(|p| p.into_inner()).save(),
            status: self.status,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            config_vector: *self
                .interrupt
                .config_vector
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
            isr: self.interrupt.isr.load(Ordering::SeqCst),
            needs_reset: self.interrupt.needs_reset.load(Ordering::SeqCst),
            activated: self.activated,
            queues,
            device: self.device.save_state(),
        }
    }

    /// Loads the state into a device built from the same configuration and, if the
    /// driver had it running, activates it on the saved queues. Guest memory must
    /// already hold the snapshot's contents.
    fn restore(&mut self, s: VirtioPciState) -> Result<(), String> {
        let (kind, offered) = (self.device.device_type(), self.device.features());
        if s.device_type != kind {
            return Err(format!(
                "virtio device type {} in the state, {kind} here",
                s.device_type
            ));
        }
        if s.offered_features != offered {
            return Err(format!(
                "virtio device type {kind}: it offered features {:#x} when saved, {offered:#x} now",
                s.offered_features
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "virtio device type {kind}: {} queues in the state, {} here",
                s.queues.len(),
                self.queues.len()
            ));
        }
        let vectors = self
            .msix
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .vectors();
        let valid_vector = |v: u16| v == VIRTIO_MSI_NO_VECTOR || v < vectors;
        if !valid_vector(s.config_vector) || s.queues.iter().any(|q| !valid_vector(q.vector)) {
            return Err(format!(
                "virtio device type {kind}: an MSI-X vector out of range"
            ));
        }
        // Check everything before changing anything.
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, q) in s.queues.iter().enumerate() {
            if q.max_size != self.queues[i].queue.max_size() {
                return Err(format!(
                    "virtio device type {kind}: queue {i} has another size"
                ));
            }
            queues.push(q.to_queue()?);
        }
        if self.activated {
            self.reset();
        }
        self.config.restore(s.config)?;
        self.msix
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(s.msix)?;
        self.device.restore_state(s.device)?;
        for ((slot, q), saved) in self.queues.iter_mut().zip(queues).zip(&s.queues) {
            slot.queue = q;
            slot.vector = saved.vector;
        }
        self.sync_vectors();
        *self
            .interrupt
            .config_vector
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = s.config_vector;
        self.interrupt.isr.store(s.isr, Ordering::SeqCst);
        self.interrupt
            .needs_reset
            .store(s.needs_reset, Ordering::SeqCst);
        self.status = s.status;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.queue_select = s.queue_select;
        self.config_generation = s.config_generation;
        if s.activated {
            self.activate();
            if !self.activated {
                return Err(format!(
                    "virtio device type {kind}: cannot start it on the saved queues"
                ));
            }
            // Notifications the guest sent just before the snapshot are not lost:
            // each queue is looked at once.
            for slot in &self.queues {
                if slot.live.is_some() {
                    let _ = slot.kick.write(1);
                }
            }
        }
        Ok(())
    }
}
