//! The key database: what the center stores (PROTOCOL.md section 7) behind
//! a trait, so a backend (SQLite here, PostgreSQL later) plugs in without
//! the services knowing which.
//!
//! Every service call runs in one [`KeyDatabase::transaction`] (the one
//! exception: the record that makes an accepted AUTH, SEALED or
//! AUTH_RESPONSE count once is group-committed, several concurrent calls'
//! independent insert-if-absent records sharing one transaction): the service
//! passes a closure that reads and writes through [`Tx`], whose methods are
//! at the level of records ("the device", "its seeds", "record this replay
//! if absent"), never SQL. The closure may be run more than once (a
//! PostgreSQL backend retries serialization failures), so it must not have
//! effects outside the transaction other than computing values; the
//! services only touch their caches after the transaction has committed.
//!
//! What a backend must guarantee:
//! - a transaction is atomic and durable when `transaction` returns `Ok`;
//! - [`Tx::device`] locks the device row for the rest of the transaction
//!   (SQLite: one writer at a time; PostgreSQL: `SELECT ... FOR UPDATE`), so
//!   two centers cannot both commit changes to one device from the same
//!   prior state;
//! - [`Tx::record_replay`] and [`Tx::spend_challenge`] are atomic
//!   insert-if-absent under a unique constraint across every center sharing
//!   the database;
//! - [`Tx::append_audit`] chains the entry to the one before it
//!   ([`crate::audit::chain_hash`]), serialised across writers.

#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[macro_use]
mod schema;

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "postgres")]
pub use postgres::{PostgresDatabase, PostgresOptions};
/// The SQLite driver's error, the source of [`crate::Error::Sqlite`].
pub use rusqlite::Error as SqliteError;
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteDatabase, SqliteOptions};

use std::fmt;
use std::sync::Arc;

use microcert_core::{DeviceId, KeyState, Suite};

use crate::card::EnrollVia;
use crate::{DbFailure, Error, Result};

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    /// The EUI-64.
    pub id: DeviceId,
    /// RFC 7228 class (1..=3), which selects the profile.
    pub class: u8,
    /// The suite recorded at registration from the class profile.
    pub suite: Suite,
    /// Personalization count of the chip (Ktr(device, epoch)).
    pub epoch: u8,
    /// Whether an ENROLL under Ktr(device, epoch) is accepted now.
    pub transport_open: bool,
    /// Registration time.
    pub created: u64,
    /// Highest generation ever enrolled, None before the first.
    pub highest_generation: Option<u8>,
    /// The last COMMAND counter used; never decreases.
    pub command_counter: u32,
    /// Integrity tag by the card over [`crate::integrity::device_bytes`]
    /// (the services set it on every write and check it on every read).
    pub tag: [u8; 32],
}

/// Bytes stored as-is whose content does not belong in logs.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Blob(pub Vec<u8>);

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

/// One seed (device, generation) and its life-cycle attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedRow {
    /// The device.
    pub device: DeviceId,
    /// The seed's generation.
    pub generation: u8,
    /// Life-cycle state.
    pub state: KeyState,
    /// Calendar year of the seed's first year row.
    pub base_year: u16,
    /// The device's suite when enrolled.
    pub suite: Suite,
    /// Kstore version of the ciphertext.
    pub kstore_version: u32,
    /// AES-256-GCM ciphertext under Kstore; None once destroyed (or when a
    /// query left it out).
    pub ciphertext: Option<Blob>,
    /// Integrity tag by the card over [`crate::integrity::record_bytes`].
    pub tag: [u8; 32],
    /// Which key the ENROLL came under.
    pub via: EnrollVia,
    /// t of the ENROLL.
    pub enroll_t: u32,
    /// r of the ENROLL.
    pub enroll_r: u64,
    /// SHA-256 of the ENROLL bytes: a byte-identical retransmission is
    /// recognised by it.
    pub enroll_digest: [u8; 32],
    /// The RECEIPT the center answered the ENROLL with (served again for a
    /// retransmission).
    pub receipt: Blob,
    /// Enrollment time.
    pub created: u64,
    /// When it became Active.
    pub activated_at: Option<u64>,
    /// When last suspended.
    pub suspended_at: Option<u64>,
    /// When deactivated.
    pub deactivated_at: Option<u64>,
    /// When revoked (signatures notarised before this stay valid).
    pub compromised_at: Option<u64>,
    /// When destroyed.
    pub destroyed_at: Option<u64>,
    /// For the previous generation during a seed update: it keeps verifying
    /// until this time or until the new generation is first used.
    pub grace_until: Option<u64>,
}

/// A seed record's life-cycle times ([`SeedRow`]'s `created` to
/// `grace_until`), as backups and the operator API write them (flattened
/// into their JSON objects). Made with [`SeedTimes::of`], put back with
/// [`SeedTimes::set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeedTimes {
    created: u64,
    activated_at: Option<u64>,
    suspended_at: Option<u64>,
    deactivated_at: Option<u64>,
    compromised_at: Option<u64>,
    destroyed_at: Option<u64>,
    grace_until: Option<u64>,
}

