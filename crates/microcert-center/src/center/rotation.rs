//! Storage-key rotation: a new Kstore version, every seed re-sealed under
//! it in batches while the center keeps serving, old versions destroyed
//! once nothing needs them.
//!
//! Resumable by construction: the card makes the new version durable (and
//! current) before any record is re-sealed, each batch is one transaction
//! (re-seal, new tag, digest, one audit entry), and which records are left
//! is read from the records themselves (their `kstore_version`). A run
//! killed at any point is finished by running it again: it finds records
//! under an older version and carries on without making another version.
//! Concurrent enrollments seal under the new version already; a device
//! being re-sealed is locked by its transaction like any other change.

use std::path::Path;

use microcert_core::DeviceId;

use super::Center;
use crate::db::{Blob, with_tx};
use crate::integrity::{self, DigestDelta};
use crate::{Error, Result};

/// Old Kstore versions destroyed, and those kept with the reason.
pub type StorageKeyCleanup = (Vec<u32>, Vec<(u32, String)>);

/// What [`Center::rotate_storage_key`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// The Kstore version every seed is now under.
    pub version: u32,
    /// Whether this run finished an interrupted rotation (no new version made).
    pub resumed: bool,
    /// Seeds re-sealed by this run.
    pub resealed: u64,
    /// Devices left out because their records fail the integrity check
    /// (quarantined; repair them, then run the rotation again).
    pub skipped: Vec<DeviceId>,
    /// Old versions destroyed on the card.
    pub destroyed: Vec<u32>,
    /// Old versions kept, with the reason.
    pub kept: Vec<(u32, String)>,
}

