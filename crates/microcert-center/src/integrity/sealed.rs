//! The center's sealing layer: a [`KeyDatabase`] wrapper that puts the
//! card's tag on every notary record, command and device row the services
//! write, places each in its digest shard in the same transaction, and
//! checks the tag of every notary record and command it reads (refusing
//! one that fails with [`Error::Integrity`]). Tokens and marks (tagged by
//! their own services) get their place in their digest shards here too
//! ([`super::TOKEN_BASE`], [`super::MARK_SHARD`]).
//!
//! Replay records and spent challenges (database replay mode, gap 2 of
//! SECURITY.md) are counted once through [`Tx::record_replays`] and
//! [`Tx::spend_challenge`] here: each device's stored records are checked
//! against its accumulator ([`ReplayAcc`]: the XOR of an HMAC of each live
//! record under a key derived from the card, their count, the latest
//! expiry, a tag) before anything is inserted, and the accumulator follows
//! every insert and every prune in the same transaction, under its row
//! lock. A record deleted from outside therefore shows at the device's
//! next record, the moment a replay of it would be accepted: the device is
//! refused until everything the accumulator covered has expired before
//! the (checked) pruning high-water, which refuses those records by
//! itself; then the accumulator is rebuilt from the rows. A missing or
//! forged accumulator is replaced by a quarantine that ends the same way.
//!
//! Why a wrapper: the services write commands and device rows in many
//! places; sealing them where they are written to the database means no
//! write can forget it. Seed records keep their explicit tags and digest
//! changes in the services ([`super::retag`], [`super::apply_change`]).
//!
//! Every method of [`Tx`] and [`KeyDatabase`] must be forwarded here: a
//! method added to either trait with a default body is otherwise answered
//! by the default, not by the backend.

use std::sync::{Arc, Mutex, OnceLock};

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use microcert_core::DeviceId;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::{COMMAND_BASE, DEVICE_BASE, MARK_SHARD, NOTARY_BASE, shard_of, tag32, token_shard};
use crate::audit::AuditSink;
use crate::card::EncryptionCard;
use crate::db::{
    AuditRecord, ChangeHook, CommandRow, DeviceQuery, DeviceRow, DeviceView, DigestShard,
    ImportMark, KeyDatabase, MARK_PRUNED, NewAudit, NotaryKey, NotaryRow, ReplayAcc, ReplayKey,
    ReplayRow, SeedRow, TokenRow, Tx,
};
use crate::{DbFailure, Error, Result};

/// A key database whose notary records, commands, device rows, tokens and
/// marks carry the card's tag and a place in the digest, and whose replay
/// records and spent challenges are accumulated per device (gap 2).
pub struct Sealed {
    inner: Arc<dyn KeyDatabase>,
    card: Arc<dyn EncryptionCard>,
    /// The replay-row key, derived from the card once (see [`row_key`]).
    row_key: OnceLock<Zeroizing<[u8; 32]>>,
    /// The last pruning mark whose card tag verified: (value, tag). The
    /// hot path asks the card again only when the mark changed.
    checked_mark: Mutex<Option<(u64, Vec<u8>)>>,
    /// The second audit sink, if configured ([`KeyDatabase::set_audit_sink`]).
    sink: OnceLock<Arc<dyn AuditSink>>,
}

/// The input of the card's record tag from which the replay-row key is
/// derived. No stored record's tag is over these bytes (every other input
/// starts with another domain), so the key is never in the database.
const ROW_KEY_LABEL: &[u8] = b"MC-RKEY-v1 replay rows and accumulators";

/// How many expired records one pruning transaction deletes.
const PRUNE_CHUNK: usize = 5000;

/// HMAC-SHA256 under the replay-row key over `parts`.
fn mac(key: &[u8; 32], parts: &[&[u8]]) -> Result<[u8; 32]> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .map_err(|_| Error::db(DbFailure::Internal, "replay-row key refused by HMAC"))?;
    for p in parts {
        m.update(p);
    }
    Ok(m.finalize().into_bytes().into())
}

