//! Durable state in SQLite (WAL, synchronous=FULL): every change is committed before the API answers.

use std::path::Path;

use ferrovirt_api::{ApiError, DomainDef, DomainState, StateReason};
use rusqlite::{params, Connection, OptionalExtension};

use crate::files;
use crate::runtime::Runtime;

/// Schema migrations; index + 1 is the schema version (PRAGMA user_version). Append only.
const MIGRATIONS: &[&str] = &[
    // v1: domains with their definition (JSON), flags and last known state.
    "CREATE TABLE domains (
        name TEXT PRIMARY KEY,
        uuid TEXT NOT NULL UNIQUE,
        definition TEXT NOT NULL,
        persistent INTEGER NOT NULL,
        autostart INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL,
        reason TEXT NOT NULL,
        runtime TEXT
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('next_id', '1');",
    // v2: virtual networks. IF NOT EXISTS: daemons before this migration created these
    // tables outside the migrations.
    "CREATE TABLE IF NOT EXISTS networks (
        name TEXT PRIMARY KEY,
        uuid TEXT NOT NULL UNIQUE,
        definition TEXT NOT NULL,
        autostart INTEGER NOT NULL DEFAULT 0,
        active INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE IF NOT EXISTS network_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // v3: domain snapshots (crate::snapshot): one row per snapshot (its metadata as JSON), and
    // per domain the current snapshot and the image files snapshots made (theirs to delete).
    "CREATE TABLE snapshots (
        domain TEXT NOT NULL,
        name TEXT NOT NULL,
        meta TEXT NOT NULL,
        PRIMARY KEY (domain, name)
    );
    CREATE TABLE snapshot_domains (
        domain TEXT PRIMARY KEY,
        current TEXT,
        owned TEXT NOT NULL DEFAULT '[]'
    );",
];

/// One stored domain.
#[derive(Debug, Clone)]
pub struct StoredDomain {
    pub def: DomainDef,
    pub persistent: bool,
    pub autostart: bool,
    pub state: DomainState,
    pub reason: StateReason,
    pub runtime: Option<Runtime>,
}

pub struct Store {
    conn: Connection,
    /// Called at the start of every write (tests: what holds which lock while the store writes).
    #[cfg(test)]
    pub(crate) on_write: Option<Box<dyn Fn() + Send>>,
}

pub(crate) fn db_err(e: rusqlite::Error) -> ApiError {
    ApiError::internal(format!("state database: {e}"))
}

/// Opens the state database (WAL, synchronous writes) and brings its schema up to date.
/// Every table of the daemon is in the migrations, whichever module uses it.
pub(crate) fn connect(path: &Path) -> Result<Connection, String> {
    // The database holds definitions (and VNC passwords): 0600, with its -wal and -shm, which
    // SQLite creates with the database's mode.
    if !path.exists() {
        files::create_private(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        files::make_private(Path::new(&p))
            .map_err(|e| format!("cannot chmod {}: {e}", Path::new(&p).display()))?;
    }
    let mut conn =
        Connection::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(|e| e.to_string())?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| e.to_string())?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    migrate(&mut conn)?;
    Ok(conn)
}

fn schema_version(conn: &Connection) -> u32 {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap_or(0)
}

