//! Backups of the key database: one file with every record, the card's
//! digest and a MAC by the card over the whole file.
//!
//! # File format (`*.mcbak`)
//!
//! JSON Lines, in this order:
//!
//! 1. header: `{"format": "microcert-backup", "version": 1, "created": t,
//!    "card": "<8 bytes hex>"}`; `card` is the first 8 bytes of the card's
//!    tag over "MC-BACKUP-CARD", so a backup of another center's card is
//!    told apart from an altered one without revealing anything;
//! 2. one line per row, `"t"` naming the kind: `device`, `seed` (the
//!    ciphertext stays the Kstore AEAD ciphertext, in hex; a destroyed
//!    seed has none), `shard` (the 16 digest shards and the audit head,
//!    each with its card tag), `command`, `notary`, `audit` (every entry
//!    with its chain hashes);
//! 3. trailer: `{"t": "end", "devices": n, "seeds": n, ..., "kstore_versions":
//!    [..], "mark": {..}}`: counts, the Kstore versions the ciphertexts are
//!    under (a version is destroyed only when no kept backup names it), and
//!    the database's high-water mark ([`crate::anchor::Anchor`]);
//! 4. `{"mac": "<hex>"}`: the card's tag (domain "MC-DIGEST") over
//!    "MC-BACKUP-v1" || SHA-256(every byte before this line).
//!
//! Replay records and used challenges are not kept: they expire within
//! minutes, and a restored center refuses messages older than its skew.
//!
//! # Consistency
//!
//! Rows are read page by page while the center may keep serving. The
//! digest table (16 shards and the audit head) is read before and after;
//! every audited change moves the audit head, every record change a
//! shard, so equal digests before and after mean no record, device or
//! command changed in between (commands and device rows change only with
//! an audit entry). Otherwise the backup is read again (up to 5 times).
//! The records read must then match the card-tagged shards exactly, so a
//! backup of a tampered database is refused rather than kept.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use microcert_core::DeviceId;
use sha2::{Digest, Sha256};

use crate::anchor::Anchor;
use crate::audit::AUDIT_HEAD_SHARD;
use crate::card::EncryptionCard;
use crate::db::{
    AuditRecord, CommandRow, DeviceQuery, DeviceRow, DigestShard, KeyDatabase, NewAudit, NotaryRow,
    SeedRow, with_tx,
};
use crate::integrity::{self, SHARDS};
use crate::{Error, Result};

mod rows;

use rows::*;

const FORMAT: &str = "microcert-backup";
const VERSION: u64 = 1;
/// File name extension of backups.
pub const EXTENSION: &str = "mcbak";

/// Everything a backup holds.
#[derive(Debug, Clone, Default)]
pub struct Backup {
    /// When it was made.
    pub created: u64,
    /// Device rows.
    pub devices: Vec<DeviceRow>,
    /// Seed records, (device, generation) order.
    pub seeds: Vec<SeedRow>,
    /// Digest shards and the audit head row.
    pub shards: Vec<DigestShard>,
    /// Each device's latest command.
    pub commands: Vec<CommandRow>,
    /// Notary records.
    pub notary: Vec<NotaryRow>,
    /// The audit log.
    pub audit: Vec<AuditRecord>,
    /// The keyring's rows (issue 14: the storage keys wrapped under the
    /// card's root key, and the head), so a restore has the keys its
    /// seeds are sealed under. Empty for a card that keeps its keys.
    pub keyring: Vec<crate::db::KeyringRow>,
}

