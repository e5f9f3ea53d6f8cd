//! Factory batch import.
//!
//! # Batch file format
//!
//! JSON Lines, one chip per line, as a manufacturer returns them after
//! personalization (each chip made its first seed and the ENROLL under its
//! Ktr(device, epoch)):
//!
//! ```text
//! {"device_id": "<16 hex>", "class": 1, "epoch": 0, "enroll": "<hex of the ENROLL bytes>"}
//! ```
//!
//! Blank lines are skipped; unknown fields are ignored. Line numbers count
//! from 1 and are what a rejected entry is reported with. The device is
//! registered from the line (class, epoch; its suite is the ENROLL's, which
//! the class profile must allow) unless it already is, in which case class
//! and epoch must match. An entry is accepted exactly as a single ENROLL
//! under Ktr would be: generation 0 (or the next generation after an
//! operator reopened transport enrollment), seed covering the current year.
//!
//! Import runs in chunks of `CenterConfig::import_chunk` lines, one
//! transaction each; the chunk's last line is recorded with it (keyed by the
//! file's SHA-256), so a killed import resumes after the last committed
//! chunk and never leaves part of an entry. Running a file again is
//! idempotent: entries already enrolled by the same ENROLL bytes are
//! counted as `already`, and nothing changes.

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use microcert_core::{DeviceId, Enroll};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::enroll::Enrolled;
use super::{Center, malformed};
use crate::db::{DeviceRow, Tx, with_tx};
use crate::integrity::DigestDelta;
use crate::{Error, Result};

/// One rejected line of a batch file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReject {
    /// Line number, from 1.
    pub line: u64,
    /// The refusal kind ([`Error::kind`]).
    pub kind: &'static str,
    /// What was wrong.
    pub message: String,
}

/// Where an import is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportProgress {
    /// Lines committed so far (including skipped and rejected ones).
    pub lines_done: u64,
    /// Lines in the file.
    pub lines_total: u64,
    /// Seeds enrolled so far by this run.
    pub enrolled: u64,
}

/// The result of an import.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Lines in the file.
    pub lines: u64,
    /// Lines skipped because an earlier run had committed them.
    pub resumed_after: u64,
    /// Seeds enrolled by this run.
    pub enrolled: u64,
    /// Entries found already enrolled with the same ENROLL.
    pub already: u64,
    /// Rejected entries, in line order; nothing of them was stored.
    pub rejected: Vec<ImportReject>,
}

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    device_id: Cow<'a, str>,
    class: u8,
    epoch: u8,
    // Borrowed from the line unless it has escapes: the ENROLL's 2 KB of
    // hex are not copied.
    #[serde(borrow)]
    enroll: Cow<'a, str>,
}

