//! ferrovirt-testkit: run real Linux guests in tests.
//!
//! - [`guest_kernel`]: Debian's cloud kernel (bzImage, ELF vmlinux, modules), fetched once.
//! - [`Initramfs`]: busybox initramfs builder (init script, files, binaries with libs, modules);
//!   [`linux_guest_initramfs`] is a preset that prints a marker and powers off.
//! - [`Nested`]: runs a shell command inside a real KVM host (Linux + kvm-amd under QEMU TCG),
//!   for ferrovmm tests on hosts whose own /dev/kvm cannot boot Linux ([`hardware_kvm`]).
//! - [`TcgVm`] / [`qemu_tcg_boot`]: boot a kernel in plain QEMU TCG and collect its console.
//!
//! Downloads and images are cached under `$FERROVIRT_GUEST_CACHE` (default `target/guest-cache`).
//!
//! Booting Linux under ferrovmm on a host whose /dev/kvm is PVM (see [`hardware_kvm`]):
//!
//! ```no_run
//! use ferrovirt_testkit::{guest_kernel, linux_guest_initramfs, scratch_dir, Nested};
//!
//! let kernel = guest_kernel()?;
//! let dir = scratch_dir("my-test")?;
//! let initrd = linux_guest_initramfs("GUEST-UP").build(dir.join("initrd.cpio.gz"))?;
//! let ferrovmm = ferrovirt_testkit::repo_root().join("target/release/ferrovmm");
//! let out = Nested::new()
//!     .binary(&ferrovmm, "/bin/ferrovmm")
//!     .file(&kernel.vmlinux, "/guest/vmlinux")
//!     .file(&initrd, "/guest/initrd")
//!     .run("ferrovmm --kernel /guest/vmlinux --initrd /guest/initrd --cmdline 'console=ttyS0' --memory 128")?;
//! assert_eq!(out.status, 0);
//! assert!(out.output.lines().any(|line| line == "GUEST-UP"));
//! # Ok::<(), ferrovirt_testkit::Error>(())
//! ```

mod cache;
pub mod cpio;
pub mod elf;
mod error;
mod host;
pub mod image;
mod initramfs;
mod kernel;
mod libs;
mod modules;
mod nested;
pub mod process;
mod qemu;
mod rootdisk;
pub mod run_clock;
mod seed;
mod test_guest;

pub use cache::{cache_dir, repo_root, scratch_dir};
pub use elf::{elf_notes, pvh_entry, ElfNote, XEN_ELFNOTE_PHYS32_ENTRY};
pub use error::{Error, Result};
pub use host::hardware_kvm;
pub use initramfs::{
    linux_guest_initramfs, linux_guest_script, shell_quote, Compression, Initramfs,
    LOAD_MODULES_COMMAND,
};
pub use kernel::{busybox, guest_kernel, GuestKernel};
pub use libs::shared_libraries;
pub use nested::{Nested, NestedOutput};
pub use process::{RunWithin, TOOL_TIMEOUT};
pub use qemu::{qemu_binary, qemu_tcg_boot, ConsoleRun, TcgVm};
pub use rootdisk::make_root_disk;
pub use seed::{count_from_env, seed_from_env};
pub use test_guest::qemu_test_guest;