impl Backup {
    /// Kstore versions the ciphertexts are under.
    pub fn kstore_versions(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .seeds
            .iter()
            .filter(|s| s.ciphertext.is_some())
            .map(|s| s.kstore_version)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The high-water mark of the database this is a copy of.
    pub fn mark(&self) -> Anchor {
        let mut shard_seq = [0u64; integrity::SCAN_SHARDS as usize];
        let mut audit = (0, [0u8; 32]);
        for s in &self.shards {
            if s.shard < integrity::ALL_SHARDS {
                shard_seq[usize::from(s.shard)] = s.seq;
            } else if s.shard == AUDIT_HEAD_SHARD {
                audit = (s.count, s.acc);
            }
        }
        Anchor {
            time: self.created,
            shard_seq,
            audit_seq: audit.0,
            audit_hash: audit.1,
            keyring_epoch: 0,
        }
    }

    /// The notary, command and device-row shards against the rows (seals
    /// are the card's tags over the rows, so they are recomputed). A
    /// backup made before these shards existed has none: nothing to check.
    fn check_other_shards(&self, card: &dyn EncryptionCard) -> Result<()> {
        if !self
            .shards
            .iter()
            .any(|s| (integrity::NOTARY_BASE..integrity::ALL_SHARDS).contains(&s.shard))
        {
            return Ok(());
        }
        let mut acc = integrity::ShardAcc::new();
        let mut add = |shard: u8, tag: &[u8; 32]| acc.add(shard, tag);
        for n in &self.notary {
            let seal = card.record_tag(&integrity::notary_bytes(n))?;
            add(
                integrity::NOTARY_BASE + integrity::shard_of(n.device),
                &seal,
            );
        }
        for c in &self.commands {
            let seal = card.record_tag(&integrity::command_bytes(c))?;
            add(
                integrity::COMMAND_BASE + integrity::shard_of(c.device),
                &seal,
            );
        }
        for d in &self.devices {
            add(integrity::DEVICE_BASE + integrity::shard_of(d.id), &d.tag);
        }
        for shard in integrity::NOTARY_BASE..integrity::ALL_SHARDS {
            if !acc.matches(card, shard, &self.shards)? {
                return Err(Error::Integrity(format!(
                    "backup: digest shard {shard} ({}) does not match its rows",
                    integrity::shard_kind(shard)
                )));
            }
        }
        Ok(())
    }

    /// Seed records by (device, generation).
    pub fn seed_map(&self) -> HashMap<(DeviceId, u8), &SeedRow> {
        self.seeds
            .iter()
            .map(|s| ((s.device, s.generation), s))
            .collect()
    }

    /// Checks the backup against the card: every record and device tag,
    /// every shard tag, each shard's XOR and count against its records, and
    /// the audit chain against its card-tagged head.
    pub fn check(&self, card: &dyn EncryptionCard) -> Result<()> {
        let mut acc = integrity::ShardAcc::new();
        for s in &self.seeds {
            // A backup made before every column was covered holds records
            // tagged the old way; its MAC vouches for them, and a restore
            // re-tags them.
            if integrity::check_record(card, s).is_err() && !integrity::is_v1_record(card, s)? {
                integrity::check_record(card, s)?;
            }
            acc.add(integrity::shard_of(s.device), &s.tag);
        }
        for d in &self.devices {
            integrity::check_device(card, d)?;
        }
        // Notary records of a backup made since they carry a seal must
        // have a good one (a tampered record is not carried into a
        // restore); older backups have none and their MAC vouches.
        for n in self.notary.iter().filter(|n| n.seal.is_some()) {
            integrity::check_notary(card, n)?;
        }
        for shard in 0..SHARDS {
            if !acc.matches(card, shard, &self.shards)? {
                return Err(Error::Integrity(format!(
                    "backup: digest shard {shard} does not match its records"
                )));
            }
        }
        self.check_other_shards(card)?;
        // After an archive the log starts after the card-tagged
        // checkpoint (issue 15 item 5).
        let (base_seq, mut prev) =
            crate::audit::tagged_base_of(card, &self.shards).map_err(|_| {
                Error::Integrity("backup: the audit archive checkpoint fails its tag".into())
            })?;
        if self.audit.first().is_some_and(|a| a.seq != base_seq + 1) {
            return Err(Error::Integrity(format!(
                "backup: audit entry {}",
                base_seq + 1
            )));
        }
        if let Some(bad) = crate::audit::verify_chain(prev, &self.audit) {
            return Err(Error::Integrity(format!("backup: audit entry {bad}")));
        }
        if let Some(last) = self.audit.last() {
            prev = last.hash;
        }
        let mark = self.mark();
        let head_ok = match self.shards.iter().find(|s| s.shard == AUDIT_HEAD_SHARD) {
            Some(h) => {
                let tag = card.digest_tag(&crate::audit::head_bytes(h.count, &h.acc))?;
                bool::from(subtle::ConstantTimeEq::ct_eq(&tag[..], &h.tag[..]))
                    && h.count == self.audit.last().map_or(0, |a| a.seq)
                    && h.acc == prev
            }
            None => self.audit.is_empty(),
        };
        if !head_ok || mark.audit_hash != prev {
            return Err(Error::Integrity(
                "backup: audit log does not end at its card-tagged head".into(),
            ));
        }
        Ok(())
    }
}

fn card_id(card: &dyn EncryptionCard) -> Result<String> {
    Ok(hex::encode(&card.digest_tag(b"MC-BACKUP-CARD")?[..8]))
}

fn mac_of_digest(card: &dyn EncryptionCard, body_digest: &[u8]) -> Result<[u8; 32]> {
    let mut b = b"MC-BACKUP-v1".to_vec();
    b.extend_from_slice(body_digest);
    card.digest_tag(&b)
}

/// Reads the database into memory, consistently (see the module docs).
pub fn snapshot(db: &dyn KeyDatabase, card: &dyn EncryptionCard, now: u64) -> Result<Backup> {
    for _ in 0..5 {
        let before = db.digest_shards()?;
        let mut b = read_all(db, now, before.clone())?;
        if db.digest_shards()? == before {
            b.check(card)?;
            b.keyring = crate::keyring::rows_for_backup(db, card)?;
            return Ok(b);
        }
    }
    Err(Error::BackupUnstable)
}

fn read_all(db: &dyn KeyDatabase, now: u64, shards: Vec<DigestShard>) -> Result<Backup> {
    let mut b = Backup {
        created: now,
        shards,
        ..Backup::default()
    };
    crate::db::device_pages(db, 1000, |page| {
        let ids: Vec<DeviceId> = page.iter().map(|v| v.device.id).collect();
        let cmds = with_tx(db, |tx| {
            let mut out = Vec::new();
            for &id in &ids {
                if let Some(c) = tx.command(id)? {
                    out.push(c);
                }
            }
            Ok(out)
        })?;
        b.commands.extend(cmds);
        b.devices.extend(page.into_iter().map(|v| v.device));
        Ok(())
    })?;
    let mut after = None;
    loop {
        let page = db.scan_seeds(after, 1000)?;
        let Some(last) = page.last() else { break };
        after = Some((last.device, last.generation));
        b.seeds.extend(page);
    }
    loop {
        let page = db.scan_notary(b.notary.last(), 1000)?;
        if page.is_empty() {
            break;
        }
        b.notary.extend(page);
    }
    let mut after = 0;
    loop {
        let page = db.audit_log(after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        b.audit.extend(page);
    }
    Ok(b)
}

/// What [`create`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// The file.
    pub path: PathBuf,
    /// Seed records in it.
    pub seeds: u64,
    /// Devices in it.
    pub devices: u64,
    /// Audit entries in it.
    pub audit: u64,
    /// Kstore versions its ciphertexts are under.
    pub kstore_versions: Vec<u32>,
    /// When it was made.
    pub created: u64,
}

/// Makes a backup in `dir` (created if missing, mode 0700), named
/// `backup-<created>-<random>.mcbak`, written atomically (mode 0600).
pub fn create(
    db: &dyn KeyDatabase,
    card: &dyn EncryptionCard,
    dir: &Path,
    now: u64,
) -> Result<BackupSummary> {
    create_with_fault(db, card, dir, now, None)
}

/// Where a test makes [`create`] fail: a write error half-way (cleaned
/// up as any error is), or a kill half-way (nothing cleaned up).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupFault {
    /// The temporary file's write fails after the first rows.
    WriteError,
    /// The process dies after the first rows (no clean-up runs).
    Kill,
}

