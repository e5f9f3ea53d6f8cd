//! The PostgreSQL backend: one database shared by several center processes.
//!
//! The services are synchronous (the server calls them from blocking
//! threads), so the backend is synchronous at its surface. Underneath it is
//! tokio-postgres: the connections' I/O runs on a small runtime owned by a
//! dedicated thread, and a caller waits for a query's answer with a minimal
//! executor of its own ([`block_on`], park/unpark). The client side of
//! tokio-postgres only talks to its connection task over channels, so this
//! works from any thread, including a thread of another tokio runtime
//! (where the `postgres` crate's `block_on` would panic).
//!
//! Connections come from a small pool (created on demand up to
//! [`PostgresOptions::pool_size`]); each caches its prepared statements.
//!
//! Locking (see [`crate::db`] for what the services rely on):
//! - transactions run at READ COMMITTED; [`Tx::device`] is
//!   `SELECT ... FOR UPDATE`, so two centers changing one device serialise
//!   on its row and the second reads the first one's committed state;
//! - replay records and spent challenges are `INSERT ... ON CONFLICT DO
//!   NOTHING` under their primary keys: of two concurrent inserts of one
//!   key, one inserts and the other waits for it to commit and inserts
//!   nothing (a replay), across every center;
//! - a digest shard is read and rewritten under a transaction-scoped
//!   advisory lock per shard (which also covers the shard's first insert,
//!   when there is no row to lock yet); audit appends are serialised by one
//!   advisory lock, so the hash chain has one order;
//! - a deadlock or serialization failure (two group commits inserting the
//!   same replay keys in opposite orders, two imports touching shards in
//!   different orders) rolls back and runs the closure again, as the
//!   [`KeyDatabase::transaction`] contract allows.
//!
//! Cache invalidation across centers: a transaction that changes a
//! device's or seed's record NOTIFYs the device on [`CHANGES_CHANNEL`]
//! (delivered only if it commits); [`KeyDatabase::watch_changes`] keeps one
//! connection LISTENing and hands each device to the center, which drops
//! it from its seed cache. A transaction that wrote nothing ends with
//! ROLLBACK (no WAL flush for its row lock).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use microcert_core::DeviceId;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};

use super::{
    AuditRecord, CommandRow, DeviceQuery, DeviceView, DigestShard, KeyDatabase, NewAudit,
    NotaryRow, SeedRow, Tx,
};
use crate::{Error, Result};

mod listen;
mod read;
mod rows;
mod schema;
mod tx;

use rows::*;

/// Runs a future to completion on the calling thread. The futures it is
/// used with (tokio-postgres client calls) need no runtime context: they
/// wait on channels fed by the connection task on the driver thread.
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

pub(crate) fn pg_err(e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => Error::Database(format!("PostgreSQL {}: {}", db.code().code(), db.message())),
        None => Error::Database(format!("PostgreSQL: {e}")),
    }
}

/// Options of the PostgreSQL backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Connections kept open at most (each serves one transaction at a
    /// time).
    pub pool_size: usize,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// How often a transaction is run again after a deadlock or
    /// serialization failure before the error is passed on.
    pub max_retries: u32,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 16,
            connect_timeout: Duration::from_secs(10),
            max_retries: 20,
        }
    }
}

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The NOTIFY channel on which a transaction names the devices it changed.
pub(super) const CHANGES_CHANNEL: &str = "microcert_changes";

/// The thread whose runtime drives every connection's socket. It ends
/// when the database (the last sender) is dropped.
struct Driver {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
}

impl Driver {
    fn start() -> Result<Self> {
        let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("microcert-pg")
            .enable_all()
            .build()
            .map_err(|e| Error::Database(format!("PostgreSQL driver runtime: {e}")))?;
        std::thread::Builder::new()
            .name("microcert-pg-driver".into())
            .spawn(move || {
                rt.block_on(async move {
                    while let Some(job) = rx.recv().await {
                        tokio::spawn(job);
                    }
                });
                // Dropping the runtime here (not in a caller's async
                // context) closes the remaining connections.
                drop(rt);
            })
            .map_err(|e| Error::Database(format!("PostgreSQL driver thread: {e}")))?;
        Ok(Driver { jobs })
    }

    fn spawn(&self, job: Job) -> Result<()> {
        self.jobs
            .send(job)
            .map_err(|_| Error::Database("PostgreSQL driver thread has stopped".into()))
    }
}

/// One connection with its prepared statements.
pub(super) struct PgConn {
    client: Client,
    statements: HashMap<String, Statement>,
    /// The SQLSTATE of the last failed statement, so the transaction loop
    /// can tell a retryable failure from another.
    last_code: Option<SqlState>,
}

