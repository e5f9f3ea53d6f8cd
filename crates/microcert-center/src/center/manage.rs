//! Life cycle, seed updates, revocation, the command outbox, node receipts,
//! housekeeping and operator queries.

use microcert_core::{
    DeviceId, Event, Header, KeyState, Opcode, Receipt, Sender, make_command, verify_receipt,
};

use super::{CENTER_ACTOR, Center, malformed, now32, year_of};
use crate::card::random_u64;
use crate::db::{
    AuditRecord, Blob, CommandRow, DeviceQuery, DeviceRow, DeviceView, SeedRow, Tx, with_read_tx,
    with_tx,
};
use crate::integrity::{self, IntegrityReport};
use crate::policy;
use crate::{Error, Result, audit};

/// What [`Center::housekeeping`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HousekeepingReport {
    /// Replay records and used challenges deleted.
    pub pruned: u64,
    /// Seeds deactivated (grace period over, or expired).
    pub deactivated: u64,
}

impl Center {
    /// Applies an operator's life-cycle event to a device's seed
    /// (`generation` None = the current one) and returns the new state.
    /// `Event::Revoke` is [`Center::revoke`]; an illegal transition is
    /// [`Error::IllegalTransition`].
    pub fn lifecycle(
        &self,
        id: DeviceId,
        generation: Option<u8>,
        event: Event,
        actor: &str,
        reason: &str,
        now: u64,
    ) -> Result<KeyState> {
        if event == Event::Revoke {
            self.revoke(id, actor, reason, now)?;
            return Ok(KeyState::Compromised);
        }
        // Invalidated before and after: a verification that raced with
        // this change re-reads the device after its own commit.
        self.cache.invalidate(id);
        let state = with_tx(&*self.db, |tx| {
            let mut dev = self.device_in(tx, id)?;
            let mut seeds = self.seeds_checked(tx, id)?;
            let input = policy::Input::Operator { generation, event };
            self.decide_and_apply(tx, &mut dev, &mut seeds, input, now, (actor, reason))?;
            // The policy found the generation, or refused.
            let g = generation.or(dev.highest_generation);
            Ok(seeds
                .iter()
                .find(|s| Some(s.generation) == g)
                .map_or(KeyState::Destroyed, |s| s.state))
        })?;
        self.cache.invalidate(id);
        if event == Event::Destroy {
            self.db.flush_erased()?;
        }
        Ok(state)
    }

    /// Operator activation of a PreActivation seed.
    pub fn activate(&self, id: DeviceId, actor: &str, reason: &str, now: u64) -> Result<KeyState> {
        self.lifecycle(id, None, Event::Activate, actor, reason, now)
    }

    /// Suspends the current seed.
    pub fn suspend(&self, id: DeviceId, actor: &str, reason: &str, now: u64) -> Result<KeyState> {
        self.lifecycle(id, None, Event::Suspend, actor, reason, now)
    }

    /// Resumes a suspended current seed.
    pub fn resume(&self, id: DeviceId, actor: &str, reason: &str, now: u64) -> Result<KeyState> {
        self.lifecycle(id, None, Event::Resume, actor, reason, now)
    }

    /// Deactivates the current seed.
    pub fn deactivate(
        &self,
        id: DeviceId,
        actor: &str,
        reason: &str,
        now: u64,
    ) -> Result<KeyState> {
        self.lifecycle(id, None, Event::Deactivate, actor, reason, now)
    }

    /// Destroys a Deactivated or Compromised seed: its ciphertext is
    /// overwritten and erased, its attributes stay.
    pub fn destroy(
        &self,
        id: DeviceId,
        generation: u8,
        actor: &str,
        reason: &str,
        now: u64,
    ) -> Result<KeyState> {
        self.lifecycle(id, Some(generation), Event::Destroy, actor, reason, now)
    }

    /// Revokes a device: every seed not yet Compromised or Destroyed
    /// becomes Compromised (refused at once), transport enrollment closes,
    /// and a REVOKE command replaces any pending command.
    pub fn revoke(&self, id: DeviceId, actor: &str, reason: &str, now: u64) -> Result<()> {
        // Invalidated before and after: a verification that raced with
        // this change re-reads the device after its own commit.
        self.cache.invalidate(id);
        with_tx(&*self.db, |tx| {
            let mut dev = self.device_in(tx, id)?;
            let mut seeds = self.seeds_checked(tx, id)?;
            let input = policy::Input::Revoke;
            self.decide_and_apply(tx, &mut dev, &mut seeds, input, now, (actor, reason))?;
            Ok(())
        })?;
        self.cache.invalidate(id);
        tracing::warn!(device = %id, actor, "device revoked");
        Ok(())
    }

