//! `info`: what qemu-img info reports, with its JSON field names.

use crate::chain::{open_chain_with, resolve_backing, ChainOpts};
use crate::qcow2::header::{
    COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2,
};
use crate::{BlockBackend, DiskError, Image};
use serde::Serialize;
use std::path::Path;

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    pub compat: String,
    pub compression_type: String,
    pub lazy_refcounts: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapJson>>,
    pub refcount_bits: u32,
    pub corrupt: bool,
    pub extended_l2: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Qcow2Specific,
}

/// One persistent bitmap as `qemu-img info` lists it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BitmapJson {
    /// "in-use" (left by a process that did not close the image: inconsistent), "auto".
    pub flags: Vec<String>,
    pub name: String,
    pub granularity: u64,
}

/// One internal snapshot as `qemu-img info --output=json` lists it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u64,
    pub date_nsec: u64,
    pub vm_clock_sec: u64,
    pub vm_clock_nsec: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
}

impl SnapshotInfo {
    fn from(s: &crate::ops::Snapshot) -> SnapshotInfo {
        SnapshotInfo {
            id: s.id.clone(),
            name: s.name.clone(),
            vm_state_size: s.vm_state_size,
            date_sec: s.date_sec as u64,
            date_nsec: s.date_nsec as u64,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            icount: s.icount,
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    pub virtual_size: u64,
    pub filename: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    pub format: String,
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    pub dirty_flag: bool,
}

fn layer_info(img: &Image, filename: String) -> Result<ImageInfo, DiskError> {
    match img {
        Image::Raw(r) => Ok(ImageInfo {
            snapshots: Vec::new(),
            backing_filename_format: None,
            virtual_size: r.size(),
            filename,
            cluster_size: None,
            format: "raw".into(),
            actual_size: r.file().allocated_bytes(),
            format_specific: None,
            full_backing_filename: None,
            backing_filename: None,
            dirty_flag: false,
        }),
        Image::Qcow2(q) => {
            let h = q.header();
            let full = match &h.backing_file {
                Some(b) => Some(
                    resolve_backing(Path::new(&filename), b)?
                        .display()
                        .to_string(),
                ),
                None => None,
            };
            Ok(ImageInfo {
                snapshots: q.snapshots().iter().map(SnapshotInfo::from).collect(),
                backing_filename_format: h.backing_file.as_ref().and(h.backing_format.clone()),
                virtual_size: h.size,
                filename,
                cluster_size: Some(h.cluster_size()),
                format: "qcow2".into(),
                actual_size: q.file().allocated_bytes(),
                format_specific: Some(FormatSpecific {
                    kind: "qcow2".into(),
                    data: Qcow2Specific {
                        compat: if h.version >= 3 { "1.1" } else { "0.10" }.into(),
                        compression_type: h.compression.name().into(),
                        lazy_refcounts: h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
                        bitmaps: {
                            let list = q.bitmap_list();
                            (!list.is_empty()).then(|| {
                                list.into_iter()
                                    .map(|b| BitmapJson {
                                        flags: [(b.in_use, "in-use"), (b.auto, "auto")]
                                            .iter()
                                            .filter(|(on, _)| *on)
                                            .map(|(_, n)| n.to_string())
                                            .collect(),
                                        name: b.name,
                                        granularity: b.granularity,
                                    })
                                    .collect()
                            })
                        },
                        refcount_bits: 1 << h.refcount_order,
                        corrupt: h.incompatible_features & INCOMPAT_CORRUPT != 0,
                        extended_l2: h.incompatible_features & INCOMPAT_EXTL2 != 0,
                    },
                }),
                full_backing_filename: full,
                backing_filename: h.backing_file.clone(),
                dirty_flag: h.incompatible_features & INCOMPAT_DIRTY != 0,
            })
        }
    }
}

/// Information about an image, and with `backing_chain` about every image below it.
pub fn info(path: &Path, backing_chain: bool) -> Result<Vec<ImageInfo>, DiskError> {
    let top = open_chain_with(
        path,
        None,
        ChainOpts {
            read_only: true,
            top_only: !backing_chain,
            no_locks: true,
            ..Default::default()
        },
    )?;
    let mut out = Vec::new();
    let mut cur = Some(&top);
    let mut name = path.display().to_string();
    while let Some(img) = cur {
        let i = layer_info(img, name.clone())?;
        if let Some(full) = &i.full_backing_filename {
            name = full.clone();
        }
        out.push(i);
        if !backing_chain {
            break;
        }
        cur = img.backing();
    }
    Ok(out)
}

/// qemu-img's human-readable size: "1 GiB", "324 KiB", "1.5 GiB".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    let s = if u == 0 || v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[u])
}

pub fn human_info(i: &ImageInfo) -> String {
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        i.filename,
        i.format,
        human_size(i.virtual_size),
        i.virtual_size,
        human_size(i.actual_size)
    );
    if let Some(cs) = i.cluster_size {
        s += &format!("cluster_size: {cs}\n");
    }
    if let Some(b) = &i.backing_filename {
        s += &format!("backing file: {b}");
        if let Some(full) = &i.full_backing_filename {
            if full != b {
                s += &format!(" (actual path: {full})");
            }
        }
        s += "\n";
    }
    if let Some(f) = &i.backing_filename_format {
        s += &format!("backing file format: {f}\n");
    }
    if !i.snapshots.is_empty() {
        s += &format!("Snapshot list:\n{}\n", crate::ops::snapshot_heading());
        for sn in &i.snapshots {
            let full = crate::ops::Snapshot {
                l1_table_offset: 0,
                l1_size: 0,
                id: sn.id.clone(),
                name: sn.name.clone(),
                date_sec: sn.date_sec as u32,
                date_nsec: sn.date_nsec as u32,
                vm_clock_nsec: sn.vm_clock_sec * 1_000_000_000 + sn.vm_clock_nsec,
                vm_state_size: sn.vm_state_size,
                disk_size: None,
                icount: sn.icount,
                extra_tail: Vec::new(),
            };
            s += &format!("{}\n", crate::ops::snapshot_line(&full));
        }
    }
    if let Some(fs) = &i.format_specific {
        let d = &fs.data;
        s += &format!(
            "Format specific information:\n    compat: {}\n    compression type: {}\n    lazy refcounts: {}\n",
            d.compat, d.compression_type, d.lazy_refcounts
        );
        if let Some(list) = &d.bitmaps {
            s += "    bitmaps:\n";
            for (i, b) in list.iter().enumerate() {
                s += &format!("        [{i}]:\n            flags:\n");
                for (j, f) in b.flags.iter().enumerate() {
                    s += &format!("                [{j}]: {f}\n");
                }
                s += &format!(
                    "            name: {}\n            granularity: {}\n",
                    b.name, b.granularity
                );
            }
        }
        s += &format!(
            "    refcount bits: {}\n    corrupt: {}\n    extended l2: {}\n",
            d.refcount_bits, d.corrupt, d.extended_l2
        );
    }
    s
}