impl Center {
    /// Rotates the storage key (see the module docs). `backups` is the
    /// backup directory: an old version that a kept backup still names is
    /// not destroyed (that backup could not be restored otherwise).
    /// `progress` gets the running count of re-sealed seeds after each
    /// committed batch.
    pub fn rotate_storage_key(
        &self,
        batch: usize,
        backups: Option<&Path>,
        actor: &str,
        now: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<RotationReport> {
        let mut report = RotationReport::default();
        let left = self.old_version_records(1)?;
        if left.is_empty() {
            let v = self.card.rotate_storage_key()?;
            with_tx(&*self.db, |tx| {
                self.audit(
                    tx,
                    now,
                    actor,
                    "rotate-storage-key",
                    (None, None),
                    &format!("new storage key version {v}; re-sealing every seed"),
                )
            })?;
        } else {
            report.resumed = true;
        }
        let current = self.card.storage_key_version();
        report.version = current;
        let batch = batch.max(1);
        let mut after: Option<(DeviceId, u8)> = None;
        loop {
            let ids = self.next_devices(&mut after, batch)?;
            if ids.is_empty() {
                break;
            }
            for chunk in ids.chunks(batch) {
                let (done, skipped) = self.reseal_devices(chunk, current, actor, now)?;
                report.resealed += done;
                report.skipped.extend(skipped);
                progress(report.resealed);
            }
        }
        let (destroyed, kept) =
            self.destroy_unused_storage_keys(backups, !report.skipped.is_empty(), actor, now)?;
        report.destroyed = destroyed;
        report.kept = kept;
        Ok(report)
    }

    /// Destroys every old Kstore version that no record and no backup in
    /// `backups` (that verifies) uses, audited; returns (destroyed, kept
    /// with the reason). Run after a rotation (it does) and again after old
    /// backups rotated out, which is when a version kept for a backup goes.
    pub fn destroy_unused_storage_keys(
        &self,
        backups: Option<&Path>,
        quarantined: bool,
        actor: &str,
        now: u64,
    ) -> Result<StorageKeyCleanup> {
        let current = self.card.storage_key_version();
        let mut records = self.versions_in_records()?;
        if self
            .card
            .storage_key_versions()
            .iter()
            .any(|v| *v != current && !records.contains(v))
        {
            // Another process on this database (a serving center beside
            // this command) may have sealed a seed under the old version
            // just before it saw the new one, in a transaction not yet
            // committed: let it commit, then look again. With the keyring
            // in the database, the other centers see the new version
            // within keyring::REFRESH: wait that long too.
            let wait = if self.uses_keyring() {
                crate::keyring::REFRESH + std::time::Duration::from_secs(1)
            } else {
                std::time::Duration::from_secs(1)
            };
            std::thread::sleep(wait);
            records = self.versions_in_records()?;
        }
        let in_backups = match backups {
            Some(dir) => crate::backup::versions_in_use(dir, &*self.card)?,
            None => Vec::new(),
        };
        let in_commands = self.versions_in_pending_commands()?;
        let mut destroyed = Vec::new();
        let mut kept = Vec::new();
        for v in self.card.storage_key_versions() {
            if v == current {
                continue;
            }
            if records.contains(&v) {
                let why = if quarantined {
                    "records that fail the integrity check are sealed under it"
                } else {
                    "records are still sealed under it (rotation not finished)"
                };
                kept.push((v, why.to_string()));
                continue;
            }
            if in_backups.contains(&v) {
                kept.push((v, "a kept backup is sealed under it".to_string()));
                continue;
            }
            if in_commands.contains(&v) {
                kept.push((
                    v,
                    "a pending UPDATE_SEED_FS keeps its ephemeral key sealed under it".to_string(),
                ));
                continue;
            }
            self.card.destroy_storage_key(v)?;
            with_tx(&*self.db, |tx| {
                self.audit(
                    tx,
                    now,
                    actor,
                    "destroy-storage-key",
                    (None, None),
                    &format!("version {v}: no record and no kept backup uses it"),
                )
            })?;
            destroyed.push(v);
        }
        Ok((destroyed, kept))
    }

    /// Up to `limit` records with a ciphertext under another version than
    /// the card's current one.
    fn old_version_records(&self, limit: usize) -> Result<Vec<(DeviceId, u8)>> {
        let current = self.card.storage_key_version();
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self.db.scan_seeds(after, 1000)?;
            let Some(last) = page.last() else { break };
            after = Some((last.device, last.generation));
            out.extend(
                page.iter()
                    .filter(|s| s.ciphertext.is_some() && s.kstore_version != current)
                    .map(|s| (s.device, s.generation)),
            );
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The next devices (at most `limit`) with a record to re-seal.
    fn next_devices(
        &self,
        after: &mut Option<(DeviceId, u8)>,
        limit: usize,
    ) -> Result<Vec<DeviceId>> {
        let current = self.card.storage_key_version();
        let mut ids: Vec<DeviceId> = Vec::new();
        while ids.len() < limit {
            let page = self.db.scan_seeds(*after, 1000)?;
            let Some(last) = page.last() else { break };
            *after = Some((last.device, last.generation));
            for s in &page {
                if s.ciphertext.is_some()
                    && s.kstore_version != current
                    && ids.last() != Some(&s.device)
                {
                    ids.push(s.device);
                }
            }
        }
        Ok(ids)
    }

    /// The Kstore versions of the ephemeral keys sealed in pending
    /// UPDATE_SEED_FS commands (v1.2): destroying one would leave that
    /// update unanswerable.
    fn versions_in_pending_commands(&self) -> Result<Vec<u32>> {
        let mut q = crate::db::DeviceQuery {
            limit: 500,
            ..Default::default()
        };
        let mut v = Vec::new();
        loop {
            let page = self.db.list_devices(&q)?;
            let Some(last) = page.last() else { break };
            q.after = Some(last.device.id);
            for d in &page {
                let cmd = crate::db::with_read_tx(&*self.db, |tx| tx.command(d.device.id))?;
                if let Some(ver) = cmd
                    .filter(|c| c.answered_at.is_none())
                    .and_then(|c| super::fsupdate::sealed_version(&c))
                {
                    v.push(ver);
                }
            }
            v.sort_unstable();
            v.dedup();
        }
        Ok(v)
    }

    fn versions_in_records(&self) -> Result<Vec<u32>> {
        let mut v = Vec::new();
        let mut after = None;
        loop {
            let page = self.db.scan_seeds(after, 1000)?;
            let Some(last) = page.last() else { break };
            after = Some((last.device, last.generation));
            v.extend(
                page.iter()
                    .filter(|s| s.ciphertext.is_some())
                    .map(|s| s.kstore_version),
            );
            v.sort_unstable();
            v.dedup();
        }
        Ok(v)
    }

    /// One batch in one transaction; a device whose records fail the
    /// integrity check is skipped (the rest of the batch goes on).
    fn reseal_devices(
        &self,
        ids: &[DeviceId],
        current: u32,
        actor: &str,
        now: u64,
    ) -> Result<(u64, Vec<DeviceId>)> {
        for &id in ids {
            self.cache.invalidate(id);
        }
        let r = with_tx(&*self.db, |tx| {
            let mut delta = DigestDelta::default();
            let mut n = 0u64;
            let mut skipped = Vec::new();
            for &id in ids {
                match self.device_in(tx, id) {
                    Ok(_) => {}
                    Err(Error::Integrity(_)) => {
                        skipped.push(id);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                let mut seeds = match self.seeds_checked(tx, id) {
                    Ok(s) => s,
                    Err(Error::Integrity(_)) => {
                        skipped.push(id);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                for row in seeds.iter_mut() {
                    if row.ciphertext.is_none() || row.kstore_version == current {
                        continue;
                    }
                    let seed = self.unseal(row)?;
                    let sealed = self.card.seal_seed(row.device, row.generation, &seed)?;
                    drop(seed);
                    if sealed.kstore_version != current {
                        return Err(Error::Card(
                            "the card's storage key changed during the rotation".into(),
                        ));
                    }
                    let old_tag = row.tag;
                    if let Some(ct) = row.ciphertext.as_mut() {
                        ct.0.fill(0);
                    }
                    row.ciphertext = Some(Blob(sealed.ciphertext));
                    row.kstore_version = sealed.kstore_version;
                    integrity::retag(&*self.card, row)?;
                    tx.update_seed(row)?;
                    delta.add(row.device, Some(&old_tag), &row.tag);
                    n += 1;
                }
            }
            delta.flush(tx, &*self.card)?;
            if n > 0 {
                self.audit(
                    tx,
                    now,
                    actor,
                    "reseal",
                    (None, None),
                    &format!("{n} seeds re-sealed under storage key version {current}"),
                )?;
            }
            Ok((n, skipped))
        });
        for &id in ids {
            self.cache.invalidate(id);
        }
        r
    }
}
