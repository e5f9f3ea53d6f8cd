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

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use microcert_core::{DeviceId, Enroll};
use sha2::{Digest, Sha256};

use super::enroll::{Enrolled, PreparedEnroll};
use super::{Center, malformed};
use crate::db::{DeviceRow, NewAudit, Tx, with_tx};
use crate::integrity::DigestDelta;
use crate::lines::ImportLine;
use crate::{Error, Result};

/// The longest line accepted, in bytes without its newline (a line holds
/// about 2 KB of hex). A longer line is a rejected entry: it is read
/// through without being kept.
pub const IMPORT_LINE_MAX: usize = 64 * 1024;
/// Bytes of lines held for one chunk: a chunk ends at
/// `CenterConfig::import_chunk` lines or at this many bytes, whichever
/// comes first, so the lines in flight are bounded in count and size.
const CHUNK_BYTES_MAX: usize = 8 << 20;
/// Rejected entries kept in [`ImportReport::rejected`]; all are counted in
/// [`ImportReport::refused`] and passed to the progress callback.
pub const REJECTS_KEPT: usize = 10_000;

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

/// Where an import is: passed to the progress callback after each
/// committed chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportProgress {
    /// Lines committed so far (including skipped and rejected ones).
    pub lines_done: u64,
    /// Lines in the batch (0 when a stream did not declare them).
    pub lines_total: u64,
    /// Seeds enrolled so far by this run.
    pub enrolled: u64,
    /// Entries found already enrolled so far by this run.
    pub already: u64,
    /// The rejected entries of the chunk just committed.
    pub rejected: Vec<ImportReject>,
}

/// The result of an import.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Lines in the batch.
    pub lines: u64,
    /// Lines skipped because an earlier run had committed them.
    pub resumed_after: u64,
    /// Seeds enrolled by this run.
    pub enrolled: u64,
    /// Entries found already enrolled with the same ENROLL.
    pub already: u64,
    /// Rejected entries, in line order (the first [`REJECTS_KEPT`]);
    /// nothing of them was stored.
    pub rejected: Vec<ImportReject>,
    /// Every rejected entry, counted by refusal kind.
    pub refused: BTreeMap<&'static str, u64>,
}

impl ImportReport {
    /// How many entries were rejected (all of them, kept or not).
    pub fn rejected_total(&self) -> u64 {
        self.refused.values().sum()
    }
}

/// A batch read as a stream (`/v1/import`).
#[derive(Debug, Clone, Copy)]
pub struct ImportSource<'a> {
    /// The SHA-256 of the whole batch, as the client declares it: the key
    /// its progress is recorded under, so that sending the same batch
    /// again resumes after its last committed chunk. It is checked against
    /// the bytes read: when they differ the import fails and the batch's
    /// recorded progress is reset (nothing is skipped on the next run).
    /// None: not resumable (no progress is recorded).
    pub sha256: Option<[u8; 32]>,
    /// Lines in the batch, for progress reports (0: unknown).
    pub lines: u64,
    /// What to call the batch in the audit log.
    pub name: &'a str,
}

/// Reads lines of at most `max` bytes, hashing every byte read.
struct Lines<'r> {
    inner: &'r mut dyn BufRead,
    hasher: Sha256,
    max: usize,
}

enum NextLine {
    Line(Vec<u8>),
    TooLong(u64),
}

