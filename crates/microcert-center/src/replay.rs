//! The in-memory replay guard: "a (device, generation, t, r) already
//! accepted is refused" (PROTOCOL.md section 6) without a database write
//! per AUTH or SEALED, for a center that is the only process using its
//! SQLite database.
//!
//! Accepted keys live in sharded hash sets, bucketed by t and dropped
//! bucket by bucket once every key in the bucket is past t + skew (after
//! which the freshness check refuses the message anyway). Memory is what a
//! database replay table would hold: one entry per accepted message within
//! the skew window.
//!
//! What makes this as strong as the database's unique constraint:
//!
//! - One process only. The guard's state file (`<database>-replay`, a
//!   small SQLite file) is held under an exclusive lock for the life of the
//!   guard; a second process that tries to verify on the same database is
//!   refused (it can still run operator commands, which never verify).
//!   Centers in one process on the same file share one guard.
//! - A restart cannot reopen the window. Before the guard accepts a t above
//!   its persisted high-water mark it durably raises the mark to t +
//!   [`MARK_LEASE`]. A clean shutdown writes every live key to the state
//!   file and marks it clean; the next start loads them and carries on
//!   exactly. After anything else (a crash, a kill, a power loss) the next
//!   start refuses every AUTH and SEALED whose t is at or before the mark:
//!   every message accepted before the crash had a t at or below it.
//!   Devices whose clocks are right are refused for at most
//!   [`MARK_LEASE`] seconds (plus the skew of a node whose clock runs ahead)
//!   after an unclean restart.
//!
//! Challenges (AUTH_RESPONSE) are always spent in the database: a
//! challenge's validity is not tied to the message's t, so the mark would
//! not cover it, and clock-less nodes are the rare path.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use microcert_core::DeviceId;
use rusqlite::{Connection, OptionalExtension, params};

use crate::{Error, Result};

/// How far ahead of the highest accepted t the persisted mark is set: one
/// durable write per this many seconds of message time.
pub const MARK_LEASE: u64 = 30;

const SHARDS: usize = 64;

/// Which replay protection a center uses for AUTH and SEALED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplayMode {
    /// [`ReplayMode::Memory`] for a center opened with
    /// [`crate::Center::open_sqlite`] (one process owns the file),
    /// [`ReplayMode::Database`] for [`crate::Center::new`] (any backend,
    /// possibly shared by several centers).
    #[default]
    Auto,
    /// The in-memory guard of this module: one process per database only
    /// (enforced by a lock), needs [`crate::Center::open_sqlite`].
    Memory,
    /// A durable record per accepted message in the key database, under its
    /// unique constraint (group-committed): required when several center
    /// processes share the database.
    Database,
}

type Key = (DeviceId, u8, u64);

struct Bucket {
    expires: u64,
    keys: HashSet<Key>,
}

#[derive(Default)]
struct Shard {
    by_t: HashMap<u32, Bucket>,
    pruned_at: u64,
}

impl Shard {
    fn prune(&mut self, now: u64) {
        if now > self.pruned_at {
            self.pruned_at = now;
            self.by_t.retain(|_, b| b.expires >= now);
        }
    }
}

/// The guard's persistent side: the lock and the state file.
struct StateFile {
    conn: Connection,
}

const STATE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    mark INTEGER NOT NULL,
    clean INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS live (
    device BLOB NOT NULL,
    generation INTEGER NOT NULL,
    t INTEGER NOT NULL,
    r INTEGER NOT NULL,
    expires INTEGER NOT NULL
);";

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::Database(format!("replay state: {e}"))
}