impl PgConn {
    fn note<T>(&mut self, r: std::result::Result<T, tokio_postgres::Error>) -> Result<T> {
        r.map_err(|e| {
            self.last_code = e.code().cloned();
            pg_err(e)
        })
    }

    fn prepare(&mut self, sql: &str) -> Result<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let r = block_on(self.client.prepare(sql));
        let st = self.note(r)?;
        self.statements.insert(sql.to_string(), st.clone());
        Ok(st)
    }

    pub(super) fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let st = self.prepare(sql)?;
        let r = block_on(self.client.query(&st, params));
        self.note(r)
    }

    pub(super) fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        let st = self.prepare(sql)?;
        let r = block_on(self.client.query_opt(&st, params));
        self.note(r)
    }

    pub(super) fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let st = self.prepare(sql)?;
        let r = block_on(self.client.execute(&st, params));
        self.note(r)
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        let r = block_on(self.client.batch_execute(sql));
        self.note(r)
    }
}

struct PoolState {
    idle: Vec<PgConn>,
    open: usize,
}

struct Pool {
    config: tokio_postgres::Config,
    opts: PostgresOptions,
    driver: Driver,
    state: Mutex<PoolState>,
    freed: Condvar,
}

/// A connection out of the pool; back in when dropped (unless closed).
struct Lease<'p> {
    pool: &'p Pool,
    conn: Option<PgConn>,
}

impl std::ops::Deref for Lease<'_> {
    type Target = PgConn;
    fn deref(&self) -> &PgConn {
        self.conn
            .as_ref()
            .expect("leased connection present until drop")
    }
}

