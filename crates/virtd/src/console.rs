//! Serial console hub: reads a VM's serial socket, keeps a capped log file, and fans the output
//! out to attached clients; their keystrokes go back to the guest.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;

use ferrovirt_api::http::Stream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Each log file is capped; on overflow it moves to NAME.log.1 (so at most twice this on disk).
pub const LOG_CAP: u64 = 1024 * 1024;
/// How much of the log a client attaching with replay gets first.
const REPLAY_BYTES: u64 = 64 * 1024;

pub struct ConsoleHub {
    log_path: PathBuf,
    clients: Mutex<Vec<Box<dyn Stream>>>,
    vm: Mutex<Option<UnixStream>>,
}

struct CappedLog {
    path: PathBuf,
    file: Option<File>,
    size: u64,
}

impl CappedLog {
    fn open(path: &Path) -> Self {
        let file = crate::files::append_private(path).ok();
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.len())
            .unwrap_or(0);
        CappedLog {
            path: path.to_path_buf(),
            file,
            size,
        }
    }

    fn write(&mut self, data: &[u8]) {
        if self.size + data.len() as u64 > LOG_CAP {
            let _ = fs::rename(&self.path, rotated(&self.path));
            self.file = crate::files::append_private(&self.path).ok();
            self.size = 0;
        }
        if let Some(f) = &mut self.file {
            if f.write_all(data).is_ok() {
                self.size += data.len() as u64;
            }
        }
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// Start a new log for a fresh boot: the previous boot's log becomes NAME.log.1.
pub fn rotate_for_boot(log: &Path) {
    if log.exists() {
        let _ = fs::rename(log, rotated(log));
    }
}

impl ConsoleHub {
    /// Connect to the VM's serial socket (retrying while the VMM creates it) and start pumping.
    /// `on_eof` runs once when the VM side closes (the VM process ended).
    pub fn start(
        serial_socket: &Path,
        log_path: PathBuf,
        on_eof: Box<dyn FnOnce() + Send>,
    ) -> Result<Arc<ConsoleHub>, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(serial_socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "cannot connect to serial socket {}: {e}",
                        serial_socket.display()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let reader = stream.try_clone().map_err(|e| e.to_string())?;
        let hub = Arc::new(ConsoleHub {
            log_path,
            clients: Mutex::new(Vec::new()),
            vm: Mutex::new(Some(stream)),
        });
        let pump = hub.clone();
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                pump.pump(reader);
                on_eof();
            })
            .map_err(|e| e.to_string())?;
        Ok(hub)
    }

    fn pump(&self, mut vm: UnixStream) {
        let mut log = CappedLog::open(&self.log_path);
        let mut buf = [0u8; 4096];
        loop {
            let n = match vm.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            log.write(&buf[..n]);
            if let Ok(mut clients) = self.clients.lock() {
                clients.retain_mut(|c| c.write_all(&buf[..n]).is_ok());
            }
        }
        if let Ok(mut vm) = self.vm.lock() {
            *vm = None;
        }
        // Tell attached clients the VM is gone by closing their streams.
        if let Ok(mut clients) = self.clients.lock() {
            for c in clients.drain(..) {
                c.shutdown_both();
            }
        }
    }

    /// Attach a client: optionally replay the recent log, then stream live both ways until it leaves.
    pub fn attach(self: &Arc<Self>, mut client: Box<dyn Stream>, replay: bool) {
        // A stuck client must not stall the guest's console for everyone.
        let _ = client.set_timeouts(None, Some(Duration::from_secs(2)));
        if replay {
            if let Ok(mut f) = File::open(&self.log_path) {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = f.seek(SeekFrom::Start(len.saturating_sub(REPLAY_BYTES)));
                let mut tail = Vec::new();
                let _ = f.read_to_end(&mut tail);
                let _ = client.write_all(&tail);
            }
        }
        let Ok(mut input) = client.try_clone_stream() else {
            return;
        };
        if let Ok(mut clients) = self.clients.lock() {
            clients.push(client);
        }
        let hub = self.clone();
        let _ = std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || {
                let mut buf = [0u8; 1024];
                loop {
                    let n = match input.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let ok = match hub.vm.lock() {
                        Ok(mut vm) => vm.as_mut().is_some_and(|s| s.write_all(&buf[..n]).is_ok()),
                        Err(_) => false,
                    };
                    if !ok {
                        break;
                    }
                }
                input.shutdown_both();
            });
    }

    pub fn is_connected(&self) -> bool {
        self.vm.lock().map(|v| v.is_some()).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_is_capped_and_rotated() {
        let dir = std::env::temp_dir().join(format!("fv-caplog-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.log");
        let mut log = CappedLog::open(&path);
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..40 {
            log.write(&chunk);
        }
        // 40 writes of 64 KiB with a 1 MiB cap: files of 16, 16 and 8 writes; the oldest is gone.
        assert_eq!(fs::metadata(&path).unwrap().len(), 8 * 64 * 1024);
        assert_eq!(fs::metadata(rotated(&path)).unwrap().len(), LOG_CAP);
        rotate_for_boot(&path);
        assert!(!path.exists() && rotated(&path).exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
