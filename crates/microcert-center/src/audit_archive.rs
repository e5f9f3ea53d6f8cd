//! Retention of the audit log (issue 15 item 5): old entries move out of
//! the table into an archive file that stays verifiable, and the table's
//! chain goes on from a card-tagged checkpoint
//! ([`crate::audit::AUDIT_BASE_SHARD`]).
//!
//! # Archive file (JSON Lines)
//!
//! 1. `{"format": "microcert-audit-archive", "version": 1, "table":
//!    "audit", "card": "<8 bytes hex>", "created": t, "first": s,
//!    "prev_hash": "<hex>"}`: the entry before the first (the previous
//!    archive's last, or 0^32 for the first archive);
//! 2. one line per entry, [`crate::audit::to_json`] (with its chain hashes);
//! 3. `{"t": "end", "entries": n, "last": k, "last_hash": "<hex>"}`;
//! 4. `{"mac": "<hex>"}`: the card's digest tag over
//!    "MC-AUDIT-ARCHIVE-v1" || SHA-256(every byte before this line).
//!
//! # Steps, each safe to interrupt
//!
//! 1. the entries are streamed (page by page) into a temporary file
//!    beside the archive, which is fsync'd and renamed to the archive
//!    (then the directory fsync'd): a kill here leaves the rows in the
//!    table and at most a temporary file, removed by the next archive to
//!    the same path;
//! 2. one transaction appends the `audit-archive` entry, deletes the
//!    archived rows (all of them must be there) and moves the card-tagged
//!    checkpoint to the last archived entry: a kill before its commit
//!    leaves the rows in the table (and a complete archive of them, which
//!    a later archive makes again); after it, the rows are in the complete
//!    archive. Never in neither.
//!
//! The newest entry is never archived (the table always keeps its head).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::audit::{self, AUDIT_BASE_SHARD, base_bytes, tagged_base, tagged_base_of};
use crate::backup::Hashing;
use crate::card::EncryptionCard;
use crate::db::{AuditRecord, DigestShard, NewAudit, with_tx};
use crate::{Center, Error, Result};

const FORMAT: &str = "microcert-audit-archive";
const MAC_DOMAIN: &[u8] = b"MC-AUDIT-ARCHIVE-v1";

/// The table an archive moves rows out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveTable {
    /// The audit log.
    Audit,
    /// The notary records.
    Notary,
}

/// What an archive run is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveJob<'a> {
    /// Rows older than this (Unix seconds) move.
    pub before: u64,
    /// The new archive file.
    pub out: &'a Path,
    /// Who asks (audited).
    pub actor: &'a str,
    /// Now (Unix seconds).
    pub now: u64,
    /// Stop at this step as a kill would (tests).
    pub stop: Option<ArchiveStep>,
}

/// What an archive run returns: None when there was nothing to move.
pub type Archived = Result<Option<ArchiveReport>>;

/// Where a test stops an archive, as a kill would (no clean-up runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveStep {
    /// The first entry written to the temporary file (part of it).
    PartWritten,
    /// The temporary file complete and fsync'd, not renamed.
    Written,
    /// The archive in place, the table not yet changed.
    Renamed,
    /// Inside the transaction: rows deleted, not committed.
    Deleted,
}

/// What [`Center::archive_audit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveReport {
    /// The archive file.
    pub path: PathBuf,
    /// Entries moved.
    pub entries: u64,
    /// First and last seq moved.
    pub first: u64,
    /// Last seq moved (the table's new checkpoint).
    pub last: u64,
}

/// What [`verify_archive`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveCheck {
    /// Entries in the file.
    pub entries: u64,
    /// First seq.
    pub first: u64,
    /// Last seq.
    pub last: u64,
    /// How its end relates to the table.
    pub link: ArchiveLink,
}

/// How an archive's last entry relates to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveLink {
    /// Its last entry is the table's card-tagged checkpoint: the table's
    /// chain goes on from it.
    Checkpoint,
    /// Its entries are still in the table (an archive interrupted before
    /// its transaction committed, or a copy).
    InTable,
    /// An older archive: the table's checkpoint is past its end (the next
    /// archives link it, each from its `prev_hash`).
    Older,
}

fn card_id(card: &dyn EncryptionCard) -> Result<String> {
    Ok(hex::encode(&card.digest_tag(b"MC-BACKUP-CARD")?[..8]))
}

fn mac(card: &dyn EncryptionCard, body_digest: &[u8]) -> Result<[u8; 32]> {
    let mut b = MAC_DOMAIN.to_vec();
    b.extend_from_slice(body_digest);
    card.digest_tag(&b)
}

