//! Record integrity tags and the database digest (PROTOCOL.md section 7).
//!
//! Design, chosen so that several writers (several centers on one
//! PostgreSQL) keep it consistent:
//!
//! - Every seed record carries a tag: the card's HMAC-SHA256 (integrity
//!   key, domain "MC-REC") over [`record_bytes`], which covers every
//!   column: what decides what the record may do (device, generation,
//!   state, base year, suite, Kstore version, the ciphertext's SHA-256, the
//!   key the ENROLL came under, the ENROLL's t and r, the compromise time,
//!   the grace period's end), what answers a retransmitted ENROLL (its
//!   digest, the stored RECEIPT) and the life-cycle times. An edited or
//!   swapped record fails its tag; the services check the tag every time
//!   they load a record and refuse the device otherwise
//!   ([`crate::Error::Integrity`]).
//! - So does every other stored value that decides an outcome (issue 12):
//!   device rows ([`device_bytes`]: class, suite, epoch, transport, highest
//!   generation, command counter), notary records ([`notary_bytes`], domain
//!   bytes "MC-NOT-v1": which signature over which data, first seen when),
//!   commands ([`command_bytes`]: counter, opcode, generation, r, bytes,
//!   answered, status) and batch-import progress ([`import_bytes`]). The
//!   center's sealing layer ([`Sealed`]) tags notary records, commands,
//!   import progress and device rows where they are written and checks
//!   notary records, commands and import progress where they are read: a
//!   forged notary record makes no signature valid, a forged command is
//!   not served, a forged import position is refused.
//! - The digest is an aggregate over all records that the card can check:
//!   the XOR of the records' tags, split into [`SHARDS`] shards by device
//!   id, for each kind of row (seed records 0.., notary records
//!   [`NOTARY_BASE`].., commands [`COMMAND_BASE`].., device rows
//!   [`DEVICE_BASE`]..: separate shards because notary records are written
//!   on the hot signature path, which then takes no seed shard's row lock,
//!   and because a finding can say which kind of row was deleted, inserted
//!   or put back), each shard stored as a row (acc, count, seq) with the card's tag
//!   (domain "MC-DIGEST") over it. Each committed change applies
//!   `acc ^= old_tag ^ new_tag` (and count, seq) to its shard in the same
//!   database transaction as the record, so record and digest can never be
//!   apart after a crash. XOR is commutative, so concurrent writers need no
//!   ordering between them, only the row lock each shard update takes;
//!   sharding spreads that lock over many rows.
//! - Why in the database under a card tag, not in the card file: the digest
//!   changes with every committed change, and keeping it in a file beside
//!   the database would need a two-phase commit between the two (a crash
//!   between them leaves them disagreeing), and would give each of several
//!   centers its own diverging copy. In the database it commits atomically
//!   with the records, and the card's tag means it cannot be edited to hide
//!   a deleted, inserted or altered record: the integrity scan recomputes
//!   every record's tag, XORs them per shard and compares with the tagged
//!   shards.
//! - What this alone does not catch: the whole database put back to an
//!   older copy of itself (consistent with its own old digest). For that
//!   the card keeps a high-water mark of the shards' seq outside the
//!   database ([`crate::anchor`], following every committed change within
//!   a second and at every clean shutdown); an older copy has a lower seq
//!   in the shards it changed.
//! - A deleted record is named from the audit log: every enrollment has an
//!   "enroll" entry naming (device, generation), and such a record that is
//!   not in the database was deleted.

use sha2::{Digest, Sha256};

use crate::card::EncryptionCard;
use crate::db::{CommandRow, DeviceRow, DigestShard, NotaryRow, SeedRow, Tx};
use crate::{Error, Result};

mod rows_repair;
mod sealed;
mod upgrade;

pub use sealed::{Sealed, acc_of, acc_tag, new_replay_accs, replay_row_key, row_mac};
pub use upgrade::{cover_rows, upgrade_legacy};