/// The prefix and suffix of a backup's temporary file in its directory.
const TEMP_PREFIX: &str = ".backup-";
const TEMP_SUFFIX: &str = ".tmp";

/// Removes the temporary files that backups killed half-way left in
/// `dir` (called with the directory's backup lock held, so no backup is
/// writing one); returns how many.
fn remove_stale_temps(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) {
            tracing::warn!(file = %p.display(), "removing the temporary file of an interrupted backup");
            std::fs::remove_file(&p)?;
            n += 1;
        }
    }
    Ok(n)
}

/// [`create`] with a fault injected (tests).
#[doc(hidden)]
pub fn create_with_fault(
    db: &dyn KeyDatabase,
    card: &dyn EncryptionCard,
    dir: &Path,
    now: u64,
    fault: Option<BackupFault>,
) -> Result<BackupSummary> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    // One backup at a time per directory (across processes: `serve` and
    // a `backup create` beside it): a temporary file present while the
    // lock is held was left by a backup that died.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".backup.lock"))?;
    lock.lock()?;
    remove_stale_temps(dir)?;
    let b = snapshot(db, card, now)?;
    let mut r = [0u8; 4];
    card.random(&mut r)?;
    let name = format!("backup-{now:012}-{}.{EXTENSION}", hex::encode(r));
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}{TEMP_SUFFIX}"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    // Streamed into the file (the rows are in memory once, in the
    // snapshot; the file's bytes never are), fsync'd, renamed.
    let written = (|| -> Result<()> {
        let f = opts.open(&tmp)?;
        let mut w = std::io::BufWriter::new(f);
        match fault {
            Some(fault) => {
                let mut limited = Faulty {
                    inner: &mut w,
                    left: 4096,
                    fault,
                };
                encode_to(&b, card, &mut limited)?;
            }
            None => encode_to(&b, card, &mut w)?,
        }
        let f = w
            .into_inner()
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if let Err(e) = written {
        // A kill runs no clean-up: its temporary file stays until the
        // next backup of the directory removes it.
        if fault != Some(BackupFault::Kill) {
            let _ = std::fs::remove_file(&tmp);
        }
        return Err(e);
    }
    drop(lock);
    tracing::info!(path = %path.display(), seeds = b.seeds.len(), "backup written");
    Ok(BackupSummary {
        path,
        seeds: b.seeds.len() as u64,
        devices: b.devices.len() as u64,
        audit: b.audit.len() as u64,
        kstore_versions: b.kstore_versions(),
        created: now,
    })
}

/// A writer that fails (or "dies") after `left` bytes (tests).
struct Faulty<'a> {
    inner: &'a mut dyn Write,
    left: usize,
    fault: BackupFault,
}

