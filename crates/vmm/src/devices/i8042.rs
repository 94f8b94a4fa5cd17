//! The i8042 keyboard controller, present so guests can reset the machine through it.

use vm_superio::{I8042Device, Trigger};

use super::bus::BusDevice;
use crate::lifecycle::{Lifecycle, StopReason};
use std::sync::Arc;

/// Turns the controller's reset line into a VM stop.
pub struct ResetLine(pub Arc<Lifecycle>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_stop(StopReason::Reset);
        Ok(())
    }
}

/// Mapped at ports 0x60..0x65 (data at 0x60, command/status at 0x64).
pub struct I8042(pub I8042Device<ResetLine>);

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = match offset {
                0 | 4 => self.0.read(offset as u8),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), 0 | 4) = (data.first(), offset) {
            let _ = self.0.write(offset as u8, value);
        }
    }
}

/// The controller keeps no guest-visible state beyond its reset line (vm-superio
/// answers status and command reads from constants), so its state is empty; it
/// still takes part so that every device on the bus is in the snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {}

impl crate::persist::Persist for I8042 {
    type State = I8042State;
    fn save(&self) -> I8042State {
        I8042State {}
    }
    fn restore(&mut self, _state: I8042State) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::testing::assert_round_trip;

    #[test]
    fn state_round_trips() {
        let lc = Arc::new(Lifecycle::new().unwrap());
        let a = I8042(I8042Device::new(ResetLine(lc.clone())));
        let mut b = I8042(I8042Device::new(ResetLine(lc)));
        assert_round_trip(&a, &mut b);
    }
}