/// The MAC of one replay record or spent challenge: what its device's
/// accumulator XORs in when it is inserted and out when it is pruned.
pub fn row_mac(key: &[u8; 32], r: &ReplayRow) -> Result<[u8; 32]> {
    match *r {
        ReplayRow::Replay {
            device,
            generation,
            t,
            r,
            expires,
        } => mac(
            key,
            &[
                b"MC-RROW-v1R",
                &device.0,
                &[generation],
                &t.to_be_bytes(),
                &r.to_be_bytes(),
                &expires.to_be_bytes(),
            ],
        ),
        ReplayRow::Challenge { device, c, expires } => mac(
            key,
            &[b"MC-RROW-v1C", &device.0, &c, &expires.to_be_bytes()],
        ),
    }
}

/// The tag of an accumulator row.
pub fn acc_tag(key: &[u8; 32], a: &ReplayAcc) -> Result<[u8; 32]> {
    mac(
        key,
        &[
            b"MC-RACC-v1",
            &a.device.0,
            &a.acc,
            &a.count.to_be_bytes(),
            &a.max_expires.to_be_bytes(),
        ],
    )
}

/// The replay-row key of `card`: its record tag over a fixed label.
pub fn replay_row_key(card: &dyn EncryptionCard) -> Result<Zeroizing<[u8; 32]>> {
    Ok(Zeroizing::new(card.record_tag(ROW_KEY_LABEL)?))
}

/// The accumulator of a device over `rows` (all of them its own).
pub fn acc_of(key: &[u8; 32], device: DeviceId, rows: &[ReplayRow]) -> Result<ReplayAcc> {
    let mut a = empty_acc(key, device)?;
    for r in rows {
        xor(&mut a.acc, &row_mac(key, r)?);
        a.count += 1;
        a.max_expires = a.max_expires.max(r.expires());
    }
    a.tag = acc_tag(key, &a)?;
    Ok(a)
}

/// Empty accumulators for devices inserted without the sealing layer (a
/// restore into an empty database).
pub fn new_replay_accs(card: &dyn EncryptionCard, ids: &[DeviceId]) -> Result<Vec<ReplayAcc>> {
    let key = replay_row_key(card)?;
    ids.iter().map(|&id| empty_acc(&key, id)).collect()
}

/// The count of a quarantined accumulator (no real one has it, so it
/// never matches the stored rows; the largest both backends store).
const QUARANTINE: u64 = i64::MAX as u64;

/// The least freshness window a quarantine assumes (seconds): longer
/// than any class's skew plus the instance skew.
const QUARANTINE_WINDOW: u64 = 3600;

/// The end of a quarantine: the latest expiry among the records being
/// inserted plus two freshness windows (the window: expires - t of those
/// records, at least [`QUARANTINE_WINDOW`]). A record the lost
/// accumulator covered was accepted before with a t at most a skew ahead
/// of the present, so it expires before this; once the pruning high-water
/// passes it, any of them is refused by the high-water anyway. Message
/// times, not the wall clock: the same time base as the high-water.
fn quarantine_until<'a>(batch: impl Iterator<Item = &'a ReplayRow>) -> u64 {
    let mut latest = 0u64;
    let mut window = QUARANTINE_WINDOW;
    for r in batch {
        latest = latest.max(r.expires());
        if let ReplayRow::Replay { t, expires, .. } = *r {
            window = window.max(expires.saturating_sub(u64::from(t)));
        }
    }
    latest.saturating_add(window.saturating_mul(2))
}

fn xor(acc: &mut [u8; 32], t: &[u8; 32]) {
    for (a, b) in acc.iter_mut().zip(t) {
        *a ^= b;
    }
}

/// What stands for a missing accumulator (deleted from outside): it
/// fails its check and is never rebuilt on its own.
fn absent_acc(device: DeviceId) -> ReplayAcc {
    ReplayAcc {
        device,
        acc: [0; 32],
        count: 0,
        max_expires: i64::MAX as u64,
        tag: [0; 32],
    }
}

