//! `amend`: change options of an existing qcow2 image in place (compat level, lazy
//! refcounts, size), with the option names and checks of `qemu-img amend` (QEMU 7.2).

use crate::chain::{open_chain_with, ChainOpts};
use crate::img_cli::parse_size;
use crate::{DiskError, Format, Image};
use std::path::Path;

/// What to change; None leaves a setting as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: Option<u32>,
    pub lazy_refcounts: Option<bool>,
    /// Accepted only when equal to the image's (as QEMU: use rebase to change it).
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
    /// New virtual size (growing only).
    pub size: Option<u64>,
    /// Accepted only when equal to the image's.
    pub refcount_bits: Option<u64>,
}

fn invalid(msg: String) -> DiskError {
    DiskError::InvalidArgument(msg)
}

fn parse_bool(key: &str, v: &str) -> Result<bool, DiskError> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(invalid(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

/// Parses `-o` lists (comma separated key=value) as qemu-img amend does for qcow2.
pub fn parse_amend_options(list: &[String]) -> Result<AmendOptions, DiskError> {
    let mut o = AmendOptions::default();
    for item in list.iter().flat_map(|s| s.split(',')) {
        if item.is_empty() {
            continue;
        }
        let (k, v) = item.split_once('=').unwrap_or((item, "on"));
        match k {
            "compat" => {
                o.version = Some(match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(invalid(format!("Unknown compatibility level {v}"))),
                })
            }
            "lazy_refcounts" => o.lazy_refcounts = Some(parse_bool(k, v)?),
            "backing_file" => o.backing_file = Some(v.to_string()),
            "backing_fmt" => o.backing_fmt = Some(v.to_string()),
            "size" => o.size = Some(parse_size(v)?),
            "refcount_bits" => {
                o.refcount_bits = Some(v.parse().map_err(|_| {
                    invalid("Parameter 'refcount_bits' expects a number".to_string())
                })?)
            }
            "data_file" | "data_file_raw" => {
                return Err(invalid(format!(
                    "Invalid parameter '{k}': external data files are not supported"
                )))
            }
            k if k.starts_with("encrypt.") => {
                return Err(invalid(format!(
                    "Invalid parameter '{k}': encryption is not supported"
                )))
            }
            "cluster_size" | "preallocation" | "encryption" | "extended_l2"
            | "compression_type" => {
                return Err(invalid(format!(
                    "Invalid parameter '{k}'\nThis option is only supported for image creation"
                )))
            }
            _ => return Err(invalid(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(o)
}

/// Applies `o` to the image at `path` (qcow2 only).
pub fn amend(path: &Path, format: Option<Format>, o: &AmendOptions) -> Result<(), DiskError> {
    if format == Some(Format::Raw) {
        return Err(invalid(
            "Format driver 'raw' does not support option amendment".into(),
        ));
    }
    let img = open_chain_with(
        path,
        format,
        ChainOpts {
            top_only: true,
            ..Default::default()
        },
    )?;
    let Image::Qcow2(q) = &*img else {
        return Err(invalid(
            "Format driver 'raw' does not support option amendment".into(),
        ));
    };
    let h = q.header();
    if o.backing_file.is_some() || o.backing_fmt.is_some() {
        let same = |want: &Option<String>, have: &Option<String>| {
            want.is_none() || want.as_deref().filter(|s| !s.is_empty()) == have.as_deref()
        };
        if !same(&o.backing_file, &h.backing_file) || !same(&o.backing_fmt, &h.backing_format) {
            return Err(invalid(
                "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into(),
            ));
        }
    }
    let version = o.version.unwrap_or(h.version);
    if o.lazy_refcounts == Some(true) && version < 3 {
        return Err(invalid(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into(),
        ));
    }
    if let Some(bits) = o.refcount_bits {
        if bits != 1u64 << h.refcount_order {
            return Err(DiskError::Unsupported {
                path: path.into(),
                feature: "changing refcount_bits in place (convert the image with -o refcount_bits instead)".into(),
            });
        }
    }
    if let Some(s) = o.size {
        if !s.is_multiple_of(512) {
            return Err(invalid("The new size must be a multiple of 512".into()));
        }
    }
    if version > h.version {
        q.set_version(version)?;
    }
    if let Some(on) = o.lazy_refcounts {
        q.set_lazy_refcounts(on)?;
    }
    if let Some(s) = o.size {
        crate::create::check_size(s)?;
        let cur = crate::BlockBackend::size(q);
        if s < cur {
            return Err(invalid(format!(
                "shrinking {} from {cur} to {s} bytes would destroy data and is not supported",
                path.display()
            )));
        }
        if s > cur {
            q.grow(s)?;
        }
    }
    if version < h.version {
        q.set_version(version)?;
    }
    q.store_bitmaps()?;
    crate::BlockBackend::flush(q)
}
