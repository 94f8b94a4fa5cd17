//! Save and restore with ferrovmm: its snapshot (`PUT /vm/snapshot` writes DIR/state and
//! DIR/memory of the paused VM) is the save file's payload, and `ferrovmm --restore DIR`
//! (a `RestoreConfig`) brings it back.
//!
//! The payload: "FERROVMM", the state's length and the memory's length (u64 LE each), the
//! state, zero padding to a 4 KiB boundary of the file, then guest memory with its zero pages
//! left as holes. The snapshot is written into a folder beside the save file (same file
//! system, so a full disk fails the save there) and removed once copied in; a restore unpacks
//! it into the VM's run folder, where ferrovmm maps the memory copy-on-write for as long as the
//! VM runs.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ferrovirt_api::{ApiError, ErrorCode};
use ferrovmm_api::control::{VmInfo, VmState};
use ferrovmm_api::launch::SerialMode;
use ferrovmm_api::{RestoreConfig, SnapshotRequest};

use super::{KvmDriver, EXIT_FILE};
use crate::driver::{Progress, Started, VmCtx, VmRef};
use crate::files;
use crate::save::sparse;

/// Where a restored VM's snapshot lives in its run folder.
pub(super) const RESTORE_DIR: &str = "restore";
const TAG: &[u8; 8] = b"FERROVMM";
const HEAD: u64 = 24;
const ALIGN: u64 = 4096;
/// ferrovmm's own limit on its state file is 64 MiB of payload; a little more for its header.
const MAX_STATE: u64 = (64 << 20) + 4096;
/// How long ferrovmm may take to accept the daemon's console connection.
const CONSOLE_ATTACH: std::time::Duration = std::time::Duration::from_secs(5);

fn driver_err(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::driver(format!("{what}: {e}"))
}

fn storage_err(what: &str, e: std::io::Error) -> ApiError {
    ApiError::new(ErrorCode::StorageError, format!("{what}: {e}"))
}

/// The folder of the file behind `out` (where the snapshot is staged); else the VM's folder.
/// A jailed VM sees only its run folder: its snapshot is staged there.
fn staging_dir(out: &File, vm_dir: &Path) -> PathBuf {
    if crate::jail::uid_of(vm_dir).is_some() {
        return vm_dir.join(format!(".ferrovirt-save-{}", std::process::id()));
    }
    let parent = fs::read_link(format!("/proc/self/fd/{}", out.as_raw_fd()))
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|p| p.is_dir());
    let base = parent.unwrap_or_else(|| vm_dir.to_path_buf());
    base.join(format!(".ferrovirt-save-{}", std::process::id()))
}

fn aligned(at: u64) -> u64 {
    at.div_ceil(ALIGN) * ALIGN
}

impl KvmDriver {
    /// Pause (if running), snapshot, copy into `out`; on failure the VM runs on as before.
    pub(super) fn save_to(
        &self,
        vm: &VmRef,
        out: &mut File,
        progress: Progress,
    ) -> Result<(), ApiError> {
        let info: VmInfo =
            serde_json::from_slice(&self.api(vm.vm_dir, "GET", "/vm", vm.deadline)?)
                .map_err(|e| driver_err("ferrovmm GET /vm", e))?;
        let was_running = info.state == VmState::Running;
        if was_running {
            self.api(vm.vm_dir, "PUT", "/vm/pause", vm.deadline)?;
        }
        let staging = staging_dir(out, vm.vm_dir);
        let result = self.snapshot_into(vm, &staging, out, progress);
        let _ = fs::remove_dir_all(&staging);
        if result.is_err() && was_running {
            if let Err(e) = self.api(vm.vm_dir, "PUT", "/vm/resume", vm.deadline) {
                eprintln!("ferrovirtd: the VM could not be resumed after a failed save: {e}");
            }
        }
        result
    }

    fn snapshot_into(
        &self,
        vm: &VmRef,
        staging: &Path,
        out: &mut File,
        progress: Progress,
    ) -> Result<(), ApiError> {
        let _ = fs::remove_dir_all(staging);
        files::private_dir(staging).map_err(ApiError::driver)?;
        if let Some(uid) = crate::jail::uid_of(vm.vm_dir) {
            std::os::unix::fs::chown(staging, Some(uid), Some(uid))
                .map_err(|e| driver_err("cannot give the staging folder to the VM", e))?;
        }
        let request = serde_json::to_vec(&SnapshotRequest {
            path: staging.to_path_buf(),
        })
        .map_err(|e| ApiError::internal(e.to_string()))?;
        self.api_with(
            vm.vm_dir,
            "PUT",
            "/vm/snapshot",
            Some(&request),
            vm.deadline,
        )?;
        let config = RestoreConfig::new(staging);
        let open = |p: PathBuf| {
            File::open(&p).map_err(|e| driver_err(&format!("snapshot {}", p.display()), e))
        };
        let mut state = open(config.state_file())?;
        let mut memory = open(config.memory_file())?;
        let len = |f: &File| f.metadata().map(|m| m.len());
        let (state_len, memory_len) = match (len(&state), len(&memory)) {
            (Ok(s), Ok(m)) => (s, m),
            (Err(e), _) | (_, Err(e)) => return Err(driver_err("snapshot", e)),
        };
        let write = |what: &str, e| storage_err(&format!("cannot write the save file ({what})"), e);
        let mut head = TAG.to_vec();
        head.extend_from_slice(&state_len.to_le_bytes());
        head.extend_from_slice(&memory_len.to_le_bytes());
        out.write_all(&head).map_err(|e| write("header", e))?;
        std::io::copy(&mut state, out).map_err(|e| write("device state", e))?;
        let at = out
            .stream_position()
            .map_err(|e| write("device state", e))?;
        out.write_all(&vec![0u8; (aligned(at) - at) as usize])
            .map_err(|e| write("padding", e))?;
        let total = Some(memory_len);
        sparse::copy(&mut memory, out, memory_len, &mut |done| {
            progress(done, total);
            vm.deadline
                .check()
                .map_err(|e| std::io::Error::other(e.message))
        })
        .map_err(|e| {
            if vm.deadline.expired() || vm.deadline.cancelled() {
                vm.deadline
                    .check()
                    .err()
                    .unwrap_or_else(|| write("memory", e))
            } else {
                write("memory", e)
            }
        })
    }

