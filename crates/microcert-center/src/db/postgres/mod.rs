//! The PostgreSQL backend: one database shared by several center processes.
//!
//! The services are synchronous (the server calls them from blocking
//! threads), so the backend is synchronous at its surface. Underneath it is
//! tokio-postgres with a deadpool-postgres pool: the connections' I/O and
//! the pool's timers run on a small tokio runtime owned by the backend, and
//! a caller waits for an answer on its own thread ([`wait_on`]), which
//! works from any thread, including a worker of another runtime.
//!
//! Failing fast: a checkout waits at most `checkout_timeout` (5 s), a
//! statement runs at most `statement_timeout` (10 s, enforced by the server,
//! and by the client a little later for a server that went silent); a
//! connection that failed (lost, timed out, read-only server) is dropped,
//! not returned to the pool, and the next checkout connects again, so the
//! center recovers by itself when the server comes back. Connections ask
//! for a read-write session (`target_session_attrs=read-write`), so a
//! standby or a demoted primary is refused at connect time; a write that
//! meets SQLSTATE 25006 anyway reports a read-only server.
//!
//! The connection string (URL or libpq key/value) is read by
//! [`conninfo`]: `sslmode` (rustls with the ring provider), `sslrootcert`,
//! `.pgpass`, and the pool's own settings.
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

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod};
use microcert_core::DeviceId;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::{
    AuditRecord, CommandRow, DeviceQuery, DeviceView, DigestShard, KeyDatabase, NewAudit,
    NotaryRow, SeedRow, Tx,
};
use crate::{DbError, DbFailure, Error, Result};

pub mod conninfo;
mod listen;
mod read;
mod rows;
mod schema;
mod tx;

pub use conninfo::SslMode;
use rows::*;

/// Waits on the calling thread for a future whose I/O and timers run on
/// the backend's runtime (the thread has entered it, so timers and spawns
/// go there). This is a wait, not an executor: it polls one future and
/// parks until the runtime's driver wakes it, which works from any thread,
/// including a worker of another tokio runtime (where tokio's own
/// `block_on` would panic).
fn wait_on<F: Future>(rt: &tokio::runtime::Handle, make: impl FnOnce() -> F) -> F::Output {
    let _enter = rt.enter();
    block_on(make())
}

/// The message for a read-only server.
const READ_ONLY: &str = "PostgreSQL server is read-only (a standby, or a primary that \
     failed over): point the center at the primary";

/// An error with its sources ("error connecting to server: Connection
/// refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// A statement's parameters.
pub(super) type Params<'a, 'b> = &'a [&'b (dyn ToSql + Sync)];

pub(crate) fn pg_err(e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) if *db.code() == SqlState::READ_ONLY_SQL_TRANSACTION => Error::db(
            DbFailure::ReadOnly,
            format!("{READ_ONLY} ({})", db.message()),
        ),
        Some(db) if *db.code() == SqlState::QUERY_CANCELED => Error::db(
            DbFailure::Timeout,
            format!(
                "PostgreSQL {}: {} (statement_timeout)",
                db.code().code(),
                db.message()
            ),
        ),
        Some(db) => {
            // SQLSTATE classes 08 (connection), 40 (transaction rollback:
            // serialization, deadlock), 53 (insufficient resources), 57
            // (operator intervention: shutdown, cancel) are for now;
            // anything else (a constraint, a type) is this program's.
            let code = db.code().code();
            let kind = match code.get(..2) {
                Some("08") => DbFailure::Unreachable,
                Some("40" | "53" | "57") => DbFailure::Busy,
                _ => DbFailure::Internal,
            };
            Error::db(kind, format!("PostgreSQL {code}: {}", db.message()))
        }
        None if e.is_closed() => Error::db(
            DbFailure::Unreachable,
            format!(
                "PostgreSQL connection lost ({}); the request was not completed",
                chain(&e)
            ),
        ),
        None => Error::db(client_failure(&e), format!("PostgreSQL: {}", chain(&e))),
    }
}