impl Write for Faulty<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            self.inner.flush()?;
            return Err(match self.fault {
                BackupFault::WriteError => std::io::Error::other("no space left (test)"),
                BackupFault::Kill => std::io::Error::other("killed (test)"),
            });
        }
        let n = buf.len().min(self.left);
        let n = self.inner.write(&buf[..n])?;
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A writer that hashes what goes through it (backups and archives).
pub(crate) struct Hashing<W: Write> {
    /// Where the bytes go.
    pub(crate) inner: W,
    /// The hash of every byte written.
    pub(crate) h: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.h.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The file's bytes (see [`encode_to`]).
pub fn encode(b: &Backup, card: &dyn EncryptionCard) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    encode_to(b, card, &mut v)?;
    Ok(v)
}

/// Writes the file to `to`, line by line, the MAC computed over what was
/// written (no copy of the file in memory).
pub fn encode_to(b: &Backup, card: &dyn EncryptionCard, to: &mut dyn Write) -> Result<()> {
    let mut out = Hashing {
        inner: to,
        h: Sha256::new(),
    };
    let json = |e: serde_json::Error| Error::Io(std::io::Error::other(e));
    let header = HeaderLine {
        format: FORMAT.into(),
        version: VERSION,
        created: b.created,
        card: card_id(card)?,
    };
    writeln!(out, "{}", serde_json::to_string(&header).map_err(json)?)?;
    let mut line = |l: Line| -> Result<()> {
        writeln!(out, "{}", serde_json::to_string(&l).map_err(json)?)?;
        Ok(())
    };
    for d in &b.devices {
        line(Line::Device(d.into()))?;
    }
    for s in &b.seeds {
        line(Line::Seed(s.into()))?;
    }
    for s in &b.shards {
        line(Line::Shard(s.into()))?;
    }
    for c in &b.commands {
        line(Line::Command(c.into()))?;
    }
    for n in &b.notary {
        line(Line::Notary(n.into()))?;
    }
    for k in &b.keyring {
        line(Line::Keyring(k.into()))?;
    }
    for a in &b.audit {
        line(Line::Audit(a.into()))?;
    }
    let m = b.mark();
    line(Line::End(EndLine {
        devices: b.devices.len() as u64,
        seeds: b.seeds.len() as u64,
        shards: b.shards.len() as u64,
        commands: b.commands.len() as u64,
        notary: b.notary.len() as u64,
        audit: b.audit.len() as u64,
        kstore_versions: b.kstore_versions(),
        mark: MarkLine {
            shard_seq: m.shard_seq[..usize::from(integrity::ALL_SHARDS)].to_vec(),
            audit_seq: m.audit_seq,
            audit_hash: hex::encode(m.audit_hash),
        },
    }))?;
    let digest = out.h.finalize();
    let tag = mac_of_digest(card, &digest)?;
    let mac_line = MacLine {
        mac: hex::encode(tag),
    };
    writeln!(
        out.inner,
        "{}",
        serde_json::to_string(&mac_line).map_err(json)?
    )?;
    Ok(())
}