fn migrate(conn: &mut Connection) -> Result<(), String> {
    let current = schema_version(conn) as usize;
    if current > MIGRATIONS.len() {
        return Err(format!(
            "the state database has schema version {current}, newer than this ferrovirtd ({}); use a newer ferrovirtd",
            MIGRATIONS.len()
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction().map_err(|e| e.to_string())?;
        tx.execute_batch(sql)
            .map_err(|e| format!("migration to v{}: {e}", i + 1))?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)
            .map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
    }
    Ok(())
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, String> {
        Ok(Store {
            conn: connect(path)?,
            #[cfg(test)]
            on_write: None,
        })
    }

    pub fn schema_version(&self) -> u32 {
        schema_version(&self.conn)
    }

    pub fn load_all(&self) -> Result<Vec<StoredDomain>, String> {
        let mut stmt = self
            .conn
            .prepare("SELECT definition, persistent, autostart, state, reason, runtime FROM domains ORDER BY name")
            .map_err(|e| e.to_string())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, bool>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for row in rows {
            let (def, persistent, autostart, state, reason, runtime) =
                row.map_err(|e| e.to_string())?;
            let def: DomainDef =
                serde_json::from_str(&def).map_err(|e| format!("stored definition: {e}"))?;
            out.push(StoredDomain {
                def,
                persistent,
                autostart,
                state: DomainState::parse(&state).unwrap_or(DomainState::Shutoff),
                reason: StateReason::parse(&reason).unwrap_or(StateReason::Unknown),
                runtime: runtime.and_then(|r| serde_json::from_str(&r).ok()),
            });
        }
        Ok(out)
    }

    /// Insert or replace a domain row.
    pub fn put(&self, d: &StoredDomain) -> Result<(), ApiError> {
        self.writing();
        let def = serde_json::to_string(&d.def).map_err(|e| ApiError::internal(e.to_string()))?;
        let runtime = d
            .runtime
            .as_ref()
            .and_then(|r| serde_json::to_string(r).ok());
        self.conn
            .execute(
                "INSERT INTO domains (name, uuid, definition, persistent, autostart, state, reason, runtime)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(name) DO UPDATE SET uuid=?2, definition=?3, persistent=?4, autostart=?5,
                   state=?6, reason=?7, runtime=?8",
                params![
                    d.def.name,
                    d.def.uuid.as_deref().unwrap_or(""),
                    def,
                    d.persistent,
                    d.autostart,
                    d.state.as_str(),
                    d.reason.as_str(),
                    runtime
                ],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub fn delete(&self, name: &str) -> Result<(), ApiError> {
        self.writing();
        self.conn
            .execute("DELETE FROM domains WHERE name = ?1", params![name])
            .map_err(db_err)?;
        Ok(())
    }

    #[cfg(test)]
    fn writing(&self) {
        if let Some(hook) = &self.on_write {
            hook();
        }
    }

    #[cfg(not(test))]
    fn writing(&self) {}

    /// The id the next started domain gets (virsh's Id column); persisted by [`Store::put_started`]
    /// so ids are not reused after a restart.
    pub fn peek_next_id(&self) -> Result<u32, ApiError> {
        let id: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'next_id'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err)?;
        Ok(id.and_then(|v| v.parse().ok()).unwrap_or(1))
    }

    /// Record a started domain and consume its id, in one transaction (one fsync). Starts run
    /// in parallel and may commit out of order: the next id only ever grows.
    pub fn put_started(&self, d: &StoredDomain, used_id: u32) -> Result<(), ApiError> {
        let tx = self.conn.unchecked_transaction().map_err(db_err)?;
        self.conn
            .execute(
                "UPDATE meta SET value = MAX(CAST(value AS INTEGER), ?1) WHERE key = 'next_id'",
                params![i64::from(used_id) + 1],
            )
            .map_err(db_err)?;
        self.put(d)?;
        tx.commit().map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_and_persists_across_reopen() {
        let dir = std::env::temp_dir().join(format!("ferrovirt-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.schema_version(), MIGRATIONS.len() as u32);
            let mut def = DomainDef::new("a");
            def.uuid = Some("00000000-0000-0000-0000-000000000001".into());
            store
                .put(&StoredDomain {
                    def,
                    persistent: true,
                    autostart: true,
                    state: DomainState::Shutoff,
                    reason: StateReason::Unknown,
                    runtime: None,
                })
                .unwrap();
            assert_eq!(store.peek_next_id().unwrap(), 1);
            let mut started = store.load_all().unwrap().remove(0);
            started.state = DomainState::Running;
            store.put_started(&started, 1).unwrap();
            assert_eq!(store.peek_next_id().unwrap(), 2);
            started.state = DomainState::Shutoff;
            store.put(&started).unwrap();
        }
        let store = Store::open(&path).unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert!(all[0].autostart);
        assert_eq!(store.peek_next_id().unwrap(), 2);
        let mode: String = store
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_row_stored_with_memory_mib_loads_in_kib() {
        let dir = std::env::temp_dir().join(format!("ferrovirt-store-mib-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("state.db")).unwrap();
        // A definition as written before memory was kept in KiB.
        let old = r#"{"name":"old","uuid":"00000000-0000-0000-0000-000000000002","type":"test","memory_mib":300,"vcpus":1,"os":{"kernel":"/k"},"on_poweroff":"destroy","on_reboot":"restart","on_crash":"destroy"}"#;
        store
            .conn
            .execute(
                "INSERT INTO domains (name, uuid, definition, persistent, autostart, state, reason)
                 VALUES ('old', '00000000-0000-0000-0000-000000000002', ?1, 1, 0, 'shutoff', 'unknown')",
                params![old],
            )
            .unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all[0].def.memory_kib, 300 * 1024);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Starts run in parallel and commit in any order: the next id never goes back.
    #[test]
    fn started_ids_committed_out_of_order_never_lower_the_next_id() {
        let dir = std::env::temp_dir().join(format!("ferrovirt-store-ids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("state.db")).unwrap();
        let mut def = DomainDef::new("a");
        def.uuid = Some("00000000-0000-0000-0000-000000000002".into());
        let d = StoredDomain {
            def,
            persistent: true,
            autostart: false,
            state: DomainState::Running,
            reason: StateReason::Booted,
            runtime: None,
        };
        store.put_started(&d, 5).unwrap();
        store.put_started(&d, 3).unwrap();
        assert_eq!(store.peek_next_id().unwrap(), 6);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_database_from_a_newer_ferrovirtd_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferrovirt-store-new-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Store::open(&path).err().expect("refused");
        assert!(
            err.contains("schema version 99") && err.contains("newer"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
