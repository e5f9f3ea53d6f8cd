//! Maintenance services: the full integrity check (records, digest, audit
//! log, card anchor), backups and their automatic schedule.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{CENTER_ACTOR, Center};
use crate::anchor::{self, Anchor};
use crate::audit::{self, AuditFinding};
use crate::backup::{self, BackupSummary};
use crate::db::with_tx;
use crate::integrity::{self, IntegrityReport};
use crate::{DbFailure, Error, Result};

impl Center {
    /// A shared handle on the card, to keep using it after the center is
    /// closed (a whole-database restore needs the center closed).
    pub fn card_arc(&self) -> std::sync::Arc<dyn crate::EncryptionCard> {
        self.card.clone()
    }

    /// The whole integrity check: every record and device tag, the digest
    /// shards, records the audit log says exist, the audit chain and its
    /// card-tagged head, and (with `anchor`) the database against the
    /// card's anchor, which shows a database put back to an older copy.
    /// When everything is clean the anchor is moved forward to the
    /// database's current mark.
    ///
    /// A finding on a busy center is confirmed by a second scan (a record
    /// written between reading it and reading its shard looks like a
    /// mismatch once); only what both scans find is reported.
    pub fn integrity_check(&self, anchor: Option<&Path>, now: u64) -> Result<IntegrityReport> {
        let mut r = self.check_once(anchor)?;
        if !r.is_clean() {
            let again = self.check_once(anchor)?;
            r.bad_records.retain(|x| again.bad_records.contains(x));
            r.bad_shards.retain(|x| again.bad_shards.contains(x));
            r.bad_devices.retain(|x| again.bad_devices.contains(x));
            r.missing_records
                .retain(|x| again.missing_records.contains(x));
            r.rolled_back_shards = again.rolled_back_shards;
            r.audit = again.audit;
            r.anchor = again.anchor;
        }
        if r.is_clean() {
            if let Some(path) = anchor {
                self.refresh_anchor(path, now)?;
            }
        } else {
            for f in r.findings() {
                tracing::error!(finding = %f, "INTEGRITY CHECK FAILED");
            }
        }
        Ok(r)
    }

    fn check_once(&self, anchor_path: Option<&Path>) -> Result<IntegrityReport> {
        let mut r = integrity::scan(&*self.db, &*self.card)?;
        r.bad_marks = self.check_marks()?;
        if let (_, Some(f)) = audit::verify(&*self.db, &*self.card)? {
            r.audit = Some(f.to_string());
        }
        if let Some(path) = anchor_path {
            match anchor::load(path, &*self.card) {
                Ok(Some(a)) => {
                    let mark = match Anchor::of(&*self.db, &*self.card, 0) {
                        Ok(m) => m,
                        // A head failing its tag is reported above.
                        Err(Error::Integrity(_)) => return Ok(r),
                        Err(e) => return Err(e),
                    };
                    r.rolled_back_shards = a.rolled_back_shards(&mark);
                    if a.keyring_rolled_back(&mark) {
                        r.anchor = Some(format!(
                            "the keyring is at epoch {} but the card's anchor saw epoch {}: an older keyring was put back (storage-key versions retired since would be used again)",
                            mark.keyring_epoch, a.keyring_epoch
                        ));
                    }
                    if mark.audit_seq < a.audit_seq {
                        r.audit = Some(format!(
                            "the log ends at entry {} but the card's anchor saw entry {}: the database was put back to an older copy",
                            mark.audit_seq, a.audit_seq
                        ));
                    }
                }
                Ok(None) => {}
                Err(e) => r.anchor = Some(e.to_string()),
            }
        }
        Ok(r)
    }

    /// Keeps the card's anchor at `path` following this center's database
    /// from now on ([`crate::anchor::Keeper`]: at most a second behind each
    /// committed change, written again when the center is dropped). First
    /// compares the database with it: the finding, when the database is
    /// older (put back to an older copy), is logged as an error, returned
    /// and kept ([`Center::rolled_back`]). Once per center; later calls
    /// return the first one's finding.
    pub fn keep_anchor(&self, path: &Path) -> Result<Option<String>> {
        if let Some(k) = self.anchor.get() {
            return Ok(k.rolled_back().map(str::to_string));
        }
        let k = anchor::Keeper::start(
            self.db.clone(),
            self.card.clone(),
            path.to_path_buf(),
            std::time::Duration::from_secs(1),
        )?;
        let found = k.rolled_back().map(str::to_string);
        let _ = self.anchor.set(k);
        Ok(found)
    }

