//! MSI-X: the vector table and pending-bit array a device exposes in a BAR,
//! with each vector delivered through an irqfd whose GSI routes to the
//! message the guest programmed. Masking is done here, not in KVM.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::irq::MsiRouter;

pub const MSIX_CAP_ID: u8 = 0x11;
const ENTRY_SIZE: u64 = 16;
const CTRL_MASKED: u32 = 1;
const MSG_CTRL_ENABLE: u16 = 1 << 15;
const MSG_CTRL_FUNCTION_MASK: u16 = 1 << 14;

#[derive(Clone, Copy, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

/// Delivers one interrupt for a vector; in tests, something other than KVM.
pub trait VectorSink: Send + Sync {
    fn fire(&self, vector: u16);
}

/// Writes the vector's irqfd.
pub struct IrqfdSink {
    pub irqfds: Vec<EventFd>,
}

impl VectorSink for IrqfdSink {
    fn fire(&self, vector: u16) {
        if let Some(fd) = self.irqfds.get(usize::from(vector)) {
            let _ = fd.write(1);
        }
    }
}

pub struct MsixTable {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    gsi_base: u32,
    router: Arc<dyn MsiRouter>,
    sink: Arc<dyn VectorSink>,
}

impl MsixTable {
    pub fn new(
        vectors: u16,
        gsi_base: u32,
        router: Arc<dyn MsiRouter>,
        sink: Arc<dyn VectorSink>,
    ) -> Self {
        MsixTable {
            entries: vec![
                Entry {
                    ctrl: CTRL_MASKED,
                    ..Default::default()
                };
                usize::from(vectors)
            ],
            pending: vec![false; usize::from(vectors)],
            enabled: false,
            function_masked: false,
            gsi_base,
            router,
            sink,
        }
    }

    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// The capability body (after ID and next pointer) for `table_offset` and `pba_offset` in BAR `bir`.
    pub fn capability_body(&self, bir: u8, table_offset: u32, pba_offset: u32) -> Vec<u8> {
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(self.vectors() - 1).to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bir)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bir)).to_le_bytes());
        body
    }

    /// Mask of the writable bits of the capability's first dword (enable, function mask).
    pub const CAPABILITY_WMASK: u32 = ((MSG_CTRL_ENABLE | MSG_CTRL_FUNCTION_MASK) as u32) << 16;

    /// Applies a new Message Control value from configuration space.
    pub fn set_message_control(&mut self, ctrl: u16) {
        let was_masked = !self.enabled || self.function_masked;
        self.enabled = ctrl & MSG_CTRL_ENABLE != 0;
        self.function_masked = ctrl & MSG_CTRL_FUNCTION_MASK != 0;
        if was_masked && self.enabled && !self.function_masked {
            for v in 0..self.vectors() {
                self.deliver_pending(v);
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn masked(&self, v: usize) -> bool {
        !self.enabled || self.function_masked || self.entries[v].ctrl & CTRL_MASKED != 0
    }

    fn deliver_pending(&mut self, v: u16) {
        let i = usize::from(v);
        if self.pending[i] && !self.masked(i) {
            self.pending[i] = false;
            self.sink.fire(v);
        }
    }

    /// Raises vector `v` (or marks it pending while masked).
    pub fn trigger(&mut self, v: u16) {
        let i = usize::from(v);
        if i >= self.entries.len() {
            return;
        }
        if self.masked(i) {
            self.pending[i] = true;
        } else {
            self.sink.fire(v);
        }
    }

    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let v = (offset / ENTRY_SIZE) as usize;
        let Some(e) = self.entries.get(v) else { return };
        let words = [e.addr_lo, e.addr_hi, e.data, e.ctrl];
        for (i, b) in data.iter_mut().enumerate() {
            let off = (offset % ENTRY_SIZE) as usize + i;
            if off < 16 {
                *b = (words[off / 4] >> ((off % 4) * 8)) as u8;
            }
        }
    }

    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let v = (offset / ENTRY_SIZE) as usize;
        if v >= self.entries.len() {
            return;
        }
        let was_masked = self.masked(v);
        let mut words = {
            let e = self.entries[v];
            [e.addr_lo, e.addr_hi, e.data, e.ctrl]
        };
        for (i, b) in data.iter().enumerate() {
            let off = (offset % ENTRY_SIZE) as usize + i;
            if off < 16 {
                let w = &mut words[off / 4];
                let shift = (off % 4) * 8;
                *w = (*w & !(0xff << shift)) | (u32::from(*b) << shift);
            }
        }
        let e = &mut self.entries[v];
        e.addr_lo = words[0];
        e.addr_hi = words[1];
        e.data = words[2];
        e.ctrl = words[3] & CTRL_MASKED;
        let (address, msg) = ((u64::from(e.addr_hi) << 32) | u64::from(e.addr_lo), e.data);
        if let Err(err) = self.router.set_msi(self.gsi_base + v as u32, address, msg) {
            log::warn!("MSI-X vector {v}: {err}");
        }
        if was_masked && !self.masked(v) {
            self.deliver_pending(v as u16);
        }
    }

    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let base = ((offset as usize) + i) * 8;
            *b = (0..8).fold(0u8, |acc, bit| {
                acc | (u8::from(self.pending.get(base + bit).copied().unwrap_or(false)) << bit)
            });
        }
    }
}

