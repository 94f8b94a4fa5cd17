//! ferrovirt-disk: raw and qcow2 disk images with backing chains.

pub mod img_cli;