impl SeedTimes {
    /// The times of `s`.
    pub fn of(s: &SeedRow) -> Self {
        SeedTimes {
            created: s.created,
            activated_at: s.activated_at,
            suspended_at: s.suspended_at,
            deactivated_at: s.deactivated_at,
            compromised_at: s.compromised_at,
            destroyed_at: s.destroyed_at,
            grace_until: s.grace_until,
        }
    }

    /// Writes these times into `s`.
    pub fn set(&self, s: &mut SeedRow) {
        s.created = self.created;
        s.activated_at = self.activated_at;
        s.suspended_at = self.suspended_at;
        s.deactivated_at = self.deactivated_at;
        s.compromised_at = self.compromised_at;
        s.destroyed_at = self.destroyed_at;
        s.grace_until = self.grace_until;
    }
}

/// A device and its seeds (ascending generation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    /// The device.
    pub device: DeviceRow,
    /// Its seeds; ciphertexts are left out by operator queries.
    pub seeds: Vec<SeedRow>,
}

impl DeviceView {
    /// The seed of the highest generation.
    pub fn current(&self) -> Option<&SeedRow> {
        self.seeds.last()
    }
}

/// A COMMAND in a device's outbox: the latest one; pending until answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRow {
    /// The device.
    pub device: DeviceId,
    /// The command's counter.
    pub counter: u32,
    /// Opcode byte (1 UPDATE_SEED, 2 REVOKE).
    pub opcode: u8,
    /// Generation of the seed that keys it.
    pub generation: u8,
    /// r of its header: a node's RECEIPT refers to it.
    pub r: u64,
    /// The COMMAND bytes, served unchanged until answered.
    pub bytes: Blob,
    /// When built.
    pub created: u64,
    /// When the node's RECEIPT was accepted.
    pub answered_at: Option<u64>,
    /// The status of that RECEIPT.
    pub status: Option<u8>,
}

/// A SIGNATURE the center verified, as a notary records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotaryRow {
    /// The device.
    pub device: DeviceId,
    /// The seed's generation.
    pub generation: u8,
    /// t of the signature.
    pub t: u32,
    /// r of the signature.
    pub r: u64,
    /// SHA-256 of the signed data.
    pub digest: [u8; 32],
    /// The signature's tag.
    pub tag: Vec<u8>,
    /// When the center first verified it.
    pub first_seen: u64,
    /// The card's tag over [`crate::integrity::notary_bytes`] (domain
    /// "MC-REC", bytes "MC-NOT-v1" ...): None for a row written before the
    /// tag existed (refused until the upgrade tags it). Set by the center's
    /// sealing layer ([`crate::integrity::Sealed`]), not by callers.
    pub seal: Option<[u8; 32]>,
}

/// One shard of the database digest (see [`crate::integrity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestShard {
    /// Shard number.
    pub shard: u8,
    /// XOR of the integrity tags of the shard's seed records.
    pub acc: [u8; 32],
    /// Number of records in the shard.
    pub count: u64,
    /// Number of changes ever applied to the shard.
    pub seq: u64,
    /// The card's tag over (shard, acc, count, seq).
    pub tag: [u8; 32],
}

/// An audit entry to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAudit {
    /// When.
    pub time: u64,
    /// Who: "center" for the center's own decisions, "import", or an
    /// operator's token name.
    pub actor: String,
    /// What, e.g. "enroll", "revoke", "suspend".
    pub action: String,
    /// The device concerned, if any.
    pub device: Option<DeviceId>,
    /// The generation concerned, if any.
    pub generation: Option<u8>,
    /// Why (free text, never key material).
    pub reason: String,
}

impl NewAudit {
    /// An entry of `actor` doing `action` at `time`, about no device,
    /// with no reason.
    pub fn new(time: u64, actor: impl Into<String>, action: impl Into<String>) -> Self {
        NewAudit {
            time,
            actor: actor.into(),
            action: action.into(),
            device: None,
            generation: None,
            reason: String::new(),
        }
    }

    /// The device (and the generation) concerned.
    pub fn on(mut self, device: Option<DeviceId>, generation: Option<u8>) -> Self {
        self.device = device;
        self.generation = generation;
        self
    }

    /// Why (free text, never key material).
    pub fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = reason.into();
        self
    }
}

/// A stored audit entry with its place in the hash chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Position in the log, from 1.
    pub seq: u64,
    /// The entry.
    pub entry: NewAudit,
    /// Hash of the previous entry (0^32 for the first).
    pub prev_hash: [u8; 32],
    /// SHA-256 chain hash of this entry ([`crate::audit::chain_hash`]).
    pub hash: [u8; 32],
}