    /// Builds a COMMAND under `seed`: counter = max(previous + 1, now).
    pub(super) fn build_command(
        &self,
        dev: &mut DeviceRow,
        seed_row: &SeedRow,
        opcode: Opcode,
        now: u64,
    ) -> Result<CommandRow> {
        let counter = dev.command_counter.saturating_add(1).max(now32(now)?);
        dev.command_counter = counter;
        let header = Header {
            suite: dev.suite,
            device: dev.id,
            generation: seed_row.generation,
            t: now32(now)?,
            r: random_u64(&*self.card)?,
        };
        let seed = self.unseal(seed_row)?;
        let mut buf = [0u8; microcert_core::HEADER_LEN + 5 + microcert_core::FS_PUBLIC_LEN + 16];
        let mut bytes = if opcode == Opcode::UPDATE_SEED_FS {
            // v1.2: a fresh ephemeral key pair; its private key is kept
            // only sealed, after the COMMAND's bytes, until the update is
            // answered (super::fsupdate).
            let key = super::fsupdate::new_key(&*self.card)?;
            let n =
                microcert_core::make_command_fs(&seed, &header, counter, key.public(), &mut buf)
                    .map_err(|e| Error::Card(format!("making a command: {e}")))?;
            let mut b = buf[..n].to_vec();
            b.extend(super::fsupdate::seal_key(
                &*self.card,
                dev.id,
                seed_row.generation,
                &key,
            )?);
            b
        } else {
            let n = make_command(&seed, &header, counter, opcode, &mut buf)
                .map_err(|e| Error::Card(format!("making a command: {e}")))?;
            buf[..n].to_vec()
        };
        bytes.shrink_to_fit();
        Ok(CommandRow {
            device: dev.id,
            counter,
            opcode: opcode.get(),
            generation: seed_row.generation,
            r: header.r,
            bytes: Blob(bytes),
            created: now,
            answered_at: None,
            status: None,
        })
    }

    /// After a backup is restored: every COMMAND still unanswered is built
    /// again with a fresh counter (max(previous + 1, now)), t and r
    /// (PROTOCOL.md section 6), so a node that accepted a later command
    /// before the restore still accepts it. Returns how many were rebuilt.
    pub fn rebuild_pending_commands(&self, actor: &str, now: u64) -> Result<u64> {
        let mut q = crate::db::DeviceQuery {
            limit: 500,
            ..Default::default()
        };
        let mut rebuilt = 0;
        loop {
            let page = self.db.list_devices(&q)?;
            let Some(last) = page.last() else { break };
            q.after = Some(last.device.id);
            for v in &page {
                let id = v.device.id;
                let done = with_tx(&*self.db, |tx| {
                    let Some(old) = tx.command(id)?.filter(|c| c.answered_at.is_none()) else {
                        return Ok(false);
                    };
                    let opcode = Opcode::new(old.opcode).map_err(Error::from_core)?;
                    let mut dev = self.device_in(tx, id)?;
                    let seeds = self.seeds_checked(tx, id)?;
                    let seed_row = seeds
                        .iter()
                        .find(|s| s.generation == old.generation)
                        .ok_or(Error::WrongGeneration)?;
                    let cmd = self.build_command(&mut dev, seed_row, opcode, now)?;
                    tx.put_command(&cmd)?;
                    self.put_device(tx, &mut dev, false)?;
                    self.audit(
                        tx,
                        now,
                        actor,
                        "rebuild-command",
                        (Some(id), Some(old.generation)),
                        &format!(
                            "{} rebuilt after a restore, counter {}",
                            opcode.name(),
                            cmd.counter
                        ),
                    )?;
                    Ok(true)
                })?;
                if done {
                    self.cache.invalidate(id);
                    rebuilt += 1;
                }
            }
        }
        Ok(rebuilt)
    }

    /// Queues UPDATE_SEED for one device. Its current seed must be Active;
    /// a pending UPDATE_SEED is left as it is (served unchanged), a pending
    /// REVOKE is not replaced.
    pub fn queue_update(&self, id: DeviceId, actor: &str, reason: &str, now: u64) -> Result<()> {
        with_tx(&*self.db, |tx| {
            self.queue_update_in(tx, id, actor, reason, now, false)
        })
        .map(|_| ())
    }