impl Lines<'_> {
    fn next(&mut self) -> Result<Option<NextLine>> {
        let mut line = Vec::new();
        let mut len = 0u64;
        let mut any = false;
        let mut too_long = false;
        loop {
            let buf = self.inner.fill_buf()?;
            if buf.is_empty() {
                break;
            }
            any = true;
            let (take, end) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            self.hasher.update(&buf[..take]);
            let content = if end { &buf[..take - 1] } else { &buf[..take] };
            len += content.len() as u64;
            if !too_long {
                if line.len() + content.len() > self.max {
                    too_long = true;
                    line = Vec::new();
                } else {
                    line.extend_from_slice(content);
                }
            }
            self.inner.consume(take);
            if end {
                break;
            }
        }
        Ok(match (any, too_long) {
            (false, _) => None,
            (true, true) => Some(NextLine::TooLong(len)),
            (true, false) => Some(NextLine::Line(line)),
        })
    }
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
        let name = path.display().to_string();
        let source = ImportSource {
            sha256: Some(hasher.finalize().into()),
            lines: lines_total,
            name: &name,
        };
        let mut reader = BufReader::with_capacity(1 << 16, std::fs::File::open(path)?);
        self.import_stream(&mut reader, &source, actor, now, progress)
    }

    /// Imports a factory batch read as a stream, of any size: the lines
    /// are read one by one (each at most [`IMPORT_LINE_MAX`] bytes) and a
    /// chunk at a time is held, so memory does not grow with the batch.
    /// Otherwise as [`Center::import_batch`], resumable when the source
    /// declares its SHA-256 (see [`ImportSource::sha256`]).
    pub fn import_stream(
        &self,
        input: &mut dyn BufRead,
        source: &ImportSource<'_>,
        actor: &str,
        now: u64,
        progress: &mut dyn FnMut(&ImportProgress),
    ) -> Result<ImportReport> {
        let done = match &source.sha256 {
            Some(id) => with_tx(&*self.db, |tx| tx.import_progress(id))?.unwrap_or(0),
            None => 0,
        };
        let mut lines = Lines {
            inner: input,
            hasher: Sha256::new(),
            max: IMPORT_LINE_MAX,
        };
        let mut report = ImportReport {
            resumed_after: done,
            ..ImportReport::default()
        };
        let mut line_no = 0u64;
        while line_no < done {
            if lines.next()?.is_none() {
                break;
            }
            line_no += 1;
        }
        let chunk = self.config.import_chunk.max(1);
        self.cache.clear();
        self.db.set_bulk(true)?;
        // A pipeline of two chunks: while the database writes chunk N (this
        // thread), workers parse chunk N+1 and do its card work (open the
        // ENROLLs, seal the seeds, make the RECEIPTs and tags). Memory
        // holds at most two chunks.
        let mut chunks = || -> Result<()> {
            let mut ready: Option<ReadyChunk> = None;
            loop {
                let mut batch = Vec::with_capacity(chunk.min(4096));
                let mut bytes = 0usize;
                while batch.len() < chunk && bytes < CHUNK_BYTES_MAX {
                    match lines.next()? {
                        Some(l) => {
                            line_no += 1;
                            if let NextLine::Line(text) = &l {
                                bytes += text.len();
                            }
                            batch.push((line_no, l));
                        }
                        None => break,
                    }
                }
                let last = line_no;
                let (prepped, written) = std::thread::scope(|s| {
                    let worker =
                        (!batch.is_empty()).then(|| s.spawn(|| self.prepare_chunk(&batch, now)));
                    let written = ready.take().map(|(b, p, l)| {
                        self.write_chunk(&b, &p, source, l, now, actor)
                            .map(|w| (w, l))
                    });
                    let prepped = worker.map(|w| match w.join() {
                        Ok(p) => p,
                        Err(panic) => std::panic::resume_unwind(panic),
                    });
                    (prepped, written)
                });
                if let Some(written) = written {
                    let ((enrolled, already, rejected), done_to) = written?;
                    for r in &rejected {
                        tracing::warn!(line = r.line, kind = r.kind, "batch entry rejected");
                        *report.refused.entry(r.kind).or_insert(0) += 1;
                    }
                    report.enrolled += enrolled;
                    report.already += already;
                    let room = REJECTS_KEPT.saturating_sub(report.rejected.len());
                    report.rejected.extend(rejected.iter().take(room).cloned());
                    progress(&ImportProgress {
                        lines_done: done_to,
                        lines_total: source.lines.max(done_to),
                        enrolled: report.enrolled,
                        already: report.already,
                        rejected,
                    });
                }
                match prepped {
                    Some(p) => ready = Some((batch, p, last)),
                    None => break,
                }
            }
            Ok(())
        };
        let r = chunks();
        let off = self.db.set_bulk(false);
        r?;
        off?;
        report.lines = line_no;
        let digest: [u8; 32] = lines.hasher.finalize().into();
        if let Some(id) = &source.sha256
            && *id != digest
        {
            // The progress recorded under this digest is not this batch's:
            // forget it, so that the next run skips nothing.
            with_tx(&*self.db, |tx| tx.set_import_progress(id, 0, now))?;
            return Err(Error::Malformed(format!(
                "{}: the batch's SHA-256 is {}, not the declared {}; its recorded \
                 progress was reset (send it again)",
                source.name,
                hex::encode(digest),
                hex::encode(id)
            )));
        }
        with_tx(&*self.db, |tx| {
            self.audit(
                tx,
                now,
                actor,
                "import",
                (None, None),
                &format!(
                    "{}: {} lines, {} enrolled, {} already, {} rejected",
                    source.name,
                    report.lines,
                    report.enrolled,
                    report.already,
                    report.rejected_total()
                ),
            )
        })?;
        self.cache.clear();
        Ok(report)
    }

    /// The checks of a line that need no database: JSON, hex, the
    /// ENROLL's form, its device, the class profile and suite. Ok(None)
    /// for a blank line.
    fn parse_line(&self, text: &[u8]) -> Result<Option<ParsedLine>> {
        let text =
            std::str::from_utf8(text).map_err(|_| Error::Malformed("line is not UTF-8".into()))?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        let line: ImportLine<'_> =
            serde_json::from_str(text).map_err(|e| Error::Malformed(format!("JSON: {e}")))?;
        let mut id = [0u8; 8];
        hex::decode_to_slice(line.device_id.as_bytes(), &mut id)
            .map_err(|_| Error::Malformed("device_id is not 16 hex digits".into()))?;
        let id = DeviceId(id);
        // 2 KB of hex a line: a table decoder (hex::decode_to_slice was a
        // sixth of the import's time).
        let bytes = decode_hex(line.enroll.as_bytes())
            .ok_or_else(|| Error::Malformed("enroll is not hex".into()))?;
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
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        Ok(Some(ParsedLine {
            id,
            class: line.class,
            epoch: line.epoch,
            bytes,
            digest,
        }))
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
        let Some(p) = self.parse_line(text)? else {
            return Ok(None);
        };
        let msg = Enroll::decode(&p.bytes).map_err(malformed)?;
        if let Some(d) = self.device_opt(tx, p.id)?
            && (d.class != p.class || d.epoch != p.epoch)
        {
            return Err(Error::RegisteredDifferently {
                device: p.id,
                class: d.class,
                epoch: d.epoch,
            });
        }
        let register = p.register(msg.header.suite, now);
        match self.enroll_in_tx(tx, (&msg, &p.digest), Some(&register), delta, now, actor)? {
            Enrolled::New(_) => Ok(Some(true)),
            Enrolled::Again(_) => Ok(Some(false)),
        }
    }

    /// The first stage of a chunk, outside any transaction and on several
    /// threads: each line parsed and checked, and for a device expected
    /// to be new, its ENROLL opened, sealed and tagged
    /// ([`Center::prepare_new_enroll`]).
    fn prepare_chunk(&self, batch: &[(u64, NextLine)], now: u64) -> Vec<Prep> {
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8);
        let per = batch.len().div_ceil(workers).max(64);
        if batch.len() <= per {
            return batch
                .iter()
                .map(|(n, l)| self.prepare_line(*n, l, now))
                .collect();
        }
        std::thread::scope(|s| {
            let parts: Vec<_> = batch
                .chunks(per)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|(n, l)| self.prepare_line(*n, l, now))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|h| match h.join() {
                    Ok(v) => v,
                    Err(panic) => std::panic::resume_unwind(panic),
                })
                .collect()
        })
    }

    fn prepare_line(&self, line: u64, l: &NextLine, now: u64) -> Prep {
        let reject = |e: Error| {
            if e.is_refusal() && !matches!(e, Error::Integrity(_)) {
                Some(ImportReject {
                    line,
                    kind: e.kind(),
                    message: e.to_string(),
                })
            } else {
                None
            }
        };
        let text = match l {
            NextLine::Line(text) => text,
            NextLine::TooLong(_) => return Prep::Slow,
        };
        let p = match self.parse_line(text) {
            Ok(Some(p)) => p,
            Ok(None) => return Prep::Blank,
            Err(e) => return reject(e).map_or(Prep::Slow, Prep::Reject),
        };
        let Ok(msg) = Enroll::decode(&p.bytes) else {
            return Prep::Slow;
        };
        let register = p.register(msg.header.suite, now);
        let fast = match self.prepare_new_enroll((&msg, &p.digest), &register, now) {
            Ok(ready) if ready.device() == p.id => Fast::Ready(Box::new(ready)),
            Ok(_) => Fast::Slow,
            Err(e) => reject(e).map_or(Fast::Slow, Fast::Refused),
        };
        Prep::New { id: p.id, fast }
    }

    /// The second stage of a chunk: one transaction. A line whose device
    /// is absent in it is written from its prepared form; any other line
    /// (device registered, or a line the first stage left undecided) goes
    /// through the full path, [`Center::import_line`], as a single ENROLL
    /// would. The chunk's audit entries are appended together, in line
    /// order, and its digest changes applied once.
    #[allow(clippy::too_many_arguments)]
    fn write_chunk(
        &self,
        batch: &[(u64, NextLine)],
        preps: &[Prep],
        source: &ImportSource<'_>,
        last: u64,
        now: u64,
        actor: &str,
    ) -> Result<(u64, u64, Vec<ImportReject>)> {
        let ids: Vec<DeviceId> = preps
            .iter()
            .filter_map(|p| match p {
                Prep::New { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        with_tx(&*self.db, |tx| {
            tx.prefetch_devices(&ids)?;
            let mut enrolled = 0u64;
            let mut already = 0u64;
            let mut rejected = Vec::new();
            let mut delta = DigestDelta::default();
            let mut audits: Vec<NewAudit> = Vec::new();
            for ((n, l), p) in batch.iter().zip(preps) {
                let fast = match p {
                    Prep::Blank => continue,
                    Prep::Reject(r) => {
                        rejected.push(r.clone());
                        continue;
                    }
                    Prep::Slow => None,
                    Prep::New { id, fast } => match self.device_opt(tx, *id) {
                        Ok(None) => Some(fast),
                        // Registered (or its row fails its tag, which the
                        // full path reports): decided in the transaction.
                        Ok(Some(_)) | Err(_) => None,
                    },
                };
                let r = match fast {
                    Some(Fast::Ready(ready)) => self
                        .store_prepared_enroll(tx, ready, &mut delta, now, actor)
                        .map(|a| {
                            audits.push(a);
                            Some(true)
                        }),
                    Some(Fast::Refused(r)) => {
                        rejected.push(r.clone());
                        continue;
                    }
                    Some(Fast::Slow) | None => {
                        // Keep the audit log in line order.
                        crate::audit::append_many(tx, &*self.card, &audits)?;
                        audits.clear();
                        match l {
                            NextLine::Line(text) => {
                                self.import_line(tx, &mut delta, text, now, actor)
                            }
                            NextLine::TooLong(len) => Err(Error::Malformed(format!(
                                "line of {len} bytes, longer than {IMPORT_LINE_MAX}"
                            ))),
                        }
                    }
                };
                match r {
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
            crate::audit::append_many(tx, &*self.card, &audits)?;
            delta.flush(tx, &*self.card)?;
            if let Some(id) = &source.sha256 {
                tx.set_import_progress(id, last, now)?;
            }
            Ok((enrolled, already, rejected))
        })
    }
}

/// The value of each byte as a hex digit, 0xff for a byte that is not one.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Decodes hex (either case); None when the length is odd or a byte is
/// not a hex digit.
fn decode_hex(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 2);
    let mut bad = 0u8;
    for pair in text.chunks_exact(2) {
        let hi = HEX_VALUE[pair[0] as usize];
        let lo = HEX_VALUE[pair[1] as usize];
        // 0xff has its high nibble set; a valid digit never does.
        bad |= hi | lo;
        out.push((hi << 4) | (lo & 0x0f));
    }
    (bad & 0xf0 == 0).then_some(out)
}

/// A line that passed the checks needing no database ([`Center::parse_line`]).
struct ParsedLine {
    id: DeviceId,
    class: u8,
    epoch: u8,
    /// The ENROLL's bytes.
    bytes: Vec<u8>,
    /// Their SHA-256.
    digest: [u8; 32],
}

impl ParsedLine {
    /// The device row the line registers when its device is unknown.
    fn register(&self, suite: microcert_core::Suite, now: u64) -> DeviceRow {
        DeviceRow {
            id: self.id,
            class: self.class,
            suite,
            epoch: self.epoch,
            transport_open: true,
            created: now,
            highest_generation: None,
            command_counter: 0,
            tag: [0; 32],
        }
    }
}

/// A chunk's lines, their first stage and its last line number.
type ReadyChunk = (Vec<(u64, NextLine)>, Vec<Prep>, u64);

/// A line after the first stage of its chunk ([`Center::prepare_chunk`]).
enum Prep {
    /// Blank: skipped.
    Blank,
    /// Refused by a check that needs no database.
    Reject(ImportReject),
    /// Left to the transaction's full path ([`Center::import_line`]).
    Slow,
    /// A well-formed entry, with what its device needs if it is new.
    New { id: DeviceId, fast: Fast },
}

/// An entry's outcome should its device be absent.
enum Fast {
    /// Opened, sealed and tagged: written as is.
    Ready(Box<PreparedEnroll>),
    /// Refused (as a single ENROLL of a new device would be).
    Refused(ImportReject),
    /// Undecided (an error that is not a refusal): the full path decides.
    Slow,
}

#[cfg(test)]
mod hex_tests {
    #[test]
    fn decode_hex_agrees_with_the_hex_crate() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        let lower = hex::encode(&bytes);
        assert_eq!(super::decode_hex(lower.as_bytes()), Some(bytes.clone()));
        let upper = hex::encode_upper(&bytes);
        assert_eq!(super::decode_hex(upper.as_bytes()), Some(bytes));
        for bad in ["0", "0g", "g0", "0x", " 0", "zz", "\u{e9}0"] {
            assert_eq!(super::decode_hex(bad.as_bytes()), None, "{bad}");
        }
        for b in 0..=255u8 {
            let text = [b'0', b];
            let ok = b.is_ascii_hexdigit();
            assert_eq!(super::decode_hex(&text).is_some(), ok, "{b}");
        }
    }
}
