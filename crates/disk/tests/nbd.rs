//! `ferrovirt img nbd` with QEMU's tools as clients (nbd+unix:// and nbd://), qemu-nbd
//! as the oracle for block status, and hostile clients that must get an error reply or
//! a closed connection while the server and the image stay fine.

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SIZE: u64 = 16 << 20;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

struct Server {
    child: Child,
    sock: PathBuf,
}

impl Server {
    fn start(img: &Path, sock: &Path, extra: &[&str]) -> Server {
        let mut args = vec!["nbd".to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["--socket".into(), s(sock), s(img)]);
        let mut child = Command::new(img_bin())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferrovirt img nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(sock).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                let mut e = String::new();
                let _ = child.stderr.take().map(|mut x| x.read_to_string(&mut e));
                panic!("the server exited ({st}): {e}");
            }
            assert!(Instant::now() < deadline, "the server did not listen");
            std::thread::yield_now();
        }
        Server {
            child,
            sock: sock.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then the exit status (the server flushes and exits 0).
    fn stop(mut self) -> i32 {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the server did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Data runs of `qemu-img map --output=json` for a file or an NBD URL/options.
fn data_runs(args: &[&str]) -> Vec<(u64, u64)> {
    let mut a = vec!["map", "--output=json"];
    a.extend_from_slice(args);
    let j: serde_json::Value = serde_json::from_str(&qemu_img_ok(&a)).unwrap();
    let mut v: Vec<(u64, u64)> = Vec::new();
    for e in j.as_array().unwrap() {
        if e["data"] == true {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match v.last_mut() {
                Some((ps, pl)) if *ps + *pl == s => *pl += l,
                _ => v.push((s, l)),
            }
        }
    }
    v
}

fn dirty_runs(sock: &Path, bitmap: &str) -> Vec<(u64, u64)> {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}",
        sock.display()
    );
    let j: serde_json::Value = serde_json::from_str(&qemu_img_ok(&[
        "map",
        "--output=json",
        "--image-opts",
        &opts,
    ]))
    .unwrap();
    let mut v: Vec<(u64, u64)> = Vec::new();
    for e in j.as_array().unwrap() {
        if e["data"] == false {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match v.last_mut() {
                Some((ps, pl)) if *ps + *pl == s => *pl += l,
                _ => v.push((s, l)),
            }
        }
    }
    v
}

fn chain(d: &Scratch) -> PathBuf {
    let base = d.path("base.qcow2");
    let top = d.path("top.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", &s(&base), &SIZE.to_string()]);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 1 0 4M".into(), "write -c -P 2 6M 128k".into()],
    );
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &s(&top),
    ]);
    qemu_img_ok(&["bitmap", "--add", &s(&top), "b0"]);
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 3 1M 100k".into(),
            "write -z 3M 64k".into(),
            "write -P 4 9M 1M".into(),
        ],
    );
    top
}