impl std::ops::DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut PgConn {
        self.conn
            .as_mut()
            .expect("leased connection present until drop")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        match self.conn.take() {
            Some(c) if !c.client.is_closed() => st.idle.push(c),
            _ => st.open -= 1,
        }
        drop(st);
        self.pool.freed.notify_one();
    }
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // The state is two counters and a list; a panic elsewhere while
        // holding the lock leaves it usable.
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn get(&self) -> Result<Lease<'_>> {
        let mut st = self.lock();
        loop {
            while let Some(c) = st.idle.pop() {
                if c.client.is_closed() {
                    st.open -= 1;
                    continue;
                }
                return Ok(Lease {
                    pool: self,
                    conn: Some(c),
                });
            }
            if st.open < self.opts.pool_size {
                st.open += 1;
                drop(st);
                return match self.connect() {
                    Ok(c) => Ok(Lease {
                        pool: self,
                        conn: Some(c),
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            st = match self.freed.wait(st) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }

    fn connect(&self) -> Result<PgConn> {
        let (tx, rx) = std::sync::mpsc::channel();
        let config = self.config.clone();
        self.driver.spawn(Box::pin(async move {
            match config.connect(NoTls).await {
                Ok((client, connection)) => {
                    let _ = tx.send(Ok(client));
                    if let Err(e) = connection.await {
                        tracing::warn!(error = %e, "PostgreSQL connection closed");
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        }))?;
        let client = rx
            .recv_timeout(self.opts.connect_timeout + Duration::from_secs(1))
            .map_err(|_| Error::Database("PostgreSQL: connection timed out".into()))?
            .map_err(pg_err)?;
        Ok(PgConn {
            client,
            statements: HashMap::new(),
            last_code: None,
        })
    }
}

/// The PostgreSQL key database.
pub struct PostgresDatabase {
    pool: Pool,
    /// The URL without its password, for logs and Debug.
    shown: String,
    /// The schema version found when this open migrated (see
    /// [`KeyDatabase::migrated_from`]).
    migrated_from: Option<u32>,
}

impl std::fmt::Debug for PostgresDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresDatabase")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

/// The URL with any password replaced, for logs.
fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
    {
        let user = userinfo.split(':').next().unwrap_or("");
        return format!("{scheme}://{user}:***@{host}");
    }
    url.to_string()
}

impl PostgresDatabase {
    /// Connects to the database at `url` (`postgres://user@host:port/db`,
    /// or a key=value connection string) with the default options and
    /// brings its schema up to date.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, PostgresOptions::default())
    }

    /// Like [`PostgresDatabase::open`], with options.
    pub fn open_with(url: &str, opts: PostgresOptions) -> Result<Self> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::Database(format!("invalid PostgreSQL URL: {e}")))?;
        config.connect_timeout(opts.connect_timeout);
        config.application_name("microcert-center");
        let db = PostgresDatabase {
            pool: Pool {
                config,
                opts: PostgresOptions {
                    pool_size: opts.pool_size.max(1),
                    ..opts
                },
                driver: Driver::start()?,
                state: Mutex::new(PoolState {
                    idle: Vec::new(),
                    open: 0,
                }),
                freed: Condvar::new(),
            },
            shown: redact(url),
            migrated_from: None,
        };
        let mut db = db;
        {
            let conn = db.pool.get()?;
            let from = schema::migrate(&conn.client)?;
            drop(conn);
            db.migrated_from = from;
        }
        tracing::info!(url = %db.shown, "PostgreSQL key database open");
        Ok(db)
    }

    /// The schema version (number of migrations applied).
    pub fn schema_version(&self) -> Result<u32> {
        let mut c = self.pool.get()?;
        let row = c.query_opt("SELECT version FROM schema_version", &[])?;
        Ok(row.map(|r| g::<i32>(&r, 0)).transpose()?.unwrap_or(0) as u32)
    }

    /// Runs plain SQL outside the services (tests that tamper with the
    /// database from outside, operators' maintenance).
    pub fn execute_raw(&self, sql: &str) -> Result<()> {
        let mut c = self.pool.get()?;
        c.batch(sql)
    }

    fn retryable(code: Option<&SqlState>) -> bool {
        matches!(
            code,
            Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
        )
    }
}

impl KeyDatabase for PostgresDatabase {
    fn transaction(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<()>) -> Result<()> {
        let mut attempt = 0u32;
        loop {
            let mut conn = self.pool.get()?;
            conn.last_code = None;
            conn.batch("BEGIN")?;
            let mut tx = tx::PgTx {
                c: &mut conn,
                wrote: false,
                changed: Vec::new(),
            };
            let result = f(&mut tx).and_then(|()| tx.notify_changes());
            let end = if tx.wrote { "COMMIT" } else { "ROLLBACK" };
            let (err, code) = match result {
                Ok(()) => match conn.batch(end) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        let code = conn.last_code.take();
                        (e, code)
                    }
                },
                Err(e) => {
                    let code = conn.last_code.take();
                    // A failed statement aborted the transaction; end it
                    // so the connection can be reused.
                    let _ = conn.batch("ROLLBACK");
                    (e, code)
                }
            };
            drop(conn);
            if Self::retryable(code.as_ref()) && attempt < self.pool.opts.max_retries {
                attempt += 1;
                tracing::debug!(attempt, error = %err, "transaction conflict: running it again");
                // A short, growing pause so the winner can finish.
                std::thread::sleep(Duration::from_micros(200 << attempt.min(8)));
                continue;
            }
            return Err(err);
        }
    }

    fn device_view(&self, id: DeviceId) -> Result<Option<DeviceView>> {
        read::device_view(&mut *self.pool.get()?, id)
    }

    fn list_devices(&self, q: &DeviceQuery) -> Result<Vec<DeviceView>> {
        read::list_devices(&mut *self.pool.get()?, q)
    }

    fn devices_due(
        &self,
        max_base_year: u16,
        after: Option<DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceId>> {
        read::devices_due(&mut *self.pool.get()?, max_base_year, after, limit)
    }

    fn devices_to_expire(&self, now: u64, year_now: u16, limit: usize) -> Result<Vec<DeviceId>> {
        read::devices_to_expire(&mut *self.pool.get()?, now, year_now, limit)
    }

    fn scan_seeds(&self, after: Option<(DeviceId, u8)>, limit: usize) -> Result<Vec<SeedRow>> {
        read::scan_seeds(&mut *self.pool.get()?, after, limit)
    }

    fn digest_shards(&self) -> Result<Vec<DigestShard>> {
        read::digest_shards(&mut *self.pool.get()?)
    }

    fn audit_log(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>> {
        read::audit_log(&mut *self.pool.get()?, after, limit)
    }

    fn scan_notary(&self, after: Option<&NotaryRow>, limit: usize) -> Result<Vec<NotaryRow>> {
        read::scan_notary(&mut *self.pool.get()?, after, limit)
    }

    fn scan_commands(
        &self,
        after: Option<DeviceId>,
        limit: usize,
    ) -> Result<Vec<(CommandRow, Option<[u8; 32]>)>> {
        read::scan_commands(&mut *self.pool.get()?, after, limit)
    }

    fn migrated_from(&self) -> Option<u32> {
        self.migrated_from
    }

    fn prune(&self, now: u64) -> Result<u64> {
        let mut c = self.pool.get()?;
        c.batch("BEGIN")?;
        let r = (|| {
            let a = c.execute("DELETE FROM replay WHERE expires < $1", &[&i(now)])?;
            let b = c.execute("DELETE FROM challenges WHERE expires < $1", &[&i(now)])?;
            Ok(a + b)
        })();
        match r {
            Ok(n) => {
                c.batch("COMMIT")?;
                Ok(n)
            }
            Err(e) => {
                let _ = c.batch("ROLLBACK");
                Err(e)
            }
        }
    }

    fn flush_erased(&self) -> Result<()> {
        // A destroyed ciphertext's old row version stays in the heap until
        // VACUUM reclaims it (and in WAL segments until they are recycled,
        // and in base backups: see docs/deployment.md). VACUUM makes the
        // space reusable, which is as far as PostgreSQL goes.
        let mut c = self.pool.get()?;
        c.batch("VACUUM seeds")
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        let mut c = self.pool.get()?;
        let row = c.query_opt("SELECT value FROM meta WHERE key = $1", &[&key])?;
        row.map(|r| g::<String>(&r, 0)).transpose()
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let mut c = self.pool.get()?;
        c.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&key, &value],
        )?;
        Ok(())
    }

    fn watch_changes(&self, on_change: super::ChangeHook) -> Result<()> {
        let config = self.pool.config.clone();
        self.pool
            .driver
            .spawn(Box::pin(listen::listen(config, on_change)))
    }

    fn read_snapshot(
        &self,
        f: &mut dyn FnMut(Option<&dyn KeyDatabase>) -> Result<()>,
    ) -> Result<()> {
        let mut conn = self.pool.get()?;
        conn.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
        let r = {
            let snap = Snapshot {
                conn: Mutex::new(&mut conn),
            };
            f(Some(&snap))
        };
        let end = conn.batch("COMMIT");
        r.and(end)
    }

    fn list_tokens(&self) -> Result<Vec<super::TokenRow>> {
        let mut c = self.pool.get()?;
        let rows = c.query(
            &format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY created, hash"),
            &[],
        )?;
        rows.iter().map(token_row).collect()
    }

    fn note_token_use(&self, hash: &str, last_used: Option<u64>, failures: u64) -> Result<()> {
        let mut c = self.pool.get()?;
        c.execute(
            "UPDATE tokens SET last_used = GREATEST(last_used, $2::BIGINT), \
             failures = failures + $3::BIGINT WHERE hash = $1",
            &[&hash, &oi(last_used), &i(failures)],
        )?;
        Ok(())
    }
}