/// The audit action of the one-time cover of tokens, marks and replay
/// records ([`cover_rows`]).
pub const DIGEST_UPGRADE: &str = "digest-upgrade";

/// Number of digest shards of each kind of row.
pub const SHARDS: u8 = 16;

/// Digest rows NOTARY_BASE.. hold the notary records' shards, by device
/// like the seed records' (shards 0..[`SHARDS`]).
pub const NOTARY_BASE: u8 = SHARDS;
/// Digest rows COMMAND_BASE.. hold the commands' shards.
pub const COMMAND_BASE: u8 = 2 * SHARDS;
/// Digest rows DEVICE_BASE.. hold the device rows' shards.
pub const DEVICE_BASE: u8 = 3 * SHARDS;
/// Every digest row of records the card's anchor and backups follow (the
/// audit head is row 255).
pub const ALL_SHARDS: u8 = 4 * SHARDS;
/// Digest rows TOKEN_BASE.. hold the operator tokens' shards, by the
/// first hex digit of the token's hash (gap 3: a token row put back to its
/// copy from before its revocation no longer matches its shard).
pub const TOKEN_BASE: u8 = ALL_SHARDS;
/// The digest row of the shared high-water marks (`pruned`, `clock`,
/// `clock_alarm`, `memory_guard`, ...): a deleted or put-back mark no
/// longer matches it.
pub const MARK_SHARD: u8 = TOKEN_BASE + SHARDS;
/// Every digest row the integrity scan checks: [`ALL_SHARDS`], the token
/// shards and the marks' shard.
pub const SCAN_SHARDS: u8 = MARK_SHARD + 1;

/// The digest shard of a token (by its hash, lowercase hex).
pub fn token_shard(hash: &str) -> u8 {
    let first = hash.as_bytes().first().copied().unwrap_or(0);
    let nibble = match first {
        b'0'..=b'9' => first - b'0',
        b'a'..=b'f' => first - b'a' + 10,
        other => other % SHARDS,
    };
    TOKEN_BASE + nibble % SHARDS
}

/// A stored tag as the 32 bytes the digest XORs (a tag of another length,
/// which fails its own check anyway, counts by its SHA-256).
pub fn tag32(tag: &[u8]) -> [u8; 32] {
    match <[u8; 32]>::try_from(tag) {
        Ok(t) => t,
        Err(_) => Sha256::digest(tag).into(),
    }
}

/// The shard of a device.
pub fn shard_of(device: microcert_core::DeviceId) -> u8 {
    device.0[7] % SHARDS
}

/// The center's database: `db` behind the sealing layer ([`Sealed`]),
/// after the one-time upgrade of a database this process just migrated
/// from schema version 1 ([`upgrade_legacy`]).
pub fn seal_database(
    db: std::sync::Arc<dyn crate::db::KeyDatabase>,
    card: &std::sync::Arc<dyn EncryptionCard>,
) -> std::sync::Arc<dyn crate::db::KeyDatabase> {
    if upgrade::needed(&*db).unwrap_or(false) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Err(e) = upgrade_legacy(&*db, &**card, now) {
            tracing::error!(error = %e, "the upgrade of rows written before card tags failed: they are refused and named by the integrity check");
        }
    }
    if upgrade::rows_cover_needed(&*db) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Err(e) = cover_rows(&*db, &**card, now) {
            tracing::error!(error = %e, "the cover of tokens, marks and replay records written before this version failed: the integrity check names their shards");
        }
    }
    Sealed::wrap(db, card.clone())
}

/// What kind of rows a digest shard covers, for findings.
pub fn shard_kind(shard: u8) -> &'static str {
    match shard {
        s if s < NOTARY_BASE => "seed records",
        s if s < COMMAND_BASE => "notary records",
        s if s < DEVICE_BASE => "commands",
        s if s < ALL_SHARDS => "device rows",
        s if s < MARK_SHARD => "tokens",
        MARK_SHARD => "marks",
        crate::audit::AUDIT_BASE_SHARD => "audit archive checkpoint",
        _ => "audit head",
    }
}

