//! ext4 root disk images with busybox (guest/mk-rootdisk.sh).

use std::path::{Path, PathBuf};

use crate::cache::run_guest_script;
use crate::error::{Error, Result};

/// Writes an ext4 image of `size_mib` MiB at `out` holding busybox and `/sbin/init`
/// (`init_script`, or a default that prints `FERROVIRT-ROOTDISK-UP` and powers off).
pub fn make_root_disk(out: &Path, size_mib: u32, init_script: Option<&Path>) -> Result<PathBuf> {
    let out_arg = out
        .to_str()
        .ok_or_else(|| Error::new(format!("{}: path is not UTF-8", out.display())))?;
    let size = size_mib.to_string();
    let mut args = vec![out_arg, size.as_str()];
    let init_arg;
    if let Some(init) = init_script {
        init_arg = init
            .to_str()
            .ok_or_else(|| Error::new(format!("{}: path is not UTF-8", init.display())))?
            .to_owned();
        args.push(&init_arg);
    }
    run_guest_script("mk-rootdisk.sh", &args)?;
    Ok(out.to_path_buf())
}
