//! The card's anchor: a high-water mark of the key database kept outside
//! it, so a database put back to an older copy of itself is detected.
//!
//! Why it is needed: an older copy of the whole database is consistent with
//! itself (every record tag, shard tag and the audit head were made by the
//! card), so no check inside the database can tell it from the current one.
//! What moves forward only is the shards' `seq` (changes ever applied) and
//! the audit head's seq. The anchor records them, tagged by the card
//! (domain "MC-DIGEST", bytes "MC-ANCHOR-v1" ...), and a database whose
//! shard seq or audit seq is below the anchor's has been rolled back.
//!
//! The anchor is written only after the state it records has committed, so
//! it never runs ahead of the database (a crash between commit and anchor
//! leaves it behind, which is safe). It is refreshed after every integrity
//! check that finds the database clean, after every backup, and by
//! [`crate::Center::refresh_anchor`]; a rollback to a state newer than the
//! last refresh is not visible (the window is the refresh interval, 10
//! minutes by default in `serve`).
//!
//! Where it lives: a file whose path the caller passes
//! ([`crate::Center::integrity_check`], [`crate::Center::refresh_anchor`];
//! the CLI and `serve` use `DATA/center.anchor`). Its tag means it cannot be
//! forged or moved forward by someone without the card; it can be put back
//! together with the database by someone who copies both, exactly as the
//! software card's own file can. In the data directory it protects against
//! a database restored or replaced on its own (the usual mistake, and the
//! usual attack on a database server); on other storage than the database
//! it raises the bar. A PKCS#11 token could keep it as a token object (not
//! done: the trait has no method for it yet).

use std::path::Path;

use crate::card::{EncryptionCard, TAG_LEN, write_atomically};
use crate::db::KeyDatabase;
use crate::integrity::SHARDS;
use crate::{Error, Result};

const MAGIC: &[u8] = b"MC-ANCHOR-v1";
const LEN: usize = 12 + 8 + 8 * SHARDS as usize + 8 + 32;

/// The high-water mark: per shard, the number of changes applied; the
/// audit log's tagged head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// When it was taken (Unix seconds).
    pub time: u64,
    /// `seq` of each record shard.
    pub shard_seq: [u64; SHARDS as usize],
    /// Seq of the audit chain's tagged head.
    pub audit_seq: u64,
    /// Hash of that head.
    pub audit_hash: [u8; 32],
}

impl Anchor {
    /// The database's current mark (shard seqs and the tagged audit head).
    pub fn of(db: &dyn KeyDatabase, card: &dyn EncryptionCard, now: u64) -> Result<Self> {
        let mut shard_seq = [0u64; SHARDS as usize];
        for s in db.digest_shards()? {
            if s.shard < SHARDS {
                shard_seq[usize::from(s.shard)] = s.seq;
            }
        }
        let (audit_seq, audit_hash) = crate::audit::tagged_head(db, card)?;
        Ok(Anchor {
            time: now,
            shard_seq,
            audit_seq,
            audit_hash,
        })
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(LEN);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.time.to_be_bytes());
        for s in &self.shard_seq {
            b.extend_from_slice(&s.to_be_bytes());
        }
        b.extend_from_slice(&self.audit_seq.to_be_bytes());
        b.extend_from_slice(&self.audit_hash);
        b
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != LEN || &b[..12] != MAGIC {
            return None;
        }
        let u64_at = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let mut shard_seq = [0u64; SHARDS as usize];
        for (i, s) in shard_seq.iter_mut().enumerate() {
            *s = u64_at(20 + 8 * i);
        }
        let o = 20 + 8 * usize::from(SHARDS);
        let mut audit_hash = [0u8; 32];
        audit_hash.copy_from_slice(&b[o + 8..o + 40]);
        Some(Anchor {
            time: u64_at(12),
            shard_seq,
            audit_seq: u64_at(o),
            audit_hash,
        })
    }

    /// Shards whose seq in `db_mark` is below this anchor's: rolled back.
    pub fn rolled_back_shards(&self, db_mark: &Anchor) -> Vec<u8> {
        (0..SHARDS)
            .filter(|&i| db_mark.shard_seq[usize::from(i)] < self.shard_seq[usize::from(i)])
            .collect()
    }

    /// True when `other` is at or beyond this anchor everywhere.
    pub fn is_covered_by(&self, other: &Anchor) -> bool {
        self.rolled_back_shards(other).is_empty() && other.audit_seq >= self.audit_seq
    }

    /// Merges: the higher mark of each.
    fn max(&self, other: &Anchor) -> Anchor {
        let mut out = self.clone();
        for i in 0..usize::from(SHARDS) {
            out.shard_seq[i] = out.shard_seq[i].max(other.shard_seq[i]);
        }
        if other.audit_seq > out.audit_seq {
            out.audit_seq = other.audit_seq;
            out.audit_hash = other.audit_hash;
        }
        out.time = out.time.max(other.time);
        out
    }
}

/// Reads and checks the anchor file; None when there is none yet.
pub fn load(path: &Path, card: &dyn EncryptionCard) -> Result<Option<Anchor>> {
    let b = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let bad = || Error::Integrity(format!("anchor file {} fails its card tag", path.display()));
    if b.len() != LEN + TAG_LEN {
        return Err(bad());
    }
    let (body, tag) = b.split_at(LEN);
    let want = card.digest_tag(body)?;
    if !bool::from(subtle::ConstantTimeEq::ct_eq(&want[..], tag)) {
        return Err(bad());
    }
    Anchor::from_bytes(body).map(Some).ok_or_else(bad)
}

/// Moves the anchor forward to `mark` (never back: each field keeps the
/// higher of the stored and the new value) and writes it atomically.
pub fn store(path: &Path, card: &dyn EncryptionCard, mark: &Anchor) -> Result<Anchor> {
    let merged = match load(path, card) {
        Ok(Some(old)) => old.max(mark),
        // A damaged anchor is replaced only by the caller's explicit
        // choice (repair after a restore); here it is an error.
        Err(e) => return Err(e),
        Ok(None) => mark.clone(),
    };
    let mut b = merged.bytes();
    let tag = card.digest_tag(&b)?;
    b.extend_from_slice(&tag);
    write_atomically(path, &b)?;
    Ok(merged)
}

/// Replaces the anchor with `mark` even if lower or damaged: after an
/// operator restored a backup on purpose (`backup restore`, `integrity
/// repair`), which is audited.
pub fn reset(path: &Path, card: &dyn EncryptionCard, mark: &Anchor) -> Result<()> {
    let mut b = mark.bytes();
    let tag = card.digest_tag(&b)?;
    b.extend_from_slice(&tag);
    write_atomically(path, &b)
}
