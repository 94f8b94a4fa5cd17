//! Whole-image operations behind `ferrovirt img`: check, map, convert, commit, rebase, resize.

mod check;
mod map;
mod rewrite;

pub use check::{check, CheckReport, Repair};
pub use map::{map, MapEntry};
pub use rewrite::{commit, convert, convert_options, rebase, resize};
