//! `integrity repair`: put tampered, deleted or forged records right from
//! backups, only where the result matches what the card vouches for.
//!
//! # Rules
//!
//! - The reference is the card, never a backup: each record shard's
//!   card-tagged (acc, count) pins the exact set of record tags the shard
//!   must hold. A repair of a shard is a choice of rows (current rows whose
//!   tag is good, and backup copies) whose tags XOR to acc and count to
//!   count. Backups are tried newest first; a backup's copy is used only
//!   when it is what makes the shard match, so an old copy can never
//!   undo a later legitimate change (a revocation, say) unnoticed.
//! - Per shard, two candidates per backup: (a) keep every current row with
//!   a good tag, fill in from the backup what is bad or missing; (b) take
//!   the backup's rows, plus current good rows the backup does not have
//!   (for a row put back to an older valid copy of itself, which only the
//!   shard shows). Rows with a bad tag and no backup copy (forged inserts)
//!   are deleted when that makes the shard match.
//! - A shard whose own tag is bad, the audit log altered, or a database
//!   older than the card's anchor are not repaired record by record: the
//!   first two are refused with the reason, the last is a whole-database
//!   restore from the newest backup at or above the anchor
//!   ([`restore_sqlite_file`]), refused when no backup reaches the anchor
//!   (the changes after the newest backup would be lost: the operator
//!   decides, with `backup restore`).
//! - Every repaired record is audited ("repair"), and the seed cache is
//!   dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use microcert_core::DeviceId;

use crate::backup::{self, Backup};
use crate::db::{DigestShard, NewAudit, SeedRow, with_tx};
use crate::integrity::{self, SHARDS};
use crate::{Center, Error, Result};

/// What a repair did, and what it refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Records put back from a backup (changed or deleted ones).
    pub restored: Vec<(DeviceId, u8)>,
    /// Records deleted (inserted outside the center).
    pub removed: Vec<(DeviceId, u8)>,
    /// Device rows put back from a backup.
    pub devices: Vec<DeviceId>,
    /// Backups used.
    pub used: Vec<PathBuf>,
    /// What could not be repaired, and why.
    pub refused: Vec<String>,
    /// The database is older than the card's anchor: restore this backup
    /// as a whole ([`restore_sqlite_file`]). None when not needed or when
    /// no backup qualifies (then `refused` says why).
    pub whole_restore: Option<PathBuf>,
    /// Token digest shards made whole again (their tokens revoked:
    /// [`Center::repair_token_shards`]).
    pub token_shards: usize,
    /// The marks' digest shard was made whole again (the marks set to
    /// their safe values: [`Center::repair_mark_shard`]).
    pub marks: bool,
}

type Key = (DeviceId, u8);

fn xor_count<'a>(rows: impl Iterator<Item = &'a SeedRow>) -> ([u8; 32], u64) {
    let mut acc = [0u8; 32];
    let mut n = 0;
    for r in rows {
        for (a, t) in acc.iter_mut().zip(&r.tag) {
            *a ^= t;
        }
        n += 1;
    }
    (acc, n)
}

/// The rows a shard should hold, chosen from its current rows and one
/// backup, or None when no candidate matches the card's shard.
fn plan_shard(
    card: &dyn crate::EncryptionCard,
    stored: &DigestShard,
    current: &BTreeMap<Key, SeedRow>,
    from: &Backup,
    shard: u8,
) -> Result<Option<BTreeMap<Key, SeedRow>>> {
    let mut good = BTreeMap::new();
    for (k, r) in current {
        if integrity::check_record(card, r).is_ok() {
            good.insert(*k, r.clone());
        }
    }
    let theirs: BTreeMap<Key, SeedRow> = from
        .seeds
        .iter()
        .filter(|s| integrity::shard_of(s.device) == shard)
        .map(|s| ((s.device, s.generation), s.clone()))
        .collect();
    let mut a = good.clone();
    for (k, r) in &theirs {
        a.entry(*k).or_insert_with(|| r.clone());
    }
    let mut b = theirs.clone();
    for (k, r) in &good {
        b.entry(*k).or_insert_with(|| r.clone());
    }
    for cand in [a, b] {
        if xor_count(cand.values()) == (stored.acc, stored.count) {
            return Ok(Some(cand));
        }
    }
    Ok(None)
}

