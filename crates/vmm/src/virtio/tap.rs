//! TAP devices for virtio-net: opened by name or inherited as a descriptor,
//! always with IFF_VNET_HDR so checksum and segmentation offloads pass through.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const IFNAMSIZ: usize = 16;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
/// virtio_net_hdr_v1: with VIRTIO_F_VERSION_1 the header always has num_buffers.
pub const VNET_HDR_LEN: usize = 12;

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

pub struct Tap {
    fd: OwnedFd,
    pub name: String,
}

fn ifreq(name: &str, flags: i16) -> IfReq {
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req
}

impl Tap {
    /// Attaches to the existing TAP interface `name`.
    pub fn open(name: &str) -> Result<Tap, String> {
        if !ferrovmm_api::launch::valid_tap_name(name) {
            return Err(format!(
                "'{name}' is not a valid interface name (1-15 characters, no '/', ':' or ',')"
            ));
        }
        if !std::path::Path::new("/sys/class/net").join(name).exists() {
            return Err(format!(
                "TAP device {name} does not exist; create it first (ip tuntap add {name} mode tap)"
            ));
        }
        let file = File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| format!("cannot open /dev/net/tun: {e}"))?;
        let mut req = ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes an ifreq we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(format!("cannot attach to TAP device {name}: {e} (is it a TAP, owned by this user, and not in use?)"));
        }
        let tap = Tap {
            fd: file.into(),
            name: name.to_string(),
        };
        tap.setup()?;
        Ok(tap)
    }

    /// Takes over an already opened TAP descriptor (passed by a management daemon).
    pub fn from_fd(fd: RawFd) -> Result<Tap, String> {
        // SAFETY: fcntl(F_GETFD) only queries the descriptor number.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!("file descriptor {fd} is not open"));
        }
        let mut req = ifreq("", 0);
        // SAFETY: TUNGETIFF writes into an ifreq we own.
        if unsafe { libc::ioctl(fd, TUNGETIFF, &mut req) } < 0 {
            return Err(format!("file descriptor {fd} is not a TAP device"));
        }
        if req.flags & IFF_TAP == 0 || req.flags & IFF_VNET_HDR == 0 {
            return Err(format!(
                "file descriptor {fd} is not a TAP opened with IFF_VNET_HDR"
            ));
        }
        let name_len = req.name.iter().position(|b| *b == 0).unwrap_or(IFNAMSIZ);
        let name = String::from_utf8_lossy(&req.name[..name_len]).into_owned();
        // SAFETY: the caller gave us this descriptor to own from now on.
        let tap = Tap {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            name,
        };
        tap.setup()?;
        Ok(tap)
    }

    fn setup(&self) -> Result<(), String> {
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int we own.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(format!(
                "TAP {}: cannot set the vnet header size: {}",
                self.name,
                io::Error::last_os_error()
            ));
        }
        // SAFETY: plain fcntl on our descriptor.
        unsafe {
            let flags = libc::fcntl(self.fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(self.fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        self.set_offload(0)
    }

    /// Tells the kernel which offloads the guest can take on receive.
    pub fn set_offload(&self, flags: u32) -> Result<(), String> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(format!(
                "TAP {}: cannot set offloads: {}",
                self.name,
                io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read into a buffer we own, at most its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: write from a buffer we own, at most its length.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
