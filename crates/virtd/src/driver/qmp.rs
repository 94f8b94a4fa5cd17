//! A small QMP (QEMU Machine Protocol) client: line-delimited JSON over a Unix socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connect (retrying up to `wait` while QEMU creates the socket) and negotiate capabilities.
    pub fn connect(path: &Path, wait: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("QMP socket {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_value()?.ok_or("QMP closed before its greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting {greeting}"));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_value(&mut self) -> Result<Option<Value>, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| format!("bad QMP line: {e}")),
            Err(e) => Err(format!("QMP read: {e}")),
        }
    }

    /// Run a command and return its "return" value; events arriving meanwhile are skipped.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let v = self
                .read_value()?
                .ok_or_else(|| format!("QMP closed during '{command}'"))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(err) = v.get("error") {
                return Err(format!(
                    "QMP '{command}': {}",
                    err.get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error")
                ));
            }
        }
    }

    /// Block until the next event; None when QEMU closed the socket (it exited).
    pub fn next_event(&mut self) -> Option<Value> {
        let _ = self.reader.get_ref().set_read_timeout(None);
        loop {
            match self.read_value() {
                Ok(Some(v)) if v.get("event").is_some() => return Some(v),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    }
}
