//! `ferrovirt img`: qemu-img's verbs over this library.

use crate::info::human_info;
use crate::ops::{self, Repair};
use crate::{create, info, CreateOptions, DiskError, Format, Preallocation};
use clap::{Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "img",
    bin_name = "ferrovirt img",
    about = "Disk image tools with qemu-img's verbs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RepairArg {
    Leaks,
    All,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create an image: create [-f qcow2|raw] [-o cluster_size=,preallocation=] [-b BACKING -F FMT] FILE [SIZE]
    Create {
        #[arg(short = 'f', default_value = "raw")]
        format: String,
        /// Comma-separated options: cluster_size=64K, preallocation=off|metadata|falloc|full
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Backing file, as it will be written in the header
        #[arg(short = 'b')]
        backing: Option<String>,
        /// Format of the backing file
        #[arg(short = 'F')]
        backing_format: Option<String>,
        file: PathBuf,
        /// Size in bytes, or with a suffix K, M, G, T (optional with -b)
        size: Option<String>,
    },
    /// Show information about an image
    Info {
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        #[arg(long)]
        backing_chain: bool,
        #[arg(short = 'f')]
        format: Option<String>,
        file: PathBuf,
    },
    /// Check an image's metadata for leaks and corruption
    Check {
        #[arg(short = 'r', value_enum)]
        repair: Option<RepairArg>,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        #[arg(short = 'f')]
        format: Option<String>,
        file: PathBuf,
    },
    /// Copy an image (flattening its backing chain) into a new image
    Convert {
        #[arg(short = 'f')]
        src_format: Option<String>,
        #[arg(short = 'O', default_value = "raw")]
        out_format: String,
        #[arg(short = 'o')]
        options: Vec<String>,
        src: PathBuf,
        dst: PathBuf,
    },
    /// Write an overlay's changes into its backing file
    Commit {
        #[arg(short = 'f')]
        format: Option<String>,
        file: PathBuf,
    },
    /// Change an image's backing file
    Rebase {
        /// Only rewrite the header; do not copy data
        #[arg(short = 'u')]
        unsafe_only: bool,
        #[arg(short = 'b')]
        backing: String,
        #[arg(short = 'F')]
        backing_format: Option<String>,
        #[arg(short = 'f')]
        format: Option<String>,
        file: PathBuf,
    },
    /// Grow an image: resize FILE [+]SIZE
    Resize {
        #[arg(short = 'f')]
        format: Option<String>,
        file: PathBuf,
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Internal snapshots: snapshot -l | -a NAME | -c NAME | -d NAME FILE
    #[command(group(clap::ArgGroup::new("action").required(true).args(["list", "apply", "create", "delete"])))]
    Snapshot {
        /// List the snapshots
        #[arg(short = 'l')]
        list: bool,
        /// Revert the image to a snapshot (by id or name)
        #[arg(short = 'a', value_name = "SNAPSHOT")]
        apply: Option<String>,
        /// Take a snapshot with this name
        #[arg(short = 'c', value_name = "SNAPSHOT")]
        create: Option<String>,
        /// Delete a snapshot (by id or name)
        #[arg(short = 'd', value_name = "SNAPSHOT")]
        delete: Option<String>,
        /// Quiet (accepted for qemu-img compatibility; nothing is printed on success)
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'f')]
        format: Option<String>,
        file: PathBuf,
    },
    /// Persistent dirty bitmaps: bitmap (--add [-g G] | --remove | --clear | --enable | --disable | --merge SRC)... FILE BITMAP
    #[command(group(clap::ArgGroup::new("op").required(true).multiple(true).args(["add", "remove", "clear", "enable", "disable", "merge"])))]
    Bitmap {
        /// Create the bitmap (enabled unless --disable is also given)
        #[arg(long)]
        add: bool,
        #[arg(long)]
        remove: bool,
        /// Mark everything clean
        #[arg(long)]
        clear: bool,
        /// Record writes into the bitmap
        #[arg(long)]
        enable: bool,
        /// Stop recording writes into the bitmap
        #[arg(long)]
        disable: bool,
        /// Also mark what bitmap SOURCE (of the same image) marks
        #[arg(long, value_name = "SOURCE")]
        merge: Vec<String>,
        /// Granularity for --add (bytes, or with a suffix)
        #[arg(short = 'g')]
        granularity: Option<String>,
        #[arg(short = 'f')]
        format: Option<String>,
        file: PathBuf,
        bitmap: String,
    },
    /// Pull the backing chain's data into FILE and drop its backing file (qemu-img has
    /// no such verb; `rebase -b ""` does the same in one pass)
    Stream {
        #[arg(short = 'f')]
        format: Option<String>,
        file: PathBuf,
    },
    /// Serve an image over NBD until SIGTERM/SIGINT (the role of qemu-nbd)
    #[command(group(clap::ArgGroup::new("listen").required(true).args(["socket", "bind"])))]
    Nbd {
        /// Refuse writes
        #[arg(long)]
        read_only: bool,
        /// Offer the persistent bitmap NAME as the qemu:dirty-bitmap:NAME context
        #[arg(long, value_name = "NAME")]
        bitmap: Option<String>,
        /// Export name (default "", as qemu-nbd's)
        #[arg(short = 'x', long, default_value = "")]
        export_name: String,
        /// Export an internal snapshot (by id or name), read-only
        #[arg(long, value_name = "NAME")]
        snapshot: Option<String>,
        /// Listen on a Unix socket (created 0600; must not exist)
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Listen on TCP HOST:PORT
        #[arg(long, value_name = "HOST:PORT")]
        bind: Option<String>,
        #[arg(short = 'f')]
        format: Option<String>,
        file: PathBuf,
    },
    /// Compare the contents of two images: exit 0 identical, 1 different, 2 error
    Compare {
        #[arg(short = 'f')]
        format1: Option<String>,
        #[arg(short = 'F')]
        format2: Option<String>,
        /// Strict: images of different sizes differ
        #[arg(short = 's')]
        strict: bool,
        /// Quiet
        #[arg(short = 'q')]
        quiet: bool,
        file1: PathBuf,
        file2: PathBuf,
    },
    /// Copy part of an image into a new one: dd [-f FMT] [-O FMT] [bs=N] [count=N] [skip=N] if=IN of=OUT
    Dd {
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(short = 'O', default_value = "raw")]
        out_format: String,
        /// bs=BYTES (default 512), count=BLOCKS, skip=BLOCKS, if=INPUT, of=OUTPUT
        #[arg(required = true)]
        operands: Vec<String>,
    },
    /// How large a new image would be: measure [--output=human|json] [-O FMT] [-o OPTIONS] (--size N | [-f FMT] FILE)
    Measure {
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        #[arg(short = 'O', default_value = "raw")]
        out_format: String,
        /// cluster_size=, compat=0.10|1.1, refcount_bits=, preallocation=, backing_file=, extended_l2=
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Measure a new empty image of this size instead of FILE
        #[arg(long)]
        size: Option<String>,
        #[arg(short = 'f')]
        format: Option<String>,
        /// Internal snapshot of FILE (not supported)
        #[arg(short = 'l')]
        snapshot: Option<String>,
        file: Option<PathBuf>,
    },
    /// Change a qcow2 image's options: amend -o compat=0.10|1.1,lazy_refcounts=on|off,size=N [-f FMT] FILE
    Amend {
        #[arg(short = 'o')]
        options: Vec<String>,
        #[arg(short = 'f')]
        format: Option<String>,
        /// Progress (accepted; amend is quick)
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        /// Cache mode (accepted for compatibility)
        #[arg(short = 't')]
        cache: Option<String>,
        #[arg(long)]
        force: bool,
        file: PathBuf,
    },
    /// Time a run of read or write requests, like qemu-img bench
    Bench {
        #[arg(short = 'c', default_value = "75000", allow_hyphen_values = true)]
        count: String,
        #[arg(short = 'd', default_value = "64", allow_hyphen_values = true)]
        depth: String,
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(long, allow_hyphen_values = true)]
        flush_interval: Option<String>,
        /// AIO mode (accepted for compatibility)
        #[arg(short = 'i')]
        aio: Option<String>,
        /// Native AIO (accepted for compatibility)
        #[arg(short = 'n')]
        native: bool,
        #[arg(long)]
        no_drain: bool,
        #[arg(short = 'o', allow_hyphen_values = true)]
        offset: Option<String>,
        #[arg(long, allow_hyphen_values = true)]
        pattern: Option<String>,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 's', allow_hyphen_values = true)]
        buf_size: Option<String>,
        #[arg(short = 'S', allow_hyphen_values = true)]
        step: Option<String>,
        /// none, writeback, writethrough, directsync or unsafe
        #[arg(short = 't', default_value = "writeback")]
        cache: String,
        #[arg(short = 'w')]
        write: bool,
        /// Force share (accepted; reads take no exclusive lock anyway)
        #[arg(short = 'U')]
        force_share: bool,
        file: PathBuf,
    },
    /// Show where an image's data lives
    Map {
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        #[arg(short = 'f')]
        format: Option<String>,
        file: PathBuf,
    },
}

