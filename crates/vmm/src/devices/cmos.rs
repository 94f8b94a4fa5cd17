//! CMOS RAM and real-time clock at ports 0x70/0x71: the time of day in BCD and
//! the memory size registers firmware-era code reads.

use std::time::{SystemTime, UNIX_EPOCH};

use super::bus::BusDevice;

const INDEX_MASK: u8 = 0x7f;
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// Register B: 24-hour mode, BCD values.
const REG_B_24H: u8 = 0x02;
/// Register D: the battery is good.
const REG_D_VRT: u8 = 0x80;
/// Register A: 32.768 kHz time base, 1024 Hz periodic rate.
const REG_A_DEFAULT: u8 = 0x26;

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// Civil date from days since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Cmos {
    /// `below_4g` and `above_4g` are the RAM sizes in bytes on either side of the MMIO hole.
    pub fn new(below_4g: u64, above_4g: u64) -> Self {
        let mut ram = [0u8; 128];
        // Extended memory between 1 MiB and 64 MiB in KiB (0x17/0x18 and 0x30/0x31).
        let ext_kib = (below_4g.saturating_sub(1 << 20) >> 10).min(0xffff) as u16;
        ram[0x17..0x19].copy_from_slice(&ext_kib.to_le_bytes());
        ram[0x30..0x32].copy_from_slice(&ext_kib.to_le_bytes());
        // Memory above 16 MiB in 64 KiB blocks (0x34/0x35).
        let above_16m = (below_4g.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        ram[0x34..0x36].copy_from_slice(&above_16m.to_le_bytes());
        // Memory above 4 GiB in 64 KiB blocks (0x5b..0x5d).
        let high = above_4g >> 16;
        ram[0x5b] = high as u8;
        ram[0x5c] = (high >> 8) as u8;
        ram[0x5d] = (high >> 16) as u8;
        // Base memory: 640 KiB.
        ram[0x15..0x17].copy_from_slice(&640u16.to_le_bytes());
        ram[REG_A as usize] = REG_A_DEFAULT;
        ram[REG_B as usize] = REG_B_24H;
        ram[REG_D as usize] = REG_D_VRT;
        Cmos { index: 0, ram }
    }

    fn clock_register(&self, reg: u8) -> Option<u8> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let days = (secs / 86_400) as i64;
        let (year, month, day) = civil_from_days(days);
        let tod = secs % 86_400;
        Some(match reg {
            REG_SECONDS => bcd(tod % 60),
            REG_MINUTES => bcd(tod / 60 % 60),
            REG_HOURS => bcd(tod / 3600),
            REG_WEEKDAY => bcd(((days + 4).rem_euclid(7) + 1) as u64),
            REG_DAY => bcd(u64::from(day)),
            REG_MONTH => bcd(u64::from(month)),
            REG_YEAR => bcd((year % 100) as u64),
            REG_CENTURY => bcd((year / 100) as u64),
            // Register A: the update-in-progress bit is never set, reads are always consistent.
            REG_A => self.ram[REG_A as usize] & 0x7f,
            // Register C: no interrupt flags pending.
            REG_C => 0,
            _ => return None,
        })
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            0 => self.index,
            1 => self
                .clock_register(self.index)
                .unwrap_or(self.ram[self.index as usize]),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            0 => self.index = value & INDEX_MASK,
            1 => match self.index {
                REG_SECONDS..=REG_YEAR | REG_C | REG_D | REG_CENTURY => {}
                i => self.ram[i as usize] = value,
            },
            _ => {}
        }
    }
}

/// The index register and the 128 bytes of CMOS RAM (the clock registers are read
/// from the host's clock, so the guest's wall time follows the host's after a restore).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CmosState {
    pub index: u8,
    pub ram: Vec<u8>,
}

impl crate::persist::Persist for Cmos {
    type State = CmosState;
    fn save(&self) -> CmosState {
        CmosState {
            index: self.index,
            ram: self.ram.to_vec(),
        }
    }
    fn restore(&mut self, state: CmosState) -> Result<(), String> {
        self.ram = state
            .ram
            .as_slice()
            .try_into()
            .map_err(|_| format!("CMOS: {} bytes of RAM, expected 128", state.ram.len()))?;
        self.index = state.index & INDEX_MASK;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Persist;

    #[test]
    fn state_round_trips() {
        let mut a = Cmos::new(64 << 20, 0);
        a.write(0, &[0x40]);
        a.write(1, &[0x99]);
        let mut b = Cmos::new(1 << 30, 0);
        crate::persist::testing::assert_round_trip(&a, &mut b);
        assert_eq!(read_reg(&mut b, 0x40), 0x99);
        assert!(b
            .restore(CmosState {
                index: 0,
                ram: vec![0; 3]
            })
            .is_err());
    }

    fn read_reg(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn dates_convert() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_418), (2025, 11, 26));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn reports_memory_and_time() {
        let mut c = Cmos::new(256 << 20, 0);
        let blocks = u16::from(read_reg(&mut c, 0x34)) | u16::from(read_reg(&mut c, 0x35)) << 8;
        assert_eq!(u64::from(blocks) << 16, (256 << 20) - (16 << 20));
        let month = read_reg(&mut c, REG_MONTH);
        assert!((0x01..=0x12).contains(&month));
        assert_eq!(read_reg(&mut c, REG_D), REG_D_VRT);
        // The NMI-mask bit does not change the register selected.
        c.write(0, &[0x80 | REG_D]);
        let mut b = [0u8];
        c.read(1, &mut b);
        assert_eq!(b[0], REG_D_VRT);
    }
}
