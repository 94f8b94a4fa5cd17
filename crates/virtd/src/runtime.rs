//! Runtime facts about an active VM (persisted so a restarted daemon can reattach) and process helpers.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What the daemon remembers about a running VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Runtime {
    /// virsh-style domain id.
    pub id: u32,
    /// VM process (qemu / ferrovmm); None for the test driver.
    pub pid: Option<u32>,
    /// VNC TCP port (qemu driver with graphics).
    pub vnc_port: Option<u16>,
    /// The address VNC really listens on, as QEMU reports it (absent: 127.0.0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc_listen: Option<String>,
    /// The engine that runs the VM (absent in rows stored before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<ferrovirt_api::engine::Engine>,
}

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// The guest powered off.
    Poweroff,
    /// The guest rebooted (reset).
    Reboot,
    /// The VM process died or the guest panicked.
    Crash,
    /// Stopped by destroy.
    Destroyed,
}

/// Paths the daemon uses.
#[derive(Debug, Clone)]
pub struct Paths {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub socket: PathBuf,
}

impl Paths {
    pub fn db(&self) -> PathBuf {
        self.state_dir.join("ferrovirt.db")
    }
    pub fn images(&self) -> PathBuf {
        self.state_dir.join("images")
    }
    pub fn logs(&self) -> PathBuf {
        self.state_dir.join("logs")
    }
    pub fn console_log(&self, name: &str) -> PathBuf {
        self.logs().join(format!("{name}.log"))
    }
    /// Managed saves (`managedsave`): one file per domain.
    pub fn saves(&self) -> PathBuf {
        self.state_dir.join("save")
    }
    pub fn managed_save(&self, name: &str) -> PathBuf {
        self.saves().join(format!("{name}.save"))
    }
    /// Per-VM runtime folder: sockets and pidfile.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.run_dir.join("vms").join(name)
    }
}

/// True when the process exists and is not a zombie (orphans are reaped late on these hosts).
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => !status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z')),
        Err(_) => false,
    }
}

/// True when the process is stopped (SIGSTOP, `State: T`): it cannot answer a polite request,
/// so a destroy goes straight to SIGKILL.
pub fn pid_stopped(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|status| {
            status
                .lines()
                .any(|l| l.starts_with("State:") && l.contains('T'))
        })
        .unwrap_or(false)
}

/// True when the live process's command line contains `needle` as one argument.
pub fn pid_has_arg(pid: u32, needle: &str) -> bool {
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => cmd
            .split(|b| *b == 0)
            .any(|a| a == needle.as_bytes() || contains(a, needle.as_bytes())),
        Err(_) => false,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Wait until the process is gone (or a zombie); false on timeout.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !pid_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    !pid_alive(pid)
}

/// The last resort of every driver's destroy: SIGKILL and wait up to 5 s for `what` to go.
pub fn kill_and_wait(pid: u32, what: &str) -> Result<(), ferrovirt_api::ApiError> {
    kill(pid, libc::SIGKILL);
    if wait_gone(pid, Duration::from_secs(5)) {
        Ok(())
    } else {
        Err(ferrovirt_api::ApiError::driver(format!(
            "{what} process {pid} does not exit"
        )))
    }
}

pub fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory effects; a stale pid at worst gets ESRCH.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Random UUID (version 4).
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Random locally administered MAC in QEMU's 52:54:00 range.
pub fn new_mac() -> String {
    let u = new_uuid();
    format!("52:54:00:{}:{}:{}", &u[0..2], &u[2..4], &u[4..6])
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