/// Filters and paging for the operator's device list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceQuery {
    /// Only devices whose current seed is in this state.
    pub state: Option<KeyState>,
    /// Only devices of this class.
    pub class: Option<u8>,
    /// Only devices whose current seed's last year is at most this year
    /// (seed expiry filter).
    pub last_year_at_most: Option<u16>,
    /// Keyset paging: only devices with an id above this one.
    pub after: Option<DeviceId>,
    /// Page size (0 means 100).
    pub limit: usize,
}

/// The high-water of pruning: the highest `now` any center has pruned
/// replay records and spent challenges by. A replay record or challenge
/// expiring before it is refused at insertion ([`Tx::record_replay`],
/// [`Tx::spend_challenge`] answer false): its earlier copy may have been
/// pruned, so a center whose clock stepped backwards cannot accept it
/// again (PROTOCOL.md section 6, v1.1).
pub const MARK_PRUNED: &str = "pruned";

/// The highest wall-clock time any center has seen (its housekeeping):
/// a time well below it is a clock stepped backwards
/// ([`crate::clock::ClockWatch`]).
pub const MARK_CLOCK: &str = "clock";

/// A bearer token of the operator API (issue 14: tokens live in the key
/// database, shared by every center). Never the token itself: its SHA-256.
/// `hash`, `name`, `role`, `created`, `expires` and `revoked` decide what
/// the token may do and are covered by `tag` (a card tag, domain
/// "MC-TOKEN-v1", [`crate::tokens::token_bytes`]); `last_used` and `failures` are
/// bookkeeping and are not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// SHA-256 of the token, lowercase hex (the primary key).
    pub hash: String,
    /// Who holds it; for a verifier, the relying party's name.
    pub name: String,
    /// Its role's name ("admin", "operator", "auditor", "verifier").
    pub role: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds from which it is refused; None: never.
    pub expires: Option<u64>,
    /// Unix seconds it was revoked at; None: not revoked.
    pub revoked: Option<u64>,
    /// Unix seconds it was last accepted (approximate: written at most
    /// about once a second per center).
    pub last_used: Option<u64>,
    /// How many times it was presented and refused (revoked or expired).
    pub failures: u64,
    /// The card tag over the decision-bearing fields.
    pub tag: Vec<u8>,
}

/// Calls `f` with every device, a page of at most `limit` at a time, in
/// id order.
pub fn device_pages(
    db: &dyn KeyDatabase,
    limit: usize,
    mut f: impl FnMut(Vec<DeviceView>) -> Result<()>,
) -> Result<()> {
    let mut after = None;
    loop {
        let page = db.list_devices(&DeviceQuery {
            after,
            limit,
            ..DeviceQuery::default()
        })?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = Some(last.device.id);
        f(page)?;
    }
}

/// The error of a rewrite that found no row to rewrite: `n` is the count
/// of rows it changed, `what` names the record.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn one_row(n: u64, what: impl FnOnce() -> String) -> Result<()> {
    if n != 1 {
        return Err(Error::db(
            DbFailure::Corrupt,
            format!("{} not found", what()),
        ));
    }
    Ok(())
}

/// A record that makes a message count once, as stored in database replay
/// mode: an accepted AUTH or SEALED, or a spent challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplayRow {
    /// (device, generation, t, r) of an AUTH or SEALED.
    Replay {
        /// The device.
        device: DeviceId,
        /// The seed's generation.
        generation: u8,
        /// t of the message.
        t: u32,
        /// r of the message.
        r: u64,
        /// When it may be pruned.
        expires: u64,
    },
    /// (device, c) of a spent challenge.
    Challenge {
        /// The device.
        device: DeviceId,
        /// The challenge.
        c: [u8; 8],
        /// When it may be pruned.
        expires: u64,
    },
}

impl ReplayRow {
    /// The device of the record.
    pub fn device(&self) -> DeviceId {
        match *self {
            ReplayRow::Replay { device, .. } | ReplayRow::Challenge { device, .. } => device,
        }
    }

    /// When it may be pruned.
    pub fn expires(&self) -> u64 {
        match *self {
            ReplayRow::Replay { expires, .. } | ReplayRow::Challenge { expires, .. } => expires,
        }
    }
}

/// How far a batch file was imported ([`Tx::set_import_progress_sealed`]).
#[derive(Debug, Clone, Copy)]
pub struct ImportMark<'a> {
    /// The batch file's SHA-256.
    pub file: &'a [u8; 32],
    /// The next line to import.
    pub next_line: u64,
    /// When.
    pub now: u64,
    /// The card tag over [`crate::integrity::import_bytes`], if any.
    pub seal: Option<&'a [u8; 32]>,
}

/// A notary record's key: (device, generation, t, r, digest).
pub type NotaryKey<'a> = (DeviceId, u8, u32, u64, &'a [u8; 32]);

/// A replay record's key and lifetime: (device, generation, t, r,
/// expires).
pub type ReplayKey = (DeviceId, u8, u32, u64, u64);

