//! The in-memory replay guard: "a (device, generation, t, r) already
//! accepted is refused" (PROTOCOL.md section 6) without a database write
//! per AUTH or SEALED, for a center that is the only process using its
//! SQLite database.
//!
//! Accepted keys live in sharded hash sets, bucketed by t and dropped
//! bucket by bucket once every key in the bucket is past its expiry (t +
//! skew + instance skew + 1, after which the freshness check refuses the
//! message anyway). Memory is what a database replay table would hold: one
//! entry per accepted message within the skew window.
//!
//! What makes this as strong as the database's unique constraint:
//!
//! - One process only. The guard's state file (`<database>-replay`, a
//!   small SQLite file) is held under an exclusive lock for the life of the
//!   guard; a second process that tries to verify on the same database is
//!   refused (it can still run operator commands, which never verify).
//!   Centers in one process on the same file share one guard.
//! - A restart cannot reopen the window, whatever the sequence of crashes,
//!   clean stops and restarts (issue 12). The state file holds one row:
//!   the *mark* (before the guard accepts a t above it, it durably raises
//!   it to t + [`MARK_LEASE`]), the *floor* (AUTH and SEALED with t at or
//!   below it are refused), the *pruned* high-water (the highest `now` the
//!   guard has pruned by: a message whose record would have expired before
//!   it is refused, so a clock stepped backwards cannot bring a forgotten
//!   message back), the *clean* flag, and a card tag over all of them and
//!   the live keys. A clean stop writes every live key and the row with
//!   clean = 1 in one transaction; the next start loads them and carries
//!   on exactly, with the floor it had. Any other stop leaves clean = 0,
//!   and the next start raises the floor to the mark: every message
//!   accepted before the crash had a t at or below it. Start-up changes
//!   the file in one transaction (live keys out, clean = 0, floor kept),
//!   so an interruption at any step leaves either the old state or the new
//!   one, and both are safe ([`FaultPoint`] lets tests stop at each step).
//! - The file cannot be put back to an older copy (gap 1 of issue 12's
//!   review). Each start counts an *epoch*, and the key database holds the
//!   guard's record (the `memory_guard` mark, card-tagged): the epoch and
//!   the mark, written before the state file at every start and before
//!   the file at every raise of the mark, so it is never behind the file.
//!   The live keys of a clean stop are loaded only from a file of the
//!   database's epoch (a file's clean state is written once per epoch, at
//!   its clean stop). A file of another epoch, a missing file, or one that
//!   fails its tag is read as an unclean stop whose floor is at least the
//!   database's mark (an upper bound of every t ever accepted): nothing
//!   accepted before can pass, and devices are refused at most the lease.
//!   A file one epoch behind is the crash between the two writes of a
//!   start; anything else is logged as tampering and counted in
//!   `microcert_replay_state_tamper_total`.
//! - When the database's record cannot be trusted (it fails its tag, or
//!   it is missing while the file of this version or the database's
//!   marker says the guard ran, or while any seed is in use (Active or
//!   Suspended) and there is no file either), the guard starts as after
//!   the worst crash: an error in the log, the tamper counter, and a floor
//!   of the first `now` it sees plus the longest freshness window, so that
//!   everything accepted before has expired when it lifts. Deleting the
//!   state file and the database's record together is therefore not a
//!   first start.
//!
//! Devices whose clocks are right are refused for at most [`MARK_LEASE`]
//! seconds (plus the skew of a node whose clock runs ahead) after an
//! unclean restart.
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
use sha2::{Digest, Sha256};

use crate::card::{EncryptionCard, TAG_LEN};
use crate::{DbFailure, Error, Result};

/// How far ahead of the highest accepted t the persisted mark is set: one
/// durable write per this many seconds of message time.
pub const MARK_LEASE: u64 = 30;

const SHARDS: usize = 64;

/// Domain bytes of the state file's card tag (in a record tag's input, so
/// no other record's tag can stand for it): the version with the epoch.
const STATE_DOMAIN: &[u8] = b"MC-REPLAY-STATE\x02";

/// The same for the version before the epoch (read as legacy only).
const STATE_DOMAIN_V1: &[u8] = b"MC-REPLAY-STATE\x01";

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

