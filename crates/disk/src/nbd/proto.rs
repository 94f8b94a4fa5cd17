//! NBD protocol constants and the parsers of what a client sends (pure functions over
//! bytes, so that they can be fuzzed): option payloads and transmission requests.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
pub const STATE_DIRTY: u32 = 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;

/// Longest option payload read (longer ones are skipped with ERR_TOO_BIG).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest read or write request served (as QEMU's 32 MiB).
pub const MAX_REQUEST_LEN: u32 = 32 << 20;
/// Names and meta-context queries are at most this long (the NBD string limit).
pub const MAX_STRING: usize = 4096;
/// Queries in one meta-context option.
pub const MAX_QUERIES: u32 = 128;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parses a 28-byte transmission request header.
pub fn parse_request(b: &[u8]) -> Result<Request, String> {
    if b.len() != 28 {
        return Err(format!("request header of {} bytes", b.len()));
    }
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != REQUEST_MAGIC {
        return Err(format!("bad request magic {magic:#x}"));
    }
    Ok(Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes(b[8..16].try_into().unwrap_or([0; 8])),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap_or([0; 8])),
        length: u32::from_be_bytes(b[24..28].try_into().unwrap_or([0; 4])),
    })
}

fn take_u32(b: &[u8], at: &mut usize) -> Result<u32, String> {
    let v = b
        .get(*at..*at + 4)
        .ok_or("option payload too short")?
        .try_into()
        .map(u32::from_be_bytes)
        .map_err(|_| "option payload too short".to_string())?;
    *at += 4;
    Ok(v)
}

fn take_str(b: &[u8], at: &mut usize, len: usize) -> Result<String, String> {
    if len > MAX_STRING {
        return Err("string longer than 4096 bytes".into());
    }
    let s = b.get(*at..*at + len).ok_or("option payload too short")?;
    *at += len;
    String::from_utf8(s.to_vec()).map_err(|_| "string is not UTF-8".into())
}

/// NBD_OPT_INFO / NBD_OPT_GO payload: export name and the information requested.
pub fn parse_go(b: &[u8]) -> Result<(String, Vec<u16>), String> {
    let mut at = 0;
    let n = take_u32(b, &mut at)? as usize;
    let name = take_str(b, &mut at, n)?;
    let count = b
        .get(at..at + 2)
        .map(|x| u16::from_be_bytes([x[0], x[1]]))
        .ok_or("option payload too short")? as usize;
    at += 2;
    if b.len() != at + 2 * count {
        return Err("information request count does not match the payload".into());
    }
    let infos = b[at..]
        .chunks_exact(2)
        .map(|x| u16::from_be_bytes([x[0], x[1]]))
        .collect();
    Ok((name, infos))
}

/// NBD_OPT_LIST/SET_META_CONTEXT payload: export name and queries.
pub fn parse_meta(b: &[u8]) -> Result<(String, Vec<String>), String> {
    let mut at = 0;
    let n = take_u32(b, &mut at)? as usize;
    let name = take_str(b, &mut at, n)?;
    let count = take_u32(b, &mut at)?;
    if count > MAX_QUERIES {
        return Err(format!("{count} queries is more than {MAX_QUERIES}"));
    }
    let mut q = Vec::new();
    for _ in 0..count {
        let l = take_u32(b, &mut at)? as usize;
        q.push(take_str(b, &mut at, l)?);
    }
    if at != b.len() {
        return Err("trailing bytes after the queries".into());
    }
    Ok((name, q))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz-style bounded loop over the parsers: random and mutated inputs never
    /// panic, and valid inputs parse back.
    #[test]
    fn parsers_survive_random_input() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut valid_go = Vec::new();
        valid_go.extend_from_slice(&3u32.to_be_bytes());
        valid_go.extend_from_slice(b"exp");
        valid_go.extend_from_slice(&1u16.to_be_bytes());
        valid_go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_go(&valid_go).unwrap(), ("exp".into(), vec![3]));
        let mut meta = Vec::new();
        meta.extend_from_slice(&0u32.to_be_bytes());
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_meta(&meta).unwrap(),
            (String::new(), vec!["base:allocation".into()])
        );
        for i in 0..200_000u32 {
            let len = (next() % 64) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 3 == 0 && !valid_go.is_empty() {
                b = valid_go.clone();
                let k = (next() % b.len() as u64) as usize;
                b[k] = next() as u8;
                b.truncate((next() % (b.len() as u64 + 1)) as usize);
            }
            let _ = parse_go(&b);
            let _ = parse_meta(&b);
            let mut r = [0u8; 28];
            for v in r.iter_mut() {
                *v = next() as u8;
            }
            if i % 2 == 0 {
                r[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            let _ = parse_request(&r);
            let _ = parse_request(&r[..(next() % 28) as usize]);
        }
    }
}
