//! The center's services on one [`Center`] type.
//!
//! Every service takes the time as `now` (Unix seconds) so callers and
//! tests control it, runs in one database transaction, and changes
//! life-cycle state only through the core's `transition`. The services are
//! split by topic: [`enroll`] (registration, ENROLL, batch import),
//! [`verify`] (AUTH, challenges, AUTH_RESPONSE, SIGNATURE, SEALED) and
//! [`manage`] (life cycle, updates, revocation, commands, receipts,
//! housekeeping, operator queries).

mod audited;
mod enroll;
mod fsupdate;
mod group;
mod import;
mod maint;
mod manage;
mod rotation;
mod verify;
mod watch;

pub(crate) use watch::mark_bytes;

pub use import::{
    IMPORT_LINE_MAX, ImportProgress, ImportReject, ImportReport, ImportSource, REJECTS_KEPT,
};
pub use maint::AutoBackup;
pub use manage::HousekeepingReport;
pub use rotation::RotationReport;
pub use verify::{AuthOutcome, OpenedSealed, SignatureOutcome, VerifyOutcome};

#[cfg(feature = "sqlite")]
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use microcert_core::{DeviceId, Event, Header, KeySeed, KeyState, Sender, Suite, make_receipt};

use crate::cache::{CachedDevice, CachedSeed, SeedCache};
use crate::card::EncryptionCard;
use crate::db::{DeviceRow, KeyDatabase, NewAudit, SeedRow, Tx};
#[cfg(feature = "sqlite")]
use crate::db::{SqliteDatabase, SqliteOptions};
use crate::integrity;
use crate::policy;
use crate::profile::{CenterConfig, ClassProfile};
use crate::replay::{MemoryGuard, ReplayMode};
use crate::{Error, Result};

/// The new seed of an accepted ENROLL, for [`Center::apply_decision`].
pub(crate) struct Fresh<'a> {
    /// The sealed, tagged record to insert.
    pub row: &'a SeedRow,
    /// Whether the device is registered by this ENROLL (a batch entry).
    pub register: bool,
    /// The batch's digest changes.
    pub delta: &'a mut integrity::DigestDelta,
}

/// The seed of `generation` among a device's seeds.
pub(crate) fn seed_mut(seeds: &mut [SeedRow], generation: u8) -> Result<&mut SeedRow> {
    seeds
        .iter_mut()
        .find(|s| s.generation == generation)
        .ok_or(Error::WrongGeneration)
}

/// The authentication center: a key database, an encryption card, a cache
/// of opened seeds and the configuration. `Send + Sync`: share it in an
/// `Arc` between threads.
pub struct Center {
    db: Arc<dyn KeyDatabase>,
    card: Arc<dyn EncryptionCard>,
    cache: Arc<SeedCache>,
    group: group::GroupCommit,
    replay: Replay,
    /// Random bytes from the card, fetched 4 KiB at a time for the r of
    /// the center's RECEIPTs: one card call (a system call for the
    /// software card) per 512 receipts instead of one each.
    /// RECEIPT r values, [`RECEIPT_POOLS`] pools chosen by device, so
    /// that verifying threads do not queue on one lock (nor behind one
    /// 4 KiB draw from the card).
    receipt_r: Vec<std::sync::Mutex<RandomPool>>,
    /// Detects steps of the wall clock (issue 12).
    watch: crate::clock::ClockWatch,
    config: CenterConfig,
    /// Keeps the card's anchor following the database once told where it
    /// is ([`Center::keep_anchor`]); writes it a last time when dropped.
    anchor: std::sync::OnceLock<crate::anchor::Keeper>,
    /// The keyring in the key database, when the card has a root key
    /// (issue 14, [`crate::keyring`]); `card` is then this wrapper.
    keyring: Option<Arc<crate::keyring::KeyringCard>>,
}

/// How many [`RandomPool`]s RECEIPT r values are drawn from.
const RECEIPT_POOLS: usize = 16;

/// Bytes drawn from the card's random generator, used once each. They only
/// become public header fields (r), so holding them in memory is harmless.
struct RandomPool {
    buf: Box<[u8; 4096]>,
    used: usize,
}

impl RandomPool {
    fn new() -> Self {
        RandomPool {
            buf: Box::new([0; 4096]),
            used: 4096,
        }
    }

