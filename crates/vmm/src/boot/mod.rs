//! Loading a kernel into guest memory and describing the machine to it.
//!
//! Three entry paths, all through linux-loader:
//! - ELF vmlinux with a PVH note: 32-bit protected mode, `hvm_start_info` in %ebx;
//! - bzImage: 64-bit Linux boot protocol, `boot_params` in %rsi;
//! - ELF vmlinux without the note: 64-bit entry with `boot_params`.

mod linux;
mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::{
    elf::PvhBootCapability, BzImage, Elf, KernelLoader, KernelLoaderResult,
};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::layout;
use crate::memory::GuestMemoryMmap;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 32-bit protected mode, paging off, %ebx = hvm_start_info.
    Pvh32,
    /// 64-bit long mode with identity paging, %rsi = boot_params.
    Linux64,
}

/// What the vCPU setup needs to know after loading.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    pub entry: GuestAddress,
    pub mode: EntryMode,
    /// Address of hvm_start_info (Pvh32) or boot_params (Linux64).
    pub params: GuestAddress,
}

/// Kernel image formats ferrovmm understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat> {
    let mut head = [0u8; 0x210];
    let n = read_up_to(file, &mut head)
        .map_err(|e| Error::usage(format!("--kernel {}: cannot read: {e}", path.display())))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(Error::usage(format!(
        "--kernel {}: not a kernel image (neither an ELF vmlinux nor a bzImage)",
        path.display()
    )))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The boot configuration the command line asks for.
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_bytes: u64,
    pub rsdp: GuestAddress,
}

/// Loads kernel, initrd and command line and writes the boot parameters.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<BootInfo> {
    let kernel_path = spec.kernel;
    let mut kernel = File::open(kernel_path).map_err(|e| {
        Error::usage(format!(
            "--kernel {}: cannot open: {e}",
            kernel_path.display()
        ))
    })?;
    let format = detect_format(&mut kernel, kernel_path)?;
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(|e| Error::usage(format!("--kernel {}: {e}", kernel_path.display())))?;
    let bad_kernel = |e: linux_loader::loader::Error| {
        Error::usage(format!(
            "--kernel {}: cannot load: {e}",
            kernel_path.display()
        ))
    };
    let loaded: KernelLoaderResult = match format {
        KernelFormat::Elf => Elf::load(
            mem,
            None,
            &mut kernel,
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .map_err(bad_kernel)?,
        KernelFormat::BzImage => BzImage::load(
            mem,
            None,
            &mut kernel,
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .map_err(bad_kernel)?,
    };

    let cmdline = write_cmdline(mem, spec.cmdline)?;
    let initrd = match spec.initrd {
        Some(path) => Some(load_initrd(mem, path, loaded.kernel_end, spec.mem_bytes)?),
        None => None,
    };

    match (format, loaded.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            let params = pvh::write_start_info(mem, spec, cmdline, initrd)?;
            Ok(BootInfo {
                entry,
                mode: EntryMode::Pvh32,
                params,
            })
        }
        (KernelFormat::Elf, _) => {
            let params = linux::write_boot_params(mem, spec, None, cmdline, initrd)?;
            Ok(BootInfo {
                entry: loaded.kernel_load,
                mode: EntryMode::Linux64,
                params,
            })
        }
        (KernelFormat::BzImage, _) => {
            let params = linux::write_boot_params(mem, spec, loaded.setup_header, cmdline, initrd)?;
            // The 64-bit entry of a bzImage is 0x200 past the start of its protected-mode code.
            let entry = loaded.kernel_load.unchecked_add(0x200);
            Ok(BootInfo {
                entry,
                mode: EntryMode::Linux64,
                params,
            })
        }
    }
}

/// A loaded command line: address and length without the NUL.
#[derive(Debug, Clone, Copy)]
pub struct CmdlineInfo {
    pub addr: GuestAddress,
    pub len: usize,
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<CmdlineInfo> {
    let mut cl = linux_loader::cmdline::Cmdline::new(layout::CMDLINE_MAX_SIZE)
        .map_err(|e| Error::usage(format!("--cmdline: {e}")))?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline)
            .map_err(|e| Error::usage(format!("--cmdline {cmdline:?}: {e}")))?;
    }
    let addr = GuestAddress(layout::CMDLINE_START);
    linux_loader::loader::load_cmdline(mem, addr, &cl)
        .map_err(|e| Error::host(format!("cannot write the command line: {e}")))?;
    Ok(CmdlineInfo {
        addr,
        len: cmdline.len(),
    })
}

/// A loaded initrd: address and size.
#[derive(Debug, Clone, Copy)]
pub struct InitrdInfo {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Puts the initrd at the top of low RAM (below 896 MiB, where every Linux can
/// reach it), page aligned, above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    mem_bytes: u64,
) -> Result<InitrdInfo> {
    let mut file = File::open(path)
        .map_err(|e| Error::usage(format!("--initrd {}: cannot open: {e}", path.display())))?;
    let size = file
        .metadata()
        .map_err(|e| Error::usage(format!("--initrd {}: {e}", path.display())))?
        .len();
    let low_top = mem_bytes.min(layout::MMIO_HOLE_START).min(0x3800_0000);
    let too_big = || {
        Error::usage(format!(
            "--initrd {} ({} MiB) does not fit in guest memory next to the kernel; give the VM more --memory",
            path.display(),
            size >> 20
        ))
    };
    let addr = low_top.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end.max(layout::HIMEM_START) {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| Error::usage(format!("--initrd {}: cannot read: {e}", path.display())))?;
    Ok(InitrdInfo {
        addr: GuestAddress(addr),
        size,
    })
}