/// Reads a backup file: the MAC is checked before anything is parsed,
/// then every record against the card ([`Backup::check`]). The file is
/// read twice through one handle, line by line (never whole in memory):
/// first for the MAC, then to parse, hashed again and compared, so a file
/// changed between the two reads is refused.
pub fn read(path: &Path, card: &dyn EncryptionCard) -> Result<Backup> {
    use std::io::{BufRead, Seek};
    let bad = |why: &str| Error::Integrity(format!("backup {}: {why}", path.display()));
    let mut file = std::io::BufReader::new(std::fs::File::open(path)?);
    // Pass 1: the header, the body's digest, the MAC line (the last line
    // that is not empty) and how many lines the body has.
    let mut h = Sha256::new();
    let mut line = Vec::new();
    let mut pending: Option<Vec<u8>> = None;
    let mut blanks = Vec::new();
    let mut body_lines = 0u64;
    let mut first: Option<HeaderLine> = None;
    loop {
        line.clear();
        if file.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if line.iter().all(|c| c.is_ascii_whitespace()) {
            blanks.extend_from_slice(&line);
            continue;
        }
        if let Some(p) = pending.replace(line.clone()) {
            h.update(&p);
            h.update(&blanks);
            body_lines += 1 + blanks.iter().filter(|c| **c == b'\n').count() as u64;
            blanks.clear();
            if first.is_none() {
                first = Some(serde_json::from_slice(&p).map_err(|_| bad("not a backup file"))?);
            }
        } else {
            blanks.clear();
        }
    }
    let first = first.ok_or_else(|| bad("not a backup file"))?;
    let last = pending.ok_or_else(|| bad("not a backup file"))?;
    if first.format != FORMAT || first.version != VERSION {
        return Err(bad("not a backup file of this version"));
    }
    if first.card != card_id(card)? {
        return Err(bad("made with another encryption card"));
    }
    let want: MacLine = serde_json::from_slice(&last).map_err(|_| bad("no MAC line"))?;
    let digest = h.finalize();
    let got = mac_of_digest(card, &digest)?;
    let want = hex::decode(&want.mac).map_err(|_| bad("no MAC line"))?;
    if !bool::from(subtle::ConstantTimeEq::ct_eq(&got[..], &want[..])) {
        return Err(bad("MAC does not match: the file was altered or cut short"));
    }
    // Pass 2: parse the body, hashing it again.
    file.rewind()?;
    let mut h2 = Sha256::new();
    let mut b = Backup {
        created: first.created,
        ..Backup::default()
    };
    let mut ended = false;
    for i in 0..body_lines {
        line.clear();
        file.read_until(b'\n', &mut line)?;
        h2.update(&line);
        if i == 0 {
            continue;
        }
        let e = || bad(&format!("line {}", i + 1));
        let v: Line = serde_json::from_slice(&line).map_err(|_| e())?;
        match v {
            Line::Device(d) => b.devices.push(d.row().ok_or_else(e)?),
            Line::Seed(x) => b.seeds.push(x.row().ok_or_else(e)?),
            Line::Shard(x) => b.shards.push(x.row().ok_or_else(e)?),
            Line::Command(x) => b.commands.push(x.row().ok_or_else(e)?),
            Line::Notary(x) => b.notary.push(x.row().ok_or_else(e)?),
            Line::Audit(x) => b.audit.push(x.row().ok_or_else(e)?),
            Line::Keyring(x) => b.keyring.push(x.row().ok_or_else(e)?),
            Line::End(_) => ended = true,
        }
    }
    if h2.finalize() != digest {
        return Err(bad("the file changed while it was read"));
    }
    if !ended {
        return Err(bad("no end line"));
    }
    b.check(card)?;
    Ok(b)
}