impl Hashing<std::io::BufWriter<std::fs::File>> {
    /// Ends an archive: the MAC line over everything written, then the
    /// file synced.
    fn finish(mut self, card: &dyn EncryptionCard) -> Result<()> {
        let tag = mac(card, &self.h.clone().finalize())?;
        writeln!(
            self.inner,
            "{}",
            serde_json::json!({ "mac": hex::encode(tag) })
        )?;
        let file = self
            .inner
            .into_inner()
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
        file.sync_all()?;
        Ok(())
    }
}

/// Creates the archive's temporary file and writes its header line.
fn start(
    opts: &std::fs::OpenOptions,
    tmp: &Path,
    header: &serde_json::Value,
) -> Result<Hashing<std::io::BufWriter<std::fs::File>>> {
    let mut w = Hashing {
        inner: std::io::BufWriter::new(opts.open(tmp)?),
        h: Sha256::new(),
    };
    writeln!(w, "{header}")?;
    Ok(w)
}

/// Puts a written archive in place: the temporary file `tmp` renamed to
/// `out` and the directory synced. A failed write removes `tmp` (unless
/// the failure is a test's stop, which stands for a kill); an empty one
/// is removed too. Ok(false) when there is nothing to archive.
fn publish(
    written: Result<()>,
    count: u64,
    stop: Option<ArchiveStep>,
    (tmp, out, dir): (&Path, &Path, &Path),
) -> Result<bool> {
    match written {
        // A stop is a kill: nothing is cleaned up.
        Err(e) if stop.is_some() => return Err(e),
        Err(e) => {
            let _ = std::fs::remove_file(tmp);
            return Err(e);
        }
        Ok(()) if count == 0 => {
            std::fs::remove_file(tmp)?;
            return Ok(false);
        }
        Ok(()) => {}
    }
    fault(stop, ArchiveStep::Written)?;
    std::fs::rename(tmp, out)?;
    std::fs::File::open(dir)?.sync_all()?;
    fault(stop, ArchiveStep::Renamed)?;
    Ok(true)
}

/// The directory of `out`, a fresh temporary path beside it and the
/// options that create it (new, 0600).
fn temp_beside(
    out: &Path,
    card: &dyn EncryptionCard,
) -> Result<(PathBuf, PathBuf, std::fs::OpenOptions)> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut r = [0u8; 6];
    card.random(&mut r)?;
    let name = out
        .file_name()
        .ok_or_else(|| Error::Io(std::io::Error::other("the archive path has no file name")))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        hex::encode(r)
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    Ok((dir, tmp, opts))
}

