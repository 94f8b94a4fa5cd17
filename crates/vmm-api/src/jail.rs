//! `--jail root=PATH,uid=N,gid=N`: the confinement a launcher prepared for one ferrovmm process.
//!
//! The launcher (ferrovirtd's kvm driver) starts ferrovmm in a mount namespace of its own where
//! `root` holds only what this VM may open, at the same absolute paths as outside (its kernel,
//! disks and backing files, its run folder, /dev/kvm). ferrovmm enters it first thing: chroot to
//! `root`, then it becomes `uid`/`gid` with no supplementary groups and no capabilities.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::kv;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailConfig {
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

impl JailConfig {
    pub fn check(&self) -> Result<(), String> {
        let root = self.root.to_str().ok_or("root: the path is not UTF-8")?;
        if !self.root.is_absolute() {
            return Err(format!("root={root}: must be an absolute path"));
        }
        kv::check_value("root", root)?;
        if root.contains('\0') {
            return Err("root: the path contains a NUL byte".into());
        }
        if self.uid == 0 || self.gid == 0 {
            return Err(
                "uid and gid must not be 0 (root): the jail is for an unprivileged user".into(),
            );
        }
        Ok(())
    }
}

impl FromStr for JailConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut root, mut uid, mut gid) = (None, None, None);
        let number = |k: &str, v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{k}={v}: expected a number"))
        };
        for (k, v) in kv::split(s, &["root", "uid", "gid"])? {
            match k {
                "root" => root = Some(PathBuf::from(v)),
                "uid" => uid = Some(number(k, v)?),
                _ => gid = Some(number(k, v)?),
            }
        }
        let (Some(root), Some(uid), Some(gid)) = (root, uid, gid) else {
            return Err("give root=PATH,uid=N,gid=N".into());
        };
        let jail = JailConfig { root, uid, gid };
        jail.check()?;
        Ok(jail)
    }
}

impl fmt::Display for JailConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "root={},uid={},gid={}",
            self.root.display(),
            self.uid,
            self.gid
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jail_parses_back_to_itself_and_refuses_root_or_relative_paths() {
        let j = JailConfig {
            root: "/run/fv/jails/web".into(),
            uid: 1_234_567,
            gid: 1_234_567,
        };
        assert_eq!(j.to_string().parse::<JailConfig>().unwrap(), j);
        assert!("root=/r,uid=0,gid=5".parse::<JailConfig>().is_err());
        assert!("root=r,uid=5,gid=5".parse::<JailConfig>().is_err());
        assert!("root=/r,uid=5".parse::<JailConfig>().is_err());
        assert!("root=/r,uid=x,gid=5".parse::<JailConfig>().is_err());
    }
}
