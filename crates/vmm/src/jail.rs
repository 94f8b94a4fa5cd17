//! `--jail`: enter the root a launcher prepared and give up root, before reading any of the
//! VM's files. Everything the VM opens afterwards (kernel, disks, sockets, /dev/kvm) is at the
//! same path inside the jail; nothing else of the host is.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

use ferrovmm_api::JailConfig;

fn os_err(what: &str) -> String {
    format!("--jail: {what}: {}", std::io::Error::last_os_error())
}

/// chroot to the jail's root, then become its uid/gid with no groups and no capabilities.
pub fn enter(jail: &JailConfig) -> Result<(), String> {
    let root = CString::new(jail.root.as_os_str().as_bytes())
        .map_err(|_| "--jail: the root contains a NUL byte".to_string())?;
    // SAFETY: plain syscalls on a NUL-terminated path and integers.
    unsafe {
        if libc::chroot(root.as_ptr()) != 0 {
            return Err(os_err(&format!("chroot {}", jail.root.display())));
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            return Err(os_err("chdir /"));
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(os_err("setgroups"));
        }
        if libc::setresgid(jail.gid, jail.gid, jail.gid) != 0 {
            return Err(os_err("setresgid"));
        }
        // From uid 0 to another uid: the kernel clears every capability set.
        if libc::setresuid(jail.uid, jail.uid, jail.uid) != 0 {
            return Err(os_err("setresuid"));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(os_err("no_new_privs"));
        }
        // A uid that could become root again (it was not 0 to start with and kept capabilities)
        // is refused rather than trusted.
        if libc::setuid(0) == 0 {
            return Err("--jail: the process could become root again".into());
        }
    }
    Ok(())
}
