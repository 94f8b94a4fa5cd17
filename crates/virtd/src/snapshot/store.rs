//! Snapshot metadata in the daemon's SQLite database (tables `snapshots` and
//! `snapshot_domains`, created by the store's migrations). A domain's whole tree is read and
//! written at once, in one transaction: trees are small and every change stays consistent.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferrovirt_api::snapshot::SnapshotInfo;
use ferrovirt_api::{ApiError, DomainDef};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::store::db_err;

/// One snapshot as stored: what the API shows plus the domain's definition at the snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    pub info: SnapshotInfo,
    pub def: DomainDef,
}

/// A domain's snapshots, its current one, and the image files snapshots created.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    pub snaps: BTreeMap<String, Stored>,
    pub current: Option<String>,
    /// Overlays and copies made by snapshot operations: deleted when nothing needs them.
    pub owned: BTreeSet<PathBuf>,
    /// The domain's own images that snapshots froze or hold (its disks when they were taken):
    /// never deleted, but an overlay of ours may be merged back into them. An image outside
    /// both sets (a shared base below the domain's disk) is never written.
    pub adopted: BTreeSet<PathBuf>,
}

/// The `owned` column: both sets (a bare list, as first written, is the owned set).
#[derive(Serialize, Deserialize, Default)]
struct Images {
    owned: BTreeSet<PathBuf>,
    #[serde(default)]
    adopted: BTreeSet<PathBuf>,
}

impl Tree {
    pub fn children(&self, name: &str) -> Vec<String> {
        self.snaps
            .values()
            .filter(|s| s.info.parent.as_deref() == Some(name))
            .map(|s| s.info.name.clone())
            .collect()
    }

    /// Every descendant of `name`, deepest first (the order to delete them in).
    pub fn descendants(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        for c in self.children(name) {
            out.extend(self.descendants(&c));
            out.push(c);
        }
        out
    }

    /// The snapshot as the API shows it: with current flag and children filled in.
    pub fn info(&self, name: &str) -> Option<SnapshotInfo> {
        let s = self.snaps.get(name)?;
        let mut info = s.info.clone();
        info.current = self.current.as_deref() == Some(name);
        info.children = self.children(name);
        info.descendants = self.descendants(name).len() as u32;
        Some(info)
    }
}

pub struct SnapStore {
    conn: Mutex<Connection>,
}

impl SnapStore {
    pub fn open(path: &Path) -> Result<SnapStore, String> {
        Ok(SnapStore {
            conn: Mutex::new(crate::store::connect(path)?),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn load(&self, domain: &str) -> Result<Tree, ApiError> {
        let conn = self.conn();
        let mut tree = Tree::default();
        let row: Option<(Option<String>, String)> = conn
            .query_row(
                "SELECT current, owned FROM snapshot_domains WHERE domain = ?1",
                params![domain],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db_err)?;
        if let Some((current, owned)) = row {
            tree.current = current;
            let images: Images = serde_json::from_str(&owned)
                .or_else(|_| {
                    serde_json::from_str(&owned).map(|owned| Images {
                        owned,
                        adopted: BTreeSet::new(),
                    })
                })
                .map_err(|e| ApiError::internal(format!("stored snapshot images: {e}")))?;
            tree.owned = images.owned;
            tree.adopted = images.adopted;
        }
        let mut stmt = conn
            .prepare("SELECT meta FROM snapshots WHERE domain = ?1")
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![domain], |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        for row in rows {
            let s: Stored = serde_json::from_str(&row.map_err(db_err)?)
                .map_err(|e| ApiError::internal(format!("stored snapshot: {e}")))?;
            tree.snaps.insert(s.info.name.clone(), s);
        }
        Ok(tree)
    }

    /// Replace the domain's tree (one transaction).
    pub fn save(&self, domain: &str, tree: &Tree) -> Result<(), ApiError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db_err)?;
        tx.execute("DELETE FROM snapshots WHERE domain = ?1", params![domain])
            .map_err(db_err)?;
        for s in tree.snaps.values() {
            let meta = serde_json::to_string(s).map_err(|e| ApiError::internal(e.to_string()))?;
            tx.execute(
                "INSERT INTO snapshots (domain, name, meta) VALUES (?1, ?2, ?3)",
                params![domain, s.info.name, meta],
            )
            .map_err(db_err)?;
        }
        if tree.snaps.is_empty() && tree.owned.is_empty() && tree.adopted.is_empty() {
            tx.execute(
                "DELETE FROM snapshot_domains WHERE domain = ?1",
                params![domain],
            )
            .map_err(db_err)?;
        } else {
            let owned = serde_json::to_string(&Images {
                owned: tree.owned.clone(),
                adopted: tree.adopted.clone(),
            })
            .map_err(|e| ApiError::internal(e.to_string()))?;
            tx.execute(
                "INSERT INTO snapshot_domains (domain, current, owned) VALUES (?1, ?2, ?3)
                 ON CONFLICT(domain) DO UPDATE SET current = ?2, owned = ?3",
                params![domain, tree.current, owned],
            )
            .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    pub fn count(&self, domain: &str) -> Result<u64, ApiError> {
        self.conn()
            .query_row(
                "SELECT COUNT(*) FROM snapshots WHERE domain = ?1",
                params![domain],
                |r| r.get(0),
            )
            .map_err(db_err)
    }

    pub fn has_any(&self, domain: &str) -> Result<bool, ApiError> {
        self.conn()
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM snapshots WHERE domain = ?1)
                     OR EXISTS(SELECT 1 FROM snapshot_domains WHERE domain = ?1)",
                params![domain],
                |r| r.get(0),
            )
            .map_err(db_err)
    }

    pub fn forget(&self, domain: &str) -> Result<(), ApiError> {
        self.save(domain, &Tree::default())
    }
}
