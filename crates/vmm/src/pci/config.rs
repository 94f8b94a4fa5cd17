//! A type-0 PCI configuration space with write masks, BARs and a capability list.

pub const CONFIG_SPACE_DWORDS: usize = 1024; // 4 KiB, as ECAM exposes it
const COMMAND_REG: usize = 1;
const STATUS_CAP_LIST: u32 = 1 << 20;
const BAR0_REG: usize = 4;
const CAP_POINTER_REG: usize = 13;
const FIRST_CAP_OFFSET: usize = 0x40;
pub const NUM_BARS: usize = 6;

/// A memory BAR: its size (a power of two) and where it currently points.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BarRegion {
    pub size: u64,
}

pub struct PciConfiguration {
    regs: [u32; CONFIG_SPACE_DWORDS],
    wmask: [u32; CONFIG_SPACE_DWORDS],
    bars: [Option<BarRegion>; NUM_BARS],
    next_cap: usize,
    last_cap: Option<usize>,
}

/// Identity of a function.
#[derive(Clone, Copy)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

impl PciConfiguration {
    pub fn new(ids: &PciIds) -> Self {
        let mut c = PciConfiguration {
            regs: [0; CONFIG_SPACE_DWORDS],
            wmask: [0; CONFIG_SPACE_DWORDS],
            bars: [None; NUM_BARS],
            next_cap: FIRST_CAP_OFFSET,
            last_cap: None,
        };
        c.regs[0] = u32::from(ids.device) << 16 | u32::from(ids.vendor);
        c.regs[2] = u32::from(ids.class) << 24
            | u32::from(ids.subclass) << 16
            | u32::from(ids.prog_if) << 8
            | u32::from(ids.revision);
        c.regs[11] = u32::from(ids.subsystem) << 16 | u32::from(ids.subsystem_vendor);
        // Command: I/O, memory, bus master, INTx disable are writable.
        c.wmask[COMMAND_REG] = 0x0000_0407;
        // Cache line size and latency timer are writable scratch registers.
        c.wmask[3] = 0x0000_ffff;
        // Interrupt line is scratch for the OS.
        c.wmask[15] = 0x0000_00ff;
        c
    }

    /// Adds a 32-bit memory BAR at `addr` of `size` bytes (a power of two, at least 16).
    pub fn add_mem32_bar(&mut self, index: usize, addr: u32, size: u32) {
        assert!(
            index < NUM_BARS && size.is_power_of_two() && size >= 16 && addr.is_multiple_of(size)
        );
        self.regs[BAR0_REG + index] = addr;
        self.wmask[BAR0_REG + index] = !(size - 1);
        self.bars[index] = Some(BarRegion {
            size: u64::from(size),
        });
    }

    pub fn bar(&self, index: usize) -> Option<BarRegion> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` decodes now (0 when unassigned).
    pub fn bar_address(&self, index: usize) -> u64 {
        u64::from(self.regs[BAR0_REG + index] & !0xf)
    }

    /// True if the BAR holds the all-ones sizing pattern rather than an address.
    pub fn bar_is_sizing(&self, index: usize) -> bool {
        match self.bar(index) {
            Some(b) => self.bar_address(index) == (!(b.size - 1) & 0xffff_fff0),
            None => false,
        }
    }

    pub fn memory_enabled(&self) -> bool {
        self.regs[COMMAND_REG] & 0x2 != 0
    }

    /// Appends a capability; `body` starts after the ID and next-pointer bytes.
    /// `wmask` gives writable bits per dword of the capability. Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], wmask: &[u32]) -> usize {
        let offset = self.next_cap;
        let len = (2 + body.len() + 3) & !3;
        assert!(
            offset + len <= 256,
            "capabilities must fit in the first 256 bytes"
        );
        let mut bytes = vec![0u8; len];
        bytes[0] = id;
        bytes[2..2 + body.len()].copy_from_slice(body);
        for (i, chunk) in bytes.chunks(4).enumerate() {
            self.regs[offset / 4 + i] =
                u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            self.wmask[offset / 4 + i] = wmask.get(i).copied().unwrap_or(0);
        }
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.regs[CAP_POINTER_REG] = offset as u32;
                self.regs[COMMAND_REG] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = offset + len;
        offset
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let r = &mut self.regs[offset / 4];
        *r = (*r & !(0xff << shift)) | (u32::from(value) << shift);
    }

    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` within dword `reg`, through the write mask.
    pub fn write_reg(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg >= CONFIG_SPACE_DWORDS || offset + data.len() > 4 {
            return;
        }
        let mut value = 0u32;
        let mut mask = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << ((offset + i) * 8);
            mask |= 0xff << ((offset + i) * 8);
        }
        let wmask = self.wmask[reg] & mask;
        self.regs[reg] = (self.regs[reg] & !wmask) | (value & wmask);
    }

    /// Reads `len` bytes of dword `reg` starting at `offset` into a u32 (for capability parsing).
    pub fn read_u16(&self, byte_offset: usize) -> u16 {
        let r = self.read_reg(byte_offset / 4);
        (r >> ((byte_offset % 4) * 8)) as u16
    }
}