/// Writes a backup into an empty database: every row as it was, the
/// audit log re-appended (the chain comes out identical, which is checked),
/// then one audit entry "restore" by `actor`.
pub fn restore_into(
    db: &dyn KeyDatabase,
    card: &dyn EncryptionCard,
    b: &Backup,
    actor: &str,
    now: u64,
) -> Result<()> {
    let empty = db.digest_shards()?.is_empty()
        && db.audit_log(0, 1)?.is_empty()
        && db.list_devices(&DeviceQuery::default())?.is_empty();
    if !empty {
        return Err(Error::RestoreTargetNotEmpty);
    }
    b.check(card)?;
    // The keyring first (issue 14): the keys the seeds are sealed under,
    // or a clear refusal when neither the backup nor the card has them.
    crate::keyring::restore_rows(db, card, &b.keyring, &b.seeds)?;
    // Written without the sealing layer: this writes the seals and the
    // notary, command and device shards itself (rebuilt from the rows).
    let db = db.unsealed().unwrap_or(db);
    // Counters never go back: every device's is raised to at least the
    // restore time, so a command built after the restore (counter =
    // max(previous + 1, now)) is above any the node accepted from the
    // database as it was after this backup (PROTOCOL.md 6).
    let floor = u32::try_from(now).unwrap_or(u32::MAX);
    let mut devices = Vec::with_capacity(b.devices.len());
    for d in &b.devices {
        let mut d = d.clone();
        if d.command_counter < floor {
            d.command_counter = floor;
            integrity::retag_device(card, &mut d)?;
        }
        devices.push(d);
    }
    // Records of a backup made before every column was covered get their
    // tag over every column, and their shards follow.
    let mut seeds = b.seeds.clone();
    let mut shards: Vec<DigestShard> = b
        .shards
        .iter()
        .filter(|s| {
            s.shard < SHARDS
                || s.shard == AUDIT_HEAD_SHARD
                || s.shard == crate::audit::AUDIT_BASE_SHARD
        })
        .cloned()
        .collect();
    for s in seeds.iter_mut() {
        if integrity::check_record(card, s).is_err() {
            let old = s.tag;
            integrity::retag(card, s)?;
            let shard = integrity::shard_of(s.device);
            let row = shards
                .iter_mut()
                .find(|x| x.shard == shard)
                .ok_or_else(|| {
                    Error::Integrity(format!("backup: digest shard {shard} is missing"))
                })?;
            for ((a, o), n) in row.acc.iter_mut().zip(&old).zip(&s.tag) {
                *a ^= o ^ n;
            }
        }
    }
    for row in shards.iter_mut().filter(|s| s.shard < SHARDS) {
        row.tag = card.digest_tag(&integrity::shard_bytes(row))?;
    }
    let mut sealed_commands = Vec::with_capacity(b.commands.len());
    for c in &b.commands {
        sealed_commands.push((c, card.record_tag(&integrity::command_bytes(c))?));
    }
    let mut sealed_notary = Vec::with_capacity(b.notary.len());
    for n in &b.notary {
        let mut n = n.clone();
        n.seal = Some(card.record_tag(&integrity::notary_bytes(&n))?);
        sealed_notary.push(n);
    }
    let ids: Vec<_> = devices.iter().map(|d| d.id).collect();
    let accs = integrity::new_replay_accs(card, &ids)?;
    db.transaction(&mut |tx| {
        // Every device has its (empty) replay accumulator (gap 2).
        tx.put_replay_accs(&accs)?;
        let mut delta = integrity::DigestDelta::default();
        for d in &devices {
            tx.insert_device(d)?;
            delta.add_at(
                integrity::DEVICE_BASE + integrity::shard_of(d.id),
                None,
                Some(&d.tag),
            );
        }
        for s in &seeds {
            tx.insert_seed(s)?;
        }
        for s in &shards {
            tx.put_digest_shard(s)?;
        }
        for (c, seal) in &sealed_commands {
            tx.put_command_sealed(c, Some(seal))?;
            delta.add_at(
                integrity::COMMAND_BASE + integrity::shard_of(c.device),
                None,
                Some(seal),
            );
        }
        for n in &sealed_notary {
            if tx.notarize(n)?.1 {
                delta.add_at(
                    integrity::NOTARY_BASE + integrity::shard_of(n.device),
                    None,
                    n.seal.as_ref(),
                );
            }
        }
        delta.flush(tx, card)?;
        // A log archived in part starts after its checkpoint: its rows
        // go back as they are (seq and hashes kept); otherwise they are
        // re-appended (the chain must come out the same).
        let archived = b
            .shards
            .iter()
            .any(|s| s.shard == crate::audit::AUDIT_BASE_SHARD);
        for a in &b.audit {
            if archived {
                tx.insert_audit_record(a)?;
            } else {
                tx.append_audit(&a.entry)?;
            }
        }
        crate::audit::append(
            tx,
            card,
            &NewAudit::new(now, actor, "restore").because(format!(
                "backup of {} with {} seeds and {} audit entries",
                b.created,
                b.seeds.len(),
                b.audit.len()
            )),
        )
    })?;
    // The re-appended chain must be the backup's, entry for entry.
    let (n, finding) = crate::audit::verify(db, card)?;
    if let Some(f) = finding {
        return Err(Error::Integrity(format!("restored audit log: {f}")));
    }
    debug_assert_eq!(n, b.audit.len() as u64 + 1);
    Ok(())
}