fn empty_acc(key: &[u8; 32], device: DeviceId) -> Result<ReplayAcc> {
    let mut a = ReplayAcc {
        device,
        acc: [0; 32],
        count: 0,
        max_expires: 0,
        tag: [0; 32],
    };
    a.tag = acc_tag(key, &a)?;
    Ok(a)
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Sealed {
    /// Wraps `inner`.
    pub fn wrap(inner: Arc<dyn KeyDatabase>, card: Arc<dyn EncryptionCard>) -> Arc<Self> {
        // Sealed twice, every digest change would be counted twice.
        debug_assert!(inner.unsealed().is_none(), "a database sealed twice");
        Arc::new(Sealed {
            inner,
            card,
            row_key: OnceLock::new(),
            checked_mark: Mutex::new(None),
            sink: OnceLock::new(),
        })
    }

    /// The replay-row key: the card's record tag over a fixed label,
    /// derived once per process and kept in memory (like the challenge
    /// key Kw), so the AUTH path asks the card for nothing per record.
    pub fn row_key(&self) -> Result<&[u8; 32]> {
        if let Some(k) = self.row_key.get() {
            return Ok(k);
        }
        let _ = self.row_key.set(replay_row_key(&*self.card)?);
        self.row_key
            .get()
            .map(|k| &**k)
            .ok_or_else(|| Error::db(DbFailure::Internal, "replay-row key not set"))
    }

    fn tx<'a>(&'a self, inner: &'a mut dyn Tx) -> Result<SealedTx<'a>> {
        Ok(SealedTx {
            inner,
            card: &*self.card,
            key: self.row_key()?,
            checked_mark: &self.checked_mark,
            sink: self.sink.get().map(|s| &**s),
            new_accs: Vec::new(),
            devices: super::DigestDelta::default(),
        })
    }

    /// The database without the sealing layer.
    pub fn inner(&self) -> &Arc<dyn KeyDatabase> {
        &self.inner
    }
}

struct SealedTx<'a> {
    inner: &'a mut dyn Tx,
    card: &'a dyn EncryptionCard,
    key: &'a [u8; 32],
    checked_mark: &'a Mutex<Option<(u64, Vec<u8>)>>,
    /// The second audit sink, if configured.
    sink: Option<&'a dyn AuditSink>,
    /// Empty accumulators of devices inserted by this transaction,
    /// written at its end in one statement.
    new_accs: Vec<ReplayAcc>,
    /// Device rows' digest changes not applied yet: applied before any
    /// digest row is read or written through this transaction and when
    /// its closure returns, so they commit with the rows (a batch import
    /// reads and writes each device shard once per chunk, not once per
    /// device).
    devices: super::DigestDelta,
}

impl<'a> SealedTx<'a> {
    /// Applies the pending device digest changes.
    fn settle(&mut self) -> Result<()> {
        self.devices.flush(self.inner, self.card)
    }

    fn shard(&mut self, shard: u8, old: Option<&[u8; 32]>, new: Option<&[u8; 32]>) -> Result<()> {
        if old.is_some() && old == new {
            return Ok(());
        }
        super::apply_change_at(self.inner, self.card, shard, old, new)
    }

    /// Writes what the transaction deferred (the accumulators of new
    /// devices).
    fn finish(&mut self) -> Result<()> {
        if self.new_accs.is_empty() {
            return Ok(());
        }
        let mut accs = std::mem::take(&mut self.new_accs);
        // A device inserted again (a repair putting back a deleted row)
        // keeps the accumulator it has: resetting it would forget records.
        let mut ids: Vec<DeviceId> = accs.iter().map(|a| a.device).collect();
        ids.sort_unstable();
        ids.dedup();
        let have = self.inner.replay_accs(&ids)?;
        accs.retain(|a| !have.iter().any(|h| h.device == a.device));
        self.inner.put_replay_accs(&accs)
    }

    /// The pruning high-water if its card tag verifies; None when it
    /// fails (then nothing is counted: see [`SealedTx::count_once`]).
    fn pruned_floor(&mut self) -> Result<Option<u64>> {
        let Some((value, tag)) = self.inner.read_mark(MARK_PRUNED)? else {
            return Ok(Some(0));
        };
        let mut last = self
            .checked_mark
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.as_ref().is_some_and(|(v, t)| *v == value && *t == tag) {
            return Ok(Some(value));
        }
        let want = self
            .card
            .record_tag(&crate::center::mark_bytes(MARK_PRUNED, value))?;
        if bool::from(want[..].ct_eq(&tag[..])) {
            *last = Some((value, tag));
            Ok(Some(value))
        } else {
            tracing::error!(
                value,
                "the pruning high-water fails its card tag (edited from outside): no AUTH, SEALED or \
                 AUTH_RESPONSE is accepted until housekeeping rewrites it"
            );
            metrics::counter!("microcert_mark_tamper_total", "mark" => MARK_PRUNED).increment(1);
            Ok(None)
        }
    }

