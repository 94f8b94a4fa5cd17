//! Device state as data: every device can describe its guest-visible state as a
//! serde value and load such a value into a freshly built device of the same kind.
//!
//! Snapshot, restore and migration all go through this one trait: the machine is
//! built from its saved configuration exactly as at boot, then each device loads
//! its state (Firecracker's `Persist`, Cloud Hypervisor's `Snapshottable`).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Save and load the guest-visible state of one device.
///
/// `restore` is called on a device built from the same configuration; it checks
/// what it can (sizes, identities) and refuses a state that does not fit rather
/// than loading part of it.
pub trait Persist {
    type State: Serialize + DeserializeOwned;
    fn save(&self) -> Self::State;
    fn restore(&mut self, state: Self::State) -> Result<(), String>;
}

#[cfg(test)]
pub mod testing {
    use super::Persist;

    /// Save, load into `fresh`, save again: both saves must be the same document.
    pub fn assert_round_trip<P: Persist>(original: &P, fresh: &mut P) {
        let first = serde_json::to_value(original.save()).expect("state serializes");
        let state: P::State = serde_json::from_value(first.clone()).expect("state deserializes");
        fresh
            .restore(state)
            .expect("state loads into a fresh device");
        let second = serde_json::to_value(fresh.save()).expect("state serializes");
        assert_eq!(first, second, "state changed across save/load");
    }
}
