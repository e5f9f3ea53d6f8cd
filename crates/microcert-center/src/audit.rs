//! The audit log's hash chain: every entry's hash covers the previous
//! entry's hash, so an edited, deleted, inserted or reordered entry breaks
//! the chain from that point on.
//!
//! The chain alone cannot show a log cut short at its end (the remaining
//! prefix is a valid chain). So the card tags the chain head on every
//! append: the head (seq, hash) is kept as one extra row of the digest
//! table ([`AUDIT_HEAD_SHARD`]: acc = the last hash, count = the last seq),
//! with the card's tag (domain "MC-DIGEST", bytes "MC-AUDIT-HEAD-v1" ...)
//! written in the same transaction as the entry. The head is checked before
//! it is moved on, so a forged head cannot be laundered by the next append;
//! a tampered head makes every audited change fail until it is repaired
//! (no unaudited change). Keeping it in the digest table needs no new table
//! or backend method: every backend already stores tagged digest rows.
//! What the head alone cannot show, the whole database put back to an older
//! copy, the card's anchor shows ([`crate::anchor`]).

use std::io::Write;

use sha2::{Digest, Sha256};

use crate::card::EncryptionCard;
use crate::db::{AuditRecord, DigestShard, KeyDatabase, NewAudit, Tx};
use crate::{Error, Result};

/// The digest-table row that holds the audit chain's head (record shards
/// are 0..[`crate::integrity::SHARDS`]).
pub const AUDIT_HEAD_SHARD: u8 = 255;

/// The digest-table row that holds the archive checkpoint (issue 15 item
/// 5, retention): acc = the hash of the last entry moved out to an
/// archive, count = its seq. The table's chain starts right after it.
/// No such row: nothing was archived, the chain starts at (0, 0^32).
pub const AUDIT_BASE_SHARD: u8 = 254;

/// The canonical bytes of the archive checkpoint that the card tags.
pub fn base_bytes(seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    let mut b = Vec::with_capacity(56);
    b.extend_from_slice(b"MC-AUDIT-BASE-v1");
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(hash);
    b
}

/// The archive checkpoint as the card tagged it: (seq, hash) of the last
/// archived entry, (0, 0^32) when nothing was archived. Err(Integrity)
/// when the stored checkpoint's tag is wrong.
pub fn tagged_base_of(
    card: &dyn EncryptionCard,
    shards: &[DigestShard],
) -> Result<(u64, [u8; 32])> {
    match shards.iter().find(|s| s.shard == AUDIT_BASE_SHARD) {
        Some(row) => {
            let tag = card.digest_tag(&base_bytes(row.count, &row.acc))?;
            if subtle::ConstantTimeEq::ct_eq(&tag[..], &row.tag[..]).into() {
                Ok((row.count, row.acc))
            } else {
                Err(Error::Integrity("audit archive checkpoint".into()))
            }
        }
        None => Ok((0, [0u8; 32])),
    }
}

/// [`tagged_base_of`] the database's digest rows.
pub fn tagged_base(db: &dyn KeyDatabase, card: &dyn EncryptionCard) -> Result<(u64, [u8; 32])> {
    tagged_base_of(card, &db.digest_shards()?)
}

/// The canonical bytes of a chain head that the card tags.
pub fn head_bytes(seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    let mut b = Vec::with_capacity(56);
    b.extend_from_slice(b"MC-AUDIT-HEAD-v1");
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(hash);
    b
}

fn head_tag_ok(card: &dyn EncryptionCard, row: &DigestShard) -> Result<bool> {
    let tag = card.digest_tag(&head_bytes(row.count, &row.acc))?;
    Ok(subtle::ConstantTimeEq::ct_eq(&tag[..], &row.tag[..]).into())
}

/// Appends an entry and moves the card-tagged head on, in the caller's
/// transaction. Every audit append of the center goes through here.
pub fn append(tx: &mut dyn Tx, card: &dyn EncryptionCard, e: &NewAudit) -> Result<()> {
    append_many(tx, card, std::slice::from_ref(e))
}

