//! virtio-rng: fills the guest's buffers from the host's getrandom().

use virtio_queue::DescriptorChain;
use vm_memory::Bytes;

use super::event_loop::Registrations;
use super::{queue, ActivateContext, GuestMem, VirtioDevice, VIRTIO_F_VERSION_1};

/// Largest request served at once, so a guest cannot make us allocate much.
const MAX_CHUNK: usize = 64 * 1024;

#[derive(Default)]
pub struct Rng {
    registrations: Registrations,
}

fn fill(chain: DescriptorChain<GuestMem>, mem: &GuestMem) -> u32 {
    let mut written = 0u32;
    let mut buf = vec![0u8; 0];
    for desc in chain {
        if !desc.is_write_only() {
            continue;
        }
        let len = (desc.len() as usize).min(MAX_CHUNK);
        buf.resize(len, 0);
        if getrandom(&mut buf).is_err() {
            break;
        }
        if mem.write_slice(&buf, desc.addr()).is_err() {
            break;
        }
        written = written.saturating_add(len as u32);
    }
    written
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most len bytes into the buffer we own.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_RNG
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), String> {
        for dq in ctx.queues {
            let (mem, interrupt, q, index) =
                (ctx.mem.clone(), ctx.interrupt.clone(), dq.queue, dq.index);
            self.registrations
                .on_kick(&ctx.event_loop, dq.kick, move || {
                    for chain in queue::pop_all(&q, &mem, &interrupt) {
                        let head = chain.head_index();
                        let len = fill(chain, &mem);
                        queue::complete(&q, &mem, &interrupt, index, head, len);
                    }
                })?;
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

/// The entropy source keeps no state: every request is served from getrandom().
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RngState {}

impl crate::persist::Persist for Rng {
    type State = RngState;
    fn save(&self) -> RngState {
        RngState {}
    }
    fn restore(&mut self, _: RngState) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn state_round_trips() {
        crate::persist::testing::assert_round_trip(
            &super::Rng::default(),
            &mut super::Rng::default(),
        );
    }
}
