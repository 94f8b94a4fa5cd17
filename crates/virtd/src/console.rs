//! Serial console hub: reads a VM's serial socket, keeps a capped log file, and fans the output
//! out to attached clients; their keystrokes go back to the guest. The hub's threads do the
//! blocking socket I/O; clients (HTTP upgrades, WebSockets) talk to it through bounded channels.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

/// Each log file is capped; on overflow it moves to NAME.log.1 (so at most twice this on disk).
pub const LOG_CAP: u64 = 1024 * 1024;
/// How much of the log a client attaching with replay gets first.
const REPLAY_BYTES: u64 = 64 * 1024;
/// Output chunks (<= 4 KiB each) queued per client; a client this far behind is dropped, so a
/// stuck client never stalls the guest's console for everyone.
const CLIENT_QUEUE: usize = 64;
/// Keystroke chunks queued towards the guest.
const INPUT_QUEUE: usize = 64;

pub struct ConsoleHub {
    log_path: PathBuf,
    clients: Mutex<Vec<mpsc::Sender<Bytes>>>,
    /// Towards the guest; None once the VM side closed.
    input: Mutex<Option<mpsc::Sender<Bytes>>>,
}

/// One attached client's ends: the replayed log tail, then the live output; and the input.
pub struct Attached {
    pub replay: Vec<u8>,
    pub output: mpsc::Receiver<Bytes>,
    pub input: mpsc::Sender<Bytes>,
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
        let (input, keys) = mpsc::channel(INPUT_QUEUE);
        let hub = Arc::new(ConsoleHub {
            log_path,
            clients: Mutex::new(Vec::new()),
            input: Mutex::new(Some(input)),
        });
        std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || type_keys(stream, keys))
            .map_err(|e| e.to_string())?;
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
                if !clients.is_empty() {
                    let chunk = Bytes::copy_from_slice(&buf[..n]);
                    clients.retain(|c| c.try_send(chunk.clone()).is_ok());
                }
            }
        }
        if let Ok(mut input) = self.input.lock() {
            *input = None;
        }
        // Dropping their senders tells attached clients the VM is gone: their streams close.
        if let Ok(mut clients) = self.clients.lock() {
            clients.clear();
        }
    }

    /// Attach a client: optionally the recent log first, then live output both ways until it
    /// leaves (drops its ends) or the VM's console closes (its output ends).
    pub fn attach(&self, replay: bool) -> Result<Attached, String> {
        let input = self
            .input
            .lock()
            .ok()
            .and_then(|i| i.clone())
            .ok_or("the VM's console is closed")?;
        let mut tail = Vec::new();
        if replay {
            if let Ok(mut f) = File::open(&self.log_path) {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = f.seek(SeekFrom::Start(len.saturating_sub(REPLAY_BYTES)));
                let _ = f.take(REPLAY_BYTES).read_to_end(&mut tail);
            }
        }
        let (tx, output) = mpsc::channel(CLIENT_QUEUE);
        if let Ok(mut clients) = self.clients.lock() {
            clients.push(tx);
        }
        Ok(Attached {
            replay: tail,
            output,
            input,
        })
    }

    pub fn is_connected(&self) -> bool {
        self.input.lock().map(|v| v.is_some()).unwrap_or(false)
    }
}

/// Write the clients' keystrokes to the guest, until the VM side or every client is gone.
fn type_keys(mut vm: UnixStream, mut keys: mpsc::Receiver<Bytes>) {
    while let Some(chunk) = keys.blocking_recv() {
        if vm.write_all(&chunk).is_err() {
            break;
        }
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