/// The temporary files an interrupted archive to `out` left.
fn stale_temps(out: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (out.parent(), out.file_name()) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn fault(at: Option<ArchiveStep>, step: ArchiveStep) -> Result<()> {
    if at == Some(step) {
        return Err(Error::Io(std::io::Error::other(format!(
            "stopped at {step:?} (test)"
        ))));
    }
    Ok(())
}

impl Center {
    /// Moves the audit entries older than `before` (Unix seconds; the
    /// oldest run of them, never the newest entry) into the new archive
    /// file `out` and the table's checkpoint to the last of them, audited
    /// as `actor`. None when there is nothing to archive.
    pub fn archive_audit(&self, before: u64, out: &Path, actor: &str, now: u64) -> Archived {
        let job = ArchiveJob {
            before,
            out,
            actor,
            now,
            stop: None,
        };
        self.archive(ArchiveTable::Audit, job)
    }

    /// Runs an archive of `table` (as [`Center::archive_audit`] and
    /// [`Center::archive_notary`]); with `job.stop`, stopped at that step
    /// as a kill would (tests).
    #[doc(hidden)]
    pub fn archive(&self, table: ArchiveTable, job: ArchiveJob<'_>) -> Archived {
        // What an interrupted archive to this path left.
        for t in stale_temps(job.out) {
            tracing::warn!(file = %t.display(), "removing the temporary file of an interrupted archive");
            std::fs::remove_file(&t)?;
        }
        if job.out.exists() {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists: an archive goes to a new file",
                    job.out.display()
                ),
            )));
        }
        match table {
            ArchiveTable::Audit => self.archive_audit_job(job),
            ArchiveTable::Notary => self.archive_notary_job(job),
        }
    }

    fn archive_audit_job(&self, job: ArchiveJob<'_>) -> Archived {
        let ArchiveJob {
            before,
            out,
            actor,
            now,
            stop,
        } = job;
        let db = self.database();
        let card = self.card();
        let (base_seq, base_hash) = tagged_base(db, card)?;
        let (head_seq, _) = audit::tagged_head(db, card)?;
        // The entries to move: from the checkpoint on, while older than
        // `before`, never the newest.
        let (dir, tmp, opts) = temp_beside(out, card)?;
        let mut count = 0u64;
        let mut last = (base_seq, base_hash);
        let written = (|| -> Result<()> {
            let header = serde_json::json!({
                "format": FORMAT,
                "version": 1,
                "table": "audit",
                "card": card_id(card)?,
                "created": now,
                "first": base_seq + 1,
                "prev_hash": hex::encode(base_hash),
            });
            let mut w = start(&opts, &tmp, &header)?;
            let mut after = base_seq;
            'pages: loop {
                let page = db.audit_log(after, 1000)?;
                if page.is_empty() {
                    break;
                }
                for e in &page {
                    if e.seq >= head_seq || e.entry.time >= before || e.seq != last.0 + 1 {
                        break 'pages;
                    }
                    writeln!(w, "{}", audit::to_json(e))?;
                    count += 1;
                    last = (e.seq, e.hash);
                    if stop == Some(ArchiveStep::PartWritten) {
                        w.flush()?;
                        return fault(stop, ArchiveStep::PartWritten);
                    }
                }
                after = page.last().map_or(after, |e| e.seq);
            }
            if count == 0 {
                return Ok(());
            }
            let end = serde_json::json!({
                "t": "end",
                "entries": count,
                "last": last.0,
                "last_hash": hex::encode(last.1),
            });
            writeln!(w, "{end}")?;
            w.finish(card)
        })();
        if !publish(written, count, stop, (&tmp, out, &dir))? {
            return Ok(None);
        }
        let first = base_seq + 1;
        with_tx(db, |tx| {
            // The append first: it serialises with every other audited
            // change (and archive) across centers.
            audit::append(
                tx,
                card,
                &NewAudit::new(now, actor, "audit-archive").because(format!(
                    "entries {first} to {} moved to the archive {}",
                    last.0,
                    out.display()
                )),
            )?;
            let base_now = {
                let row = tx.digest_shard(AUDIT_BASE_SHARD)?;
                tagged_base_of(card, row.as_slice())?
            };
            if base_now != (base_seq, base_hash) {
                return Err(Error::Integrity(
                    "the audit checkpoint moved during the archive (another archive ran): try again"
                        .into(),
                ));
            }
            // The checkpoint first: the table's guard lets only entries
            // at or before it be deleted.
            let old = tx.digest_shard(AUDIT_BASE_SHARD)?;
            tx.put_digest_shard(&DigestShard {
                shard: AUDIT_BASE_SHARD,
                acc: last.1,
                count: last.0,
                seq: old.map_or(0, |o| o.seq) + 1,
                tag: card.digest_tag(&base_bytes(last.0, &last.1))?,
            })?;
            let gone = tx.delete_audit_through(last.0)?;
            if gone != count {
                return Err(Error::Integrity(format!(
                    "the archive holds {count} entries but the table had {gone} of them"
                )));
            }
            fault(stop, ArchiveStep::Deleted)
        })?;
        tracing::info!(entries = count, first, last = last.0, file = %out.display(), "audit entries archived");
        Ok(Some(ArchiveReport {
            path: out.to_owned(),
            entries: count,
            first,
            last: last.0,
        }))
    }

    /// Checks an archive file ([`verify_archive`]) against this center's
    /// card and table.
    pub fn verify_audit_archive(&self, path: &Path) -> Result<ArchiveCheck> {
        verify_archive(path, self.card(), self.database())
    }
}

/// Checks an archive file's MAC (the card's tag over every line but the
/// last), reading it line by line.
fn check_mac(path: &Path, card: &dyn EncryptionCard) -> Result<()> {
    let mut h = Sha256::new();
    let mut pending: Option<String> = None;
    for line in BufReader::new(std::fs::File::open(path)?).lines() {
        let line = line.map_err(|_| bad(path, "not an archive file"))?;
        if let Some(p) = pending.replace(line) {
            h.update(p.as_bytes());
            h.update(b"\n");
        }
    }
    let last_line = pending.ok_or_else(|| bad(path, "empty"))?;
    let want: serde_json::Value =
        serde_json::from_str(&last_line).map_err(|_| bad(path, "no MAC line"))?;
    let want = want
        .get("mac")
        .and_then(|m| m.as_str())
        .and_then(|m| hex::decode(m).ok())
        .ok_or_else(|| bad(path, "no MAC line"))?;
    let got = mac(card, &h.finalize())?;
    if !bool::from(subtle::ConstantTimeEq::ct_eq(&got[..], &want[..])) {
        return Err(bad(
            path,
            "MAC does not match: altered, cut short, or made with another card",
        ));
    }
    Ok(())
}

