//! ferrovirtd: the ferrovirt management daemon (our libvirtd).

pub mod console;
pub mod deadline;
pub mod driver;
pub mod events;
pub mod files;
pub mod http;
pub mod jail;
pub mod manager;
pub mod memory;
pub mod network;
pub mod runtime;
pub mod save;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod volume;