/// The accumulator of one device's live replay records and spent
/// challenges (gap 2: a record deleted from outside is found when the
/// device's next record is inserted): the XOR of a card-keyed MAC of each
/// live record, their count, the latest expiry ever added, and a
/// card-keyed tag over all of them ([`crate::integrity::Sealed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayAcc {
    /// The device.
    pub device: DeviceId,
    /// XOR of the MACs of the live records.
    pub acc: [u8; 32],
    /// Number of live records.
    pub count: u64,
    /// The latest `expires` of any record ever added.
    pub max_expires: u64,
    /// The tag over (device, acc, count, max_expires).
    pub tag: [u8; 32],
}

/// A row of the keyring (issue 14: storage-key versions in the key
/// database, [`crate::keyring`]). `version` 0 is the head (which version is
/// current, the live versions, an epoch that only grows); any other version
/// holds that Kstore version wrapped under the card's root key. `tag` is a
/// card tag over version and bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyringRow {
    /// The Kstore version, or 0 for the head.
    pub version: u32,
    /// The wrapped key (AES-KW, RFC 3394) or the head's encoding.
    pub bytes: Vec<u8>,
    /// The card tag over version and bytes.
    pub tag: Vec<u8>,
}

impl fmt::Debug for KeyringRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyringRow")
            .field("version", &self.version)
            .field("len", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

/// A lease on a job shared by several centers (issue 14: one leader runs
/// the periodic jobs, [`crate::keyring::Leader`]): who holds it and until
/// when, with a card tag over the three.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// The lease's name.
    pub name: String,
    /// The holder's id (random per process).
    pub holder: String,
    /// Unix milliseconds at which it lapses unless renewed.
    pub expires_ms: u64,
    /// The card tag over name, holder and expiry.
    pub tag: Vec<u8>,
}