/// The canonical bytes of a notary record that its seal covers: which
/// signature (device, generation, t, r, the signature's tag), over which
/// data (its SHA-256) and since when (first_seen, which decides validity
/// after a revocation).
pub fn notary_bytes(n: &NotaryRow) -> Vec<u8> {
    let mut b = Vec::with_capacity(80 + n.tag.len());
    b.extend_from_slice(b"MC-NOT-v1");
    b.extend_from_slice(&n.device.0);
    b.push(n.generation);
    b.extend_from_slice(&n.t.to_be_bytes());
    b.extend_from_slice(&n.r.to_be_bytes());
    b.extend_from_slice(&n.digest);
    b.extend_from_slice(&(n.tag.len() as u32).to_be_bytes());
    b.extend_from_slice(&n.tag);
    b.extend_from_slice(&n.first_seen.to_be_bytes());
    b
}

/// The canonical bytes of a command row that its seal covers: every
/// column (the bytes by their SHA-256).
pub fn command_bytes(c: &CommandRow) -> Vec<u8> {
    let mut b = Vec::with_capacity(96);
    b.extend_from_slice(b"MC-CMD-v1");
    b.extend_from_slice(&c.device.0);
    b.extend_from_slice(&c.counter.to_be_bytes());
    b.push(c.opcode);
    b.push(c.generation);
    b.extend_from_slice(&c.r.to_be_bytes());
    b.extend_from_slice(&Sha256::digest(&c.bytes.0));
    b.extend_from_slice(&c.created.to_be_bytes());
    match c.answered_at {
        Some(a) => {
            b.push(1);
            b.extend_from_slice(&a.to_be_bytes());
        }
        None => b.extend_from_slice(&[0; 9]),
    }
    match c.status {
        Some(st) => b.extend_from_slice(&[1, st]),
        None => b.extend_from_slice(&[0, 0]),
    }
    b
}

/// The canonical bytes of a batch import's progress that its seal covers:
/// the file's SHA-256 and the next line to import (which decides which
/// lines a resumed import skips).
pub fn import_bytes(file: &[u8; 32], next_line: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(50);
    b.extend_from_slice(b"MC-IMP-v1");
    b.extend_from_slice(file);
    b.extend_from_slice(&next_line.to_be_bytes());
    b
}

/// Checks an import progress row's seal.
pub fn check_import(
    card: &dyn EncryptionCard,
    file: &[u8; 32],
    next_line: u64,
    seal: &[u8; 32],
) -> Result<()> {
    if tag_matches(card, &import_bytes(file, next_line), Some(seal))? {
        Ok(())
    } else {
        tracing::error!("batch import progress fails its integrity tag");
        Err(Error::Integrity(format!(
            "import progress of batch file {}",
            hex::encode(&file[..8])
        )))
    }
}

fn tag_matches(card: &dyn EncryptionCard, bytes: &[u8], tag: Option<&[u8; 32]>) -> Result<bool> {
    let Some(tag) = tag else { return Ok(false) };
    let want = card.record_tag(bytes)?;
    Ok(subtle::ConstantTimeEq::ct_eq(&want[..], &tag[..]).into())
}

/// Checks a notary record's seal; Err(Integrity) names it.
pub fn check_notary(card: &dyn EncryptionCard, n: &NotaryRow) -> Result<()> {
    if tag_matches(card, &notary_bytes(n), n.seal.as_ref())? {
        Ok(())
    } else {
        tracing::error!(device = %n.device, generation = n.generation, t = n.t, "notary record fails its integrity tag");
        Err(Error::Integrity(format!(
            "notary record {} generation {} t {} r {}",
            n.device, n.generation, n.t, n.r
        )))
    }
}

/// Checks a command's seal; Err(Integrity) names the device.
pub fn check_command(
    card: &dyn EncryptionCard,
    c: &CommandRow,
    seal: Option<&[u8; 32]>,
) -> Result<()> {
    if tag_matches(card, &command_bytes(c), seal)? {
        Ok(())
    } else {
        tracing::error!(device = %c.device, "command fails its integrity tag");
        Err(Error::Integrity(format!("command of {}", c.device)))
    }
}