/// Where a test makes the guard stop as a crash would: after step `step`
/// (from 1) of its start-up or of its clean shutdown. The state file is
/// left as a killed process would leave it (an open transaction rolls
/// back). Start-up: 1 file opened and locked, 2 state read and its tag
/// checked and the database's record read, 3 the database's record
/// written (next epoch), 4 live keys deleted, 5 state row written, 6
/// committed. Shutdown: 1 live keys collected, 2 old live rows deleted, 3
/// live keys written, 4 state row written (clean), 5 committed.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// During start-up (the first verification after the center opens).
    Start(u32),
    /// During the clean shutdown (the last center of the file dropped).
    Stop(u32),
}

impl FaultPoint {
    /// Steps of start-up.
    pub const START_STEPS: u32 = 6;
    /// Steps of shutdown.
    pub const STOP_STEPS: u32 = 5;
}

/// The guard's record in the key database, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DbRecord {
    /// No record.
    Missing,
    /// The marker of the version before the epoch: a state file exists.
    Legacy,
    /// The epoch of the latest start and the highest mark.
    Good { epoch: u64, mark: u64 },
    /// A record that fails its card tag (or holds no valid value).
    Bad,
}

/// The guard's record in the key database (implemented over the center's
/// marks, `crate::center::watch`).
pub(crate) trait GuardStore: Send + Sync {
    /// Reads the record.
    fn read(&self) -> Result<DbRecord>;
    /// Writes the record (durable when it returns).
    fn write(&self, epoch: u64, mark: u64) -> Result<()>;
    /// Whether any seed is in use (Active or Suspended): messages may have
    /// been accepted on this database before.
    fn in_use(&self) -> Result<bool>;
}

/// The guard's record in the key database.
pub(crate) type StartedHook = Box<dyn GuardStore>;

type Key = (DeviceId, u8, u64);
type LiveRow = (Key, u32, u64);

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

