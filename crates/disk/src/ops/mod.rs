//! Whole-image operations behind `ferrovirt img`: check, map, convert, commit, rebase, resize.

mod amend;
mod bench;
mod bitmap;
mod check;
mod compare;
mod map;
mod measure;
mod rewrite;
mod snapshot;

pub use amend::{amend, parse_amend_options, AmendOptions};
pub use bench::{bench, BenchOptions};
pub use bitmap::{bitmap, bitmap_extents, bitmap_list, BitmapInfo, BitmapOp};
pub use check::{check, CheckReport, Repair};
pub use compare::{compare, Comparison};
pub(crate) use map::chain_status;
pub use map::{map, MapEntry};
pub use measure::{measure, MeasureOptions, MeasureSource, Measurement};
pub use rewrite::{commit, convert, convert_options, dd, rebase, resize};
pub use snapshot::{
    snapshot_apply, snapshot_create, snapshot_create_with, snapshot_delete, snapshot_heading,
    snapshot_line, snapshot_list, snapshot_vm_state, Snapshot, SnapshotParams,
};
