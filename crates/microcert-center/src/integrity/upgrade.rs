//! The one-time upgrade of a database written before notary records,
//! commands, device rows and `grace_until` were covered by the card
//! (schema version 1).
//!
//! Decision: rows written before are tagged by the card once, right after
//! the schema migration that added their tag columns, in the same process
//! (the trigger is [`KeyDatabase::migrated_from`] = 1, which nobody can
//! set from outside without undoing that migration). Refusing them instead
//! would turn every notarised signature of a since-revoked device invalid,
//! breaking the notary's promise for data signed before the upgrade. What
//! this trusts is the database as it stands at the upgrade, as the first
//! device and seed tags trusted it; the upgrade is audited with its counts.
//!
//! The new digest shards (notary, commands, device rows) are built here
//! only when none of them exists yet: run again over a database that has
//! them (someone undid the migration to have edited rows blessed), it
//! changes nothing and says so loudly, and the integrity check names the
//! edited rows. A seed record is re-tagged over every column
//! ([`super::record_bytes`]) only if its old tag ([`super::record_bytes_v1`],
//! which left `grace_until`, the stored RECEIPT and the times out) is valid.

use super::{
    ALL_SHARDS, DigestDelta, NOTARY_BASE, check_device, check_record, command_bytes, is_v1_record,
    notary_bytes, record_bytes, shard_of,
};
use super::{COMMAND_BASE, DEVICE_BASE};
use crate::Result;
use crate::card::EncryptionCard;
use crate::db::{DeviceQuery, KeyDatabase, NewAudit, NotaryRow, with_tx};

/// Whether `db` (without the sealing layer) needs the upgrade: this
/// process just migrated it from schema version 1, or it holds devices but
/// none of the shards the upgrade makes (the migration committed, then the
/// process stopped before the upgrade did). A second run is named by the
/// integrity scan (two "upgrade" entries in the audit log).
pub(crate) fn needed(db: &dyn KeyDatabase) -> Result<bool> {
    if db.migrated_from() == Some(1) {
        return Ok(true);
    }
    if db
        .digest_shards()?
        .iter()
        .any(|s| (NOTARY_BASE..ALL_SHARDS).contains(&s.shard))
    {
        return Ok(false);
    }
    Ok(!db
        .list_devices(&DeviceQuery {
            limit: 1,
            ..DeviceQuery::default()
        })?
        .is_empty())
}

/// Tags the rows of a version-1 database (see the module docs); returns
/// how many rows it tagged. `db` is the database without the sealing
/// layer.
pub fn upgrade_legacy(db: &dyn KeyDatabase, card: &dyn EncryptionCard, now: u64) -> Result<u64> {
    let existing = db
        .digest_shards()?
        .iter()
        .any(|s| (NOTARY_BASE..ALL_SHARDS).contains(&s.shard));
    if existing {
        tracing::error!(
            "schema upgrade found notary/command/device digest shards already written: refusing to tag rows again (run `integrity check-local`)"
        );
        return Ok(0);
    }
    let mut delta = DigestDelta::default();
    let mut devices = Vec::new();
    crate::db::device_pages(db, 1000, |page| {
        for v in page {
            if check_device(card, &v.device).is_ok() {
                delta.add_at(
                    DEVICE_BASE + shard_of(v.device.id),
                    None,
                    Some(&v.device.tag),
                );
            } else {
                // Left out: the scan names it (row and shard).
                tracing::error!(device = %v.device.id, "upgrade: device row fails its tag");
            }
            devices.push(v.device.id);
        }
        Ok(())
    })?;
    let mut notary: Vec<NotaryRow> = Vec::new();
    let mut after_n: Option<NotaryRow> = None;
    loop {
        let page = db.scan_notary(after_n.as_ref(), 1000)?;
        let Some(last) = page.last() else { break };
        after_n = Some(last.clone());
        notary.extend(page.into_iter().filter(|n| n.seal.is_none()));
    }
    let mut commands = Vec::new();
    let mut after_c = None;
    loop {
        let page = db.scan_commands(after_c, 1000)?;
        let Some(last) = page.last() else { break };
        after_c = Some(last.0.device);
        commands.extend(
            page.into_iter()
                .filter(|(_, s)| s.is_none())
                .map(|(c, _)| c),
        );
    }
    // Seed records tagged over the old bytes: (device, generation, old
    // tag, new tag), computed while scanning (not the rows: a million
    // ciphertexts do not fit in memory, a million tags do).
    let mut seeds = Vec::new();
    let mut after_s = None;
    loop {
        let page = db.scan_seeds(after_s, 1000)?;
        let Some(last) = page.last() else { break };
        after_s = Some((last.device, last.generation));
        for s in page {
            if check_record(card, &s).is_err() && is_v1_record(card, &s)? {
                let new = card.record_tag(&record_bytes(&s))?;
                seeds.push((s.device, s.generation, s.tag, new));
            }
        }
    }
    // Started by the state of the database rather than by this process's
    // migration (an upgrade cut short): a genuine version-1 database has
    // seed records tagged the old way. Without any, untagged notary
    // records and commands are not someone's old rows but an attempt to
    // have edited ones tagged: they are left for the scan to name.
    if db.migrated_from() != Some(1)
        && seeds.is_empty()
        && !(notary.is_empty() && commands.is_empty())
    {
        tracing::error!(
            notary = notary.len(),
            commands = commands.len(),
            "untagged notary records or commands in a database with no record of the old format: not tagged (run `integrity check-local`)"
        );
        notary.clear();
        commands.clear();
    }
    let mut tagged = 0u64;
    let done = with_tx(db, |tx| {
        // Another center on the same database may have upgraded it
        // meanwhile (its shards are locked and read here).
        for shard in NOTARY_BASE..ALL_SHARDS {
            if tx.digest_shard(shard)?.is_some() {
                return Ok(false);
            }
        }
        let mut delta = delta.clone();
        tagged = 0;
        for n in &notary {
            let mut n = n.clone();
            let seal = card.record_tag(&notary_bytes(&n))?;
            n.seal = Some(seal);
            tx.set_notary_seal(&n)?;
            delta.add_at(NOTARY_BASE + shard_of(n.device), None, Some(&seal));
            tagged += 1;
        }
        for c in &commands {
            let seal = card.record_tag(&command_bytes(c))?;
            tx.put_command_sealed(c, Some(&seal))?;
            delta.add_at(COMMAND_BASE + shard_of(c.device), None, Some(&seal));
            tagged += 1;
        }
        for (d, g, old, new) in &seeds {
            tx.set_seed_tag(*d, *g, new)?;
            delta.add(*d, Some(old), new);
            tagged += 1;
        }
        delta.flush(tx, card)?;
        crate::audit::append(
            tx,
            card,
            &NewAudit::new(now, "center", "upgrade").because(format!(
                    "card tags added: {} notary records, {} commands, {} devices in the digest, {} seed records re-tagged over every column",
                    notary.len(),
                    commands.len(),
                    devices.len(),
                    seeds.len()
                )),
        )?;
        Ok(true)
    })?;
    if !done {
        return Ok(0);
    }
    tracing::warn!(
        tagged,
        "database upgraded: rows written before the card covered them are now tagged"
    );
    Ok(tagged)
}

