//! The save file: a fixed preamble, a JSON header naming the domain and the engine that wrote
//! the payload, then the payload (the engine's own stream) from a page-aligned offset.
//!
//! ```text
//! 0   magic "FERROSAV"
//! 8   format version (u32 LE)            12  header length (u32 LE, at most MAX_HEADER)
//! 16  CRC-32 of the header (u32 LE)      20  reserved, 0
//! 24  payload offset (u64 LE)            32  payload length (u64 LE; 0 = the save never finished)
//! 40  CRC-32 of bytes 0..40 (u32 LE)     44  zero padding to 48
//! 48  header: JSON (SaveHeader)
//!     zero padding to the payload offset (header end rounded up to 4 KiB)
//!     payload
//! ```
//!
//! The file is user input when restored: every field is checked against its limit before
//! anything is allocated or started, and any fault is one error naming the file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use ferrovirt_api::engine::Engine;
use ferrovirt_api::save::StartState;
use ferrovirt_api::{ApiError, DomainDef, ErrorCode};
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"FERROSAV";
/// Bumped when a field changes meaning; older files are refused with their version named.
pub const VERSION: u32 = 1;
const PREAMBLE: usize = 48;
/// Definitions are at most 1 MiB (the API's limit); with its XML form that is well inside this.
pub const MAX_HEADER: u32 = 4 << 20;
pub const PAYLOAD_ALIGN: u64 = 4096;

/// What a save file says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaveHeader {
    /// The engine whose stream the payload is; only its driver can restore it.
    pub engine: Engine,
    /// The domain as it ran: libvirt XML for people and tools ...
    pub xml: String,
    /// ... and the native definition (XML cannot carry everything, e.g. the accelerator).
    pub definition: DomainDef,
    /// The state restore leaves the domain in unless told otherwise.
    pub start: StartState,
    /// When the save began, milliseconds since the Unix epoch.
    pub saved_ms: u64,
    /// The ferrovirtd that wrote it.
    pub daemon_version: String,
}

/// A checked save file, positioned at its payload.
pub struct SaveFile {
    pub file: File,
    pub header: SaveHeader,
    pub payload_offset: u64,
    pub payload_len: u64,
}

fn bad(path: &Path, what: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidArgument,
        format!("{}: {what}", path.display()),
    )
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> ApiError {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::AlreadyExists => {
            ErrorCode::InvalidArgument
        }
        _ => ErrorCode::StorageError,
    };
    ApiError::new(code, format!("{}: {what}: {e}", path.display()))
}

/// A path the daemon can use: absolute (the daemon does not share the client's directory).
pub fn check_path(file: &str) -> Result<&Path, ApiError> {
    let path = Path::new(file);
    if !path.is_absolute() || file.contains('\0') {
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("save file '{file}' must be an absolute path"),
        ));
    }
    Ok(path)
}

/// Create the target: it must not exist (a save never overwrites a file). 0600.
pub fn create(path: &Path) -> Result<File, ApiError> {
    OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(crate::files::FILE_MODE)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "{} already exists: a save never overwrites a file (remove it or choose another)",
                    path.display()
                ),
            ),
            _ => io_err(path, "cannot create the save file", e),
        })
}

fn preamble(header_len: u32, header_crc: u32, payload_offset: u64, payload_len: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(PREAMBLE);
    p.extend_from_slice(MAGIC);
    p.extend_from_slice(&VERSION.to_le_bytes());
    p.extend_from_slice(&header_len.to_le_bytes());
    p.extend_from_slice(&header_crc.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&payload_offset.to_le_bytes());
    p.extend_from_slice(&payload_len.to_le_bytes());
    let crc = crc32fast::hash(&p);
    p.extend_from_slice(&crc.to_le_bytes());
    p.resize(PREAMBLE, 0);
    p
}

fn payload_offset_for(header_len: u32) -> u64 {
    (PREAMBLE as u64 + u64::from(header_len)).div_ceil(PAYLOAD_ALIGN) * PAYLOAD_ALIGN
}

/// An unfinished save: the header is on disk, the payload goes from `payload_offset`.
pub struct Writer {
    pub payload_offset: u64,
    header_len: u32,
    header_crc: u32,
}

