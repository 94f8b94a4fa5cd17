//! virtio devices as a hostile guest driver sees them, through the real PCI transport: the input
//! is a program of guest actions (BAR MMIO reads and writes of any width at any offset, PCI
//! config space writes, descriptor table entries, available-ring entries and indexes, request
//! headers, kicks, resets). It drives ferrovmm's block and rng devices with the host-side driver
//! of crates/vmm/tests/common/vdriver.rs. After each program the device is reset and must still
//! serve a valid request: a panic on the device thread shows as a device that no longer answers.

use std::time::Duration;

use ferrovmm::pci::PciDevice;
use ferrovmm::virtio::block::{Block, BlockOptions};
use ferrovmm::virtio::rng::Rng;
use vm_memory::{Bytes, GuestAddress};

use crate::engine::{Outcome, Target};

// The vmm crate's test driver, shared rather than copied: it is the seam the hostile-ring tests
// already use.
#[allow(dead_code)]
#[path = "../../../vmm/tests/common/vdriver.rs"]
mod vdriver;

use vdriver::{Driver, DATA_BASE};

const MEM_MIB: usize = 64;
const QUEUE_SIZE: u16 = 64;
/// A device that answers at all answers a valid request within this on any host.
const HEALTHY: Duration = Duration::from_secs(20);
const HDR: u64 = DATA_BASE;
const STATUS: u64 = DATA_BASE + 0x100;
const BUF: u64 = DATA_BASE + 0x1000;
const MAX_OPS: usize = 96;

pub const VIRTIO_BLOCK: Target = Target {
    name: "virtio_block",
    dict: &[],
    max_len: 2048,
};
pub const VIRTIO_RNG: Target = Target {
    name: "virtio_rng",
    dict: &[],
    max_len: 2048,
};

/// Reads the program; past its end every read gives zeros.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
    /// A guest address: mostly inside the data area, sometimes at the edges of memory or wild.
    fn addr(&mut self) -> u64 {
        match self.u8() % 8 {
            0 => self.u64(),
            1 => ((MEM_MIB as u64) << 20) - u64::from(self.u8()),
            2 => u64::from(self.u32()),
            3 => 0x10_0000 + u64::from(self.u16()), // the rings
            _ => DATA_BASE + u64::from(self.u16()) * 8,
        }
    }
    fn len(&mut self) -> u32 {
        match self.u8() % 4 {
            0 => self.u32(),
            1 => [0, 1, 15, 16, 17, 512, 513, 4096, u32::MAX][usize::from(self.u8() % 9)],
            _ => u32::from(self.u16()) % 8192,
        }
    }
}

/// Which device the program drives, and how a valid request looks for it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Block,
    Rng,
}

pub struct VirtioTarget {
    kind: Kind,
    driver: Driver,
    _dir: Option<tempfile::TempDir>,
}

