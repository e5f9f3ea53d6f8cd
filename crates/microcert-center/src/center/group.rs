//! Group commit of the records that make a message count once.
//!
//! Every accepted AUTH, SEALED and AUTH_RESPONSE writes one record (a
//! replay record or a spent challenge), and a durable commit per message
//! would cap the center at the disk's commit rate. Concurrent verifications
//! therefore share commits: the first caller to find no commit running
//! becomes the leader, takes every record queued so far, inserts them all
//! in one transaction (each an independent insert-if-absent with its own
//! answer) and hands each caller its answer; callers that arrived meanwhile
//! form the next group. A lone caller commits alone, as before. Nothing is
//! acknowledged before its group's transaction has committed.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

use microcert_core::DeviceId;

use crate::db::{KeyDatabase, ReplayRow, Tx, with_tx};
use crate::{DbFailure, Error, Result};

/// A record that makes a message count once: the database's
/// [`ReplayRow`].
pub(crate) use crate::db::ReplayRow as Mark;

impl ReplayRow {
    /// Inserts the record if absent; false when it was already there.
    pub(crate) fn apply(&self, tx: &mut dyn Tx) -> Result<bool> {
        match *self {
            Mark::Replay {
                device,
                generation,
                t,
                r,
                expires,
            } => tx.record_replay((device, generation, t, r, expires)),
            Mark::Challenge { device, c, expires } => tx.spend_challenge(device, &c, expires),
        }
    }
}

#[derive(Default)]
struct State {
    queue: Vec<(u64, Mark)>,
    done: HashMap<u64, Result<bool>>,
    leader: bool,
    next_id: u64,
}

/// The group-commit queue.
#[derive(Default)]
pub(crate) struct GroupCommit {
    state: Mutex<State>,
    turn: Condvar,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

/// Gives up the leadership and wakes the waiters even if the commit
/// panicked, so no caller waits forever.
struct Leadership<'a> {
    group: &'a GroupCommit,
}

impl Drop for Leadership<'_> {
    fn drop(&mut self) {
        self.group.lock().leader = false;
        self.group.turn.notify_all();
    }
}

impl GroupCommit {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements; a panic elsewhere
        // while holding the lock does not make it unusable.
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Records `mark` durably; Ok(false) when it was already recorded.
    pub(crate) fn mark(&self, db: &dyn KeyDatabase, mark: Mark) -> Result<bool> {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id = st.next_id.wrapping_add(1);
        st.queue.push((id, mark));
        loop {
            if let Some(r) = st.done.remove(&id) {
                return r;
            }
            if st.leader {
                st = match self.turn.wait(st) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                continue;
            }
            st.leader = true;
            let batch = std::mem::take(&mut st.queue);
            drop(st);
            let leadership = Leadership { group: self };
            let results = commit(db, &batch);
            {
                let mut st = self.lock();
                st.done.extend(results);
            }
            drop(leadership);
            st = self.lock();
        }
    }
}

fn commit(db: &dyn KeyDatabase, batch: &[(u64, Mark)]) -> Vec<(u64, Result<bool>)> {
    // The replay records of the group go in one statement
    // ([`Tx::record_replays`]); spent challenges one by one.
    let replays: Vec<(DeviceId, u8, u32, u64, u64)> = batch
        .iter()
        .filter_map(|(_, m)| match *m {
            Mark::Replay {
                device,
                generation,
                t,
                r,
                expires,
            } => Some((device, generation, t, r, expires)),
            Mark::Challenge { .. } => None,
        })
        .collect();
    let r = with_tx(db, |tx| {
        let mut fresh = tx.record_replays(&replays)?.into_iter();
        batch
            .iter()
            .map(|(id, m)| match m {
                Mark::Replay { .. } => Ok((
                    *id,
                    fresh.next().ok_or_else(|| {
                        Error::db(DbFailure::Internal, "replay batch answer short")
                    })?,
                )),
                Mark::Challenge { .. } => Ok((*id, m.apply(tx)?)),
            })
            .collect::<Result<Vec<_>>>()
    });
    match r {
        Ok(v) => v.into_iter().map(|(id, fresh)| (id, Ok(fresh))).collect(),
        Err(e) => {
            // Every waiter gets the failure, of the kind it was (a
            // database gone away stays transient for each of them).
            let kind = match &e {
                Error::Database(d) => d.kind,
                Error::Sqlite(_) => DbFailure::Busy,
                _ => DbFailure::Internal,
            };
            let msg = e.to_string();
            batch
                .iter()
                .map(|(id, _)| (*id, Err(Error::db(kind, msg.clone()))))
                .collect()
        }
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::db::{SqliteDatabase, Tx};

    /// Counts the transactions of the database it wraps.
    #[derive(Debug)]
    struct Counting(SqliteDatabase, AtomicU64);

    impl KeyDatabase for Counting {
        fn transaction(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<()>) -> Result<()> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.transaction(f)
        }
        fn device_view(&self, id: DeviceId) -> Result<Option<crate::db::DeviceView>> {
            self.0.device_view(id)
        }
        fn list_devices(&self, q: &crate::db::DeviceQuery) -> Result<Vec<crate::db::DeviceView>> {
            self.0.list_devices(q)
        }
        fn devices_due(&self, y: u16, a: Option<DeviceId>, l: usize) -> Result<Vec<DeviceId>> {
            self.0.devices_due(y, a, l)
        }
        fn devices_to_expire(&self, now: u64, y: u16, l: usize) -> Result<Vec<DeviceId>> {
            self.0.devices_to_expire(now, y, l)
        }
        fn scan_seeds(
            &self,
            a: Option<(DeviceId, u8)>,
            l: usize,
        ) -> Result<Vec<crate::db::SeedRow>> {
            self.0.scan_seeds(a, l)
        }
        fn digest_shards(&self) -> Result<Vec<crate::db::DigestShard>> {
            self.0.digest_shards()
        }
        fn audit_log(&self, a: u64, l: usize) -> Result<Vec<crate::db::AuditRecord>> {
            self.0.audit_log(a, l)
        }
        fn prune(&self, now: u64) -> Result<u64> {
            self.0.prune(now)
        }
        fn flush_erased(&self) -> Result<()> {
            self.0.flush_erased()
        }
    }

    #[test]
    fn concurrent_marks_share_commits_and_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Counting(
            SqliteDatabase::open(&dir.path().join("g.db")).unwrap(),
            AtomicU64::new(0),
        ));
        let group = GroupCommit::default();
        let threads = 8u64;
        let per = 100u64;
        let fresh = AtomicU64::new(0);
        let barrier = std::sync::Barrier::new(threads as usize);
        std::thread::scope(|s| {
            for th in 0..threads {
                let (db, group, fresh, barrier) = (&db, &group, &fresh, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for i in 0..per {
                        // Every record is sent by two threads: one of
                        // them must get "already recorded".
                        let mark = Mark::Replay {
                            device: DeviceId::from_u64(1),
                            generation: 0,
                            t: 100,
                            r: (th / 2) * per + i,
                            expires: 1000,
                        };
                        if group.mark(&**db, mark).unwrap() {
                            fresh.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(fresh.into_inner(), threads * per / 2);
        let commits = db.1.load(Ordering::SeqCst);
        assert!(
            commits < threads * per,
            "{commits} commits for {} marks",
            threads * per
        );
    }
}
