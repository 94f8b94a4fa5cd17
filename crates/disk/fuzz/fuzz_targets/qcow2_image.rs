//! Feeds arbitrary bytes to the image parsers as a whole image file: header,
//! extensions, L1/L2 tables and refcount structures. Any panic is a bug; errors are fine.
#![no_main]

use ferrovirt_disk::{open, ops, OpenOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("ferrovirt-fuzz-{}.qcow2", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let opts = OpenOptions {
        format: None,
        read_only: false,
        direct: false,
    };
    if let Ok(img) = open(&path, &opts) {
        let size = img.size();
        let mut buf = vec![0u8; 65536];
        for off in [0, size / 2, size.saturating_sub(buf.len() as u64)] {
            let n = (size - off.min(size)).min(buf.len() as u64) as usize;
            let _ = img.read_at(&mut buf[..n], off);
            let _ = img.write_at(&buf[..n.min(4096)], off);
        }
        let _ = img.discard(0, size.min(1 << 20));
        let _ = img.flush();
    }
    let _ = ops::check(&path, None);
    let _ = ferrovirt_disk::info(&path, true);
    let _ = std::fs::remove_file(&path);
});
