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

use microcert_core::{DeviceId, KeyState, Suite};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::{
    AuditRecord, Blob, CommandRow, DeviceQuery, DeviceRow, DeviceView, DigestShard, KeyDatabase,
    NewAudit, NotaryRow, SeedRow, Tx,
};
use crate::card::EnrollVia;
use crate::{Error, Result, audit};

/// Schema versions, applied in order; `user_version` counts those applied.
/// Never edit an applied one: add the next.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE devices (
    id BLOB PRIMARY KEY CHECK (length(id) = 8),
    class INTEGER NOT NULL,
    suite INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    transport_open INTEGER NOT NULL,
    created INTEGER NOT NULL,
    highest_gen INTEGER,
    command_counter INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE seeds (
    device BLOB NOT NULL REFERENCES devices(id),
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    base_year INTEGER NOT NULL,
    suite INTEGER NOT NULL,
    kstore_version INTEGER NOT NULL,
    ciphertext BLOB,
    tag BLOB NOT NULL,
    via TEXT NOT NULL,
    enroll_t INTEGER NOT NULL,
    enroll_r INTEGER NOT NULL,
    enroll_digest BLOB NOT NULL,
    receipt BLOB NOT NULL,
    created INTEGER NOT NULL,
    activated_at INTEGER,
    suspended_at INTEGER,
    deactivated_at INTEGER,
    compromised_at INTEGER,
    destroyed_at INTEGER,
    grace_until INTEGER,
    PRIMARY KEY (device, generation)
) WITHOUT ROWID;
CREATE UNIQUE INDEX seeds_enroll_nonce ON seeds (device, enroll_t, enroll_r);
CREATE INDEX seeds_state_year ON seeds (state, base_year);
CREATE INDEX seeds_grace ON seeds (grace_until) WHERE grace_until IS NOT NULL;

CREATE TABLE replay (
    device BLOB NOT NULL,
    generation INTEGER NOT NULL,
    t INTEGER NOT NULL,
    r INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (device, generation, t, r)
) WITHOUT ROWID;
CREATE INDEX replay_expires ON replay (expires);

CREATE TABLE challenges (
    device BLOB NOT NULL,
    c BLOB NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (device, c)
) WITHOUT ROWID;
CREATE INDEX challenges_expires ON challenges (expires);

CREATE TABLE notary (
    device BLOB NOT NULL REFERENCES devices(id),
    generation INTEGER NOT NULL,
    t INTEGER NOT NULL,
    r INTEGER NOT NULL,
    digest BLOB NOT NULL,
    tag BLOB NOT NULL,
    first_seen INTEGER NOT NULL,
    PRIMARY KEY (device, generation, t, r, digest)
) WITHOUT ROWID;

CREATE TABLE commands (
    device BLOB PRIMARY KEY REFERENCES devices(id),
    counter INTEGER NOT NULL,
    opcode INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    r INTEGER NOT NULL,
    bytes BLOB NOT NULL,
    created INTEGER NOT NULL,
    answered_at INTEGER,
    status INTEGER
) WITHOUT ROWID;

CREATE TABLE digest (
    shard INTEGER PRIMARY KEY,
    acc BLOB NOT NULL,
    count INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    tag BLOB NOT NULL
);

CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    time INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    device BLOB,
    generation INTEGER,
    reason TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;

CREATE TABLE imports (
    file_digest BLOB PRIMARY KEY,
    next_line INTEGER NOT NULL,
    updated INTEGER NOT NULL
) WITHOUT ROWID;
"#];

/// The SQLite key database.
#[derive(Debug)]
pub struct SqliteDatabase {
    conn: Mutex<Connection>,
    path: PathBuf,
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::Database(e.to_string())
}

impl SqliteDatabase {
    /// Opens (creating if needed) the database file at `path` and brings
    /// its schema up to date.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "secure_delete", "ON")?;
        migrate(&mut conn)?;
        Ok(SqliteDatabase {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
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

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| Error::Database("connection mutex poisoned".into()))
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
    let version: u32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as u32;
    if version > known {
        return Err(Error::Database(format!(
            "database schema version {version} is newer than this program's {known}"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as u32 + 1)?;
        tracing::info!(version = i + 1, "database schema migrated");
    }
    tx.commit()?;
    Ok(())
}

fn dev(b: Vec<u8>) -> rusqlite::Result<DeviceId> {
    let a: [u8; 8] = b.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, "device id".into())
    })?;
    Ok(DeviceId(a))
}