/// The canonical bytes of a seed record that its integrity tag covers:
/// every column (the ciphertext and the stored RECEIPT by their SHA-256).
/// Besides what decides what the record may do (device, generation,
/// state, base year, suite, Kstore version, ciphertext, the key the ENROLL
/// came under, its t and r, the compromise time, the grace period's end),
/// it covers what answers a retransmitted ENROLL (its digest and the
/// RECEIPT) and the life-cycle times.
pub fn record_bytes(s: &SeedRow) -> Vec<u8> {
    let mut b = record_bytes_v1(s);
    b[..9].copy_from_slice(b"MC-REC-v2");
    let opt = |b: &mut Vec<u8>, v: Option<u64>| match v {
        Some(v) => {
            b.push(1);
            b.extend_from_slice(&v.to_be_bytes());
        }
        None => b.extend_from_slice(&[0; 9]),
    };
    opt(&mut b, s.grace_until);
    b.extend_from_slice(&s.enroll_digest);
    b.extend_from_slice(&Sha256::digest(&s.receipt.0));
    b.extend_from_slice(&s.created.to_be_bytes());
    opt(&mut b, s.activated_at);
    opt(&mut b, s.suspended_at);
    opt(&mut b, s.deactivated_at);
    opt(&mut b, s.destroyed_at);
    b
}

/// Whether a record's tag is of the form before every column was covered
/// ("MC-REC-v1", [`record_bytes_v1`]) and valid as such: a database or a
/// backup written by an older version (the upgrade re-tags them).
pub fn is_v1_record(card: &dyn EncryptionCard, s: &SeedRow) -> Result<bool> {
    tag_matches(card, &record_bytes_v1(s), Some(&s.tag))
}

/// The bytes before every column was covered (only the upgrade of a
/// database or a backup written by an older version reads them).
pub fn record_bytes_v1(s: &SeedRow) -> Vec<u8> {
    let mut b = Vec::with_capacity(96);
    b.extend_from_slice(b"MC-REC-v1");
    b.extend_from_slice(&s.device.0);
    b.push(s.generation);
    let state = s.state.name().as_bytes();
    b.push(state.len() as u8);
    b.extend_from_slice(state);
    b.extend_from_slice(&s.base_year.to_be_bytes());
    b.push(s.suite.id());
    b.extend_from_slice(&s.kstore_version.to_be_bytes());
    match &s.ciphertext {
        Some(ct) => b.extend_from_slice(&Sha256::digest(&ct.0)),
        None => b.extend_from_slice(&[0u8; 32]),
    }
    b.push(match s.via {
        crate::card::EnrollVia::Update => 1,
        crate::card::EnrollVia::Transport => 2,
    });
    b.extend_from_slice(&s.enroll_t.to_be_bytes());
    b.extend_from_slice(&s.enroll_r.to_be_bytes());
    b.extend_from_slice(&s.compromised_at.unwrap_or(0).to_be_bytes());
    b
}

/// The canonical bytes of a device row that its tag covers: everything
/// but the creation time. (A device row edited to reopen transport
/// enrollment, change the epoch or lower the command counter is refused.)
pub fn device_bytes(d: &DeviceRow) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    b.extend_from_slice(b"MC-DEV-v1");
    b.extend_from_slice(&d.id.0);
    b.push(d.class);
    b.push(d.suite.id());
    b.push(d.epoch);
    b.push(u8::from(d.transport_open));
    match d.highest_generation {
        Some(g) => b.extend_from_slice(&[1, g]),
        None => b.extend_from_slice(&[0, 0]),
    }
    b.extend_from_slice(&d.command_counter.to_be_bytes());
    b
}