#[test]
fn qemu_reads_an_export_and_sees_block_status_and_the_bitmap() {
    let _serial = serial();
    let d = Scratch::new("nbd-read");
    let top = chain(&d);
    let srv = Server::start(&top, &d.path("s.sock"), &["--read-only", "--bitmap", "b0"]);
    let url = srv.url();
    let o = qemu_img(&["compare", "-f", "qcow2", &s(&top), &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // base:allocation: the data runs qemu-img sees through us are those of the file.
    assert_eq!(data_runs(&[&url]), data_runs(&["-f", "qcow2", &s(&top)]));
    // qemu:dirty-bitmap:b0: exactly what was written since the bitmap was added, as
    // qemu-nbd exports it.
    let ours = dirty_runs(&srv.sock, "b0");
    assert_eq!(
        ours,
        vec![
            (1 << 20, 128 << 10),
            (3 << 20, 64 << 10),
            (9 << 20, 1 << 20)
        ]
    );
    // A copy through the export is identical.
    let copy = d.path("copy.qcow2");
    qemu_img_ok(&["convert", "-O", "qcow2", &url, &s(&copy)]);
    assert_identical(&copy, "qcow2", &top, "qcow2");
    // Writes are refused on a read-only export.
    let o = qemu_io_out(&["-c", "write 0 512", &url]);
    assert!(!o.0, "a write to a read-only export succeeded: {}", o.1);
    assert_eq!(srv.stop(), 0);
    let qsock = d.path("q.sock");
    let mut q = Command::new("qemu-nbd")
        .args(["-r", "-B", "b0", "-f", "qcow2", "-k", &s(&qsock), &s(&top)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&qsock).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not listen");
        std::thread::yield_now();
    }
    assert_eq!(
        dirty_runs(&qsock, "b0"),
        ours,
        "qemu-nbd exports the bitmap differently"
    );
    let _ = q.kill();
    let _ = q.wait();
    assert_clean(&top);
}

/// qemu-io with success or failure reported instead of asserted.
fn qemu_io_out(args: &[&str]) -> (bool, String) {
    let o = Command::new("qemu-io").args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success() && !text.contains("failed"), text)
}

#[test]
fn writes_through_an_export_land_like_direct_writes() {
    let _serial = serial();
    let d = Scratch::new("nbd-write");
    let top = chain(&d);
    let twin = d.path("twin.qcow2");
    std::fs::copy(&top, &twin).unwrap();
    let cmds = [
        "write -P 7 100k 300k",
        "write -z 2M 1M",
        "discard 8M 128k",
        "write -P 8 15M 1M",
        "write -P 9 4095k 2k",
        "flush",
    ];
    let srv = Server::start(&top, &d.path("w.sock"), &["--bitmap", "b0"]);
    let mut args: Vec<&str> = Vec::new();
    for c in &cmds {
        args.extend(["-c", c]);
    }
    let url = srv.url();
    args.push(&url);
    let (ok, text) = qemu_io_out(&args);
    assert!(ok, "{text}");
    // Out of range: an error reply, the connection and the server go on.
    let (ok, text) = qemu_io_out(&["-c", "read 16M 512", &url]);
    assert!(!ok, "{text}");
    assert_eq!(srv.stop(), 0);
    // Discard through NBD is only a hint for QEMU; write the same zeros on the twin.
    let direct: Vec<String> = cmds
        .iter()
        .map(|c| c.replace("discard 8M 128k", "write -z 8M 128k"))
        .collect();
    qemu_io(&twin, "qcow2", &direct);
    assert_clean(&top);
    assert_identical(&top, "qcow2", &twin, "qcow2");
}

#[test]
fn tcp_export_on_loopback() {
    let _serial = serial();
    let d = Scratch::new("nbd-tcp");
    let top = chain(&d);
    let port = 25000 + (std::process::id() % 900) as u16;
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(img_bin())
        .args(["nbd", "--read-only", "--bind", &addr, &s(&top)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(matches!(child.try_wait(), Ok(None)), "the server exited");
        assert!(Instant::now() < deadline, "the server did not listen");
        std::thread::yield_now();
    }
    let o = qemu_img(&["compare", "-f", "qcow2", &s(&top), &format!("nbd://{addr}")]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// A raw client: handshake helpers and requests.
struct Raw(UnixStream);

impl Raw {
    fn connect(p: &Path) -> Raw {
        let s = UnixStream::connect(p).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw(s)
    }
    fn greet(&mut self) {
        let mut b = [0u8; 18];
        self.0.read_exact(&mut b).unwrap();
        assert_eq!(&b[..8], b"NBDMAGIC");
        self.0.write_all(&3u32.to_be_bytes()).unwrap();
    }
    fn option(&mut self, opt: u32, data: &[u8]) {
        self.try_option(opt, data).unwrap();
    }
    /// Sends an option; a server that already closed makes this fail.
    fn try_option(&mut self, opt: u32, data: &[u8]) -> std::io::Result<()> {
        let mut b = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b)
    }
    /// Reads option replies until ACK or an error; returns the last reply type.
    fn replies(&mut self) -> u32 {
        loop {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            self.0.read_exact(&mut d).unwrap();
            if ty == 1 || ty & (1 << 31) != 0 {
                return ty;
            }
        }
    }
    fn go(&mut self) {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(7, &d);
        assert_eq!(self.replies(), 1);
    }
    fn request(&mut self, kind: u16, offset: u64, len: u32) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&42u64.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.0.write_all(&b).unwrap();
    }
    /// A simple reply's error code.
    fn simple_error(&mut self) -> u32 {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        u32::from_be_bytes(h[4..8].try_into().unwrap())
    }
    /// True when the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn hostile_clients_get_errors_or_a_closed_connection() {
    let _serial = serial();
    let d = Scratch::new("nbd-hostile");
    let top = chain(&d);
    let before = d.path("before.qcow2");
    std::fs::copy(&top, &before).unwrap();
    let mut srv = Server::start(&top, &d.path("h.sock"), &[]);
    let sock = srv.sock.clone();
    // Wrong client flags: closed.
    let mut c = Raw::connect(&sock);
    let mut b = [0u8; 18];
    c.0.read_exact(&mut b).unwrap();
    c.0.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
    assert!(c.closed());
    // Bad option magic: closed.
    let mut c = Raw::connect(&sock);
    c.greet();
    c.0.write_all(&[0xab; 16]).unwrap();
    assert!(c.closed());
    // An oversized option is refused (and skipped); a huge one closes the connection.
    let mut c = Raw::connect(&sock);
    c.greet();
    c.option(7, &vec![0u8; 100_000]);
    assert_eq!(c.replies(), (1 << 31) + 9);
    let mut h = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    h.extend_from_slice(&7u32.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.0.write_all(&h).unwrap();
    assert!(c.closed());
    // Malformed GO payloads: an error reply each, then a normal GO works.
    let mut c = Raw::connect(&sock);
    c.greet();
    for bad in [
        &[0u8; 1][..],
        &[0xff, 0xff, 0xff, 0xff, 0, 0],
        &[0, 0, 0, 9, b'x'],
    ] {
        c.option(7, bad);
        assert_eq!(c.replies(), (1 << 31) + 3, "payload {bad:?}");
    }
    c.option(7, &[0, 0, 0, 3, b'a', b'b', b'c', 0, 0]);
    assert_eq!(c.replies(), (1 << 31) + 6, "unknown export");
    c.option(10, &[0; 8]);
    assert_eq!(
        c.replies(),
        (1 << 31) + 3,
        "meta context before structured replies"
    );
    c.option(999, &[]);
    assert_eq!(c.replies(), (1 << 31) + 1);
    c.go();
    // Out of range and oversized requests: errors; the connection goes on.
    c.request(0, SIZE, 512);
    assert_eq!(c.simple_error(), 22);
    c.request(0, u64::MAX - 10, 512);
    assert_eq!(c.simple_error(), 22);
    c.request(0, 0, u32::MAX);
    assert_eq!(c.simple_error(), 22);
    c.request(7, 0, 512);
    assert_eq!(c.simple_error(), 22, "block status without a context");
    c.request(77, 0, 0);
    assert_eq!(c.simple_error(), 22, "unknown command");
    c.request(6, SIZE - 512, 1024);
    assert_eq!(c.simple_error(), 28, "write-zeroes past the end");
    // A huge write closes the connection without reading its payload.
    c.request(1, 0, 64 << 20);
    assert!(c.closed());
    // A write cut off mid-payload: the connection ends, nothing is written.
    let mut c = Raw::connect(&sock);
    c.greet();
    c.go();
    c.request(1, 0, 65536);
    c.0.write_all(&[0x55; 1000]).unwrap();
    drop(c);
    // Too many options: closed.
    let mut c = Raw::connect(&sock);
    c.greet();
    for _ in 0..64 {
        c.option(8, &[]);
        assert_eq!(c.replies(), 1);
    }
    // The server may close right after the 64th reply: the 65th write can fail, or be unread.
    let _ = c.try_option(8, &[]);
    assert!(c.closed());
    // Seeded garbage after a handshake, many connections.
    let mut rng = Rng(0x6e62_6421);
    for i in 0..150 {
        let mut c = Raw::connect(&sock);
        c.greet();
        if i % 2 == 0 {
            c.go();
        }
        let n = 1 + rng.below(300) as usize;
        let mut g = vec![0u8; n];
        rng.fill(&mut g);
        if i % 3 == 0 {
            g[..4.min(n)].copy_from_slice(&0x2560_9513u32.to_be_bytes()[..4.min(n)]);
        }
        let _ = c.0.write_all(&g);
    }
    // More idle connections than the limit: the extra ones are closed at once.
    let idle: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let mut extra = Raw::connect(&sock);
    assert!(extra.closed(), "connection 17 was accepted");
    drop(idle);
    assert!(srv.alive(), "the server died");
    // Still serving, and the image is as it was.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = qemu_img(&["compare", "-f", "qcow2", &s(&before), &srv.url()]);
        if o.status.success() {
            break;
        }
        // The idle connections may take a moment to be noticed as closed.
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::yield_now();
    }
    assert_eq!(srv.stop(), 0);
    assert_clean(&top);
    assert_identical(&top, "qcow2", &before, "qcow2");
}

#[test]
fn a_snapshot_export_shows_the_point_in_time_view() {
    let _serial = serial();
    let d = Scratch::new("nbd-snap");
    let top = chain(&d);
    qemu_img_ok(&["snapshot", "-c", "s1", &s(&top)]);
    qemu_io(
        &top,
        "qcow2",
        &["write -P 5 0 2M".into(), "write -z 9M 512k".into()],
    );
    let then = d.path("then.raw");
    qemu_img_ok(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "-l",
        "snapshot.name=s1",
        &s(&top),
        &s(&then),
    ]);
    let srv = Server::start(&top, &d.path("sn.sock"), &["--snapshot", "s1"]);
    let url = srv.url();
    let o = qemu_img(&["compare", "-F", "raw", &url, &s(&then)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let ours = data_runs(&[&url]);
    let (ok, text) = qemu_io_out(&["-c", "write 0 512", &url]);
    assert!(!ok, "a write to a snapshot export succeeded: {text}");
    assert_eq!(srv.stop(), 0);
    // qemu-nbd -l exports the same snapshot with the same allocation.
    let qsock = d.path("qsn.sock");
    let mut q = Command::new("qemu-nbd")
        .args([
            "-r",
            "-l",
            "snapshot.name=s1",
            "-f",
            "qcow2",
            "-k",
            &s(&qsock),
            &s(&top),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&qsock).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not listen");
        std::thread::yield_now();
    }
    let theirs = data_runs(&[&format!("nbd+unix:///?socket={}", qsock.display())]);
    let _ = q.kill();
    let _ = q.wait();
    assert_eq!(ours, theirs);
    // --bitmap describes the current contents: refused with --snapshot.
    let (code, _, err) = img(&[
        "nbd",
        "--snapshot",
        "s1",
        "--bitmap",
        "b0",
        "--socket",
        &s(&d.path("x.sock")),
        &s(&top),
    ]);
    assert_eq!(code, 1, "{err}");
    assert_clean(&top);
}