    fn next_u64(&mut self, card: &dyn EncryptionCard) -> Result<u64> {
        if self.used + 8 > self.buf.len() {
            card.random(&mut self.buf[..])?;
            self.used = 0;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.buf[self.used..self.used + 8]);
        self.used += 8;
        Ok(u64::from_be_bytes(b))
    }
}

/// Where AUTH and SEALED are recorded as accepted (resolved from
/// [`ReplayMode`] when the center is made).
enum Replay {
    /// A record in the key database, group-committed.
    Database,
    /// The in-memory guard of this process's database file.
    Memory(Arc<MemoryGuard>),
}

impl std::fmt::Debug for Center {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Center")
            .field("db", &self.db)
            .field("card", &self.card)
            .field("cache", &self.cache)
            .field(
                "replay",
                &match &self.replay {
                    Replay::Database => "database",
                    Replay::Memory(_) => "memory",
                },
            )
            .finish_non_exhaustive()
    }
}

/// The actor name the center uses for its own decisions in the audit log.
pub const CENTER_ACTOR: &str = "center";

pub(crate) fn now32(now: u64) -> Result<u32> {
    u32::try_from(now).map_err(|_| Error::TimeOutOfRange)
}

pub(crate) fn malformed(e: microcert_core::Error) -> Error {
    Error::Malformed(e.to_string())
}

pub(crate) use crate::policy::year_of;

impl Center {
    /// A center over any database and card. Replay records go to the
    /// database: a database given this way may be shared with other
    /// centers ([`ReplayMode::Memory`] needs [`Center::open_sqlite`], and
    /// falls back to the database here).
    pub fn new(
        db: Arc<dyn KeyDatabase>,
        card: Arc<dyn EncryptionCard>,
        config: CenterConfig,
    ) -> Self {
        if config.replay == ReplayMode::Memory {
            tracing::warn!(
                "replay mode \"memory\" needs a center opened on an SQLite file; using the database"
            );
        }
        Self::with_replay(db, card, config, Replay::Database)
    }

    fn with_replay(
        db: Arc<dyn KeyDatabase>,
        card: Arc<dyn EncryptionCard>,
        config: CenterConfig,
        replay: Replay,
    ) -> Self {
        let (card, keyring) = crate::keyring::attach(card, db.clone());
        let db = integrity::seal_database(db, &card);
        let cache = Arc::new(SeedCache::new(
            config.cache_capacity,
            Duration::from_secs(config.cache_ttl_secs),
        ));
        // Changes committed by other centers on a shared database drop the
        // device from this cache at once where the backend can tell
        // (PostgreSQL: LISTEN/NOTIFY); the TTL stays the bound otherwise.
        let weak = Arc::downgrade(&cache);
        let hook: crate::db::ChangeHook = Arc::new(move |id| {
            if let Some(cache) = weak.upgrade() {
                match id {
                    Some(id) => cache.invalidate(id),
                    None => cache.clear(),
                }
            }
        });
        if let Err(e) = db.watch_changes(hook) {
            tracing::warn!(error = %e, "no change notifications: other centers' changes are seen after the cache TTL");
        }
        Center {
            db,
            card,
            cache,
            group: group::GroupCommit::default(),
            replay,
            receipt_r: (0..RECEIPT_POOLS)
                .map(|_| std::sync::Mutex::new(RandomPool::new()))
                .collect(),
            watch: crate::clock::ClockWatch::new(Arc::new(crate::clock::SystemClock::new())),
            config,
            anchor: std::sync::OnceLock::new(),
            keyring,
        }
    }

    /// Reads and checks the keyring in the key database now (migrating the
    /// card's own storage keys into it on the first open), instead of at
    /// the first seal or unseal; its head, or None when the card keeps its
    /// storage keys itself (a card without a root key).
    pub fn sync_keyring(&self) -> Result<Option<crate::keyring::Head>> {
        self.keyring.as_ref().map(|k| k.sync()).transpose()
    }

    /// The lease `name` on this center's database, lapsing `period` after
    /// the last renewal: one leader among the centers sharing it
    /// ([`crate::keyring::Leader`]).
    pub fn leader(&self, name: &str, period: Duration) -> Result<crate::keyring::Leader> {
        crate::keyring::Leader::new(self.db.clone(), self.card.clone(), name, period)
    }

    /// Whether the storage keys are the key database's keyring.
    pub fn uses_keyring(&self) -> bool {
        self.keyring.is_some()
    }

