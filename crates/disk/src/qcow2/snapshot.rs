//! The qcow2 snapshot table: parsing (bounded against hostile images) and serialisation
//! in the layout QEMU writes (40-byte entry header, 24 bytes of extra data, id, name,
//! padding to 8 bytes).

use crate::file::ImageFile;
use crate::DiskError;

/// QEMU's limits: at most 65536 snapshots, a table of at most 64 MiB, at most 1 KiB of
/// extra data per entry.
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
pub const MAX_EXTRA_DATA: u32 = 1024;
/// Extra data QEMU writes today: vm_state_size_large, disk_size, icount.
const EXTRA_LEN: usize = 24;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken (None in old v2 entries).
    pub disk_size: Option<u64>,
    /// Instruction count (None: not recorded).
    pub icount: Option<u64>,
    /// Extra data past the fields we know, kept as it was.
    pub extra_tail: Vec<u8>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

impl Snapshot {
    /// Bytes this entry takes in the table (padded to 8).
    pub fn encoded_len(&self) -> usize {
        (40 + EXTRA_LEN + self.extra_tail.len() + self.id.len() + self.name.len()).div_ceil(8) * 8
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let extra = EXTRA_LEN + self.extra_tail.len();
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        // The 32-bit field holds the low half, as QEMU writes it; the 64-bit one is exact.
        out.extend_from_slice(&(self.vm_state_size as u32).to_be_bytes());
        out.extend_from_slice(&(extra as u32).to_be_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&self.disk_size.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(&self.extra_tail);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.resize(start + self.encoded_len(), 0);
    }
}

/// The whole table as written to disk.
pub fn encode_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in snaps {
        s.encode(&mut out);
    }
    out
}

/// Reads and checks the snapshot table the header points at.
pub fn read_table(
    f: &ImageFile,
    offset: u64,
    count: u32,
    cluster_size: u64,
    version: u32,
) -> Result<Vec<Snapshot>, DiskError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let bad = |reason: String| DiskError::invalid_qcow2(f.path(), reason);
    if count > MAX_SNAPSHOTS {
        return Err(bad(format!(
            "{count} snapshots is more than the limit of {MAX_SNAPSHOTS}"
        )));
    }
    let file_len = f.len()?;
    let avail = file_len
        .saturating_sub(offset)
        .min(MAX_TABLE_BYTES + 8)
        .min(count as u64 * (40 + MAX_EXTRA_DATA as u64 + 2 * 65535 + 8));
    let mut b = vec![0u8; avail as usize];
    f.read_at(&mut b, offset)?;
    parse_table(&b, count, cluster_size, version).map_err(bad)
}

/// Parses `count` entries from `b` (the bytes from the table's offset on).
pub fn parse_table(
    b: &[u8],
    count: u32,
    cluster_size: u64,
    version: u32,
) -> Result<Vec<Snapshot>, String> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut at = 0usize;
    for i in 0..count {
        if at + 40 > b.len() {
            return Err(format!(
                "snapshot table entry {i} runs past the end of the file"
            ));
        }
        let h = &b[at..at + 40];
        let l1_table_offset = be64(h, 0);
        let l1_size = be32(h, 8);
        let id_len = u16::from_be_bytes([h[12], h[13]]) as usize;
        let name_len = u16::from_be_bytes([h[14], h[15]]) as usize;
        let extra_len = be32(h, 36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(format!(
                "snapshot {i} has {extra_len} bytes of extra data (limit {MAX_EXTRA_DATA})"
            ));
        }
        if version >= 3 && extra_len < 16 {
            return Err(format!(
                "snapshot {i} has {extra_len} bytes of extra data; version 3 needs at least 16"
            ));
        }
        let extra_len = extra_len as usize;
        let end = at + 40 + extra_len + id_len + name_len;
        if end > b.len() || end as u64 > MAX_TABLE_BYTES {
            return Err(format!(
                "snapshot table entry {i} runs past the end of the table"
            ));
        }
        if !l1_table_offset.is_multiple_of(cluster_size) || l1_table_offset < cluster_size {
            return Err(format!(
                "snapshot {i}'s L1 table offset {l1_table_offset:#x} is unaligned or in the header"
            ));
        }
        if l1_size as u64 * 8 > super::header::MAX_L1_BYTES {
            return Err(format!(
                "snapshot {i}'s L1 table of {l1_size} entries is too large"
            ));
        }
        let extra = &b[at + 40..at + 40 + extra_len];
        let mut vm_state_size = be32(h, 32) as u64;
        let mut disk_size = None;
        let mut icount = None;
        if extra.len() >= 8 {
            vm_state_size = be64(extra, 0);
        }
        if extra.len() >= 16 {
            disk_size = Some(be64(extra, 8));
        }
        if extra.len() >= 24 {
            let v = be64(extra, 16);
            icount = (v != u64::MAX).then_some(v);
        }
        let tail = extra.get(EXTRA_LEN..).unwrap_or(&[]).to_vec();
        let s = at + 40 + extra_len;
        let text = |r: &[u8], what: &str| {
            String::from_utf8(r.to_vec()).map_err(|_| format!("snapshot {i}'s {what} is not UTF-8"))
        };
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: text(&b[s..s + id_len], "id")?,
            name: text(&b[s + id_len..s + id_len + name_len], "name")?,
            date_sec: be32(h, 16),
            date_nsec: be32(h, 20),
            vm_clock_nsec: be64(h, 24),
            vm_state_size,
            disk_size,
            icount,
            extra_tail: tail,
        });
        at = end.div_ceil(8) * 8;
    }
    Ok(out)
}

/// The snapshot an argument names: by id first, then by name (as qemu-img looks it up).
pub fn find<'a>(snaps: &'a [Snapshot], id_or_name: &str) -> Option<(usize, &'a Snapshot)> {
    snaps
        .iter()
        .enumerate()
        .find(|(_, s)| s.id == id_or_name)
        .or_else(|| snaps.iter().enumerate().find(|(_, s)| s.name == id_or_name))
}

/// The next free numeric id (one more than the largest, as QEMU picks it).
pub fn next_id(snaps: &[Snapshot]) -> String {
    let max = snaps
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, name: &str) -> Snapshot {
        Snapshot {
            l1_table_offset: 3 << 16,
            l1_size: 2,
            id: id.into(),
            name: name.into(),
            date_sec: 1,
            date_nsec: 2,
            vm_clock_nsec: 3,
            vm_state_size: 5 << 32,
            disk_size: Some(1 << 30),
            icount: None,
            extra_tail: vec![],
        }
    }

    #[test]
    fn table_round_trips() {
        let snaps = vec![sample("1", "a"), sample("2", "second")];
        let b = encode_table(&snaps);
        assert_eq!(b.len() % 8, 0);
        assert_eq!(parse_table(&b, 2, 1 << 16, 3).unwrap(), snaps);
        assert_eq!(next_id(&snaps), "3");
        assert_eq!(find(&snaps, "second").unwrap().0, 1);
        assert_eq!(find(&snaps, "1").unwrap().0, 0);
    }

    #[test]
    fn hostile_tables_are_errors_not_panics() {
        let b = encode_table(&[sample("1", "a")]);
        for len in 0..b.len() {
            let _ = parse_table(&b[..len], 1, 1 << 16, 3);
        }
        let mut rng = 0x1234_5678_9abc_def0u64;
        for _ in 0..20000 {
            let mut c = b.clone();
            for _ in 0..4 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = (rng % c.len() as u64) as usize;
                c[i] = (rng >> 32) as u8;
            }
            let _ = parse_table(&c, (rng % 3) as u32, 1 << 16, 3);
        }
    }
}
