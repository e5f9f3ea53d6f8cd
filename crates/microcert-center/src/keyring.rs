//! The keyring in the key database and the leader of the periodic jobs
//! (issue 14: several centers on one database).
//!
//! # Keyring
//!
//! The storage keys (Kstore versions) live in the key database's `keyring`
//! table, each wrapped under the card's root key (AES-KW, RFC 3394); the
//! card keeps only that root key (the software card derives it from its
//! integrity key, so clones and recoveries have it). Version 0 is the
//! head: an epoch that grows by one at every change, the current version
//! and the live versions. Every row carries a card tag (domain
//! "MC-KEYRING-v1") over its version and bytes, so:
//!
//! - a wrapped key moved to another version, altered or made up fails its
//!   tag, and so does a head that names another current version;
//! - the head must list exactly the rows there are, and its current
//!   version must be the newest: a row deleted or added beside it, or an
//!   older head put back beside newer rows, is refused;
//! - a whole older keyring (head and rows copied earlier) is refused by a
//!   center that has seen a newer epoch (it never goes back), so an
//!   attacker cannot make the centers seal new seeds under a retired key.
//!
//! [`KeyringCard`] wraps a card that has a root key: seal and unseal go to
//! the card, which holds the unwrapped keys (in memory, or a token's
//! session objects); which version seals is re-read from the database at
//! least every [`REFRESH`] by a background thread (seal and unseal run
//! inside database transactions and never read the database themselves),
//! and a version the card does not hold makes it reload the keyring (up to
//! [`MISS_WAIT`]) before it fails. A rotation at one center is thus used by
//! all: they seal under it within REFRESH and open what it sealed at once.
//! A keyring that fails its checks is never applied: the center keeps the
//! versions it holds (it seals under the newest it has seen) and logs it.
//!
//! Migration: the first open of a database without a keyring by a card
//! that still keeps its storage keys (card file key block version 1)
//! copies them into the keyring, then the card file keeps only the root
//! key. Idempotent: AES-KW is deterministic, so a clone of the card (or a
//! second run after a crash between the two steps) finds the same rows.
//! A card whose own storage keys cannot be wrapped (a PKCS#11 token's
//! non-extractable `microcert-kstore-vN` objects,
//! [`EncryptionCard::resident_storage_keys`]) keeps them for unsealing;
//! the keyring it makes starts at the next version, current at once.
//!
//! # Leader
//!
//! [`Leader`] elects one center for the periodic jobs (integrity scan,
//! backup schedule, housekeeping) with a lease row: holder, expiry, card
//! tag, taken and renewed by compare-and-swap. A lease whose tag fails, or
//! whose expiry lies further ahead than one lease period (a forged row
//! meant to stop every scan), counts as free.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use microcert_core::{CHALLENGE_LEN, DeviceId, Key128, KeySeed};
use subtle::ConstantTimeEq;

use crate::card::{EncryptionCard, SealedSeed, TAG_LEN};
use crate::db::{KeyDatabase, KeyringRow, LeaseRow};
use crate::{Error, Result};

/// How often a center re-reads which storage-key version is current.
pub const REFRESH: Duration = Duration::from_secs(2);

/// How long an unseal of a version the card does not hold waits for the
/// keyring to be reloaded before it fails.
pub const MISS_WAIT: Duration = Duration::from_secs(2);

const HEAD: u32 = 0;
const DOMAIN: &[u8] = b"MC-KEYRING-v1\0";
const LEASE_DOMAIN: &[u8] = b"MC-LEASE-v1\0";

/// The head row: which version is current, the live versions, an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Grows by one at every change of the keyring.
    pub epoch: u64,
    /// The version new seeds are sealed under.
    pub current: u32,
    /// Every live version, ascending.
    pub versions: Vec<u32>,
}

impl Head {
    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(14 + 4 * self.versions.len());
        b.extend_from_slice(&self.epoch.to_be_bytes());
        b.extend_from_slice(&self.current.to_be_bytes());
        b.extend_from_slice(&(self.versions.len() as u16).to_be_bytes());
        for v in &self.versions {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b
    }