impl Center {
    /// Repairs what [`Center::integrity_check`] finds from the backups in
    /// `backups` (see the module docs for the rules). Refused parts are
    /// listed with their reason; nothing is changed for them.
    pub fn repair(
        &self,
        backups: &Path,
        anchor: Option<&Path>,
        actor: &str,
        now: u64,
    ) -> Result<RepairReport> {
        let card = self.card();
        let db = self.database();
        let found = self.integrity_check(anchor, now)?;
        let mut out = RepairReport::default();
        if found.is_clean() {
            return Ok(out);
        }
        let mut valid = Vec::new();
        for p in backup::list(backups)? {
            match backup::read(&p, card) {
                Ok(b) => valid.push((p, b)),
                Err(e) => out
                    .refused
                    .push(format!("backup {} not used: {e}", p.display())),
            }
        }
        if let Some(a) = found.anchor.as_deref().filter(|a| a.contains("keyring")) {
            out.refused.push(format!(
                "{a}: put the keyring back with `backup restore` of a backup taken after the last rotation, or, if the keyring really is the newest one, reset the anchor with `integrity repair` after a restore; nothing is changed here"
            ));
        }
        // Token and mark shards behind the anchor (rows put back with
        // their shard rows) are repaired in place below; only records and
        // the audit log need a whole restore.
        let records_behind = found
            .rolled_back_shards
            .iter()
            .any(|&s| s < integrity::ALL_SHARDS);
        if records_behind
            || found
                .audit
                .as_deref()
                .is_some_and(|a| a.contains("older copy"))
        {
            let a = match anchor {
                Some(p) => crate::anchor::load(p, card)?,
                None => None,
            };
            match (a, valid.first()) {
                (Some(a), Some((p, b))) if a.records_covered_by(&b.mark()) => {
                    out.whole_restore = Some(p.clone());
                }
                (_, Some((p, _))) => out.refused.push(format!(
                    "the database is an older copy of itself, and the newest valid backup ({}) is older than the card's anchor too: restoring it would lose changes; restore a backup explicitly with `backup restore` if that is acceptable",
                    p.display()
                )),
                (_, None) => out.refused.push(
                    "the database is an older copy of itself and there is no valid backup".into(),
                ),
            }
            return Ok(out);
        }
        if let Some(a) = &found.audit {
            out.refused.push(format!(
                "audit log: {a}; an append-only log is not edited in place: restore the whole database from a backup (`backup restore`)"
            ));
        }
        // Shards to repair: those that do not match, and those of named records.
        let mut shards: BTreeSet<u8> = found.bad_shards.iter().copied().collect();
        shards.extend(
            found
                .bad_records
                .iter()
                .chain(&found.missing_records)
                .map(|(d, _)| integrity::shard_of(*d)),
        );
        // Token and mark shards (gap 3) are repaired in place, not from a
        // backup (backups hold neither): those that do not match their
        // rows, and those older than the card's anchor.
        shards.extend(found.rolled_back_shards.iter().copied());
        let behind = if found.rolled_back_shards.is_empty() {
            None
        } else {
            match anchor {
                Some(p) => crate::anchor::load(p, card)?,
                None => None,
            }
        };
        if shards
            .iter()
            .any(|s| (integrity::TOKEN_BASE..integrity::MARK_SHARD).contains(s))
        {
            out.token_shards = self.repair_token_shards_behind(actor, now, behind.as_ref())?;
        }
        if shards.contains(&integrity::MARK_SHARD) {
            out.marks = self.repair_mark_shard_behind(actor, now, behind.as_ref())?;
        }
        shards.retain(|&s| s < integrity::ALL_SHARDS);
        // Notary records, commands and device-row shards are not repaired
        // row by row (a device row is, below, from its backup copy).
        for (d, g, t, r) in &found.bad_notary {
            out.refused.push(format!(
                "notary record {d} generation {g} t {t} r {r} fails its tag: it is refused by verification; restore the whole database from a backup to get it back"
            ));
        }
        for d in &found.bad_commands {
            out.refused.push(format!(
                "command of {d} fails its tag: restore the whole database from a backup (its pending commands are rebuilt)"
            ));
        }
        let not_seed = |s: u8| {
            (SHARDS..integrity::DEVICE_BASE).contains(&s)
                || (s >= integrity::DEVICE_BASE && found.bad_devices.is_empty())
        };
        for s in shards.iter().filter(|&&s| not_seed(s)) {
            out.refused.push(format!(
                "digest shard {s} ({}) does not match its rows: restore the whole database from a backup",
                integrity::shard_kind(*s)
            ));
        }
        shards.retain(|&s| s < SHARDS);
        let stored = db.digest_shards()?;
        let mut used = BTreeSet::new();
        for shard in shards {
            let Some(st) = stored.iter().find(|s| s.shard == shard) else {
                out.refused.push(format!(
                    "digest shard {shard} is missing: restore the whole database"
                ));
                continue;
            };
            let tag = card.digest_tag(&integrity::shard_bytes(st))?;
            if !bool::from(subtle::ConstantTimeEq::ct_eq(&tag[..], &st.tag[..])) {
                out.refused.push(format!(
                    "digest shard {shard} fails the card's tag: nothing to check a repair against; restore the whole database"
                ));
                continue;
            }
            let current = self.shard_rows(shard)?;
            let mut done = false;
            for (p, b) in &valid {
                let Some(plan) = plan_shard(card, st, &current, b, shard)? else {
                    continue;
                };
                self.apply_plan(&current, &plan, b, actor, now, &mut out, p)?;
                used.insert(p.clone());
                done = true;
                break;
            }
            if !done {
                out.refused.push(format!(
                    "digest shard {shard}: no backup makes its records match the card's digest (records changed after the newest backup that holds them, or no backup holds them)"
                ));
            }
        }
        // Device rows: the newest backup copy with a good tag.
        for &d in &found.bad_devices {
            let copy = valid
                .iter()
                .find_map(|(p, b)| b.devices.iter().find(|x| x.id == d).map(|x| (p, x)));
            match copy {
                Some((p, row)) => {
                    let row = &counter_floor(card, row, now)?;
                    with_tx(db, |tx| {
                        tx.update_device(row)?;
                        audit_repair(tx, card, actor, now, Some(d), None, p)
                    })?;
                    out.devices.push(d);
                    used.insert(p.clone());
                }
                None => out
                    .refused
                    .push(format!("device {d}: no backup holds its row")),
            }
        }
        out.used = used.into_iter().collect();
        self.clear_cache();
        Ok(out)
    }

