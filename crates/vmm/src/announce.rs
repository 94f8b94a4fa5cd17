//! Telling the network where a restored or migrated guest is now. On the first resume,
//! every NIC sends RARP frames with the guest's MAC as source (QEMU's self-announce,
//! which works whatever the guest's driver does), so bridges and switches move the MAC
//! to the new port at once instead of when the guest next happens to send.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Rounds and the pause before each later one (QEMU's defaults: 5 rounds, 50 ms growing by 100 ms).
const ROUNDS: u32 = 5;
const FIRST_GAP: Duration = Duration::from_millis(50);
const GAP_STEP: Duration = Duration::from_millis(100);

/// The smallest Ethernet frame (without FCS): a RARP frame is padded to it.
pub const FRAME_LEN: usize = 60;
pub const ETHERTYPE_RARP: u16 = 0x8035;

/// A broadcast RARP "request reverse" frame from `mac`, as QEMU sends it.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // request reverse
    f[22..28].copy_from_slice(&mac); // sender MAC; sender IP 0.0.0.0
    f[32..38].copy_from_slice(&mac); // target MAC; target IP 0.0.0.0
    f
}

/// Whether this machine still owes the network an announcement (set for a restored
/// or migrated machine, taken by its first resume).
#[derive(Default)]
pub struct Pending(AtomicBool);

impl Pending {
    pub fn new(pending: bool) -> Self {
        Pending(AtomicBool::new(pending))
    }

    /// True once: the first caller after a restore gets to announce.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }
}

/// Sends the rounds on a thread of their own (the caller, e.g. the API, does not wait);
/// `announce` sends one round on every NIC.
pub fn start(announce: impl Fn() + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("announce".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let mut gap = FIRST_GAP;
            for round in 0..ROUNDS {
                if round > 0 {
                    std::thread::sleep(gap);
                    gap += GAP_STEP;
                }
                announce();
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the network announcement: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_is_a_broadcast_reverse_request_from_the_mac() {
        let mac = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
        let f = rarp_frame(mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
        assert!(f[28..32].iter().chain(&f[38..]).all(|b| *b == 0));
    }

    #[test]
    fn only_the_first_resume_announces() {
        let p = Pending::new(true);
        assert!(p.take());
        assert!(!p.take());
        assert!(!Pending::new(false).take());
    }
}