    fn from_bytes(b: &[u8]) -> Option<Head> {
        if b.len() < 14 {
            return None;
        }
        let epoch = u64::from_be_bytes(b[..8].try_into().ok()?);
        let current = u32::from_be_bytes(b[8..12].try_into().ok()?);
        let n = usize::from(u16::from_be_bytes(b[12..14].try_into().ok()?));
        if b.len() != 14 + 4 * n {
            return None;
        }
        let versions = (0..n)
            .map(|i| {
                u32::from_be_bytes([b[14 + 4 * i], b[15 + 4 * i], b[16 + 4 * i], b[17 + 4 * i]])
            })
            .collect();
        Some(Head {
            epoch,
            current,
            versions,
        })
    }
}

fn row_tag(card: &dyn EncryptionCard, version: u32, bytes: &[u8]) -> Result<[u8; TAG_LEN]> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 8 + bytes.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(&version.to_be_bytes());
    m.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    m.extend_from_slice(bytes);
    card.record_tag(&m)
}

fn tagged(card: &dyn EncryptionCard, version: u32, bytes: Vec<u8>) -> Result<KeyringRow> {
    let tag = row_tag(card, version, &bytes)?.to_vec();
    Ok(KeyringRow {
        version,
        bytes,
        tag,
    })
}

/// A keyring read from the database and checked (see the module docs).
#[derive(Debug, Clone)]
pub struct Checked {
    /// The head.
    pub head: Head,
    /// The head's row (its tag is the compare-and-swap token).
    pub head_row: KeyringRow,
    /// The key rows, by version.
    pub keys: Vec<KeyringRow>,
}

/// Checks every row's tag and the head against the rows; None when there
/// is no keyring at all (no rows).
pub fn check(card: &dyn EncryptionCard, rows: Vec<KeyringRow>) -> Result<Option<Checked>> {
    if rows.is_empty() {
        return Ok(None);
    }
    for r in &rows {
        let expect = row_tag(card, r.version, &r.bytes)?;
        if r.tag.len() != TAG_LEN || !bool::from(expect.ct_eq(&r.tag[..])) {
            return Err(Error::Keyring(if r.version == HEAD {
                "the head row fails its card tag (edited outside the center)".into()
            } else {
                format!(
                    "storage key version {} fails its card tag (its row was altered, moved or made up)",
                    r.version
                )
            }));
        }
    }
    let mut head_row = None;
    let mut keys = Vec::new();
    for r in rows {
        if r.version == HEAD {
            head_row = Some(r);
        } else {
            keys.push(r);
        }
    }
    let head_row = head_row.ok_or_else(|| {
        Error::Keyring("storage keys without a head row (the head was deleted)".into())
    })?;
    let head = Head::from_bytes(&head_row.bytes)
        .ok_or_else(|| Error::Keyring("the head row does not decode".into()))?;
    keys.sort_by_key(|r| r.version);
    let present: Vec<u32> = keys.iter().map(|r| r.version).collect();
    if present != head.versions {
        return Err(Error::Keyring(format!(
            "the head (epoch {}) lists versions {:?} but the table holds {:?}: rows deleted, added or an older head put back",
            head.epoch, head.versions, present
        )));
    }
    if head.versions.last() != Some(&head.current) {
        return Err(Error::Keyring(format!(
            "the head names version {} current, not the newest of {:?}",
            head.current, head.versions
        )));
    }
    Ok(Some(Checked {
        head,
        head_row,
        keys,
    }))
}