/// Checks a stored device row's tag.
pub fn check_device(card: &dyn EncryptionCard, d: &DeviceRow) -> Result<()> {
    let tag = card.record_tag(&device_bytes(d))?;
    if subtle::ConstantTimeEq::ct_eq(&tag[..], &d.tag[..]).into() {
        Ok(())
    } else {
        tracing::error!(device = %d.id, "device record fails its integrity tag");
        Err(Error::Integrity(format!("device {}", d.id)))
    }
}

/// Recomputes a device row's tag after a change.
pub fn retag_device(card: &dyn EncryptionCard, d: &mut DeviceRow) -> Result<()> {
    d.tag = card.record_tag(&device_bytes(d))?;
    Ok(())
}

/// The canonical bytes of a digest shard that its tag covers.
pub fn shard_bytes(s: &DigestShard) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(b"MC-DIGEST-v1");
    b.push(s.shard);
    b.extend_from_slice(&s.acc);
    b.extend_from_slice(&s.count.to_be_bytes());
    b.extend_from_slice(&s.seq.to_be_bytes());
    b
}

/// Checks a stored record's tag; Err(Integrity) names the record.
pub fn check_record(card: &dyn EncryptionCard, s: &SeedRow) -> Result<()> {
    let tag = card.record_tag(&record_bytes(s))?;
    if subtle::ConstantTimeEq::ct_eq(&tag[..], &s.tag[..]).into() {
        Ok(())
    } else {
        tracing::error!(device = %s.device, generation = s.generation, "seed record fails its integrity tag");
        Err(Error::Integrity(format!(
            "{} generation {}",
            s.device, s.generation
        )))
    }
}

/// Recomputes a record's tag after a change.
pub fn retag(card: &dyn EncryptionCard, s: &mut SeedRow) -> Result<()> {
    s.tag = card.record_tag(&record_bytes(s))?;
    Ok(())
}

/// Loads a shard and checks its tag; an absent shard is the empty one.
fn load_shard(tx: &mut dyn Tx, card: &dyn EncryptionCard, shard: u8) -> Result<DigestShard> {
    match tx.digest_shard(shard)? {
        Some(s) => {
            let tag = card.digest_tag(&shard_bytes(&s))?;
            if subtle::ConstantTimeEq::ct_eq(&tag[..], &s.tag[..]).into() {
                Ok(s)
            } else {
                tracing::error!(shard, "digest shard fails its tag");
                Err(Error::Integrity(format!("digest shard {shard}")))
            }
        }
        None => Ok(DigestShard {
            shard,
            acc: [0; 32],
            count: 0,
            seq: 0,
            tag: [0; 32],
        }),
    }
}

/// Applies a record change to its shard of the digest: `old` is the tag
/// the record had (None for an insert), `new` the tag it has now.
pub fn apply_change(
    tx: &mut dyn Tx,
    card: &dyn EncryptionCard,
    device: microcert_core::DeviceId,
    old: Option<&[u8; 32]>,
    new: &[u8; 32],
) -> Result<()> {
    let mut d = DigestDelta::default();
    d.add(device, old, new);
    d.flush(tx, card)
}

/// Like [`apply_change`], on digest row `shard` (notary, command and
/// device shards: [`NOTARY_BASE`], [`COMMAND_BASE`], [`DEVICE_BASE`]).
pub fn apply_change_at(
    tx: &mut dyn Tx,
    card: &dyn EncryptionCard,
    shard: u8,
    old: Option<&[u8; 32]>,
    new: Option<&[u8; 32]>,
) -> Result<()> {
    let mut d = DigestDelta::default();
    d.add_at(shard, old, new);
    d.flush(tx, card)
}

/// Record changes collected over many records of one transaction and
/// applied to each touched shard once (a batch import touches every shard
/// once per chunk instead of once per record).
#[derive(Debug, Default, Clone)]
pub struct DigestDelta {
    shards: Vec<(u8, [u8; 32], i64, u64)>,
}

impl DigestDelta {
    /// Adds one record change (see [`apply_change`]).
    pub fn add(
        &mut self,
        device: microcert_core::DeviceId,
        old: Option<&[u8; 32]>,
        new: &[u8; 32],
    ) {
        self.add_at(shard_of(device), old, Some(new));
    }

