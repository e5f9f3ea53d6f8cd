//! Registration, ENROLL (PROTOCOL.md section 6) and factory batch import.
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

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use microcert_core::{DeviceId, Enroll, KeyState, Suite};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{CENTER_ACTOR, Center, covers, malformed, refusal_for};
use crate::card::EnrollVia;
use crate::db::{Blob, DeviceRow, SeedRow, Tx, with_tx};
use crate::integrity::{self, DigestDelta};
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
struct Line {
    device_id: String,
    class: u8,
    epoch: u8,
    enroll: String,
}

/// What one ENROLL did.
enum Enrolled {
    New(Vec<u8>),
    Again(Vec<u8>),
}

impl Center {
    /// Registers a device (factory provisioning): class profile, suite
    /// (the profile's default when None), epoch; transport enrollment open.
    pub fn register_device(
        &self,
        id: DeviceId,
        class: u8,
        suite: Option<Suite>,
        epoch: u8,
        actor: &str,
        now: u64,
    ) -> Result<DeviceRow> {
        let profile = self.profile(class)?;
        let suite = suite.unwrap_or(profile.default_suite);
        if !profile.suites.contains(&suite) {
            return Err(Error::WrongSuite);
        }
        let row = DeviceRow {
            id,
            class,
            suite,
            epoch,
            transport_open: true,
            created: now,
            highest_generation: None,
            command_counter: 0,
            tag: [0; 32],
        };
        let row = with_tx(&*self.db, |tx| {
            if tx.device(id)?.is_some() {
                return Err(Error::Refused(format!("device {id} is already registered")));
            }
            let mut row = row.clone();
            self.put_device(tx, &mut row, true)?;
            self.audit(
                tx,
                now,
                actor,
                "register",
                (Some(id), None),
                &format!("class {class}, epoch {epoch}"),
            )?;
            Ok(row)
        })?;
        self.cache.invalidate(id);
        Ok(row)
    }

    /// Registers many devices of one class in one transaction and returns
    /// their Ktr(device, epoch), in order: `microcert factory provision`.
    /// Refused as a whole when any of them is already registered.
    pub fn provision(
        &self,
        ids: &[DeviceId],
        class: u8,
        suite: Option<Suite>,
        epoch: u8,
        actor: &str,
        now: u64,
    ) -> Result<Vec<microcert_core::Key128>> {
        let profile = self.profile(class)?;
        let suite = suite.unwrap_or(profile.default_suite);
        if !profile.suites.contains(&suite) {
            return Err(Error::WrongSuite);
        }
        with_tx(&*self.db, |tx| {
            for &id in ids {
                if tx.device(id)?.is_some() {
                    return Err(Error::Refused(format!("device {id} is already registered")));
                }
                self.put_device(
                    tx,
                    &mut DeviceRow {
                        id,
                        class,
                        suite,
                        epoch,
                        transport_open: true,
                        created: now,
                        highest_generation: None,
                        command_counter: 0,
                        tag: [0; 32],
                    },
                    true,
                )?;
                self.audit(
                    tx,
                    now,
                    actor,
                    "provision",
                    (Some(id), None),
                    &format!("class {class}, epoch {epoch}; transport key issued"),
                )?;
            }
            Ok(())
        })?;
        for &id in ids {
            self.cache.invalidate(id);
        }
        ids.iter()
            .map(|&id| self.card.transport_key(id, epoch))
            .collect()
    }

    /// Ktr(device, epoch) for a registered device, for the factory to
    /// write into its chip. Audited: the key is as secret as a seed.
    pub fn factory_transport_key(
        &self,
        id: DeviceId,
        actor: &str,
        now: u64,
    ) -> Result<microcert_core::Key128> {
        let epoch = with_tx(&*self.db, |tx| {
            let d = self.device_in(tx, id)?;
            self.audit(
                tx,
                now,
                actor,
                "transport-key",
                (Some(id), None),
                &format!("epoch {}", d.epoch),
            )?;
            Ok(d.epoch)
        })?;
        self.card.transport_key(id, epoch)
    }