fn arr32(b: Vec<u8>) -> rusqlite::Result<[u8; 32]> {
    b.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, "32-byte value".into())
    })
}

fn conv(what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, what.to_string().into())
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|x| x as u64)
}

const DEVICE_COLS: &str =
    "id, class, suite, epoch, transport_open, created, highest_gen, command_counter";

fn device_row(r: &Row<'_>) -> rusqlite::Result<DeviceRow> {
    Ok(DeviceRow {
        id: dev(r.get(0)?)?,
        class: r.get(1)?,
        suite: Suite::new(r.get(2)?).map_err(|_| conv("suite"))?,
        epoch: r.get(3)?,
        transport_open: r.get(4)?,
        created: r.get::<_, i64>(5)? as u64,
        highest_generation: r.get(6)?,
        command_counter: r.get(7)?,
    })
}

const SEED_COLS: &str = "device, generation, state, base_year, suite, kstore_version, ciphertext, \
     tag, via, enroll_t, enroll_r, enroll_digest, receipt, created, activated_at, suspended_at, \
     deactivated_at, compromised_at, destroyed_at, grace_until";

/// Seed columns with the ciphertext left out (operator queries).
const SEED_COLS_NO_CT: &str = "device, generation, state, base_year, suite, kstore_version, NULL, \
     tag, via, enroll_t, enroll_r, enroll_digest, receipt, created, activated_at, suspended_at, \
     deactivated_at, compromised_at, destroyed_at, grace_until";

fn seed_row(r: &Row<'_>) -> rusqlite::Result<SeedRow> {
    seed_row_at(r, 0)
}

fn seed_row_at(r: &Row<'_>, o: usize) -> rusqlite::Result<SeedRow> {
    let state: String = r.get(o + 2)?;
    let via: String = r.get(o + 8)?;
    Ok(SeedRow {
        device: dev(r.get(o)?)?,
        generation: r.get(o + 1)?,
        state: KeyState::from_name(&state).ok_or_else(|| conv("state"))?,
        base_year: r.get(o + 3)?,
        suite: Suite::new(r.get(o + 4)?).map_err(|_| conv("suite"))?,
        kstore_version: r.get(o + 5)?,
        ciphertext: r.get::<_, Option<Vec<u8>>>(o + 6)?.map(Blob),
        tag: arr32(r.get(o + 7)?)?,
        via: EnrollVia::from_name(&via).ok_or_else(|| conv("via"))?,
        enroll_t: r.get(o + 9)?,
        enroll_r: r.get::<_, i64>(o + 10)? as u64,
        enroll_digest: arr32(r.get(o + 11)?)?,
        receipt: Blob(r.get(o + 12)?),
        created: r.get::<_, i64>(o + 13)? as u64,
        activated_at: opt_u64(r.get(o + 14)?),
        suspended_at: opt_u64(r.get(o + 15)?),
        deactivated_at: opt_u64(r.get(o + 16)?),
        compromised_at: opt_u64(r.get(o + 17)?),
        destroyed_at: opt_u64(r.get(o + 18)?),
        grace_until: opt_u64(r.get(o + 19)?),
    })
}

fn i(v: u64) -> i64 {
    v as i64
}

fn oi(v: Option<u64>) -> Option<i64> {
    v.map(i)
}

struct SqliteTx<'c> {
    tx: &'c rusqlite::Transaction<'c>,
}

