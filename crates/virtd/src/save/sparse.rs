//! Copying guest memory between files without writing its zero pages: they stay holes, so a
//! mostly untouched RAM takes little disk in the save file and in the restored copy.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;

/// Copy `len` bytes from `from`'s position to `to`'s position, seeking over zero pages.
/// `step` runs after every chunk with the bytes copied so far (progress, cancel: an error stops
/// the copy). `to` is extended to its full length even when the data ends in a hole.
pub fn copy(
    from: &mut File,
    to: &mut File,
    len: u64,
    step: &mut dyn FnMut(u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    let start = to.stream_position()?;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        from.read_exact(&mut buf[..n])?;
        for page in buf[..n].chunks(PAGE) {
            if page.iter().all(|b| *b == 0) {
                to.seek(SeekFrom::Current(page.len() as i64))?;
            } else {
                to.write_all(page)?;
            }
        }
        done += n as u64;
        step(done)?;
    }
    // A trailing hole: the length still counts.
    if to.metadata()?.len() < start + len {
        to.set_len(start + len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn zero_pages_become_holes_and_data_survives() {
        let dir = std::env::temp_dir().join(format!("fv-sparse-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let mut data = vec![0u8; 8 << 20];
        data[5 * PAGE + 7] = 0xaa;
        data[3 << 20] = 0x55;
        std::fs::write(dir.join("src"), &data).unwrap();
        let mut from = File::open(dir.join("src")).unwrap();
        let mut to = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("dst"))
            .unwrap();
        to.write_all(b"head").unwrap();
        let mut steps = 0;
        copy(&mut from, &mut to, data.len() as u64, &mut |_| {
            steps += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(steps, 8);
        let back = std::fs::read(dir.join("dst")).unwrap();
        assert_eq!(&back[..4], b"head");
        assert_eq!(&back[4..], &data[..]);
        assert!(
            to.metadata().unwrap().blocks() * 512 < 1 << 20,
            "not sparse"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