/// Appends several entries in order and moves the card-tagged head on
/// once, in the caller's transaction: the same log and head as
/// [`append`] called for each (the head's intermediate values are never
/// stored), with one read and one write of the head instead of one per
/// entry (a batch import's chunk).
pub fn append_many(tx: &mut dyn Tx, card: &dyn EncryptionCard, entries: &[NewAudit]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let (mut seq, mut prev) = match tx.digest_shard(AUDIT_HEAD_SHARD)? {
        Some(row) => {
            if !head_tag_ok(card, &row)? {
                tracing::error!("audit chain head fails its card tag");
                return Err(Error::Integrity("audit log head".into()));
            }
            (row.count, row.acc)
        }
        None => (0, [0u8; 32]),
    };
    let mut records = Vec::with_capacity(entries.len());
    for e in entries {
        tx.append_audit(e)?;
        seq += 1;
        let hash = chain_hash(&prev, seq, e);
        records.push(AuditRecord {
            seq,
            entry: e.clone(),
            prev_hash: prev,
            hash,
        });
        prev = hash;
    }
    tx.audit_sink_record(&records)?;
    let tag = card.digest_tag(&head_bytes(seq, &prev))?;
    tx.put_digest_shard(&DigestShard {
        shard: AUDIT_HEAD_SHARD,
        acc: prev,
        count: seq,
        seq,
        tag,
    })
}

/// The head as the card last tagged it: (seq, hash), (0, 0^32) for an
/// empty log. Err(Integrity) when the stored head's tag is wrong.
pub fn tagged_head(db: &dyn KeyDatabase, card: &dyn EncryptionCard) -> Result<(u64, [u8; 32])> {
    match db
        .digest_shards()?
        .into_iter()
        .find(|s| s.shard == AUDIT_HEAD_SHARD)
    {
        Some(row) if head_tag_ok(card, &row)? => Ok((row.count, row.acc)),
        Some(_) => Err(Error::Integrity("audit log head".into())),
        None => Ok((0, [0u8; 32])),
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditFinding {
    /// The entry at this seq does not follow from the one before: edited,
    /// inserted, deleted before it, or moved (the first bad entry is named).
    Broken {
        /// Sequence number of the first entry that breaks the chain.
        seq: u64,
    },
    /// The log ends before the head the card tagged: entries were cut off
    /// its end.
    Truncated {
        /// Last entry present.
        last: u64,
        /// Last entry the card tagged.
        tagged: u64,
    },
    /// Entries after the card-tagged head: added outside the center.
    Untagged {
        /// First entry beyond the tagged head.
        first: u64,
    },
    /// The last entry is not the one whose hash the card tagged (the end of
    /// the log was replaced).
    HeadMismatch {
        /// The tagged head's seq.
        seq: u64,
    },
    /// The stored head itself fails the card's tag.
    HeadTag,
    /// The archive checkpoint (where the table's chain starts after an
    /// archive) fails the card's tag.
    BaseTag,
}

impl AuditFinding {
    /// The first entry (seq) the finding is about: for a log cut short,
    /// the first missing one; for a bad head tag, 0.
    pub fn seq(&self) -> u64 {
        match self {
            AuditFinding::Broken { seq } | AuditFinding::HeadMismatch { seq } => *seq,
            AuditFinding::Truncated { last, .. } => last + 1,
            AuditFinding::Untagged { first } => *first,
            AuditFinding::HeadTag | AuditFinding::BaseTag => 0,
        }
    }
}

impl std::fmt::Display for AuditFinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditFinding::Broken { seq } => write!(
                f,
                "entry {seq} does not follow from the one before (edited, inserted, deleted or reordered)"
            ),
            AuditFinding::Truncated { last, tagged } => write!(
                f,
                "the log ends at entry {last} but the card tagged entry {tagged}: entries were removed from its end"
            ),
            AuditFinding::Untagged { first } => write!(
                f,
                "entries from {first} on were added outside the center (beyond the card-tagged head)"
            ),
            AuditFinding::HeadMismatch { seq } => {
                write!(f, "entry {seq} is not the one the card tagged as the head")
            }
            AuditFinding::HeadTag => write!(f, "the stored chain head fails the card's tag"),
            AuditFinding::BaseTag => write!(
                f,
                "the archive checkpoint (where the table's chain starts) fails the card's tag"
            ),
        }
    }
}