/// Reads and writes inside one transaction.
pub trait Tx {
    /// Every keyring row, by version (issue 14). The default refuses.
    fn keyring(&mut self) -> Result<Vec<KeyringRow>> {
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no keyring",
        ))
    }

    /// Inserts a keyring row; fails when its version is already stored.
    fn insert_keyring(&mut self, r: &KeyringRow) -> Result<()> {
        let _ = r;
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no keyring",
        ))
    }

    /// Replaces the bytes and tag of a stored keyring row when they are
    /// still `old_tag` (compare and swap); false when they changed.
    fn update_keyring(&mut self, r: &KeyringRow, old_tag: &[u8]) -> Result<bool> {
        let _ = (r, old_tag);
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no keyring",
        ))
    }

    /// Deletes a keyring row; whether it was there.
    fn delete_keyring(&mut self, version: u32) -> Result<bool> {
        let _ = version;
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no keyring",
        ))
    }

    /// Every stored token (issue 14). The default refuses.
    fn tokens(&mut self) -> Result<Vec<TokenRow>> {
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no tokens",
        ))
    }

    /// Inserts a token; fails when its hash is already stored.
    fn insert_token(&mut self, t: &TokenRow) -> Result<()> {
        let _ = t;
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no tokens",
        ))
    }

    /// Rewrites a stored token's expiry, revocation and tag.
    fn update_token(&mut self, t: &TokenRow) -> Result<()> {
        let _ = t;
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no tokens",
        ))
    }

    /// The device row, locked for the rest of the transaction.
    fn device(&mut self, id: DeviceId) -> Result<Option<DeviceRow>>;
    /// Inserts a new device (fails if it exists).
    fn insert_device(&mut self, d: &DeviceRow) -> Result<()>;
    /// Rewrites a device row.
    fn update_device(&mut self, d: &DeviceRow) -> Result<()>;
    /// Every seed of a device, ascending generation, with ciphertexts.
    fn seeds(&mut self, id: DeviceId) -> Result<Vec<SeedRow>>;
    /// The seed enrolled by the ENROLL with this (t, r), if any.
    fn seed_by_enroll_nonce(&mut self, id: DeviceId, t: u32, r: u64) -> Result<Option<SeedRow>>;
    /// Inserts a new seed record.
    fn insert_seed(&mut self, s: &SeedRow) -> Result<()>;
    /// Rewrites a seed record (state, timestamps, tag, ciphertext).
    fn update_seed(&mut self, s: &SeedRow) -> Result<()>;
    /// Records (device, generation, t, r) as accepted until `expires`;
    /// false when it already was (a replay).
    fn record_replay(&mut self, rec: ReplayKey) -> Result<bool>;
    /// Records challenge c of a device as used; false when it already was.
    fn spend_challenge(&mut self, id: DeviceId, c: &[u8; 8], expires: u64) -> Result<bool>;
    /// A named high-water mark shared by every center on the database
    /// (see [`MARK_PRUNED`]): its value and card tag, None if never set.
    fn high_water(&mut self, name: &str) -> Result<Option<(u64, Vec<u8>)>>;
    /// Writes a named high-water mark with its card tag.
    fn set_high_water(&mut self, name: &str, value: u64, tag: &[u8]) -> Result<()>;
    /// Records a verified signature unless already recorded; returns the
    /// stored record (with the first first_seen) and whether this call
    /// inserted it.
    fn notarize(&mut self, n: &NotaryRow) -> Result<(NotaryRow, bool)> {
        let inserted = self.insert_notary(n)?;
        let stored = self
            .notary((n.device, n.generation, n.t, n.r, &n.digest))?
            .ok_or_else(|| Error::db(DbFailure::Corrupt, "notary record vanished"))?;
        Ok((stored, inserted))
    }
    /// Inserts a notary record unless one of the same signature exists;
    /// whether it did ([`Tx::notarize`] is the one to call).
    fn insert_notary(&mut self, n: &NotaryRow) -> Result<bool>;
    /// A notary record of exactly this signature.
    fn notary(&mut self, key: NotaryKey<'_>) -> Result<Option<NotaryRow>>;
    /// Replaces a seed record's tag (the one-time upgrade of records tagged
    /// over fewer columns, [`crate::integrity::upgrade_legacy`]).
    fn set_seed_tag(&mut self, id: DeviceId, generation: u8, tag: &[u8; 32]) -> Result<()> {
        let _ = (id, generation, tag);
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database cannot re-tag seed records",
        ))
    }
    /// Sets the seal of an existing notary record (the one-time upgrade of
    /// rows written before seals existed, [`crate::integrity::upgrade_legacy`]).
    fn set_notary_seal(&mut self, n: &NotaryRow) -> Result<()> {
        let _ = n;
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database cannot seal notary records",
        ))
    }
    /// The device's latest command, pending or answered.
    fn command(&mut self, id: DeviceId) -> Result<Option<CommandRow>> {
        Ok(self.command_sealed(id)?.map(|(c, _)| c))
    }
    /// Stores the device's latest command (replacing the previous one).
    /// The center's sealing layer ([`crate::integrity::Sealed`]) replaces
    /// this with [`Tx::put_command_sealed`] and the card's tag.
    fn put_command(&mut self, c: &CommandRow) -> Result<()> {
        self.put_command_sealed(c, None)
    }
    /// The device's latest command with its card tag over
    /// [`crate::integrity::command_bytes`] (None: written without one).
    fn command_sealed(&mut self, id: DeviceId) -> Result<Option<(CommandRow, Option<[u8; 32]>)>>;
    /// Stores the device's latest command with its card tag.
    fn put_command_sealed(&mut self, c: &CommandRow, seal: Option<&[u8; 32]>) -> Result<()>;
    /// A digest shard, None if never written.
    fn digest_shard(&mut self, shard: u8) -> Result<Option<DigestShard>>;
    /// Writes a digest shard.
    fn put_digest_shard(&mut self, s: &DigestShard) -> Result<()>;
    /// Appends an audit entry to the hash chain.
    fn append_audit(&mut self, e: &NewAudit) -> Result<()>;
    /// Hands entries just appended (with their chain hashes) to the
    /// configured second audit sink before the transaction commits; an
    /// error refuses the change (the transaction rolls back). The
    /// backends keep no sink: the center's sealing layer does
    /// ([`crate::integrity::Sealed`], [`KeyDatabase::set_audit_sink`]).
    fn audit_sink_record(&mut self, _entries: &[AuditRecord]) -> Result<()> {
        Ok(())
    }
    /// Deletes the audit entries with seq <= `through` (an archive moved
    /// them out, [`crate::audit::archive`]); returns how many.
    fn delete_audit_through(&mut self, through: u64) -> Result<u64>;
    /// Deletes a notary record (an archive moved it out,
    /// [`Center::archive_notary`](crate::Center::archive_notary)); false
    /// when there was none.
    fn delete_notary(&mut self, n: &NotaryRow) -> Result<bool>;
    /// Inserts an audit entry as it is (its seq and hashes kept): a
    /// restore of a backup whose log starts after an archive checkpoint.
    fn insert_audit_record(&mut self, r: &AuditRecord) -> Result<()>;
    /// The next line to import of the batch file with this SHA-256.
    fn import_progress(&mut self, file: &[u8; 32]) -> Result<Option<u64>> {
        Ok(self.import_progress_sealed(file)?.map(|(n, _)| n))
    }
    /// Records how far a batch file was imported.
    fn set_import_progress(&mut self, file: &[u8; 32], next_line: u64, now: u64) -> Result<()> {
        self.set_import_progress_sealed(&ImportMark {
            file,
            next_line,
            now,
            seal: None,
        })
    }
    /// The next line to import with its card tag over
    /// [`crate::integrity::import_bytes`].
    fn import_progress_sealed(
        &mut self,
        file: &[u8; 32],
    ) -> Result<Option<(u64, Option<[u8; 32]>)>>;
    /// Records how far a batch file was imported, with its card tag.
    fn set_import_progress_sealed(&mut self, p: &ImportMark<'_>) -> Result<()>;

    /// Deletes a seed record: only `integrity repair` does, to remove a
    /// row inserted outside the center or to put back a backup's copy
    /// (delete, then [`Tx::insert_seed`]). Returns whether it existed.
    ///
    /// Added for repair (issue 5); the PostgreSQL backend must implement
    /// it too (the default refuses, so repair fails clearly there).
    fn delete_seed(&mut self, id: DeviceId, generation: u8) -> Result<bool> {
        let _ = (id, generation);
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database cannot delete a seed record for repair",
        ))
    }

    /// Several [`Tx::record_replay`]s at once (the group commit's batch):
    /// for each (device, generation, t, r, expires), whether it was
    /// inserted. The default calls `record_replay` for each; PostgreSQL
    /// sends one statement. (Added for issue 14, PostgreSQL at speed.)
    fn record_replays(&mut self, rows: &[ReplayKey]) -> Result<Vec<bool>> {
        rows.iter().map(|&rec| self.record_replay(rec)).collect()
    }

    /// As [`Tx::record_replays`], also refusing (answering false for) a
    /// record that expires before `floor` (the pruning high-water the
    /// caller read and checked), whatever the stored mark says.
    fn record_replays_above(&mut self, rows: &[ReplayKey], floor: u64) -> Result<Vec<bool>> {
        let _ = (rows, floor);
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database cannot check replay records against a floor",
        ))
    }

    /// As [`Tx::spend_challenge`] of device `d`, challenge `c` expiring at
    /// `e`, also refusing a challenge that expires before `m` (the pruning
    /// floor the caller checked).
    fn spend_challenge_above(&mut self, d: DeviceId, c: &[u8; 8], e: u64, m: u64) -> Result<bool> {
        let _ = (d, c, e, m);
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database cannot check challenges against a floor",
        ))
    }

    /// A named mark read without a lock (the hot path's read of the
    /// pruning high-water). The default is [`Tx::high_water`].
    fn read_mark(&mut self, name: &str) -> Result<Option<(u64, Vec<u8>)>> {
        self.high_water(name)
    }

    /// Every shared mark, (name, value, tag), as this transaction sees
    /// them.
    fn marks(&mut self) -> Result<Vec<(String, u64, Vec<u8>)>> {
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no marks",
        ))
    }

    /// Every stored replay record and spent challenge of these devices.
    fn replay_rows(&mut self, ids: &[DeviceId]) -> Result<Vec<ReplayRow>> {
        let _ = ids;
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no replay accumulators",
        ))
    }

    /// The replay accumulators of these devices (`ids` ascending), locked
    /// for the rest of the transaction; an absent one is not returned.
    fn replay_accs(&mut self, ids: &[DeviceId]) -> Result<Vec<ReplayAcc>> {
        let _ = ids;
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no replay accumulators",
        ))
    }

    /// Writes (inserts or replaces) replay accumulators.
    fn put_replay_accs(&mut self, accs: &[ReplayAcc]) -> Result<()> {
        let _ = accs;
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no replay accumulators",
        ))
    }

    /// Deletes at most `limit` replay records and spent challenges that
    /// expired before `now` and returns them.
    fn prune_replay_rows(&mut self, now: u64, limit: usize) -> Result<Vec<ReplayRow>> {
        let _ = (now, limit);
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no replay accumulators",
        ))
    }

    /// A hint that [`Tx::device`] is about to be called for each of `ids`
    /// (an import chunk): a backend may read them all at once. The default
    /// does nothing; PostgreSQL reads them in one `FOR UPDATE` statement.
    /// (Added for issue 14, PostgreSQL at speed.)
    fn prefetch_devices(&mut self, ids: &[DeviceId]) -> Result<()> {
        let _ = ids;
        Ok(())
    }
}