    /// Records each of `rows` once (the answer: whether this call
    /// inserted it), after checking each device's stored records against
    /// its accumulator (gap 2). A device whose records do not match (one
    /// was deleted, edited or inserted from outside) gets false for all
    /// its records: the message is refused as a replay, and an error is
    /// logged and counted (`microcert_replay_rows_tamper_total`). Once
    /// every record the accumulator ever covered has expired before the
    /// checked pruning high-water (any of them would be refused by it
    /// anyway), the accumulator is rebuilt from the stored rows.
    fn count_once(&mut self, rows: &[ReplayRow]) -> Result<Vec<bool>> {
        let mut answers = vec![false; rows.len()];
        if rows.is_empty() {
            return Ok(answers);
        }
        let Some(floor) = self.pruned_floor()? else {
            return Ok(answers);
        };
        let key = self.key;
        let mut ids: Vec<DeviceId> = rows.iter().map(ReplayRow::device).collect();
        ids.sort_unstable();
        ids.dedup();
        let stored_accs = self.inner.replay_accs(&ids)?;
        let stored = self.inner.replay_rows(&ids)?;
        // Per device: its accumulator, whether it may count, whether it
        // changed.
        let mut accs: Vec<(ReplayAcc, bool, bool)> = Vec::with_capacity(ids.len());
        for &id in &ids {
            let (mut acc, tag_ok) = match stored_accs.iter().find(|a| a.device == id) {
                Some(a) => (*a, bool::from(acc_tag(key, a)?[..].ct_eq(&a.tag[..]))),
                // Every device gets one when it is inserted (or at the
                // one-time cover): a missing one was deleted.
                None => (absent_acc(id), false),
            };
            let mut x = [0u8; 32];
            let mut n = 0u64;
            for r in stored.iter().filter(|r| r.device() == id) {
                xor(&mut x, &row_mac(key, r)?);
                n += 1;
            }
            let same = tag_ok && bool::from(x[..].ct_eq(&acc.acc[..])) && n == acc.count;
            let (ok, changed) = if same {
                (true, false)
            } else if tag_ok && acc.max_expires < floor {
                tracing::warn!(
                    device = %id,
                    "replay records did not match their accumulator, but everything it covered has \
                     expired before the pruning high-water: rebuilt"
                );
                acc.acc = x;
                acc.count = n;
                (true, true)
            } else if tag_ok && acc.count != QUARANTINE {
                tracing::error!(
                    device = %id,
                    "the device's replay records do not match their card-keyed accumulator (a record \
                     deleted, edited or inserted outside the center): its messages are refused"
                );
                metrics::counter!("microcert_replay_rows_tamper_total").increment(1);
                (false, false)
            } else if tag_ok {
                // Quarantined (below), not over yet.
                (false, false)
            } else {
                // Missing, or failing its tag: what it covered is unknown.
                // It is replaced by a quarantine that refuses the device
                // until every record it can have covered has expired
                // before the pruning high-water, then rebuilt (above).
                let until = quarantine_until(rows.iter().filter(|r| r.device() == id));
                tracing::error!(
                    device = %id,
                    until,
                    "the device's replay accumulator is missing or fails its tag (deleted or edited \
                     outside the center): its messages are refused until the pruning high-water \
                     passes the quarantine"
                );
                metrics::counter!("microcert_replay_rows_tamper_total").increment(1);
                acc = ReplayAcc {
                    device: id,
                    acc: x,
                    count: QUARANTINE,
                    max_expires: until,
                    tag: [0; 32],
                };
                (false, true)
            };
            accs.push((acc, ok, changed));
        }
        let slot = |id: DeviceId| ids.binary_search(&id).unwrap_or(0);
        let mut replays = Vec::new();
        let mut at = Vec::new();
        for (k, r) in rows.iter().enumerate() {
            if let ReplayRow::Replay {
                device,
                generation,
                t,
                r,
                expires,
            } = *r
                && accs[slot(device)].1
            {
                replays.push((device, generation, t, r, expires));
                at.push(k);
            }
        }
        if !replays.is_empty() {
            let fresh = self.inner.record_replays_above(&replays, floor)?;
            for (k, f) in at.into_iter().zip(fresh) {
                answers[k] = f;
            }
        }
        for (k, r) in rows.iter().enumerate() {
            if let ReplayRow::Challenge { device, c, expires } = *r
                && accs[slot(device)].1
            {
                answers[k] = self
                    .inner
                    .spend_challenge_above(device, &c, expires, floor)?;
            }
        }
        for (k, r) in rows.iter().enumerate() {
            if answers[k] {
                let e = &mut accs[slot(r.device())];
                xor(&mut e.0.acc, &row_mac(key, r)?);
                e.0.count += 1;
                e.0.max_expires = e.0.max_expires.max(r.expires());
                e.2 = true;
            }
        }
        let out = accs
            .into_iter()
            .filter(|e| e.2)
            .map(|(mut a, _, _)| {
                a.tag = acc_tag(key, &a)?;
                Ok(a)
            })
            .collect::<Result<Vec<ReplayAcc>>>()?;
        if !out.is_empty() {
            self.inner.put_replay_accs(&out)?;
        }
        Ok(answers)
    }
}