fn bad(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Integrity(format!("audit archive {}: {why}", path.display()))
}

fn entry_of(v: &serde_json::Value) -> Option<AuditRecord> {
    let h32 =
        |k: &str| -> Option<[u8; 32]> { hex::decode(v.get(k)?.as_str()?).ok()?.try_into().ok() };
    let device = match v.get("device")? {
        serde_json::Value::Null => None,
        d => {
            let b: [u8; 8] = hex::decode(d.as_str()?).ok()?.try_into().ok()?;
            Some(microcert_core::DeviceId(b))
        }
    };
    let generation = match v.get("generation")? {
        serde_json::Value::Null => None,
        g => Some(u8::try_from(g.as_u64()?).ok()?),
    };
    Some(AuditRecord {
        seq: v.get("seq")?.as_u64()?,
        entry: NewAudit {
            time: v.get("time")?.as_u64()?,
            actor: v.get("actor")?.as_str()?.to_owned(),
            action: v.get("action")?.as_str()?.to_owned(),
            device,
            generation,
            reason: v.get("reason")?.as_str()?.to_owned(),
        },
        prev_hash: h32("prev_hash")?,
        hash: h32("hash")?,
    })
}

/// Checks an archive file: the card's MAC over it (made with this card,
/// not altered, not cut short), then the hash chain of every entry from
/// its `prev_hash` to its last, then how its last entry links to the
/// table ([`ArchiveLink`]). The file is read twice, line by line (never
/// whole in memory): the MAC before anything is parsed.
pub fn verify_archive(
    path: &Path,
    card: &dyn EncryptionCard,
    db: &dyn crate::db::KeyDatabase,
) -> Result<ArchiveCheck> {
    check_mac(path, card)?;
    // Pass 2: the chain.
    let mut lines = BufReader::new(std::fs::File::open(path)?).lines();
    let header: serde_json::Value = lines
        .next()
        .and_then(|l| l.ok())
        .and_then(|l| serde_json::from_str(&l).ok())
        .ok_or_else(|| bad(path, "no header"))?;
    if header.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(bad(path, "not an audit archive"));
    }
    let first = header
        .get("first")
        .and_then(|f| f.as_u64())
        .ok_or_else(|| bad(path, "no first entry"))?;
    let mut prev: [u8; 32] = header
        .get("prev_hash")
        .and_then(|p| p.as_str())
        .and_then(|p| hex::decode(p).ok())
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| bad(path, "no prev_hash"))?;
    let mut seq = first
        .checked_sub(1)
        .ok_or_else(|| bad(path, "no first entry"))?;
    let mut n = 0u64;
    let mut end = None;
    for line in lines {
        let line = line?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|_| bad(path, format!("entry {}", seq + 1)))?;
        if v.get("mac").is_some() {
            break;
        }
        if v.get("t").and_then(|t| t.as_str()) == Some("end") {
            end = Some(v);
            continue;
        }
        if end.is_some() {
            return Err(bad(path, "entries after the end line"));
        }
        let e = entry_of(&v).ok_or_else(|| bad(path, format!("entry {}", seq + 1)))?;
        if audit::verify_chain(prev, std::slice::from_ref(&e)).is_some() || e.seq != seq + 1 {
            return Err(bad(
                path,
                format!("entry {} does not follow from the one before", seq + 1),
            ));
        }
        prev = e.hash;
        seq = e.seq;
        n += 1;
    }
    let end = end.ok_or_else(|| bad(path, "no end line"))?;
    if end.get("last").and_then(|l| l.as_u64()) != Some(seq)
        || end.get("entries").and_then(|l| l.as_u64()) != Some(n)
        || end.get("last_hash").and_then(|l| l.as_str()) != Some(&hex::encode(prev))
    {
        return Err(bad(path, "the end line does not match the entries"));
    }
    // The link to the table.
    let (base_seq, base_hash) = tagged_base(db, card)?;
    let link = if (base_seq, base_hash) == (seq, prev) {
        ArchiveLink::Checkpoint
    } else if base_seq > seq {
        ArchiveLink::Older
    } else if seq > 0
        && db
            .audit_log(seq - 1, 1)?
            .first()
            .is_some_and(|r| r.seq == seq && r.hash == prev)
    {
        ArchiveLink::InTable
    } else {
        return Err(bad(
            path,
            format!(
                "its last entry {seq} is neither the table's checkpoint (entry {base_seq}) nor in the table"
            ),
        ));
    };
    Ok(ArchiveCheck {
        entries: n,
        first,
        last: seq,
        link,
    })
}

