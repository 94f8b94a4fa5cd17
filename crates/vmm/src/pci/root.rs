//! Bus 0: the host bridge and the devices in its slots, reached through
//! ports 0xCF8/0xCFC or through ECAM; BARs live on the MMIO bus.

use std::sync::{Arc, Mutex};

use super::config::{PciConfiguration, PciIds, NUM_BARS};
use super::PciDevice;
use crate::devices::bus::{Bus, BusDevice};

pub const NUM_SLOTS: usize = 32;
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
pub const CONFIG_PORTS_LEN: u64 = 8;

/// The host bridge in slot 0: identity only.
struct HostBridge(PciConfiguration);

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.0
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.0
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
}

/// Routes MMIO accesses in one BAR to its device.
struct BarMapping {
    device: Arc<Mutex<dyn PciDevice>>,
    bar: usize,
}

impl BusDevice for BarMapping {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bar_read(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bar_write(self.bar, offset, data);
    }
}

pub struct PciRoot {
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
    mmio: Arc<Bus>,
    /// Where each slot's BARs are mapped on the MMIO bus now.
    mapped: Mutex<Vec<[u64; NUM_BARS]>>,
}

impl PciRoot {
    pub fn new(mmio: Arc<Bus>) -> Self {
        let bridge = HostBridge(PciConfiguration::new(&PciIds {
            vendor: 0x1b36, // Red Hat, Inc.: the generic PCIe host bridge ID QEMU also uses
            device: 0x0008,
            class: 0x06,
            subclass: 0x00,
            prog_if: 0,
            revision: 0,
            subsystem_vendor: 0x1b36,
            subsystem: 0x0008,
        }));
        let mut slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = vec![None; NUM_SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(bridge)));
        PciRoot {
            slots,
            mmio,
            mapped: Mutex::new(vec![[0; NUM_BARS]; NUM_SLOTS]),
        }
    }

    /// Plugs a device into the next free slot and maps its BARs; returns the slot.
    pub fn add_device(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<usize, String> {
        let slot = self
            .slots
            .iter()
            .position(|s| s.is_none())
            .ok_or("no free PCI slot (32 per bus)")?;
        let bars: Vec<(usize, u64, u64)> = {
            let d = device.lock().unwrap_or_else(|p| p.into_inner());
            (0..NUM_BARS)
                .filter_map(|i| {
                    d.config()
                        .bar(i)
                        .map(|b| (i, d.config().bar_address(i), b.size))
                })
                .collect()
        };
        for (bar, addr, size) in bars {
            self.mmio.insert(
                Arc::new(Mutex::new(BarMapping {
                    device: device.clone(),
                    bar,
                })),
                addr,
                size,
            )?;
            self.mapped.lock().unwrap_or_else(|p| p.into_inner())[slot][bar] = addr;
        }
        self.slots[slot] = Some(device);
        Ok(slot)
    }

    fn device(&self, bus: u8, slot: u8, function: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(usize::from(slot))?.as_ref()
    }

    pub fn config_read(&self, bus: u8, slot: u8, function: u8, reg: usize) -> u32 {
        match self.device(bus, slot, function) {
            Some(d) => d
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .config()
                .read_reg(reg),
            None => 0xffff_ffff,
        }
    }

    pub fn config_write(
        &self,
        bus: u8,
        slot: u8,
        function: u8,
        reg: usize,
        offset: usize,
        data: &[u8],
    ) {
        let Some(device) = self.device(bus, slot, function) else {
            return;
        };
        {
            let mut d = device.lock().unwrap_or_else(|p| p.into_inner());
            d.config_mut().write_reg(reg, offset, data);
            d.config_written(reg);
        }
        self.follow_bars(usize::from(slot));
    }

    /// Maps each BAR of `slot` where its configuration space now says it is (after a
    /// guest write, or after a restore loaded the guest's BAR addresses).
    pub fn follow_bars(&self, slot: usize) {
        let Some(Some(device)) = self.slots.get(slot) else {
            return;
        };
        let mut moves = Vec::new();
        {
            let d = device.lock().unwrap_or_else(|p| p.into_inner());
            let mapped = self.mapped.lock().unwrap_or_else(|p| p.into_inner())[slot];
            for (i, old) in mapped.iter().enumerate() {
                let new = d.config().bar_address(i);
                if let Some(bar) = d.config().bar(i) {
                    // The all-ones sizing probe is not a move; the OS writes the address back.
                    if new != *old && new != 0 && !d.config().bar_is_sizing(i) {
                        moves.push((i, *old, new, bar.size));
                    }
                }
            }
        }
        // Remap outside the device lock: the MMIO bus may be in use by other vCPUs.
        for (bar, old, new, size) in moves {
            self.mmio.remove(old);
            let mapping = Arc::new(Mutex::new(BarMapping {
                device: device.clone(),
                bar,
            }));
            self.mapped.lock().unwrap_or_else(|p| p.into_inner())[slot][bar] = 0;
            if let Err(e) = self.mmio.insert(mapping, new, size) {
                log::warn!("PCI {slot:02x}.0 BAR{bar} moved to {new:#x}: {e}; it stays unmapped");
                continue;
            }
            self.mapped.lock().unwrap_or_else(|p| p.into_inner())[slot][bar] = new;
            device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .bar_moved(bar, old, new);
        }
    }
}

/// Configuration mechanism #1: address at 0xCF8, data at 0xCFC-0xCFF.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// The CONFIG_ADDRESS latch, the only state of this access path.
    pub fn address(&self) -> u32 {
        self.address
    }

    pub fn set_address(&mut self, address: u32) {
        self.address = address;
    }

    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let slot = ((self.address >> 11) & 0x1f) as u8;
        let function = ((self.address >> 8) & 0x7) as u8;
        let reg = ((self.address >> 2) & 0x3f) as usize;
        Some((bus, slot, function, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0..=3 => self.address >> (offset * 8),
            4..=7 => match self.target() {
                Some((b, s, f, r)) => self.root.config_read(b, s, f, r) >> ((offset - 4) * 8),
                None => 0xffff_ffff,
            },
            _ => 0xffff_ffff,
        };
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = (value >> (i * 8)) as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]])
            }
            4..=7 => {
                if let Some((b, s, f, r)) = self.target() {
                    self.root
                        .config_write(b, s, f, r, (offset - 4) as usize, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM: 4 KiB of configuration space per function, memory mapped (bus 0 only).
pub struct PciEcam {
    root: Arc<PciRoot>,
}

pub const ECAM_SIZE: u64 = 1 << 20; // bus 0: 32 slots x 8 functions x 4 KiB

impl PciEcam {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciEcam { root }
    }

    fn decode(offset: u64) -> (u8, u8, usize, usize) {
        let slot = ((offset >> 15) & 0x1f) as u8;
        let function = ((offset >> 12) & 0x7) as u8;
        let reg = ((offset & 0xfff) >> 2) as usize;
        (slot, function, reg, (offset & 3) as usize)
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (slot, function, reg, byte) = Self::decode(offset);
        let value = self.root.config_read(0, slot, function, reg) >> (byte * 8);
        for (i, b) in data.iter_mut().enumerate() {
            *b = value.checked_shr(i as u32 * 8).unwrap_or(0) as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (slot, function, reg, byte) = Self::decode(offset);
        if byte + data.len() <= 4 {
            self.root.config_write(0, slot, function, reg, byte, data);
        }
    }
}