/// The kind of a client-side error (no SQLSTATE, connection not closed).
/// `tokio_postgres` keeps its error kind private, so the kind is read
/// from the source (an I/O error is the network) and the message: a row
/// or a column the program cannot convert is a corrupt database (a
/// lasting failure, not a 503 a device would retry forever); a wrong
/// configuration or password is the operator's; a timeout or a failed
/// connection is the network's; anything else is this program's.
fn client_failure(e: &tokio_postgres::Error) -> DbFailure {
    use std::error::Error as _;
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return DbFailure::Unreachable;
        }
        source = s.source();
    }
    let text = e.to_string();
    if text.starts_with("error deserializing") || text.contains("unexpected number of rows") {
        DbFailure::Corrupt
    } else if text.starts_with("invalid configuration") || text.starts_with("authentication") {
        DbFailure::Config
    } else if text.starts_with("timeout") {
        DbFailure::Timeout
    } else if text.starts_with("error connecting") || text.starts_with("error communicating") {
        DbFailure::Unreachable
    } else {
        DbFailure::Internal
    }
}

/// Options of the PostgreSQL backend. The connection string's
/// `pool_size`, `checkout_timeout` and `statement_timeout` override them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Connections kept open at most (each serves one transaction at a
    /// time).
    pub pool_size: usize,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// How long a caller waits for a free connection (or a new one) before
    /// it fails with a database error.
    pub checkout_timeout: Duration,
    /// The server's `statement_timeout` on every connection; the client
    /// also gives up on a statement a little after it (a server that went
    /// silent), and discards that connection.
    pub statement_timeout: Duration,
    /// How often a transaction is run again after a deadlock or
    /// serialization failure before the error is passed on.
    pub max_retries: u32,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            checkout_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
            max_retries: 20,
        }
    }
}

/// The NOTIFY channel on which a transaction names the devices it changed.
pub(super) const CHANGES_CHANNEL: &str = "microcert_changes";