/// The notary table's archive format (the same framing: a header, one
/// line per record with its card seal, an end line, the card's MAC).
const NOTARY_FORMAT: &str = "microcert-notary-archive";

/// Records deleted per transaction when a notary archive empties the
/// table of what it moved (each chunk's records are in the complete
/// archive before any is deleted).
const NOTARY_CHUNK: usize = 500;

fn notary_json(n: &crate::db::NotaryRow) -> serde_json::Value {
    serde_json::json!({
        "device": n.device.to_string(),
        "generation": n.generation,
        "t": n.t,
        "r": n.r,
        "digest": hex::encode(n.digest),
        "tag": hex::encode(&n.tag),
        "first_seen": n.first_seen,
        "seal": n.seal.map(hex::encode),
    })
}

fn notary_of(v: &serde_json::Value) -> Option<crate::db::NotaryRow> {
    let device: [u8; 8] = hex::decode(v.get("device")?.as_str()?)
        .ok()?
        .try_into()
        .ok()?;
    Some(crate::db::NotaryRow {
        device: microcert_core::DeviceId(device),
        generation: u8::try_from(v.get("generation")?.as_u64()?).ok()?,
        t: u32::try_from(v.get("t")?.as_u64()?).ok()?,
        r: v.get("r")?.as_u64()?,
        digest: hex::decode(v.get("digest")?.as_str()?)
            .ok()?
            .try_into()
            .ok()?,
        tag: hex::decode(v.get("tag")?.as_str()?).ok()?,
        first_seen: v.get("first_seen")?.as_u64()?,
        seal: match v.get("seal")? {
            serde_json::Value::Null => None,
            s => Some(hex::decode(s.as_str()?).ok()?.try_into().ok()?),
        },
    })
}

/// The records of a notary archive, in order (its MAC already checked).
fn notary_records(
    path: &Path,
    mut each: impl FnMut(crate::db::NotaryRow) -> Result<()>,
) -> Result<u64> {
    let mut lines = BufReader::new(std::fs::File::open(path)?).lines();
    let header: serde_json::Value = lines
        .next()
        .and_then(|l| l.ok())
        .and_then(|l| serde_json::from_str(&l).ok())
        .ok_or_else(|| bad(path, "no header"))?;
    if header.get("format").and_then(|f| f.as_str()) != Some(NOTARY_FORMAT) {
        return Err(bad(path, "not a notary archive"));
    }
    for (n, line) in (0u64..).zip(lines) {
        let v: serde_json::Value =
            serde_json::from_str(&line?).map_err(|_| bad(path, format!("record {}", n + 1)))?;
        if v.get("t").and_then(|t| t.as_str()) == Some("end") {
            if v.get("entries").and_then(|e| e.as_u64()) != Some(n) {
                return Err(bad(path, "the end line does not match the records"));
            }
            return Ok(n);
        }
        let row = notary_of(&v).ok_or_else(|| bad(path, format!("record {}", n + 1)))?;
        each(row)?;
    }
    Err(bad(path, "no end line"))
}

/// Whether `path` is a notary archive (by its header), else an audit one.
pub fn is_notary_archive(path: &Path) -> Result<bool> {
    let first = BufReader::new(std::fs::File::open(path)?)
        .lines()
        .next()
        .transpose()?
        .unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(&first).map_err(|_| bad(path, "not an archive file"))?;
    Ok(v.get("format").and_then(|f| f.as_str()) == Some(NOTARY_FORMAT))
}

/// What [`verify_notary_archive`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotaryArchiveCheck {
    /// Records in the file.
    pub records: u64,
    /// Of them, still in the table (an archive interrupted before its
    /// deletions committed, or a copy).
    pub in_table: u64,
}

