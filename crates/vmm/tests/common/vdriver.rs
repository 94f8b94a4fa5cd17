//! A minimal virtio driver on the host side: it talks to a device through the
//! real PCI transport (BAR reads and writes, as a guest's MMIO would), lays
//! rings out in guest memory, posts descriptor chains (good and hostile), kicks
//! the queue eventfd (what KVM's ioeventfd does) and reads the used ring.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferrovmm::irq::MsiRouter;
use ferrovmm::memory::GuestMemoryMmap;
use ferrovmm::pci::msix::{MsixTable, VectorSink};
use ferrovmm::pci::PciDevice;
use ferrovmm::virtio::transport::VirtioPciDevice;
use ferrovmm::virtio::{EventLoop, GuestMem, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
const STATUS_ACK_DRIVER: u8 = 1 | 2;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
const RINGS_BASE: u64 = 0x10_0000;
const RING_STRIDE: u64 = 0x10_0000;
/// Guest memory above this is free for request buffers.
pub const DATA_BASE: u64 = 0x100_0000;

/// Counts interrupts and lets a waiter sleep until the next one.
#[derive(Default)]
pub struct IrqCounter {
    pub count: AtomicU64,
    lock: Mutex<()>,
    cond: Condvar,
}

impl VectorSink for IrqCounter {
    fn fire(&self, _vector: u16) {
        let _g = self.lock.lock().unwrap();
        self.count.fetch_add(1, Ordering::SeqCst);
        self.cond.notify_all();
    }
}

struct NoRouter;
impl MsiRouter for NoRouter {
    fn allocate(&self, _: u32) -> ferrovmm::Result<u32> {
        Ok(24)
    }
    fn set_msi(&self, _: u32, _: u64, _: u32) -> ferrovmm::Result<()> {
        Ok(())
    }
}

pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

pub struct Driver {
    pub dev: VirtioPciDevice,
    pub mem: GuestMem,
    pub irq: Arc<IrqCounter>,
    pub rings: Vec<Ring>,
}

fn find_msix_cap(dev: &VirtioPciDevice) -> usize {
    let mut off = (dev.config().read_reg(13) & 0xff) as usize;
    while off != 0 {
        let r = dev.config().read_reg(off / 4);
        if r & 0xff == 0x11 {
            return off;
        }
        off = ((r >> 8) & 0xff) as usize;
    }
    panic!("no MSI-X capability");
}

impl Driver {
    pub fn new(device: Box<dyn VirtioDevice>, mem_mib: usize) -> Self {
        let mem =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_mib << 20)]).unwrap());
        let event_loop = EventLoop::new().unwrap();
        event_loop.spawn().unwrap();
        let irq = Arc::new(IrqCounter::default());
        let vectors = device.queue_max_sizes().len() as u16 + 1;
        let msix = MsixTable::new(vectors, 24, Arc::new(NoRouter), irq.clone());
        let dev =
            VirtioPciDevice::new(device, mem.clone(), event_loop, msix, 0xc000_0000, None).unwrap();
        Driver {
            dev,
            mem,
            irq,
            rings: Vec::new(),
        }
    }

    /// Replaces the transport with a freshly built one (and `device`) on the same guest
    /// memory, as a restore builds the machine; the driver's rings stay as they were.
    pub fn rebuild(&mut self, device: Box<dyn VirtioDevice>) {
        let event_loop = EventLoop::new().unwrap();
        event_loop.spawn().unwrap();
        let vectors = device.queue_max_sizes().len() as u16 + 1;
        let msix = MsixTable::new(vectors, 24, Arc::new(NoRouter), self.irq.clone());
        self.dev = VirtioPciDevice::new(
            device,
            self.mem.clone(),
            event_loop,
            msix,
            0xc000_0000,
            None,
        )
        .unwrap();
    }

    pub fn write(&mut self, off: u64, v: u32, width: usize) {
        self.dev.bar_write(0, off, &v.to_le_bytes()[..width]);
    }

    pub fn read(&mut self, off: u64, width: usize) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(0, off, &mut b[..width]);
        u32::from_le_bytes(b)
    }

    pub fn status(&mut self) -> u8 {
        self.read(0x14, 1) as u8
    }

    pub fn device_features(&mut self) -> u64 {
        self.write(0x00, 0, 4);
        let lo = self.read(0x04, 4);
        self.write(0x00, 1, 4);
        let hi = self.read(0x04, 4);
        u64::from(hi) << 32 | u64::from(lo)
    }

    /// Negotiates `features` (all offered ones if None), sets up every queue with `size`
    /// entries and one MSI-X vector each, and sets DRIVER_OK.
    pub fn init(&mut self, features: Option<u64>, size: u16) {
        self.write(0x14, 0, 1);
        self.write(0x14, u32::from(STATUS_ACK_DRIVER), 1);
        let offered = self.device_features();
        let f = features.unwrap_or(offered);
        self.write(0x08, 0, 4);
        self.write(0x0c, f as u32, 4);
        self.write(0x08, 1, 4);
        self.write(0x0c, (f >> 32) as u32, 4);
        self.write(0x14, u32::from(STATUS_ACK_DRIVER | STATUS_FEATURES_OK), 1);
        assert_ne!(
            self.status() & STATUS_FEATURES_OK,
            0,
            "device refused features {f:#x}"
        );
        // MSI-X on, every vector unmasked.
        let cap = find_msix_cap(&self.dev);
        self.dev.config_mut().write_reg(cap / 4, 3, &[0x80]);
        self.dev.config_written(cap / 4);
        let nq = self.read(0x12, 2) as u16;
        for v in 0..=nq {
            let e = 0x4000 + u64::from(v) * 16;
            self.write(e, 0xfee0_0000, 4);
            self.write(e + 8, 0x30 + u32::from(v), 4);
            self.write(e + 12, 0, 4);
        }
        self.write(0x10, u32::from(nq), 2);
        self.rings.clear();
        for q in 0..nq {
            let base = RINGS_BASE + u64::from(q) * RING_STRIDE;
            let ring = Ring {
                size,
                desc: base,
                avail: base + 16 * u64::from(size),
                used: base + 0x8000,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
            };
            // Fresh, zeroed rings, as a driver allocates them.
            self.mem
                .write_slice(&vec![0u8; RING_STRIDE as usize], GuestAddress(base))
                .unwrap();
            self.write(0x16, u32::from(q), 2);
            self.write(0x18, u32::from(size), 2);
            self.write(0x1a, u32::from(q), 2);
            self.write(0x20, ring.desc as u32, 4);
            self.write(0x24, 0, 4);
            self.write(0x28, ring.avail as u32, 4);
            self.write(0x2c, 0, 4);
            self.write(0x30, ring.used as u32, 4);
            self.write(0x34, 0, 4);
            self.write(0x1c, 1, 2);
            self.rings.push(ring);
        }
        self.write(
            0x14,
            u32::from(STATUS_ACK_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
            1,
        );
    }

    /// Writes a descriptor at `index` of queue `q`'s table.
    pub fn set_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.rings[q].desc + 16 * u64::from(index));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Posts a chain of (addr, len, writable) buffers; returns its head index.
    pub fn post(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let size = self.rings[q].size;
        let head = self.rings[q].next_desc;
        for (i, (addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % size;
            let mut flags = if *writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.set_desc(q, idx, *addr, *len, flags, (idx + 1) % size);
        }
        self.rings[q].next_desc = (head + bufs.len() as u16) % size;
        self.publish(q, head);
        head
    }

    /// Puts `head` on the available ring (without kicking).
    pub fn publish(&mut self, q: usize, head: u16) {
        let r = &mut self.rings[q];
        let slot = r.avail + 4 + 2 * u64::from(r.avail_idx % r.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        r.avail_idx = r.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem
            .write_obj(r.avail_idx, GuestAddress(r.avail + 2))
            .unwrap();
    }

    /// Overwrites the available index (hostile drivers).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.rings[q].avail + 2))
            .unwrap();
    }

    pub fn kick(&mut self, q: usize) {
        self.write(0x3000 + 4 * q as u64, q as u32, 2);
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.rings[q].used + 2))
            .unwrap()
    }

    /// Waits until `n` more used entries arrive; returns them as (id, len).
    pub fn wait_used(&mut self, q: usize, n: u16, timeout: Duration) -> Vec<(u32, u32)> {
        self.wait_used_mode(q, n, timeout, false)
    }

    /// Like `wait_used`; with `spin` the caller polls the used ring instead of sleeping
    /// until the interrupt (as a polling guest driver would).
    pub fn wait_used_mode(
        &mut self,
        q: usize,
        n: u16,
        timeout: Duration,
        spin: bool,
    ) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        let target = self.rings[q].used_seen.wrapping_add(n);
        while spin && self.used_idx(q).wrapping_sub(self.rings[q].used_seen) < n {
            assert!(
                Instant::now() < deadline,
                "device did not complete {n} requests in {timeout:?}"
            );
            std::hint::spin_loop();
        }
        loop {
            // Note the interrupt count under the lock before looking at the ring, so an
            // interrupt that lands in between wakes us instead of being missed.
            let g = self.irq.lock.lock().unwrap();
            let seen = self.irq.count.load(Ordering::SeqCst);
            if self.used_idx(q).wrapping_sub(self.rings[q].used_seen) >= n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "device did not complete {n} requests in {timeout:?}"
            );
            let _ = self
                .irq
                .cond
                .wait_timeout_while(g, Duration::from_millis(100), |_| {
                    self.irq.count.load(Ordering::SeqCst) == seen
                })
                .unwrap();
        }
        let r = &mut self.rings[q];
        let mut out = Vec::new();
        while r.used_seen != target {
            let e = r.used + 4 + 8 * u64::from(r.used_seen % r.size);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id, len));
            r.used_seen = r.used_seen.wrapping_add(1);
        }
        out
    }

    /// After hostile entries were published and kicked: waits (at most `timeout`) until the
    /// device shows it took them, by moving the used index past `used_before` or asking for a
    /// reset. False when it showed neither (it may have dropped them silently).
    pub fn wait_reaction(&mut self, q: usize, used_before: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.used_idx(q) != used_before || self.status() & STATUS_NEEDS_RESET != 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits until the device reports DEVICE_NEEDS_RESET.
    pub fn wait_needs_reset(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.status() & STATUS_NEEDS_RESET == 0 {
            assert!(
                Instant::now() < deadline,
                "device never set DEVICE_NEEDS_RESET"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