    fn shard_rows(&self, shard: u8) -> Result<BTreeMap<Key, SeedRow>> {
        let mut out = BTreeMap::new();
        let mut after = None;
        loop {
            let page = self.database().scan_seeds(after, 1000)?;
            let Some(last) = page.last() else { break };
            after = Some((last.device, last.generation));
            for s in page {
                if integrity::shard_of(s.device) == shard {
                    out.insert((s.device, s.generation), s);
                }
            }
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_plan(
        &self,
        current: &BTreeMap<Key, SeedRow>,
        plan: &BTreeMap<Key, SeedRow>,
        from: &Backup,
        actor: &str,
        now: u64,
        out: &mut RepairReport,
        path: &Path,
    ) -> Result<()> {
        let card = self.card();
        let mut restored = Vec::new();
        let mut removed = Vec::new();
        with_tx(self.database(), |tx| {
            restored.clear();
            removed.clear();
            for (k, cur) in current {
                if !plan.contains_key(k) {
                    tx.delete_seed(k.0, k.1)?;
                    removed.push(*k);
                    let _ = cur;
                }
            }
            for (k, want) in plan {
                if current.get(k) == Some(want) {
                    continue;
                }
                if tx.device(k.0)?.is_none() {
                    let d = from
                        .devices
                        .iter()
                        .find(|d| d.id == k.0)
                        .ok_or_else(|| Error::NotInBackup { device: k.0 })?;
                    tx.insert_device(&counter_floor(card, d, now)?)?;
                }
                tx.delete_seed(k.0, k.1)?;
                tx.insert_seed(want)?;
                restored.push(*k);
            }
            for k in &removed {
                crate::audit::append(
                    tx,
                    card,
                    &NewAudit::new(now, actor, "repair")
                        .on(Some(k.0), Some(k.1))
                        .because("record inserted outside the center: deleted"),
                )?;
            }
            for k in &restored {
                audit_repair(tx, card, actor, now, Some(k.0), Some(k.1), path)?;
            }
            Ok(())
        })?;
        out.restored.extend(restored);
        out.removed.extend(removed);
        Ok(())
    }
}

/// A device row put back from a backup, its command counter raised to at
/// least `now` (counters never go back: the node may have accepted higher
/// ones since the backup).
fn counter_floor(
    card: &dyn crate::EncryptionCard,
    row: &crate::db::DeviceRow,
    now: u64,
) -> Result<crate::db::DeviceRow> {
    let mut d = row.clone();
    let floor = u32::try_from(now).unwrap_or(u32::MAX);
    if d.command_counter < floor {
        d.command_counter = floor;
        integrity::retag_device(card, &mut d)?;
    }
    Ok(d)
}

fn audit_repair(
    tx: &mut dyn crate::db::Tx,
    card: &dyn crate::EncryptionCard,
    actor: &str,
    now: u64,
    device: Option<DeviceId>,
    generation: Option<u8>,
    path: &Path,
) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    crate::audit::append(
        tx,
        card,
        &NewAudit::new(now, actor, "repair")
            .on(device, generation)
            .because(format!("put back from backup {name}")),
    )
}

/// Replaces an SQLite key database file with a backup (the center on it
/// must be closed): the current file (and its -wal, -shm) is moved aside
/// to `<file>.replaced-<now>` for investigation, a new file gets the
/// backup ([`backup::restore_into`]) and the anchor is reset to it.
/// Returns where the old file went.
#[cfg(feature = "sqlite")]
pub fn restore_sqlite_file(
    db_path: &Path,
    backup_file: &Path,
    card: &std::sync::Arc<dyn crate::EncryptionCard>,
    anchor: Option<&Path>,
    actor: &str,
    now: u64,
) -> Result<Option<PathBuf>> {
    let b = backup::read(backup_file, &**card)?;
    let aside = if db_path.exists() {
        let aside = PathBuf::from(format!("{}.replaced-{now}", db_path.display()));
        std::fs::rename(db_path, &aside)?;
        for ext in ["-wal", "-shm"] {
            let side = PathBuf::from(format!("{}{ext}", db_path.display()));
            if side.exists() {
                std::fs::rename(&side, format!("{}{ext}", aside.display()))?;
            }
        }
        Some(aside)
    } else {
        None
    };
    let db = crate::SqliteDatabase::open(db_path)?;
    backup::restore_into(&db, &**card, &b, actor, now)?;
    // As `backup restore` does: pending commands get a fresh counter, t
    // and r (PROTOCOL.md 6); restore_into raised every counter to `now`.
    let center = Center::new(
        std::sync::Arc::new(db),
        card.clone(),
        crate::CenterConfig::default(),
    );
    let rebuilt = center.rebuild_pending_commands(actor, now)?;
    if rebuilt > 0 {
        tracing::info!(rebuilt, "pending commands rebuilt after the restore");
    }
    if let Some(a) = anchor {
        let mark = crate::anchor::Anchor::of(center.database(), &**card, now)?;
        crate::anchor::reset(a, &**card, &mark)?;
    }
    Ok(aside)
}

const _: () = assert!(SHARDS as usize <= 255);
