//! Kernel image containers for test guests (ELF with or without a PVH note, bzImage): the
//! testkit's, shared with the daemon's kvm-driver tests.
// Each test binary uses a different part of it.
#![allow(unused_imports)]

pub use ferrovirt_testkit::image::{bzimage, elf, write, Segment};
