//! COM1: vm-superio's 16550A with its interrupt on an irqfd and a pluggable output.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Raises an interrupt by writing an eventfd that KVM injects as a GSI (irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Connected console clients of a `--serial socket=` port.
pub type SocketClients = Arc<Mutex<Vec<UnixStream>>>;

/// Where the guest's serial output goes.
pub enum SerialOutput {
    Stdout,
    File(File),
    Socket(SocketClients),
    Sink,
}

impl SerialOutput {
    /// Output appended to `path`, created if missing (`--serial file=` and `--console file=`).
    pub fn append_to(path: &std::path::Path) -> io::Result<SerialOutput> {
        File::options()
            .create(true)
            .append(true)
            .open(path)
            .map(SerialOutput::File)
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOutput::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                out.flush()?;
            }
            SerialOutput::File(f) => f.write_all(buf)?,
            SerialOutput::Socket(clients) => {
                let mut clients = clients.lock().unwrap_or_else(|p| p.into_inner());
                // A client that is gone is dropped; one that is slow loses these bytes
                // rather than stalling the vCPU.
                clients.retain_mut(|c| match c.write(buf) {
                    Ok(_) => true,
                    Err(e) => e.kind() == io::ErrorKind::WouldBlock,
                });
            }
            SerialOutput::Sink => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Tells the event loop when the guest has drained the receive FIFO, so pending
/// console input can be pushed in.
pub struct InputSpace(pub Arc<EventFd>);

impl SerialEvents for InputSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

pub type SerialDevice = Serial<IrqTrigger, InputSpace, SerialOutput>;

/// The serial port on the bus.
pub struct SerialPort(pub SerialDevice);

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.0.write(off, value) {
                log::debug!("serial write at offset {off}: {e:?}");
            }
        }
    }
}

impl SerialPort {
    /// Queues console input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.0.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.0.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }
}

/// The UART's registers and receive FIFO (vm-superio's `SerialState`, as data).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl crate::persist::Persist for SerialPort {
    type State = SerialSnapshot;

    fn save(&self) -> SerialSnapshot {
        let s = self.0.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore(&mut self, s: SerialSnapshot) -> Result<(), String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        };
        if state.in_buffer.len() > 64 {
            return Err(format!(
                "serial: {} bytes in a 64-byte receive FIFO",
                state.in_buffer.len()
            ));
        }
        let trigger = IrqTrigger(
            self.0
                .interrupt_evt()
                .0
                .try_clone()
                .map_err(|e| format!("serial: eventfd: {e}"))?,
        );
        let events = InputSpace(self.0.events().0.clone());
        // The output (file, socket clients) stays the one this process opened.
        let placeholder = Serial::with_events(
            IrqTrigger(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?),
            InputSpace(events.0.clone()),
            SerialOutput::Sink,
        );
        let out = std::mem::replace(&mut self.0, placeholder).into_writer();
        self.0 = match Serial::from_state(&state, trigger, events, out) {
            Ok(serial) => serial,
            Err(e) => return Err(format!("serial: cannot load the state: {e:?}")),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::testing::assert_round_trip;

    fn port() -> SerialPort {
        SerialPort(Serial::with_events(
            IrqTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            InputSpace(Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            SerialOutput::Sink,
        ))
    }

    #[test]
    fn state_round_trips() {
        let mut a = port();
        // Divisor latch, line control, scratch, interrupt enable and queued input.
        a.write(3, &[0x80]);
        a.write(0, &[0x0c]);
        a.write(3, &[0x03]);
        a.write(7, &[0x5a]);
        a.write(1, &[0x01]);
        a.enqueue_input(b"hi");
        let mut b = port();
        assert_round_trip(&a, &mut b);
        let mut byte = [0u8];
        b.read(7, &mut byte);
        assert_eq!(byte[0], 0x5a);
        b.read(0, &mut byte);
        assert_eq!(byte[0], b'h');
    }
}
