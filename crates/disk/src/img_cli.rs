//! `ferrovirt img <verb>`: qemu-img's verbs over this library.

use std::ffi::OsString;

/// Runs `ferrovirt img` with the arguments that follow `img`; returns the process exit code.
pub fn run(_args: Vec<OsString>) -> i32 {
    eprintln!("ferrovirt img: not implemented yet");
    1
}