    /// Adds one change to digest row `shard`: `old` None for an insert,
    /// `new` None for a delete.
    pub fn add_at(&mut self, shard: u8, old: Option<&[u8; 32]>, new: Option<&[u8; 32]>) {
        let pos = match self.shards.iter().position(|s| s.0 == shard) {
            Some(p) => p,
            None => {
                self.shards.push((shard, [0; 32], 0, 0));
                self.shards.len() - 1
            }
        };
        let e = &mut self.shards[pos];
        match old {
            Some(o) => xor_into(&mut e.1, o),
            None => e.2 += 1,
        }
        match new {
            Some(n) => xor_into(&mut e.1, n),
            None => e.2 -= 1,
        }
        e.3 += 1;
    }

    /// Applies the collected changes inside the transaction and empties
    /// the delta.
    pub fn flush(&mut self, tx: &mut dyn Tx, card: &dyn EncryptionCard) -> Result<()> {
        for (shard, x, added, changes) in self.shards.drain(..) {
            let mut s = load_shard(tx, card, shard)?;
            xor_into(&mut s.acc, &x);
            s.count = s.count.saturating_add_signed(added);
            s.seq += changes;
            s.tag = card.digest_tag(&shard_bytes(&s))?;
            tx.put_digest_shard(&s)?;
        }
        Ok(())
    }
}

fn xor_into(acc: &mut [u8; 32], t: &[u8; 32]) {
    for (a, b) in acc.iter_mut().zip(t) {
        *a ^= b;
    }
}

/// Each digest shard's XOR and count of the tags of its records, made
/// from the records themselves, to compare with the stored shard rows.
pub(crate) struct ShardAcc(Vec<([u8; 32], u64)>);

impl ShardAcc {
    /// Every shard empty.
    pub(crate) fn new() -> Self {
        ShardAcc(vec![([0u8; 32], 0u64); usize::from(SCAN_SHARDS)])
    }

    /// Adds a record's tag to its shard.
    pub(crate) fn add(&mut self, shard: u8, tag: &[u8; 32]) {
        let a = &mut self.0[usize::from(shard)];
        xor_into(&mut a.0, tag);
        a.1 += 1;
    }

    /// Whether the stored row of `shard` (none: the shard has no record)
    /// holds this XOR and count under a good card tag (compared in
    /// constant time).
    pub(crate) fn matches(
        &self,
        card: &dyn EncryptionCard,
        shard: u8,
        stored: &[DigestShard],
    ) -> Result<bool> {
        let (x, n) = self.0[usize::from(shard)];
        Ok(match stored.iter().find(|s| s.shard == shard) {
            Some(s) => {
                let tag = card.digest_tag(&shard_bytes(s))?;
                bool::from(
                    subtle::ConstantTimeEq::ct_eq(&tag[..], &s.tag[..])
                        & subtle::ConstantTimeEq::ct_eq(&s.acc[..], &x[..]),
                ) && s.count == n
            }
            None => n == 0,
        })
    }
}

/// What an integrity scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntegrityReport {
    /// Records scanned.
    pub records: u64,
    /// Records whose tag does not match (device, generation).
    pub bad_records: Vec<(microcert_core::DeviceId, u8)>,
    /// Shards whose tag, record count or XOR does not match the records.
    pub bad_shards: Vec<u8>,
    /// Device rows whose tag does not match.
    pub bad_devices: Vec<microcert_core::DeviceId>,
    /// Notary records whose seal does not match (or that have none):
    /// (device, generation, t, r).
    pub bad_notary: Vec<(microcert_core::DeviceId, u8, u32, u64)>,
    /// Devices whose command row fails its seal.
    pub bad_commands: Vec<microcert_core::DeviceId>,
    /// Seeds the audit log says were enrolled that are not in the
    /// database (deleted rows).
    pub missing_records: Vec<(microcert_core::DeviceId, u8)>,
    /// Shards whose change count is below the card's anchor: the database
    /// (or these records) were put back to an older copy. Filled by
    /// [`crate::Center::integrity_check`] only.
    pub rolled_back_shards: Vec<u8>,
    /// What is wrong with the audit log: its chain or card-tagged head
    /// (see [`crate::audit::AuditFinding`]), or its head below the anchor.
    /// Filled by [`crate::Center::integrity_check`] only.
    pub audit: Option<String>,
    /// The anchor file itself fails its card tag (or cannot be read), or
    /// the keyring is older than the anchor saw.
    pub anchor: Option<String>,
    /// Shared high-water marks (pruning, clock, clock alarm, replay-guard
    /// marker) whose card tag fails. Filled by
    /// [`crate::Center::integrity_check`] only.
    pub bad_marks: Vec<String>,
}

