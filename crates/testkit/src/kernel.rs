//! The guest kernel (Debian's cloud kernel) and busybox, fetched once into the cache.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::cache::run_guest_script;
use crate::error::{Error, Result};

/// Debian's cloud kernel, unpacked from its .deb (never installed on the host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestKernel {
    /// The bzImage (`/boot/vmlinuz-<version>`).
    pub bzimage: PathBuf,
    /// The ELF vmlinux unpacked from the bzImage; it carries a PVH entry note.
    pub vmlinux: PathBuf,
    /// `/lib/modules/<version>` with a generated `modules.dep`.
    pub modules_dir: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
}

/// Fetches and unpacks the kernel on first use (guest/fetch-kernel.sh; the script
/// holds a lock, so parallel test processes download it once), then reuses the cache.
pub fn guest_kernel() -> Result<GuestKernel> {
    static KERNEL: OnceLock<Result<GuestKernel>> = OnceLock::new();
    KERNEL.get_or_init(fetch_kernel).clone()
}

fn fetch_kernel() -> Result<GuestKernel> {
    let stdout = run_guest_script("fetch-kernel.sh", &[])?;
    let field = |key: &str| -> Result<String> {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::new(format!(
                    "guest/fetch-kernel.sh printed no {key}= line:\n{stdout}"
                ))
            })
    };
    let kernel = GuestKernel {
        bzimage: field("bzimage")?.into(),
        vmlinux: field("vmlinux")?.into(),
        modules_dir: field("modules_dir")?.into(),
        version: field("version")?,
    };
    for path in [
        &kernel.bzimage,
        &kernel.vmlinux,
        &kernel.modules_dir.join("modules.dep"),
    ] {
        if !path.exists() {
            return Err(Error::new(format!(
                "{} is missing from the guest cache; delete the cache entry and run guest/fetch-kernel.sh",
                path.display()
            )));
        }
    }
    Ok(kernel)
}

/// A statically linked busybox (Debian busybox-static), see guest/fetch-busybox.sh.
pub fn busybox() -> Result<PathBuf> {
    static BUSYBOX: OnceLock<Result<PathBuf>> = OnceLock::new();
    BUSYBOX
        .get_or_init(|| {
            let path = PathBuf::from(run_guest_script("fetch-busybox.sh", &[])?.trim());
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::new(format!(
                    "guest/fetch-busybox.sh named {}, which does not exist",
                    path.display()
                )))
            }
        })
        .clone()
}

/// The applet paths busybox provides (`bin/sh`, `sbin/insmod`, ...), relative to `/`.
pub fn busybox_applets() -> Result<Vec<String>> {
    static APPLETS: OnceLock<Result<Vec<String>>> = OnceLock::new();
    APPLETS
        .get_or_init(|| {
            let busybox = busybox()?;
            let output = std::process::Command::new(&busybox)
                .arg("--list-full")
                .output()
                .map_err(|e| Error::new(format!("cannot run {}: {e}", busybox.display())))?;
            if !output.status.success() {
                return Err(Error::new(format!(
                    "{} --list-full failed",
                    busybox.display()
                )));
            }
            Ok(String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && *line != "bin/busybox")
                .map(str::to_owned)
                .collect())
        })
        .clone()
}