/// The runtime that drives every connection's socket and the pool's
/// timers; shut down in the background when the database is dropped (so
/// dropping it inside another runtime does not panic).
struct Driver {
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl Driver {
    fn start() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("microcert-pg")
            .enable_all()
            .build()
            .map_err(|e| {
                Error::db(
                    DbFailure::Internal,
                    format!("PostgreSQL driver runtime: {e}"),
                )
            })?;
        let handle = rt.handle().clone();
        Ok(Driver {
            rt: Some(rt),
            handle,
        })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The TLS connector chosen by `sslmode`.
#[derive(Clone)]
enum Tls {
    None,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

/// One connection out of the pool (back in when dropped, unless it broke).
pub(super) struct PgConn {
    obj: Option<deadpool_postgres::Object>,
    rt: tokio::runtime::Handle,
    /// The client-side limit on one statement's answer.
    limit: Duration,
    /// The SQLSTATE of the last failed statement, so the transaction loop
    /// can tell a retryable failure from another.
    last_code: Option<SqlState>,
    /// The connection's state is unknown (lost, timed out, read-only
    /// server): it is closed instead of going back to the pool.
    broken: bool,
    /// A transaction was opened but BEGIN not sent yet: it goes out with
    /// the first statement, in the same round trip (pipelined).
    begin_pending: bool,
}

impl Drop for PgConn {
    fn drop(&mut self) {
        if let Some(obj) = self.obj.take()
            && (self.broken || obj.is_closed())
        {
            drop(deadpool_postgres::Object::take(obj));
        }
    }
}

impl PgConn {
    fn client(&self) -> &deadpool_postgres::Object {
        self.obj.as_ref().expect("connection present until drop")
    }

    /// Runs one client call with the client-side time limit.
    fn call<T>(
        &mut self,
        f: impl AsyncFnOnce(&deadpool_postgres::Object) -> std::result::Result<T, tokio_postgres::Error>,
    ) -> Result<T> {
        let limit = self.limit;
        let rt = self.rt.clone();
        let begin = std::mem::take(&mut self.begin_pending);
        let c = self.obj.as_ref().expect("connection present until drop");
        let r = wait_on(&rt, || {
            tokio::time::timeout(limit, async move {
                if begin {
                    // Both requests are written before either answer is
                    // awaited: one round trip.
                    let (b, v) = tokio::join!(c.batch_execute("BEGIN"), f(c));
                    b?;
                    v
                } else {
                    f(c).await
                }
            })
        });
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.last_code = e.code().cloned();
                if e.is_closed()
                    || e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
                    || e.code() == Some(&SqlState::ADMIN_SHUTDOWN)
                    || e.as_db_error().is_none()
                {
                    self.broken = true;
                }
                Err(pg_err(e))
            }
            Err(_) => {
                self.broken = true;
                self.last_code = None;
                Err(Error::db(
                    DbFailure::Timeout,
                    format!(
                        "PostgreSQL did not answer within {} s; connection dropped",
                        limit.as_secs_f32()
                    ),
                ))
            }
        }
    }

    pub(super) fn query(&mut self, sql: &str, params: Params<'_, '_>) -> Result<Vec<Row>> {
        self.call(async |c| {
            let st = c.prepare_cached(sql).await?;
            c.query(&st, params).await
        })
    }

    /// At most one row (a key names one): more than one is a corrupt
    /// database (a unique index dropped and a row planted), never "the
    /// first of them".
    pub(super) fn query_opt(&mut self, sql: &str, params: Params<'_, '_>) -> Result<Option<Row>> {
        let mut rows = self.query(sql, params)?;
        if rows.len() > 1 {
            return Err(Error::db(
                DbFailure::Corrupt,
                "a query by key found more than one row (a unique index is missing)",
            ));
        }
        Ok(rows.pop())
    }

    pub(super) fn execute(&mut self, sql: &str, params: Params<'_, '_>) -> Result<u64> {
        self.call(async |c| {
            let st = c.prepare_cached(sql).await?;
            c.execute(&st, params).await
        })
    }

    /// Takes the transaction-scoped advisory lock `key`, then runs a
    /// query, both sent before either answer is awaited: one round trip.
    /// The server still runs them in order, so under READ COMMITTED the
    /// query's snapshot is taken after the lock was granted.
    pub(super) fn locked_query_opt(
        &mut self,
        key: i64,
        sql: &str,
        p: Params<'_, '_>,
    ) -> Result<Option<Row>> {
        self.call(async |c| {
            let lock = c.prepare_cached("SELECT pg_advisory_xact_lock($1)").await?;
            let st = c.prepare_cached(sql).await?;
            let key: [&(dyn ToSql + Sync); 1] = [&key];
            let (l, v) = tokio::join!(c.execute(&lock, &key), c.query_opt(&st, p));
            l?;
            v
        })
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        self.call(async |c| c.batch_execute(sql).await)
    }

    /// Ends a transaction opened with `begin_pending`: nothing to send if
    /// no statement ran.
    fn end(&mut self, sql: &str) -> Result<()> {
        if std::mem::take(&mut self.begin_pending) {
            return Ok(());
        }
        self.batch(sql)
    }
}

struct Pool {
    pool: deadpool_postgres::Pool,
    config: tokio_postgres::Config,
    tls: Tls,
    opts: PostgresOptions,
    driver: Driver,
}

impl Pool {
    fn get(&self) -> Result<PgConn> {
        use deadpool_postgres::{PoolError, TimeoutType};
        let r = wait_on(&self.driver.handle, || self.pool.get());
        let obj = r.map_err(|e| match e {
            PoolError::Timeout(TimeoutType::Wait) => Error::db(
                DbFailure::Timeout,
                format!(
                    "PostgreSQL: no connection free within {} s (all {} busy)",
                    self.opts.checkout_timeout.as_secs_f32(),
                    self.opts.pool_size
                ),
            ),
            PoolError::Timeout(_) => Error::db(
                DbFailure::Timeout,
                format!(
                    "PostgreSQL: could not connect within {} s",
                    self.opts.connect_timeout.as_secs_f32()
                ),
            ),
            PoolError::Backend(e) => {
                let msg = chain(&e);
                if msg.contains("does not allow writes")
                    || msg.contains("read-only")
                    || msg.contains("read only")
                {
                    Error::db(DbFailure::ReadOnly, format!("{READ_ONLY} ({msg})"))
                } else if msg.contains("TLS") || msg.contains("certificate") {
                    Error::db(
                        DbFailure::Config,
                        format!(
                            "PostgreSQL TLS: {msg} (sslmode requires TLS; the server does not \
                         offer it or its certificate was refused)"
                        ),
                    )
                } else {
                    Error::db(
                        DbFailure::Unreachable,
                        format!("PostgreSQL: cannot connect: {msg}"),
                    )
                }
            }
            other => Error::db(DbFailure::Unreachable, format!("PostgreSQL pool: {other}")),
        })?;
        Ok(PgConn {
            obj: Some(obj),
            rt: self.driver.handle.clone(),
            limit: self.opts.statement_timeout + Duration::from_secs(2),
            last_code: None,
            broken: false,
            begin_pending: false,
        })
    }
}

/// What a cold load answers: the device and its seeds, None when absent.
type Loaded = Option<(crate::db::DeviceRow, Vec<SeedRow>)>;

/// Concurrent cold loads ([`KeyDatabase::load_device`]) grouped into one
/// statement, as the group commit groups replay records: the first caller
/// to find no read running becomes the leader, takes every device queued
/// so far and reads them all at once; callers that arrived meanwhile form
/// the next group, whose statement starts after they arrived (so nobody is
/// answered from a read older than its own call). A lone caller reads
/// alone.
#[derive(Default)]
struct ReadGroup {
    state: Mutex<ReadState>,
    turn: std::sync::Condvar,
}

#[derive(Default)]
struct ReadState {
    next: u64,
    queue: Vec<(u64, DeviceId)>,
    done: std::collections::HashMap<u64, std::result::Result<Loaded, DbError>>,
    leader: bool,
}

/// The most devices one grouped read asks for.
const READ_GROUP_MAX: usize = 256;

impl ReadGroup {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReadState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn load(&self, pool: &Pool, id: DeviceId) -> Result<Loaded> {
        let mut st = self.lock();
        let ticket = st.next;
        st.next = st.next.wrapping_add(1);
        st.queue.push((ticket, id));
        loop {
            if let Some(r) = st.done.remove(&ticket) {
                return r.map_err(Error::Database);
            }
            if st.leader {
                st = self
                    .turn
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            st.leader = true;
            let take = st.queue.len().min(READ_GROUP_MAX);
            let batch: Vec<(u64, DeviceId)> = st.queue.drain(..take).collect();
            drop(st);
            // The leader's flag is cleared and the others woken even if
            // the read panics (its callers then get an error).
            struct Leading<'a>(&'a ReadGroup, &'a [(u64, DeviceId)]);
            impl Drop for Leading<'_> {
                fn drop(&mut self) {
                    let mut st = self.0.lock();
                    if std::thread::panicking() {
                        for (t, _) in self.1 {
                            st.done.insert(
                                *t,
                                Err(DbError {
                                    kind: DbFailure::Internal,
                                    message: "grouped read failed".into(),
                                }),
                            );
                        }
                    }
                    st.leader = false;
                    drop(st);
                    self.0.turn.notify_all();
                }
            }
            let leading = Leading(self, &batch);
            let results = Self::read(pool, &batch);
            self.lock().done.extend(results);
            drop(leading);
            st = self.lock();
        }
    }

