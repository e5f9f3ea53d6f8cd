//! The center's sealing layer: a [`KeyDatabase`] wrapper that puts the
//! card's tag on every notary record, command and device row the services
//! write, places each in its digest shard in the same transaction, and
//! checks the tag of every notary record and command it reads (refusing
//! one that fails with [`Error::Integrity`]).
//!
//! Why a wrapper: the services write commands and device rows in many
//! places; sealing them where they are written to the database means no
//! write can forget it. Seed records keep their explicit tags and digest
//! changes in the services ([`super::retag`], [`super::apply_change`]).
//!
//! Every method of [`Tx`] and [`KeyDatabase`] must be forwarded here: a
//! method added to either trait with a default body is otherwise answered
//! by the default, not by the backend.

use std::sync::Arc;

use microcert_core::DeviceId;

use super::{COMMAND_BASE, DEVICE_BASE, NOTARY_BASE, shard_of};
use crate::Result;
use crate::card::EncryptionCard;
use crate::db::{
    AuditRecord, ChangeHook, CommandRow, DeviceQuery, DeviceRow, DeviceView, DigestShard,
    KeyDatabase, NewAudit, NotaryRow, SeedRow, Tx,
};

/// A key database whose notary records, commands and device rows carry
/// the card's tag and a place in the digest.
pub struct Sealed {
    inner: Arc<dyn KeyDatabase>,
    card: Arc<dyn EncryptionCard>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Sealed {
    /// Wraps `inner`.
    pub fn wrap(inner: Arc<dyn KeyDatabase>, card: Arc<dyn EncryptionCard>) -> Arc<Self> {
        Arc::new(Sealed { inner, card })
    }

    /// The database without the sealing layer.
    pub fn inner(&self) -> &Arc<dyn KeyDatabase> {
        &self.inner
    }
}

struct SealedTx<'a> {
    inner: &'a mut dyn Tx,
    card: &'a dyn EncryptionCard,
    /// Device rows' digest changes not applied yet: applied before any
    /// digest row is read or written through this transaction and when
    /// its closure returns, so they commit with the rows (a batch import
    /// reads and writes each device shard once per chunk, not once per
    /// device).
    devices: super::DigestDelta,
}

impl<'a> SealedTx<'a> {
    fn new(inner: &'a mut dyn Tx, card: &'a dyn EncryptionCard) -> Self {
        SealedTx {
            inner,
            card,
            devices: super::DigestDelta::default(),
        }
    }

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
}

impl Tx for SealedTx<'_> {
    fn device(&mut self, id: DeviceId) -> Result<Option<DeviceRow>> {
        self.inner.device(id)
    }
    fn insert_device(&mut self, d: &DeviceRow) -> Result<()> {
        self.inner.insert_device(d)?;
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
    fn record_replay(
        &mut self,
        id: DeviceId,
        generation: u8,
        t: u32,
        r: u64,
        expires: u64,
    ) -> Result<bool> {
        self.inner.record_replay(id, generation, t, r, expires)
    }
    fn spend_challenge(&mut self, id: DeviceId, c: &[u8; 8], expires: u64) -> Result<bool> {
        self.inner.spend_challenge(id, c, expires)
    }
    // High-water marks carry their own card tags (crate::clock, the replay
    // pruning mark): passed through.
    fn high_water(&mut self, name: &str) -> Result<Option<(u64, Vec<u8>)>> {
        self.inner.high_water(name)
    }
    fn set_high_water(&mut self, name: &str, value: u64, tag: &[u8]) -> Result<()> {
        self.inner.set_high_water(name, value, tag)
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
    fn notary(
        &mut self,
        id: DeviceId,
        generation: u8,
        t: u32,
        r: u64,
        digest: &[u8; 32],
    ) -> Result<Option<NotaryRow>> {
        let found = self.inner.notary(id, generation, t, r, digest)?;
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
    fn record_replays(&mut self, rows: &[(DeviceId, u8, u32, u64, u64)]) -> Result<Vec<bool>> {
        self.inner.record_replays(rows)
    }
    fn prefetch_devices(&mut self, ids: &[DeviceId]) -> Result<()> {
        self.inner.prefetch_devices(ids)
    }
    fn append_audit(&mut self, e: &NewAudit) -> Result<()> {
        self.inner.append_audit(e)
    }
    fn import_progress(&mut self, file: &[u8; 32]) -> Result<Option<u64>> {
        Ok(self.import_progress_sealed(file)?.map(|(n, _)| n))
    }
    fn set_import_progress(&mut self, file: &[u8; 32], next_line: u64, now: u64) -> Result<()> {
        self.set_import_progress_sealed(file, next_line, now, None)
    }
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
    fn set_import_progress_sealed(
        &mut self,
        file: &[u8; 32],
        next_line: u64,
        now: u64,
        _seal: Option<&[u8; 32]>,
    ) -> Result<()> {
        let seal = self
            .card
            .record_tag(&super::import_bytes(file, next_line))?;
        self.inner
            .set_import_progress_sealed(file, next_line, now, Some(&seal))
    }
    fn delete_seed(&mut self, id: DeviceId, generation: u8) -> Result<bool> {
        self.inner.delete_seed(id, generation)
    }
    // Tokens (issue 14): tagged and checked by the center's token service
    // (crate::tokens), which also needs them outside a transaction.
    fn tokens(&mut self) -> Result<Vec<crate::db::TokenRow>> {
        self.inner.tokens()
    }
    fn insert_token(&mut self, t: &crate::db::TokenRow) -> Result<()> {
        self.inner.insert_token(t)
    }
    fn update_token(&mut self, t: &crate::db::TokenRow) -> Result<()> {
        self.inner.update_token(t)
    }
}

impl KeyDatabase for Sealed {
    fn transaction(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<()>) -> Result<()> {
        let card = &*self.card;
        self.inner.transaction(&mut |tx| {
            let mut s = SealedTx::new(tx, card);
            f(&mut s)?;
            s.settle()
        })
    }
    fn read_transaction(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<()>) -> Result<()> {
        let card = &*self.card;
        self.inner.read_transaction(&mut |tx| {
            let mut s = SealedTx::new(tx, card);
            f(&mut s)?;
            s.settle()
        })
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
    fn devices_due(
        &self,
        max_base_year: u16,
        after: Option<DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceId>> {
        self.inner.devices_due(max_base_year, after, limit)
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
    fn prune(&self, now: u64) -> Result<u64> {
        self.inner.prune(now)
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
    fn load_device(&self, id: DeviceId) -> Result<Option<(DeviceRow, Vec<SeedRow>)>> {
        self.inner.load_device(id)
    }
    fn local_path(&self) -> Option<&std::path::Path> {
        self.inner.local_path()
    }
}