/// The epoch of the keyring's head as stored, for the card's anchor: 0
/// when there is no keyring, or when it fails its checks (then an anchor
/// that saw a higher epoch reports the database as put back, and the
/// keyring's own checks say why). A database or card that does not answer
/// is an error, never a "rolled back" keyring.
pub fn head_epoch(db: &dyn KeyDatabase, card: &dyn EncryptionCard) -> Result<u64> {
    let db = db.unsealed().unwrap_or(db);
    match read_rows(db).and_then(|rows| check(card, rows)) {
        Ok(Some(c)) => Ok(c.head.epoch),
        Ok(None) | Err(Error::Keyring(_) | Error::Integrity(_)) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Reads the keyring rows in one read transaction.
fn read_rows(db: &dyn KeyDatabase) -> Result<Vec<KeyringRow>> {
    let mut out = Vec::new();
    db.read_transaction(&mut |tx| {
        out = tx.keyring()?;
        Ok(())
    })?;
    Ok(out)
}

/// The database under the sealing layer (the keyring and leases are
/// tagged by their own code).
fn raw(db: &Arc<dyn KeyDatabase>) -> &dyn KeyDatabase {
    db.unsealed().unwrap_or(&**db)
}

#[derive(Debug, Default)]
struct State {
    /// The highest head epoch seen: never go back below it.
    floor: u64,
    /// When the keyring was last read and applied.
    synced: Option<Instant>,
    /// Reads of the keyring tried (applied or not), for waiters.
    tries: u64,
    /// A reload was asked for (an unknown version met).
    wanted: bool,
    /// The last read failed (said once, not every REFRESH).
    failing: bool,
    /// The versions the card holds from the keyring.
    held: Vec<u32>,
    /// Versions a reload did not find, and when: an unseal of one of them
    /// fails at once for [`REFRESH`] instead of waiting again (bounded to
    /// [`MISSED_MAX`] entries), so that requests for a device whose seed
    /// names a version no center holds cannot hold a transaction for
    /// [`MISS_WAIT`] each.
    missed: Vec<(u32, Instant)>,
}

/// How many recently missed versions are remembered.
const MISSED_MAX: usize = 8;

/// A card whose storage keys are the key database's keyring (see the
/// module docs). Every other operation goes to the card as is.
pub struct KeyringCard {
    inner: Arc<dyn EncryptionCard>,
    db: Arc<dyn KeyDatabase>,
    shared: Arc<Shared>,
    /// One read or change of the keyring at a time.
    serial: Mutex<()>,
}

/// What the refresher thread shares with the card (it holds the card
/// only while it reads, so a dropped center ends it).
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the refresher (a reload wanted) and the waiters (a read done).
    wake: std::sync::Condvar,
}

impl std::fmt::Debug for KeyringCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyringCard")
            .field("card", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Puts `card` under the keyring of `db` when it has a root key (a card
/// already under one is taken out first); any other card is returned as
/// is, with None. Nothing is read yet: [`KeyringCard::sync`] runs at the
/// first seal or unseal, or when the caller asks
/// ([`crate::Center::sync_keyring`]).
pub fn attach(
    card: Arc<dyn EncryptionCard>,
    db: Arc<dyn KeyDatabase>,
) -> (Arc<dyn EncryptionCard>, Option<Arc<KeyringCard>>) {
    let card = card.keyring_base().unwrap_or(card);
    if !card.has_keyring_root() {
        return (card, None);
    }
    let k = Arc::new(KeyringCard {
        inner: card,
        db,
        shared: Arc::new(Shared::default()),
        serial: Mutex::new(()),
    });
    // The first read now, while no transaction of this process holds the
    // database (an SQLite connection is one): it may migrate. A failure
    // is said again by the first seal or unseal, and by Site::open.
    if let Err(e) = k.sync() {
        tracing::warn!(error = %e, "keyring not loaded");
    }
    spawn_refresher(Arc::downgrade(&k), k.shared.clone());
    (k.clone(), Some(k))
}

/// Re-reads the keyring every [`REFRESH`], or at once when a reload is
/// wanted, until the card is dropped.
fn spawn_refresher(weak: std::sync::Weak<KeyringCard>, shared: Arc<Shared>) {
    let spawned = std::thread::Builder::new()
        .name("keyring".into())
        .spawn(move || {
            loop {
                {
                    let st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
                    let (mut st, _) = shared
                        .wake
                        .wait_timeout_while(st, REFRESH, |s| !s.wanted)
                        .unwrap_or_else(PoisonError::into_inner);
                    st.wanted = false;
                    drop(st);
                    let Some(k) = weak.upgrade() else { return };
                    let r = k.sync();
                    let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
                    st.tries += 1;
                    match r {
                        Ok(_) => st.failing = false,
                        Err(e) if !st.failing => {
                            st.failing = true;
                            if matches!(e, Error::Keyring(_)) {
                                tracing::error!(error = %e, "KEYRING REFUSED: the versions held are kept");
                            } else {
                                tracing::warn!(error = %e, "keyring not re-read: the versions held are kept");
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "keyring not re-read"),
                    }
                    drop(st);
                    shared.wake.notify_all();
                }
                // Not holding the card between reads.
                std::thread::yield_now();
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "no keyring refresher thread: rotations elsewhere are seen at restart");
    }
}

impl KeyringCard {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the keyring, checks it and makes the card hold exactly its
    /// versions with its current one; migrates the card's own storage
    /// keys into it first when the database has none. Returns the head.
    pub fn sync(&self) -> Result<Head> {
        let _one = self.serial.lock().unwrap_or_else(PoisonError::into_inner);
        self.sync_serial()
    }

    /// [`KeyringCard::sync`] with `serial` held. The database is read
    /// without the state lock (seal and unseal take it inside their
    /// transactions, which may hold the database: an SQLite connection).
    fn sync_serial(&self) -> Result<Head> {
        let db = raw(&self.db);
        let card = &*self.inner;
        let mut checked = check(card, read_rows(db)?)?;
        let legacy = card.legacy_storage_keys()?;
        if checked.is_none() {
            self.create(db, legacy.as_ref())?;
            checked = check(card, read_rows(db)?)?;
        }
        let c = checked.ok_or_else(|| Error::Keyring("no keyring after creating one".into()))?;
        if let Some((_, keys)) = &legacy {
            self.migrate(db, &c, keys)?;
        }
        let mut st = self.lock();
        if c.head.epoch < st.floor {
            return Err(Error::Keyring(format!(
                "the keyring was rolled back: its head has epoch {} (current version {}), this center has seen epoch {}",
                c.head.epoch, c.head.current, st.floor
            )));
        }
        for r in &c.keys {
            card.hold_storage_key(r.version, &r.bytes)?;
        }
        card.set_storage_key_version(c.head.current)?;
        for v in st.held.clone() {
            if !c.head.versions.contains(&v) {
                card.release_storage_key(v)?;
            }
        }
        if legacy.is_some() {
            // The keyring holds every storage key the card kept: from now
            // on the card file keeps only the root key.
            card.drop_legacy_storage_keys()?;
            // Versions the card kept that the keyring destroyed since
            // (`migrate` let them pass) go from memory now.
            for v in card.storage_key_versions() {
                if !c.head.versions.contains(&v) {
                    card.release_storage_key(v)?;
                }
            }
        }
        if c.head.epoch > st.floor {
            tracing::info!(
                epoch = c.head.epoch,
                current = c.head.current,
                versions = ?c.head.versions,
                "keyring loaded"
            );
        }
        st.floor = c.head.epoch;
        st.held = c.head.versions.clone();
        st.synced = Some(Instant::now());
        Ok(c.head)
    }

    /// A database without a keyring: the card's own storage keys become
    /// it, or a first version is made. Refused when seeds are sealed in
    /// the database but the card has no storage keys of its own (a card
    /// migrated elsewhere, over a database restored without its keyring):
    /// a new version 1 would not open them.
    fn create(
        &self,
        db: &dyn KeyDatabase,
        legacy: Option<&crate::card::WrappedStorageKeys>,
    ) -> Result<()> {
        let card = &*self.inner;
        // Versions the card keeps itself and cannot wrap (a token's
        // non-extractable Kstore objects): they stay on the card, seeds
        // sealed under them open as before, and the keyring starts above
        // them (its first version is current at once).
        let resident = card.resident_storage_keys();
        let (current, keys) = match legacy {
            Some((cur, keys)) => (*cur, keys.clone()),
            None => {
                // Any seed row at all (not only the first page's, and
                // whether or not its ciphertext is there: a row edited from
                // outside must not make this a fresh database).
                let page = db.scan_seeds(None, 1)?;
                if let Some(s) = page.first()
                    && resident.is_empty()
                {
                    return Err(Error::Keyring(format!(
                        "the key database has no keyring but holds seeds sealed under storage key version {} \
                         (e.g. {}), and this card keeps no storage keys of its own: restore a backup that \
                         carries its keyring, or open it first with the card file from before the keyring",
                        s.kstore_version, s.device
                    )));
                }
                // The keys this card holds already (a keyring of another
                // database it serves in this process), else a first one.
                match card.held_storage_keys()? {
                    Some((cur, keys)) if !keys.is_empty() => (cur, keys),
                    _ => {
                        let first = resident
                            .iter()
                            .max()
                            .map_or(Some(1), |v| v.checked_add(1))
                            .ok_or(Error::StorageKeysExhausted)?;
                        (first, vec![(first, card.new_wrapped_storage_key()?)])
                    }
                }
            }
        };
        let mut versions: Vec<u32> = keys.iter().map(|(v, _)| *v).collect();
        versions.sort_unstable();
        let head = Head {
            epoch: 1,
            current,
            versions,
        };
        let mut rows = vec![tagged(card, HEAD, head.bytes())?];
        for (v, w) in keys {
            rows.push(tagged(card, v, w)?);
        }
        let r = db.transaction(&mut |tx| {
            if !tx.keyring()?.is_empty() {
                return Ok(());
            }
            for r in &rows {
                tx.insert_keyring(r)?;
            }
            Ok(())
        });
        match r {
            Ok(()) => {
                tracing::info!(current, "keyring made in the key database");
                Ok(())
            }
            // Another center made it at the same moment: use theirs.
            Err(e) if !read_rows(db)?.is_empty() => {
                tracing::debug!(error = %e, "keyring made by another center");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The card still keeps storage keys while the database has a keyring:
    /// each must be in it with the same wrapped bytes (AES-KW is
    /// deterministic), or be older than the keyring's oldest version
    /// (destroyed there since); anything else is refused, and the card
    /// keeps its keys.
    fn migrate(&self, db: &dyn KeyDatabase, c: &Checked, keys: &[(u32, Vec<u8>)]) -> Result<()> {
        for (v, w) in keys {
            match c.keys.iter().find(|r| r.version == *v) {
                Some(r) if bool::from(r.bytes.ct_eq(w)) => {}
                Some(_) => {
                    return Err(Error::Keyring(format!(
                        "this card keeps a storage key version {v} that differs from the keyring's: \
                         is this the card of this database? (the card keeps its keys)"
                    )));
                }
                None if c.head.versions.first().is_some_and(|f| v < f) => {
                    // Destroyed in the keyring since (every record re-sealed).
                }
                None => {
                    return Err(Error::Keyring(format!(
                        "this card keeps a storage key version {v} the keyring does not have \
                         (versions {:?}): rotate at one center at a time (the card keeps its keys)",
                        c.head.versions
                    )));
                }
            }
        }
        let _ = db;
        Ok(())
    }

    /// Asks the refresher for a reload and waits (at most `wait`) until
    /// `done` holds or a read finished without it.
    fn reload_until(&self, wait: Duration, done: impl Fn(&State) -> bool) -> bool {
        let mut st = self.lock();
        if done(&st) {
            return true;
        }
        let deadline = Instant::now() + wait;
        // Two reads: one may have started before the change we look for.
        let target = st.tries + 2;
        st.wanted = true;
        self.shared.wake.notify_all();
        while !done(&st) && st.tries < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .shared
                .wake
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            if !st.wanted && st.tries < target {
                st.wanted = true;
                self.shared.wake.notify_all();
            }
        }
        done(&st)
    }

    /// Whether a reload missed `version` less than [`REFRESH`] ago (and the
    /// card still does not hold it).
    fn missed_recently(&self, version: u32) -> bool {
        let st = self.lock();
        !st.held.contains(&version)
            && st
                .missed
                .iter()
                .any(|&(v, at)| v == version && at.elapsed() < REFRESH)
    }

    /// Remembers that a reload did not find `version`.
    fn note_missed(&self, version: u32) {
        let mut st = self.lock();
        st.missed
            .retain(|&(v, at)| v != version && at.elapsed() < REFRESH);
        if st.missed.len() >= MISSED_MAX {
            st.missed.remove(0);
        }
        st.missed.push((version, Instant::now()));
    }

    /// Fails when the keyring was never loaded (asks for a load first).
    fn loaded(&self) -> Result<()> {
        if self.reload_until(MISS_WAIT, |s| s.synced.is_some()) {
            Ok(())
        } else {
            Err(Error::Keyring(
                "the keyring in the key database could not be loaded (see the log)".into(),
            ))
        }
    }

    /// Changes the keyring in one transaction: `f` gets the checked
    /// keyring and returns the new head and the rows to insert and delete.
    fn change(
        &self,
        f: impl Fn(&Checked) -> Result<(Head, Vec<KeyringRow>, Vec<u32>)>,
    ) -> Result<Head> {
        let db = raw(&self.db);
        let card = &*self.inner;
        let _one = self.serial.lock().unwrap_or_else(PoisonError::into_inner);
        self.sync_serial()?;
        let mut out = None;
        db.transaction(&mut |tx| {
            let c =
                check(card, tx.keyring()?)?.ok_or_else(|| Error::Keyring("no keyring".into()))?;
            let (head, insert, delete) = f(&c)?;
            for r in &insert {
                tx.insert_keyring(r)?;
            }
            for v in &delete {
                tx.delete_keyring(*v)?;
            }
            let row = tagged(card, HEAD, head.bytes())?;
            if !tx.update_keyring(&row, &c.head_row.tag)? {
                return Err(Error::Keyring(
                    "the keyring changed during this change (another center): try again".into(),
                ));
            }
            out = Some(head);
            Ok(())
        })?;
        let head = out.ok_or_else(|| Error::Keyring("keyring change lost".into()))?;
        self.sync_serial()?;
        Ok(head)
    }
}

impl EncryptionCard for KeyringCard {
    fn transport_key(&self, device: DeviceId, epoch: u8) -> Result<Key128> {
        self.inner.transport_key(device, epoch)
    }

    fn make_challenge(&self, device: DeviceId, now: u32) -> Result<[u8; CHALLENGE_LEN]> {
        self.inner.make_challenge(device, now)
    }

    fn check_challenge(&self, device: DeviceId, c: &[u8; CHALLENGE_LEN], now: u32) -> Result<()> {
        self.inner.check_challenge(device, c, now)
    }

    fn seal_seed(&self, device: DeviceId, generation: u8, seed: &KeySeed) -> Result<SealedSeed> {
        self.loaded()?;
        self.inner.seal_seed(device, generation, seed)
    }

    fn unseal_seed(&self, id: DeviceId, g: u8, version: u32, ct: &[u8]) -> Result<KeySeed> {
        // A version the card keeps itself (a token object from before the
        // keyring).
        if self.inner.resident_storage_keys().contains(&version) {
            return self.inner.unseal_seed(id, g, version, ct);
        }
        // A version this center does not hold: rotated at another center,
        // reload before failing (unless a reload just missed it).
        let recent = self.missed_recently(version);
        if recent || !self.reload_until(MISS_WAIT, |s| s.held.contains(&version)) {
            self.loaded()?;
            if !recent {
                self.note_missed(version);
            }
            return Err(Error::NoStorageKey { version });
        }
        self.inner.unseal_seed(id, g, version, ct)
    }

    fn record_tag(&self, record: &[u8]) -> Result<[u8; TAG_LEN]> {
        self.inner.record_tag(record)
    }

    fn digest_tag(&self, state: &[u8]) -> Result<[u8; TAG_LEN]> {
        self.inner.digest_tag(state)
    }

    fn random(&self, out: &mut [u8]) -> Result<()> {
        self.inner.random(out)
    }

    fn storage_key_version(&self) -> u32 {
        self.inner.storage_key_version()
    }

    fn storage_key_versions(&self) -> Vec<u32> {
        let mut v = self.lock().held.clone();
        v.extend(self.inner.resident_storage_keys());
        v.sort_unstable();
        v.dedup();
        v
    }

    /// A new version in the keyring, current at once for every center
    /// (within [`REFRESH`]).
    fn rotate_storage_key(&self) -> Result<u32> {
        let card = &*self.inner;
        let head = self.change(|c| {
            let next = c
                .head
                .current
                .checked_add(1)
                .filter(|_| c.head.versions.len() < 255)
                .ok_or(Error::StorageKeysExhausted)?;
            let row = tagged(card, next, card.new_wrapped_storage_key()?)?;
            let mut versions = c.head.versions.clone();
            versions.push(next);
            Ok((
                Head {
                    epoch: c.head.epoch + 1,
                    current: next,
                    versions,
                },
                vec![row],
                vec![],
            ))
        })?;
        tracing::info!(version = head.current, "new storage key in the keyring");
        Ok(head.current)
    }

    /// Deletes the version's row (the caller checked that no record and
    /// no kept backup needs it); a version the card keeps itself (a token
    /// object from before the keyring) is destroyed on the card.
    fn destroy_storage_key(&self, version: u32) -> Result<()> {
        if self.inner.resident_storage_keys().contains(&version)
            && !self.lock().held.contains(&version)
        {
            return self.inner.destroy_storage_key(version);
        }
        self.change(|c| {
            if version == c.head.current {
                return Err(Error::CurrentStorageKey { version });
            }
            if !c.head.versions.contains(&version) {
                return Err(Error::NoStorageKey { version });
            }
            let versions = c
                .head
                .versions
                .iter()
                .copied()
                .filter(|v| *v != version)
                .collect();
            Ok((
                Head {
                    epoch: c.head.epoch + 1,
                    current: c.head.current,
                    versions,
                },
                vec![],
                vec![version],
            ))
        })?;
        tracing::info!(version, "storage key destroyed in the keyring");
        Ok(())
    }

    fn load_anchor(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.inner.load_anchor(name)
    }

    fn store_anchor(&self, name: &str, bytes: &[u8]) -> Result<bool> {
        self.inner.store_anchor(name, bytes)
    }

    fn keyring_base(&self) -> Option<Arc<dyn EncryptionCard>> {
        Some(self.inner.clone())
    }

    fn resident_storage_keys(&self) -> Vec<u32> {
        self.inner.resident_storage_keys()
    }
}

/// The keyring rows of `db`, checked, for a backup (None: no keyring).
pub fn rows_for_backup(db: &dyn KeyDatabase, card: &dyn EncryptionCard) -> Result<Vec<KeyringRow>> {
    let db = db.unsealed().unwrap_or(db);
    let rows = match read_rows(db) {
        Ok(r) => r,
        // A backend without a keyring table.
        Err(Error::Database(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let Some(c) = check(card, rows)? else {
        return Ok(Vec::new());
    };
    let mut out = vec![c.head_row];
    out.extend(c.keys);
    Ok(out)
}

/// Puts a backup's keyring into the database a restore writes (empty of
/// records, so nothing depends on a keyring made there at open) and makes
/// the card hold its keys; then checks that every version the backup's
/// seeds are under is in the keyring (or among the card's own keys, from
/// before the keyring) and opens one of its seeds. Refused otherwise,
/// before any record is written, naming the versions.
pub fn restore_rows(
    db: &dyn KeyDatabase,
    card: &dyn EncryptionCard,
    rows: &[KeyringRow],
    seeds: &[crate::db::SeedRow],
) -> Result<()> {
    let db = db.unsealed().unwrap_or(db);
    let base = card.keyring_base();
    let card: &dyn EncryptionCard = base.as_deref().unwrap_or(card);
    if !card.has_keyring_root() {
        // The card keeps its storage keys itself (a PKCS#11 token).
        return Ok(());
    }
    let mut needed: Vec<u32> = seeds
        .iter()
        .filter(|s| s.ciphertext.is_some())
        .map(|s| s.kstore_version)
        .collect();
    needed.sort_unstable();
    needed.dedup();
    if let Some(c) = check(card, rows.to_vec())? {
        for r in &c.keys {
            card.hold_storage_key(r.version, &r.bytes)?;
        }
        card.set_storage_key_version(c.head.current)?;
        db.transaction(&mut |tx| {
            for r in tx.keyring()? {
                tx.delete_keyring(r.version)?;
            }
            for r in rows {
                tx.insert_keyring(r)?;
            }
            Ok(())
        })?;
    }
    let mut have = match check(card, read_rows(db)?)? {
        Some(c) => c.head.versions,
        None => Vec::new(),
    };
    if let Some((_, keys)) = card.legacy_storage_keys()? {
        have.extend(keys.iter().map(|(v, _)| *v));
    }
    have.extend(card.resident_storage_keys());
    let missing: Vec<u32> = needed
        .iter()
        .copied()
        .filter(|v| !have.contains(v))
        .collect();
    let wrong: Vec<u32> = needed
        .iter()
        .copied()
        .filter(|v| have.contains(v))
        .filter(|v| {
            seeds
                .iter()
                .find(|s| s.kstore_version == *v && s.ciphertext.is_some())
                .and_then(|s| {
                    let ct = s.ciphertext.as_ref()?;
                    Some(card.unseal_seed(s.device, s.generation, *v, &ct.0).is_err())
                })
                .unwrap_or(false)
        })
        .collect();
    if !missing.is_empty() || !wrong.is_empty() {
        let mut bad = missing;
        bad.extend(wrong);
        bad.sort_unstable();
        return Err(Error::Keyring(format!(
            "the backup's seeds are sealed under storage key versions {bad:?}, which neither its \
             keyring nor this card holds: restore a backup made with its keyring (or with the \
             card file from before the keyring)"
        )));
    }
    Ok(())
}

/// One leader for the periodic jobs (see the module docs).
#[derive(Debug)]
pub struct Leader {
    db: Arc<dyn KeyDatabase>,
    card: Arc<dyn EncryptionCard>,
    name: String,
    holder: String,
    period: Duration,
    leading: Mutex<bool>,
}

fn lease_tag(
    card: &dyn EncryptionCard,
    name: &str,
    holder: &str,
    expires_ms: u64,
) -> Result<Vec<u8>> {
    let mut m = Vec::new();
    m.extend_from_slice(LEASE_DOMAIN);
    m.extend_from_slice(&(name.len() as u32).to_be_bytes());
    m.extend_from_slice(name.as_bytes());
    m.extend_from_slice(&(holder.len() as u32).to_be_bytes());
    m.extend_from_slice(holder.as_bytes());
    m.extend_from_slice(&expires_ms.to_be_bytes());
    Ok(card.record_tag(&m)?.to_vec())
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Leader {
    /// The lease `name` on `db` for a holder with a random id, lapsing
    /// `period` after the last renewal.
    pub fn new(
        db: Arc<dyn KeyDatabase>,
        card: Arc<dyn EncryptionCard>,
        name: &str,
        period: Duration,
    ) -> Result<Leader> {
        let mut id = [0u8; 8];
        card.random(&mut id)?;
        Ok(Leader {
            db,
            card,
            name: name.to_owned(),
            holder: hex::encode(id),
            period: period.max(Duration::from_millis(100)),
            leading: Mutex::new(false),
        })
    }

    /// This process's holder id.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Takes or renews the lease at `now_ms`; whether this process leads.
    /// A lease held by another holder, tagged and not lapsed, is left
    /// alone; a lapsed one, one whose tag fails, or one that claims more
    /// than one period ahead is taken.
    pub fn poll(&self, now_ms: u64) -> Result<bool> {
        let db = raw(&self.db);
        let card = &*self.card;
        let period = self.period.as_millis() as u64;
        let cur = db.lease(&self.name)?;
        let free = match &cur {
            None => true,
            Some(l) if l.holder == self.holder => true,
            Some(l) => {
                let tag_ok = lease_tag(card, &l.name, &l.holder, l.expires_ms)
                    .map(|t| bool::from(t.ct_eq(&l.tag)))
                    .unwrap_or(false);
                if !tag_ok {
                    tracing::warn!(lease = %self.name, "a lease row fails its card tag: taken over");
                    true
                } else if l.expires_ms > now_ms.saturating_add(period) {
                    tracing::warn!(lease = %self.name, "a lease claims more than one period ahead: taken over");
                    true
                } else {
                    l.expires_ms <= now_ms
                }
            }
        };
        let won = if free {
            let expires_ms = now_ms.saturating_add(period);
            let new = LeaseRow {
                name: self.name.clone(),
                holder: self.holder.clone(),
                expires_ms,
                tag: lease_tag(card, &self.name, &self.holder, expires_ms)?,
            };
            db.swap_lease(cur.as_ref(), &new)?
        } else {
            false
        };
        let mut leading = self.leading.lock().unwrap_or_else(PoisonError::into_inner);
        if won != *leading {
            if won {
                tracing::info!(lease = %self.name, holder = %self.holder, "this center now runs the periodic jobs");
            } else {
                tracing::info!(lease = %self.name, "another center runs the periodic jobs");
            }
        }
        *leading = won;
        Ok(won)
    }

    /// Whether this process led at the last poll.
    pub fn is_leader(&self) -> bool {
        *self.leading.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives the lease up (a clean stop), so another center takes it at
    /// once instead of after it lapses.
    pub fn release(&self) -> Result<()> {
        let db = raw(&self.db);
        if let Some(l) = db.lease(&self.name)?
            && l.holder == self.holder
        {
            let new = LeaseRow {
                expires_ms: 0,
                tag: lease_tag(&*self.card, &self.name, &self.holder, 0)?,
                ..l.clone()
            };
            db.swap_lease(Some(&l), &new)?;
        }
        *self.leading.lock().unwrap_or_else(PoisonError::into_inner) = false;
        Ok(())
    }
}