/// Parses "1024", "512K", "16G", "1.5G" (binary units) into bytes.
pub fn parse_size(s: &str) -> Result<u64, DiskError> {
    let bad = || {
        DiskError::InvalidArgument(format!(
            "invalid size '{s}': use bytes or a number with K, M, G, T, P or E"
        ))
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => return Err(bad()),
    };
    if num.is_empty() {
        return Err(bad());
    }
    if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| bad())?;
        let bytes = v * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 || bytes.fract() != 0.0 {
            return Err(bad());
        }
        return Ok(bytes as u64);
    }
    let v: u64 = num.parse().map_err(|_| bad())?;
    v.checked_mul(1u64 << shift).ok_or_else(bad)
}

struct ImgOpts {
    cluster_size: Option<u32>,
    preallocation: Preallocation,
    backing: Option<String>,
    backing_format: Option<String>,
}

fn parse_opts(list: &[String]) -> Result<ImgOpts, DiskError> {
    let mut o = ImgOpts {
        cluster_size: None,
        preallocation: Preallocation::Off,
        backing: None,
        backing_format: None,
    };
    for item in list.iter().flat_map(|s| s.split(',')) {
        if item.is_empty() {
            continue;
        }
        let (k, v) = item.split_once('=').ok_or_else(|| {
            DiskError::InvalidArgument(format!("option '{item}' is not of the form key=value"))
        })?;
        match k {
            "cluster_size" => {
                let cs = parse_size(v)?;
                o.cluster_size = Some(u32::try_from(cs).map_err(|_| DiskError::InvalidArgument(format!("cluster size {v} is too large")))?);
            }
            "preallocation" => o.preallocation = Preallocation::parse(v)?,
            "backing_file" => o.backing = Some(v.to_string()),
            "backing_fmt" => o.backing_format = Some(v.to_string()),
            other => {
                return Err(DiskError::InvalidArgument(format!(
                    "unknown option '{other}': supported are cluster_size, preallocation, backing_file, backing_fmt"
                )))
            }
        }
    }
    Ok(o)
}