/// A read-only view of the database as of one moment: every read runs in
/// one REPEATABLE READ transaction on one connection.
struct Snapshot<'c> {
    conn: Mutex<&'c mut PgConn>,
}

impl std::fmt::Debug for Snapshot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostgresSnapshot")
    }
}

impl Snapshot<'_> {
    fn with<T>(&self, f: impl FnOnce(&mut PgConn) -> Result<T>) -> Result<T> {
        let mut g = self
            .conn
            .lock()
            .map_err(|_| Error::Database("snapshot connection poisoned".into()))?;
        f(&mut g)
    }
}

impl KeyDatabase for Snapshot<'_> {
    fn transaction(&self, _f: &mut dyn FnMut(&mut dyn Tx) -> Result<()>) -> Result<()> {
        Err(Error::Database("a read snapshot cannot write".into()))
    }
    fn device_view(&self, id: DeviceId) -> Result<Option<DeviceView>> {
        self.with(|c| read::device_view(c, id))
    }
    fn list_devices(&self, q: &DeviceQuery) -> Result<Vec<DeviceView>> {
        self.with(|c| read::list_devices(c, q))
    }
    fn devices_due(&self, y: u16, after: Option<DeviceId>, limit: usize) -> Result<Vec<DeviceId>> {
        self.with(|c| read::devices_due(c, y, after, limit))
    }
    fn devices_to_expire(&self, now: u64, y: u16, limit: usize) -> Result<Vec<DeviceId>> {
        self.with(|c| read::devices_to_expire(c, now, y, limit))
    }
    fn scan_seeds(&self, after: Option<(DeviceId, u8)>, limit: usize) -> Result<Vec<SeedRow>> {
        self.with(|c| read::scan_seeds(c, after, limit))
    }
    fn digest_shards(&self) -> Result<Vec<DigestShard>> {
        self.with(read::digest_shards)
    }
    fn audit_log(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>> {
        self.with(|c| read::audit_log(c, after, limit))
    }
    fn scan_notary(&self, after: Option<&NotaryRow>, limit: usize) -> Result<Vec<NotaryRow>> {
        self.with(|c| read::scan_notary(c, after, limit))
    }
    fn scan_commands(
        &self,
        after: Option<DeviceId>,
        limit: usize,
    ) -> Result<Vec<(CommandRow, Option<[u8; 32]>)>> {
        self.with(|c| read::scan_commands(c, after, limit))
    }
    fn prune(&self, _now: u64) -> Result<u64> {
        Err(Error::Database("a read snapshot cannot write".into()))
    }
    fn flush_erased(&self) -> Result<()> {
        Err(Error::Database("a read snapshot cannot write".into()))
    }
}