    /// The database was older than the card's anchor when
    /// [`Center::keep_anchor`] started: the finding.
    pub fn rolled_back(&self) -> Option<String> {
        self.anchor
            .get()
            .and_then(|k| k.rolled_back().map(str::to_string))
    }

    /// Writes the kept anchor now if the database moved (tests; `serve`
    /// relies on the keeper's thread and its last write at drop).
    pub fn flush_anchor(&self) -> Result<()> {
        match self.anchor.get() {
            Some(k) => k.flush(),
            None => Ok(()),
        }
    }

    /// Moves the card's anchor forward to the database's current mark
    /// (never back). Call it only when the database is known good.
    pub fn refresh_anchor(&self, path: &Path, now: u64) -> Result<Anchor> {
        let mark = Anchor::of(&*self.db, &*self.card, now)?;
        anchor::store(path, &*self.card, &mark)
    }

    /// Walks the audit log and compares its end with the card-tagged head:
    /// (entries, the first finding). Finds an edited, deleted, inserted or
    /// reordered entry, and a log cut short.
    pub fn verify_audit(&self) -> Result<(u64, Option<AuditFinding>)> {
        audit::verify(&*self.db, &*self.card)
    }

    /// Writes every audit entry as JSON Lines; returns how many.
    pub fn export_audit(&self, out: &mut dyn std::io::Write) -> Result<u64> {
        audit::export_jsonl(&*self.db, out)
    }

    /// Makes a backup in `dir`, audits it, keeps the newest `keep` backups
    /// (deleting older ones, audited), and moves `anchor` forward.
    pub fn create_backup(
        &self,
        dir: &Path,
        keep: usize,
        anchor: Option<&Path>,
        actor: &str,
        now: u64,
    ) -> Result<BackupSummary> {
        // Audited first, so the backup holds its own entry and a restore
        // of it reaches the anchor refreshed below.
        let rotating = (backup::list(dir)?.len() + 1).saturating_sub(keep.max(1));
        let reason = format!(
            "backup into {}; {rotating} older backup(s) rotated out (keep {keep})",
            dir.display()
        );
        with_tx(&*self.db, |tx| {
            self.audit(tx, now, actor, "backup", (None, None), &reason)
        })?;
        let summary = backup::create(&*self.db, &*self.card, dir, now)?;
        backup::rotate(dir, keep)?;
        if let Some(path) = anchor {
            self.refresh_anchor(path, now)?;
        }
        Ok(summary)
    }
}

/// Automatic backups, debounced: [`AutoBackup::tick`] makes one when the
/// database changed since the last one (its digest moved: a seed enrolled,
/// updated or changed state) and at least `interval` seconds passed.
/// `serve` calls `tick` periodically (every minute is plenty).
#[derive(Debug)]
pub struct AutoBackup {
    dir: PathBuf,
    interval: u64,
    keep: usize,
    anchor: Option<PathBuf>,
    last: Mutex<Option<(u64, Vec<crate::db::DigestShard>)>>,
}

impl AutoBackup {
    /// Backups into `dir`, at most one per `interval` seconds, the newest
    /// `keep` kept; `anchor` moved forward after each.
    pub fn new(dir: PathBuf, interval: u64, keep: usize, anchor: Option<PathBuf>) -> Self {
        AutoBackup {
            dir,
            interval,
            keep,
            anchor,
            last: Mutex::new(None),
        }
    }

    /// Makes a backup when due; returns it, or None when nothing changed
    /// or the interval has not passed.
    pub fn tick(&self, center: &Center, now: u64) -> Result<Option<BackupSummary>> {
        let mut last = self
            .last
            .lock()
            .map_err(|_| Error::db(DbFailure::Internal, "auto-backup state poisoned"))?;
        // Only the record shards (seeds, notary records, commands, device
        // rows): the audit head moves with every backup (its own audit
        // entry), which must not count as a change.
        let digest: Vec<_> = center
            .database()
            .digest_shards()?
            .into_iter()
            .filter(|s| s.shard < integrity::ALL_SHARDS)
            .collect();
        let newest = backup::list(&self.dir)?;
        let due = match &*last {
            Some((t, d)) => *d != digest && now >= t.saturating_add(self.interval),
            // First tick of this process: a backup unless one exists.
            None => newest.is_empty() && !digest.is_empty(),
        };
        if !due {
            if last.is_none() {
                *last = Some((now, digest));
            }
            return Ok(None);
        }
        let s = center.create_backup(
            &self.dir,
            self.keep,
            self.anchor.as_deref(),
            CENTER_ACTOR,
            now,
        )?;
        *last = Some((now, digest));
        Ok(Some(s))
    }
}
