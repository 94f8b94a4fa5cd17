//! Test-only write journal: with FERROVIRT_DISK_JOURNAL set, every change that reaches an image
//! file (write, length change, hole punch, zeroing, preallocation) and every fdatasync is appended
//! to that file, in order. A crash test replays it onto a copy of the starting image to model a
//! power loss: what reached the disk before the last sync survives, what came after may be lost.
//! (Killing a process cannot show a missing sync: the page cache keeps its writes.)

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// Environment variable naming the journal file (appended to; never set in production).
pub const JOURNAL_ENV: &str = "FERROVIRT_DISK_JOURNAL";

/// One recorded change or sync of an image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    SetLen {
        len: u64,
    },
    /// A range that reads as zeros afterwards (punched or zeroed).
    Zero {
        offset: u64,
        len: u64,
    },
    /// Blocks reserved (fallocate mode 0): extends the file, data unchanged.
    Allocate {
        offset: u64,
        len: u64,
    },
    Sync,
}

fn journal() -> Option<&'static Mutex<File>> {
    static JOURNAL: OnceLock<Option<Mutex<File>>> = OnceLock::new();
    JOURNAL
        .get_or_init(|| {
            let path = std::env::var_os(JOURNAL_ENV)?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()?;
            Some(Mutex::new(file))
        })
        .as_ref()
}

/// Appends one event for `path` (a no-op unless the journal is on). One write(2) per record,
/// so a record survives an abort of the process that follows it.
pub(crate) fn record(path: &Path, event: &Event) {
    let Some(j) = journal() else {
        return;
    };
    let path = path.as_os_str().as_encoded_bytes();
    let (kind, a, b, data): (u8, u64, u64, &[u8]) = match event {
        Event::Write { offset, data } => (b'W', *offset, data.len() as u64, data),
        Event::SetLen { len } => (b'L', *len, 0, &[]),
        Event::Zero { offset, len } => (b'Z', *offset, *len, &[]),
        Event::Allocate { offset, len } => (b'A', *offset, *len, &[]),
        Event::Sync => (b'S', 0, 0, &[]),
    };
    let mut rec = Vec::with_capacity(1 + 4 + path.len() + 16 + data.len());
    rec.push(kind);
    rec.extend_from_slice(&(path.len() as u32).to_le_bytes());
    rec.extend_from_slice(path);
    rec.extend_from_slice(&a.to_le_bytes());
    rec.extend_from_slice(&b.to_le_bytes());
    rec.extend_from_slice(data);
    let mut f = j.lock().unwrap_or_else(|p| p.into_inner());
    let _ = f.write_all(&rec);
}

/// Reads a journal back: (file path, event) in the order they happened. A record cut short
/// (the writer died inside write(2)) ends the list.
#[doc(hidden)]
pub fn read(journal: &Path) -> std::io::Result<Vec<(std::path::PathBuf, Event)>> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = std::fs::read(journal)?;
    let mut out = Vec::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Option<&[u8]> {
        let s = bytes.get(*at..at.checked_add(n)?)?;
        *at += n;
        Some(s)
    };
    let u64_at = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
    while let Some(kind) = take(&mut at, 1).map(|k| k[0]) {
        let Some(plen) = take(&mut at, 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        else {
            break;
        };
        let Some(path) = take(&mut at, plen as usize).map(std::ffi::OsStr::from_bytes) else {
            break;
        };
        let path = std::path::PathBuf::from(path);
        let (Some(a), Some(b)) = (take(&mut at, 8).map(u64_at), take(&mut at, 8).map(u64_at))
        else {
            break;
        };
        let event = match kind {
            b'W' => match usize::try_from(b).ok().and_then(|n| take(&mut at, n)) {
                Some(data) => Event::Write {
                    offset: a,
                    data: data.to_vec(),
                },
                None => break,
            },
            b'L' => Event::SetLen { len: a },
            b'Z' => Event::Zero { offset: a, len: b },
            b'A' => Event::Allocate { offset: a, len: b },
            b'S' => Event::Sync,
            _ => break,
        };
        out.push((path, event));
    }
    Ok(out)
}

/// Applies recorded events to a file (the replay side of a power-loss model).
#[doc(hidden)]
pub fn apply(file: &File, event: &Event) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    match event {
        Event::Write { offset, data } => file.write_all_at(data, *offset),
        Event::SetLen { len } => file.set_len(*len),
        Event::Zero { offset, len } => {
            // Punching and zeroing keep the file's size: nothing past its end changes.
            let len = (*len).min(file.metadata()?.len().saturating_sub(*offset));
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64);
                file.write_all_at(&zeros[..n as usize], offset + done)?;
                done += n;
            }
            Ok(())
        }
        Event::Allocate { offset, len } => {
            let end = offset + len;
            if file.metadata()?.len() < end {
                file.set_len(end)?;
            }
            Ok(())
        }
        Event::Sync => Ok(()),
    }
}
