//! Save and restore (virsh `save`, `restore`, `managedsave`): the file format ([`format`]) and
//! the sparse copy of guest memory ([`sparse`]). The operations are the manager's
//! (`manager/save.rs`); each driver writes and reads its own payload (`Driver::save`,
//! `Driver::restore`).

pub mod format;
pub mod sparse;