    /// Returns whether a command was queued.
    fn queue_update_in(
        &self,
        tx: &mut dyn Tx,
        id: DeviceId,
        actor: &str,
        reason: &str,
        now: u64,
        only_if_due: bool,
    ) -> Result<bool> {
        let mut dev = self.device_in(tx, id)?;
        let mut seeds = self.seeds_checked(tx, id)?;
        let renewal_years = if only_if_due {
            Some(self.profile(dev.class)?.renewal_years)
        } else {
            None
        };
        let pending = tx
            .command(id)?
            .filter(|c| c.answered_at.is_none())
            .map(|c| c.opcode);
        let input = policy::Input::QueueUpdate {
            pending,
            renewal_years,
        };
        let decision =
            self.decide_and_apply(tx, &mut dev, &mut seeds, input, now, (actor, reason))?;
        Ok(!decision.effects.is_empty())
    }

    /// Queues UPDATE_SEED for every device whose current seed is within its
    /// class's renewal period (by default: in its last year) and that has
    /// no pending command. Returns how many were queued.
    pub fn update_due(&self, actor: &str, now: u64) -> Result<u64> {
        let max_renew = self
            .config
            .profiles
            .iter()
            .map(|p| p.renewal_years)
            .max()
            .unwrap_or(1);
        let max_base = (year_of(now) + max_renew).saturating_sub(microcert_core::SEED_YEARS);
        let mut after = None;
        let mut queued = 0;
        loop {
            let page = self.db.devices_due(max_base, after, 500)?;
            let Some(last) = page.last() else { break };
            after = Some(*last);
            for id in page {
                let done = with_tx(&*self.db, |tx| {
                    self.queue_update_in(tx, id, actor, "seed in its renewal period", now, true)
                })?;
                queued += u64::from(done);
            }
        }
        Ok(queued)
    }

    /// The pending COMMAND for a device, if any: the same bytes every time
    /// until the node answers. Anyone may ask (the bytes are authenticated
    /// to the node, not the asker), so it only reads: no write lock, no
    /// cache invalidation.
    pub fn command(&self, id: DeviceId) -> Result<Option<Vec<u8>>> {
        with_read_tx(&*self.db, |tx| {
            self.device_in(tx, id)?;
            Ok(tx
                .command(id)?
                .filter(|c| c.answered_at.is_none())
                .map(|c| super::fsupdate::wire(&c).to_vec()))
        })
    }

    /// Accepts a node's RECEIPT answering its pending COMMAND (once).
    /// Checked first in a read-only transaction, so a RECEIPT that does not
    /// verify takes no write lock.
    pub fn accept_receipt(&self, bytes: &[u8], now: u64) -> Result<()> {
        let msg = Receipt::decode(bytes).map_err(malformed)?;
        let h = msg.header;
        let check = |tx: &mut dyn Tx| -> Result<CommandRow> {
            let dev = self.device_in(tx, h.device)?;
            if h.suite != dev.suite {
                return Err(Error::WrongSuite);
            }
            let cmd = tx.command(h.device)?.ok_or(Error::Verification)?;
            if cmd.r != msg.reference || cmd.generation != h.generation {
                return Err(Error::Verification);
            }
            let seeds = self.seeds_checked(tx, h.device)?;
            let row = seeds
                .iter()
                .find(|s| s.generation == h.generation)
                .ok_or(Error::WrongGeneration)?;
            let seed = self.unseal(row)?;
            verify_receipt(&seed, &msg, Sender::Node).map_err(Error::from_core)?;
            if cmd.answered_at.is_some() {
                return Err(Error::Replay);
            }
            Ok(cmd)
        };
        let r = with_read_tx(&*self.db, |tx| check(tx).map(drop)).and_then(|()| {
            with_tx(&*self.db, |tx| {
                let mut cmd = check(tx)?;
                cmd.answered_at = Some(now);
                cmd.status = Some(msg.status);
                // An answered UPDATE_SEED_FS no longer needs its key.
                super::fsupdate::destroy_secret(&mut cmd);
                tx.put_command(&cmd)?;
                let name = Opcode::new(cmd.opcode).map(|o| o.name()).unwrap_or("?");
                self.audit(
                    tx,
                    now,
                    CENTER_ACTOR,
                    "command-answered",
                    (Some(h.device), Some(h.generation)),
                    &format!("{name} counter {} status {}", cmd.counter, msg.status),
                )?;
                Ok(())
            })
        });
        if let Err(e) = &r {
            tracing::debug!(device = %h.device, kind = e.kind(), "RECEIPT refused");
        }
        r
    }

