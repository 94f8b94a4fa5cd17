//! An NBD server for an image (`ferrovirt img nbd`, the role of qemu-nbd): fixed
//! newstyle negotiation, simple and structured replies, the `base:allocation` and
//! `qemu:dirty-bitmap:NAME` metadata contexts. One thread per connection, at most
//! `MAX_CONNECTIONS` at once; every length and count a client sends is checked before
//! anything is allocated, and a client that breaks the protocol is disconnected.

pub mod proto;

use crate::chain::{open_chain_with, ChainOpts};
use crate::ops::chain_status;
use crate::{BlockBackend, DiskError, Image};
use proto::*;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MAX_CONNECTIONS: usize = 16;
/// Options a client may send before it starts transmission.
const MAX_OPTIONS: usize = 64;
/// Option payloads past this are not skipped but end the connection.
const MAX_SKIP: u64 = 16 << 20;
/// Block status descriptors in one reply.
const MAX_DESCRIPTORS: usize = 1 << 16;
/// Time a client gets to finish negotiating.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

const CTX_ALLOCATION: u32 = 1;
const CTX_BITMAP: u32 = 2;

/// What is exported and how.
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    pub read_only: bool,
    /// Offer `qemu:dirty-bitmap:NAME` for this persistent bitmap of the image.
    pub bitmap: Option<String>,
    /// Export name clients ask for ("" as qemu-nbd's default).
    pub name: String,
    /// Export this internal snapshot (read-only) instead of the current contents.
    pub snapshot: Option<String>,
}

/// Where to listen.
#[derive(Clone, Debug)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(String),
}

struct Export {
    img: Arc<Image>,
    view: Option<crate::qcow2::SnapshotView>,
    size: u64,
    read_only: bool,
    bitmap: Option<String>,
    name: String,
}

impl Export {
    /// What requests read and write: the image, or the snapshot view.
    fn io(&self) -> &dyn BlockBackend {
        match &self.view {
            Some(v) => v,
            None => &*self.img,
        }
    }

    /// Whether [pos, ...) holds data, and for how long.
    fn data_status(&self, pos: u64, max: u64) -> Result<(bool, u64), DiskError> {
        match &self.view {
            Some(v) => v.data_status(pos, max),
            None => {
                let s = chain_status(&self.img, pos, max)?;
                Ok((s.data, s.length))
            }
        }
    }

    fn contexts(&self) -> Vec<(u32, String)> {
        let mut v = vec![(CTX_ALLOCATION, "base:allocation".to_string())];
        if let Some(b) = &self.bitmap {
            v.push((CTX_BITMAP, format!("qemu:dirty-bitmap:{b}")));
        }
        v
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Opens the image and serves it until SIGTERM or SIGINT; then flushes it (and stores
/// its bitmaps) and returns. `ready` runs once the socket accepts connections.
pub fn serve(
    image: &Path,
    opts: &ExportOptions,
    listen: &Listen,
    ready: impl FnOnce(),
) -> Result<(), DiskError> {
    if opts.snapshot.is_some() && opts.bitmap.is_some() {
        return Err(DiskError::InvalidArgument(
            "--bitmap describes the current contents; it cannot go with --snapshot".into(),
        ));
    }
    // A snapshot is exported read-only, as qemu-nbd -l does.
    let read_only = opts.read_only || opts.snapshot.is_some();
    let img = open_chain_with(
        image,
        None,
        ChainOpts {
            read_only,
            ..Default::default()
        },
    )?;
    let view = match &opts.snapshot {
        Some(name) => Some(crate::qcow2::SnapshotView::open(img.clone(), name)?),
        None => None,
    };
    if let Some(b) = &opts.bitmap {
        match &*img {
            Image::Qcow2(q) => {
                q.bitmap_dirty_extents(b)?;
            }
            Image::Raw(_) => {
                return Err(DiskError::InvalidArgument(
                    "raw images have no bitmaps".into(),
                ))
            }
        }
    }
    let export = Arc::new(Export {
        size: view.as_ref().map_or_else(|| img.size(), |v| v.size()),
        img,
        view,
        read_only,
        bitmap: opts.bitmap.clone(),
        name: opts.name.clone(),
    });
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let active = Arc::new(AtomicUsize::new(0));
    match listen {
        Listen::Unix(path) => {
            if path.exists() {
                return Err(DiskError::InvalidArgument(format!(
                    "{} already exists; remove it or choose another socket path",
                    path.display()
                )));
            }
            let l =
                std::os::unix::net::UnixListener::bind(path).map_err(|e| DiskError::io(path, e))?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
            ready();
            accept_loop(&l, &export, &active, |l| l.accept().map(|(s, _)| s));
            let _ = std::fs::remove_file(path);
        }
        Listen::Tcp(addr) => {
            let l = std::net::TcpListener::bind(addr.as_str())
                .map_err(|e| DiskError::io(PathBuf::from(addr), e))?;
            ready();
            accept_loop(&l, &export, &active, |l| {
                l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    s
                })
            });
        }
    }
    export.img.flush()?;
    if let Image::Qcow2(q) = &*export.img {
        q.store_bitmaps()?;
    }
    Ok(())
}

trait Conn: Read + Write + Send + Sized + 'static {
    fn set_timeout(&self, t: Option<Duration>);
    /// A second handle on the connection, for writing replies from other threads.
    fn dup(&self) -> std::io::Result<Self>;
}
impl Conn for std::os::unix::net::UnixStream {
    fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.set_read_timeout(t);
    }
    fn dup(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
}
impl Conn for std::net::TcpStream {
    fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.set_read_timeout(t);
    }
    fn dup(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
}