/// The 4 KiB of configuration space as the guest sees it (IDs, command, BAR
/// addresses, capabilities with their writable bits).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciConfigState {
    pub regs: Vec<u32>,
}

impl crate::persist::Persist for PciConfiguration {
    type State = PciConfigState;

    fn save(&self) -> PciConfigState {
        PciConfigState {
            regs: self.regs.to_vec(),
        }
    }

    /// Only a state whose read-only bits (IDs, class, BAR sizes, capability layout)
    /// match this function's is accepted: it must describe the same device.
    fn restore(&mut self, state: PciConfigState) -> Result<(), String> {
        if state.regs.len() != CONFIG_SPACE_DWORDS {
            return Err(format!(
                "PCI config space of {} dwords, expected {CONFIG_SPACE_DWORDS}",
                state.regs.len()
            ));
        }
        for (i, (saved, now)) in state.regs.iter().zip(self.regs.iter()).enumerate() {
            let fixed = !self.wmask[i];
            if saved & fixed != now & fixed {
                return Err(format!(
                    "PCI config dword {i:#x} is {saved:#010x} in the state but the device has \
                     {now:#010x} there: the state is from another device"
                ));
            }
        }
        self.regs.copy_from_slice(&state.regs);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Persist;

    #[test]
    fn state_round_trips_and_another_device_is_refused() {
        let mut a = PciConfiguration::new(&ids());
        a.add_mem32_bar(0, 0xc000_0000, 0x4000);
        a.write_reg(4, 0, &0xd000_0000u32.to_le_bytes());
        a.write_reg(1, 0, &[0x06, 0x04]);
        let mut b = PciConfiguration::new(&ids());
        b.add_mem32_bar(0, 0xc000_0000, 0x4000);
        crate::persist::testing::assert_round_trip(&a, &mut b);
        assert_eq!(b.bar_address(0), 0xd000_0000);
        assert!(b.memory_enabled());
        let mut other = PciConfiguration::new(&PciIds {
            device: 0x1041,
            ..ids()
        });
        other.add_mem32_bar(0, 0xc000_0000, 0x4000);
        let err = other.restore(a.save()).unwrap_err();
        assert!(err.contains("another device"), "{err}");
    }

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: 1,
            subclass: 0x80,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    #[test]
    fn bar_sizing_and_relocation() {
        let mut c = PciConfiguration::new(&ids());
        c.add_mem32_bar(0, 0xc000_0000, 0x4000);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        c.write_reg(4, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_reg(4), 0xffff_c000);
        assert!(c.bar_is_sizing(0));
        c.write_reg(4, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(c.bar_address(0), 0xd000_0000);
        // Read-only fields stay.
        c.write_reg(0, 0, &[0, 0, 0, 0]);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        // Unimplemented BARs read zero and ignore writes.
        c.write_reg(5, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_reg(5), 0);
    }

    #[test]
    fn capabilities_are_linked() {
        let mut c = PciConfiguration::new(&ids());
        let a = c.add_capability(0x09, &[16, 1, 0, 0, 0, 0], &[]);
        let b = c.add_capability(0x11, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0xc000_0000]);
        assert_eq!(c.read_reg(13), a as u32);
        assert_eq!(c.read_reg(1) & STATUS_CAP_LIST, STATUS_CAP_LIST);
        assert_eq!((c.read_reg(a / 4) >> 8) & 0xff, b as u32);
        assert_eq!(c.read_reg(b / 4) & 0xff, 0x11);
    }
}