    /// A center over the SQLite database at `path` (created if missing).
    /// With [`ReplayMode::Auto`] or [`ReplayMode::Memory`] it keeps replay
    /// records in memory (see [`ReplayMode`]): only one process may then
    /// verify messages on this file.
    #[cfg(feature = "sqlite")]
    pub fn open_sqlite(
        path: &Path,
        card: Arc<dyn EncryptionCard>,
        config: CenterConfig,
    ) -> Result<Self> {
        Self::open_sqlite_with(path, SqliteOptions::default(), card, config)
    }

    /// Like [`Center::open_sqlite`], with options for the SQLite backend.
    #[cfg(feature = "sqlite")]
    pub fn open_sqlite_with(
        path: &Path,
        options: SqliteOptions,
        card: Arc<dyn EncryptionCard>,
        config: CenterConfig,
    ) -> Result<Self> {
        let db: Arc<dyn KeyDatabase> = Arc::new(SqliteDatabase::open_with(path, options)?);
        Self::open_local(db, card, config)
    }

    /// A center over a database that is one local file
    /// ([`KeyDatabase::local_path`]), used by this process alone: with
    /// [`ReplayMode::Auto`] or [`ReplayMode::Memory`] the replay records
    /// are kept in memory, their guard's state beside that file. A
    /// database without a local file keeps them in the database.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    fn open_local(
        db: Arc<dyn KeyDatabase>,
        card: Arc<dyn EncryptionCard>,
        config: CenterConfig,
    ) -> Result<Self> {
        let replay = match (config.replay, db.local_path()) {
            (ReplayMode::Auto | ReplayMode::Memory, Some(path)) => {
                let skew = config.profiles.iter().map(|p| u64::from(p.skew)).max();
                let window = skew.unwrap_or(0) + config.instance_skew + 1;
                let expected = watch::guard_state_expected(&*db, &*card)?;
                // The hook writes through the sealing layer (it wraps the
                // database itself): the marker is a mark, with its place in
                // the marks' digest shard, counted once.
                let hook = watch::guard_started_hook(db.clone(), card.clone());
                Replay::Memory(MemoryGuard::for_database(
                    path,
                    card.clone(),
                    window,
                    expected,
                    hook,
                ))
            }
            (ReplayMode::Memory, None) => {
                tracing::warn!(
                    "replay mode \"memory\" needs a database in a local file; using the database"
                );
                Replay::Database
            }
            (ReplayMode::Auto | ReplayMode::Database, _) => Replay::Database,
        };
        Ok(Self::with_replay(db, card, config, replay))
    }

    /// Drops this center as a crash would: the in-memory replay guard is
    /// not saved, so the next start refuses t at or before its mark. For
    /// tests of the restart rule.
    #[doc(hidden)]
    pub fn abandon(self) {
        if let Replay::Memory(g) = &self.replay {
            g.abandon();
        }
    }

    /// Makes the in-memory replay guard stop as a crash would at `at` (its
    /// state file left as a killed process leaves it). For tests of the
    /// restart rule; no effect in database mode.
    #[doc(hidden)]
    pub fn inject_replay_fault(&self, at: crate::replay::FaultPoint) {
        if let Replay::Memory(g) = &self.replay {
            g.inject_fault(at);
        }
    }

    /// Whether AUTH and SEALED are recorded in memory (true) or in the
    /// database.
    pub fn replay_in_memory(&self) -> bool {
        matches!(self.replay, Replay::Memory(_))
    }

    /// Messages held by the in-memory replay guard (0 in database mode).
    pub fn replay_entries(&self) -> usize {
        match &self.replay {
            Replay::Memory(g) => g.len(),
            Replay::Database => 0,
        }
    }

    /// Drops in-memory replay entries that expired before `now` (they are
    /// also dropped as new messages arrive).
    pub fn prune_replay(&self, now: u64) {
        if let Replay::Memory(g) = &self.replay {
            g.prune(now);
        }
    }

    /// A center over the key database named by `location`: a
    /// `postgres://` or `postgresql://` URL selects PostgreSQL (several
    /// centers may share it), anything else is the path of an SQLite file
    /// (created if missing; one center process per file).
    pub fn open_url(
        location: &str,
        card: Arc<dyn EncryptionCard>,
        config: CenterConfig,
    ) -> Result<Self> {
        if crate::db::is_postgres_url(location) {
            #[cfg(feature = "postgres")]
            {
                let db = crate::db::PostgresDatabase::open(location)?;
                Ok(Center::new(Arc::new(db), card, config))
            }
            #[cfg(not(feature = "postgres"))]
            {
                let _ = (card, config);
                Err(Error::NotConfigured {
                    what: "PostgreSQL (this build lacks the `postgres` feature)",
                })
            }
        } else {
            #[cfg(feature = "sqlite")]
            {
                Self::open_sqlite(Path::new(location), card, config)
            }
            #[cfg(not(feature = "sqlite"))]
            {
                let _ = (card, config);
                Err(Error::NotConfigured {
                    what: "SQLite (this build lacks the `sqlite` feature)",
                })
            }
        }
    }

    /// The encryption card.
    pub fn card(&self) -> &dyn EncryptionCard {
        &*self.card
    }

    /// The key database.
    pub fn database(&self) -> &dyn KeyDatabase {
        &*self.db
    }

    /// The configuration.
    pub fn config(&self) -> &CenterConfig {
        &self.config
    }

    /// Drops every cached seed (they zeroize).
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    /// Number of devices in the seed cache.
    pub fn cached_devices(&self) -> usize {
        self.cache.len()
    }

    /// Seed-cache lookups answered from the cache (hits) and not
    /// (misses) since the center opened, for metrics.
    pub fn seed_cache_stats(&self) -> (u64, u64) {
        self.cache.stats()
    }

    pub(crate) fn profile(&self, class: u8) -> Result<&ClassProfile> {
        self.config.profile(class).ok_or(Error::NoProfile { class })
    }

    /// A device for the verification path: from the cache, else read from
    /// the database (tags checked), with its usable seeds opened.
    pub(crate) fn load(&self, id: DeviceId) -> Result<Arc<CachedDevice>> {
        if let Some(hit) = self.cache.get(id) {
            return Ok(hit);
        }
        let ticket = self.cache.ticket(id);
        let (device, rows) = match self.db.read_device_unlocked(id) {
            Some(read) => {
                let (device, rows) = read?.ok_or(Error::UnknownDevice)?;
                integrity::check_device(&*self.card, &device)?;
                for r in &rows {
                    integrity::check_record(&*self.card, r)?;
                }
                (device, rows)
            }
            None => {
                // One consistent read (PostgreSQL: one statement), the
                // tags checked here as on the SQLite path.
                let (device, rows) = self.db.load_device(id)?.ok_or(Error::UnknownDevice)?;
                integrity::check_device(&*self.card, &device)?;
                for r in &rows {
                    integrity::check_record(&*self.card, r)?;
                }
                (device, rows)
            }
        };
        let mut seeds = Vec::with_capacity(rows.len());
        for mut row in rows {
            let seed = match row.state {
                KeyState::PreActivation | KeyState::Active => Some(self.unseal(&row)?),
                _ => None,
            };
            row.ciphertext = None;
            seeds.push(CachedSeed { row, seed });
        }
        let dev = Arc::new(CachedDevice::new(device, seeds));
        self.cache.insert(id, Arc::clone(&dev), ticket);
        Ok(dev)
    }

    /// Every seed of a device with its integrity tag checked.
    pub(crate) fn seeds_checked(&self, tx: &mut dyn Tx, id: DeviceId) -> Result<Vec<SeedRow>> {
        let rows = tx.seeds(id)?;
        for r in &rows {
            integrity::check_record(&*self.card, r)?;
        }
        Ok(rows)
    }

    pub(crate) fn unseal(&self, row: &SeedRow) -> Result<KeySeed> {
        let ct = row.ciphertext.as_ref().ok_or(Error::NotActive)?;
        self.card
            .unseal_seed(row.device, row.generation, row.kstore_version, &ct.0)
            .map_err(|e| match e {
                // The tag matched but the ciphertext does not open: the
                // record was tampered with in a way the tag cannot see
                // (or the card is not this database's).
                Error::Verification => Error::Integrity(format!(
                    "{} generation {}: ciphertext does not open",
                    row.device, row.generation
                )),
                other => other,
            })
    }

    /// A RECEIPT from the center, keyed by `seed`.
    pub(crate) fn receipt(
        &self,
        seed: &KeySeed,
        suite: Suite,
        device: DeviceId,
        generation: u8,
        reference: u64,
        now: u64,
    ) -> Result<Vec<u8>> {
        let header = Header {
            suite,
            device,
            generation,
            t: now32(now)?,
            r: self.receipt_r[usize::from(device.0[7]) % RECEIPT_POOLS]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .next_u64(&*self.card)?,
        };
        let mut out = [0u8; microcert_core::HEADER_LEN + 9 + 16];
        let n = make_receipt(seed, &header, Sender::Center, reference, 0, &mut out)
            .map_err(|e| Error::Card(format!("making a receipt: {e}")))?;
        Ok(out[..n].to_vec())
    }

    /// Applies a life-cycle event to a seed record inside a transaction:
    /// the policy's transition, timestamps, new tag, digest, audit entry.
    pub(crate) fn apply_event(
        &self,
        tx: &mut dyn Tx,
        row: &mut SeedRow,
        event: Event,
        now: u64,
        actor: &str,
        reason: &str,
    ) -> Result<()> {
        let old_tag = row.tag;
        let to = policy::apply_transition(row, event, now)?;
        integrity::retag(&*self.card, row)?;
        tx.update_seed(row)?;
        integrity::apply_change(tx, &*self.card, row.device, Some(&old_tag), &row.tag)?;
        crate::audit::append(
            tx,
            &*self.card,
            &NewAudit::new(now, actor, event.name())
                .on(Some(row.device), Some(row.generation))
                .because(reason),
        )?;
        tracing::info!(device = %row.device, generation = row.generation, event = event.name(), state = to.name(), actor, "life-cycle transition");
        Ok(())
    }

    /// Decides `input` for a device by the life-cycle policy and applies
    /// the decision's effects in `tx` ([`Center::apply_decision`]).
    /// Returns the decision.
    pub(crate) fn decide_and_apply(
        &self,
        tx: &mut dyn Tx,
        dev: &mut DeviceRow,
        seeds: &mut [SeedRow],
        input: policy::Input,
        now: u64,
        who: (&str, &str),
    ) -> Result<policy::Decision> {
        let snapshot = policy::DeviceSnapshot::of(dev, seeds.iter());
        let decision = policy::decide(&snapshot, input, now)?;
        self.apply_decision(tx, dev, seeds, &decision, None, now, who)?;
        Ok(decision)
    }

    /// Applies a decision's effects in `tx`, in order: transitions (audited
    /// with their reason, `reason` being the operator's), the grace period
    /// and the answer of a seed update, the transport flag, a command,
    /// the new seed of an ENROLL (`fresh`), audit entries. The device row
    /// is written when it changed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply_decision(
        &self,
        tx: &mut dyn Tx,
        dev: &mut DeviceRow,
        seeds: &mut [SeedRow],
        decision: &policy::Decision,
        mut fresh: Option<Fresh<'_>>,
        now: u64,
        (actor, reason): (&str, &str),
    ) -> Result<()> {
        let mut dev_changed = false;
        let mut new_generation = None;
        for effect in &decision.effects {
            match *effect {
                policy::Effect::Transition {
                    generation,
                    event,
                    reason: why,
                } => {
                    let row = seed_mut(seeds, generation)?;
                    self.apply_event(tx, row, event, now, actor, &why.text(reason))?;
                }
                policy::Effect::Grace { generation, until } => {
                    self.set_grace(tx, seed_mut(seeds, generation)?, until)?;
                }
                policy::Effect::AnswerUpdate => self.answer_update(tx, dev.id, now)?,
                policy::Effect::Transport { open, epoch } => {
                    dev.transport_open = open;
                    dev.epoch = epoch;
                    dev_changed = true;
                }
                policy::Effect::QueueRevoke { generation }
                | policy::Effect::QueueUpdate { generation } => {
                    let opcode = if matches!(effect, policy::Effect::QueueRevoke { .. }) {
                        microcert_core::Opcode::REVOKE
                    } else if self.profile(dev.class)?.forward_secret_update {
                        // v1.2: the class asks for a forward-secret update.
                        microcert_core::Opcode::UPDATE_SEED_FS
                    } else {
                        microcert_core::Opcode::UPDATE_SEED
                    };
                    self.queue_command(tx, dev, seeds, generation, opcode, now, (actor, reason))?;
                    dev_changed = true;
                }
                policy::Effect::NewSeed { generation } => {
                    let f = fresh.as_mut().ok_or(Error::NoSeed { device: dev.id })?;
                    if f.row.generation != generation || f.row.device != dev.id {
                        return Err(Error::WrongGeneration);
                    }
                    // The device row first: a device registered by this
                    // ENROLL must exist before its seed.
                    self.put_device(tx, dev, f.register)?;
                    dev_changed = false;
                    tx.insert_seed(f.row)?;
                    f.delta.add(dev.id, None, &f.row.tag);
                    new_generation = Some(generation);
                }
                policy::Effect::Audit { action } => {
                    let text = if action == "reopen-transport" {
                        format!("epoch {}: {reason}", dev.epoch)
                    } else {
                        reason.to_string()
                    };
                    self.audit(
                        tx,
                        now,
                        actor,
                        action,
                        (Some(dev.id), new_generation),
                        &text,
                    )?;
                }
                policy::Effect::Use(_)
                | policy::Effect::NotaryValid
                | policy::Effect::EnrollKeys { .. } => {}
            }
        }
        if dev_changed {
            self.put_device(tx, dev, false)?;
        }
        Ok(())
    }

    /// Gives a seed a grace period ending at `until` (covered by its tag).
    pub(crate) fn set_grace(&self, tx: &mut dyn Tx, row: &mut SeedRow, until: u64) -> Result<()> {
        row.grace_until = Some(until);
        let old_tag = row.tag;
        integrity::retag(&*self.card, row)?;
        tx.update_seed(row)?;
        integrity::apply_change(tx, &*self.card, row.device, Some(&old_tag), &row.tag)
    }

    /// Answers the device's pending UPDATE_SEED or UPDATE_SEED_FS, if it
    /// has one (status 0), and destroys the sealed ephemeral key of the
    /// latter in the same write.
    pub(crate) fn answer_update(&self, tx: &mut dyn Tx, id: DeviceId, now: u64) -> Result<()> {
        if let Some(mut cmd) = tx.command(id)?
            && cmd.answered_at.is_none()
            && fsupdate::is_update(cmd.opcode)
        {
            cmd.answered_at = Some(now);
            cmd.status = Some(0);
            fsupdate::destroy_secret(&mut cmd);
            tx.put_command(&cmd)?;
        }
        Ok(())
    }

    /// Queues a command under `generation` (replacing any pending one),
    /// audited as "queue-revoke" / "queue-update".
    #[allow(clippy::too_many_arguments)]
    fn queue_command(
        &self,
        tx: &mut dyn Tx,
        dev: &mut DeviceRow,
        seeds: &[SeedRow],
        generation: u8,
        opcode: microcert_core::Opcode,
        now: u64,
        (actor, reason): (&str, &str),
    ) -> Result<()> {
        let row = seeds
            .iter()
            .find(|s| s.generation == generation)
            .ok_or(Error::WrongGeneration)?;
        let cmd = self.build_command(dev, row, opcode, now)?;
        tx.put_command(&cmd)?;
        let action = if opcode == microcert_core::Opcode::REVOKE {
            "queue-revoke"
        } else {
            "queue-update"
        };
        self.audit(
            tx,
            now,
            actor,
            action,
            (Some(dev.id), Some(generation)),
            reason,
        )
    }

    pub(crate) fn audit(
        &self,
        tx: &mut dyn Tx,
        now: u64,
        actor: &str,
        action: &str,
        (device, generation): (Option<DeviceId>, Option<u8>),
        reason: &str,
    ) -> Result<()> {
        // Through the card-tagged head: an append that fails (or a head
        // that fails its tag) fails the whole operation.
        crate::audit::append(
            tx,
            &*self.card,
            &NewAudit::new(now, actor, action)
                .on(device, generation)
                .because(reason),
        )
    }

    /// The device row (tag checked) or UnknownDevice.
    pub(crate) fn device_in(&self, tx: &mut dyn Tx, id: DeviceId) -> Result<DeviceRow> {
        self.device_opt(tx, id)?.ok_or(Error::UnknownDevice)
    }

    /// The device row (tag checked), if registered.
    pub(crate) fn device_opt(&self, tx: &mut dyn Tx, id: DeviceId) -> Result<Option<DeviceRow>> {
        let d = tx.device(id)?;
        if let Some(d) = &d {
            integrity::check_device(&*self.card, d)?;
        }
        Ok(d)
    }

    /// Writes a device row with a fresh tag.
    pub(crate) fn put_device(
        &self,
        tx: &mut dyn Tx,
        d: &mut DeviceRow,
        insert: bool,
    ) -> Result<()> {
        integrity::retag_device(&*self.card, d)?;
        if insert {
            tx.insert_device(d)
        } else {
            tx.update_device(d)
        }
    }
}
