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
//! leaves it behind, which is safe). It follows every committed change: a
//! center told where its anchor is ([`crate::Center::keep_anchor`]) runs a
//! [`Keeper`] that looks at the database's mark every second and moves the
//! anchor when it moved, and writes it once more when the center is
//! dropped (a clean shutdown). A database put back to any state older than
//! a change acknowledged more than a second before a crash, or before a
//! clean stop, is older than the anchor and reported (and `serve` refuses
//! to start on it). It is also refreshed after every clean integrity check
//! and every backup. The seqs cover seed records, notary records, commands
//! and device rows (their digest shards, [`crate::integrity`]) and the
//! audit head; since v3 also the token and mark shards (a token row put
//! back with its shard, a replay-guard or clock mark put back with the
//! marks' shard) and the keyring's head epoch (an older keyring put back
//! while every center was stopped).
//!
//! Where it lives: a file whose path the caller passes (the CLI and
//! `serve` use `DATA/center.anchor`) and, when the card can keep one, a
//! copy on the card ([`EncryptionCard::store_anchor`]: a private token
//! object on a PKCS#11 token), named after the file's path. Reading takes
//! the higher of the two. Its tag means it cannot be forged or moved
//! forward by someone without the card. The file can be put back together
//! with the database by someone who copies both; the token object cannot
//! be put back without the token's PIN (what remains: someone who can
//! write the token, or who puts back the database and the file on a center
//! whose card keeps no copy, the software card).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::card::{EncryptionCard, TAG_LEN, write_atomically};
use crate::db::{DigestShard, KeyDatabase};
use crate::integrity::{ALL_SHARDS, SCAN_SHARDS, SHARDS};
use crate::{Error, Result};

const MAGIC_V1: &[u8] = b"MC-ANCHOR-v1";
const LEN_V1: usize = 12 + 8 + 8 * SHARDS as usize + 8 + 32;
const MAGIC_V2: &[u8] = b"MC-ANCHOR-v2";
const LEN_V2: usize = 12 + 8 + 8 * ALL_SHARDS as usize + 8 + 32;
const MAGIC: &[u8] = b"MC-ANCHOR-v3";
const LEN: usize = 12 + 8 + 8 * SCAN_SHARDS as usize + 8 + 32 + 8;

/// Serialises read-merge-write of anchors in this process (the keeper and
/// an operator's restore resetting it).
static WRITING: Mutex<()> = Mutex::new(());

/// The high-water mark: per shard, the number of changes applied; the
/// audit log's tagged head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// When it was taken (Unix seconds).
    pub time: u64,
    /// `seq` of each digest shard (seed records, notary records,
    /// commands, device rows, tokens, marks:
    /// [`crate::integrity::SCAN_SHARDS`]).
    pub shard_seq: [u64; SCAN_SHARDS as usize],
    /// Seq of the audit chain's tagged head.
    pub audit_seq: u64,
    /// Hash of that head.
    pub audit_hash: [u8; 32],
    /// The keyring head's epoch (0 without a keyring).
    pub keyring_epoch: u64,
}