/// A key database backend.
pub trait KeyDatabase: Send + Sync + fmt::Debug {
    /// Runs `f` in one transaction: commits when it returns `Ok`, rolls back
    /// when it returns `Err` (which is passed on).
    fn transaction(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<()>) -> Result<()>;

    /// A device and its seeds (without ciphertexts), for operators.
    fn device_view(&self, id: DeviceId) -> Result<Option<DeviceView>>;

    /// Devices with their current seed (without ciphertext), ordered by id.
    fn list_devices(&self, q: &DeviceQuery) -> Result<Vec<DeviceView>>;

    /// Devices whose current seed is Active, has a base year of at most
    /// `y`, and that have no pending command; ordered by id,
    /// after `after`, at most `limit`.
    fn devices_due(&self, y: u16, after: Option<DeviceId>, limit: usize) -> Result<Vec<DeviceId>>;

    /// Devices with a seed whose grace period ended before `now` and that
    /// is still Active, or an Active seed whose last year ended before `now`.
    fn devices_to_expire(&self, now: u64, year_now: u16, limit: usize) -> Result<Vec<DeviceId>>;

    /// Seed records in (device, generation) order after `after`, with
    /// ciphertexts: the integrity scan.
    fn scan_seeds(&self, after: Option<(DeviceId, u8)>, limit: usize) -> Result<Vec<SeedRow>>;

