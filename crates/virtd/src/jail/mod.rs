//! A jail per ferrovmm process (Firecracker's jailer, done by the daemon): its own mount and IPC
//! namespaces, a root (a tmpfs private to that namespace, so nothing is left on the host) that
//! holds only the VM's kernel, initrd, disks and their backing files, its run folder and
//! /dev/kvm, each at the same absolute path as outside, and a uid/gid of its own. ferrovmm
//! enters it (`--jail`: chroot, drop to the uid, no capabilities) before it reads anything.
//!
//! Ownership: the run folder stays root's, group the VM's gid, mode 01770 (sticky: the VM creates
//! its sockets and exit record there but cannot replace the daemon's log or pid file); writable
//! disk images are given to the VM's uid while it runs and handed back when it ends
//! (libvirt's DAC labels); read-only images and backing files must be readable by others.
//! No /proc in the jail: other processes, the daemon's state and the host's files are not there.
//! Its own network namespace too (empty): its TAPs are handed over as open descriptors.

mod mounts;
mod taps;

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferrovirt_api::ApiError;
use std::os::fd::AsRawFd;

use ferrovmm_api::launch::NetBackend;
use ferrovmm_api::{JailConfig, LaunchConfig};

pub use mounts::Mounts;

/// Per-VM uids and gids are taken from this range (no /etc/passwd entries; like Firecracker's
/// jailer, the number is the identity).
pub const ID_BASE: u32 = 0x3000_0000;
pub const ID_SPAN: u32 = 0x1000_0000;

/// The jail is on when the daemon runs as root, unless FERROVIRT_JAIL=off.
pub fn enabled() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::env::var("FERROVIRT_JAIL").ok().as_deref() != Some("off")
}

/// The uid (and gid) of the VM whose run folder is `vm_dir`: one per VM and daemon, stable
/// across restarts (FNV-1a of the folder's path).
pub fn vm_id(vm_dir: &Path) -> u32 {
    use std::os::unix::ffi::OsStrExt;
    let mut h: u32 = 0x811c_9dc5;
    for &b in vm_dir.as_os_str().as_bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    ID_BASE + h % ID_SPAN
}

/// Where the root of the VM's jail is mounted (an empty folder on the host).
pub fn root_of(vm_dir: &Path) -> PathBuf {
    let name = vm_dir.file_name().unwrap_or_default();
    vm_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(vm_dir)
        .join("jails")
        .join(name)
}

/// An image lent to a VM: its path and the owner (uid, gid) it goes back to.
type Lent = (PathBuf, u32, u32);

/// A jailed VM: its uid and the images lent to it, handed back at the end.
type Jailed = (u32, Vec<Lent>);

/// The jailed VMs by run folder.
static LENT: Mutex<Option<HashMap<PathBuf, Jailed>>> = Mutex::new(None);

/// The uid of the jailed VM whose run folder is `vm_dir` (None: not jailed by this daemon).
pub fn uid_of(vm_dir: &Path) -> Option<u32> {
    LENT.lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|m| m.get(vm_dir))
        .map(|(uid, _)| *uid)
}

fn err(what: &str, path: &Path, e: std::io::Error) -> ApiError {
    ApiError::internal(format!("jail: {what} {}: {e}", path.display()))
}

/// Every file of a disk's chain: the image and the backing files its headers name.
fn chain(path: &Path) -> Vec<PathBuf> {
    let mut files = vec![path.to_path_buf()];
    if let Ok(infos) = ferrovirt_disk::info(path, true) {
        files.extend(
            infos
                .iter()
                .filter_map(|i| i.full_backing_filename.as_ref())
                .map(PathBuf::from),
        );
    }
    files.dedup();
    files
}

/// Prepares the jail of the VM `launch` describes: the folders, the images' owners, and the
/// mounts its process makes before it runs ferrovmm. Sets `launch.jail`.
pub fn prepare(launch: &mut LaunchConfig, vm_dir: &Path) -> Result<Mounts, ApiError> {
    let id = vm_id(vm_dir);
    let root = root_of(vm_dir);
    std::fs::create_dir_all(&root).map_err(|e| err("cannot create", &root, e))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| err("cannot set the mode of", &root, e))?;
    // The run folder: root's, the VM's group may create in it, the sticky bit keeps the
    // daemon's own files there out of the VM's reach.
    std::os::unix::fs::chown(vm_dir, Some(0), Some(id))
        .map_err(|e| err("cannot give", vm_dir, e))?;
    std::fs::set_permissions(vm_dir, std::fs::Permissions::from_mode(0o1770))
        .map_err(|e| err("cannot set the mode of", vm_dir, e))?;

    let mut mounts = Mounts::new(&root, id);
    mounts.bind(vm_dir, false, true);
    mounts.bind(&launch.kernel, true, false);
    if let Some(initrd) = &launch.initrd {
        mounts.bind(initrd, true, false);
    }
    // An image another VM holds is not lent: the trial open meets its lock and says so.
    for disk in &launch.disks {
        let opts = ferrovirt_disk::OpenOptions {
            format: disk.format,
            read_only: disk.readonly,
            direct: false,
        };
        ferrovirt_disk::open(&disk.path, &opts)
            .map_err(|e| ApiError::driver(format!("disk {}: {e}", disk.path.display())))?;
    }
    let mut lent = Vec::new();
    for disk in &launch.disks {
        let files = chain(&disk.path);
        for (i, file) in files.iter().enumerate() {
            let writable = i == 0 && !disk.readonly;
            mounts.bind(file, !writable, false);
            if writable {
                let meta = std::fs::metadata(file).map_err(|e| err("cannot read", file, e))?;
                std::os::unix::fs::chown(file, Some(id), Some(id))
                    .map_err(|e| err("cannot give", file, e))?;
                lent.push((file.clone(), meta.uid(), meta.gid()));
            }
        }
    }
    mounts.device("/dev/kvm", libc::makedev(10, 232));
    for net in &mut launch.nets {
        if let NetBackend::Tap(name) = &net.backend {
            let fd = taps::open(name).map_err(ApiError::driver)?;
            net.backend = NetBackend::Fd(fd.as_raw_fd());
            mounts.pass(fd);
        }
    }
    LENT.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .entry(vm_dir.to_path_buf())
        .or_insert((id, Vec::new()))
        .1
        .extend(lent);
    launch.jail = Some(JailConfig {
        root,
        uid: id,
        gid: id,
    });
    Ok(mounts)
}

/// Hands the images lent to the VM in `vm_dir` back to their owners (the VM has ended).
pub fn release(vm_dir: &Path) {
    let lent = LENT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()
        .and_then(|m| m.remove(vm_dir))
        .map(|(_, lent)| lent)
        .unwrap_or_default();
    for (file, uid, gid) in lent {
        if let Err(e) = std::os::unix::fs::chown(&file, Some(uid), Some(gid)) {
            eprintln!(
                "ferrovirtd: cannot give {} back to {uid}:{gid}: {e}",
                file.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vm_gets_its_own_id_in_the_range_and_a_root_beside_its_run_folder() {
        let a = vm_id(Path::new("/run/fv/vms/web"));
        let b = vm_id(Path::new("/run/fv/vms/db"));
        assert_ne!(a, b);
        for id in [a, b] {
            assert!((ID_BASE..ID_BASE + ID_SPAN).contains(&id));
        }
        assert_eq!(a, vm_id(Path::new("/run/fv/vms/web")));
        assert_eq!(
            root_of(Path::new("/run/fv/vms/web")),
            Path::new("/run/fv/jails/web")
        );
    }
}