/// Checks a notary archive: the card's MAC over the file, then every
/// record's own card seal (each stays verifiable alone), read line by
/// line.
pub fn verify_notary_archive(
    path: &Path,
    card: &dyn EncryptionCard,
    db: &dyn crate::db::KeyDatabase,
) -> Result<NotaryArchiveCheck> {
    check_mac(path, card)?;
    let mut in_table = 0;
    let records = notary_records(path, |n| {
        crate::integrity::check_notary(card, &n).map_err(|_| {
            bad(
                path,
                format!("the record of {} t {} fails its card seal", n.device, n.t),
            )
        })?;
        let stored = with_tx(db, |tx| {
            tx.notary((n.device, n.generation, n.t, n.r, &n.digest))
        })?;
        if stored.is_some() {
            in_table += 1;
        }
        Ok(())
    })?;
    Ok(NotaryArchiveCheck { records, in_table })
}

impl Center {
    /// Moves the notary records first seen before `before` (Unix seconds)
    /// into the new archive file `out` (each with its card seal, the file
    /// under the card's MAC) and deletes them from the table, their digest
    /// shards following, audited as `actor`. None when there is nothing
    /// to archive. A signature whose record was archived and that is
    /// verified again is notarized again, first seen at that time.
    pub fn archive_notary(&self, before: u64, out: &Path, actor: &str, now: u64) -> Archived {
        let job = ArchiveJob {
            before,
            out,
            actor,
            now,
            stop: None,
        };
        self.archive(ArchiveTable::Notary, job)
    }

    fn archive_notary_job(&self, job: ArchiveJob<'_>) -> Archived {
        let ArchiveJob {
            before,
            out,
            actor,
            now,
            stop,
        } = job;
        let db = self.database();
        let card = self.card();
        let (dir, tmp, opts) = temp_beside(out, card)?;
        let mut count = 0u64;
        let written = (|| -> Result<()> {
            let header = serde_json::json!({
                "format": NOTARY_FORMAT,
                "version": 1,
                "table": "notary",
                "card": card_id(card)?,
                "created": now,
                "before": before,
            });
            let mut w = start(&opts, &tmp, &header)?;
            let mut last: Option<crate::db::NotaryRow> = None;
            loop {
                let page = db.scan_notary(last.as_ref(), 1000)?;
                let Some(end) = page.last().cloned() else {
                    break;
                };
                for n in page.iter().filter(|n| n.first_seen < before) {
                    // A record that fails its seal is not archived as
                    // good: the archive stops (the integrity check names
                    // it; repair first).
                    crate::integrity::check_notary(card, n)?;
                    writeln!(w, "{}", notary_json(n))?;
                    count += 1;
                    if stop == Some(ArchiveStep::PartWritten) {
                        w.flush()?;
                        return fault(stop, ArchiveStep::PartWritten);
                    }
                }
                last = Some(end);
            }
            if count == 0 {
                return Ok(());
            }
            writeln!(w, "{}", serde_json::json!({ "t": "end", "entries": count }))?;
            w.finish(card)
        })();
        if !publish(written, count, stop, (&tmp, out, &dir))? {
            return Ok(None);
        }
        // The records go, chunk by chunk, from the complete archive (read
        // back, so memory stays bounded); the first chunk's transaction
        // carries the audit entry.
        let mut chunk = Vec::with_capacity(NOTARY_CHUNK);
        let mut first = true;
        let flush = |chunk: &mut Vec<crate::db::NotaryRow>, first: &mut bool| -> Result<()> {
            with_tx(db, |tx| {
                if *first {
                    audit::append(
                        tx,
                        card,
                        &NewAudit::new(now, actor, "notary-archive").because(format!(
                                "{count} notary record(s) first seen before {before} moved to the archive {}",
                                out.display()
                            )),
                    )?;
                }
                for n in chunk.iter() {
                    tx.delete_notary(n)?;
                }
                fault(stop, ArchiveStep::Deleted)
            })?;
            *first = false;
            chunk.clear();
            Ok(())
        };
        notary_records(out, |n| {
            chunk.push(n);
            if chunk.len() == NOTARY_CHUNK {
                flush(&mut chunk, &mut first)?;
            }
            Ok(())
        })?;
        if !chunk.is_empty() {
            flush(&mut chunk, &mut first)?;
        }
        tracing::info!(records = count, file = %out.display(), "notary records archived");
        Ok(Some(ArchiveReport {
            path: out.to_owned(),
            entries: count,
            first: 0,
            last: 0,
        }))
    }

    /// Checks a notary archive ([`verify_notary_archive`]) against this
    /// center's card and table.
    pub fn verify_notary_archive(&self, path: &Path) -> Result<NotaryArchiveCheck> {
        verify_notary_archive(path, self.card(), self.database())
    }
}
