//! `ferrovirt img measure | amend | bench`: option parsing and output in qemu-img's words.

use crate::img_cli::parse_size;
use crate::ops::{self, BenchOptions, MeasureOptions, MeasureSource};
use crate::{DiskError, Format, Preallocation};
use std::path::PathBuf;

fn invalid(m: String) -> DiskError {
    DiskError::InvalidArgument(m)
}

pub(crate) struct MeasureArgs {
    pub json: bool,
    pub out_format: String,
    pub options: Vec<String>,
    pub size: Option<String>,
    pub format: Option<Format>,
    pub snapshot: Option<String>,
    pub file: Option<PathBuf>,
}

fn measure_options(format: Format, list: &[String]) -> Result<MeasureOptions, DiskError> {
    let mut o = MeasureOptions {
        format,
        ..Default::default()
    };
    for item in list.iter().flat_map(|s| s.split(',')) {
        if item.is_empty() {
            continue;
        }
        let (k, v) = item.split_once('=').unwrap_or((item, "on"));
        let qcow2_only = |k: &str| -> Result<(), DiskError> {
            if format == Format::Raw {
                return Err(invalid(format!(
                    "Invalid parameter '{k}'\nInvalid options for file format 'raw'"
                )));
            }
            Ok(())
        };
        match k {
            "preallocation" => o.preallocation = Preallocation::parse(v)?,
            "size" => {}
            "cluster_size" => {
                qcow2_only(k)?;
                o.cluster_size = Some(parse_size(v)?);
            }
            "compat" => {
                qcow2_only(k)?;
                o.version = match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(invalid(format!("Invalid compatibility level: '{v}'"))),
                }
            }
            "refcount_bits" => {
                qcow2_only(k)?;
                o.refcount_bits = Some(v.parse().map_err(|_| {
                    invalid("Parameter 'refcount_bits' expects a number".to_string())
                })?);
            }
            "backing_file" => {
                qcow2_only(k)?;
                o.backing = true;
            }
            "extended_l2" => {
                qcow2_only(k)?;
                o.extended_l2 = matches!(v, "on" | "yes" | "true");
            }
            "backing_fmt" | "lazy_refcounts" | "compression_type" => qcow2_only(k)?,
            _ => return Err(invalid(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(o)
}

pub(crate) fn measure(a: MeasureArgs) -> Result<i32, DiskError> {
    let format = Format::parse(&a.out_format)?;
    if a.snapshot.is_some() {
        return Err(DiskError::Unsupported {
            path: a.file.clone().unwrap_or_default(),
            feature: "measuring an internal snapshot (-l)".into(),
        });
    }
    let size = a.size.as_deref().map(parse_size).transpose()?;
    let src = match (&a.file, size) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "--size N cannot be used together with a filename.".into(),
            ))
        }
        (None, None) => {
            return Err(invalid(
                "Either --size N or one filename must be specified.".into(),
            ))
        }
        (Some(p), None) => MeasureSource::Image {
            path: p,
            format: a.format,
        },
        (None, Some(s)) => MeasureSource::Size(s),
    };
    let m = ops::measure(&src, &measure_options(format, &a.options)?)?;
    if a.json {
        let mut lines = Vec::new();
        if let Some(b) = m.bitmaps {
            lines.push(format!("    \"bitmaps\": {b}"));
        }
        lines.push(format!("    \"required\": {}", m.required));
        lines.push(format!("    \"fully-allocated\": {}", m.fully_allocated));
        println!("{{\n{}\n}}", lines.join(",\n"));
    } else {
        println!("required size: {}", m.required);
        println!("fully allocated size: {}", m.fully_allocated);
        if let Some(b) = m.bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(0)
}

pub(crate) fn amend(
    options: &[String],
    format: Option<Format>,
    file: &std::path::Path,
) -> Result<i32, DiskError> {
    if options.is_empty() {
        return Err(invalid("Must specify options (-o)".into()));
    }
    let o = ops::parse_amend_options(options)?;
    ops::amend(file, format, &o)?;
    Ok(0)
}

pub(crate) struct BenchArgs {
    pub count: String,
    pub depth: String,
    pub format: Option<Format>,
    pub flush_interval: Option<String>,
    pub no_drain: bool,
    pub offset: Option<String>,
    pub pattern: Option<String>,
    pub buf_size: Option<String>,
    pub step: Option<String>,
    pub cache: String,
    pub write: bool,
    pub file: PathBuf,
}

const SUFFIX_HINT: &str = "You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.";

fn int_arg(v: &str, what: &str, min: u64) -> Result<u64, DiskError> {
    v.parse::<i32>()
        .ok()
        .filter(|&n| n >= 0 && n as u64 >= min)
        .map(|n| n as u64)
        .ok_or_else(|| invalid(format!("Invalid {what} specified")))
}

fn size_arg(v: &Option<String>, what: &str) -> Result<Option<u64>, DiskError> {
    v.as_deref()
        .map(|s| {
            parse_size(s).map_err(|_| invalid(format!("Invalid {what} specified. {SUFFIX_HINT}")))
        })
        .transpose()
}

pub(crate) fn bench(a: BenchArgs) -> Result<i32, DiskError> {
    let (direct, write_through) = match a.cache.as_str() {
        "none" => (true, false),
        "writeback" | "unsafe" => (false, false),
        "writethrough" => (false, true),
        "directsync" => (true, true),
        _ => return Err(invalid("Invalid cache mode".into())),
    };
    let pattern = match &a.pattern {
        Some(p) => {
            let v = match p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
                Some(h) => u32::from_str_radix(h, 16).ok(),
                None => p.parse::<u32>().ok(),
            };
            match v {
                Some(b) if b <= 0xff => b as u8,
                _ => return Err(invalid("Invalid pattern byte specified".into())),
            }
        }
        None => 0,
    };
    let buf_size = size_arg(&a.buf_size, "buffer size")?.unwrap_or(4096);
    let o = BenchOptions {
        count: int_arg(&a.count, "request count", 0)?,
        depth: int_arg(&a.depth, "queue depth", 1)?,
        buf_size,
        step: size_arg(&a.step, "step_size")?,
        offset: size_arg(&a.offset, "offset")?.unwrap_or(0),
        write: a.write,
        pattern,
        flush_interval: match &a.flush_interval {
            Some(v) => int_arg(v, "flush interval", 0)?,
            None => 0,
        },
        no_drain: a.no_drain,
        direct,
        write_through,
        format: a.format,
    };
    let took = ops::bench(&a.file, &o, |s| print!("{s}"))?;
    println!("Run completed in {:.3} seconds.", took.as_secs_f64());
    Ok(0)
}