/// Walks the whole log, then compares its end with the card-tagged head.
/// Returns (entries read, the first finding if any).
pub fn verify(
    db: &dyn KeyDatabase,
    card: &dyn EncryptionCard,
) -> Result<(u64, Option<AuditFinding>)> {
    // After an archive the table's chain starts at the card-tagged
    // checkpoint (the last archived entry), not at (0, 0^32).
    let (mut after, mut prev) = match tagged_base(db, card) {
        Ok(b) => b,
        Err(Error::Integrity(_)) => return Ok((0, Some(AuditFinding::BaseTag))),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    loop {
        let page = db.audit_log(after, 1000)?;
        let Some(last) = page.last() else { break };
        n += page.len() as u64;
        if page[0].seq != after + 1 {
            return Ok((n, Some(AuditFinding::Broken { seq: after + 1 })));
        }
        if let Some(bad) = verify_chain(prev, &page) {
            return Ok((n, Some(AuditFinding::Broken { seq: bad })));
        }
        prev = last.hash;
        after = last.seq;
    }
    let (seq, hash) = match tagged_head(db, card) {
        Ok(h) => h,
        Err(Error::Integrity(_)) => return Ok((n, Some(AuditFinding::HeadTag))),
        Err(e) => return Err(e),
    };
    let finding = if after < seq {
        Some(AuditFinding::Truncated {
            last: after,
            tagged: seq,
        })
    } else if after > seq {
        Some(AuditFinding::Untagged { first: seq + 1 })
    } else if prev != hash {
        Some(AuditFinding::HeadMismatch { seq })
    } else {
        None
    };
    Ok((n, finding))
}

/// One entry as a JSON object (the export's line format).
pub fn to_json(r: &AuditRecord) -> serde_json::Value {
    serde_json::json!({
        "seq": r.seq,
        "time": r.entry.time,
        "actor": r.entry.actor,
        "action": r.entry.action,
        "device": r.entry.device.map(|d| d.to_string()),
        "generation": r.entry.generation,
        "reason": r.entry.reason,
        "prev_hash": hex::encode(r.prev_hash),
        "hash": hex::encode(r.hash),
    })
}

/// Writes every entry as JSON Lines, in order; returns how many.
pub fn export_jsonl(db: &dyn KeyDatabase, out: &mut dyn Write) -> Result<u64> {
    let mut after = 0;
    let mut n = 0;
    loop {
        let page = db.audit_log(after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in &page {
            writeln!(out, "{}", to_json(r))?;
            n += 1;
        }
    }
    out.flush()?;
    Ok(n)
}

fn put_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

/// SHA-256("MC-AUDIT" 0x00 || prev || seq || time || actor || action ||
/// device || generation || reason), strings length-prefixed (u64), absent
/// device or generation as a 0 flag byte, present ones as 1 and the value.
pub fn chain_hash(prev: &[u8; 32], seq: u64, e: &NewAudit) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"MC-AUDIT\0");
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(e.time.to_be_bytes());
    put_str(&mut h, &e.actor);
    put_str(&mut h, &e.action);
    match e.device {
        Some(d) => {
            h.update([1]);
            h.update(d.0);
        }
        None => h.update([0]),
    }
    match e.generation {
        Some(g) => h.update([1, g]),
        None => h.update([0]),
    }
    put_str(&mut h, &e.reason);
    h.finalize().into()
}

/// Checks a run of consecutive entries starting after `prev` (0^32 before
/// the first entry); returns the seq of the first entry that breaks the
/// chain, if any.
pub fn verify_chain(prev: [u8; 32], entries: &[AuditRecord]) -> Option<u64> {
    let mut prev = prev;
    let first = entries.first().map(|e| e.seq)?;
    for (expect_seq, e) in (first..).zip(entries) {
        if e.seq != expect_seq {
            // A gap or a moved entry: name the first position that is wrong.
            return Some(expect_seq);
        }
        if e.prev_hash != prev || chain_hash(&prev, e.seq, &e.entry) != e.hash {
            return Some(e.seq);
        }
        prev = e.hash;
    }
    None
}

