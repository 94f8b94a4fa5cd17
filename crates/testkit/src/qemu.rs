//! Boots a kernel under plain QEMU TCG (no KVM needed) and collects its serial console.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};
use crate::run_clock::RunClock;

/// QEMU's system emulator binary (override with `$FERROVIRT_QEMU`).
pub fn qemu_binary() -> PathBuf {
    std::env::var_os("FERROVIRT_QEMU")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// One QEMU TCG virtual machine: `-kernel` + `-initrd`, serial console on stdout.
#[derive(Debug, Clone)]
pub struct TcgVm {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    append: String,
    memory_mib: u32,
    smp: u32,
    cpu: String,
    extra_args: Vec<OsString>,
    timeout: Duration,
    /// Once this console marker appears, the run ends at most this long after it.
    timeout_after: Option<(String, Duration)>,
}

/// What a VM printed on its console and how it ended.
#[derive(Debug, Clone)]
pub struct ConsoleRun {
    /// Console text (serial output; `\r\n` turned into `\n`).
    pub console: String,
    /// QEMU's exit code (0 after the guest powers off or, with `-no-reboot`, reboots).
    pub qemu_status: Option<i32>,
    /// Wall time from starting QEMU until it exited.
    pub elapsed: Duration,
    /// For each watched marker, when it first appeared on the console (from QEMU's start).
    pub marks: Vec<(String, Option<Duration>)>,
}

impl ConsoleRun {
    /// When `marker` (one of the watched ones) first appeared.
    pub fn mark(&self, marker: &str) -> Option<Duration> {
        self.marks
            .iter()
            .find(|(m, _)| m == marker)
            .and_then(|(_, t)| *t)
    }
}

impl TcgVm {
    pub fn new(kernel: impl AsRef<Path>) -> Self {
        TcgVm {
            kernel: kernel.as_ref().to_path_buf(),
            initrd: None,
            // no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can
            // miss its ticks and panic ("IO-APIC + timer doesn't work!"); the timer is fine.
            append: "console=ttyS0 panic=-1 quiet no_timer_check".into(),
            memory_mib: 256,
            smp: 1,
            cpu: "max".into(),
            extra_args: Vec::new(),
            timeout: Duration::from_secs(120),
            timeout_after: None,
        }
    }

    pub fn initrd(mut self, initrd: impl AsRef<Path>) -> Self {
        self.initrd = Some(initrd.as_ref().to_path_buf());
        self
    }

    /// The kernel command line (default `console=ttyS0 panic=-1 quiet no_timer_check`).
    pub fn append(mut self, cmdline: &str) -> Self {
        self.append = cmdline.to_owned();
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus;
        self
    }

    /// The `-cpu` model (default `max`).
    pub fn cpu(mut self, model: &str) -> Self {
        self.cpu = model.to_owned();
        self
    }

    /// Extra QEMU arguments (devices, drives, netdevs ...).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// How long the guest may run before QEMU is killed (default 120 s), counted as
    /// [`RunClock`] does: time spent waiting for a host CPU does not count.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A limit counted from a console marker instead of from the start: once `marker` appears,
    /// QEMU is killed `limit` of run time later (as for `timeout`) if it has not exited. For a
    /// run that is expected to time out, this keeps the test quick on an idle host without
    /// failing on a loaded one (where the boot up to the marker may take many times longer).
    pub fn timeout_after(mut self, marker: &str, limit: Duration) -> Self {
        self.timeout_after = Some((marker.to_owned(), limit));
        self
    }

    /// Runs the VM until QEMU exits; `watch` lists console markers to time.
    /// A timeout kills QEMU and returns an error carrying the console text so far.
    pub fn run(&self, watch: &[&str]) -> Result<ConsoleRun> {
        for (what, path) in [
            ("kernel", Some(&self.kernel)),
            ("initrd", self.initrd.as_ref()),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    return Err(Error::new(format!(
                        "{what} {} does not exist",
                        path.display()
                    )));
                }
            }
        }
        let mut cmd = Command::new(qemu_binary());
        cmd.args(["-accel", "tcg", "-cpu", &self.cpu])
            .args([
                "-m",
                &self.memory_mib.to_string(),
                "-smp",
                &self.smp.to_string(),
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-serial", "stdio", "-monitor", "none"])
            .arg("-kernel")
            .arg(&self.kernel)
            .args(["-append", &self.append]);
        if let Some(initrd) = &self.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        cmd.args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and only calls prctl,
        // which is async-signal-safe. It makes QEMU die with the test process (e.g. on
        // Ctrl-C) instead of burning a shared CPU until its guest gives up.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }

        let start = Instant::now();
        let mut child = cmd.spawn().context(|| {
            format!(
                "cannot start {} (Debian: apt-get install qemu-system-x86)",
                qemu_binary().display()
            )
        })?;
        let mut watched: Vec<&str> = watch.to_vec();
        if let Some((marker, _)) = &self.timeout_after {
            watched.push(marker);
        }
        let console = Arc::new(Mutex::new(ConsoleState::new(&watched)));
        let stdout_reader = spawn_console_reader(&mut child, Arc::clone(&console), start);
        let stderr_reader = spawn_stderr_reader(&mut child);

        // Limits count the time QEMU was not waiting for a CPU (see run_clock): a guest
        // that is only slow on a loaded host is not killed, one that hangs still is.
        let mut clock = RunClock::new(child.id());
        let after = self
            .timeout_after
            .as_ref()
            .map(|(marker, limit)| (marker.as_str(), *limit));
        let mut marker_seen_at: Option<Duration> = None;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) => {
                    let ran = clock.elapsed();
                    if let Some((marker, _)) = after {
                        if marker_seen_at.is_none() && lock(&console).seen(marker) {
                            marker_seen_at = Some(ran);
                        }
                    }
                    let past_marker_limit = match (after, marker_seen_at) {
                        (Some((_, limit)), Some(at)) => ran >= at + limit,
                        _ => false,
                    };
                    if ran >= self.timeout || past_marker_limit {
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::new(format!("waiting for QEMU failed: {e}")));
                }
            }
        };
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let elapsed = start.elapsed();
        let _ = stdout_reader.join();
        let stderr = stderr_reader.join().unwrap_or_default();
        let state = std::mem::replace(&mut *lock(&console), ConsoleState::new(&[]));
        let text = state.text();
        match status {
            None => Err(Error::new(format!(
                "QEMU guest timed out after {:?} of run time ({elapsed:?} wall clock, of which {:?} waiting for a CPU) and was killed; console so far:\n{text}\nQEMU stderr:\n{}",
                elapsed.saturating_sub(clock.starved()),
                clock.starved(),
                stderr.trim()
            ))),
            Some(status) if !status.success() => Err(Error::new(format!(
                "QEMU failed ({status}): {}\nconsole:\n{text}",
                stderr.trim()
            ))),
            Some(status) => Ok(ConsoleRun {
                console: text,
                qemu_status: status.code(),
                elapsed,
                marks: state.marks,
            }),
        }
    }
}