/// The persisted state of the guard (one row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct State {
    /// The start counter (0: a file of the version before it).
    epoch: u64,
    mark: u64,
    floor: u64,
    pruned: u64,
    clean: bool,
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
CREATE TABLE IF NOT EXISTS guard (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    mark INTEGER NOT NULL,
    floor INTEGER NOT NULL,
    pruned INTEGER NOT NULL,
    clean INTEGER NOT NULL,
    tag BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS guard2 (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch INTEGER NOT NULL,
    mark INTEGER NOT NULL,
    floor INTEGER NOT NULL,
    pruned INTEGER NOT NULL,
    clean INTEGER NOT NULL,
    tag BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS live (
    device BLOB NOT NULL,
    generation INTEGER NOT NULL,
    t INTEGER NOT NULL,
    r INTEGER NOT NULL,
    expires INTEGER NOT NULL
);";

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::db(DbFailure::Internal, format!("replay state: {e}"))
}

fn crashed() -> Error {
    Error::db(DbFailure::Internal, "replay guard stopped (injected crash)")
}

/// What the start-up found in the state file.
enum Found {
    /// No state yet: a new database.
    Nothing,
    /// A state whose tag verifies, with the live keys of a clean stop.
    Good(State, Vec<LiveRow>),
    /// A state that fails its tag: its values cannot be trusted.
    Bad,
    /// A file of the version before the epoch whose tag verifies: its
    /// mark and floor, read as an unclean stop.
    V1(State),
    /// A file of a version before the tag (only its mark).
    Legacy(u64),
}

/// The card tag over the state and the live keys (sorted, so the order of
/// rows in the file does not matter); `v1`: as the version before the
/// epoch computed it.
fn state_tag(
    card: &dyn EncryptionCard,
    s: &State,
    live: &[LiveRow],
    v1: bool,
) -> Result<[u8; TAG_LEN]> {
    let mut rows: Vec<[u8; 29]> = live
        .iter()
        .map(|((d, g, r), t, e)| {
            let mut b = [0u8; 29];
            b[..8].copy_from_slice(&d.0);
            b[8] = *g;
            b[9..13].copy_from_slice(&t.to_be_bytes());
            b[13..21].copy_from_slice(&r.to_be_bytes());
            b[21..29].copy_from_slice(&e.to_be_bytes());
            b
        })
        .collect();
    rows.sort_unstable();
    let mut h = Sha256::new();
    h.update((rows.len() as u64).to_be_bytes());
    for r in &rows {
        h.update(r);
    }
    let mut msg = Vec::with_capacity(STATE_DOMAIN.len() + 33 + 32);
    if v1 {
        msg.extend_from_slice(STATE_DOMAIN_V1);
    } else {
        msg.extend_from_slice(STATE_DOMAIN);
        msg.extend_from_slice(&s.epoch.to_be_bytes());
    }
    msg.extend_from_slice(&s.mark.to_be_bytes());
    msg.extend_from_slice(&s.floor.to_be_bytes());
    msg.extend_from_slice(&s.pruned.to_be_bytes());
    msg.push(u8::from(s.clean));
    msg.extend_from_slice(&h.finalize());
    card.record_tag(&msg)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
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
                Error::ReplayGuardLocked {
                    path: path.to_owned(),
                    source: e,
                }
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

    /// Reads the state and checks its tag (the live keys only count after
    /// a clean stop).
    fn read(&self, card: &dyn EncryptionCard) -> Result<Found> {
        let row = |sql: &str| {
            self.conn
                .query_row(sql, [], |r| {
                    Ok((
                        State {
                            epoch: r.get::<_, i64>(0)?.max(0) as u64,
                            mark: r.get::<_, i64>(1)?.max(0) as u64,
                            floor: r.get::<_, i64>(2)?.max(0) as u64,
                            pruned: r.get::<_, i64>(3)?.max(0) as u64,
                            clean: r.get::<_, i64>(4)? == 1,
                        },
                        r.get::<_, Vec<u8>>(5)?,
                    ))
                })
                .optional()
                .map_err(db_err)
        };
        let check = |state: &State, live: &[LiveRow], tag: &[u8], v1: bool| -> Result<bool> {
            let want = state_tag(card, state, live, v1)?;
            Ok(subtle::ConstantTimeEq::ct_eq(&want[..], tag).into())
        };
        if let Some((state, tag)) =
            row("SELECT epoch, mark, floor, pruned, clean, tag FROM guard2 WHERE id = 1")?
        {
            let live = if state.clean {
                self.live()?
            } else {
                Vec::new()
            };
            return Ok(if state.epoch > 0 && check(&state, &live, &tag, false)? {
                Found::Good(state, live)
            } else {
                Found::Bad
            });
        }
        // The version before the epoch: a tagged row without it.
        if let Some((state, tag)) =
            row("SELECT 0, mark, floor, pruned, clean, tag FROM guard WHERE id = 1")?
        {
            let live = if state.clean {
                self.live()?
            } else {
                Vec::new()
            };
            return Ok(if check(&state, &live, &tag, true)? {
                Found::V1(state)
            } else {
                Found::Bad
            });
        }
        // A file of a version without the tagged row: its mark is all
        // there is, and it is not covered by the card.
        let legacy = self
            .conn
            .query_row("SELECT mark FROM state WHERE id = 1", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map_err(db_err)?;
        Ok(match legacy {
            None => Found::Nothing,
            Some(mark) => Found::Legacy(mark.max(0) as u64),
        })
    }

    fn live(&self) -> Result<Vec<LiveRow>> {
        let mut st = self
            .conn
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
        Ok(rows
            .into_iter()
            .filter_map(|(d, g, t, r, e)| {
                let id: [u8; 8] = d.try_into().ok()?;
                Some(((DeviceId(id), g, r as u64), t, e.max(0) as u64))
            })
            .collect())
    }

    /// Replaces the state and the live keys in one transaction, checking
    /// `fault` after each step (`first` is the number of the first step).
    fn write(
        &mut self,
        card: &dyn EncryptionCard,
        state: &State,
        live: &[LiveRow],
        mut step: impl FnMut(u32) -> bool,
        first: u32,
    ) -> Result<()> {
        let tag = state_tag(card, state, live, false)?;
        let tx = self.conn.transaction().map_err(db_err)?;
        tx.execute("DELETE FROM live", []).map_err(db_err)?;
        if step(first) {
            return Err(crashed());
        }
        let mut n = first + 1;
        if !live.is_empty() {
            let mut st = tx
                .prepare(
                    "INSERT INTO live (device, generation, t, r, expires) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(db_err)?;
            for ((d, g, r), t, e) in live {
                st.execute(params![&d.0[..], g, t, *r as i64, i(*e)])
                    .map_err(db_err)?;
            }
        }
        if state.clean {
            if step(n) {
                return Err(crashed());
            }
            n += 1;
        }
        tx.execute(
            "INSERT OR REPLACE INTO guard2 (id, epoch, mark, floor, pruned, clean, tag) \
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                i(state.epoch),
                i(state.mark),
                i(state.floor),
                i(state.pruned),
                i64::from(state.clean),
                &tag[..]
            ],
        )
        .map_err(db_err)?;
        // The rows of older versions, if any, are no longer read.
        tx.execute("DELETE FROM guard", []).map_err(db_err)?;
        tx.execute("DELETE FROM state", []).map_err(db_err)?;
        if step(n) {
            return Err(crashed());
        }
        tx.commit().map_err(db_err)?;
        if step(n + 1) {
            return Err(crashed());
        }
        Ok(())
    }
}

/// How the start-up read the file and the database's record (for the
/// log and the tamper counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// No state anywhere and no seed in use: a new database.
    First,
    /// The clean stop of the database's epoch: its live keys are loaded.
    Clean,
    /// An unclean stop (a crash or a kill), or the first start after an
    /// upgrade from a version without the epoch.
    Unclean,
    /// The file is one epoch behind the database: a crash between the two
    /// writes of a start. As an unclean stop.
    CrashBetween,
    /// The file is missing, older than the database's record, or fails its
    /// tag: an unclean stop with the database's mark as the floor.
    FileTampered(&'static str),
    /// The database's record cannot be trusted: the worst case, a floor of
    /// now plus the longest window.
    WaitOut(&'static str),
}

impl Verdict {
    fn log(self, path: &Path, s: &State) {
        let floor = s.floor;
        match self {
            Verdict::First | Verdict::Clean => {}
            Verdict::Unclean => tracing::warn!(
                floor,
                "the last run did not stop cleanly: AUTH and SEALED with t at or before the replay mark are refused"
            ),
            Verdict::CrashBetween => tracing::warn!(
                floor,
                "the last start was interrupted between its two writes: AUTH and SEALED with t at or before the replay mark are refused"
            ),
            Verdict::FileTampered(why) => {
                tracing::error!(
                    path = %path.display(),
                    floor,
                    "the replay guard's state file {why} (put back, edited or deleted from outside): \
                     read as an unclean stop; AUTH and SEALED with t at or before the key database's replay mark are refused"
                );
                metrics::counter!("microcert_replay_state_tamper_total").increment(1);
            }
            Verdict::WaitOut(why) => {
                tracing::error!(
                    path = %path.display(),
                    floor,
                    "the replay guard's record in the key database {why}: every AUTH and SEALED with t at or \
                     before the floor (now plus the longest freshness window) is refused; run \
                     `microcert integrity check-local` to find what else was changed"
                );
                metrics::counter!("microcert_replay_state_tamper_total").increment(1);
            }
        }
    }
}

/// The epoch after `e`, in 1..=2^32-1 (it is kept in 32 bits in the key
/// database; 0 marks the versions before it).
fn next_epoch(e: u64) -> u64 {
    (e % 0xffff_ffff) + 1
}

/// The state to start from, the live keys to load, and how the state was
/// read, from the state file (`found`), the database's record, whether the
/// database said at open that the guard ran (`expected`), the first `now`
/// and the longest freshness `window`. `in_use` is asked only when
/// neither the file nor the database holds anything.
fn decide(
    found: Found,
    record: DbRecord,
    expected: bool,
    now: u64,
    window: u64,
    in_use: impl Fn() -> Result<bool>,
) -> Result<(State, Vec<LiveRow>, Verdict)> {
    // What the file can be trusted for: its mark and floor bound what it
    // saw (a higher floor is never unsafe), its epoch and pruned mark.
    let (file_floor, file_epoch, file_pruned) = match &found {
        Found::Good(s, _) => (s.floor.max(s.mark), s.epoch, s.pruned),
        Found::V1(s) => (s.floor.max(s.mark), 0, s.pruned),
        Found::Legacy(mark) => (*mark, 0, 0),
        Found::Nothing | Found::Bad => (0, 0, 0),
    };
    let unclean = |floor: u64, epoch: u64, verdict: Verdict| {
        let floor = floor.max(file_floor);
        let state = State {
            epoch: next_epoch(epoch.max(file_epoch)),
            mark: floor,
            floor,
            pruned: file_pruned,
            clean: false,
        };
        Ok((state, Vec::new(), verdict))
    };
    let wait_out = |db_mark: u64, db_epoch: u64, why: &'static str| {
        let floor = now.saturating_add(window).max(db_mark);
        let (mut state, live, verdict) = unclean(floor, db_epoch, Verdict::WaitOut(why))?;
        state.pruned = state.pruned.max(now);
        Ok((state, live, verdict))
    };
    match record {
        DbRecord::Good { epoch, mark } => match found {
            Found::Good(s, live) if s.epoch == epoch && s.clean => Ok((
                State {
                    epoch: next_epoch(epoch),
                    mark: s.mark.max(mark),
                    ..s
                },
                live,
                Verdict::Clean,
            )),
            Found::Good(s, _) if s.epoch == epoch => unclean(mark, epoch, Verdict::Unclean),
            Found::Good(s, _) if s.epoch.saturating_add(1) == epoch => {
                unclean(mark, epoch, Verdict::CrashBetween)
            }
            // A file ahead of the database: the database's record was put
            // back to an older copy; nothing says how far.
            Found::Good(s, _) if s.epoch > epoch => {
                wait_out(mark, epoch, "is older than the replay guard's state file")
            }
            Found::Good(..) => unclean(mark, epoch, Verdict::FileTampered("is an older copy")),
            Found::Nothing => unclean(mark, epoch, Verdict::FileTampered("is missing")),
            Found::Bad => unclean(mark, epoch, Verdict::FileTampered("fails its card tag")),
            Found::V1(_) | Found::Legacy(_) => unclean(
                mark,
                epoch,
                Verdict::FileTampered("is of an older version than the key database's record"),
            ),
        },
        // The first start of this version after one that kept the marker:
        // the old file's state, as after an unclean stop.
        DbRecord::Legacy => match found {
            Found::V1(_) => unclean(0, 0, Verdict::Unclean),
            Found::Good(..) => wait_out(0, 0, "is older than the replay guard's state file"),
            Found::Nothing => wait_out(0, 0, "says the guard ran, but its state file is missing"),
            Found::Bad | Found::Legacy(_) => wait_out(
                0,
                0,
                "says the guard ran, but its state file fails its card tag",
            ),
        },
        DbRecord::Bad => wait_out(0, 0, "fails its card tag"),
        DbRecord::Missing => match found {
            _ if expected => wait_out(0, 0, "was deleted while the center ran"),
            Found::Good(..) => wait_out(0, 0, "is missing, but the guard's state file says it ran"),
            Found::Bad => wait_out(
                0,
                0,
                "is missing and the guard's state file fails its card tag",
            ),
            // Nothing anywhere: a first start only if no seed was ever
            // used; otherwise both were deleted.
            Found::Nothing if in_use()? => wait_out(
                0,
                0,
                "and the guard's state file are both missing, but seeds are in use",
            ),
            Found::Nothing => Ok((
                State {
                    epoch: 1,
                    ..State::default()
                },
                Vec::new(),
                Verdict::First,
            )),
            // Files of the versions before the record: an upgrade, read as
            // an unclean stop, unless seeds are in use (then the file may
            // be an old copy with its marker deleted).
            Found::V1(_) | Found::Legacy(_) if in_use()? => wait_out(
                0,
                0,
                "is missing and the guard's state file is of an older version, while seeds are in use",
            ),
            Found::V1(_) | Found::Legacy(_) => unclean(0, 0, Verdict::Unclean),
        },
    }
}

/// The guard's state once it has taken the lock.
struct Active {
    file: StateFile,
    /// The state as persisted (kept under the same mutex as the file).
    state: State,
}

/// The in-memory replay guard of one database file in this process.
pub(crate) struct MemoryGuard {
    path: PathBuf,
    card: Arc<dyn EncryptionCard>,
    /// The longest time a message stays fresh after its t plus one
    /// (largest class skew + instance skew + 1): the floor after a bad tag
    /// is the first `now` plus this.
    window: AtomicU64,
    shards: Vec<Mutex<Shard>>,
    /// The persisted mark, readable without the lock: a t at or below it
    /// needs no write.
    mark: AtomicU64,
    /// Messages with t at or below this are refused (raised by an unclean
    /// stop or a bad tag, persisted, never lowered).
    floor: AtomicU64,
    /// Highest `now` seen (and pruned by): a message whose record would
    /// have expired before it is refused.
    latest_now: AtomicU64,
    active: Mutex<Option<Active>>,
    started: OnceLock<()>,
    /// Set by a test that simulates a crash: no clean shutdown is written.
    abandoned: AtomicBool,
    /// A test's injected crash.
    fault: Mutex<Option<FaultPoint>>,
    /// Whether the key database says the state file must exist.
    expected: AtomicBool,
    /// The guard's record in the key database.
    store: StartedHook,
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
    /// alive), its state tagged by `card`; `window` is the center's
    /// longest freshness window (largest skew + instance skew + 1).
    /// Nothing is read or locked until the first verification.
    pub(crate) fn for_database(
        db: &Path,
        card: Arc<dyn EncryptionCard>,
        window: u64,
        expected: bool,
        store: StartedHook,
    ) -> Arc<MemoryGuard> {
        let db = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_path_buf());
        let path = state_path(&db);
        let mut all = lock(&GUARDS);
        all.retain(|(_, w)| w.strong_count() > 0);
        if let Some(g) = all
            .iter()
            .find(|(p, _)| *p == path)
            .and_then(|(_, w)| w.upgrade())
        {
            g.window.fetch_max(window, Ordering::SeqCst);
            g.expected.fetch_or(expected, Ordering::SeqCst);
            return g;
        }
        let g = Arc::new(MemoryGuard {
            path: path.clone(),
            card,
            window: AtomicU64::new(window),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            mark: AtomicU64::new(0),
            floor: AtomicU64::new(0),
            latest_now: AtomicU64::new(0),
            active: Mutex::new(None),
            started: OnceLock::new(),
            abandoned: AtomicBool::new(false),
            fault: Mutex::new(None),
            expected: AtomicBool::new(expected),
            store,
        });
        all.push((path, Arc::downgrade(&g)));
        g
    }

    /// Makes the guard stop as a crash would at `at` (tests).
    pub(crate) fn inject_fault(&self, at: FaultPoint) {
        *lock(&self.fault) = Some(at);
    }

    /// Whether the injected fault is at this step; if so the guard is
    /// abandoned (the caller returns at once, dropping any transaction).
    fn crash_at(&self, at: FaultPoint) -> bool {
        if *lock(&self.fault) == Some(at) {
            self.abandoned.store(true, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// Takes the lock and loads the state on first use (`now`: the time
    /// of the message that starts it).
    fn start(&self, now: u64) -> Result<()> {
        if self.started.get().is_some() {
            return Ok(());
        }
        if self.abandoned.load(Ordering::SeqCst) {
            return Err(crashed());
        }
        let mut active = lock(&self.active);
        if self.started.get().is_some() {
            return Ok(());
        }
        let card = &*self.card;
        let file = StateFile::open(&self.path)?;
        if self.crash_at(FaultPoint::Start(1)) {
            return Err(crashed());
        }
        let found = file.read(card)?;
        if self.crash_at(FaultPoint::Start(2)) {
            return Err(crashed());
        }
        let expected = self.expected.load(Ordering::SeqCst);
        let record = self.store.read()?;
        let window = self.window.load(Ordering::SeqCst);
        let (state, live, verdict) =
            decide(found, record, expected, now, window, || self.store.in_use())?;
        verdict.log(&self.path, &state);
        for ((d, g, r), t, expires) in live {
            let mut s = lock(&self.shards[shard_of(d, r)]);
            let b = s.by_t.entry(t).or_insert_with(|| Bucket {
                expires,
                keys: HashSet::new(),
            });
            b.expires = b.expires.max(expires);
            b.keys.insert((d, g, r));
        }
        // From here on a stop that does not write a clean shutdown leaves
        // the floor for the next start. The database's record first (the
        // next epoch and the mark: never behind the file), then the file
        // in one transaction (live keys out, clean = 0, floor kept).
        let running = State {
            clean: false,
            mark: state.mark.max(state.floor),
            ..state
        };
        self.store.write(running.epoch, running.mark)?;
        if self.crash_at(FaultPoint::Start(3)) {
            return Err(crashed());
        }
        let mut file = file;
        file.write(
            card,
            &running,
            &[],
            |n| self.crash_at(FaultPoint::Start(n)),
            4,
        )?;
        self.mark.store(running.mark, Ordering::SeqCst);
        self.floor.store(running.floor, Ordering::SeqCst);
        self.latest_now.fetch_max(running.pruned, Ordering::SeqCst);
        *active = Some(Active {
            file,
            state: running,
        });
        let _ = self.started.set(());
        Ok(())
    }

    /// Records (device, generation, t, r) as accepted: Ok(false) when it
    /// already was, when t is at or below the floor of an unclean restart
    /// (it may have been accepted before), or when its record would have
    /// expired before a time the guard has already pruned by (a clock
    /// stepped backwards: it may have been accepted and forgotten).
    pub(crate) fn mark(
        &self,
        device: DeviceId,
        generation: u8,
        t: u32,
        r: u64,
        expires: u64,
        now: u64,
    ) -> Result<bool> {
        self.start(now)?;
        if u64::from(t) <= self.floor.load(Ordering::Acquire) {
            return Ok(false);
        }
        let latest = self.latest_now.fetch_max(now, Ordering::AcqRel).max(now);
        if expires < latest {
            return Ok(false);
        }
        if u64::from(t) > self.mark.load(Ordering::Acquire) {
            self.raise_mark(u64::from(t))?;
        }
        let mut s = lock(&self.shards[shard_of(device, r)]);
        s.prune(latest);
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
            .ok_or_else(|| Error::db(DbFailure::Internal, "replay guard not started"))?;
        if t > a.state.mark {
            let next = State {
                mark: t.saturating_add(MARK_LEASE),
                pruned: a.state.pruned.max(self.latest_now.load(Ordering::Acquire)),
                ..a.state
            };
            // The database's record first: never behind the file.
            self.store.write(next.epoch, next.mark)?;
            a.file.write(&*self.card, &next, &[], |_| false, 1)?;
            a.state = next;
            self.mark.store(next.mark, Ordering::Release);
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
        self.latest_now.fetch_max(now, Ordering::AcqRel);
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

    /// The clean shutdown: every live key and the state, clean, in one
    /// transaction.
    fn stop(&self) {
        let Some(mut a) = lock(&self.active).take() else {
            return;
        };
        if self.abandoned.load(Ordering::SeqCst) {
            return;
        }
        let now = self.latest_now.load(Ordering::Acquire);
        let mut live = Vec::new();
        for s in &self.shards {
            let s = lock(s);
            for (t, b) in s.by_t.iter().filter(|(_, b)| b.expires >= now) {
                live.extend(b.keys.iter().map(|k| (*k, *t, b.expires)));
            }
        }
        if self.crash_at(FaultPoint::Stop(1)) {
            return;
        }
        let n = live.len();
        let state = State {
            pruned: a.state.pruned.max(now),
            clean: true,
            ..a.state
        };
        match a.file.write(
            &*self.card,
            &state,
            &live,
            |n| self.crash_at(FaultPoint::Stop(n)),
            2,
        ) {
            Ok(()) => tracing::info!(keys = n, "replay guard saved for a clean restart"),
            Err(_) if self.abandoned.load(Ordering::SeqCst) => {}
            Err(e) => {
                tracing::error!(error = %e, "replay guard could not be saved; the next start refuses t at or before the mark")
            }
        }
    }
}

impl Drop for MemoryGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Heap bytes of one accepted message in the guard, from the struct sizes:
/// the hash set's slot (key and control byte at the 7/8 maximum load). A
/// bucket per second of t per shard comes on top, shared by every key of
/// that second.
pub(crate) fn bytes_per_key() -> usize {
    (size_of::<Key>() + 1) * 8 / 7
}

fn shard_of(device: DeviceId, r: u64) -> usize {
    // r is random per message, so it spreads one device's messages too.
    ((r ^ device.to_u64()) as usize) % SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;
    const WINDOW: u64 = 331;

    fn st(epoch: u64, mark: u64, floor: u64, clean: bool) -> State {
        State {
            epoch,
            mark,
            floor,
            pruned: 0,
            clean,
        }
    }

    fn one_key() -> Vec<LiveRow> {
        vec![((DeviceId([1; 8]), 0, 7), 450, 800)]
    }

    /// Runs [`decide`]: the state, how many live keys, the verdict.
    fn run(
        found: Found,
        record: DbRecord,
        expected: bool,
        in_use: bool,
    ) -> (State, usize, Verdict) {
        let (s, live, v) = decide(found, record, expected, NOW, WINDOW, || Ok(in_use)).unwrap();
        (s, live.len(), v)
    }

    /// Gap 1: whatever the file says, the floor after a start is at least
    /// the key database's mark, the clean stop's live keys are loaded only
    /// from the file of the database's epoch, and the next epoch is above
    /// the database's; without a trusted record the window is waited out.
    #[test]
    fn every_file_and_record_combination_keeps_the_floor() {
        let rec = DbRecord::Good {
            epoch: 5,
            mark: 500,
        };
        let wait = NOW + WINDOW;
        let (s, n, v) = run(
            Found::Good(st(5, 480, 100, true), one_key()),
            rec,
            true,
            true,
        );
        assert_eq!(
            (s.floor, s.mark, s.epoch, n, v),
            (100, 500, 6, 1, Verdict::Clean)
        );
        let cases: Vec<(Found, u64, Verdict)> = vec![
            (
                Found::Good(st(5, 470, 100, false), vec![]),
                500,
                Verdict::Unclean,
            ),
            (
                Found::Good(st(4, 400, 100, true), one_key()),
                500,
                Verdict::CrashBetween,
            ),
            (
                Found::Good(st(3, 300, 100, true), one_key()),
                500,
                Verdict::FileTampered("is an older copy"),
            ),
            (
                Found::Good(st(6, 600, 100, true), one_key()),
                wait,
                Verdict::WaitOut("is older than the replay guard's state file"),
            ),
            (Found::Nothing, 500, Verdict::FileTampered("is missing")),
            (Found::Bad, 500, Verdict::FileTampered("fails its card tag")),
        ];
        for (found, floor, verdict) in cases {
            let (s, n, v) = run(found, rec, true, true);
            assert_eq!((s.floor, n, v), (floor, 0, verdict));
            assert!(s.epoch > 5 && s.mark >= s.floor && !s.clean, "{v:?}");
        }
        for found in [Found::V1(st(0, 300, 200, true)), Found::Legacy(300)] {
            let (s, n, v) = run(found, rec, true, true);
            assert_eq!((s.floor, n), (500, 0));
            assert!(matches!(v, Verdict::FileTampered(_)));
        }
        // The version before the epoch: its file as an unclean stop.
        let (s, n, v) = run(
            Found::V1(st(0, 300, 200, true)),
            DbRecord::Legacy,
            true,
            true,
        );
        assert_eq!((s.floor, s.epoch, n, v), (300, 1, 0, Verdict::Unclean));
        for found in [
            Found::Nothing,
            Found::Bad,
            Found::Good(st(2, 300, 0, true), vec![]),
        ] {
            let (s, _, v) = run(found, DbRecord::Legacy, true, true);
            assert_eq!(s.floor, wait);
            assert!(matches!(v, Verdict::WaitOut(_)));
        }
        // A record failing its tag, or missing where it should be.
        let (s, _, v) = run(
            Found::Good(st(5, 480, 100, true), one_key()),
            DbRecord::Bad,
            true,
            true,
        );
        assert_eq!(s.floor, wait);
        assert!(matches!(v, Verdict::WaitOut(_)));
        for (found, expected, in_use) in [
            (Found::Nothing, true, false),
            (Found::Nothing, false, true),
            (Found::Good(st(5, 480, 100, true), one_key()), false, false),
            (Found::Bad, false, false),
            (Found::Legacy(300), false, true),
            (Found::V1(st(0, 300, 200, false)), false, true),
        ] {
            let (s, n, v) = run(found, DbRecord::Missing, expected, in_use);
            assert_eq!((s.floor, n), (wait, 0));
            assert!(matches!(v, Verdict::WaitOut(_)), "{v:?}");
        }
        // A new database; an upgrade from the version before the marker.
        let (s, _, v) = run(Found::Nothing, DbRecord::Missing, false, false);
        assert_eq!((s.floor, s.epoch, v), (0, 1, Verdict::First));
        let (s, _, v) = run(Found::Legacy(300), DbRecord::Missing, false, false);
        assert_eq!((s.floor, s.epoch, v), (300, 1, Verdict::Unclean));
        // The epoch fits the database's 32 bits and is never 0.
        assert_eq!(next_epoch(5), 6);
        assert_eq!(next_epoch(0xffff_ffff), 1);
    }
}