impl Anchor {
    /// The database's current mark (shard seqs and the tagged audit head).
    pub fn of(db: &dyn KeyDatabase, card: &dyn EncryptionCard, now: u64) -> Result<Self> {
        let mut shard_seq = [0u64; SCAN_SHARDS as usize];
        for s in db.digest_shards()? {
            if s.shard < SCAN_SHARDS {
                shard_seq[usize::from(s.shard)] = s.seq;
            }
        }
        let (audit_seq, audit_hash) = crate::audit::tagged_head(db, card)?;
        Ok(Anchor {
            time: now,
            shard_seq,
            audit_seq,
            audit_hash,
            keyring_epoch: crate::keyring::head_epoch(db, card)?,
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
        b.extend_from_slice(&self.keyring_epoch.to_be_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        let n = if b.len() == LEN && &b[..12] == MAGIC {
            usize::from(SCAN_SHARDS)
        } else if b.len() == LEN_V2 && &b[..12] == MAGIC_V2 {
            usize::from(ALL_SHARDS)
        } else if b.len() == LEN_V1 && &b[..12] == MAGIC_V1 {
            usize::from(SHARDS)
        } else {
            return None;
        };
        let u64_at = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let mut shard_seq = [0u64; SCAN_SHARDS as usize];
        for (i, s) in shard_seq.iter_mut().enumerate().take(n) {
            *s = u64_at(20 + 8 * i);
        }
        let o = 20 + 8 * n;
        let mut audit_hash = [0u8; 32];
        audit_hash.copy_from_slice(&b[o + 8..o + 40]);
        // Older formats kept no keyring epoch: 0, which any database
        // covers.
        let keyring_epoch = if b.len() >= o + 48 { u64_at(o + 40) } else { 0 };
        Some(Anchor {
            time: u64_at(12),
            shard_seq,
            audit_seq: u64_at(o),
            audit_hash,
            keyring_epoch,
        })
    }

    /// Shards whose seq in `db_mark` is below this anchor's: rolled back.
    pub fn rolled_back_shards(&self, db_mark: &Anchor) -> Vec<u8> {
        (0..SCAN_SHARDS)
            .filter(|&i| db_mark.shard_seq[usize::from(i)] < self.shard_seq[usize::from(i)])
            .collect()
    }

    /// Whether the keyring in `db_mark` is older than this anchor's.
    pub fn keyring_rolled_back(&self, db_mark: &Anchor) -> bool {
        db_mark.keyring_epoch < self.keyring_epoch
    }

    /// True when `other` is at or beyond this anchor everywhere.
    pub fn is_covered_by(&self, other: &Anchor) -> bool {
        self.rolled_back_shards(other).is_empty()
            && other.audit_seq >= self.audit_seq
            && !self.keyring_rolled_back(other)
    }

    /// True when a backup whose mark is `backup` holds every record change
    /// this anchor saw: the record shards and the audit log (a backup
    /// carries no tokens, marks or keyring epoch: those are the restored
    /// database's own from then on).
    pub fn records_covered_by(&self, backup: &Anchor) -> bool {
        (0..ALL_SHARDS).all(|i| backup.shard_seq[usize::from(i)] >= self.shard_seq[usize::from(i)])
            && backup.audit_seq >= self.audit_seq
    }

    /// Merges: the higher mark of each.
    fn max(&self, other: &Anchor) -> Anchor {
        let mut out = self.clone();
        for i in 0..usize::from(SCAN_SHARDS) {
            out.shard_seq[i] = out.shard_seq[i].max(other.shard_seq[i]);
        }
        out.keyring_epoch = out.keyring_epoch.max(other.keyring_epoch);
        if other.audit_seq > out.audit_seq {
            out.audit_seq = other.audit_seq;
            out.audit_hash = other.audit_hash;
        }
        out.time = out.time.max(other.time);
        out
    }
}

/// The name of the card's copy of the anchor kept beside `path`.
fn card_name(path: &Path) -> String {
    use sha2::Digest;
    let full = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let h = sha2::Sha256::digest(full.to_string_lossy().as_bytes());
    format!("microcert-anchor-{}", hex::encode(&h[..8]))
}

fn parse(b: &[u8], card: &dyn EncryptionCard, what: &str) -> Result<Anchor> {
    let bad = || Error::Integrity(format!("anchor {what} fails its card tag"));
    if b.len() < TAG_LEN {
        return Err(bad());
    }
    let (body, tag) = b.split_at(b.len() - TAG_LEN);
    let want = card.digest_tag(body)?;
    if !bool::from(subtle::ConstantTimeEq::ct_eq(&want[..], tag)) {
        return Err(bad());
    }
    Anchor::from_bytes(body).ok_or_else(bad)
}

/// Reads and checks the anchor (the file and the card's copy, the higher
/// of the two); None when there is none yet.
pub fn load(path: &Path, card: &dyn EncryptionCard) -> Result<Option<Anchor>> {
    let file = match std::fs::read(path) {
        Ok(b) => Some(parse(&b, card, &format!("file {}", path.display()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    let on_card = match card.load_anchor(&card_name(path))? {
        Some(b) => Some(parse(&b, card, "on the card")?),
        None => None,
    };
    Ok(match (file, on_card) {
        (Some(f), Some(c)) => Some(f.max(&c)),
        (f, c) => f.or(c),
    })
}

fn write(path: &Path, card: &dyn EncryptionCard, mark: &Anchor) -> Result<()> {
    let mut b = mark.bytes();
    let tag = card.digest_tag(&b)?;
    b.extend_from_slice(&tag);
    card.store_anchor(&card_name(path), &b)?;
    write_atomically(path, &b)
}

/// Moves the anchor forward to `mark` (never back: each field keeps the
/// higher of the stored and the new value) and writes it atomically.
pub fn store(path: &Path, card: &dyn EncryptionCard, mark: &Anchor) -> Result<Anchor> {
    let _w = WRITING.lock().unwrap_or_else(|p| p.into_inner());
    let merged = match load(path, card) {
        Ok(Some(old)) => old.max(mark),
        // A damaged anchor is replaced only by the caller's explicit
        // choice (repair after a restore); here it is an error.
        Err(e) => return Err(e),
        Ok(None) => mark.clone(),
    };
    write(path, card, &merged)?;
    Ok(merged)
}

/// Replaces the anchor with `mark` even if lower or damaged: after an
/// operator restored a backup on purpose (`backup restore`, `integrity
/// repair`), which is audited.
pub fn reset(path: &Path, card: &dyn EncryptionCard, mark: &Anchor) -> Result<()> {
    let _w = WRITING.lock().unwrap_or_else(|p| p.into_inner());
    write(path, card, mark)
}

/// Keeps a center's anchor following its database (see the module docs):
/// a thread that moves the anchor at most a second after the database's
/// mark moved, and a last write when dropped.
pub struct Keeper {
    state: Arc<KeeperState>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Set when the database was found older than the anchor at start.
    rolled_back: Option<String>,
}

struct KeeperState {
    db: Arc<dyn KeyDatabase>,
    card: Arc<dyn EncryptionCard>,
    path: PathBuf,
    last: Mutex<Option<Vec<DigestShard>>>,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("anchor::Keeper")
            .field("path", &self.state.path)
            .finish_non_exhaustive()
    }
}

impl KeeperState {
    /// Writes the anchor if the database's mark moved since the last write.
    fn flush(&self, now: u64) -> Result<()> {
        let shards = self.db.digest_shards()?;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref() == Some(&shards) {
            return Ok(());
        }
        let mark = Anchor::of(&*self.db, &*self.card, now)?;
        store(&self.path, &*self.card, &mark)?;
        *last = Some(shards);
        Ok(())
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How a database compares with its anchor: None when it is at or beyond
/// it (or there is none), the finding otherwise.
pub fn compare(
    path: &Path,
    db: &dyn KeyDatabase,
    card: &dyn EncryptionCard,
) -> Result<Option<String>> {
    let Some(a) = load(path, card)? else {
        return Ok(None);
    };
    let mark = Anchor::of(db, card, 0)?;
    if a.is_covered_by(&mark) {
        return Ok(None);
    }
    let keyring = if a.keyring_rolled_back(&mark) {
        format!(
            ", keyring at epoch {} of {}",
            mark.keyring_epoch, a.keyring_epoch
        )
    } else {
        String::new()
    };
    Ok(Some(format!(
        "the key database is older than the card's anchor {} (shards {:?} behind, audit log at {} of {}{keyring}): it was put back to an older copy; repair with `microcert integrity repair` or restore a backup",
        path.display(),
        a.rolled_back_shards(&mark),
        mark.audit_seq,
        a.audit_seq
    )))
}

impl Keeper {
    /// Checks the database against the anchor at `path` (a finding is
    /// logged as an error and kept, [`Keeper::rolled_back`]), then starts
    /// following it every `period`.
    pub fn start(
        db: Arc<dyn KeyDatabase>,
        card: Arc<dyn EncryptionCard>,
        path: PathBuf,
        period: Duration,
    ) -> Result<Self> {
        let rolled_back = compare(&path, &*db, &*card)?;
        if let Some(f) = &rolled_back {
            tracing::error!(finding = %f, "KEY DATABASE ROLLED BACK");
        }
        let state = Arc::new(KeeperState {
            db,
            card,
            path,
            last: Mutex::new(None),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("anchor-keeper".into())
            .spawn(move || {
                let mut failing = false;
                loop {
                    {
                        let stop = st.stop.lock().unwrap_or_else(|p| p.into_inner());
                        let (stop, _) = st
                            .wake
                            .wait_timeout_while(stop, period, |s| !*s)
                            .unwrap_or_else(|p| p.into_inner());
                        if *stop {
                            return;
                        }
                    }
                    match st.flush(unix_now()) {
                        Ok(()) => failing = false,
                        Err(e) if !failing => {
                            failing = true;
                            tracing::error!(error = %e, "cannot move the card's anchor");
                        }
                        Err(_) => {}
                    }
                }
            })?;
        Ok(Keeper {
            state,
            thread: Some(thread),
            rolled_back,
        })
    }

    /// What was found at start: the database older than the anchor.
    pub fn rolled_back(&self) -> Option<&str> {
        self.rolled_back.as_deref()
    }

    /// Writes the anchor now if the database moved.
    pub fn flush(&self) -> Result<()> {
        self.state.flush(unix_now())
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        *self.state.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.state.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Err(e) = self.state.flush(unix_now()) {
            tracing::error!(error = %e, "cannot write the card's anchor at shutdown");
        }
    }
}
