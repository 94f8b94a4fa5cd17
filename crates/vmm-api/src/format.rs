//! The disk image format, one type for definitions, ferrovmm's `--disk` and the image library.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

/// A format name that is neither raw nor qcow2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownFormat(pub String);

impl fmt::Display for UnknownFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown image format '{}': use qcow2 or raw", self.0)
    }
}

impl std::error::Error for UnknownFormat {}

impl DiskFormat {
    pub const ALL: [DiskFormat; 2] = [DiskFormat::Raw, DiskFormat::Qcow2];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }

    pub fn parse(s: &str) -> Result<DiskFormat, UnknownFormat> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| UnknownFormat(s.to_string()))
    }
}

impl FromStr for DiskFormat {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DiskFormat::parse(s)
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for f in DiskFormat::ALL {
            assert_eq!(DiskFormat::parse(f.as_str()), Ok(f));
            assert_eq!(
                serde_json::to_string(&f).unwrap(),
                format!("\"{}\"", f.as_str())
            );
        }
        let e = DiskFormat::parse("vmdk").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown image format 'vmdk': use qcow2 or raw"
        );
        assert!(DiskFormat::parse("QCOW2").is_err());
    }
}