    /// Unpack the payload into the run folder and start `ferrovmm --restore`, paused.
    pub(super) fn restore_from(
        &self,
        ctx: VmCtx,
        input: &mut File,
        len: u64,
        progress: Progress,
    ) -> Result<Started, ApiError> {
        let dir = ctx.vm_dir.join(RESTORE_DIR);
        let _ = fs::remove_dir_all(&dir);
        files::private_dir(&dir).map_err(ApiError::driver)?;
        let config = self.restore_config(&ctx, &dir)?;
        unpack(input, len, &config, &ctx, progress)?;
        let argv = config
            .to_args()
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        let (vm_dir, deadline) = (ctx.vm_dir.clone(), ctx.deadline.clone());
        let started = self.spawn(ctx, argv, None)?;
        self.wait_console_attached(&vm_dir, &deadline);
        Ok(started)
    }

    /// ferrovmm accepts console clients on its own thread and drops output nobody is attached
    /// to: the restored guest resumes only once the daemon's console is counted, so nothing it
    /// prints after the point it was saved at is lost.
    fn wait_console_attached(&self, vm_dir: &Path, deadline: &crate::deadline::Deadline) {
        let attach = deadline.within(CONSOLE_ATTACH);
        while !attach.expired() {
            let attached = self
                .api(vm_dir, "GET", "/vm", &attach)
                .ok()
                .and_then(|b| serde_json::from_slice::<VmInfo>(&b).ok())
                .is_some_and(|i| i.console_clients > 0);
            if attached {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        eprintln!(
            "ferrovirtd: the console of the VM in {} was not attached in time; early output may be missing from its log",
            vm_dir.display()
        );
    }

    /// The restored VM gets the definition's disks and TAPs and this run folder's sockets.
    fn restore_config(&self, ctx: &VmCtx, dir: &Path) -> Result<RestoreConfig, ApiError> {
        let vm_dir = &ctx.vm_dir;
        let mut c = RestoreConfig::new(dir);
        c.name = Some(ctx.def.name.clone());
        c.api_socket = Some(vm_dir.join("api.sock"));
        c.serial = Some(SerialMode::Socket(vm_dir.join("serial.sock")));
        c.exit_file = Some(vm_dir.join(EXIT_FILE));
        c.disks = ctx
            .def
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| (i, d.path.clone()))
            .collect();
        c.taps = (0..ctx.def.interfaces.len())
            .map(|i| (i, crate::network::tap_name(ctx.def, i)))
            .collect();
        c.validate()
            .map_err(|e| ApiError::invalid(format!("ferrovmm cannot restore this domain: {e}")))?;
        Ok(c)
    }
}

/// Check the payload's layout against its length, then write DIR/state and DIR/memory.
fn unpack(
    input: &mut File,
    len: u64,
    config: &RestoreConfig,
    ctx: &VmCtx,
    progress: Progress,
) -> Result<(), ApiError> {
    let bad = |what: &str| {
        ApiError::new(
            ErrorCode::InvalidArgument,
            format!("the save file's ferrovmm state is damaged ({what})"),
        )
    };
    let read = |e: std::io::Error| storage_err("cannot read the save file", e);
    let start = input.stream_position().map_err(read)?;
    let mut head = [0u8; HEAD as usize];
    if len < HEAD {
        return Err(bad("too short"));
    }
    input.read_exact(&mut head).map_err(read)?;
    let field = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let (state_len, memory_len) = (field(8), field(16));
    let memory_at = start
        .checked_add(HEAD)
        .and_then(|x| x.checked_add(state_len))
        .map(aligned);
    if &head[..8] != TAG || state_len == 0 || state_len > MAX_STATE {
        return Err(bad("header"));
    }
    match memory_at.and_then(|m| m.checked_add(memory_len)) {
        Some(end) if end == start + len => {}
        _ => return Err(bad("lengths")),
    }
    let write = |what: &Path, e: std::io::Error| {
        storage_err(
            &format!("cannot unpack the snapshot to {}", what.display()),
            e,
        )
    };
    let create = |p: &Path| files::create_private(p).map_err(|e| write(p, e));
    let state_path = config.state_file();
    let mut state = create(&state_path)?;
    let copied =
        std::io::copy(&mut input.take(state_len), &mut state).map_err(|e| write(&state_path, e))?;
    if copied != state_len {
        return Err(bad("state"));
    }
    let memory_path = config.memory_file();
    let mut memory = create(&memory_path)?;
    input
        .seek(SeekFrom::Start(memory_at.unwrap_or_default()))
        .map_err(read)?;
    sparse::copy(input, &mut memory, memory_len, &mut |done| {
        progress(done, Some(memory_len));
        ctx.deadline
            .check()
            .map_err(|e| std::io::Error::other(e.message))
    })
    .map_err(|e| write(&memory_path, e))
}
