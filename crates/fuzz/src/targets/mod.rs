//! One module per parser family; each target is a `fn(&[u8]) -> Outcome` (or a struct holding
//! what the target drives, for the stateful ones) with a [`crate::Target`] description.

pub mod definitions;
pub mod http;
pub mod launch;
pub mod nbd;
pub mod qcow2;
pub mod snapshot;
pub mod virtio;
