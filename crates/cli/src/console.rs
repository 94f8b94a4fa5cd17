//! Interactive serial console: raw terminal, Ctrl-] detaches (as in virsh).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferrovirt_api::client::{Client, ClientError};

const ESCAPE: u8 = 0x1d; // Ctrl-]

/// Puts the terminal in raw mode while alive (only when stdin is a terminal).
struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    fn enter() -> Self {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a properly sized termios struct.
        unsafe {
            if libc::isatty(0) != 1 {
                return RawTerminal { saved: None };
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return RawTerminal { saved: None };
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
            RawTerminal { saved: Some(saved) }
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: restores the attributes saved in enter() on the same fd.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, saved);
            }
        }
    }
}

/// Attach to NAME's console until Ctrl-] or until the VM's console closes.
pub fn attach(client: &Client, name: &str, replay: bool) -> Result<(), ClientError> {
    let mut conn = client.console(name, replay)?;
    eprintln!("Connected to domain '{name}'\r\nEscape character is ^] (Ctrl + ])\r");
    let raw = RawTerminal::enter();
    let detached = Arc::new(AtomicBool::new(false));
    let sock = conn.writer();
    let flag = detached.clone();
    std::thread::spawn(move || {
        let mut sock = sock;
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return, // stdin closed: keep showing output
                Ok(n) => n,
            };
            let data = &buf[..n];
            if let Some(pos) = data.iter().position(|b| *b == ESCAPE) {
                let _ = sock.write_all(&data[..pos]);
                flag.store(true, Ordering::SeqCst);
                // The daemon ends the console when our input ends: the read below sees EOF.
                sock.close();
                return;
            }
            if sock.write_all(data).is_err() {
                return;
            }
        }
    });
    let mut stdout = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stdout
            .write_all(&buf[..n])
            .and_then(|_| stdout.flush())
            .is_err()
        {
            break;
        }
    }
    drop(raw);
    if !detached.load(Ordering::SeqCst) {
        eprintln!("\nconsole of domain '{name}' closed (the VM stopped)");
    } else {
        eprintln!();
    }
    Ok(())
}
