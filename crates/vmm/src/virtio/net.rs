//! virtio-net on a TAP device, the datapath in ferrovmm (no vhost-net here):
//! frames keep their virtio-net header end to end, so checksum and TSO
//! offloads negotiated with the guest are handed to the host kernel.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::*;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;

use super::event_loop::{Registrations, Token};
use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use super::{
    queue, ActivateContext, EventLoop, GuestMem, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// A virtio-net header plus the largest TSO frame.
const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;

pub struct Net {
    tap: Arc<Tap>,
    mac: [u8; 6],
    registrations: Registrations,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            tap: Arc::new(tap),
            mac,
            registrations: Registrations::default(),
        }
    }
}

/// Receive state shared by the TAP and rx-queue handlers.
struct Rx {
    tap: Arc<Tap>,
    queue: Arc<Mutex<Queue>>,
    mem: GuestMem,
    interrupt: Arc<dyn VirtioInterrupt>,
    frame: Vec<u8>,
    /// Bytes of a frame read from the TAP that found no guest buffer yet.
    pending: usize,
    tap_watched: bool,
    event_loop: Arc<EventLoop>,
    tap_token: Option<Token>,
}

/// Copies `data` into the chain's writable buffers; returns bytes written, or None if it did not fit.
fn write_chain(chain: DescriptorChain<GuestMem>, mem: &GuestMem, data: &[u8]) -> Option<u32> {
    let mut off = 0usize;
    for desc in chain {
        if off == data.len() {
            break;
        }
        if !desc.is_write_only() {
            return None;
        }
        let n = (desc.len() as usize).min(data.len() - off);
        mem.write_slice(&data[off..off + n], desc.addr()).ok()?;
        off += n;
    }
    (off == data.len()).then_some(off as u32)
}

impl Rx {
    /// Moves frames from the TAP into guest buffers until one side runs out.
    fn process(&mut self) {
        loop {
            if self.pending == 0 {
                match self.tap.read(&mut self.frame) {
                    Ok(0) => return,
                    // A frame shorter than its virtio-net header is not one: drop it.
                    Ok(n) if n < VNET_HDR_LEN => continue,
                    Ok(n) => self.pending = n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        return self.watch_tap(true)
                    }
                    Err(e) => {
                        log::warn!("TAP {}: read failed: {e}", self.tap.name);
                        return;
                    }
                }
            }
            let chain = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                virtio_queue::QueueT::pop_descriptor_chain(&mut *q, self.mem.clone())
            };
            let Some(chain) = chain else {
                // No guest buffers: stop reading the TAP until the guest posts some.
                return self.watch_tap(false);
            };
            let head = chain.head_index();
            let frame = &mut self.frame[..self.pending];
            // num_buffers = 1: every frame fits in one chain (no mergeable buffers).
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            let len = write_chain(chain, &self.mem, frame).unwrap_or_else(|| {
                log::debug!("virtio-net: guest rx buffer too small or invalid; frame dropped");
                0
            });
            self.pending = 0;
            queue::complete(
                &self.queue,
                &self.mem,
                &self.interrupt,
                RX as u16,
                head,
                len,
            );
        }
    }

    fn watch_tap(&mut self, on: bool) {
        if self.tap_watched != on {
            if let Some(t) = self.tap_token {
                self.event_loop
                    .modify(t, if on { EventSet::IN } else { EventSet::empty() });
            }
            self.tap_watched = on;
        }
    }
}