impl Tx for SealedTx<'_> {
    fn device(&mut self, id: DeviceId) -> Result<Option<DeviceRow>> {
        self.inner.device(id)
    }
    fn insert_device(&mut self, d: &DeviceRow) -> Result<()> {
        self.inner.insert_device(d)?;
        self.new_accs.push(empty_acc(self.key, d.id)?);
        self.devices
            .add_at(DEVICE_BASE + shard_of(d.id), None, Some(&d.tag));
        Ok(())
    }
    fn update_device(&mut self, d: &DeviceRow) -> Result<()> {
        let old = self.inner.device(d.id)?.map(|o| o.tag);
        self.inner.update_device(d)?;
        if old != Some(d.tag) {
            self.devices
                .add_at(DEVICE_BASE + shard_of(d.id), old.as_ref(), Some(&d.tag));
        }
        Ok(())
    }
    fn seeds(&mut self, id: DeviceId) -> Result<Vec<SeedRow>> {
        self.inner.seeds(id)
    }
    fn seed_by_enroll_nonce(&mut self, id: DeviceId, t: u32, r: u64) -> Result<Option<SeedRow>> {
        self.inner.seed_by_enroll_nonce(id, t, r)
    }
    fn insert_seed(&mut self, s: &SeedRow) -> Result<()> {
        self.inner.insert_seed(s)
    }
    fn update_seed(&mut self, s: &SeedRow) -> Result<()> {
        self.inner.update_seed(s)
    }
    fn record_replay(&mut self, (device, generation, t, r, expires): ReplayKey) -> Result<bool> {
        let row = ReplayRow::Replay {
            device,
            generation,
            t,
            r,
            expires,
        };
        Ok(self.count_once(&[row])?[0])
    }
    fn record_replays(&mut self, rows: &[ReplayKey]) -> Result<Vec<bool>> {
        let rows: Vec<ReplayRow> = rows
            .iter()
            .map(|&(device, generation, t, r, expires)| ReplayRow::Replay {
                device,
                generation,
                t,
                r,
                expires,
            })
            .collect();
        self.count_once(&rows)
    }
    fn spend_challenge(&mut self, id: DeviceId, c: &[u8; 8], expires: u64) -> Result<bool> {
        let row = ReplayRow::Challenge {
            device: id,
            c: *c,
            expires,
        };
        Ok(self.count_once(&[row])?[0])
    }
    // The four raw replay writes below are the sealing layer's own tools
    // (count_once, prune, the upgrade and the restore use the inner
    // transaction): through the seal they are refused, so no caller can
    // write a record, a pruning or an accumulator that is not in step
    // with its tag.
    fn record_replays_above(&mut self, rows: &[ReplayKey], floor: u64) -> Result<Vec<bool>> {
        let _ = (rows, floor);
        Err(raw_replay_write())
    }
    fn spend_challenge_above(&mut self, d: DeviceId, c: &[u8; 8], e: u64, m: u64) -> Result<bool> {
        let _ = (d, c, e, m);
        Err(raw_replay_write())
    }
    fn marks(&mut self) -> Result<Vec<(String, u64, Vec<u8>)>> {
        self.inner.marks()
    }
    fn replay_rows(&mut self, ids: &[DeviceId]) -> Result<Vec<ReplayRow>> {
        self.inner.replay_rows(ids)
    }
    fn replay_accs(&mut self, ids: &[DeviceId]) -> Result<Vec<ReplayAcc>> {
        self.inner.replay_accs(ids)
    }
    fn put_replay_accs(&mut self, accs: &[ReplayAcc]) -> Result<()> {
        let _ = accs;
        Err(raw_replay_write())
    }
    fn prune_replay_rows(&mut self, now: u64, limit: usize) -> Result<Vec<ReplayRow>> {
        let _ = (now, limit);
        Err(raw_replay_write())
    }
    fn prefetch_devices(&mut self, ids: &[DeviceId]) -> Result<()> {
        self.inner.prefetch_devices(ids)
    }
    // High-water marks carry their own card tags (crate::clock, the replay
    // pruning mark); each also has its place in the marks' digest shard,
    // so a deleted or put-back mark is found (gap 3).
    fn high_water(&mut self, name: &str) -> Result<Option<(u64, Vec<u8>)>> {
        self.inner.high_water(name)
    }
    fn read_mark(&mut self, name: &str) -> Result<Option<(u64, Vec<u8>)>> {
        self.inner.read_mark(name)
    }
    fn set_high_water(&mut self, name: &str, value: u64, tag: &[u8]) -> Result<()> {
        let old = self.inner.high_water(name)?.map(|(_, t)| tag32(&t));
        self.inner.set_high_water(name, value, tag)?;
        self.shard(MARK_SHARD, old.as_ref(), Some(&tag32(tag)))
    }
    fn notarize(&mut self, n: &NotaryRow) -> Result<(NotaryRow, bool)> {
        let mut row = n.clone();
        row.seal = Some(self.card.record_tag(&super::notary_bytes(&row))?);
        let (stored, inserted) = self.inner.notarize(&row)?;
        if inserted {
            self.shard(NOTARY_BASE + shard_of(n.device), None, row.seal.as_ref())?;
        } else {
            super::check_notary(self.card, &stored)?;
        }
        Ok((stored, inserted))
    }
    /// A raw insert would skip the notary shard: refused through the seal
    /// ([`Tx::notarize`] is its path).
    fn insert_notary(&mut self, n: &NotaryRow) -> Result<bool> {
        let _ = n;
        Err(Error::db(
            crate::DbFailure::Unsupported,
            "notary records are inserted only through notarize",
        ))
    }
    fn notary(
        &mut self,
        (id, generation, t, r, digest): NotaryKey<'_>,
    ) -> Result<Option<NotaryRow>> {
        let found = self.inner.notary((id, generation, t, r, digest))?;
        if let Some(n) = &found {
            super::check_notary(self.card, n)?;
        }
        Ok(found)
    }
    fn set_seed_tag(&mut self, id: DeviceId, generation: u8, tag: &[u8; 32]) -> Result<()> {
        self.inner.set_seed_tag(id, generation, tag)
    }
    fn set_notary_seal(&mut self, n: &NotaryRow) -> Result<()> {
        self.inner.set_notary_seal(n)
    }
    fn command(&mut self, id: DeviceId) -> Result<Option<CommandRow>> {
        Ok(self.command_sealed(id)?.map(|(c, _)| c))
    }
    fn put_command(&mut self, c: &CommandRow) -> Result<()> {
        self.put_command_sealed(c, None)
    }
    fn command_sealed(&mut self, id: DeviceId) -> Result<Option<(CommandRow, Option<[u8; 32]>)>> {
        let found = self.inner.command_sealed(id)?;
        if let Some((c, seal)) = &found {
            super::check_command(self.card, c, seal.as_ref())?;
        }
        Ok(found)
    }
    /// The seal is always the card's own over `c` (a caller's is ignored).
    fn put_command_sealed(&mut self, c: &CommandRow, _seal: Option<&[u8; 32]>) -> Result<()> {
        let old = self.inner.command_sealed(c.device)?.and_then(|(_, s)| s);
        let seal = self.card.record_tag(&super::command_bytes(c))?;
        self.inner.put_command_sealed(c, Some(&seal))?;
        self.shard(COMMAND_BASE + shard_of(c.device), old.as_ref(), Some(&seal))
    }
    fn digest_shard(&mut self, shard: u8) -> Result<Option<DigestShard>> {
        self.settle()?;
        self.inner.digest_shard(shard)
    }
    fn put_digest_shard(&mut self, s: &DigestShard) -> Result<()> {
        self.settle()?;
        self.inner.put_digest_shard(s)
    }
    fn append_audit(&mut self, e: &NewAudit) -> Result<()> {
        self.inner.append_audit(e)
    }
    fn delete_audit_through(&mut self, through: u64) -> Result<u64> {
        self.inner.delete_audit_through(through)
    }
    fn delete_notary(&mut self, n: &NotaryRow) -> Result<bool> {
        // The stored row (its seal checked) leaves its shard.
        let Some(stored) = self
            .inner
            .notary((n.device, n.generation, n.t, n.r, &n.digest))?
        else {
            return Ok(false);
        };
        super::check_notary(self.card, &stored)?;
        let gone = self.inner.delete_notary(&stored)?;
        if gone {
            self.shard(NOTARY_BASE + shard_of(n.device), stored.seal.as_ref(), None)?;
        }
        Ok(gone)
    }
    fn insert_audit_record(&mut self, r: &AuditRecord) -> Result<()> {
        self.inner.insert_audit_record(r)
    }
    fn audit_sink_record(&mut self, entries: &[AuditRecord]) -> Result<()> {
        self.inner.audit_sink_record(entries)?;
        match self.sink {
            Some(s) => crate::audit::record_in_sink(s, entries),
            None => Ok(()),
        }
    }
    // import_progress / set_import_progress: the trait's defaults, which
    // go through the two sealed methods below.
    /// A row without a seal (written before seals existed) counts as
    /// absent: the import starts again from the first line, which is
    /// idempotent. A row whose seal fails is refused.
    fn import_progress_sealed(
        &mut self,
        file: &[u8; 32],
    ) -> Result<Option<(u64, Option<[u8; 32]>)>> {
        match self.inner.import_progress_sealed(file)? {
            Some((_, None)) => Ok(None),
            Some((n, Some(seal))) => {
                super::check_import(self.card, file, n, &seal)?;
                Ok(Some((n, Some(seal))))
            }
            None => Ok(None),
        }
    }
    fn set_import_progress_sealed(&mut self, p: &ImportMark<'_>) -> Result<()> {
        let ImportMark {
            file,
            next_line,
            now,
            seal: _,
        } = *p;
        let seal = self
            .card
            .record_tag(&super::import_bytes(file, next_line))?;
        self.inner.set_import_progress_sealed(&ImportMark {
            file,
            next_line,
            now,
            seal: Some(&seal),
        })
    }
    fn delete_seed(&mut self, id: DeviceId, generation: u8) -> Result<bool> {
        self.inner.delete_seed(id, generation)
    }
    // Tokens (issue 14): tagged and checked by the center's token service
    // (crate::tokens), which also needs them outside a transaction; each
    // has its place in a token digest shard (gap 3), so a row put back to
    // its copy from before a revocation no longer matches it.
    fn tokens(&mut self) -> Result<Vec<TokenRow>> {
        self.inner.tokens()
    }
    fn insert_token(&mut self, t: &TokenRow) -> Result<()> {
        self.inner.insert_token(t)?;
        self.shard(token_shard(&t.hash), None, Some(&tag32(&t.tag)))
    }
    fn update_token(&mut self, t: &TokenRow) -> Result<()> {
        let old = self
            .inner
            .tokens()?
            .into_iter()
            .find(|o| o.hash == t.hash)
            .map(|o| tag32(&o.tag));
        self.inner.update_token(t)?;
        self.shard(token_shard(&t.hash), old.as_ref(), Some(&tag32(&t.tag)))
    }
}

