//! Tiny payload for nested-harness tests: opens /dev/kvm, prints KVM_GET_API_VERSION.
//! Dynamically linked on purpose, so tests exercise the packing of libraries.

use std::os::fd::AsRawFd;

/// `_IO(KVMIO, 0x00)`
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

fn main() {
    let kvm = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(file) => file,
        Err(e) => {
            eprintln!("kvm-api-version: cannot open /dev/kvm: {e}");
            std::process::exit(1);
        }
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version < 0 {
        eprintln!(
            "kvm-api-version: KVM_GET_API_VERSION failed: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    println!("{version}");
}
