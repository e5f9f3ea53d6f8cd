//! The SQLite backend: one database file in WAL mode, foreign keys on,
//! secure_delete on (a destroyed ciphertext's bytes are overwritten in the
//! file, not just unlinked from the b-tree), schema versions applied in
//! order and counted in `PRAGMA user_version`.
//!
//! One connection behind a mutex: SQLite has one writer at a time anyway,
//! and every service call writes (replay records), so a pool of readers
//! would buy little. Each transaction is `BEGIN IMMEDIATE`, so it holds the
//! write lock from its first statement and two processes on one file never
//! deadlock on a lock upgrade; `busy_timeout` makes the other wait.
//!
//! Integers: u64 values (r, times) are stored as the i64 of the same bits.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use microcert_core::DeviceId;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    AuditRecord, CommandRow, DeviceQuery, DeviceView, DigestShard, KeyDatabase, NewAudit,
    NotaryRow, SeedRow, Tx,
};
use crate::{DbFailure, Error, Result};

mod rows;
mod schema;
mod tx;

/// A deferred (read) transaction whose BEGIN and COMMIT are cached
/// prepared statements: rusqlite's `Transaction` parses and prepares both
/// texts on every use, which was a tenth of a cold verification (issue 16
/// profile). Rolled back when dropped without [`ReadTx::commit`] (an early
/// return, an error or a panic), as rusqlite's is.
struct ReadTx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> ReadTx<'c> {
    fn begin(conn: &'c Connection) -> rusqlite::Result<Self> {
        conn.prepare_cached("BEGIN DEFERRED")?.execute([])?;
        Ok(ReadTx { conn, open: true })
    }

    fn commit(mut self) -> rusqlite::Result<()> {
        // A COMMIT that fails leaves the transaction open: the drop rolls
        // it back.
        let done = self.conn.prepare_cached("COMMIT")?.execute([]).map(|_| ());
        self.open = done.is_err();
        done
    }
}

impl Drop for ReadTx<'_> {
    fn drop(&mut self) {
        if self.open && !self.conn.is_autocommit() {
            let _ = self
                .conn
                .prepare_cached("ROLLBACK")
                .and_then(|mut st| st.execute([]));
        }
    }
}

use rows::*;
use schema::migrate;
use tx::SqliteTx;

/// Options of the SQLite backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqliteOptions {
    /// `synchronous = FULL` (the default): every commit is fsynced before
    /// it is acknowledged, so an accepted ENROLL survives a power loss (the
    /// node wipes its old seed once it has the RECEIPT). False selects
    /// `NORMAL`: still safe against a killed process, but a power loss may
    /// lose the last commits.
    pub sync_every_commit: bool,
    /// How long a transaction waits for another process's write lock.
    pub busy_timeout: Duration,
    /// Page cache of the connection, in KiB (SQLite's default is 2 MiB;
    /// a larger cache saves re-reading index pages of a large fleet).
    pub cache_kib: u32,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            sync_every_commit: true,
            busy_timeout: Duration::from_secs(10),
            cache_kib: 32 * 1024,
        }
    }
}

/// The SQLite key database.
#[derive(Debug)]
pub struct SqliteDatabase {
    conn: Mutex<Connection>,
    path: PathBuf,
    migrated_from: Option<u32>,
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::db(DbFailure::Internal, e.to_string())
}