impl IntegrityReport {
    /// True when nothing was found.
    pub fn is_clean(&self) -> bool {
        self.bad_records.is_empty()
            && self.bad_shards.is_empty()
            && self.bad_devices.is_empty()
            && self.bad_notary.is_empty()
            && self.bad_commands.is_empty()
            && self.missing_records.is_empty()
            && self.rolled_back_shards.is_empty()
            && self.audit.is_none()
            && self.anchor.is_none()
            && self.bad_marks.is_empty()
    }

    /// Devices to refuse until repaired (tampered or missing records).
    pub fn tampered_devices(&self) -> Vec<microcert_core::DeviceId> {
        let mut v: Vec<_> = self
            .bad_records
            .iter()
            .chain(&self.missing_records)
            .map(|(d, _)| *d)
            .chain(self.bad_devices.iter().copied())
            .chain(self.bad_commands.iter().copied())
            .chain(self.bad_notary.iter().map(|n| n.0))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// One line per finding, naming records, shards and the audit log.
    pub fn findings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (d, g) in &self.bad_records {
            out.push(format!("record {d} generation {g}: fails its integrity tag (changed, or moved from another record)"));
        }
        for (d, g) in &self.missing_records {
            out.push(format!("record {d} generation {g}: enrolled (audit log) but missing from the database (deleted)"));
        }
        for d in &self.bad_devices {
            out.push(format!("device {d}: device row fails its integrity tag"));
        }
        for (d, g, t, r) in &self.bad_notary {
            out.push(format!("notary record {d} generation {g} t {t} r {r}: fails its integrity tag (changed, moved, or inserted outside the center)"));
        }
        for d in &self.bad_commands {
            out.push(format!("command of {d}: fails its integrity tag (changed, moved, or inserted outside the center)"));
        }
        for s in &self.bad_shards {
            out.push(format!("digest shard {s} ({}): does not match its rows (a row deleted, inserted or put back)", shard_kind(*s)));
        }
        for m in &self.bad_marks {
            out.push(format!(
                "high-water mark {m:?}: fails its integrity tag (changed outside the center)"
            ));
        }
        if !self.rolled_back_shards.is_empty() {
            out.push(format!(
                "database rolled back: shards {:?} are older than the card's anchor (an older copy was put back)",
                self.rolled_back_shards
            ));
        }
        if let Some(a) = &self.audit {
            out.push(format!("audit log: {a}"));
        }
        if let Some(a) = &self.anchor {
            out.push(format!("anchor: {a}"));
        }
        out
    }
}

/// Every (device, generation) the audit log records an enrollment of, up
/// to the log's end when called: read before the records, so a record
/// enrolled while the scan runs is not counted missing.
fn enrolled_per_audit(
    db: &dyn crate::db::KeyDatabase,
    upgrades: &mut u64,
) -> Result<std::collections::HashSet<(microcert_core::DeviceId, u8)>> {
    let mut out = std::collections::HashSet::new();
    let mut after = 0;
    loop {
        let page = db.audit_log(after, 5000)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for e in &page {
            if e.entry.action == "upgrade" {
                *upgrades += 1;
            }
            if e.entry.action == DIGEST_UPGRADE {
                *upgrades += 1 << 32;
            }
            if e.entry.action == "enroll"
                && let (Some(d), Some(g)) = (e.entry.device, e.entry.generation)
            {
                out.insert((d, g));
            }
        }
    }
    Ok(out)
}

