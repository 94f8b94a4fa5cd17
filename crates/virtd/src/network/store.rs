//! Network definitions in the daemon's SQLite database (tables `networks` and
//! `network_meta`, created by the store's migrations).

use std::path::Path;

use ferrovirt_api::network::NetworkDef;
use ferrovirt_api::ApiError;

use crate::store::db_err;
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, Clone)]
pub struct StoredNet {
    pub def: NetworkDef,
    pub autostart: bool,
    /// Running (or meant to run: a restarted daemon brings it back).
    pub active: bool,
}

pub struct NetStore {
    conn: Connection,
}

impl NetStore {
    pub fn open(path: &Path) -> Result<NetStore, String> {
        Ok(NetStore {
            conn: crate::store::connect(path)?,
        })
    }

    pub fn load_all(&self) -> Result<Vec<StoredNet>, String> {
        let mut stmt = self
            .conn
            .prepare("SELECT definition, autostart, active FROM networks ORDER BY name")
            .map_err(|e| e.to_string())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, bool>(2)?,
                ))
            })
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for row in rows {
            let (def, autostart, active) = row.map_err(|e| e.to_string())?;
            let def: NetworkDef = serde_json::from_str(&def)
                .map_err(|e| format!("stored network definition: {e}"))?;
            out.push(StoredNet {
                def,
                autostart,
                active,
            });
        }
        Ok(out)
    }

    pub fn put(&self, n: &StoredNet) -> Result<(), ApiError> {
        let def = serde_json::to_string(&n.def).map_err(|e| ApiError::internal(e.to_string()))?;
        self.conn
            .execute(
                "INSERT INTO networks (name, uuid, definition, autostart, active) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(name) DO UPDATE SET uuid=?2, definition=?3, autostart=?4, active=?5",
                params![
                    n.def.name,
                    n.def.uuid.as_deref().unwrap_or(""),
                    def,
                    n.autostart,
                    n.active
                ],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub fn delete(&self, name: &str) -> Result<(), ApiError> {
        self.conn
            .execute("DELETE FROM networks WHERE name = ?1", params![name])
            .map_err(db_err)?;
        Ok(())
    }

    pub fn meta(&self, key: &str) -> Option<String> {
        self.conn
            .query_row(
                "SELECT value FROM network_meta WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()
            .ok()
            .flatten()
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), ApiError> {
        self.conn
            .execute(
                "INSERT INTO network_meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = ?2",
                params![key, value],
            )
            .map_err(db_err)?;
        Ok(())
    }
}