    fn read(
        pool: &Pool,
        batch: &[(u64, DeviceId)],
    ) -> Vec<(u64, std::result::Result<Loaded, DbError>)> {
        let got = if let [(_, id)] = batch {
            pool.get()
                .and_then(|mut c| read::load_device(&mut c, *id))
                .map(|one| {
                    one.into_iter()
                        .map(|(d, s)| (d.id, (d, s)))
                        .collect::<std::collections::HashMap<_, _>>()
                })
        } else {
            let mut ids: Vec<DeviceId> = batch.iter().map(|(_, id)| *id).collect();
            ids.sort_unstable_by_key(|d| d.0);
            ids.dedup();
            pool.get()
                .and_then(|mut c| read::load_devices(&mut c, &ids))
        };
        match got {
            Ok(map) => batch
                .iter()
                .map(|(t, id)| (*t, Ok(map.get(id).cloned())))
                .collect(),
            Err(e) => {
                let msg = match e {
                    Error::Database(d) => d,
                    other => DbError {
                        kind: DbFailure::Internal,
                        message: other.to_string(),
                    },
                };
                batch.iter().map(|(t, _)| (*t, Err(msg.clone()))).collect()
            }
        }
    }
}

/// The PostgreSQL key database.
pub struct PostgresDatabase {
    pool: Pool,
    /// Cold loads grouped into shared statements.
    reads: ReadGroup,
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

/// The connection string with any password replaced, for logs.
fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        // The last '@' ends the user information: a password may hold '@'.
        if let Some((userinfo, host)) = rest.rsplit_once('@') {
            let user = userinfo.split(':').next().unwrap_or("");
            let host = redact_query(host);
            return format!("{scheme}://{user}:***@{host}");
        }
        return format!("{scheme}://{}", redact_query(rest));
    }
    // key=value: drop whatever follows password= up to the next key.
    match url.find("password") {
        Some(at) => format!("{}password=***", &url[..at]),
        None => url.to_string(),
    }
}