impl SqliteDatabase {
    /// Opens (creating if needed) the database file at `path` with the
    /// default options and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, SqliteOptions::default())
    }

    /// Like [`SqliteDatabase::open`], with options.
    pub fn open_with(path: &Path, opts: SqliteOptions) -> Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(opts.busy_timeout)?;
        // More statements than rusqlite's default cache (16) are prepared
        // cached; the AUTH path's (replay records and their accumulators)
        // must not be evicted by the others.
        conn.set_prepared_statement_cache_capacity(64);
        // Only takes effect on a new, empty file (before WAL and the first
        // table). Seeds are WITHOUT ROWID rows of about 1.2 KB: with 4 KiB
        // pages each spills into an overflow page of its own (about 5 KB
        // of file per device); 8 KiB pages hold six of them inline.
        conn.pragma_update(None, "page_size", 8192)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = if opts.sync_every_commit {
            "FULL"
        } else {
            "NORMAL"
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.pragma_update(None, "cache_size", -i64::from(opts.cache_kib))?;
        let migrated_from = migrate(&mut conn)?;
        Ok(SqliteDatabase {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            migrated_from,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version (number of migrations applied).
    pub fn schema_version(&self) -> Result<u32> {
        let conn = self.lock()?;
        Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// A device and all its seeds (with ciphertexts) in one read
    /// transaction: the verification path's cache miss. A deferred
    /// transaction takes no write lock, so it never waits for another
    /// process's writer. (Measured against one LEFT JOIN statement without
    /// an explicit transaction: no faster.)
    pub(crate) fn read_device(
        &self,
        id: DeviceId,
    ) -> Result<Option<(super::DeviceRow, Vec<SeedRow>)>> {
        static SQL: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
        let (dev_sql, seeds_sql) = SQL.get_or_init(|| {
            (
                format!("SELECT {DEVICE_COLS} FROM devices WHERE id = ?1"),
                format!("SELECT {SEED_COLS} FROM seeds WHERE device = ?1 ORDER BY generation"),
            )
        });
        let conn = self.lock()?;
        let tx = ReadTx::begin(&conn)?;
        let device = conn
            .prepare_cached(dev_sql)?
            .query_row([&id.0[..]], device_row)
            .optional()?;
        let Some(device) = device else {
            return Ok(None);
        };
        let seeds = conn
            .prepare_cached(seeds_sql)?
            .query_map([&id.0[..]], seed_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        tx.commit()?;
        Ok(Some((device, seeds)))
    }

    /// Bulk loading (batch import) on or off: on, the write-ahead log is
    /// checkpointed every 16,384 pages (64 MiB) instead of every 1,000, so
    /// an import does not stop for a checkpoint every few hundred seeds.
    /// Durability is unchanged: every commit is still synced.
    pub(crate) fn set_bulk(&self, on: bool) -> Result<()> {
        let conn = self.lock()?;
        let pages = if on { 16_384 } else { 1000 };
        conn.query_row(&format!("PRAGMA wal_autocheckpoint = {pages}"), [], |_| {
            Ok(())
        })?;
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| Error::db(DbFailure::Internal, "connection mutex poisoned"))
    }
}

impl KeyDatabase for SqliteDatabase {
    fn read_device_unlocked(&self, id: DeviceId) -> Option<Result<super::DeviceRecords>> {
        Some(self.read_device(id))
    }
    fn set_bulk(&self, on: bool) -> Result<()> {
        SqliteDatabase::set_bulk(self, on)
    }
    fn local_path(&self) -> Option<&Path> {
        Some(self.path())
    }
    fn transaction(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<()>) -> Result<()> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let result = f(&mut SqliteTx { tx: &tx });
        match result {
            Ok(()) => tx.commit().map_err(db_err),
            Err(e) => {
                // Dropping the transaction rolls it back.
                drop(tx);
                Err(e)
            }
        }
    }

    fn read_transaction(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<()>) -> Result<()> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        f(&mut SqliteTx { tx: &tx })?;
        tx.commit().map_err(db_err)
    }

    fn device_view(&self, id: DeviceId) -> Result<Option<DeviceView>> {
        let conn = self.lock()?;
        let device = conn
            .prepare_cached(&format!("SELECT {DEVICE_COLS} FROM devices WHERE id = ?1"))?
            .query_row([&id.0[..]], device_row)
            .optional()?;
        let Some(device) = device else {
            return Ok(None);
        };
        let mut st = conn.prepare_cached(&format!(
            "SELECT {SEED_COLS_NO_CT} FROM seeds WHERE device = ?1 ORDER BY generation"
        ))?;
        let seeds = st
            .query_map([&id.0[..]], seed_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Some(DeviceView { device, seeds }))
    }

    fn list_devices(&self, q: &DeviceQuery) -> Result<Vec<DeviceView>> {
        let conn = self.lock()?;
        let limit = if q.limit == 0 {
            100
        } else {
            q.limit.min(10_000)
        };
        let dcols = DEVICE_COLS
            .split(", ")
            .map(|c| format!("d.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let scols = SEED_COLS_NO_CT
            .split(", ")
            .map(|c| {
                if c == "NULL" {
                    c.to_string()
                } else {
                    format!("s.{c}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {dcols}, {scols} FROM devices d \
             LEFT JOIN seeds s ON s.device = d.id AND s.generation = d.highest_gen \
             WHERE d.id > ?1 \
             AND (?2 IS NULL OR s.state = ?2) \
             AND (?3 IS NULL OR d.class = ?3) \
             AND (?4 IS NULL OR s.base_year + 4 <= ?4) \
             ORDER BY d.id LIMIT ?5"
        );
        let mut st = conn.prepare_cached(&sql)?;
        let rows = st.query_map(
            params![
                // The empty blob sorts before every id (see scan_seeds).
                q.after.map(|d| d.0.to_vec()).unwrap_or_default(),
                q.state.map(|s| s.name()),
                q.class,
                q.last_year_at_most,
                limit as i64
            ],
            |r| {
                let device = device_row(r)?;
                let has_seed: Option<Vec<u8>> = r.get(9)?;
                let seeds = match has_seed {
                    Some(_) => vec![seed_row_at(r, 9)?],
                    None => Vec::new(),
                };
                Ok(DeviceView { device, seeds })
            },
        )?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn devices_due(&self, y: u16, after: Option<DeviceId>, limit: usize) -> Result<Vec<DeviceId>> {
        let conn = self.lock()?;
        let mut st = conn.prepare_cached(
            "SELECT d.id FROM devices d JOIN seeds s ON s.device = d.id AND s.generation = d.highest_gen \
             LEFT JOIN commands c ON c.device = d.id AND c.answered_at IS NULL \
             WHERE s.state = 'active' AND s.base_year <= ?1 AND c.device IS NULL \
             AND (?2 IS NULL OR d.id > ?2) ORDER BY d.id LIMIT ?3",
        )?;
        let rows = st.query_map(params![y, after.map(|d| d.0.to_vec()), limit as i64], |r| {
            dev(r.get(0)?)
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn devices_to_expire(&self, now: u64, year_now: u16, limit: usize) -> Result<Vec<DeviceId>> {
        let conn = self.lock()?;
        let mut st = conn.prepare_cached(
            "SELECT DISTINCT device FROM seeds WHERE state = 'active' \
             AND ((grace_until IS NOT NULL AND grace_until < ?1) OR base_year + 4 < ?2) \
             ORDER BY device LIMIT ?3",
        )?;
        let rows = st.query_map(params![i(now), year_now, limit as i64], |r| dev(r.get(0)?))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn scan_seeds(&self, after: Option<(DeviceId, u8)>, limit: usize) -> Result<Vec<SeedRow>> {
        let conn = self.lock()?;
        // No "?1 IS NULL OR ...": SQLite cannot use the primary key for a
        // range under an OR, and every page would scan the table from the
        // start (quadratic: hours for a million records). The first page
        // starts after the empty blob, which sorts before every id.
        let (d, g) = match after {
            Some((d, g)) => (d.0.to_vec(), i64::from(g)),
            None => (Vec::new(), -1),
        };
        let mut st = conn.prepare_cached(&format!(
            "SELECT {SEED_COLS} FROM seeds WHERE (device, generation) > (?1, ?2) \
             ORDER BY device, generation LIMIT ?3"
        ))?;
        let rows = st.query_map(params![d, g, limit as i64], seed_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn digest_shards(&self) -> Result<Vec<DigestShard>> {
        let conn = self.lock()?;
        let mut st =
            conn.prepare_cached("SELECT shard, acc, count, seq, tag FROM digest ORDER BY shard")?;
        let rows = st.query_map([], |row| {
            Ok(DigestShard {
                shard: row.get(0)?,
                acc: arr32(row.get(1)?)?,
                count: row.get::<_, i64>(2)? as u64,
                seq: row.get::<_, i64>(3)? as u64,
                tag: arr32(row.get(4)?)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn audit_log(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>> {
        let conn = self.lock()?;
        let mut st = conn.prepare_cached(
            "SELECT seq, time, actor, action, device, generation, reason, prev_hash, hash \
             FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = st.query_map(params![i(after), limit as i64], |r| {
            let device: Option<Vec<u8>> = r.get(4)?;
            Ok(AuditRecord {
                seq: r.get::<_, i64>(0)? as u64,
                entry: NewAudit {
                    time: r.get::<_, i64>(1)? as u64,
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    device: device.map(dev).transpose()?,
                    generation: r.get(5)?,
                    reason: r.get(6)?,
                },
                prev_hash: arr32(r.get(7)?)?,
                hash: arr32(r.get(8)?)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn prune(&self, now: u64) -> Result<u64> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let a = tx.execute("DELETE FROM replay WHERE expires < ?1", [i(now)])?;
        let b = tx.execute("DELETE FROM challenges WHERE expires < ?1", [i(now)])?;
        tx.commit()?;
        Ok((a + b) as u64)
    }

    fn scan_notary(&self, after: Option<&NotaryRow>, limit: usize) -> Result<Vec<NotaryRow>> {
        let conn = self.lock()?;
        let key = after.map(|n| {
            (
                n.device.0.to_vec(),
                n.generation,
                n.t,
                i(n.r),
                n.digest.to_vec(),
            )
        });
        let mut st = conn.prepare_cached(
            "SELECT device, generation, t, r, digest, tag, first_seen, seal FROM notary \
             WHERE ?1 IS NULL OR (device, generation, t, r, digest) > (?1, ?2, ?3, ?4, ?5) \
             ORDER BY device, generation, t, r, digest LIMIT ?6",
        )?;
        let (d, g, t, r, dg) = match key {
            Some((d, g, t, r, dg)) => (Some(d), g, t, r, dg),
            None => (None, 0, 0, 0, Vec::new()),
        };
        let rows = st.query_map(params![d, g, t, r, dg, limit as i64], |row| {
            Ok(NotaryRow {
                device: dev(row.get(0)?)?,
                generation: row.get(1)?,
                t: row.get(2)?,
                r: row.get::<_, i64>(3)? as u64,
                digest: arr32(row.get(4)?)?,
                tag: row.get(5)?,
                first_seen: row.get::<_, i64>(6)? as u64,
                seal: row.get::<_, Option<Vec<u8>>>(7)?.map(arr32).transpose()?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn scan_commands(
        &self,
        after: Option<DeviceId>,
        limit: usize,
    ) -> Result<Vec<(CommandRow, Option<[u8; 32]>)>> {
        let conn = self.lock()?;
        let mut st = conn.prepare_cached(&format!(
            "SELECT {COMMAND_COLS} FROM commands WHERE device > ?1 ORDER BY device LIMIT ?2"
        ))?;
        let after = after.map(|d| d.0.to_vec()).unwrap_or_default();
        let rows = st.query_map(params![after, limit as i64], command_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn migrated_from(&self) -> Option<u32> {
        self.migrated_from
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        let conn = self.lock()?;
        Ok(conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
            .query_row([key], |r| r.get(0))
            .optional()?)
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let conn = self.lock()?;
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }

    fn lease(&self, name: &str) -> Result<Option<crate::db::LeaseRow>> {
        let conn = self.lock()?;
        Ok(conn
            .prepare_cached("SELECT name, holder, expires_ms, tag FROM leases WHERE name = ?1")?
            .query_row([name], |r| {
                Ok(crate::db::LeaseRow {
                    name: r.get(0)?,
                    holder: r.get(1)?,
                    expires_ms: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                    tag: r.get(3)?,
                })
            })
            .optional()?)
    }

    fn swap_lease(
        &self,
        old: Option<&crate::db::LeaseRow>,
        new: &crate::db::LeaseRow,
    ) -> Result<bool> {
        let conn = self.lock()?;
        let exp = i64::try_from(new.expires_ms).unwrap_or(i64::MAX);
        let n = match old {
            None => conn.execute(
                "INSERT INTO leases (name, holder, expires_ms, tag) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (name) DO NOTHING",
                rusqlite::params![new.name, new.holder, exp, new.tag],
            )?,
            Some(o) => conn.execute(
                "UPDATE leases SET holder = ?2, expires_ms = ?3, tag = ?4 \
                 WHERE name = ?1 AND holder = ?5 AND expires_ms = ?6 AND tag = ?7",
                rusqlite::params![
                    new.name,
                    new.holder,
                    exp,
                    new.tag,
                    o.holder,
                    i64::try_from(o.expires_ms).unwrap_or(i64::MAX),
                    o.tag
                ],
            )?,
        };
        Ok(n == 1)
    }

    fn list_tokens(&self) -> Result<Vec<crate::db::TokenRow>> {
        let conn = self.lock()?;
        let mut st = conn.prepare_cached(&format!(
            "SELECT {} FROM tokens ORDER BY created, hash",
            TOKEN_COLS
        ))?;
        let rows = st.query_map([], token_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn list_marks(&self) -> Result<Vec<(String, u64, Vec<u8>)>> {
        let conn = self.lock()?;
        let mut st = conn.prepare_cached("SELECT name, value, tag FROM marks ORDER BY name")?;
        let rows = st.query_map([], mark_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn note_token_use(&self, hash: &str, last_used: Option<u64>, failures: u64) -> Result<()> {
        let conn = self.lock()?;
        conn.execute(
            "UPDATE tokens SET last_used = max(coalesce(last_used, ?2), coalesce(?2, last_used)), \
             failures = failures + ?3 WHERE hash = ?1",
            rusqlite::params![hash, last_used.map(|v| v as i64), failures as i64],
        )?;
        Ok(())
    }

    fn flush_erased(&self) -> Result<()> {
        // Moves everything from the write-ahead log into the main file and
        // truncates the log, so erased bytes do not linger in old frames.
        let conn = self.lock()?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

#[cfg(test)]
mod read_tx_tests {
    use super::*;

    /// The cached BEGIN/COMMIT read leaves no transaction open on any path
    /// (a device that is absent returns early, one that exists commits, a
    /// statement that fails inside is rolled back), so the next write
    /// transaction starts: an open one would make its BEGIN IMMEDIATE fail.
    #[test]
    fn read_device_leaves_no_transaction_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteDatabase::open(&dir.path().join("k.db")).unwrap();
        let id = DeviceId::from_u64(7);
        let row = super::super::DeviceRow {
            id,
            class: 1,
            suite: microcert_core::Suite::CMAC64,
            epoch: 0,
            transport_open: true,
            created: 1,
            highest_generation: None,
            command_counter: 0,
            tag: [0; 32],
        };
        for round in 0..3 {
            let found = db.read_device(id).unwrap();
            assert_eq!(found.is_some(), round > 0);
            assert!(db.lock().unwrap().is_autocommit());
            db.transaction(&mut |tx| {
                if round == 0 {
                    tx.insert_device(&row)?;
                }
                Ok(())
            })
            .unwrap();
        }
        // The seeds query fails (its table is gone): an error, rolled back.
        db.lock()
            .unwrap()
            .execute_batch("ALTER TABLE seeds RENAME TO seeds_gone")
            .unwrap();
        assert!(db.read_device(id).is_err());
        assert!(db.lock().unwrap().is_autocommit());
        db.transaction(&mut |_| Ok(())).unwrap();
    }
}