/// A second audit sink, like Vault's audit devices: every audit entry the
/// center appends is handed to it (with its chain hash) inside the
/// entry's transaction, before the commit. When it cannot record the
/// entry, the change is refused and nothing is changed (the transaction
/// rolls back). Decision: the sink is written first, the database commits
/// second, so no committed change is missing from the sink; the price is
/// that a sink may hold an entry whose transaction then failed to commit
/// (a crash, a lost connection): its seq and chain hash then do not match
/// the table's entry of that seq (or there is none), which tells them
/// apart.
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// Records `entries` durably, in order, or fails.
    fn record(&self, entries: &[AuditRecord]) -> std::io::Result<()>;
    /// What it is, for messages ("file /var/log/microcert/audit.jsonl").
    fn describe(&self) -> String;
}

/// A JSON-lines file (mode 0600): one line per entry, [`to_json`] (with
/// its chain hash), written with O_APPEND and fsync'd before the entry's
/// transaction commits. The file is opened for each batch, so a file
/// moved away by log rotation is made again.
#[derive(Debug)]
pub struct FileSink {
    path: std::path::PathBuf,
    lock: std::sync::Mutex<()>,
}

impl FileSink {
    /// A sink appending to `path`, which is opened (made, mode 0600) now
    /// to check it can be written.
    pub fn open(path: &std::path::Path) -> std::io::Result<FileSink> {
        let s = FileSink {
            path: path.to_owned(),
            lock: std::sync::Mutex::new(()),
        };
        let f = s.file()?;
        // An existing file readable by others is made private.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if f.metadata()?.permissions().mode() & 0o077 != 0 {
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
        }
        drop(f);
        Ok(s)
    }

    fn file(&self) -> std::io::Result<std::fs::File> {
        let mut o = std::fs::OpenOptions::new();
        o.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        o.open(&self.path)
    }
}

impl AuditSink for FileSink {
    fn record(&self, entries: &[AuditRecord]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(256 * entries.len());
        for r in entries {
            serde_json::to_writer(&mut buf, &to_json(r))?;
            buf.push(b'\n');
        }
        let _g = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut f = self.file()?;
        f.write_all(&buf)?;
        f.sync_data()
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

/// The local syslog (RFC 3164 over the Unix datagram socket, `/dev/log`
/// unless told otherwise), facility auth (4), severity notice: one
/// message per entry, its JSON line as the text. A datagram the socket
/// does not take (no syslog daemon, its queue full) is an error.
#[cfg(unix)]
#[derive(Debug)]
pub struct SyslogSink {
    socket: std::path::PathBuf,
}

#[cfg(unix)]
impl SyslogSink {
    /// The syslog socket `socket` (usually `/dev/log`), checked now.
    pub fn open(socket: &std::path::Path) -> std::io::Result<SyslogSink> {
        let s = SyslogSink {
            socket: socket.to_owned(),
        };
        s.connect()?;
        Ok(s)
    }

    fn connect(&self) -> std::io::Result<std::os::unix::net::UnixDatagram> {
        let d = std::os::unix::net::UnixDatagram::unbound()?;
        d.connect(&self.socket)?;
        d.set_write_timeout(Some(std::time::Duration::from_secs(2)))?;
        Ok(d)
    }
}

#[cfg(unix)]
impl AuditSink for SyslogSink {
    fn record(&self, entries: &[AuditRecord]) -> std::io::Result<()> {
        let d = self.connect()?;
        for r in entries {
            // <PRI> = facility auth (4) * 8 + severity notice (5).
            let msg = format!("<37>microcert-audit: {}", to_json(r));
            d.send(msg.as_bytes())?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("syslog {}", self.socket.display())
    }
}

/// Several sinks: an entry is recorded when every one recorded it.
#[derive(Debug)]
pub struct Sinks(pub Vec<std::sync::Arc<dyn AuditSink>>);

impl AuditSink for Sinks {
    fn record(&self, entries: &[AuditRecord]) -> std::io::Result<()> {
        for s in &self.0 {
            s.record(entries)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", s.describe())))?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|s| s.describe())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Hands `entries` to `sink`, mapping a failure to [`Error::AuditSink`]
/// (counted in `microcert_audit_sink_failures_total`).
pub fn record_in_sink(sink: &dyn AuditSink, entries: &[AuditRecord]) -> Result<()> {
    sink.record(entries).map_err(|e| {
        metrics::counter!("microcert_audit_sink_failures_total").increment(1);
        tracing::error!(sink = %sink.describe(), error = %e, "the audit sink cannot record an entry: the change is refused");
        Error::AuditSink(format!("{}: {e}", sink.describe()))
    })
}
