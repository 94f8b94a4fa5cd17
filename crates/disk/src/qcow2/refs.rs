//! Counting the references of a set of L1 trees: each L2 table once per L1 entry that
//! points at it, each data cluster once per path through an L2 table (the way
//! `qemu-img check` counts them). Shared L2 tables are read once, whatever the number
//! of snapshots sharing them.

use super::meta::{Geometry, Mapping, L1_OFFSET_MASK};
use crate::DiskError;
use std::collections::BTreeMap;

/// References per host cluster, grown on demand up to a bound.
pub struct Refs {
    pub counts: Vec<u32>,
    limit: u64,
    /// One line per reference that points outside the file or is unaligned.
    pub problems: Vec<String>,
}

impl Refs {
    pub fn new(limit: u64) -> Refs {
        Refs {
            counts: Vec::new(),
            limit,
            problems: Vec::new(),
        }
    }

    pub fn get(&self, c: u64) -> u32 {
        self.counts.get(c as usize).copied().unwrap_or(0)
    }

    pub fn add(&mut self, first: u64, n: u64, by: u32, what: &str) -> bool {
        let Some(end) = first.checked_add(n).filter(|&e| e <= self.limit) else {
            self.problems.push(format!(
                "ERROR {what} at cluster {first} is past the end of the image file"
            ));
            return false;
        };
        if self.counts.len() < end as usize {
            self.counts.resize(end as usize, 0);
        }
        for c in first..end {
            let v = &mut self.counts[c as usize];
            *v = v.saturating_add(by);
        }
        true
    }

    pub fn sub(&mut self, c: u64, by: u32) {
        if let Some(v) = self.counts.get_mut(c as usize) {
            *v = v.saturating_sub(by);
        }
    }

    /// Index one past the last referenced cluster.
    pub fn end(&self) -> u64 {
        self.counts
            .iter()
            .rposition(|&v| v > 0)
            .map_or(0, |p| p as u64 + 1)
    }
}

/// How many L1 entries (over all the given tables) point at each L2 table.
pub fn l2_multiplicity(l1s: &[&[u64]]) -> BTreeMap<u64, u32> {
    let mut m = BTreeMap::new();
    for l1 in l1s {
        for &e in l1.iter() {
            let off = e & L1_OFFSET_MASK;
            if off != 0 {
                *m.entry(off).or_insert(0u32) += 1;
            }
        }
    }
    m
}

/// Adds the references of the L2 tables in `mult` (and of everything they map).
/// `read_l2` returns a table's entries (from a cache or the file).
pub fn count_l2_trees(
    geo: &Geometry,
    file_clusters: u64,
    mult: &BTreeMap<u64, u32>,
    refs: &mut Refs,
    mut read_l2: impl FnMut(u64) -> Result<Vec<u64>, DiskError>,
) -> Result<(), DiskError> {
    let cs = geo.cluster_size;
    for (&l2, &m) in mult {
        if !l2.is_multiple_of(cs) || l2 / cs >= file_clusters || l2 < cs {
            refs.problems.push(format!(
                "ERROR L2 table at offset {l2:#x} is unaligned or outside the file"
            ));
            continue;
        }
        refs.add(l2 / cs, 1, m, "L2 table");
        for e in read_l2(l2)? {
            let mapping = Mapping::decode(e, geo);
            match mapping {
                Mapping::Data { host, .. } | Mapping::Zero { host: Some(host) } => {
                    if !host.is_multiple_of(cs) {
                        refs.problems.push(format!(
                            "ERROR data cluster offset {host:#x} is not aligned"
                        ));
                        continue;
                    }
                    refs.add(host / cs, 1, m, "data cluster");
                }
                Mapping::Compressed { .. } => {
                    if let Some((first, n)) = mapping.host_clusters(geo) {
                        refs.add(first, n, m, "compressed cluster");
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}