impl Center {
    /// Imports a factory batch file in chunked transactions; resumable
    /// after a crash and idempotent. `progress` is called after each
    /// committed chunk.
    ///
    /// The file is JSON Lines, one chip per line, as a manufacturer returns
    /// them after personalization (each chip made its first seed and the
    /// ENROLL under its Ktr(device, epoch)):
    ///
    /// ```text
    /// {"device_id": "<16 hex>", "class": 1, "epoch": 0, "enroll": "<hex of the ENROLL bytes>"}
    /// ```
    ///
    /// Blank lines are skipped; unknown fields are ignored; line numbers
    /// count from 1. An unknown device is registered from its line (class,
    /// epoch, and the ENROLL's suite, which the class profile must allow); a
    /// registered one must match class and epoch. Each entry is then
    /// accepted exactly as a single [`Center::enroll`] would accept it. A
    /// rejected entry is reported in [`ImportReport::rejected`] with its line
    /// and refusal kind, and nothing of it is stored; the rest of the file
    /// goes on. Each chunk of `CenterConfig::import_chunk` lines is one
    /// transaction that also records the chunk's last line under the file's
    /// SHA-256, so a killed import resumes after the last committed chunk
    /// ([`ImportReport::resumed_after`]). Entries already enrolled by the
    /// same ENROLL bytes count as [`ImportReport::already`].
    pub fn import_batch(
        &self,
        path: &Path,
        actor: &str,
        now: u64,
        progress: &mut dyn FnMut(&ImportProgress),
    ) -> Result<ImportReport> {
        let mut hasher = Sha256::new();
        let mut lines_total = 0u64;
        {
            let mut f = std::fs::File::open(path)?;
            let mut buf = vec![0u8; 1 << 16];
            let mut last = b'\n';
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                lines_total += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
                last = buf[n - 1];
            }
            if last != b'\n' {
                lines_total += 1; // a last line without its newline
            }
        }
        let file_id: [u8; 32] = hasher.finalize().into();
        let done = with_tx(&*self.db, |tx| tx.import_progress(&file_id))?.unwrap_or(0);
        let mut report = ImportReport {
            lines: lines_total,
            resumed_after: done,
            ..ImportReport::default()
        };
        let mut reader = BufReader::new(std::fs::File::open(path)?);
        // Lines as bytes: a line that is not UTF-8 is a rejected entry,
        // not the end of the import.
        let mut next_line = move || -> Result<Option<Vec<u8>>> {
            let mut l = Vec::new();
            if reader.read_until(b'\n', &mut l)? == 0 {
                return Ok(None);
            }
            if l.last() == Some(&b'\n') {
                l.pop();
            }
            Ok(Some(l))
        };
        let mut line_no = 0u64;
        while line_no < done {
            if next_line()?.is_none() {
                break;
            }
            line_no += 1;
        }
        let chunk = self.config.import_chunk.max(1);
        self.cache.clear();
        if let Some(db) = &self.sqlite {
            db.set_bulk(true)?;
        }
        let mut chunks = || -> Result<()> {
            loop {
                let mut batch = Vec::with_capacity(chunk);
                for _ in 0..chunk {
                    match next_line()? {
                        Some(l) => {
                            line_no += 1;
                            batch.push((line_no, l));
                        }
                        None => break,
                    }
                }
                if batch.is_empty() {
                    break;
                }
                let last = line_no;
                let (enrolled, already, rejected) = with_tx(&*self.db, |tx| {
                    let mut enrolled = 0u64;
                    let mut already = 0u64;
                    let mut rejected = Vec::new();
                    let mut delta = DigestDelta::default();
                    for (n, text) in &batch {
                        match self.import_line(tx, &mut delta, text, now, actor) {
                            Ok(None) => {}
                            Ok(Some(true)) => enrolled += 1,
                            Ok(Some(false)) => already += 1,
                            // A refusal is decided before the entry's first
                            // write; an integrity failure may come after it
                            // (the digest shard), so it aborts the chunk.
                            Err(e) if e.is_refusal() && !matches!(e, Error::Integrity(_)) => {
                                rejected.push(ImportReject {
                                    line: *n,
                                    kind: e.kind(),
                                    message: e.to_string(),
                                })
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    delta.flush(tx, &*self.card)?;
                    tx.set_import_progress(&file_id, last, now)?;
                    Ok((enrolled, already, rejected))
                })?;
                for r in &rejected {
                    tracing::warn!(line = r.line, kind = r.kind, "batch entry rejected");
                }
                report.enrolled += enrolled;
                report.already += already;
                report.rejected.extend(rejected);
                progress(&ImportProgress {
                    lines_done: last,
                    lines_total,
                    enrolled: report.enrolled,
                });
            }
            Ok(())
        };
        let r = chunks();
        if let Some(db) = &self.sqlite {
            db.set_bulk(false)?;
        }
        r?;
        with_tx(&*self.db, |tx| {
            self.audit(
                tx,
                now,
                actor,
                "import",
                (None, None),
                &format!(
                    "{}: {} lines, {} enrolled, {} already, {} rejected",
                    path.display(),
                    report.lines,
                    report.enrolled,
                    report.already,
                    report.rejected.len()
                ),
            )
        })?;
        self.cache.clear();
        Ok(report)
    }

    /// One line: Ok(None) for a blank line, Ok(Some(true)) enrolled,
    /// Ok(Some(false)) already enrolled; a refusal stores nothing.
    fn import_line(
        &self,
        tx: &mut dyn Tx,
        delta: &mut DigestDelta,
        text: &[u8],
        now: u64,
        actor: &str,
    ) -> Result<Option<bool>> {
        let text =
            std::str::from_utf8(text).map_err(|_| Error::Malformed("line is not UTF-8".into()))?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        let line: Line<'_> =
            serde_json::from_str(text).map_err(|e| Error::Malformed(format!("JSON: {e}")))?;
        let mut id = [0u8; 8];
        hex::decode_to_slice(line.device_id.as_bytes(), &mut id)
            .map_err(|_| Error::Malformed("device_id is not 16 hex digits".into()))?;
        let id = DeviceId(id);
        // decode_to_slice is a plain loop; hex::decode collects through an
        // iterator and was a tenth of the import's time.
        let hex_text = line.enroll.as_bytes();
        if !hex_text.len().is_multiple_of(2) {
            return Err(Error::Malformed("enroll is not hex".into()));
        }
        let mut bytes = vec![0u8; hex_text.len() / 2];
        hex::decode_to_slice(hex_text, &mut bytes)
            .map_err(|_| Error::Malformed("enroll is not hex".into()))?;
        let msg = Enroll::decode(&bytes).map_err(malformed)?;
        if msg.header.device != id {
            return Err(Error::Malformed(
                "ENROLL is for another device than device_id".into(),
            ));
        }
        let profile = self.profile(line.class)?;
        if !profile.suites.contains(&msg.header.suite) {
            return Err(Error::WrongSuite);
        }
        if let Some(d) = self.device_opt(tx, id)?
            && (d.class != line.class || d.epoch != line.epoch)
        {
            return Err(Error::Refused(format!(
                "device {id} is registered with class {} epoch {}",
                d.class, d.epoch
            )));
        }
        let register = DeviceRow {
            id,
            class: line.class,
            suite: msg.header.suite,
            epoch: line.epoch,
            transport_open: true,
            created: now,
            highest_generation: None,
            command_counter: 0,
            tag: [0; 32],
        };
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        match self.enroll_in_tx(tx, (&msg, &digest), Some(&register), delta, now, actor)? {
            Enrolled::New(_) => Ok(Some(true)),
            Enrolled::Again(_) => Ok(Some(false)),
        }
    }
}
