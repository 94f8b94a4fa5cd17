//! `compare`: do two images (with their backing chains) show the same contents?

use super::map::chain_status;
use crate::chain::{open_chain_with, ChainOpts};
use crate::{BlockBackend, DiskError, Format};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comparison {
    /// The images' sizes differ (the larger one's extra part was compared with zeros).
    pub size_mismatch: bool,
    /// Offset of the first differing 512-byte sector, as qemu-img reports it.
    pub first_difference: Option<u64>,
}

const CHUNK: u64 = 1 << 20;

/// Compares the guest contents of two images; runs where neither holds data are
/// skipped without reading.
pub fn compare(
    a: &Path,
    afmt: Option<Format>,
    b: &Path,
    bfmt: Option<Format>,
) -> Result<Comparison, DiskError> {
    let ro = ChainOpts {
        read_only: true,
        ..Default::default()
    };
    let x = open_chain_with(a, afmt, ro)?;
    let y = open_chain_with(b, bfmt, ro)?;
    let (sx, sy) = (x.size(), y.size());
    let size = sx.max(sy);
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        // The longest run over which both sides keep one status.
        let status =
            |img: &std::sync::Arc<crate::Image>, isize: u64| -> Result<(bool, u64), DiskError> {
                if pos >= isize {
                    return Ok((false, size - pos));
                }
                let e = chain_status(img, pos, isize - pos)?;
                Ok((e.data, e.length.max(1)))
            };
        let (da, na) = status(&x, sx)?;
        let (db, nb) = status(&y, sy)?;
        let n = na.min(nb).min(size - pos);
        if !da && !db {
            pos += n;
            continue;
        }
        let n = n.min(CHUNK);
        let fill = |img: &std::sync::Arc<crate::Image>,
                    isize: u64,
                    buf: &mut [u8]|
         -> Result<(), DiskError> {
            buf.fill(0);
            if pos < isize {
                let k = (isize - pos).min(buf.len() as u64) as usize;
                img.read_at(&mut buf[..k], pos)?;
            }
            Ok(())
        };
        fill(&x, sx, &mut ba[..n as usize])?;
        fill(&y, sy, &mut bb[..n as usize])?;
        if let Some(i) = (0..n as usize).find(|&i| ba[i] != bb[i]) {
            return Ok(Comparison {
                size_mismatch: sx != sy,
                first_difference: Some((pos + i as u64) / 512 * 512),
            });
        }
        pos += n;
    }
    Ok(Comparison {
        size_mismatch: sx != sy,
        first_difference: None,
    })
}
