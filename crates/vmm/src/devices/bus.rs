//! A port I/O bus: address ranges mapped to devices.

use std::sync::{Arc, Mutex};

/// A device on the bus. `offset` is relative to the start of its range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Mapping {
    start: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    mappings: Vec<Mapping>,
}

impl Bus {
    pub fn new() -> Self {
        Bus::default()
    }

    /// Maps `device` at `[start, start + len)`. Ranges must not overlap.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        start: u64,
        len: u64,
    ) -> Result<(), String> {
        if len == 0 {
            return Err(format!("empty range at {start:#x}"));
        }
        if self
            .mappings
            .iter()
            .any(|m| start < m.start + m.len && m.start < start + len)
        {
            return Err(format!("range {start:#x}+{len:#x} overlaps another device"));
        }
        self.mappings.push(Mapping { start, len, device });
        self.mappings.sort_by_key(|m| m.start);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Mapping, u64)> {
        let idx = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(idx.checked_sub(1)?)?;
        (addr - m.start < m.len).then_some((m, addr - m.start))
    }

    /// Reads from the device at `addr`; false (and all ones) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((m, offset)) => {
                m.device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((m, offset)) => {
                m.device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Accepts writes and reads zeros: for ports guests poke but nobody needs to emulate.
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_reports_holes() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x100, 8)
            .unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x104, 8).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 12);
        assert!(!bus.read(0x108, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x100, &[1]));
        assert!(!bus.write(0xff, &[1]));
    }
}
