//! virtio-console with one port (hvc0): transmit to the console output,
//! receive from stdin when the console is on stdio.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::Bytes;

use super::event_loop::Registrations;
use super::{queue, ActivateContext, GuestMem, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::serial::SerialOutput;

const QUEUE_SIZE: u16 = 128;
const RX: u16 = 0;
const TX: u16 = 1;
/// Output longer than this per chain is cut (a guest cannot make us buffer more).
const MAX_CHAIN_BYTES: usize = 64 * 1024;

pub struct Console {
    output: Arc<Mutex<SerialOutput>>,
    stdin: bool,
    registrations: Registrations,
}

impl Console {
    pub fn new(output: SerialOutput, stdin: bool) -> Self {
        Console {
            output: Arc::new(Mutex::new(output)),
            stdin,
            registrations: Registrations::default(),
        }
    }
}

struct Input {
    queue: Arc<Mutex<Queue>>,
    mem: GuestMem,
    interrupt: Arc<dyn VirtioInterrupt>,
    pending: VecDeque<u8>,
}

impl Input {
    fn deliver(&mut self) {
        while !self.pending.is_empty() {
            let chain = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                virtio_queue::QueueT::pop_descriptor_chain(&mut *q, self.mem.clone())
            };
            let Some(chain) = chain else { return };
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain.writable() {
                let n = (desc.len() as usize).min(self.pending.len());
                let bytes: Vec<u8> = self.pending.iter().take(n).copied().collect();
                if self.mem.write_slice(&bytes, desc.addr()).is_err() {
                    break;
                }
                self.pending.drain(..n);
                written += n as u32;
                if self.pending.is_empty() {
                    break;
                }
            }
            queue::complete(&self.queue, &self.mem, &self.interrupt, RX, head, written);
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: only meaningful with feature bits we do not offer.
        super::read_config_bytes(&[0u8; 12], offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), String> {
        let el = &ctx.event_loop;
        let mut rx = None;
        for dq in ctx.queues {
            if dq.index == TX {
                let (queue, mem, interrupt, out) = (
                    dq.queue,
                    ctx.mem.clone(),
                    ctx.interrupt.clone(),
                    self.output.clone(),
                );
                self.registrations.on_kick(el, dq.kick, move || {
                    for chain in queue::pop_all(&queue, &mem, &interrupt) {
                        let head = chain.head_index();
                        let mut bytes = Vec::new();
                        for desc in chain.readable() {
                            let len = (desc.len() as usize).min(MAX_CHAIN_BYTES - bytes.len());
                            let start = bytes.len();
                            bytes.resize(start + len, 0);
                            if mem.read_slice(&mut bytes[start..], desc.addr()).is_err() {
                                bytes.truncate(start);
                                break;
                            }
                        }
                        let _ = out
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .write_all(&bytes);
                        queue::complete(&queue, &mem, &interrupt, TX, head, 0);
                    }
                })?;
            } else if dq.index == RX {
                let input = Arc::new(Mutex::new(Input {
                    queue: dq.queue,
                    mem: ctx.mem.clone(),
                    interrupt: ctx.interrupt.clone(),
                    pending: VecDeque::new(),
                }));
                let i = input.clone();
                self.registrations.on_kick(el, dq.kick, move || {
                    i.lock().unwrap_or_else(|p| p.into_inner()).deliver()
                })?;
                rx = Some(input);
            }
        }
        if let (true, Some(input)) = (self.stdin, rx) {
            let handler = Box::new(move |_| {
                let mut buf = [0u8; 1024];
                // SAFETY: read from stdin into a buffer we own.
                let n =
                    unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    let mut inp = input.lock().unwrap_or_else(|p| p.into_inner());
                    if inp.pending.len() < 64 * 1024 {
                        inp.pending.extend(&buf[..n as usize]);
                    }
                    inp.deliver();
                }
            });
            // stdin may be a file or /dev/null that epoll refuses; then there is simply no input.
            let _ = self
                .registrations
                .on_readable(el, libc::STDIN_FILENO, handler);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.registrations.clear();
    }

    fn save_state(&self) -> serde_json::Value {
        super::save_persist(self)
    }
    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), String> {
        super::restore_persist(self, state)
    }
}

/// One port with no multiport feature: nothing beyond the queues. Input typed
/// but not yet delivered stays with the process that read it.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ConsoleState {}

impl crate::persist::Persist for Console {
    type State = ConsoleState;
    fn save(&self) -> ConsoleState {
        ConsoleState {}
    }
    fn restore(&mut self, _: ConsoleState) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let a = Console::new(SerialOutput::Sink, false);
        let mut b = Console::new(SerialOutput::Sink, false);
        crate::persist::testing::assert_round_trip(&a, &mut b);
    }
}