impl Tx for SqliteTx<'_> {
    fn device(&mut self, id: DeviceId) -> Result<Option<DeviceRow>> {
        let mut st = self
            .tx
            .prepare_cached(&format!("SELECT {DEVICE_COLS} FROM devices WHERE id = ?1"))?;
        Ok(st.query_row([&id.0[..]], device_row).optional()?)
    }

    fn insert_device(&mut self, d: &DeviceRow) -> Result<()> {
        let mut st = self.tx.prepare_cached(&format!(
            "INSERT INTO devices ({DEVICE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        ))?;
        st.execute(params![
            &d.id.0[..],
            d.class,
            d.suite.id(),
            d.epoch,
            d.transport_open,
            i(d.created),
            d.highest_generation,
            d.command_counter
        ])?;
        Ok(())
    }

    fn update_device(&mut self, d: &DeviceRow) -> Result<()> {
        let mut st = self.tx.prepare_cached(
            "UPDATE devices SET class = ?2, suite = ?3, epoch = ?4, transport_open = ?5, \
             created = ?6, highest_gen = ?7, command_counter = ?8 WHERE id = ?1",
        )?;
        let n = st.execute(params![
            &d.id.0[..],
            d.class,
            d.suite.id(),
            d.epoch,
            d.transport_open,
            i(d.created),
            d.highest_generation,
            d.command_counter
        ])?;
        if n != 1 {
            return Err(Error::Database(format!("device {} not found", d.id)));
        }
        Ok(())
    }

    fn seeds(&mut self, id: DeviceId) -> Result<Vec<SeedRow>> {
        let mut st = self.tx.prepare_cached(&format!(
            "SELECT {SEED_COLS} FROM seeds WHERE device = ?1 ORDER BY generation"
        ))?;
        let rows = st.query_map([&id.0[..]], seed_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn seed_by_enroll_nonce(&mut self, id: DeviceId, t: u32, r: u64) -> Result<Option<SeedRow>> {
        let mut st = self.tx.prepare_cached(&format!(
            "SELECT {SEED_COLS} FROM seeds WHERE device = ?1 AND enroll_t = ?2 AND enroll_r = ?3"
        ))?;
        Ok(st
            .query_row(params![&id.0[..], t, i(r)], seed_row)
            .optional()?)
    }

    fn insert_seed(&mut self, s: &SeedRow) -> Result<()> {
        let mut st = self.tx.prepare_cached(&format!(
            "INSERT INTO seeds ({SEED_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, \
             ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)"
        ))?;
        st.execute(params![
            &s.device.0[..],
            s.generation,
            s.state.name(),
            s.base_year,
            s.suite.id(),
            s.kstore_version,
            s.ciphertext.as_ref().map(|c| &c.0[..]),
            &s.tag[..],
            s.via.name(),
            s.enroll_t,
            i(s.enroll_r),
            &s.enroll_digest[..],
            &s.receipt.0[..],
            i(s.created),
            oi(s.activated_at),
            oi(s.suspended_at),
            oi(s.deactivated_at),
            oi(s.compromised_at),
            oi(s.destroyed_at),
            oi(s.grace_until)
        ])?;
        Ok(())
    }

    fn update_seed(&mut self, s: &SeedRow) -> Result<()> {
        let mut st = self.tx.prepare_cached(
            "UPDATE seeds SET state = ?3, base_year = ?4, suite = ?5, kstore_version = ?6, \
             ciphertext = ?7, tag = ?8, activated_at = ?9, suspended_at = ?10, \
             deactivated_at = ?11, compromised_at = ?12, destroyed_at = ?13, grace_until = ?14 \
             WHERE device = ?1 AND generation = ?2",
        )?;
        let n = st.execute(params![
            &s.device.0[..],
            s.generation,
            s.state.name(),
            s.base_year,
            s.suite.id(),
            s.kstore_version,
            s.ciphertext.as_ref().map(|c| &c.0[..]),
            &s.tag[..],
            oi(s.activated_at),
            oi(s.suspended_at),
            oi(s.deactivated_at),
            oi(s.compromised_at),
            oi(s.destroyed_at),
            oi(s.grace_until)
        ])?;
        if n != 1 {
            return Err(Error::Database(format!(
                "seed {} generation {} not found",
                s.device, s.generation
            )));
        }
        Ok(())
    }

    fn record_replay(
        &mut self,
        id: DeviceId,
        generation: u8,
        t: u32,
        r: u64,
        expires: u64,
    ) -> Result<bool> {
        let mut st = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO replay (device, generation, t, r, expires) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        Ok(st.execute(params![&id.0[..], generation, t, i(r), i(expires)])? == 1)
    }

    fn spend_challenge(&mut self, id: DeviceId, c: &[u8; 8], expires: u64) -> Result<bool> {
        let mut st = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO challenges (device, c, expires) VALUES (?1, ?2, ?3)",
        )?;
        Ok(st.execute(params![&id.0[..], &c[..], i(expires)])? == 1)
    }

    fn notarize(&mut self, n: &NotaryRow) -> Result<NotaryRow> {
        let mut st = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO notary (device, generation, t, r, digest, tag, first_seen) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        st.execute(params![
            &n.device.0[..],
            n.generation,
            n.t,
            i(n.r),
            &n.digest[..],
            &n.tag[..],
            i(n.first_seen)
        ])?;
        self.notary(n.device, n.generation, n.t, n.r, &n.digest)?
            .ok_or_else(|| Error::Database("notary record vanished".into()))
    }

    fn notary(
        &mut self,
        id: DeviceId,
        generation: u8,
        t: u32,
        r: u64,
        digest: &[u8; 32],
    ) -> Result<Option<NotaryRow>> {
        let mut st = self.tx.prepare_cached(
            "SELECT tag, first_seen FROM notary WHERE device = ?1 AND generation = ?2 \
             AND t = ?3 AND r = ?4 AND digest = ?5",
        )?;
        Ok(st
            .query_row(params![&id.0[..], generation, t, i(r), &digest[..]], |row| {
                Ok(NotaryRow {
                    device: id,
                    generation,
                    t,
                    r,
                    digest: *digest,
                    tag: row.get(0)?,
                    first_seen: row.get::<_, i64>(1)? as u64,
                })
            })
            .optional()?)
    }

    fn command(&mut self, id: DeviceId) -> Result<Option<CommandRow>> {
        let mut st = self.tx.prepare_cached(
            "SELECT counter, opcode, generation, r, bytes, created, answered_at, status \
             FROM commands WHERE device = ?1",
        )?;
        Ok(st
            .query_row([&id.0[..]], |row| {
                Ok(CommandRow {
                    device: id,
                    counter: row.get(0)?,
                    opcode: row.get(1)?,
                    generation: row.get(2)?,
                    r: row.get::<_, i64>(3)? as u64,
                    bytes: Blob(row.get(4)?),
                    created: row.get::<_, i64>(5)? as u64,
                    answered_at: opt_u64(row.get(6)?),
                    status: row.get(7)?,
                })
            })
            .optional()?)
    }

    fn put_command(&mut self, c: &CommandRow) -> Result<()> {
        let mut st = self.tx.prepare_cached(
            "INSERT OR REPLACE INTO commands (device, counter, opcode, generation, r, bytes, \
             created, answered_at, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        st.execute(params![
            &c.device.0[..],
            c.counter,
            c.opcode,
            c.generation,
            i(c.r),
            &c.bytes.0[..],
            i(c.created),
            oi(c.answered_at),
            c.status
        ])?;
        Ok(())
    }

    fn digest_shard(&mut self, shard: u8) -> Result<Option<DigestShard>> {
        let mut st = self
            .tx
            .prepare_cached("SELECT acc, count, seq, tag FROM digest WHERE shard = ?1")?;
        Ok(st
            .query_row([shard], |row| {
                Ok(DigestShard {
                    shard,
                    acc: arr32(row.get(0)?)?,
                    count: row.get::<_, i64>(1)? as u64,
                    seq: row.get::<_, i64>(2)? as u64,
                    tag: arr32(row.get(3)?)?,
                })
            })
            .optional()?)
    }

    fn put_digest_shard(&mut self, s: &DigestShard) -> Result<()> {
        let mut st = self.tx.prepare_cached(
            "INSERT OR REPLACE INTO digest (shard, acc, count, seq, tag) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        st.execute(params![s.shard, &s.acc[..], i(s.count), i(s.seq), &s.tag[..]])?;
        Ok(())
    }

    fn append_audit(&mut self, e: &NewAudit) -> Result<()> {
        let last: Option<(i64, Vec<u8>)> = self
            .tx
            .prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let (seq, prev) = match last {
            Some((s, h)) => (s as u64 + 1, arr32(h)?),
            None => (1, [0u8; 32]),
        };
        let hash = audit::chain_hash(&prev, seq, e);
        let mut st = self.tx.prepare_cached(
            "INSERT INTO audit (seq, time, actor, action, device, generation, reason, prev_hash, hash) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        st.execute(params![
            i(seq),
            i(e.time),
            e.actor,
            e.action,
            e.device.map(|d| d.0.to_vec()),
            e.generation,
            e.reason,
            &prev[..],
            &hash[..]
        ])?;
        Ok(())
    }

    fn import_progress(&mut self, file: &[u8; 32]) -> Result<Option<u64>> {
        let mut st = self
            .tx
            .prepare_cached("SELECT next_line FROM imports WHERE file_digest = ?1")?;
        Ok(st
            .query_row([&file[..]], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|v| v as u64))
    }

    fn set_import_progress(&mut self, file: &[u8; 32], next_line: u64, now: u64) -> Result<()> {
        let mut st = self.tx.prepare_cached(
            "INSERT OR REPLACE INTO imports (file_digest, next_line, updated) VALUES (?1, ?2, ?3)",
        )?;
        st.execute(params![&file[..], i(next_line), i(now)])?;
        Ok(())
    }
}

impl KeyDatabase for SqliteDatabase {
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
        let limit = if q.limit == 0 { 100 } else { q.limit.min(10_000) };
        let dcols = DEVICE_COLS
            .split(", ")
            .map(|c| format!("d.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let scols = SEED_COLS_NO_CT
            .split(", ")
            .map(|c| if c == "NULL" { c.to_string() } else { format!("s.{c}") })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {dcols}, {scols} FROM devices d \
             LEFT JOIN seeds s ON s.device = d.id AND s.generation = d.highest_gen \
             WHERE (?1 IS NULL OR d.id > ?1) \
             AND (?2 IS NULL OR s.state = ?2) \
             AND (?3 IS NULL OR d.class = ?3) \
             AND (?4 IS NULL OR s.base_year + 4 <= ?4) \
             ORDER BY d.id LIMIT ?5"
        );
        let mut st = conn.prepare_cached(&sql)?;
        let rows = st.query_map(
            params![
                q.after.map(|d| d.0.to_vec()),
                q.state.map(|s| s.name()),
                q.class,
                q.last_year_at_most,
                limit as i64
            ],
            |r| {
                let device = device_row(r)?;
                let has_seed: Option<Vec<u8>> = r.get(8)?;
                let seeds = match has_seed {
                    Some(_) => vec![seed_row_at(r, 8)?],
                    None => Vec::new(),
                };
                Ok(DeviceView { device, seeds })
            },
        )?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn devices_due(
        &self,
        max_base_year: u16,
        after: Option<DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceId>> {
        let conn = self.lock()?;
        let mut st = conn.prepare_cached(
            "SELECT d.id FROM devices d JOIN seeds s ON s.device = d.id AND s.generation = d.highest_gen \
             LEFT JOIN commands c ON c.device = d.id AND c.answered_at IS NULL \
             WHERE s.state = 'active' AND s.base_year <= ?1 AND c.device IS NULL \
             AND (?2 IS NULL OR d.id > ?2) ORDER BY d.id LIMIT ?3",
        )?;
        let rows = st.query_map(
            params![max_base_year, after.map(|d| d.0.to_vec()), limit as i64],
            |r| dev(r.get(0)?),
        )?;
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
        let (d, g) = match after {
            Some((d, g)) => (Some(d.0.to_vec()), i64::from(g)),
            None => (None, -1),
        };
        let mut st = conn.prepare_cached(&format!(
            "SELECT {SEED_COLS} FROM seeds WHERE ?1 IS NULL OR (device, generation) > (?1, ?2) \
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

    fn flush_erased(&self) -> Result<()> {
        // Moves everything from the write-ahead log into the main file and
        // truncates the log, so erased bytes do not linger in old frames.
        let conn = self.lock()?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

