//! Network namespaces and links for tests that touch networking (the host's stays untouched).

use ferrovirt_testkit::{RunWithin, TOOL_TIMEOUT};

/// Runs `f` on a thread inside a fresh network namespace; processes it starts live there too.
pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's network namespace.
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "unshare(CLONE_NEWNET) needs root"
        );
        f()
    })
    .join()
    .unwrap()
}

pub fn ip(args: &str) {
    let st = std::process::Command::new("ip")
        .args(args.split(' '))
        .status_within(TOOL_TIMEOUT)
        .expect("ip (iproute2)");
    assert!(st.success(), "ip {args}");
}

/// Opens a TAP with a virtio-net header, as a management daemon would before passing it on.
pub fn open_tap(name: &str) -> i32 {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: i16,
        _pad: [u8; 22],
    }
    // SAFETY: open(2) on a constant NUL-terminated path.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR) };
    assert!(fd >= 0, "/dev/net/tun");
    let mut req = IfReq {
        name: [0; 16],
        flags: 0x0002 | 0x1000 | 0x4000,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    assert_eq!(
        unsafe { libc::ioctl(fd, 0x4004_54ca, &mut req) },
        0,
        "TUNSETIFF"
    );
    fd
}

/// A raw socket that receives the frames of one Ethernet type arriving on an interface.
pub struct PacketSocket(std::os::fd::OwnedFd);

impl PacketSocket {
    /// Listens on `ifname` for frames of `ethertype`; each receive waits at most `timeout`.
    pub fn bind(ifname: &str, ethertype: u16, timeout: std::time::Duration) -> Self {
        use std::os::fd::FromRawFd;
        let proto = ethertype.to_be();
        // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET socket (needs root)");
        // SAFETY: fd was just created and is owned by nobody else.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {ifname}");
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: bind with a sockaddr_ll of the size we pass.
        let rc = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind AF_PACKET to {ifname}");
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of this size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO");
        PacketSocket(owned)
    }

    /// The next frame, or None when none came within the timeout.
    pub fn recv(&self) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let mut buf = vec![0u8; 2048];
        // SAFETY: recv into a buffer we own, at most its length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n >= 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }
}