impl VirtioTarget {
    pub fn block() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ferrovirt-fuzz-virtio-")
            .tempdir()
            .expect("a scratch folder");
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 1 << 20]).expect("disk");
        let backend = ferrovirt_disk::open(
            &path,
            &ferrovirt_disk::OpenOptions {
                format: Some(ferrovirt_disk::Format::Raw),
                read_only: false,
                direct: false,
            },
        )
        .expect("open the disk");
        let dev = Block::new(
            backend,
            BlockOptions {
                read_only: false,
                serial: "fuzz".into(),
            },
        );
        let mut driver = Driver::new(Box::new(dev), MEM_MIB);
        driver.init(None, QUEUE_SIZE);
        VirtioTarget {
            kind: Kind::Block,
            driver,
            _dir: Some(dir),
        }
    }

    pub fn rng() -> Self {
        let mut driver = Driver::new(Box::new(Rng::default()), MEM_MIB);
        driver.init(None, QUEUE_SIZE);
        VirtioTarget {
            kind: Kind::Rng,
            driver,
            _dir: None,
        }
    }

    pub fn one(&mut self, input: &[u8]) -> Outcome {
        let d = &mut self.driver;
        d.init(None, QUEUE_SIZE);
        let nq = d.rings.len();
        let mut c = Cursor(input);
        for _ in 0..MAX_OPS {
            if c.done() {
                break;
            }
            match c.u8() % 12 {
                0 => {
                    // BAR 0 MMIO write: common config, ISR, device config, notify, MSI-X.
                    let off = u64::from(c.u16()) % 0x5000;
                    let width = [1usize, 2, 4, 8][usize::from(c.u8() % 4)];
                    let v = c.u64().to_le_bytes();
                    d.dev.bar_write(usize::from(c.u8() % 2), off, &v[..width]);
                }
                1 => {
                    let off = u64::from(c.u16()) % 0x5000;
                    let width = [1usize, 2, 4, 8][usize::from(c.u8() % 4)];
                    let mut b = [0u8; 8];
                    d.dev.bar_read(0, off, &mut b[..width]);
                }
                2 => {
                    // PCI config space: any register, any byte, 1 to 4 bytes.
                    let reg = usize::from(c.u8() % 64);
                    let off = usize::from(c.u8() % 4);
                    let data = c.bytes::<4>();
                    let n = 1 + usize::from(c.u8() % 4);
                    d.dev
                        .config_mut()
                        .write_reg(reg, off, &data[..n.min(4 - off)]);
                    d.dev.config_written(reg);
                }
                3 => {
                    let reg = usize::from(c.u8() % 64);
                    let _ = d.dev.config().read_reg(reg);
                }
                4..=6 => {
                    let q = usize::from(c.u8()) % nq;
                    let idx = c.u16() % QUEUE_SIZE;
                    let (addr, len) = (c.addr(), c.len());
                    let flags = u16::from(c.u8() & 7);
                    let next = if c.u8() % 4 == 0 {
                        c.u16()
                    } else {
                        u16::from(c.u8()) % QUEUE_SIZE
                    };
                    d.set_desc(q, idx, addr, len, flags, next);
                }
                7 => {
                    let q = usize::from(c.u8()) % nq;
                    let head = if c.u8() % 8 == 0 {
                        c.u16()
                    } else {
                        u16::from(c.u8()) % QUEUE_SIZE
                    };
                    d.publish(q, head);
                }
                8 => {
                    let q = usize::from(c.u8()) % nq;
                    d.kick(q);
                }
                9 => {
                    let q = usize::from(c.u8()) % nq;
                    d.set_avail_idx(q, c.u16());
                }
                10 => {
                    // A request header: type, reserved, sector; or raw bytes at the data area.
                    let at = HDR + u64::from(c.u8()) * 16;
                    let _ = d.mem.write_obj(c.u32() % 32, GuestAddress(at));
                    let _ = d.mem.write_obj(c.u64(), GuestAddress(at + 8));
                }
                _ => {
                    if c.u8() % 16 == 0 {
                        d.init(None, QUEUE_SIZE);
                    } else {
                        // Kick every queue: whatever was published gets processed now.
                        for q in 0..nq {
                            d.kick(q);
                        }
                    }
                }
            }
        }
        self.check_healthy();
        Outcome::Accepted
    }

    /// Reset, then one valid request must complete.
    fn check_healthy(&mut self) {
        let d = &mut self.driver;
        d.init(None, QUEUE_SIZE);
        match self.kind {
            Kind::Block => {
                d.mem.write_obj(0u32, GuestAddress(HDR)).unwrap();
                d.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
                d.mem.write_obj(1u64, GuestAddress(HDR + 8)).unwrap();
                d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
                d.post(0, &[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)]);
                d.kick(0);
                let used = d.wait_used(0, 1, HEALTHY);
                let st: u8 = d.mem.read_obj(GuestAddress(STATUS)).unwrap();
                assert_eq!(
                    (st, used[0].1),
                    (0, 513),
                    "a valid read failed after the program"
                );
            }
            Kind::Rng => {
                d.post(0, &[(BUF, 32, true)]);
                d.kick(0);
                let used = d.wait_used(0, 1, HEALTHY);
                assert_eq!(
                    used[0].1, 32,
                    "a valid rng request failed after the program"
                );
            }
        }
    }
}
