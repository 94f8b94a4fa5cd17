//! A writer for the "newc" cpio format the Linux initramfs unpacker reads.
//!
//! Each entry is a 110-byte ASCII header, the NUL-terminated name padded to 4 bytes,
//! then the data padded to 4 bytes; the archive ends with an entry named `TRAILER!!!`.

use std::io::{self, Read, Write};

const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

pub struct CpioWriter<W: Write> {
    out: W,
    next_inode: u32,
    offset: u64,
}

struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_inode: 1,
            offset: 0,
        }
    }

    /// A directory; `path` is relative to the archive root (no leading '/').
    pub fn directory(&mut self, path: &str, permissions: u32) -> io::Result<()> {
        self.header(Header {
            name: path,
            mode: S_IFDIR | (permissions & 0o7777),
            nlink: 2,
            size: 0,
            rdev: (0, 0),
        })
    }

    pub fn file_bytes(&mut self, path: &str, permissions: u32, data: &[u8]) -> io::Result<()> {
        self.header(Header {
            name: path,
            mode: S_IFREG | (permissions & 0o7777),
            nlink: 1,
            size: entry_size(data.len() as u64)?,
            rdev: (0, 0),
        })?;
        self.write_all(data)?;
        self.pad()
    }

    /// A regular file whose `size` bytes come from `data` (e.g. a host file).
    pub fn file_from(
        &mut self,
        path: &str,
        permissions: u32,
        size: u64,
        data: &mut impl Read,
    ) -> io::Result<()> {
        self.header(Header {
            name: path,
            mode: S_IFREG | (permissions & 0o7777),
            nlink: 1,
            size: entry_size(size)?,
            rdev: (0, 0),
        })?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: expected {size} bytes, the source had {copied} (file changed?)"),
            ));
        }
        self.offset += copied;
        self.pad()
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.header(Header {
            name: path,
            mode: S_IFLNK | 0o777,
            nlink: 1,
            size: entry_size(target.len() as u64)?,
            rdev: (0, 0),
        })?;
        self.write_all(target.as_bytes())?;
        self.pad()
    }

    pub fn char_device(
        &mut self,
        path: &str,
        permissions: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        self.header(Header {
            name: path,
            mode: S_IFCHR | (permissions & 0o7777),
            nlink: 1,
            size: 0,
            rdev: (major, minor),
        })
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(Header {
            name: "TRAILER!!!",
            mode: 0,
            nlink: 1,
            size: 0,
            rdev: (0, 0),
        })?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(&mut self, h: Header<'_>) -> io::Result<()> {
        if h.name.is_empty() || h.name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid cpio entry name {:?}", h.name),
            ));
        }
        let inode = self.next_inode;
        self.next_inode += 1;
        let text = format!(
            "070701{inode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            h.mode,
            0, // uid: root
            0, // gid: root
            h.nlink,
            0, // mtime: fixed, so archives are reproducible
            h.size,
            0, // dev major
            0, // dev minor
            h.rdev.0,
            h.rdev.1,
            h.name.len() + 1,
            0, // checksum: unused by newc
        );
        self.write_all(text.as_bytes())?;
        self.write_all(h.name.as_bytes())?;
        self.write_all(&[0])?;
        self.pad()
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.offset += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - (self.offset % 4) as usize) % 4;
        self.write_all(&[0; 3][..padding])
    }
}

fn entry_size(size: u64) -> io::Result<u32> {
    u32::try_from(size).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a cpio (newc) entry holds at most 4 GiB, this one is {size} bytes"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The host's cpio tool is the oracle: it must list and extract what we wrote.
    #[test]
    fn host_cpio_reads_the_archive() {
        let mut w = CpioWriter::new(Vec::new());
        w.directory("bin", 0o755).unwrap();
        w.file_bytes("bin/hello", 0o755, b"#!/bin/sh\necho hi\n")
            .unwrap();
        w.file_from("data", 0o644, 5, &mut &b"12345"[..]).unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        let archive = w.finish().unwrap();
        assert_eq!(archive.len() % 4, 0);

        let dir = std::env::temp_dir().join(format!("ferrovirt-cpio-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new("cpio")
            .args(["-i", "-d", "--quiet", "--no-absolute-filenames"])
            .current_dir(&dir)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("the cpio command is needed for this test (apt-get install cpio)");
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(
            std::fs::read(dir.join("bin/hello")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(std::fs::read(dir.join("data")).unwrap(), b"12345");
        assert_eq!(
            std::fs::read_link(dir.join("bin/sh")).unwrap().to_str(),
            Some("busybox")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("bin/hello"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn device_nodes_are_listed_as_character_devices() {
        let mut w = CpioWriter::new(Vec::new());
        w.char_device("console", 0o600, 5, 1).unwrap();
        let archive = w.finish().unwrap();
        let mut child = Command::new("cpio")
            .args(["-i", "-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the cpio command is needed for this test (apt-get install cpio)");
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.starts_with("crw-------"), "listing: {listing}");
        assert!(
            listing.contains("5,") && listing.trim_end().ends_with("console"),
            "listing: {listing}"
        );
    }

    #[test]
    fn rejects_empty_names() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file_bytes("", 0o644, b"x").is_err());
    }
}
