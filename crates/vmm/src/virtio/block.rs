//! virtio-blk on the disk-image library: read, write, flush, get-id, discard
//! and write-zeroes, with the I/O done by a pool of worker threads so several
//! requests are in flight and the device thread never blocks on the disk.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};

use vmm_sys_util::eventfd::EventFd;

use ferrovirt_disk::BlockBackend;
use virtio_bindings::virtio_blk::*;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Address, Bytes, GuestAddress};

use super::{queue, ActivateContext, GuestMem, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Largest data transfer of one request; more is refused with IOERR.
const MAX_REQUEST_BYTES: u64 = 32 << 20;
const MAX_DISCARD_SEGMENTS: u32 = 32;
const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;
const SERIAL_LEN: usize = 20;
const WORKERS: usize = 16;
/// O_DIRECT wants buffers aligned to the logical block size; page alignment covers every disk.
const BUFFER_ALIGN: usize = 4096;

#[derive(Clone)]
pub struct BlockOptions {
    pub read_only: bool,
    pub serial: String,
}

pub struct Block {
    backend: Arc<dyn BlockBackend>,
    opts: BlockOptions,
    active: Option<Arc<Pool>>,
}

/// A guest request, checked and ready to run.
struct Request {
    kind: u32,
    sector: u64,
    /// Data buffers in guest memory, in order.
    data: Vec<(GuestAddress, u32)>,
    status: GuestAddress,
}

impl Block {
    pub fn new(backend: Arc<dyn BlockBackend>, opts: BlockOptions) -> Self {
        Block {
            backend,
            opts,
            active: None,
        }
    }

    fn capacity_sectors(&self) -> u64 {
        self.backend.size() / SECTOR_SIZE
    }

    fn config_bytes(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        c[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

fn parse(chain: &mut DescriptorChain<GuestMem>, mem: &GuestMem) -> Result<Request, &'static str> {
    let header = chain.next().ok_or("empty chain")?;
    if header.is_write_only() || header.len() < 16 {
        return Err("request header is not a 16-byte readable buffer");
    }
    let kind: u32 = mem
        .read_obj(header.addr())
        .map_err(|_| "request header outside guest memory")?;
    let sector: u64 = mem
        .read_obj(header.addr().unchecked_add(8))
        .map_err(|_| "request header outside guest memory")?;
    let mut descs: Vec<_> = chain.collect();
    let status = descs.pop().ok_or("no status buffer")?;
    if !status.is_write_only() || status.len() < 1 {
        return Err("status buffer is not writable");
    }
    let data = descs.iter().map(|d| (d.addr(), d.len())).collect();
    let wants_write = kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_GET_ID;
    if descs.iter().any(|d| d.is_write_only() != wants_write) {
        return Err("data buffer has the wrong direction for the request");
    }
    Ok(Request {
        kind,
        sector,
        data,
        status: status.addr(),
    })
}

/// A page-aligned scratch buffer, reused across requests by one worker.
struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

// SAFETY: the buffer is plain memory owned by one worker at a time.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new() -> Self {
        AlignedBuf {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        let want = len.div_ceil(BUFFER_ALIGN).max(1) * BUFFER_ALIGN;
        if want > self.cap {
            self.free();
            let layout = Layout::from_size_align(want, BUFFER_ALIGN).expect("valid layout");
            // SAFETY: layout has a non-zero size.
            self.ptr = unsafe { alloc_zeroed(layout) };
            if self.ptr.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            self.cap = want;
        }
        // SAFETY: ptr points to cap >= len initialized bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: ptr was allocated with this layout in get().
            unsafe {
                dealloc(
                    self.ptr,
                    Layout::from_size_align_unchecked(self.cap, BUFFER_ALIGN),
                )
            };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

struct Worker {
    backend: Arc<dyn BlockBackend>,
    opts: BlockOptions,
    capacity: u64,
    mem: GuestMem,
    buf: AlignedBuf,
}

/// The guest pages behind a single page-aligned data buffer, for I/O straight into
/// guest memory (no bounce copy; page alignment also satisfies O_DIRECT).
// Guest memory is shared memory that is mutable through `&` by nature (the guest writes it too).
#[allow(clippy::mut_from_ref)]
fn guest_pages(mem: &GuestMem, addr: GuestAddress, len: usize) -> Option<&mut [u8]> {
    if !addr.0.is_multiple_of(BUFFER_ALIGN as u64) || !len.is_multiple_of(BUFFER_ALIGN) || len == 0
    {
        return None;
    }
    use vm_memory::GuestMemoryBackend;
    let slice = mem.get_slice(addr, len).ok()?;
    let ptr = slice.ptr_guard_mut().as_ptr();
    // SAFETY: get_slice checked that [addr, addr + len) lies inside one mapped region of
    // guest memory, which lives as long as `mem`. Nothing in the VMM holds a reference into
    // these pages; the guest may touch them concurrently, as with any DMA.
    Some(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

impl Worker {
    /// Runs one request; returns the virtio status and the bytes written to the guest.
    fn execute(&mut self, req: &Request) -> (u8, u32) {
        let total: u64 = req.data.iter().map(|(_, len)| u64::from(*len)).sum();
        let io_err = (VIRTIO_BLK_S_IOERR as u8, 0);
        match req.kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                if total > MAX_REQUEST_BYTES || !total.is_multiple_of(SECTOR_SIZE) {
                    return io_err;
                }
                let Some(start) = req.sector.checked_mul(SECTOR_SIZE) else {
                    return io_err;
                };
                if start
                    .checked_add(total)
                    .is_none_or(|end| end > self.capacity)
                {
                    return io_err;
                }
                if req.kind == VIRTIO_BLK_T_OUT && self.opts.read_only {
                    return io_err;
                }
                if let [(addr, len)] = req.data[..] {
                    if let Some(pages) = guest_pages(&self.mem, addr, len as usize) {
                        let result = if req.kind == VIRTIO_BLK_T_IN {
                            self.backend.read_at(pages, start).map(|()| total as u32)
                        } else {
                            self.backend.write_at(pages, start).map(|()| 0)
                        };
                        return match result {
                            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
                            Err(_) => io_err,
                        };
                    }
                }
                let buf = self.buf.get(total as usize);
                if req.kind == VIRTIO_BLK_T_IN {
                    if self.backend.read_at(buf, start).is_err() {
                        return io_err;
                    }
                    let mut off = 0usize;
                    for (addr, len) in &req.data {
                        let len = *len as usize;
                        if self.mem.write_slice(&buf[off..off + len], *addr).is_err() {
                            return io_err;
                        }
                        off += len;
                    }
                    (VIRTIO_BLK_S_OK as u8, total as u32)
                } else {
                    let mut off = 0usize;
                    for (addr, len) in &req.data {
                        let len = *len as usize;
                        if self
                            .mem
                            .read_slice(&mut buf[off..off + len], *addr)
                            .is_err()
                        {
                            return io_err;
                        }
                        off += len;
                    }
                    match self.backend.write_at(buf, start) {
                        Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                        Err(_) => io_err,
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.backend.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                Err(_) => io_err,
            },
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; SERIAL_LEN];
                let serial = self.opts.serial.as_bytes();
                let n = serial.len().min(SERIAL_LEN);
                id[..n].copy_from_slice(&serial[..n]);
                let Some((addr, len)) = req.data.first() else {
                    return io_err;
                };
                let n = (*len as usize).min(SERIAL_LEN);
                match self.mem.write_slice(&id[..n], *addr) {
                    Ok(()) => (VIRTIO_BLK_S_OK as u8, n as u32),
                    Err(_) => io_err,
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.opts.read_only {
                    return io_err;
                }
                self.discard_or_zero(req)
            }
            _ => (VIRTIO_BLK_S_UNSUPP as u8, 0),
        }
    }

    fn discard_or_zero(&mut self, req: &Request) -> (u8, u32) {
        let io_err = (VIRTIO_BLK_S_IOERR as u8, 0);
        let mut segments = Vec::new();
        for (addr, len) in &req.data {
            if len % 16 != 0 {
                return io_err;
            }
            for i in 0..u64::from(len / 16) {
                let seg = addr.unchecked_add(i * 16);
                let (Ok(sector), Ok(num), Ok(flags)) = (
                    self.mem.read_obj::<u64>(seg),
                    self.mem.read_obj::<u32>(seg.unchecked_add(8)),
                    self.mem.read_obj::<u32>(seg.unchecked_add(12)),
                ) else {
                    return io_err;
                };
                segments.push((sector, num, flags));
            }
        }
        if segments.is_empty() || segments.len() > MAX_DISCARD_SEGMENTS as usize {
            return io_err;
        }
        for (sector, num, flags) in segments {
            let (Some(start), len) = (
                sector.checked_mul(SECTOR_SIZE),
                u64::from(num) * SECTOR_SIZE,
            ) else {
                return io_err;
            };
            if start.checked_add(len).is_none_or(|end| end > self.capacity) {
                return io_err;
            }
            let result = if req.kind == VIRTIO_BLK_T_DISCARD {
                self.backend.discard(start, len)
            } else {
                self.backend.write_zeroes(
                    start,
                    len,
                    flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                )
            };
            if result.is_err() {
                return io_err;
            }
        }
        (VIRTIO_BLK_S_OK as u8, 0)
    }
}

/// The I/O threads of one disk. One of them at a time (the leader) waits for the guest's
/// notification; when it comes, it takes every new request off the queue, leaves all but
/// the first to idle workers and runs the first itself, so a lone request goes from the
/// notification to the disk without another thread hand-off, and several run in parallel.
struct Pool {
    queue: Arc<Mutex<Queue>>,
    mem: GuestMem,
    interrupt: Arc<dyn VirtioInterrupt>,
    index: u16,
    kick: EventFd,
    state: Mutex<PoolState>,
    changed: Condvar,
}

#[derive(Default)]
struct PoolState {
    pending: std::collections::VecDeque<DescriptorChain<GuestMem>>,
    leader: bool,
    stop: bool,
    alive: usize,
    /// Requests taken off the ring and not yet completed, plus a leader popping.
    busy: usize,
    /// While set, nobody takes new requests off the ring (a snapshot is being taken).
    frozen: bool,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks until the guest notifies the queue (or a reset wakes us).
    fn wait_for_kick(&self) {
        let mut pfd = libc::pollfd {
            fd: self.kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one descriptor we own, with a valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, -1) };
        let _ = self.kick.read();
    }

    /// Waits until every request taken off the ring has completed, and keeps new
    /// ones on the ring until `thaw`.
    fn freeze(&self) {
        let mut st = self.lock();
        st.frozen = true;
        while st.busy > 0 || !st.pending.is_empty() {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn thaw(&self) {
        let mut st = self.lock();
        st.frozen = false;
        self.changed.notify_all();
        drop(st);
        // Whatever the guest queued meanwhile is looked at now.
        let _ = self.kick.write(1);
    }

    /// Stops every worker and waits until none is left (no request is then in flight).
    fn shut_down(&self) {
        let mut st = self.lock();
        st.stop = true;
        self.changed.notify_all();
        let _ = self.kick.write(1);
        while st.alive > 0 {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn run_worker(pool: Arc<Pool>, mut worker: Worker) {
    loop {
        let next = {
            let mut st = pool.lock();
            loop {
                if st.stop {
                    st.alive -= 1;
                    pool.changed.notify_all();
                    return;
                }
                if let Some(chain) = st.pending.pop_front() {
                    st.busy += 1;
                    break Some(chain);
                }
                if !st.leader {
                    st.leader = true;
                    break None;
                }
                st = pool.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        let chain = match next {
            Some(chain) => chain,
            None => {
                pool.wait_for_kick();
                {
                    let mut st = pool.lock();
                    while st.frozen && !st.stop {
                        st = pool.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                    st.busy += 1;
                }
                let chains = queue::pop_all(&pool.queue, &pool.mem, &pool.interrupt);
                let mut st = pool.lock();
                st.leader = false;
                let mut chains = chains.into_iter();
                let first = chains.next();
                if first.is_none() {
                    st.busy -= 1;
                    pool.changed.notify_all();
                }
                st.pending.extend(chains);
                // One follower takes over waiting, one more per extra request: waking
                // them all would only make them fight over two CPUs.
                for _ in 0..=st.pending.len() {
                    pool.changed.notify_one();
                }
                drop(st);
                match first {
                    Some(chain) => chain,
                    None => continue,
                }
            }
        };
        worker.run(chain, &pool);
        let mut st = pool.lock();
        st.busy -= 1;
        if st.busy == 0 {
            pool.changed.notify_all();
        }
    }
}

impl Worker {
    /// Parses, executes and completes one request.
    fn run(&mut self, mut chain: DescriptorChain<GuestMem>, pool: &Pool) {
        let head = chain.head_index();
        let mem = self.mem.clone();
        let used_len = match parse(&mut chain, &mem) {
            Ok(req) => {
                let (status, written) = self.execute(&req);
                if mem.write_obj(status, req.status).is_ok() {
                    written + 1
                } else {
                    0
                }
            }
            Err(why) => {
                log::debug!("virtio-blk: bad request: {why}");
                0
            }
        };
        queue::complete(
            &pool.queue,
            &mem,
            &pool.interrupt,
            pool.index,
            head,
            used_len,
        );
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if self.opts.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), String> {
        let dq = ctx
            .queues
            .into_iter()
            .next()
            .ok_or("the driver enabled no request queue")?;
        let pool = Arc::new(Pool {
            queue: dq.queue,
            mem: ctx.mem.clone(),
            interrupt: ctx.interrupt,
            index: dq.index,
            kick: dq.kick,
            state: Mutex::new(PoolState {
                alive: WORKERS,
                ..Default::default()
            }),
            changed: Condvar::new(),
        });
        for i in 0..WORKERS {
            let worker = Worker {
                backend: self.backend.clone(),
                opts: self.opts.clone(),
                capacity: self.capacity_sectors() * SECTOR_SIZE,
                mem: ctx.mem.clone(),
                buf: AlignedBuf::new(),
            };
            let p = pool.clone();
            if let Err(e) = std::thread::Builder::new()
                .name(format!("blk-io{i}"))
                .stack_size(256 << 10)
                .spawn(move || {
                    crate::seccomp::apply(crate::seccomp::ThreadKind::BlockIo);
                    run_worker(p, worker)
                })
            {
                // Threads already started see `stop`; those never started are not counted.
                pool.lock().alive -= WORKERS - i;
                pool.shut_down();
                return Err(format!("cannot start I/O worker: {e}"));
            }
        }
        self.active = Some(pool);
        Ok(())
    }

    fn reset(&mut self) {
        // The guest may reuse the rings after reset: requests in flight finish first.
        if let Some(pool) = self.active.take() {
            pool.shut_down();
        }
    }

    fn pause_io(&mut self) {
        if let Some(pool) = &self.active {
            pool.freeze();
        }
    }

    fn resume_io(&mut self) {
        if let Some(pool) = &self.active {
            pool.thaw();
        }
    }

    fn save_state(&self) -> serde_json::Value {
        super::save_persist(self)
    }
    fn restore_state(&mut self, state: serde_json::Value) -> Result<(), String> {
        super::restore_persist(self, state)
    }
}

/// What the guest was told about the disk. Requests are never saved half done:
/// the snapshot waits for those in flight (`pause_io`), so their data is on the
/// image and their completions are in the used ring in guest memory.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub serial: String,
}

impl crate::persist::Persist for Block {
    type State = BlockState;
    fn save(&self) -> BlockState {
        BlockState {
            capacity_sectors: self.capacity_sectors(),
            read_only: self.opts.read_only,
            serial: self.opts.serial.clone(),
        }
    }
    /// The image reopened for the restore (perhaps another overlay) must look the same to the guest.
    fn restore(&mut self, s: BlockState) -> Result<(), String> {
        if s.capacity_sectors != self.capacity_sectors() {
            return Err(format!(
                "virtio-blk: the guest saw {} sectors but the disk now has {}",
                s.capacity_sectors,
                self.capacity_sectors()
            ));
        }
        if s.read_only != self.opts.read_only {
            return Err(
                "virtio-blk: the disk's read-only setting differs from the snapshot's".into(),
            );
        }
        self.opts.serial = s.serial;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Persist;

    fn disk(dir: &std::path::Path, name: &str, bytes: u64) -> Block {
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        let backend = ferrovirt_disk::open(
            &path,
            &ferrovirt_disk::OpenOptions {
                format: None,
                read_only: false,
                direct: false,
            },
        )
        .unwrap();
        Block::new(
            backend,
            BlockOptions {
                read_only: false,
                serial: name.into(),
            },
        )
    }

    #[test]
    fn state_round_trips_and_a_resized_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = disk(dir.path(), "a", 1 << 20);
        let mut b = disk(dir.path(), "b", 1 << 20);
        crate::persist::testing::assert_round_trip(&a, &mut b);
        assert_eq!(b.opts.serial, "a");
        let mut c = disk(dir.path(), "c", 2 << 20);
        assert!(c.restore(a.save()).unwrap_err().contains("sectors"));
    }
}