fn transmit(
    tap: &Tap,
    queue: &Mutex<Queue>,
    mem: &GuestMem,
    interrupt: &Arc<dyn VirtioInterrupt>,
    buf: &mut Vec<u8>,
) {
    for chain in queue::pop_all(queue, mem, interrupt) {
        let head = chain.head_index();
        buf.clear();
        let mut ok = true;
        for desc in chain {
            let len = desc.len() as usize;
            if desc.is_write_only() || buf.len() + len > MAX_FRAME {
                ok = false;
                break;
            }
            let start = buf.len();
            buf.resize(start + len, 0);
            if mem.read_slice(&mut buf[start..], desc.addr()).is_err() {
                ok = false;
                break;
            }
        }
        if ok && buf.len() > VNET_HDR_LEN {
            if let Err(e) = tap.write(buf) {
                log::debug!("TAP {}: write failed: {e}", tap.name);
            }
        } else {
            log::debug!("virtio-net: malformed tx chain dropped");
        }
        queue::complete(queue, mem, interrupt, TX as u16, head, 0);
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.mac, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), String> {
        let f = ctx.features;
        let mut offload = 0;
        if f & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0 {
            offload |= TUN_F_CSUM;
            if f & (1 << VIRTIO_NET_F_GUEST_TSO4) != 0 {
                offload |= TUN_F_TSO4;
            }
            if f & (1 << VIRTIO_NET_F_GUEST_TSO6) != 0 {
                offload |= TUN_F_TSO6;
            }
        }
        self.tap.set_offload(offload)?;
        let mut queues = ctx.queues;
        queues.sort_by_key(|q| q.index);
        let mut it = queues.into_iter();
        let (Some(rxq), Some(txq)) = (it.next(), it.next()) else {
            return Err("the driver must enable both the receive and transmit queues".into());
        };
        if rxq.index != RX as u16 || txq.index != TX as u16 {
            return Err("unexpected queue layout".into());
        }
        let el = ctx.event_loop.clone();
        let rx = Arc::new(Mutex::new(Rx {
            tap: self.tap.clone(),
            queue: rxq.queue.clone(),
            mem: ctx.mem.clone(),
            interrupt: ctx.interrupt.clone(),
            frame: vec![0u8; MAX_FRAME],
            pending: 0,
            tap_watched: true,
            event_loop: el.clone(),
            tap_token: None,
        }));
        let rx_tap = rx.clone();
        let tap_token = self.registrations.on_readable(
            &el,
            self.tap.raw_fd(),
            Box::new(move |_| rx_tap.lock().unwrap_or_else(|p| p.into_inner()).process()),
        )?;
        rx.lock().unwrap_or_else(|p| p.into_inner()).tap_token = Some(tap_token);
        let rx_kick = rx.clone();
        self.registrations.on_kick(&el, rxq.kick, move || {
            rx_kick.lock().unwrap_or_else(|p| p.into_inner()).process()
        })?;

        let (tap, queue, mem, interrupt) = (
            self.tap.clone(),
            txq.queue,
            ctx.mem.clone(),
            ctx.interrupt.clone(),
        );
        let mut buf = Vec::with_capacity(MAX_FRAME);
        self.registrations.on_kick(&el, txq.kick, move || {
            transmit(&tap, &queue, &mem, &interrupt, &mut buf)
        })?;
        Ok(())
    }

    fn reset(&mut self) {
        self.registrations.clear();
    }

    fn announce(&self) {
        // The TAP takes frames with a virtio-net header; all zero means no offload.
        let mut frame = [0u8; VNET_HDR_LEN + crate::announce::FRAME_LEN];
        frame[VNET_HDR_LEN..].copy_from_slice(&crate::announce::rarp_frame(self.mac));
        if let Err(e) = self.tap.write(&frame) {
            log::debug!("TAP {}: announcement not sent: {e}", self.tap.name);
        }
    }

    fn save_state(&self) -> serde_json::Value {
        super::save_persist(self)
    }
    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), String> {
        super::restore_persist(self, state)
    }
}

/// The guest's MAC address: it keeps its identity on whatever TAP the restored VM gets.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
}

impl crate::persist::Persist for Net {
    type State = NetState;
    fn save(&self) -> NetState {
        NetState { mac: self.mac }
    }
    fn restore(&mut self, s: NetState) -> Result<(), String> {
        if s.mac[0] & 1 != 0 {
            return Err("virtio-net: the saved MAC address is a multicast address".into());
        }
        self.mac = s.mac;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let Ok(tap) = Tap::open("fvsnapa0") else {
            return; // needs CAP_NET_ADMIN; the integration tests cover TAPs
        };
        let a = Net::new(tap, [0x52, 0x54, 0, 1, 2, 3]);
        let mut b = Net::new(Tap::open("fvsnapb0").unwrap(), [0x52, 0x54, 0, 9, 9, 9]);
        crate::persist::testing::assert_round_trip(&a, &mut b);
        assert_eq!(b.mac, [0x52, 0x54, 0, 1, 2, 3]);
    }
}
