//! `snapshot`: internal snapshots of a qcow2 image (list, create, apply, delete).

use crate::chain::{open_chain_with, ChainOpts};
pub use crate::qcow2::snapshot::Snapshot;
use crate::qcow2::Qcow2;
pub use crate::qcow2::SnapshotParams;
use crate::{DiskError, Image};
use std::path::Path;
use std::sync::Arc;

fn open_top(path: &Path, read_only: bool) -> Result<Arc<Image>, DiskError> {
    let img = open_chain_with(
        path,
        None,
        ChainOpts {
            read_only,
            top_only: true,
            ..Default::default()
        },
    )?;
    if !matches!(&*img, Image::Qcow2(_)) {
        return Err(DiskError::InvalidArgument(format!(
            "{}: internal snapshots need a qcow2 image (this one is raw)",
            path.display()
        )));
    }
    Ok(img)
}

fn qcow2(img: &Image) -> &Qcow2 {
    match img {
        Image::Qcow2(q) => q,
        // open_top only returns qcow2 layers.
        Image::Raw(_) => unreachable!("open_top checked the format"),
    }
}

/// The snapshots of an image, in table order.
pub fn snapshot_list(path: &Path) -> Result<Vec<Snapshot>, DiskError> {
    let img = open_top(path, true)?;
    Ok(qcow2(&img).snapshots())
}

/// Takes a snapshot named `name` (names may repeat; ids are unique), as `qemu-img snapshot -c`.
pub fn snapshot_create(path: &Path, name: &str) -> Result<Snapshot, DiskError> {
    snapshot_create_with(
        path,
        &SnapshotParams {
            name,
            // qemu-img records an instruction count of 0.
            icount: Some(0),
            ..Default::default()
        },
    )
}

pub fn snapshot_create_with(path: &Path, p: &SnapshotParams<'_>) -> Result<Snapshot, DiskError> {
    let img = open_top(path, false)?;
    qcow2(&img).create_snapshot(p)
}

/// Reverts the image to a snapshot, found by id or else by name.
pub fn snapshot_apply(path: &Path, id_or_name: &str) -> Result<Snapshot, DiskError> {
    let img = open_top(path, false)?;
    qcow2(&img).apply_snapshot(id_or_name)
}

/// Deletes a snapshot, found by id or else by name.
pub fn snapshot_delete(path: &Path, id_or_name: &str) -> Result<Snapshot, DiskError> {
    let img = open_top(path, false)?;
    qcow2(&img).delete_snapshot(id_or_name)
}

/// The VM state saved with a snapshot (empty when none was saved).
pub fn snapshot_vm_state(path: &Path, id_or_name: &str) -> Result<Vec<u8>, DiskError> {
    let img = open_top(path, true)?;
    qcow2(&img).read_vm_state(id_or_name)
}

/// One line of `qemu-img snapshot -l` (and of the list in `qemu-img info`).
pub fn snapshot_line(s: &Snapshot) -> String {
    let date = local_time(s.date_sec as i64);
    let secs = s.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (s.vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
    format!(
        "{:<9} {:<16} {:>8}{:>20}{:>13}{:>11}",
        s.id,
        s.name,
        crate::info::human_size(s.vm_state_size),
        date,
        clock,
        icount
    )
}

/// The heading of the snapshot list.
pub fn snapshot_heading() -> String {
    format!(
        "{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}",
        "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"
    )
}

/// "%Y-%m-%d %H:%M:%S" in local time, as QEMU prints snapshot dates.
fn local_time(t: i64) -> String {
    // SAFETY: localtime_r writes only into `tm`, which lives on this stack frame.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let tt = t as libc::time_t;
    // SAFETY: both pointers are valid for the duration of the call.
    let ok = unsafe { !libc::localtime_r(&tt, &mut tm).is_null() };
    if !ok {
        return t.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}