    /// Reopens transport-key enrollment for a device (PROTOCOL.md section
    /// 6): after its seed expired (same epoch), or after a revocation only
    /// with the next epoch (the chip is re-personalized). Epoch 255 is final.
    pub fn reopen_transport(
        &self,
        id: DeviceId,
        new_epoch: Option<u8>,
        actor: &str,
        reason: &str,
        now: u64,
    ) -> Result<u8> {
        // Invalidated before and after: a verification that raced with
        // this change re-reads the device after its own commit.
        self.cache.invalidate(id);
        let epoch = with_tx(&*self.db, |tx| {
            let mut dev = self.device_in(tx, id)?;
            let mut seeds = self.seeds_checked(tx, id)?;
            let input = policy::Input::ReopenTransport { new_epoch };
            self.decide_and_apply(tx, &mut dev, &mut seeds, input, now, (actor, reason))?;
            Ok(dev.epoch)
        })?;
        self.cache.invalidate(id);
        Ok(epoch)
    }

    /// Periodic work: prune expired replay records and challenges;
    /// deactivate seeds whose grace period ended or whose last year is over.
    ///
    /// Refused, changing nothing, while a step of the clock is unconfirmed
    /// (see [`crate::clock`]): a clock that jumped forward must not
    /// deactivate seeds or end grace periods early, nor prune records other
    /// centers still find fresh.
    pub fn housekeeping(&self, now: u64) -> Result<HousekeepingReport> {
        self.clock_gate(now)?;
        // The shared pruning high-water first: once it is durable no center
        // inserts a record that expires before `now` again, so deleting
        // them cannot reopen the window (interrupted here, nothing is lost).
        self.raise_pruned(now)?;
        let mut report = HousekeepingReport {
            pruned: self.db.prune(now)?,
            ..HousekeepingReport::default()
        };
        let year = year_of(now);
        loop {
            let ids = self.db.devices_to_expire(now, year, 500)?;
            if ids.is_empty() {
                break;
            }
            let mut changed = 0;
            for id in ids {
                // Invalidated before and after: a verification that raced with
                // this change re-reads the device after its own commit.
                self.cache.invalidate(id);
                let n = with_tx(&*self.db, |tx| {
                    // The device row first: it is the lock every writer of
                    // a device takes (FOR UPDATE on PostgreSQL), so two
                    // centers' housekeeping never both apply a transition
                    // to the same seed (each would fold its own old tag
                    // into the digest).
                    self.device_in(tx, id)?;
                    let mut seeds = self.seeds_checked(tx, id)?;
                    let snapshot = policy::DeviceSnapshot::of_seeds(id, seeds.iter());
                    let d = policy::decide(&snapshot, policy::Input::Housekeeping, now)?;
                    let mut n = 0u64;
                    for (generation, event, why) in d.transitions() {
                        if let Some(s) = seeds.iter_mut().find(|s| s.generation == generation) {
                            self.apply_event(tx, s, event, now, CENTER_ACTOR, &why.text(""))?;
                            n += 1;
                        }
                    }
                    Ok(n)
                })?;
                self.cache.invalidate(id);
                changed += n;
            }
            report.deactivated += changed;
            if changed == 0 {
                break;
            }
        }
        Ok(report)
    }

    /// One device with all its seeds (no ciphertexts).
    pub fn device(&self, id: DeviceId) -> Result<Option<DeviceView>> {
        self.db.device_view(id)
    }

    /// Devices with their current seed, filtered and paged by id.
    pub fn list_devices(&self, q: &DeviceQuery) -> Result<Vec<DeviceView>> {
        self.db.list_devices(q)
    }

    /// Audit entries after `after` (seq), at most `limit`.
    pub fn audit_log(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>> {
        self.db.audit_log(after, limit)
    }

    /// Walks the whole audit chain and compares its end with the
    /// card-tagged head; returns the seq of the first entry that breaks it
    /// (for a log cut short: the first missing one), or None when it is
    /// intact. [`Center::verify_audit`] says what is wrong.
    pub fn verify_audit_chain(&self) -> Result<Option<u64>> {
        Ok(audit::verify(&*self.db, &*self.card)?.1.map(|f| f.seq()))
    }

    /// Recomputes every record tag and the digest and compares them with
    /// the database.
    pub fn integrity_scan(&self) -> Result<IntegrityReport> {
        integrity::scan(&*self.db, &*self.card)
    }
}