    /// Accepts one ENROLL and returns the RECEIPT (ref = the ENROLL's r,
    /// keyed by the new seed). A byte-identical retransmission of an
    /// accepted ENROLL gets the same RECEIPT again.
    pub fn enroll(&self, bytes: &[u8], now: u64) -> Result<Vec<u8>> {
        let msg = Enroll::decode(bytes).map_err(malformed)?;
        let digest: [u8; 32] = Sha256::digest(bytes).into();
        let id = msg.header.device;
        // Invalidated before and after: a verification that raced with
        // this change re-reads the device after its own commit.
        self.cache.invalidate(id);
        let out = with_tx(&*self.db, |tx| {
            let mut delta = DigestDelta::default();
            let out =
                self.enroll_in_tx(tx, (&msg, &digest), None, &mut delta, now, CENTER_ACTOR)?;
            delta.flush(tx, &*self.card)?;
            Ok(out)
        });
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                tracing::info!(device = %id, kind = e.kind(), "ENROLL refused");
                return Err(e);
            }
        };
        self.cache.invalidate(id);
        match out {
            Enrolled::New(r) => Ok(r),
            Enrolled::Again(r) => Ok(r),
        }
    }

    /// The ENROLL rules. Every refusal is decided before the first write,
    /// so a refused entry of a batch leaves nothing behind in its chunk.
    /// `register` is the device row to create if the device is unknown
    /// (batch import); None refuses an unknown device. `digest` is the
    /// SHA-256 of the ENROLL's bytes.
    fn enroll_in_tx(
        &self,
        tx: &mut dyn Tx,
        (msg, digest): (&Enroll<'_>, &[u8; 32]),
        register: Option<&DeviceRow>,
        delta: &mut DigestDelta,
        now: u64,
        actor: &str,
    ) -> Result<Enrolled> {
        let h = msg.header;
        let id = h.device;
        let (mut dev, is_new) = match (self.device_opt(tx, id)?, register) {
            (Some(d), _) => (d, false),
            (None, Some(r)) => (r.clone(), true),
            (None, None) => return Err(Error::UnknownDevice),
        };
        if h.suite != dev.suite {
            return Err(Error::WrongSuite);
        }
        if !is_new && let Some(prev) = tx.seed_by_enroll_nonce(id, h.t, h.r)? {
            integrity::check_record(&*self.card, &prev)?;
            return if prev.enroll_digest == *digest && prev.generation == h.generation {
                Ok(Enrolled::Again(prev.receipt.0))
            } else {
                Err(Error::Replay)
            };
        }
        let mut seeds = if is_new {
            Vec::new()
        } else {
            self.seeds_checked(tx, id)?
        };
        let expected = match dev.highest_generation {
            None => Some(0),
            Some(g) => g.checked_add(1),
        };
        if Some(h.generation) != expected {
            return Err(Error::WrongGeneration);
        }
        // Kupd only while the current seed is Active and covers today.
        let current = seeds.last();
        let update_seed = match current {
            Some(c) if c.state == KeyState::Active && covers(c.base_year, now) => {
                Some(self.unseal(c)?)
            }
            _ => None,
        };
        let transport_epoch = dev.transport_open.then_some(dev.epoch);
        if update_seed.is_none() && transport_epoch.is_none() {
            return Err(match current {
                Some(c) if c.state == KeyState::Active => Error::Expired,
                Some(c) => refusal_for(c.state),
                None => Error::NotActive,
            });
        }
        let (seed, via) = self
            .card
            .open_enroll(msg, update_seed.as_ref(), transport_epoch)?;
        drop(update_seed);
        if !covers(seed.base_year(), now) {
            return Err(Error::Expired);
        }
        // Accepted: from here on, only writes.
        let sealed = self.card.seal_seed(id, h.generation, &seed)?;
        let receipt = self.receipt(&seed, dev.suite, id, h.generation, h.r, now)?;
        let base_year = seed.base_year();
        drop(seed);
        let mut row = SeedRow {
            device: id,
            generation: h.generation,
            state: KeyState::PreActivation,
            base_year,
            suite: dev.suite,
            kstore_version: sealed.kstore_version,
            ciphertext: Some(Blob(sealed.ciphertext)),
            tag: [0; 32],
            via,
            enroll_t: h.t,
            enroll_r: h.r,
            enroll_digest: *digest,
            receipt: Blob(receipt.clone()),
            created: now,
            activated_at: None,
            suspended_at: None,
            deactivated_at: None,
            compromised_at: None,
            destroyed_at: None,
            grace_until: None,
        };
        integrity::retag(&*self.card, &mut row)?;
        dev.highest_generation = Some(h.generation);
        match via {
            EnrollVia::Update => {
                // The old seed keeps verifying for the grace period, or
                // until the new one is first used.
                if let Some(prev) = seeds.last_mut() {
                    prev.grace_until = Some(now.saturating_add(self.config.grace_period));
                    tx.update_seed(prev)?;
                }
                if let Some(mut cmd) = tx.command(id)?
                    && cmd.answered_at.is_none()
                    && cmd.opcode == microcert_core::Opcode::UPDATE_SEED.get()
                {
                    cmd.answered_at = Some(now);
                    cmd.status = Some(0);
                    tx.put_command(&cmd)?;
                }
            }
            EnrollVia::Transport => {
                dev.transport_open = false;
                // A re-enrollment under Ktr replaces an expired seed.
                for s in seeds.iter_mut().filter(|s| s.state == KeyState::Active) {
                    self.apply_event(
                        tx,
                        s,
                        microcert_core::Event::Deactivate,
                        now,
                        actor,
                        "replaced by transport re-enrollment",
                    )?;
                }
            }
        }
        // One audit entry per enrollment; a device registered by this
        // batch entry says so in it.
        let reason = if is_new {
            self.put_device(tx, &mut dev, true)?;
            format!(
                "via {}; registered class {} epoch {} by batch",
                via.name(),
                dev.class,
                dev.epoch
            )
        } else {
            self.put_device(tx, &mut dev, false)?;
            format!("via {}", via.name())
        };
        tx.insert_seed(&row)?;
        delta.add(id, None, &row.tag);
        self.audit(
            tx,
            now,
            actor,
            "enroll",
            (Some(id), Some(h.generation)),
            &reason,
        )?;
        tracing::info!(device = %id, generation = h.generation, via = via.name(), "seed enrolled");
        Ok(Enrolled::New(receipt))
    }

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
                        Err(e) if e.is_refusal() && !matches!(e, Error::Integrity(_)) => rejected
                            .push(ImportReject {
                                line: *n,
                                kind: e.kind(),
                                message: e.to_string(),
                            }),
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
        let line: Line =
            serde_json::from_str(text).map_err(|e| Error::Malformed(format!("JSON: {e}")))?;
        let mut id = [0u8; 8];
        hex::decode_to_slice(&line.device_id, &mut id)
            .map_err(|_| Error::Malformed("device_id is not 16 hex digits".into()))?;
        let id = DeviceId(id);
        let bytes =
            hex::decode(&line.enroll).map_err(|_| Error::Malformed("enroll is not hex".into()))?;
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