fn accept_loop<L: std::os::unix::io::AsRawFd, C: Conn>(
    l: &L,
    export: &Arc<Export>,
    active: &Arc<AtomicUsize>,
    accept: impl Fn(&L) -> std::io::Result<C>,
) {
    while !STOP.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 250) };
        if n <= 0 {
            continue;
        }
        let Ok(conn) = accept(l) else { continue };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            drop(conn);
            continue;
        }
        let (e, a) = (export.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                let _ = session(conn, &e);
                a.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Why a session ended early: the connection failed or the client broke the protocol.
type End = std::io::Error;

fn bad(why: impl Into<String>) -> End {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why.into())
}

fn read_u32(c: &mut impl Read) -> Result<u32, End> {
    let mut b = [0u8; 4];
    c.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(c: &mut impl Read) -> Result<u64, End> {
    let mut b = [0u8; 8];
    c.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn opt_reply(c: &mut impl Write, opt: u32, ty: u32, data: &[u8]) -> Result<(), End> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&ty.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    c.write_all(&b)
}

struct State {
    structured: bool,
    contexts: Vec<u32>,
}

fn session<C: Conn>(mut c: C, e: &Export) -> Result<(), End> {
    c.set_timeout(Some(HANDSHAKE_TIMEOUT));
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    c.write_all(&hello)?;
    let cflags = read_u32(&mut c)?;
    if cflags & CLIENT_FIXED_NEWSTYLE == 0
        || cflags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
    {
        return Err(bad("client flags"));
    }
    let no_zeroes = cflags & CLIENT_NO_ZEROES != 0;
    let mut st = State {
        structured: false,
        contexts: Vec::new(),
    };
    let tflags = |st: &State| {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
        if e.read_only {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
        }
        if st.structured {
            f |= TF_SEND_DF;
        }
        f
    };
    for _ in 0..MAX_OPTIONS {
        if read_u64(&mut c)? != IHAVEOPT {
            return Err(bad("option magic"));
        }
        let opt = read_u32(&mut c)?;
        let len = read_u32(&mut c)?;
        if len > MAX_OPTION_LEN {
            if len as u64 > MAX_SKIP {
                return Err(bad("option too long"));
            }
            std::io::copy(&mut (&mut c).take(len as u64), &mut std::io::sink())?;
            opt_reply(&mut c, opt, REP_ERR_TOO_BIG, b"option too long")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                if String::from_utf8_lossy(&data) != e.name {
                    return Err(bad("unknown export"));
                }
                let mut b = Vec::new();
                b.extend_from_slice(&e.size.to_be_bytes());
                b.extend_from_slice(&tflags(&st).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                c.write_all(&b)?;
                return transmission(c, e, &st);
            }
            OPT_ABORT => {
                let _ = opt_reply(&mut c, opt, REP_ACK, &[]);
                return Ok(());
            }
            OPT_LIST => {
                if len != 0 {
                    opt_reply(&mut c, opt, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                let mut b = (e.name.len() as u32).to_be_bytes().to_vec();
                b.extend_from_slice(e.name.as_bytes());
                opt_reply(&mut c, opt, REP_SERVER, &b)?;
                opt_reply(&mut c, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let (name, infos) = match parse_go(&data) {
                    Ok(v) => v,
                    Err(why) => {
                        opt_reply(&mut c, opt, REP_ERR_INVALID, why.as_bytes())?;
                        continue;
                    }
                };
                if name != e.name {
                    opt_reply(&mut c, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let mut b = INFO_EXPORT.to_be_bytes().to_vec();
                b.extend_from_slice(&e.size.to_be_bytes());
                b.extend_from_slice(&tflags(&st).to_be_bytes());
                opt_reply(&mut c, opt, REP_INFO, &b)?;
                if infos.contains(&INFO_BLOCK_SIZE) {
                    let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    b.extend_from_slice(&1u32.to_be_bytes());
                    b.extend_from_slice(&4096u32.to_be_bytes());
                    b.extend_from_slice(&MAX_REQUEST_LEN.to_be_bytes());
                    opt_reply(&mut c, opt, REP_INFO, &b)?;
                }
                opt_reply(&mut c, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return transmission(c, e, &st);
                }
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    opt_reply(&mut c, opt, REP_ERR_INVALID, b"takes no data")?;
                    continue;
                }
                st.structured = true;
                opt_reply(&mut c, opt, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if opt == OPT_SET_META_CONTEXT && !st.structured {
                    opt_reply(&mut c, opt, REP_ERR_INVALID, b"structured replies first")?;
                    continue;
                }
                let (name, queries) = match parse_meta(&data) {
                    Ok(v) => v,
                    Err(why) => {
                        opt_reply(&mut c, opt, REP_ERR_INVALID, why.as_bytes())?;
                        continue;
                    }
                };
                if name != e.name {
                    opt_reply(&mut c, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let list = opt == OPT_LIST_META_CONTEXT;
                let chosen: Vec<(u32, String)> = e
                    .contexts()
                    .into_iter()
                    .filter(|(_, n)| {
                        (list && queries.is_empty())
                            || queries.iter().any(|q| {
                                q == n || (list && q.ends_with(':') && n.starts_with(q.as_str()))
                            })
                    })
                    .collect();
                if !list {
                    st.contexts = chosen.iter().map(|(id, _)| *id).collect();
                }
                for (id, n) in &chosen {
                    let mut b = id.to_be_bytes().to_vec();
                    b.extend_from_slice(n.as_bytes());
                    opt_reply(&mut c, opt, REP_META_CONTEXT, &b)?;
                }
                opt_reply(&mut c, opt, REP_ACK, &[])?;
            }
            _ => opt_reply(&mut c, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
    Err(bad("too many options"))
}

fn simple_reply(c: &mut impl Write, cookie: u64, err: u32, data: &[u8]) -> Result<(), End> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&err.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    if err == 0 {
        b.extend_from_slice(data);
    }
    c.write_all(&b)
}

fn chunk(
    c: &mut impl Write,
    flags: u16,
    ty: u16,
    cookie: u64,
    payload: &[&[u8]],
) -> Result<(), End> {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let mut b = Vec::with_capacity(20);
    b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&ty.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&(len as u32).to_be_bytes());
    c.write_all(&b)?;
    for p in payload {
        c.write_all(p)?;
    }
    Ok(())
}

fn reply_err(c: &mut impl Write, st: &State, cookie: u64, err: u32, msg: &str) -> Result<(), End> {
    if st.structured {
        let mut p = err.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg.as_bytes());
        chunk(c, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, &[&p])
    } else {
        simple_reply(c, cookie, err, &[])
    }
}

fn reply_ok(c: &mut impl Write, st: &State, cookie: u64) -> Result<(), End> {
    if st.structured {
        chunk(c, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, &[])
    } else {
        simple_reply(c, cookie, 0, &[])
    }
}

fn errno(e: &DiskError) -> u32 {
    match e {
        DiskError::ReadOnly { .. } => EPERM,
        DiskError::OutOfRange { .. } | DiskError::InvalidArgument(_) => EINVAL,
        DiskError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => ENOSPC,
        _ => EIO,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read workers per connection (clients such as qemu-img keep several requests in flight).
const READ_WORKERS: usize = 4;

fn transmission<C: Conn>(mut c: C, e: &Export, st: &State) -> Result<(), End> {
    c.set_timeout(None);
    let w = Mutex::new(c.dup()?);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Request>(2 * READ_WORKERS);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        for _ in 0..READ_WORKERS {
            scope.spawn(|| {
                let mut buf = Vec::new();
                loop {
                    let next = lock(&rx).recv();
                    let Ok(r) = next else { break };
                    buf.resize(r.length as usize, 0);
                    let sent = match e.io().read_at(&mut buf, r.offset) {
                        Ok(()) if st.structured => {
                            let off = r.offset.to_be_bytes();
                            chunk(
                                &mut *lock(&w),
                                REPLY_FLAG_DONE,
                                REPLY_TYPE_OFFSET_DATA,
                                r.cookie,
                                &[&off, &buf],
                            )
                        }
                        Ok(()) => simple_reply(&mut *lock(&w), r.cookie, 0, &buf),
                        Err(err) => {
                            reply_err(&mut *lock(&w), st, r.cookie, errno(&err), &err.to_string())
                        }
                    };
                    if sent.is_err() {
                        break;
                    }
                }
            });
        }
        let res = request_loop(&mut c, e, st, &w, &tx);
        drop(tx);
        res
    })
}

fn request_loop<C: Conn>(
    c: &mut C,
    e: &Export,
    st: &State,
    w: &Mutex<C>,
    reads: &SyncSender<Request>,
) -> Result<(), End> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut h = [0u8; 28];
        match c.read_exact(&mut h) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err),
        }
        let r = parse_request(&h).map_err(bad)?;
        let in_range = r
            .offset
            .checked_add(r.length as u64)
            .is_some_and(|end| end <= e.size);
        match r.kind {
            CMD_READ => {
                if r.length > MAX_REQUEST_LEN || !in_range {
                    reply_err(
                        &mut *lock(w),
                        st,
                        r.cookie,
                        EINVAL,
                        "read out of range or too long",
                    )?;
                    continue;
                }
                // Reads are served by the worker threads, replies in any order.
                reads.send(r).map_err(|_| bad("read workers gone"))?;
            }
            CMD_WRITE => {
                if r.length > MAX_REQUEST_LEN {
                    // The payload cannot be skipped at a bounded cost: disconnect.
                    return Err(bad("write too long"));
                }
                buf.resize(r.length as usize, 0);
                c.read_exact(&mut buf)?;
                if e.read_only {
                    reply_err(&mut *lock(w), st, r.cookie, EPERM, "read-only export")?;
                    continue;
                }
                if !in_range {
                    reply_err(
                        &mut *lock(w),
                        st,
                        r.cookie,
                        ENOSPC,
                        "write past the end of the export",
                    )?;
                    continue;
                }
                let res = e.io().write_at(&buf, r.offset).and_then(|()| {
                    if r.flags & CMD_FLAG_FUA != 0 {
                        e.io().flush()
                    } else {
                        Ok(())
                    }
                });
                match res {
                    Ok(()) => reply_ok(&mut *lock(w), st, r.cookie)?,
                    Err(err) => {
                        reply_err(&mut *lock(w), st, r.cookie, errno(&err), &err.to_string())?
                    }
                }
            }
            CMD_DISC => {
                let _ = e.io().flush();
                return Ok(());
            }
            CMD_FLUSH => match e.io().flush() {
                Ok(()) => reply_ok(&mut *lock(w), st, r.cookie)?,
                Err(err) => reply_err(&mut *lock(w), st, r.cookie, errno(&err), &err.to_string())?,
            },
            CMD_TRIM | CMD_WRITE_ZEROES => {
                if e.read_only {
                    reply_err(&mut *lock(w), st, r.cookie, EPERM, "read-only export")?;
                    continue;
                }
                if !in_range {
                    reply_err(
                        &mut *lock(w),
                        st,
                        r.cookie,
                        ENOSPC,
                        "past the end of the export",
                    )?;
                    continue;
                }
                let len = r.length as u64;
                let res = if r.kind == CMD_TRIM {
                    e.io().discard(r.offset, len)
                } else if r.flags & CMD_FLAG_FAST_ZERO != 0 {
                    // We cannot promise a zero-write faster than writing zeros.
                    reply_err(&mut *lock(w), st, r.cookie, ENOTSUP, "no fast zero")?;
                    continue;
                } else {
                    e.io()
                        .write_zeroes(r.offset, len, r.flags & CMD_FLAG_NO_HOLE == 0)
                };
                let res = res.and_then(|()| {
                    if r.flags & CMD_FLAG_FUA != 0 {
                        e.io().flush()
                    } else {
                        Ok(())
                    }
                });
                match res {
                    Ok(()) => reply_ok(&mut *lock(w), st, r.cookie)?,
                    Err(err) => {
                        reply_err(&mut *lock(w), st, r.cookie, errno(&err), &err.to_string())?
                    }
                }
            }
            CMD_CACHE => {
                if in_range {
                    reply_ok(&mut *lock(w), st, r.cookie)?
                } else {
                    reply_err(&mut *lock(w), st, r.cookie, EINVAL, "out of range")?
                }
            }
            CMD_BLOCK_STATUS => {
                if !st.structured || st.contexts.is_empty() {
                    reply_err(
                        &mut *lock(w),
                        st,
                        r.cookie,
                        EINVAL,
                        "no metadata context negotiated",
                    )?;
                    continue;
                }
                if r.length == 0 || r.offset >= e.size {
                    reply_err(
                        &mut *lock(w),
                        st,
                        r.cookie,
                        EINVAL,
                        "block status out of range",
                    )?;
                    continue;
                }
                let end = r.offset.saturating_add(r.length as u64).min(e.size);
                let one = r.flags & CMD_FLAG_REQ_ONE != 0;
                let mut replies = Vec::new();
                let mut failed = None;
                for &ctx in &st.contexts {
                    match descriptors(e, ctx, r.offset, end, one) {
                        Ok(d) => replies.push((ctx, d)),
                        Err(err) => failed = Some(err),
                    }
                }
                if let Some(err) = failed {
                    reply_err(&mut *lock(w), st, r.cookie, errno(&err), &err.to_string())?;
                    continue;
                }
                let n = replies.len();
                for (i, (ctx, d)) in replies.into_iter().enumerate() {
                    let mut p = ctx.to_be_bytes().to_vec();
                    for (len, flags) in d {
                        p.extend_from_slice(&len.to_be_bytes());
                        p.extend_from_slice(&flags.to_be_bytes());
                    }
                    let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
                    chunk(
                        &mut *lock(w),
                        flags,
                        REPLY_TYPE_BLOCK_STATUS,
                        r.cookie,
                        &[&p],
                    )?;
                }
            }
            _ => reply_err(&mut *lock(w), st, r.cookie, EINVAL, "unknown command")?,
        }
    }
}

/// Block status descriptors (length, flags) covering [start, end) for one context.
fn descriptors(
    e: &Export,
    ctx: u32,
    start: u64,
    end: u64,
    one: bool,
) -> Result<Vec<(u32, u32)>, DiskError> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let push = |out: &mut Vec<(u32, u32)>, len: u64, flags: u32| {
        // Descriptor lengths are 32-bit; keep them below 4 GiB and sector-sized.
        let mut left = len;
        while left > 0 {
            let n = left.min(0xffff_fe00);
            match out.last_mut() {
                Some((l, f)) if *f == flags && (*l as u64 + n) <= 0xffff_fe00 => *l += n as u32,
                _ => out.push((n as u32, flags)),
            }
            left -= n;
        }
    };
    if ctx == CTX_ALLOCATION {
        let mut pos = start;
        while pos < end && out.len() < MAX_DESCRIPTORS {
            let (data, n) = e.data_status(pos, end - pos)?;
            let n = n.max(1).min(end - pos);
            push(&mut out, n, if data { 0 } else { STATE_HOLE | STATE_ZERO });
            pos += n;
            if one {
                break;
            }
        }
    } else {
        let (Some(name), Image::Qcow2(q)) = (&e.bitmap, &*e.img) else {
            return Ok(vec![((end - start).min(0xffff_fe00) as u32, 0)]);
        };
        let dirty = q.bitmap_dirty_extents(name)?;
        let mut pos = start;
        for (s, l) in dirty {
            let (s, t) = (s.max(start), (s + l).min(end));
            if s >= t {
                continue;
            }
            if s > pos {
                push(&mut out, s - pos, 0);
            }
            push(&mut out, t - s, STATE_DIRTY);
            pos = t;
            if out.len() >= MAX_DESCRIPTORS {
                break;
            }
        }
        if pos < end && out.len() < MAX_DESCRIPTORS {
            push(&mut out, end - pos, 0);
        }
        if one {
            out.truncate(1);
        }
    }
    Ok(out)
}
