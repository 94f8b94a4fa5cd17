//! `map`: where each guest byte of a chain comes from.

use crate::chain::{open_chain_with, ChainOpts};
use crate::qcow2::LayerStatus;
use crate::{BlockBackend, DiskError, Image};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;

/// One run of qemu-img map's output.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub compressed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The file holding the data (human output only).
    #[serde(skip)]
    pub filename: String,
}

/// Status of the chain at `pos`: the layer that decides it and how far it holds.
pub(crate) fn chain_status(
    top: &Arc<Image>,
    pos: u64,
    max_len: u64,
) -> Result<MapEntry, DiskError> {
    let mut len = max_len;
    let mut depth = 0;
    let mut cur = top;
    loop {
        let (st, n) = cur.layer_status(pos, len)?;
        len = len.min(n.max(1));
        let entry = |present, zero, data, compressed, offset| MapEntry {
            start: pos,
            length: len,
            depth,
            present,
            zero,
            data,
            compressed,
            offset,
            filename: cur.path().display().to_string(),
        };
        match st {
            LayerStatus::Zero => return Ok(entry(true, true, false, false, None)),
            LayerStatus::Data { host, compressed } => {
                return Ok(entry(true, false, true, compressed, host))
            }
            LayerStatus::Unallocated => match cur.backing() {
                Some(b) if pos < b.size() => {
                    len = len.min(b.size() - pos);
                    cur = b;
                    depth += 1;
                }
                Some(_) => return Ok(entry(false, true, false, false, None)),
                None => return Ok(entry(false, true, false, false, None)),
            },
        }
    }
}

/// Allocation map of the whole chain, merged into runs like qemu-img map.
pub fn map(path: &Path) -> Result<Vec<MapEntry>, DiskError> {
    let top = open_chain_with(
        path,
        None,
        ChainOpts {
            read_only: true,
            no_locks: true,
            ..Default::default()
        },
    )?;
    let size = top.size();
    let mut out: Vec<MapEntry> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let e = chain_status(&top, pos, size - pos)?;
        pos += e.length;
        if let Some(last) = out.last_mut() {
            let contiguous = match (last.offset, e.offset) {
                (Some(a), Some(b)) => a + last.length == b,
                (None, None) => true,
                _ => false,
            };
            if contiguous
                && last.depth == e.depth
                && last.present == e.present
                && last.zero == e.zero
                && last.data == e.data
                && last.compressed == e.compressed
                && last.filename == e.filename
            {
                last.length += e.length;
                continue;
            }
        }
        out.push(e);
    }
    Ok(out)
}