/// The key of the database's metadata that the migration "replay_acc"
/// sets to "pending" on a database that already holds devices, tokens or
/// marks, and to "done" on a new one; [`cover_rows`] sets it to "done".
pub(crate) const ROWS_COVER: &str = "rows_cover";

/// Whether the rows written before tokens, marks and replay records were
/// covered (gaps 2 and 3) still wait for [`cover_rows`].
pub(crate) fn rows_cover_needed(db: &dyn KeyDatabase) -> bool {
    matches!(db.meta(ROWS_COVER), Ok(Some(v)) if v == "pending")
}

/// The one-time cover of rows written before tokens, marks and replay
/// records were covered (gaps 2 and 3 of SECURITY.md), right after the
/// migration that added the accumulators: every token and every mark gets
/// its place in its digest shard, and every device an accumulator of its
/// stored replay records and spent challenges. Like [`upgrade_legacy`] it
/// trusts the database as it stands, and is audited ("digest-upgrade");
/// a second run (someone set the flag back to have rows blessed) is named
/// by the integrity scan. Written in one transaction with the marks'
/// shard as its witness, so an interrupted cover runs again and a
/// finished one never does. `db` is the database without the sealing
/// layer.
pub fn cover_rows(db: &dyn KeyDatabase, card: &dyn EncryptionCard, now: u64) -> Result<bool> {
    use super::{MARK_SHARD, SCAN_SHARDS, TOKEN_BASE, sealed, tag32, token_shard};
    let key = sealed::replay_row_key(card)?;
    let mut ids = Vec::new();
    let mut after = None;
    loop {
        let page = db.list_devices(&DeviceQuery {
            after,
            limit: 1000,
            ..DeviceQuery::default()
        })?;
        let Some(last) = page.last() else { break };
        after = Some(last.device.id);
        ids.extend(page.iter().map(|v| v.device.id));
    }
    let done = with_tx(db, |tx| {
        let marks = tx.marks()?;
        for shard in TOKEN_BASE..SCAN_SHARDS {
            if tx.digest_shard(shard)?.is_some() {
                return Ok(false);
            }
        }
        let tokens = tx.tokens().unwrap_or_default();
        let mut delta = DigestDelta::default();
        for t in &tokens {
            delta.add_at(token_shard(&t.hash), None, Some(&tag32(&t.tag)));
        }
        for (_, _, tag) in &marks {
            delta.add_at(MARK_SHARD, None, Some(&tag32(tag)));
        }
        // The witness: the marks' shard exists from here on, even empty.
        delta.add_at(MARK_SHARD, Some(&[0; 32]), Some(&[0; 32]));
        delta.flush(tx, card)?;
        let mut records = 0usize;
        for chunk in ids.chunks(1000) {
            let rows = tx.replay_rows(chunk)?;
            records += rows.len();
            let accs = chunk
                .iter()
                .map(|&id| {
                    let mine: Vec<_> = rows.iter().filter(|r| r.device() == id).copied().collect();
                    sealed::acc_of(&key, id, &mine)
                })
                .collect::<Result<Vec<_>>>()?;
            tx.put_replay_accs(&accs)?;
        }
        crate::audit::append(
            tx,
            card,
            &NewAudit::new(now, "center", super::DIGEST_UPGRADE).because(format!(
                    "digest shards of {} tokens and {} marks; replay accumulators of {} devices over {} records",
                    tokens.len(),
                    marks.len(),
                    ids.len(),
                    records
                )),
        )?;
        Ok(true)
    })?;
    db.set_meta(ROWS_COVER, "done")?;
    if done {
        tracing::warn!(
            devices = ids.len(),
            "database upgraded: tokens, marks and replay records are now covered by the card"
        );
    }
    Ok(done)
}