/// Write the preamble (marked unfinished) and the header; leaves `file` at the payload offset.
pub fn write_header(path: &Path, file: &mut File, header: &SaveHeader) -> Result<Writer, ApiError> {
    let json = serde_json::to_vec(header).map_err(|e| ApiError::internal(e.to_string()))?;
    let header_len = u32::try_from(json.len())
        .ok()
        .filter(|n| *n <= MAX_HEADER)
        .ok_or_else(|| ApiError::invalid("the definition is too large for a save file header"))?;
    let header_crc = crc32fast::hash(&json);
    let payload_offset = payload_offset_for(header_len);
    let mut head = preamble(header_len, header_crc, payload_offset, 0);
    head.extend_from_slice(&json);
    head.resize(payload_offset as usize, 0);
    file.write_all(&head)
        .and_then(|()| file.seek(SeekFrom::Start(payload_offset)).map(|_| ()))
        .map_err(|e| io_err(path, "cannot write the save file", e))?;
    Ok(Writer {
        payload_offset,
        header_len,
        header_crc,
    })
}

impl Writer {
    /// The payload is complete: record its length and make the whole file durable.
    pub fn finish(&self, path: &Path, file: &File) -> Result<u64, ApiError> {
        let write = || -> std::io::Result<u64> {
            file.sync_all()?;
            let len = file.metadata()?.len().saturating_sub(self.payload_offset);
            if len == 0 {
                return Err(std::io::Error::other("the driver wrote no state"));
            }
            let head = preamble(self.header_len, self.header_crc, self.payload_offset, len);
            file.write_all_at(&head, 0)?;
            file.sync_all()?;
            Ok(len)
        };
        write().map_err(|e| io_err(path, "cannot complete the save file", e))
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Open and check a save file; the result is positioned at the payload.
pub fn open(path: &Path) -> Result<SaveFile, ApiError> {
    let mut file = File::open(path).map_err(|e| io_err(path, "cannot open the save file", e))?;
    let meta = file
        .metadata()
        .map_err(|e| io_err(path, "cannot read the save file", e))?;
    if !meta.is_file() {
        return Err(bad(path, "not a regular file"));
    }
    let size = meta.len();
    let mut pre = [0u8; PREAMBLE];
    if size < PREAMBLE as u64 {
        return Err(bad(
            path,
            format!("not a ferrovirt save file (only {size} bytes)"),
        ));
    }
    file.read_exact(&mut pre)
        .map_err(|e| io_err(path, "cannot read the save file", e))?;
    if &pre[..8] != MAGIC {
        return Err(bad(path, "not a ferrovirt save file (no FERROSAV magic)"));
    }
    let version = u32_at(&pre, 8);
    if version != VERSION {
        return Err(bad(
            path,
            format!("save file format version {version}; this ferrovirtd reads version {VERSION}"),
        ));
    }
    if crc32fast::hash(&pre[..40]) != u32_at(&pre, 40) {
        return Err(bad(
            path,
            "the save file's preamble is corrupted (checksum)",
        ));
    }
    let header_len = u32_at(&pre, 12);
    let header_crc = u32_at(&pre, 16);
    let payload_offset = u64_at(&pre, 24);
    let payload_len = u64_at(&pre, 32);
    if header_len == 0
        || header_len > MAX_HEADER
        || payload_offset != payload_offset_for(header_len)
    {
        return Err(bad(path, "the save file's preamble is corrupted (lengths)"));
    }
    if payload_len == 0 {
        return Err(bad(
            path,
            "the save did not finish (the file holds no complete state)",
        ));
    }
    let end = payload_offset.checked_add(payload_len);
    if end.is_none_or(|end| end > size) {
        return Err(bad(
            path,
            format!(
                "the save file is truncated: {size} bytes, the state needs {}",
                end.map_or_else(|| "more".to_string(), |e| e.to_string())
            ),
        ));
    }
    let mut json = vec![0u8; header_len as usize];
    file.read_exact(&mut json)
        .map_err(|e| io_err(path, "cannot read the save file", e))?;
    if crc32fast::hash(&json) != header_crc {
        return Err(bad(path, "the save file's header is corrupted (checksum)"));
    }
    let header: SaveHeader = serde_json::from_slice(&json)
        .map_err(|e| bad(path, format!("the save file's header is not valid: {e}")))?;
    header.definition.validate().map_err(|e| {
        bad(
            path,
            format!("the saved definition is not valid: {}", e.message),
        )
    })?;
    file.seek(SeekFrom::Start(payload_offset))
        .map_err(|e| io_err(path, "cannot read the save file", e))?;
    Ok(SaveFile {
        file,
        header,
        payload_offset,
        payload_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SaveHeader {
        let mut def = DomainDef::new("web");
        def.uuid = Some("00000000-0000-4000-8000-000000000001".into());
        def.os.kernel = Some("/boot/vmlinuz".into());
        SaveHeader {
            engine: Engine::Test,
            xml: "<domain/>".into(),
            definition: def,
            start: StartState::Running,
            saved_ms: 1,
            daemon_version: "test".into(),
        }
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fv-savefmt-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }

    fn written(name: &str, payload: &[u8]) -> std::path::PathBuf {
        let p = tmp(name);
        let mut f = create(&p).unwrap();
        let w = write_header(&p, &mut f, &header()).unwrap();
        f.write_all(payload).unwrap();
        assert_eq!(w.finish(&p, &f).unwrap(), payload.len() as u64);
        p
    }

    #[test]
    fn a_written_file_reads_back_at_its_payload() {
        let p = written("good", b"STATE");
        let mut s = open(&p).unwrap();
        assert_eq!(s.header.definition.name, "web");
        assert_eq!(s.payload_offset % PAYLOAD_ALIGN, 0);
        assert_eq!(s.payload_len, 5);
        let mut rest = String::new();
        s.file.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "STATE");
        // A save never overwrites.
        let e = create(&p).err().unwrap();
        assert!(e.message.contains("already exists"), "{e}");
    }

    #[test]
    fn every_damage_is_one_clear_error() {
        let p = written("damage", b"STATE");
        let good = std::fs::read(&p).unwrap();
        let check = |bytes: &[u8], expect: &str| {
            let q = tmp("damaged");
            std::fs::write(&q, bytes).unwrap();
            match open(&q) {
                Err(e) => {
                    assert!(e.message.contains(expect), "{expect}: {e}");
                    assert_eq!(e.code, ErrorCode::InvalidArgument);
                }
                Ok(_) => panic!("accepted a damaged file ({expect})"),
            }
        };
        check(b"", "not a ferrovirt save file");
        check(&good[..good.len() - 1], "truncated");
        check(&good[..100], "truncated");
        let mut g = good.clone();
        g[0] = b'X';
        check(&g, "magic");
        let mut g = good.clone();
        g[8] = 9;
        check(&g, "version 9");
        let mut g = good.clone();
        g[30] ^= 1;
        check(&g, "preamble is corrupted");
        let mut g = good.clone();
        g[60] ^= 0x20;
        check(&g, "header is corrupted");
        // An unfinished save: payload length 0 with a valid preamble checksum.
        let mut g = good.clone();
        let json_len = u32_at(&good, 12);
        g[..PREAMBLE].copy_from_slice(&preamble(json_len, u32_at(&good, 16), u64_at(&good, 24), 0));
        check(&g, "did not finish");
        // Lengths far beyond any limit are refused before allocating.
        let mut g = good.clone();
        g[..PREAMBLE].copy_from_slice(&preamble(u32::MAX, 0, u64::MAX, u64::MAX));
        check(&g, "lengths");
        let mut g = good.clone();
        g[..PREAMBLE].copy_from_slice(&preamble(
            json_len,
            u32_at(&good, 16),
            u64_at(&good, 24),
            u64::MAX,
        ));
        check(&g, "truncated");
        // A header that is valid JSON with a valid checksum but not a save header.
        let q = tmp("notheader");
        let mut f = create(&q).unwrap();
        let json = br#"{"engine":"qemu"}"#;
        let mut head = preamble(json.len() as u32, crc32fast::hash(json), 4096, 1);
        head.extend_from_slice(json);
        head.resize(4097, 0);
        f.write_all(&head).unwrap();
        drop(f);
        let e = open(&q).err().unwrap();
        assert!(e.message.contains("header is not valid"), "{e}");
        assert!(open(Path::new("/nonexistent/x.save")).is_err());
        assert!(check_path("rel/x.save").is_err());
    }
}