fn opt_format(f: &Option<String>) -> Result<Option<Format>, DiskError> {
    Ok(f.as_deref().map(Format::parse).transpose()?)
}

/// Pretty JSON indented like qemu-img's (four spaces).
fn json<T: serde::Serialize>(v: &T) -> String {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    match v.serialize(&mut ser) {
        Ok(()) => String::from_utf8_lossy(&out).into_owned(),
        Err(e) => format!("{{\"error\": \"{e}\"}}"),
    }
}

/// One map entry on one line, spaced like qemu-img's `map --output=json`.
fn map_json_line(e: &ops::MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data
    );
    if e.compressed {
        s += ", \"compressed\": true";
    }
    if let Some(off) = e.offset {
        s += &format!(", \"offset\": {off}");
    }
    s + "}"
}

/// Runs `ferrovirt img` with the arguments that follow `img`; returns the process exit code.
pub fn run(args: Vec<OsString>) -> i32 {
    let argv = std::iter::once(OsString::from("ferrovirt img")).chain(args);
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match execute(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferrovirt img: {e}");
            1
        }
    }
}

fn execute(cmd: Cmd) -> Result<i32, DiskError> {
    match cmd {
        Cmd::Create {
            format,
            options,
            backing,
            backing_format,
            file,
            size,
        } => {
            let format = Format::parse(&format)?;
            let o = parse_opts(&options)?;
            let backing = backing.or(o.backing);
            let backing_format = backing_format.or(o.backing_format);
            let size = match size {
                Some(s) => parse_size(&s)?,
                None if backing.is_some() => 0,
                None => {
                    return Err(DiskError::InvalidArgument(
                        "a SIZE is needed when there is no backing file (-b)".into(),
                    ))
                }
            };
            let backing = match backing {
                Some(b) => {
                    let fmt = match backing_format {
                        Some(f) => Format::parse(&f)?,
                        None => {
                            let p = crate::chain::resolve_backing(&file, &b)?;
                            let f =
                                crate::file::ImageFile::open(&p, false, false).map_err(|e| {
                                    DiskError::BackingChain {
                                        path: file.clone(),
                                        reason: format!("cannot open backing file: {e}"),
                                    }
                                })?;
                            crate::chain::probe(&f)?
                        }
                    };
                    Some((b, fmt))
                }
                None => None,
            };
            let opts = CreateOptions {
                format,
                size,
                cluster_size: o.cluster_size,
                preallocation: o.preallocation,
                backing,
            };
            create(&file, &opts)?;
            let real = info(&file, false)?
                .first()
                .map(|i| i.virtual_size)
                .unwrap_or(size);
            println!(
                "Formatting '{}', fmt={} size={real}",
                file.display(),
                format.as_str()
            );
            Ok(0)
        }
        Cmd::Info {
            output,
            backing_chain,
            format: _,
            file,
        } => {
            let infos = info(&file, backing_chain)?;
            match output {
                Output::Json if backing_chain => println!("{}", json(&infos)),
                Output::Json => println!("{}", json(&infos[0])),
                Output::Human => {
                    let parts: Vec<String> = infos.iter().map(human_info).collect();
                    print!("{}", parts.join("\n"));
                }
            }
            Ok(0)
        }
        Cmd::Check {
            repair,
            output,
            format: _,
            file,
        } => {
            let repair = repair.map(|r| match r {
                RepairArg::Leaks => Repair::Leaks,
                RepairArg::All => Repair::All,
            });
            if info(&file, false)?
                .first()
                .is_some_and(|i| i.format == "raw")
            {
                // qemu-img's exit code for "this format does not support checks".
                eprintln!(
                    "ferrovirt img: {}: raw images have no metadata to check",
                    file.display()
                );
                return Ok(63);
            }
            let r = ops::check(&file, repair)?;
            if output == Output::Json {
                println!("{}", json(&r));
                return Ok(r.exit_code());
            }
            for m in &r.messages {
                eprintln!("{m}");
            }
            if r.leaks_fixed + r.corruptions_fixed > 0 {
                println!(
                    "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                    r.leaks_fixed, r.corruptions_fixed
                );
            }
            if r.corruptions > 0 {
                println!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                    r.corruptions
                );
            }
            if r.leaks > 0 {
                println!("\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.", r.leaks);
            }
            if r.corruptions == 0 && r.leaks == 0 {
                println!("No errors were found on the image.");
            }
            if r.total_clusters > 0 {
                let pct = |n: u64| n as f64 * 100.0 / r.total_clusters as f64;
                let apct = |n: u64| {
                    if r.allocated_clusters == 0 {
                        0.0
                    } else {
                        n as f64 * 100.0 / r.allocated_clusters as f64
                    }
                };
                println!(
                    "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                    r.allocated_clusters,
                    r.total_clusters,
                    pct(r.allocated_clusters),
                    apct(r.fragmented_clusters),
                    apct(r.compressed_clusters)
                );
            }
            println!("Image end offset: {}", r.image_end_offset);
            Ok(r.exit_code())
        }
        Cmd::Convert {
            src_format,
            out_format,
            options,
            src,
            dst,
        } => {
            let o = parse_opts(&options)?;
            if o.backing.is_some() {
                return Err(DiskError::InvalidArgument(
                    "convert writes a standalone image; backing_file is not supported".into(),
                ));
            }
            let opts =
                ops::convert_options(Format::parse(&out_format)?, o.cluster_size, o.preallocation);
            ops::convert(&src, opt_format(&src_format)?, &dst, &opts)?;
            Ok(0)
        }
        Cmd::Commit { format: _, file } => {
            ops::commit(&file)?;
            println!("Image committed.");
            Ok(0)
        }
        Cmd::Rebase {
            unsafe_only,
            backing,
            backing_format,
            format: _,
            file,
        } => {
            ops::rebase(&file, &backing, opt_format(&backing_format)?, unsafe_only)?;
            Ok(0)
        }
        Cmd::Resize {
            format: _,
            file,
            size,
        } => {
            let (relative, spec) = match size.strip_prefix('+') {
                Some(rest) => (true, rest),
                None if size.starts_with('-') => {
                    return Err(DiskError::InvalidArgument(
                        "shrinking is not supported: it would destroy data".into(),
                    ));
                }
                None => (false, size.as_str()),
            };
            let n = parse_size(spec)?;
            let new_size = if relative {
                let cur = info(&file, false)?
                    .first()
                    .map(|i| i.virtual_size)
                    .unwrap_or(0);
                cur.checked_add(n)
                    .ok_or_else(|| DiskError::InvalidArgument("size overflows".into()))?
            } else {
                n
            };
            ops::resize(&file, new_size)?;
            println!("Image resized.");
            Ok(0)
        }
        Cmd::Snapshot {
            list,
            apply,
            create,
            delete,
            quiet: _,
            format,
            file,
        } => {
            if opt_format(&format)? == Some(Format::Raw) {
                return Err(DiskError::InvalidArgument(
                    "raw images have no internal snapshots; use qcow2".into(),
                ));
            }
            let fail = |verb: &str, name: &str, e: DiskError| {
                DiskError::InvalidArgument(format!("Could not {verb} snapshot '{name}': {e}"))
            };
            if list {
                let snaps = ops::snapshot_list(&file)?;
                if !snaps.is_empty() {
                    println!("Snapshot list:\n{}", ops::snapshot_heading());
                    for sn in &snaps {
                        println!("{}", ops::snapshot_line(sn));
                    }
                }
            } else if let Some(name) = create {
                ops::snapshot_create(&file, &name).map_err(|e| fail("create", &name, e))?;
            } else if let Some(name) = apply {
                ops::snapshot_apply(&file, &name).map_err(|e| fail("apply", &name, e))?;
            } else if let Some(name) = delete {
                ops::snapshot_delete(&file, &name).map_err(|e| fail("delete", &name, e))?;
            }
            Ok(0)
        }
        Cmd::Bitmap {
            add,
            remove,
            clear,
            enable,
            disable,
            merge,
            granularity,
            format,
            file,
            bitmap,
        } => {
            if opt_format(&format)? == Some(Format::Raw) {
                return Err(DiskError::InvalidArgument(
                    "raw images have no bitmaps; use qcow2".into(),
                ));
            }
            if granularity.is_some() && !add {
                return Err(DiskError::InvalidArgument(
                    "-g applies to --add only".into(),
                ));
            }
            let mut list = Vec::new();
            if add {
                list.push(ops::BitmapOp::Add {
                    granularity: granularity.as_deref().map(parse_size).transpose()?,
                    disabled: disable,
                });
            }
            if clear {
                list.push(ops::BitmapOp::Clear);
            }
            list.extend(merge.into_iter().map(ops::BitmapOp::Merge));
            if enable {
                list.push(ops::BitmapOp::Enable);
            }
            if disable && !add {
                list.push(ops::BitmapOp::Disable);
            }
            if remove {
                list.push(ops::BitmapOp::Remove);
            }
            ops::bitmap(&file, &bitmap, &list)?;
            Ok(0)
        }
        Cmd::Stream { format, file } => {
            if opt_format(&format)? == Some(Format::Raw) {
                return Err(DiskError::InvalidArgument(
                    "a raw image has no backing file to stream from".into(),
                ));
            }
            crate::jobs::stream_offline(&file)?;
            println!("Image streamed.");
            Ok(0)
        }
        Cmd::Nbd {
            read_only,
            bitmap,
            export_name,
            snapshot,
            socket,
            bind,
            format: _,
            file,
        } => {
            let listen = match (socket, bind) {
                (Some(p), _) => crate::nbd::Listen::Unix(p),
                (None, Some(a)) => crate::nbd::Listen::Tcp(a),
                (None, None) => {
                    return Err(DiskError::InvalidArgument(
                        "--socket PATH or --bind HOST:PORT is needed".into(),
                    ))
                }
            };
            let opts = crate::nbd::ExportOptions {
                read_only,
                bitmap,
                name: export_name,
                snapshot,
            };
            crate::nbd::serve(&file, &opts, &listen, || {})?;
            Ok(0)
        }
        Cmd::Compare {
            format1,
            format2,
            strict,
            quiet,
            file1,
            file2,
        } => {
            // qemu-img compare exits 2 on errors, not 1 (which means "different").
            let r =
                (|| ops::compare(&file1, opt_format(&format1)?, &file2, opt_format(&format2)?))();
            let c = match r {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ferrovirt img: {e}");
                    return Ok(2);
                }
            };
            let say = |m: &str| {
                if !quiet {
                    println!("{m}");
                }
            };
            if c.size_mismatch {
                if strict {
                    say("Strict mode: Image size mismatch!");
                    return Ok(1);
                }
                say("Warning: Image size mismatch!");
            }
            match c.first_difference {
                Some(off) => {
                    say(&format!("Content mismatch at offset {off}!"));
                    Ok(1)
                }
                None => {
                    say("Images are identical.");
                    Ok(0)
                }
            }
        }
        Cmd::Dd {
            format,
            out_format,
            operands,
        } => {
            let mut bs = 512u64;
            let (mut count, mut skip) = (None, 0u64);
            let (mut input, mut output) = (None, None);
            for op in &operands {
                let (k, v) = op.split_once('=').ok_or_else(|| {
                    DiskError::InvalidArgument(format!("'{op}' is not of the form key=value"))
                })?;
                match k {
                    "bs" => bs = parse_size(v)?,
                    "count" => count = Some(parse_size(v)?),
                    "skip" => skip = parse_size(v)?,
                    "if" => input = Some(PathBuf::from(v)),
                    "of" => output = Some(PathBuf::from(v)),
                    other => {
                        return Err(DiskError::InvalidArgument(format!(
                            "unknown operand '{other}': use bs, count, skip, if, of"
                        )))
                    }
                }
            }
            if bs == 0 {
                return Err(DiskError::InvalidArgument("bs must be at least 1".into()));
            }
            let (Some(input), Some(output)) = (input, output) else {
                return Err(DiskError::InvalidArgument("if= and of= are needed".into()));
            };
            ops::dd(
                &input,
                opt_format(&format)?,
                &output,
                Format::parse(&out_format)?,
                bs,
                count,
                skip,
            )?;
            Ok(0)
        }
        Cmd::Measure {
            output,
            out_format,
            options,
            size,
            format,
            snapshot,
            file,
        } => crate::img_verbs::measure(crate::img_verbs::MeasureArgs {
            json: output == Output::Json,
            out_format,
            options,
            size,
            format: opt_format(&format)?,
            snapshot,
            file,
        }),
        Cmd::Amend {
            options,
            format,
            file,
            ..
        } => crate::img_verbs::amend(&options, opt_format(&format)?, &file),
        Cmd::Bench {
            count,
            depth,
            format,
            flush_interval,
            no_drain,
            offset,
            pattern,
            buf_size,
            step,
            cache,
            write,
            file,
            ..
        } => crate::img_verbs::bench(crate::img_verbs::BenchArgs {
            count,
            depth,
            format: opt_format(&format)?,
            flush_interval,
            no_drain,
            offset,
            pattern,
            buf_size,
            step,
            cache,
            write,
            file,
        }),
        Cmd::Map {
            output,
            format: _,
            file,
        } => {
            let entries = ops::map(&file)?;
            match output {
                Output::Json => {
                    let lines: Vec<String> = entries.iter().map(map_json_line).collect();
                    println!("[{}]", lines.join(",\n"));
                }
                Output::Human => {
                    println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
                    for e in entries.iter().filter(|e| e.data) {
                        if let Some(off) = e.offset {
                            println!(
                                "{:<#16x}{:<#16x}{:<#16x}{}",
                                e.start, e.length, off, e.filename
                            );
                        }
                    }
                }
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("16G").unwrap(), 16 << 30);
        assert_eq!(parse_size("16g").unwrap(), 16 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        for bad in ["", "G", "12Q", "-1", "1.2.3G", "99999999999E", "0.3"] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
    }
}