impl StateFile {
    /// Opens and locks the state file; refused when another process holds it.
    fn open(path: &Path) -> Result<Self> {
        let refuse = |e: rusqlite::Error| {
            let busy = matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            );
            if busy {
                Error::Refused(format!(
                    "another process verifies with the in-memory replay guard of this database \
                     ({} is locked); several processes sharing a database need replay mode \
                     \"database\"",
                    path.display()
                ))
            } else {
                db_err(e)
            }
        };
        let conn = Connection::open(path).map_err(refuse)?;
        conn.busy_timeout(Duration::ZERO).map_err(refuse)?;
        // Exclusive locking mode keeps the lock from the first write
        // transaction until the connection closes: no other process can
        // read or write the file meanwhile.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(refuse)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(refuse)?;
        conn.execute_batch(&format!("BEGIN EXCLUSIVE; {STATE_SCHEMA} COMMIT;"))
            .map_err(refuse)?;
        Ok(StateFile { conn })
    }

    fn state(&self) -> Result<Option<(u64, bool)>> {
        self.conn
            .query_row("SELECT mark, clean FROM state WHERE id = 1", [], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, bool>(1)?))
            })
            .optional()
            .map_err(db_err)
    }

    fn set_state(&self, mark: u64, clean: bool) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO state (id, mark, clean) VALUES (1, ?1, ?2)",
                params![mark as i64, clean],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// Takes the keys a clean shutdown left and empties the table.
    fn take_live(&mut self) -> Result<Vec<(Key, u32, u64)>> {
        let tx = self.conn.transaction().map_err(db_err)?;
        let rows = {
            let mut st = tx
                .prepare("SELECT device, generation, t, r, expires FROM live")
                .map_err(db_err)?;
            let rows = st
                .query_map([], |r| {
                    let d: Vec<u8> = r.get(0)?;
                    Ok((
                        d,
                        r.get(1)?,
                        r.get(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })
                .map_err(db_err)?
                .collect::<rusqlite::Result<Vec<(Vec<u8>, u8, u32, i64, i64)>>>()
                .map_err(db_err)?;
            rows.into_iter()
                .filter_map(|(d, g, t, r, e)| {
                    let id: [u8; 8] = d.try_into().ok()?;
                    Some(((DeviceId(id), g, r as u64), t, e as u64))
                })
                .collect()
        };
        tx.execute("DELETE FROM live", []).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(rows)
    }

    fn save_clean(&mut self, live: &[(Key, u32, u64)], mark: u64) -> Result<()> {
        let tx = self.conn.transaction().map_err(db_err)?;
        {
            let mut st = tx
                .prepare(
                    "INSERT INTO live (device, generation, t, r, expires) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(db_err)?;
            for ((d, g, r), t, e) in live {
                st.execute(params![&d.0[..], g, t, *r as i64, *e as i64])
                    .map_err(db_err)?;
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO state (id, mark, clean) VALUES (1, ?1, 1)",
            [mark as i64],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }
}

/// The guard's state once it has taken the lock.
struct Active {
    file: StateFile,
    /// The mark as persisted (kept under the same mutex as the file).
    mark: u64,
}

/// The in-memory replay guard of one database file in this process.
pub(crate) struct MemoryGuard {
    path: PathBuf,
    shards: Vec<Mutex<Shard>>,
    /// The persisted mark, readable without the lock: a t at or below it
    /// needs no write.
    mark: AtomicU64,
    /// Messages with t at or below this are refused (set after an unclean
    /// stop; 0 otherwise).
    floor: AtomicU64,
    /// Highest `now` seen, for pruning at shutdown.
    latest_now: AtomicU64,
    active: Mutex<Option<Active>>,
    started: OnceLock<()>,
    /// Set by a test that simulates a crash: no clean shutdown is written.
    abandoned: AtomicBool,
}

impl std::fmt::Debug for MemoryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryGuard")
            .field("path", &self.path)
            .field("mark", &self.mark.load(Ordering::Relaxed))
            .field("floor", &self.floor.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section leaves the data consistent; a panic elsewhere
    // does not make it unusable.
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Guards by state-file path, so centers of one process share them.
static GUARDS: Mutex<Vec<(PathBuf, Weak<MemoryGuard>)>> = Mutex::new(Vec::new());

/// The state file beside a database file.
pub(crate) fn state_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-replay");
    PathBuf::from(name)
}

impl MemoryGuard {
    /// The guard of the database at `db` in this process (made if none is
    /// alive). Nothing is read or locked until the first verification.
    pub(crate) fn for_database(db: &Path) -> Arc<MemoryGuard> {
        let db = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_path_buf());
        let path = state_path(&db);
        let mut all = lock(&GUARDS);
        all.retain(|(_, w)| w.strong_count() > 0);
        if let Some(g) = all
            .iter()
            .find(|(p, _)| *p == path)
            .and_then(|(_, w)| w.upgrade())
        {
            return g;
        }
        let g = Arc::new(MemoryGuard {
            path: path.clone(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            mark: AtomicU64::new(0),
            floor: AtomicU64::new(0),
            latest_now: AtomicU64::new(0),
            active: Mutex::new(None),
            started: OnceLock::new(),
            abandoned: AtomicBool::new(false),
        });
        all.push((path, Arc::downgrade(&g)));
        g
    }

    /// Takes the lock and loads the state on first use.
    fn start(&self) -> Result<()> {
        if self.started.get().is_some() {
            return Ok(());
        }
        let mut active = lock(&self.active);
        if self.started.get().is_some() {
            return Ok(());
        }
        let mut file = StateFile::open(&self.path)?;
        let (mark, floor) = match file.state()? {
            None => (0, 0),
            Some((mark, true)) => {
                for ((d, g, r), t, expires) in file.take_live()? {
                    let mut s = lock(&self.shards[shard_of(d, r)]);
                    let b = s.by_t.entry(t).or_insert_with(|| Bucket {
                        expires,
                        keys: HashSet::new(),
                    });
                    b.expires = b.expires.max(expires);
                    b.keys.insert((d, g, r));
                }
                (mark, 0)
            }
            Some((mark, false)) => {
                tracing::warn!(
                    mark,
                    "the last run did not stop cleanly: AUTH and SEALED with t at or before the replay mark are refused"
                );
                (mark, mark)
            }
        };
        // From here on a stop that does not write a clean shutdown leaves
        // the floor for the next start.
        file.set_state(mark, false)?;
        self.mark.store(mark, Ordering::SeqCst);
        self.floor.store(floor, Ordering::SeqCst);
        *active = Some(Active { file, mark });
        let _ = self.started.set(());
        Ok(())
    }

    /// Records (device, generation, t, r) as accepted: Ok(false) when it
    /// already was, or when t is at or below the floor of an unclean
    /// restart (it may have been accepted before).
    pub(crate) fn mark(
        &self,
        device: DeviceId,
        generation: u8,
        t: u32,
        r: u64,
        expires: u64,
        now: u64,
    ) -> Result<bool> {
        self.start()?;
        if u64::from(t) <= self.floor.load(Ordering::Relaxed) {
            return Ok(false);
        }
        self.latest_now.fetch_max(now, Ordering::Relaxed);
        if u64::from(t) > self.mark.load(Ordering::Acquire) {
            self.raise_mark(u64::from(t))?;
        }
        let mut s = lock(&self.shards[shard_of(device, r)]);
        s.prune(now);
        let b = s.by_t.entry(t).or_insert_with(|| Bucket {
            expires,
            keys: HashSet::new(),
        });
        b.expires = b.expires.max(expires);
        Ok(b.keys.insert((device, generation, r)))
    }

    /// Forgets a key recorded by [`MemoryGuard::mark`] whose message was
    /// not accepted after all (the activation's transaction failed).
    pub(crate) fn unmark(&self, device: DeviceId, generation: u8, t: u32, r: u64) {
        let mut s = lock(&self.shards[shard_of(device, r)]);
        if let Some(b) = s.by_t.get_mut(&t) {
            b.keys.remove(&(device, generation, r));
        }
    }

    fn raise_mark(&self, t: u64) -> Result<()> {
        let mut active = lock(&self.active);
        let a = active
            .as_mut()
            .ok_or_else(|| Error::Database("replay guard not started".into()))?;
        if t > a.mark {
            let mark = t.saturating_add(MARK_LEASE);
            a.file.set_state(mark, false)?;
            a.mark = mark;
            self.mark.store(mark, Ordering::Release);
        }
        Ok(())
    }

    /// Keys currently held (tests and metrics).
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(s).by_t.values().map(|b| b.keys.len()).sum::<usize>())
            .sum()
    }

    /// Drops keys that expired before `now`.
    pub(crate) fn prune(&self, now: u64) {
        for s in &self.shards {
            let mut s = lock(s);
            s.pruned_at = 0;
            s.prune(now);
        }
    }

    /// Makes the next drop skip the clean shutdown, as a crash would.
    pub(crate) fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
    }
}

impl Drop for MemoryGuard {
    fn drop(&mut self) {
        let Some(mut a) = lock(&self.active).take() else {
            return;
        };
        if self.abandoned.load(Ordering::SeqCst) {
            return;
        }
        let now = self.latest_now.load(Ordering::Relaxed);
        let mut live = Vec::new();
        for s in &self.shards {
            let s = lock(s);
            for (t, b) in s.by_t.iter().filter(|(_, b)| b.expires >= now) {
                live.extend(b.keys.iter().map(|k| (*k, *t, b.expires)));
            }
        }
        let n = live.len();
        match a.file.save_clean(&live, a.mark) {
            Ok(()) => tracing::info!(keys = n, "replay guard saved for a clean restart"),
            Err(e) => {
                tracing::error!(error = %e, "replay guard could not be saved; the next start refuses t at or before the mark")
            }
        }
    }
}

fn shard_of(device: DeviceId, r: u64) -> usize {
    // r is random per message, so it spreads one device's messages too.
    ((r ^ device.to_u64()) as usize) % SHARDS
}