/// The vector table, the pending bits and the two Message Control bits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// Per vector: address low, address high, data, vector control.
    pub entries: Vec<[u32; 4]>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_masked: bool,
}

impl crate::persist::Persist for MsixTable {
    type State = MsixState;

    fn save(&self) -> MsixState {
        MsixState {
            entries: self
                .entries
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.ctrl])
                .collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Loads the table and points each vector's interrupt route at its message again.
    fn restore(&mut self, s: MsixState) -> Result<(), String> {
        if s.entries.len() != self.entries.len() || s.pending.len() != self.pending.len() {
            return Err(format!(
                "MSI-X state has {} vectors, the device {}",
                s.entries.len(),
                self.entries.len()
            ));
        }
        for (e, w) in self.entries.iter_mut().zip(&s.entries) {
            *e = Entry {
                addr_lo: w[0],
                addr_hi: w[1],
                data: w[2],
                ctrl: w[3] & CTRL_MASKED,
            };
        }
        self.pending = s.pending;
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        for (v, e) in self.entries.iter().enumerate() {
            let address = (u64::from(e.addr_hi) << 32) | u64::from(e.addr_lo);
            if address != 0 {
                self.router
                    .set_msi(self.gsi_base + v as u32, address, e.data)
                    .map_err(|err| format!("MSI-X vector {v}: {err}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Persist;
    use std::sync::Mutex;

    #[test]
    fn state_round_trips_and_reprograms_routes() {
        let rec = Arc::new(Recorder::default());
        let mut a = MsixTable::new(3, 24, rec.clone(), rec.clone());
        a.set_message_control(MSG_CTRL_ENABLE);
        a.table_write(16, &0xfee0_1000u32.to_le_bytes());
        a.table_write(24, &0x42u32.to_le_bytes());
        a.trigger(2);
        let rec2 = Arc::new(Recorder::default());
        let mut b = MsixTable::new(3, 24, rec2.clone(), rec2.clone());
        crate::persist::testing::assert_round_trip(&a, &mut b);
        assert!(rec2.0.lock().unwrap().contains(&(25, 0xfee0_1000, 0x42)));
        let mut small = MsixTable::new(2, 24, rec2.clone(), rec2);
        assert!(small.restore(a.save()).is_err());
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u32, u64, u32)>>, Mutex<Vec<u16>>);
    impl MsiRouter for Recorder {
        fn allocate(&self, _: u32) -> crate::error::Result<u32> {
            Ok(24)
        }
        fn set_msi(&self, gsi: u32, address: u64, data: u32) -> crate::error::Result<()> {
            self.0.lock().unwrap().push((gsi, address, data));
            Ok(())
        }
    }
    impl VectorSink for Recorder {
        fn fire(&self, v: u16) {
            self.1.lock().unwrap().push(v);
        }
    }

    #[test]
    fn masked_vectors_stay_pending_until_unmasked() {
        let rec = Arc::new(Recorder::default());
        let mut t = MsixTable::new(2, 24, rec.clone(), rec.clone());
        t.trigger(1);
        assert!(rec.1.lock().unwrap().is_empty());
        let mut pba = [0u8];
        t.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        t.set_message_control(MSG_CTRL_ENABLE);
        // Program vector 1 and unmask it: the pending interrupt is delivered.
        t.table_write(16, &0xfee0_0000u32.to_le_bytes());
        t.table_write(24, &0x41u32.to_le_bytes());
        t.table_write(28, &0u32.to_le_bytes());
        assert_eq!(*rec.1.lock().unwrap(), vec![1]);
        assert_eq!(rec.0.lock().unwrap().last(), Some(&(25, 0xfee0_0000, 0x41)));
        t.trigger(1);
        assert_eq!(*rec.1.lock().unwrap(), vec![1, 1]);
        // Out-of-range vectors and table offsets are ignored.
        t.trigger(7);
        t.table_write(4096, &[1, 2, 3, 4]);
    }
}