    /// Every digest shard written so far.
    fn digest_shards(&self) -> Result<Vec<DigestShard>>;

    /// Audit entries with seq above `after`, at most `limit`.
    fn audit_log(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>>;

    /// Deletes replay records and used challenges that expired before
    /// `now`; returns how many. The caller first raises the
    /// [`MARK_PRUNED`] high-water to at least `now`, so that no record
    /// expiring before it is ever inserted again.
    fn prune(&self, now: u64) -> Result<u64>;

    /// Notary records in (device, generation, t, r, digest) order after
    /// `after`, at most `limit`: for backups (issue 5).
    ///
    /// Added for backups; the PostgreSQL backend must implement it too
    /// (the default refuses, so a backup on a backend without it fails
    /// with a clear error instead of silently leaving the notary out).
    fn scan_notary(&self, after: Option<&NotaryRow>, limit: usize) -> Result<Vec<NotaryRow>> {
        let _ = (after, limit);
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database cannot list notary records for a backup",
        ))
    }

    /// Every device's latest command with its card tag, in device order
    /// after `after`, at most `limit`: the integrity scan.
    fn scan_commands(
        &self,
        after: Option<DeviceId>,
        limit: usize,
    ) -> Result<Vec<(CommandRow, Option<[u8; 32]>)>> {
        let _ = (after, limit);
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database cannot list commands for the integrity scan",
        ))
    }

    /// The database under the center's sealing layer
    /// ([`crate::integrity::Sealed`]); None when this is not one.
    fn unsealed(&self) -> Option<&dyn KeyDatabase> {
        None
    }

    /// Sets the second audit sink every audit append of this database's
    /// transactions writes to before it commits (once; false when this
    /// database keeps no sink: only the center's sealing layer does).
    fn set_audit_sink(&self, _sink: Arc<dyn crate::audit::AuditSink>) -> bool {
        false
    }

    /// The schema version this process found before it migrated the
    /// database in this open (None when it migrated nothing): the center
    /// tags rows written before the card covered them only right after
    /// the migration that added their tag columns (see
    /// [`crate::integrity::upgrade_legacy`]).
    fn migrated_from(&self) -> Option<u32> {
        None
    }

    /// Makes erased data (a destroyed ciphertext) leave the storage files
    /// as far as the backend can (SQLite: a WAL checkpoint that truncates
    /// the log; with secure_delete on, freed pages are already zeroed).
    fn flush_erased(&self) -> Result<()>;

    /// Runs `f` in a transaction that only reads, for requests that are
    /// not yet authenticated (an ENROLL before its MAC verified, a read of
    /// the command outbox): SQLite opens it deferred, so it takes no write
    /// lock and never waits for another writer. The default is
    /// [`KeyDatabase::transaction`] (PostgreSQL: a transaction that wrote
    /// nothing ends with ROLLBACK). `f` must not write.
    fn read_transaction(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<()>) -> Result<()> {
        self.transaction(f)
    }

    /// Asks the backend to call `on_change(Some(device))` whenever another
    /// process (another center) commits a change to that device's records,
    /// and `on_change(None)` when it may have missed changes (anything may
    /// have changed): the center drops cached seeds on it, so a change made
    /// by another center is seen at once instead of after the cache TTL.
    /// PostgreSQL: LISTEN/NOTIFY. The default does nothing (the cache TTL
    /// remains the bound).
    fn watch_changes(&self, on_change: ChangeHook) -> Result<()> {
        let _ = on_change;
        Ok(())
    }

    /// Runs `f` over a read-only view of the database as of one moment
    /// (`Some(view)`), so a scan made of many reads (the integrity scan:
    /// every record page, then the digest shards) sees no commit of a
    /// concurrent writer half way. PostgreSQL: one REPEATABLE READ READ
    /// ONLY transaction on one connection. The default passes `None`: read
    /// the database itself (right when nothing else writes meanwhile).
    /// Call it through [`with_snapshot`].
    fn read_snapshot(
        &self,
        f: &mut dyn FnMut(Option<&dyn KeyDatabase>) -> Result<()>,
    ) -> Result<()> {
        f(None)
    }

    /// A value of the database's key/value metadata (migration "meta"):
    /// `database_id` (the database's identity, a random id drawn at its
    /// creation) and what the CLI records there (the id of the card last
    /// used with it). None when the key was never written.
    ///
    /// Added for issue 14 (one configuration for every command); the
    /// default refuses, so a backend without it fails clearly instead of
    /// passing for a database without an identity.
    fn meta(&self, key: &str) -> Result<Option<String>> {
        let _ = key;
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no metadata (database identity)",
        ))
    }

    /// Writes (inserts or replaces) a metadata value (see [`KeyDatabase::meta`]).
    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let _ = (key, value);
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no metadata (database identity)",
        ))
    }

    /// A device and its seeds read outside any write transaction, where
    /// the backend has such a path (SQLite: a read transaction that never
    /// waits for a writer), for the verification path's cache misses. The
    /// default is None: the caller reads in a transaction. Tags are not
    /// checked here (the caller checks them).
    fn read_device_unlocked(&self, id: DeviceId) -> Option<Result<DeviceRecords>> {
        let _ = id;
        None
    }

    /// A hint that many writes follow (a batch import) or that they ended.
    /// Durability must not change; the default ignores it.
    fn set_bulk(&self, on: bool) -> Result<()> {
        let _ = on;
        Ok(())
    }

    /// The local file the database is, when it is one (SQLite): where the
    /// in-memory replay guard keeps its state beside it. None by default
    /// (a server database shared by several centers).
    fn local_path(&self) -> Option<&std::path::Path> {
        None
    }

    /// Every stored token, outside a transaction (the server's token cache
    /// reloads through it). The default refuses.
    fn list_tokens(&self) -> Result<Vec<TokenRow>> {
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no tokens",
        ))
    }

    /// Every shared high-water mark: (name, value, card tag). The default
    /// refuses.
    fn list_marks(&self) -> Result<Vec<(String, u64, Vec<u8>)>> {
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no marks",
        ))
    }

    /// Bookkeeping of a token's use (not tagged): `last_used` is raised to
    /// `last_used` (never lowered) and `failures` grows by `failures`.
    fn note_token_use(&self, hash: &str, last_used: Option<u64>, failures: u64) -> Result<()> {
        let _ = (hash, last_used, failures);
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no tokens",
        ))
    }

    /// The lease named `name`, if any (issue 14). The default refuses.
    fn lease(&self, name: &str) -> Result<Option<LeaseRow>> {
        let _ = name;
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no leases",
        ))
    }

    /// Writes `new` if the lease is still `old` (None: absent), in one
    /// atomic statement (compare and swap); whether it was written.
    fn swap_lease(&self, old: Option<&LeaseRow>, new: &LeaseRow) -> Result<bool> {
        let _ = (old, new);
        Err(Error::db(
            DbFailure::Unsupported,
            "this key database keeps no leases",
        ))
    }

    /// A device's row and all its seed rows (tags not checked), read in
    /// one consistent read: what a cold seed cache loads. The default
    /// runs a read transaction; PostgreSQL answers with one statement.
    /// (Added for issue 14, PostgreSQL at speed.)
    fn load_device(&self, id: DeviceId) -> Result<Option<(DeviceRow, Vec<SeedRow>)>> {
        let mut out = None;
        self.read_transaction(&mut |tx| {
            out = match tx.device(id)? {
                Some(d) => Some((d, tx.seeds(id)?)),
                None => None,
            };
            Ok(())
        })?;
        Ok(out)
    }
}