impl KeyDatabase for Sealed {
    fn transaction(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<()>) -> Result<()> {
        self.inner.transaction(&mut |tx| {
            let mut s = self.tx(tx)?;
            f(&mut s)?;
            s.settle()?;
            s.finish()
        })
    }
    fn read_transaction(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<()>) -> Result<()> {
        self.inner.read_transaction(&mut |tx| {
            let mut s = self.tx(tx)?;
            f(&mut s)?;
            s.settle()?;
            s.finish()
        })
    }
    fn list_marks(&self) -> Result<Vec<(String, u64, Vec<u8>)>> {
        self.inner.list_marks()
    }
    fn load_device(&self, id: DeviceId) -> Result<Option<(DeviceRow, Vec<SeedRow>)>> {
        self.inner.load_device(id)
    }
    fn meta(&self, key: &str) -> Result<Option<String>> {
        self.inner.meta(key)
    }
    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.inner.set_meta(key, value)
    }
    fn list_tokens(&self) -> Result<Vec<crate::db::TokenRow>> {
        self.inner.list_tokens()
    }
    fn note_token_use(&self, hash: &str, last_used: Option<u64>, failures: u64) -> Result<()> {
        self.inner.note_token_use(hash, last_used, failures)
    }
    fn device_view(&self, id: DeviceId) -> Result<Option<DeviceView>> {
        self.inner.device_view(id)
    }
    fn list_devices(&self, q: &DeviceQuery) -> Result<Vec<DeviceView>> {
        self.inner.list_devices(q)
    }
    fn devices_due(&self, y: u16, after: Option<DeviceId>, limit: usize) -> Result<Vec<DeviceId>> {
        self.inner.devices_due(y, after, limit)
    }
    fn devices_to_expire(&self, now: u64, year_now: u16, limit: usize) -> Result<Vec<DeviceId>> {
        self.inner.devices_to_expire(now, year_now, limit)
    }
    fn scan_seeds(&self, after: Option<(DeviceId, u8)>, limit: usize) -> Result<Vec<SeedRow>> {
        self.inner.scan_seeds(after, limit)
    }
    fn digest_shards(&self) -> Result<Vec<DigestShard>> {
        self.inner.digest_shards()
    }
    fn audit_log(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>> {
        self.inner.audit_log(after, limit)
    }
    /// Deletes expired replay records and spent challenges, a chunk per
    /// transaction, taking each out of its device's accumulator in the
    /// same transaction (an accumulator failing its tag is left as it is:
    /// the device stays refused).
    fn prune(&self, now: u64) -> Result<u64> {
        let key = self.row_key()?;
        let mut total = 0u64;
        loop {
            let mut n = 0usize;
            self.inner.transaction(&mut |tx| {
                let gone = tx.prune_replay_rows(now, PRUNE_CHUNK)?;
                n = gone.len();
                let mut ids: Vec<DeviceId> = gone.iter().map(ReplayRow::device).collect();
                ids.sort_unstable();
                ids.dedup();
                if ids.is_empty() {
                    return Ok(());
                }
                let accs = tx.replay_accs(&ids)?;
                let mut out = Vec::with_capacity(accs.len());
                for mut a in accs {
                    if !bool::from(acc_tag(key, &a)?[..].ct_eq(&a.tag[..])) {
                        continue;
                    }
                    for r in gone.iter().filter(|r| r.device() == a.device) {
                        xor(&mut a.acc, &row_mac(key, r)?);
                        a.count = a.count.saturating_sub(1);
                    }
                    a.tag = acc_tag(key, &a)?;
                    out.push(a);
                }
                tx.put_replay_accs(&out)
            })?;
            total += n as u64;
            if n < PRUNE_CHUNK {
                return Ok(total);
            }
        }
    }
    fn scan_notary(&self, after: Option<&NotaryRow>, limit: usize) -> Result<Vec<NotaryRow>> {
        self.inner.scan_notary(after, limit)
    }
    fn scan_commands(
        &self,
        after: Option<DeviceId>,
        limit: usize,
    ) -> Result<Vec<(CommandRow, Option<[u8; 32]>)>> {
        self.inner.scan_commands(after, limit)
    }
    fn migrated_from(&self) -> Option<u32> {
        self.inner.migrated_from()
    }
    fn unsealed(&self) -> Option<&dyn KeyDatabase> {
        Some(&*self.inner)
    }
    fn set_audit_sink(&self, sink: Arc<dyn AuditSink>) -> bool {
        self.sink.set(sink).is_ok()
    }
    fn flush_erased(&self) -> Result<()> {
        self.inner.flush_erased()
    }
    fn watch_changes(&self, on_change: ChangeHook) -> Result<()> {
        self.inner.watch_changes(on_change)
    }
    fn read_snapshot(
        &self,
        f: &mut dyn FnMut(Option<&dyn KeyDatabase>) -> Result<()>,
    ) -> Result<()> {
        self.inner.read_snapshot(f)
    }
    fn read_device_unlocked(&self, id: DeviceId) -> Option<Result<crate::db::DeviceRecords>> {
        self.inner.read_device_unlocked(id)
    }
    fn set_bulk(&self, on: bool) -> Result<()> {
        self.inner.set_bulk(on)
    }
    fn local_path(&self) -> Option<&std::path::Path> {
        self.inner.local_path()
    }
}

/// The refusal of a raw replay-record or accumulator write made through
/// the sealing layer.
fn raw_replay_write() -> Error {
    Error::db(
        crate::DbFailure::Unsupported,
        "replay records and accumulators are written only by the sealing layer's own paths",
    )
}