/// Boots `kernel` with `initrd` under QEMU TCG and returns the console text once the
/// guest powers off (the init must end with `poweroff -f`).
pub fn qemu_tcg_boot(kernel: &Path, initrd: &Path, timeout: Duration) -> Result<String> {
    Ok(TcgVm::new(kernel)
        .initrd(initrd)
        .timeout(timeout)
        .run(&[])?
        .console)
}

struct ConsoleState {
    bytes: Vec<u8>,
    marks: Vec<(String, Option<Duration>)>,
}

impl ConsoleState {
    fn new(watch: &[&str]) -> Self {
        ConsoleState {
            bytes: Vec::new(),
            marks: watch.iter().map(|m| ((*m).to_owned(), None)).collect(),
        }
    }

    fn push(&mut self, chunk: &[u8], now: Duration) {
        // Only the tail can complete a marker that was not there before.
        let longest = self.marks.iter().map(|(m, _)| m.len()).max().unwrap_or(0);
        let from = self.bytes.len().saturating_sub(longest);
        self.bytes.extend_from_slice(chunk);
        for (marker, seen) in &mut self.marks {
            if seen.is_none() && contains(&self.bytes[from..], marker.as_bytes()) {
                *seen = Some(now);
            }
        }
    }

    fn seen(&self, marker: &str) -> bool {
        self.marks.iter().any(|(m, t)| m == marker && t.is_some())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).replace("\r\n", "\n")
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn lock(state: &Mutex<ConsoleState>) -> std::sync::MutexGuard<'_, ConsoleState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn spawn_console_reader(
    child: &mut Child,
    state: Arc<Mutex<ConsoleState>>,
    start: Instant,
) -> JoinHandle<()> {
    let mut stdout = child.stdout.take();
    std::thread::spawn(move || {
        let Some(stdout) = stdout.as_mut() else {
            return;
        };
        let mut buf = [0u8; 16384];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            lock(&state).push(&buf[..n], start.elapsed());
        }
    })
}

fn spawn_stderr_reader(child: &mut Child) -> JoinHandle<String> {
    let mut stderr = child.stderr.take();
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(stderr) = stderr.as_mut() {
            let mut bytes = Vec::new();
            let _ = stderr.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_timed_across_chunk_boundaries() {
        let mut state = ConsoleState::new(&["@@MARK@@"]);
        state.push(b"boot...@@MA", Duration::from_millis(1));
        assert_eq!(state.marks[0].1, None);
        state.push(b"RK@@\r\nrest", Duration::from_millis(2));
        assert_eq!(state.marks[0].1, Some(Duration::from_millis(2)));
        assert_eq!(state.text(), "boot...@@MARK@@\nrest");
    }
}