/// A device row and its seed rows, as [`KeyDatabase::read_device_unlocked`]
/// reads them (None: no such device).
pub type DeviceRecords = Option<(DeviceRow, Vec<SeedRow>)>;

/// What [`KeyDatabase::watch_changes`] calls: Some(device) for one
/// device's change, None for "anything may have changed".
pub type ChangeHook = Arc<dyn Fn(Option<DeviceId>) + Send + Sync>;

/// Whether a database location names PostgreSQL rather than an SQLite
/// file.
pub fn is_postgres_url(location: &str) -> bool {
    location.starts_with("postgres://") || location.starts_with("postgresql://")
}

/// Runs `f` over a consistent read-only view of `db`
/// ([`KeyDatabase::read_snapshot`]) and returns its value.
pub fn with_snapshot<T>(
    db: &dyn KeyDatabase,
    mut f: impl FnMut(&dyn KeyDatabase) -> Result<T>,
) -> Result<T> {
    let mut out = None;
    db.read_snapshot(&mut |view| {
        out = Some(f(view.unwrap_or(db))?);
        Ok(())
    })?;
    out.ok_or_else(|| Error::db(DbFailure::Internal, "snapshot produced no value"))
}

/// Runs `f` in one read-only transaction of `db`
/// ([`KeyDatabase::read_transaction`]) and returns its value.
pub fn with_read_tx<T>(
    db: &dyn KeyDatabase,
    mut f: impl FnMut(&mut dyn Tx) -> Result<T>,
) -> Result<T> {
    let mut out = None;
    db.read_transaction(&mut |tx| {
        out = Some(f(tx)?);
        Ok(())
    })?;
    out.ok_or_else(|| Error::db(DbFailure::Internal, "transaction produced no value"))
}

/// Runs `f` in one transaction of `db` and returns its value.
pub fn with_tx<T>(db: &dyn KeyDatabase, mut f: impl FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
    let mut out = None;
    db.transaction(&mut |tx| {
        out = Some(f(tx)?);
        Ok(())
    })?;
    out.ok_or_else(|| Error::db(DbFailure::Internal, "transaction produced no value"))
}
