//! A jailed VM gets its TAPs as open descriptors: the daemon attaches to each TAP (it made them,
//! see crate::network) and the VM's process inherits the descriptor under the same number, so it
//! needs neither /dev/net/tun, nor CAP_NET_ADMIN, nor the host's network namespace.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Attaches to the TAP `name` as ferrovmm would (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR); the
/// descriptor is close-on-exec until the VM's process is about to run ferrovmm.
pub fn open(name: &str) -> Result<OwnedFd, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("'{name}' is not an interface name"));
    }
    let file = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| format!("cannot open /dev/net/tun: {e}"))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(format!(
            "cannot attach to TAP {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(file.into())
}
