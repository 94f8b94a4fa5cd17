//! ACPI fixed hardware: the PM1a event block (status, enable) and control block.
//!
//! Writing SLP_TYP=S5 with SLP_EN powers the VM off; the power button sets
//! PWRBTN_STS and raises the SCI while its enable bit is set.

use std::sync::Arc;

use kvm_ioctls::VmFd;

use super::bus::BusDevice;
use crate::layout;
use crate::lifecycle::{Lifecycle, StopReason};

pub const PWRBTN_STS: u16 = 1 << 8;
pub const PWRBTN_EN: u16 = 1 << 8;
const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;
const SLP_EN: u16 = 1 << 13;

/// Drives the SCI line.
pub trait SciLine: Send {
    fn set_level(&self, high: bool);
}

impl SciLine for Arc<VmFd> {
    fn set_level(&self, high: bool) {
        if let Err(e) = self.set_irq_line(layout::SCI_IRQ, high) {
            log::warn!("cannot set the ACPI SCI line: {e}");
        }
    }
}

/// Ports PM1a_EVT (4 bytes) and PM1a_CNT (2 bytes), mapped as one 6-byte range.
pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
    sci: Box<dyn SciLine>,
    lifecycle: Arc<Lifecycle>,
}

const STATUS: u64 = 0;
const ENABLE: u64 = 2;
const CONTROL: u64 = (layout::PM1A_CNT_PORT - layout::PM1A_EVT_PORT) as u64;
pub const RANGE_LEN: u64 = CONTROL + layout::PM1A_CNT_LEN as u64;

impl AcpiPm {
    pub fn new(sci: Box<dyn SciLine>, lifecycle: Arc<Lifecycle>) -> Self {
        // SCI_EN reads as set: the machine is always in ACPI mode (there is no SMI_CMD port).
        AcpiPm {
            status: 0,
            enable: 0,
            control: SCI_EN,
            sci,
            lifecycle,
        }
    }

    /// A press of the power button.
    pub fn press_power_button(&mut self) {
        self.status |= PWRBTN_STS;
        self.update_sci();
    }

    fn update_sci(&self) {
        self.sci.set_level(self.status & self.enable != 0);
    }

    fn register(&self, offset: u64) -> u16 {
        match offset & !1 {
            STATUS => self.status,
            ENABLE => self.enable,
            CONTROL => self.control,
            _ => 0,
        }
    }

    fn write_register(&mut self, reg: u64, value: u16, mask: u16) {
        match reg {
            // Status bits are cleared by writing ones.
            STATUS => self.status &= !(value & mask),
            ENABLE => self.enable = (self.enable & !mask) | (value & mask),
            CONTROL => {
                let value = (self.control & !mask) | (value & mask);
                self.control = (value & !SLP_EN) | SCI_EN;
                if value & SLP_EN != 0
                    && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == layout::S5_SLEEP_TYPE
                {
                    self.lifecycle.request_stop(StopReason::PowerOff);
                }
            }
            _ => {}
        }
        self.update_sci();
    }
}

/// PM1a status, enable and control registers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiPmState {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
}

impl crate::persist::Persist for AcpiPm {
    type State = AcpiPmState;
    fn save(&self) -> AcpiPmState {
        AcpiPmState {
            status: self.status,
            enable: self.enable,
            control: self.control,
        }
    }
    fn restore(&mut self, s: AcpiPmState) -> Result<(), String> {
        self.status = s.status;
        self.enable = s.enable;
        self.control = (s.control & !SLP_EN) | SCI_EN;
        // The SCI is level triggered: a pending power-button event is asserted again.
        self.update_sci();
        Ok(())
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            *byte = (self.register(off) >> ((off & 1) * 8)) as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Assemble bytes per 16-bit register so a word write is one update.
        let mut i = 0;
        while i < data.len() {
            let off = offset + i as u64;
            let reg = off & !1;
            let (value, mask, used) = if off & 1 == 0 && i + 1 < data.len() {
                (u16::from_le_bytes([data[i], data[i + 1]]), 0xffff, 2)
            } else if off & 1 == 0 {
                (u16::from(data[i]), 0x00ff, 1)
            } else {
                (u16::from(data[i]) << 8, 0xff00, 1)
            };
            self.write_register(reg, value, mask);
            i += used;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct FakeLine(Arc<AtomicBool>);
    impl SciLine for FakeLine {
        fn set_level(&self, high: bool) {
            self.0.store(high, Ordering::SeqCst);
        }
    }

    fn pm() -> (AcpiPm, Arc<AtomicBool>, Arc<Lifecycle>) {
        let line = Arc::new(AtomicBool::new(false));
        let lc = Arc::new(Lifecycle::new().unwrap());
        (
            AcpiPm::new(Box::new(FakeLine(line.clone())), lc.clone()),
            line,
            lc,
        )
    }

    #[test]
    fn power_button_raises_sci_only_when_enabled_and_clears_on_write() {
        let (mut pm, line, _) = pm();
        pm.press_power_button();
        assert!(!line.load(Ordering::SeqCst));
        pm.write(ENABLE, &PWRBTN_EN.to_le_bytes());
        assert!(line.load(Ordering::SeqCst));
        let mut sts = [0u8; 2];
        pm.read(STATUS, &mut sts);
        assert_eq!(u16::from_le_bytes(sts), PWRBTN_STS);
        pm.write(STATUS, &PWRBTN_STS.to_le_bytes());
        assert!(!line.load(Ordering::SeqCst));
    }

    #[test]
    fn state_round_trips_and_reasserts_the_sci() {
        let (mut a, _, _) = pm();
        a.write(ENABLE, &PWRBTN_EN.to_le_bytes());
        a.press_power_button();
        let (mut b, line, _) = pm();
        crate::persist::testing::assert_round_trip(&a, &mut b);
        assert!(line.load(Ordering::SeqCst));
    }

    #[test]
    fn s5_powers_off_other_sleep_types_do_not() {
        let (mut pm, _, lc) = pm();
        pm.write(CONTROL, &((1 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes());
        assert_eq!(lc.stop_reason(), None);
        pm.write(
            CONTROL,
            &((layout::S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes(),
        );
        assert_eq!(lc.stop_reason(), Some(StopReason::PowerOff));
    }
}