/// Backups in `dir`, newest first (by the time in their name).
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
        Err(e) => return Err(e.into()),
    };
    for e in rd {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("backup-") && name.ends_with(&format!(".{EXTENSION}")) {
            v.push(p);
        }
    }
    v.sort();
    v.reverse();
    Ok(v)
}

/// Deletes all but the newest `keep` backups in `dir`; returns the deleted.
/// (A deleted backup takes its copies of destroyed seeds' ciphertexts with
/// it; SECURITY.md says what that means on disk.)
pub fn rotate(dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let all = list(dir)?;
    let mut gone = Vec::new();
    for p in all.into_iter().skip(keep.max(1)) {
        std::fs::remove_file(&p)?;
        gone.push(p);
    }
    Ok(gone)
}

/// Kstore versions named by any backup in `dir` that verifies (a backup
/// that does not verify is useless for restore and does not keep a key).
pub fn versions_in_use(dir: &Path, card: &dyn EncryptionCard) -> Result<Vec<u32>> {
    let mut v = Vec::new();
    for p in list(dir)? {
        match read(&p, card) {
            Ok(b) => v.extend(b.kstore_versions()),
            Err(e) => tracing::warn!(path = %p.display(), error = %e, "backup does not verify"),
        }
    }
    v.sort_unstable();
    v.dedup();
    Ok(v)
}
