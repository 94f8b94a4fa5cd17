//! Restoring a VM from a snapshot directory: `PUT /vm/snapshot`'s request on one side and
//! `ferrovmm --restore DIR ...`'s command line on the other, as types both sides share.
//! [`RestoreConfig::to_args`] is the only place that command line is built.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::launch::{check_name, check_path, utf8, valid_tap_name, LaunchError, SerialMode};

/// The snapshot files ferrovmm writes into (and restores from) a directory.
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// `PUT /vm/snapshot`: write DIR/state and DIR/memory of the paused VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub path: PathBuf,
}

/// The reply of `PUT /vm/snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReply {
    pub path: PathBuf,
    /// Bytes written to `state` and `memory` (memory holes not counted).
    pub bytes_written: u64,
    pub memory_bytes: u64,
    pub ms: f64,
}

/// `ferrovmm --restore DIR ...`: what the restored VM is started with. Everything not given
/// here comes from the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreConfig {
    /// The snapshot directory (with `state` and `memory`).
    pub dir: PathBuf,
    pub name: Option<String>,
    pub api_socket: Option<PathBuf>,
    pub serial: Option<SerialMode>,
    pub exit_file: Option<PathBuf>,
    /// Run at once instead of waiting paused for `PUT /vm/resume`.
    pub resume: bool,
    /// Disk N of the saved VM opened at another path.
    pub disks: Vec<(usize, PathBuf)>,
    /// NIC N of the saved VM attached to another TAP.
    pub taps: Vec<(usize, String)>,
}

impl RestoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RestoreConfig {
            dir: dir.into(),
            name: None,
            api_socket: None,
            serial: None,
            exit_file: None,
            resume: false,
            disks: Vec::new(),
            taps: Vec::new(),
        }
    }

    /// Every value survives argv (the same rules as a launch).
    pub fn validate(&self) -> Result<(), LaunchError> {
        check_path("--restore", &self.dir)?;
        if let Some(n) = &self.name {
            check_name(n)?;
        }
        for (flag, p) in [
            ("--api-socket", &self.api_socket),
            ("--exit-file", &self.exit_file),
        ] {
            if let Some(p) = p {
                check_path(flag, p)?;
            }
        }
        if let Some(SerialMode::File(p) | SerialMode::Socket(p)) = &self.serial {
            check_path("--serial", p)?;
        }
        for (_, p) in &self.disks {
            check_path("--disk", p)?;
        }
        for (_, tap) in &self.taps {
            if !valid_tap_name(tap) {
                return Err(LaunchError(format!("--net: '{tap}' is not a TAP name")));
            }
        }
        Ok(())
    }

    /// ferrovmm's argv (without the program name), `--name=NAME` first as at launch; values
    /// as `--flag=VALUE`, so one starting with '-' stays a value.
    pub fn to_args(&self) -> Result<Vec<String>, LaunchError> {
        self.validate()?;
        let mut a = Vec::new();
        let mut opt = |flag: &str, value: &str| a.push(format!("--{flag}={value}"));
        if let Some(n) = &self.name {
            opt("name", n);
        }
        opt("restore", utf8(&self.dir));
        if let Some(p) = &self.api_socket {
            opt("api-socket", utf8(p));
        }
        if let Some(s) = &self.serial {
            opt("serial", &s.to_string());
        }
        if let Some(p) = &self.exit_file {
            opt("exit-file", utf8(p));
        }
        for (n, p) in &self.disks {
            opt("disk", &format!("{n}={}", utf8(p)));
        }
        for (n, tap) in &self.taps {
            opt("net", &format!("{n}=tap={tap}"));
        }
        if self.resume {
            a.push("--resume".into());
        }
        Ok(a)
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    pub fn memory_file(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_becomes_one_argv() {
        let mut c = RestoreConfig::new("/run/vms/a/restore");
        c.name = Some("-a".into());
        c.api_socket = Some("/run/vms/a/api.sock".into());
        c.serial = Some(SerialMode::Socket("/run/vms/a/serial.sock".into()));
        c.disks.push((0, "/img/a.qcow2".into()));
        c.taps.push((1, "fvtap1".into()));
        c.resume = true;
        assert_eq!(
            c.to_args().unwrap(),
            [
                "--name=-a",
                "--restore=/run/vms/a/restore",
                "--api-socket=/run/vms/a/api.sock",
                "--serial=socket=/run/vms/a/serial.sock",
                "--disk=0=/img/a.qcow2",
                "--net=1=tap=fvtap1",
                "--resume"
            ]
        );
        c.taps[0].1 = "a,b".into();
        assert!(c.to_args().unwrap_err().0.contains("TAP"));
        c.taps.clear();
        c.disks[0].1 = "".into();
        assert!(c.to_args().unwrap_err().0.contains("--disk"));
    }
}