/// Recomputes every record's tag and every shard's aggregate and compares
/// them with what is stored.
pub fn scan(db: &dyn crate::db::KeyDatabase, card: &dyn EncryptionCard) -> Result<IntegrityReport> {
    // One consistent snapshot: with several centers writing (PostgreSQL),
    // records and shards read at different moments would disagree.
    crate::db::with_snapshot(db, |view| scan_in(view, card))
}

fn scan_in(db: &dyn crate::db::KeyDatabase, card: &dyn EncryptionCard) -> Result<IntegrityReport> {
    let mut report = IntegrityReport::default();
    let mut upgrades = 0;
    let mut enrolled = enrolled_per_audit(db, &mut upgrades)?;
    if upgrades >> 32 > 1 {
        report.audit = Some(format!(
            "the one-time digest of tokens and marks was made {} times: rows were covered again after someone undid it; check the tokens (`token list`) and restore the whole database from a backup",
            upgrades >> 32
        ));
    }
    let upgrades = upgrades & 0xffff_ffff;
    if upgrades > 1 {
        // The one-time upgrade tags rows it cannot check: run again, it
        // was forced (its schema migration undone, or its shards deleted).
        report.audit = Some(format!(
            "the one-time tag upgrade ran {upgrades} times: rows were re-tagged after someone undid it; restore the whole database from a backup"
        ));
    }
    let mut acc = ShardAcc::new();
    let mut add = |shard: u8, tag: &[u8; 32]| acc.add(shard, tag);
    let mut after = None;
    loop {
        let page = db.scan_seeds(after, 1000)?;
        let Some(last) = page.last() else { break };
        after = Some((last.device, last.generation));
        for s in &page {
            report.records += 1;
            enrolled.remove(&(s.device, s.generation));
            if check_record(card, s).is_err() {
                report.bad_records.push((s.device, s.generation));
            }
            add(shard_of(s.device), &s.tag);
        }
    }
    crate::db::device_pages(db, 10_000, |page| {
        for v in &page {
            if check_device(card, &v.device).is_err() {
                report.bad_devices.push(v.device.id);
            }
            add(DEVICE_BASE + shard_of(v.device.id), &v.device.tag);
        }
        Ok(())
    })?;
    let mut after_cmd = None;
    loop {
        let page = db.scan_commands(after_cmd, 1000)?;
        let Some(last) = page.last() else { break };
        after_cmd = Some(last.0.device);
        for (c, seal) in &page {
            if check_command(card, c, seal.as_ref()).is_err() {
                report.bad_commands.push(c.device);
            }
            if let Some(t) = seal {
                add(COMMAND_BASE + shard_of(c.device), t);
            }
        }
    }
    let mut after_not: Option<crate::db::NotaryRow> = None;
    loop {
        let page = db.scan_notary(after_not.as_ref(), 1000)?;
        let Some(last) = page.last() else { break };
        after_not = Some(last.clone());
        for n in &page {
            if check_notary(card, n).is_err() {
                report.bad_notary.push((n.device, n.generation, n.t, n.r));
            }
            if let Some(t) = &n.seal {
                add(NOTARY_BASE + shard_of(n.device), t);
            }
        }
    }
    for t in db.list_tokens()? {
        add(token_shard(&t.hash), &tag32(&t.tag));
    }
    for (_, _, tag) in db.list_marks()? {
        add(MARK_SHARD, &tag32(&tag));
    }
    report.missing_records = enrolled.into_iter().collect();
    report.missing_records.sort_unstable();
    let stored = db.digest_shards()?;
    for shard in 0..SCAN_SHARDS {
        if !acc.matches(card, shard, &stored)? {
            report.bad_shards.push(shard);
        }
    }
    Ok(report)
}
