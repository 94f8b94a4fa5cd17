//! A port I/O bus: address ranges mapped to devices.

use std::sync::{Arc, Mutex, RwLock};

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

/// Mappings can change while the guest runs (a PCI BAR moves), so they sit
/// behind a lock that is only held to look a device up, never while it runs.
#[derive(Default)]
pub struct Bus {
    mappings: RwLock<Vec<Mapping>>,
}

impl Bus {
    pub fn new() -> Self {
        Bus::default()
    }

    /// Maps `device` at `[start, start + len)`. Ranges must not overlap.
    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        start: u64,
        len: u64,
    ) -> Result<(), String> {
        if len == 0 || start.checked_add(len).is_none() {
            return Err(format!("invalid range {start:#x}+{len:#x}"));
        }
        let mut mappings = self.mappings.write().unwrap_or_else(|p| p.into_inner());
        if mappings
            .iter()
            .any(|m| start < m.start + m.len && m.start < start + len)
        {
            return Err(format!("range {start:#x}+{len:#x} overlaps another device"));
        }
        mappings.push(Mapping { start, len, device });
        mappings.sort_by_key(|m| m.start);
        Ok(())
    }

    /// Unmaps the range that starts at `start`; true if there was one.
    pub fn remove(&self, start: u64) -> bool {
        let mut mappings = self.mappings.write().unwrap_or_else(|p| p.into_inner());
        let before = mappings.len();
        mappings.retain(|m| m.start != start);
        mappings.len() != before
    }

    fn find(&self, addr: u64) -> Option<(Arc<Mutex<dyn BusDevice>>, u64)> {
        let mappings = self.mappings.read().unwrap_or_else(|p| p.into_inner());
        let idx = mappings.partition_point(|m| m.start <= addr);
        let m = mappings.get(idx.checked_sub(1)?)?;
        (addr - m.start < m.len).then(|| (m.device.clone(), addr - m.start))
    }

    /// Reads from the device at `addr`; false (and all ones) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((device, offset)) => {
                device
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
            Some((device, offset)) => {
                device
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
        let bus = Bus::new();
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
        assert!(bus.remove(0x100));
        assert!(!bus.read(0x102, &mut b));
    }
}