fn redact_query(s: &str) -> String {
    match s.find("password=") {
        Some(at) => format!("{}password=***", &s[..at]),
        None => s.to_string(),
    }
}

/// Waits for a client future of the migration code (which needs no
/// runtime context: the client talks to its connection task over
/// channels).
pub(super) fn block_on<F: Future>(f: F) -> F::Output {
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

impl PostgresDatabase {
    /// Connects to the database at `url` (`postgres://user@host:port/db`,
    /// or a key=value connection string) with the default options and
    /// brings its schema up to date.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, PostgresOptions::default())
    }

    /// Like [`PostgresDatabase::open`], with options (the connection
    /// string's own settings win).
    pub fn open_with(url: &str, opts: PostgresOptions) -> Result<Self> {
        let (rest, ex) = conninfo::split(url)?;
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| {
            Error::db(
                DbFailure::Config,
                format!("invalid PostgreSQL connection string: {e}"),
            )
        })?;
        let opts = PostgresOptions {
            pool_size: ex.pool_size.unwrap_or(opts.pool_size).max(1),
            checkout_timeout: ex.checkout_timeout.unwrap_or(opts.checkout_timeout),
            statement_timeout: ex.statement_timeout.unwrap_or(opts.statement_timeout),
            connect_timeout: config
                .get_connect_timeout()
                .copied()
                .unwrap_or(opts.connect_timeout),
            ..opts
        };
        conninfo::apply_pgpass(&mut config, &ex)?;
        config.connect_timeout(opts.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("microcert-center");
        }
        // A center writes: a standby (or a demoted primary) is refused
        // at connect time, not at the first write.
        if !ex.session_attrs {
            config.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        // The server cancels a statement running longer than this (a
        // stuck lock, a runaway scan) with SQLSTATE 57014.
        let ms = opts.statement_timeout.as_millis().max(1);
        let options = match config.get_options() {
            Some(o) if o.contains("statement_timeout") => o.to_string(),
            Some(o) => format!("{o} -c statement_timeout={ms}"),
            None => format!("-c statement_timeout={ms}"),
        };
        config.options(options);
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        let mode = ex.sslmode.unwrap_or(SslMode::Prefer);
        let tls = match conninfo::tls(mode, ex.sslrootcert.as_deref())? {
            Some(t) => {
                config.ssl_mode(match mode {
                    SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                    _ => tokio_postgres::config::SslMode::Require,
                });
                Tls::Rustls(t)
            }
            None => {
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                Tls::None
            }
        };
        let driver = Driver::start()?;
        let mc = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Tls::None => Manager::from_config(config.clone(), NoTls, mc),
            Tls::Rustls(t) => Manager::from_config(config.clone(), t.clone(), mc),
        };
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(opts.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(opts.checkout_timeout))
            .create_timeout(Some(opts.connect_timeout))
            .recycle_timeout(Some(opts.checkout_timeout))
            .build()
            .map_err(|e| Error::db(DbFailure::Config, format!("PostgreSQL pool: {e}")))?;
        let mut db = PostgresDatabase {
            reads: ReadGroup::default(),
            pool: Pool {
                pool,
                config,
                tls,
                opts,
                driver,
            },
            shown: redact(url),
            migrated_from: None,
        };
        {
            let conn = db.pool.get()?;
            let from = schema::migrate(conn.client())?;
            drop(conn);
            db.migrated_from = from;
        }
        tracing::info!(url = %db.shown, "PostgreSQL key database open");
        Ok(db)
    }

    /// The options in effect (after the connection string's).
    pub fn options(&self) -> PostgresOptions {
        self.pool.opts
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
            conn.begin_pending = true;
            let mut tx = tx::PgTx::new(&mut conn);
            let result = f(&mut tx).and_then(|()| tx.notify_changes());
            let end = if tx.wrote { "COMMIT" } else { "ROLLBACK" };
            let (err, code) = match result {
                Ok(()) => match conn.end(end) {
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
                    let _ = conn.end("ROLLBACK");
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
        read::device_view(&mut self.pool.get()?, id)
    }

    fn list_devices(&self, q: &DeviceQuery) -> Result<Vec<DeviceView>> {
        read::list_devices(&mut self.pool.get()?, q)
    }

    fn devices_due(&self, y: u16, after: Option<DeviceId>, limit: usize) -> Result<Vec<DeviceId>> {
        read::devices_due(&mut self.pool.get()?, y, after, limit)
    }

    fn devices_to_expire(&self, now: u64, year_now: u16, limit: usize) -> Result<Vec<DeviceId>> {
        read::devices_to_expire(&mut self.pool.get()?, now, year_now, limit)
    }

    fn scan_seeds(&self, after: Option<(DeviceId, u8)>, limit: usize) -> Result<Vec<SeedRow>> {
        read::scan_seeds(&mut self.pool.get()?, after, limit)
    }

    fn digest_shards(&self) -> Result<Vec<DigestShard>> {
        read::digest_shards(&mut self.pool.get()?)
    }

    fn audit_log(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>> {
        read::audit_log(&mut self.pool.get()?, after, limit)
    }

    fn scan_notary(&self, after: Option<&NotaryRow>, limit: usize) -> Result<Vec<NotaryRow>> {
        read::scan_notary(&mut self.pool.get()?, after, limit)
    }

    fn scan_commands(
        &self,
        after: Option<DeviceId>,
        limit: usize,
    ) -> Result<Vec<(CommandRow, Option<[u8; 32]>)>> {
        read::scan_commands(&mut self.pool.get()?, after, limit)
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

    fn load_device(&self, id: DeviceId) -> Result<Option<(crate::db::DeviceRow, Vec<SeedRow>)>> {
        self.reads.load(&self.pool, id)
    }

    fn watch_changes(&self, on_change: super::ChangeHook) -> Result<()> {
        let config = self.pool.config.clone();
        let h = &self.pool.driver.handle;
        match self.pool.tls.clone() {
            Tls::None => h.spawn(listen::listen(config, NoTls, on_change)),
            Tls::Rustls(t) => h.spawn(listen::listen(config, t, on_change)),
        };
        Ok(())
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

    fn lease(&self, name: &str) -> Result<Option<super::LeaseRow>> {
        let mut c = self.pool.get()?;
        let row = c.query_opt(
            "SELECT name, holder, expires_ms, tag FROM leases WHERE name = $1",
            &[&name],
        )?;
        row.map(|r| {
            Ok(super::LeaseRow {
                name: g(&r, 0)?,
                holder: g(&r, 1)?,
                expires_ms: u64::try_from(g::<i64>(&r, 2)?).unwrap_or(0),
                tag: g(&r, 3)?,
            })
        })
        .transpose()
    }

    fn swap_lease(&self, old: Option<&super::LeaseRow>, new: &super::LeaseRow) -> Result<bool> {
        let mut c = self.pool.get()?;
        let exp = i64::try_from(new.expires_ms).unwrap_or(i64::MAX);
        let n = match old {
            None => c.execute(
                "INSERT INTO leases (name, holder, expires_ms, tag) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO NOTHING",
                &[&new.name, &new.holder, &exp, &new.tag],
            )?,
            Some(o) => {
                let old_exp = i64::try_from(o.expires_ms).unwrap_or(i64::MAX);
                c.execute(
                    "UPDATE leases SET holder = $2, expires_ms = $3, tag = $4 \
                     WHERE name = $1 AND holder = $5 AND expires_ms = $6 AND tag = $7",
                    &[
                        &new.name,
                        &new.holder,
                        &exp,
                        &new.tag,
                        &o.holder,
                        &old_exp,
                        &o.tag,
                    ],
                )?
            }
        };
        Ok(n == 1)
    }

    fn list_tokens(&self) -> Result<Vec<super::TokenRow>> {
        read_tokens(&mut self.pool.get()?)
    }

    fn list_marks(&self) -> Result<Vec<(String, u64, Vec<u8>)>> {
        read_marks(&mut self.pool.get()?)
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

/// Every shared mark: (name, value, tag).
/// Every token row, oldest first.
pub(super) fn read_tokens(c: &mut PgConn) -> Result<Vec<super::TokenRow>> {
    let rows = c.query(
        &format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY created, hash"),
        &[],
    )?;
    rows.iter().map(token_row).collect()
}

pub(super) fn read_marks(c: &mut PgConn) -> Result<Vec<(String, u64, Vec<u8>)>> {
    let rows = c.query("SELECT name, value, tag FROM marks ORDER BY name", &[])?;
    rows.iter()
        .map(|r| {
            Ok((
                g::<String>(r, 0)?,
                g::<i64>(r, 1)?.max(0) as u64,
                g::<Vec<u8>>(r, 2)?,
            ))
        })
        .collect()
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
            .map_err(|_| Error::db(DbFailure::Internal, "snapshot connection poisoned"))?;
        f(&mut g)
    }
}

impl KeyDatabase for Snapshot<'_> {
    fn transaction(&self, _f: &mut dyn FnMut(&mut dyn Tx) -> Result<()>) -> Result<()> {
        Err(Error::db(
            DbFailure::Internal,
            "a read snapshot cannot write",
        ))
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
        Err(Error::db(
            DbFailure::Internal,
            "a read snapshot cannot write",
        ))
    }
    fn list_tokens(&self) -> Result<Vec<super::TokenRow>> {
        self.with(read_tokens)
    }
    fn list_marks(&self) -> Result<Vec<(String, u64, Vec<u8>)>> {
        self.with(read_marks)
    }
    fn flush_erased(&self) -> Result<()> {
        Err(Error::db(
            DbFailure::Internal,
            "a read snapshot cannot write",
        ))
    }
}

#[cfg(test)]
mod redact_tests {
    #[test]
    fn a_password_holding_an_at_sign_is_not_shown() {
        let shown = super::redact("postgres://alice:s3cr@t@db.internal:5432/mc");
        assert_eq!(shown, "postgres://alice:***@db.internal:5432/mc");
        assert!(!shown.contains("s3cr") && !shown.contains("t@db"));
    }
}
