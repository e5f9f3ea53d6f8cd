//! Registration and ENROLL (PROTOCOL.md section 6).

use microcert_core::{DeviceId, Enroll, EnrollFs, Header, KeySeed, KeyState, Opcode, Suite};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{CENTER_ACTOR, Center, fsupdate, malformed};
use crate::card::EnrollVia;
use crate::db::{Blob, CommandRow, DeviceRow, NewAudit, SeedRow, Tx, with_read_tx, with_tx};
use crate::integrity::{self, DigestDelta};
use crate::policy::{self, DeviceSnapshot, covers};
use crate::{Error, Result};

/// An ENROLL of either form: v1.1 (under Kupd or Ktr) or the answer to a
/// forward-secret UPDATE_SEED_FS (v1.2). The two have one message type
/// and are told apart by their length.
#[derive(Debug, Clone, Copy)]
pub(super) enum AnyEnroll<'a> {
    /// Under Kupd or Ktr.
    Plain(Enroll<'a>),
    /// Forward-secret: the node's public key, the seed under Kfs, a Kupd tag.
    Fs(EnrollFs<'a>),
}

impl<'a> AnyEnroll<'a> {
    /// Decodes either form by its length.
    pub(super) fn decode(bytes: &'a [u8]) -> microcert_core::Result<Self> {
        match Enroll::decode(bytes) {
            Ok(m) => Ok(AnyEnroll::Plain(m)),
            Err(microcert_core::Error::Length) => EnrollFs::decode(bytes).map(AnyEnroll::Fs),
            Err(e) => Err(e),
        }
    }

    /// The header (its generation is the new seed's).
    pub(super) fn header(&self) -> Header {
        match self {
            AnyEnroll::Plain(m) => m.header,
            AnyEnroll::Fs(m) => m.header,
        }
    }
}

/// What the ENROLL rules decided, before any write. Not boxed: boxing
/// would only add another copy of the seed's bytes to wipe.
#[allow(clippy::large_enum_variant)]
enum Checked {
    /// A byte-identical retransmission of an accepted ENROLL: its RECEIPT.
    Again(Vec<u8>),
    /// Accepted: to be written.
    Accept(Accepted),
}

/// An ENROLL whose MAC verified and that the rules accept.
struct Accepted {
    dev: DeviceRow,
    is_new: bool,
    seeds: Vec<SeedRow>,
    /// The new seed (zeroizes on drop).
    seed: KeySeed,
    via: EnrollVia,
    /// Whether an UPDATE_SEED under the current seed was pending, as read
    /// in the transaction that writes the new seed.
    update_asked: bool,
}

/// What one ENROLL did.
pub(super) enum Enrolled {
    New(Vec<u8>),
    Again(Vec<u8>),
}

impl Center {
    /// A new device's row (not yet tagged): the class's profile must
    /// exist and allow the suite (its default when None); transport
    /// enrollment open.
    fn new_device_row(
        &self,
        id: DeviceId,
        (class, suite, epoch): (u8, Option<Suite>, u8),
        now: u64,
    ) -> Result<DeviceRow> {
        let profile = self.profile(class)?;
        let suite = suite.unwrap_or(profile.default_suite);
        if !profile.suites.contains(&suite) {
            return Err(Error::WrongSuite);
        }
        Ok(DeviceRow {
            id,
            class,
            suite,
            epoch,
            transport_open: true,
            created: now,
            highest_generation: None,
            command_counter: 0,
            tag: [0; 32],
        })
    }

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
        let row = self.new_device_row(id, (class, suite, epoch), now)?;
        let row = with_tx(&*self.db, |tx| {
            if tx.device(id)?.is_some() {
                return Err(Error::AlreadyRegistered { device: id });
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
        let template = self.new_device_row(DeviceId([0; 8]), (class, suite, epoch), now)?;
        with_tx(&*self.db, |tx| {
            for &id in ids {
                if tx.device(id)?.is_some() {
                    return Err(Error::AlreadyRegistered { device: id });
                }
                let mut row = DeviceRow {
                    id,
                    ..template.clone()
                };
                self.put_device(tx, &mut row, true)?;
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
    ///
    /// Every refusal, the MAC included, is decided first in a read-only
    /// transaction: an ENROLL that does not verify (garbage from anyone)
    /// neither takes the database's write lock nor drops the device from
    /// the seed cache. Only an ENROLL whose MAC verified is checked again,
    /// and written, in a write transaction.
    pub fn enroll(&self, bytes: &[u8], now: u64) -> Result<Vec<u8>> {
        let msg = AnyEnroll::decode(bytes).map_err(malformed)?;
        let digest: [u8; 32] = Sha256::digest(bytes).into();
        let id = msg.header().device;
        let pre = with_read_tx(&*self.db, |tx| {
            Ok(match self.enroll_check(tx, (&msg, &digest), None, now)? {
                // The opened seed zeroizes as it is dropped here.
                Checked::Again(r) => Some(r),
                Checked::Accept(_) => None,
            })
        });
        match pre {
            Ok(Some(receipt)) => return Ok(receipt),
            Ok(None) => {}
            Err(e) => {
                tracing::info!(device = %id, kind = e.kind(), "ENROLL refused");
                return Err(e);
            }
        }
        // Invalidated before and after: a verification that raced with
        // this change re-reads the device after its own commit.
        self.cache.invalidate(id);
        let out = with_tx(&*self.db, |tx| {
            let mut delta = DigestDelta::default();
            let out =
                self.enroll_in_tx_any(tx, (&msg, &digest), None, &mut delta, now, CENTER_ACTOR)?;
            delta.flush(tx, &*self.card)?;
            Ok(out)
        });
        self.cache.invalidate(id);
        match out {
            Ok(Enrolled::New(r) | Enrolled::Again(r)) => Ok(r),
            Err(e) => {
                tracing::info!(device = %id, kind = e.kind(), "ENROLL refused");
                Err(e)
            }
        }
    }

    /// The ENROLL rules, then its writes. Every refusal is decided before
    /// the first write, so a refused entry of a batch leaves nothing
    /// behind in its chunk. `register` is the device row to create if the
    /// device is unknown (batch import); None refuses an unknown device.
    /// `digest` is the SHA-256 of the ENROLL's bytes.
    pub(super) fn enroll_in_tx(
        &self,
        tx: &mut dyn Tx,
        (msg, digest): (&Enroll<'_>, &[u8; 32]),
        register: Option<&DeviceRow>,
        delta: &mut DigestDelta,
        now: u64,
        actor: &str,
    ) -> Result<Enrolled> {
        let msg = AnyEnroll::Plain(*msg);
        self.enroll_in_tx_any(tx, (&msg, digest), register, delta, now, actor)
    }

    /// [`Center::enroll_in_tx`] for either form of ENROLL.
    fn enroll_in_tx_any(
        &self,
        tx: &mut dyn Tx,
        (msg, digest): (&AnyEnroll<'_>, &[u8; 32]),
        register: Option<&DeviceRow>,
        delta: &mut DigestDelta,
        now: u64,
        actor: &str,
    ) -> Result<Enrolled> {
        match self.enroll_check(tx, (msg, digest), register, now)? {
            Checked::Again(r) => Ok(Enrolled::Again(r)),
            Checked::Accept(a) => self.enroll_write(tx, msg, digest, a, delta, now, actor),
        }
    }

    /// The ENROLL rules (PROTOCOL.md section 6), reads only: the device,
    /// a retransmission, the generation, which keys may open it (Kupd only
    /// while the current seed is Active, covers today and the center has
    /// an UPDATE_SEED pending for it; Ktr only while transport enrollment
    /// is open), the MAC, the new seed's years.
    fn enroll_check(
        &self,
        tx: &mut dyn Tx,
        (msg, digest): (&AnyEnroll<'_>, &[u8; 32]),
        register: Option<&DeviceRow>,
        now: u64,
    ) -> Result<Checked> {
        let h = msg.header();
        let id = h.device;
        let (dev, is_new) = match (self.device_opt(tx, id)?, register) {
            (Some(d), _) => (d, false),
            (None, Some(r)) => (r.clone(), true),
            (None, None) => return Err(Error::UnknownDevice),
        };
        if h.suite != dev.suite {
            return Err(Error::WrongSuite);
        }
        if !is_new && let Some(prev) = tx.seed_by_enroll_nonce(id, h.t, h.r)? {
            integrity::check_record(&*self.card, &prev)?;
            let same: bool = prev.enroll_digest[..].ct_eq(&digest[..]).into();
            return if same && prev.generation == h.generation {
                Ok(Checked::Again(prev.receipt.0))
            } else {
                Err(Error::Replay)
            };
        }
        let seeds = if is_new {
            Vec::new()
        } else {
            self.seeds_checked(tx, id)?
        };
        // Whether the center asked for this update: an UPDATE_SEED under
        // the current seed is pending, of the ENROLL's kind. v1.2: a
        // device whose profile requires the forward-secret update never
        // gets a symmetric one (a thief holding seed g cannot answer a
        // pending UPDATE_SEED_FS with a plain Kupd ENROLL and skip the
        // ECDH), and an UPDATE_SEED_FS is answered only by an EnrollFs.
        let current = seeds.last();
        let pending = match current {
            Some(c) if !is_new => tx.command(id)?.filter(|cmd| {
                cmd.answered_at.is_none()
                    && fsupdate::is_update(cmd.opcode)
                    && cmd.generation == c.generation
            }),
            _ => None,
        };
        let fs_required = self.profile(dev.class)?.forward_secret_update;
        let update_asked = match (msg, &pending) {
            (AnyEnroll::Plain(_), Some(cmd)) => {
                cmd.opcode == Opcode::UPDATE_SEED.get() && !fs_required
            }
            (AnyEnroll::Fs(_), Some(cmd)) => cmd.opcode == Opcode::UPDATE_SEED_FS.get(),
            (_, None) => false,
        };
        let pending = pending.filter(|_| update_asked);
        self.enroll_decide(
            msg,
            dev,
            is_new,
            seeds,
            (update_asked, pending.as_ref()),
            now,
        )
    }

    /// The ENROLL rules once the database was read (no database access):
    /// the policy's decision, the MAC (the card opens the ENROLL), the new
    /// seed's years. The import runs it outside its transaction for a
    /// device it expects to be new ([`Center::prepare_new_enroll`]).
    fn enroll_decide(
        &self,
        msg: &AnyEnroll<'_>,
        dev: DeviceRow,
        is_new: bool,
        seeds: Vec<SeedRow>,
        (update_asked, pending): (bool, Option<&CommandRow>),
        now: u64,
    ) -> Result<Checked> {
        let h = msg.header();
        let input = policy::Input::Enroll {
            generation: h.generation,
            update_asked,
        };
        let decision = policy::decide(&DeviceSnapshot::of(&dev, seeds.iter()), input, now)?;
        let (update, transport_epoch) = decision
            .effects
            .iter()
            .find_map(|e| match *e {
                policy::Effect::EnrollKeys { update, transport } => Some((update, transport)),
                _ => None,
            })
            .ok_or(Error::NotActive)?;
        let update_seed = match update.and_then(|g| seeds.iter().find(|s| s.generation == g)) {
            Some(c) => Some(self.unseal(c)?),
            None => None,
        };
        let (seed, via) = match msg {
            AnyEnroll::Plain(m) => {
                self.card
                    .open_enroll(m, update_seed.as_ref(), transport_epoch)?
            }
            AnyEnroll::Fs(m) => {
                // Only ever an update: the Kupd tag first (cheap, and
                // before the card opens the ephemeral key), then the ECDH.
                let (Some(current), Some(cmd)) = (update_seed.as_ref(), pending) else {
                    return Err(Error::Verification);
                };
                microcert_core::verify_enroll_fs(current, m).map_err(|_| Error::Verification)?;
                let kfs = fsupdate::transport_key(&*self.card, cmd, m)?;
                let s = microcert_core::open_enroll_fs(&kfs, m).map_err(|_| Error::Verification)?;
                (s, EnrollVia::Update)
            }
        };
        drop(update_seed);
        if !covers(seed.base_year(), now) {
            return Err(Error::Expired);
        }
        Ok(Checked::Accept(Accepted {
            dev,
            is_new,
            seeds,
            seed,
            via,
            update_asked,
        }))
    }

    /// The writes of an accepted ENROLL.
    #[allow(clippy::too_many_arguments)]
    fn enroll_write(
        &self,
        tx: &mut dyn Tx,
        msg: &AnyEnroll<'_>,
        digest: &[u8; 32],
        a: Accepted,
        delta: &mut DigestDelta,
        now: u64,
        actor: &str,
    ) -> Result<Enrolled> {
        let sealed = self.enroll_seal(msg, digest, a, now)?;
        let audit = self.enroll_store(tx, sealed, delta, now, actor)?;
        self.audit(
            tx,
            now,
            actor,
            &audit.action,
            (audit.device, audit.generation),
            &audit.reason,
        )?;
        let h = msg.header();
        tracing::info!(device = %h.device, generation = h.generation, "seed enrolled");
        Ok(Enrolled::New(audit.receipt))
    }

    /// The card's work for an accepted ENROLL, no database access: the
    /// seed sealed, the RECEIPT, the new record and the device row with
    /// their tags.
    fn enroll_seal(
        &self,
        msg: &AnyEnroll<'_>,
        digest: &[u8; 32],
        a: Accepted,
        now: u64,
    ) -> Result<SealedEnroll> {
        let h = msg.header();
        let id = h.device;
        let Accepted {
            mut dev,
            is_new,
            seeds,
            seed,
            via,
            update_asked,
        } = a;
        // How the device's seeds change around the new one: the policy's,
        // decided on the device as it was before this ENROLL.
        let decision = policy::decide(
            &DeviceSnapshot::of(&dev, seeds.iter()),
            policy::Input::Enrolled {
                generation: h.generation,
                via,
                update_asked,
                grace_period: self.config.grace_period,
            },
            now,
        )?;
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
        for e in &decision.effects {
            if let policy::Effect::Transport { open, epoch } = *e {
                dev.transport_open = open;
                dev.epoch = epoch;
            }
        }
        integrity::retag_device(&*self.card, &mut dev)?;
        Ok(SealedEnroll {
            dev,
            is_new,
            seeds,
            row,
            receipt,
            decision,
        })
    }

    /// The database writes of an accepted ENROLL, in the caller's
    /// transaction; returns its audit entry (for the caller to append) and
    /// the RECEIPT.
    fn enroll_store(
        &self,
        tx: &mut dyn Tx,
        sealed: SealedEnroll,
        delta: &mut DigestDelta,
        now: u64,
        actor: &str,
    ) -> Result<StoredEnroll> {
        let SealedEnroll {
            dev,
            is_new,
            mut seeds,
            row,
            receipt,
            decision,
        } = sealed;
        let id = dev.id;
        let via = row.via;
        let generation = row.generation;
        // One audit entry per enrollment; a device registered by this
        // batch entry says so in it.
        let reason = if is_new {
            format!(
                "via {}; registered class {} epoch {} by batch",
                via.name(),
                dev.class,
                dev.epoch
            )
        } else {
            format!("via {}", via.name())
        };
        let mut action = None;
        for effect in &decision.effects {
            match *effect {
                policy::Effect::Grace { generation, until } => {
                    let prev = super::seed_mut(&mut seeds, generation)?;
                    self.set_grace(tx, prev, until)?;
                }
                policy::Effect::AnswerUpdate => self.answer_update(tx, id, now)?,
                policy::Effect::Transition {
                    generation,
                    event,
                    reason: why,
                } => {
                    let s = super::seed_mut(&mut seeds, generation)?;
                    self.apply_event(tx, s, event, now, actor, &why.text(""))?;
                }
                // The device row was changed and tagged by enroll_seal.
                policy::Effect::NewSeed { .. } => {
                    if is_new {
                        tx.insert_device(&dev)?;
                    } else {
                        tx.update_device(&dev)?;
                    }
                    tx.insert_seed(&row)?;
                    delta.add(id, None, &row.tag);
                }
                policy::Effect::Audit { action: a } => action = Some(a),
                policy::Effect::Transport { .. }
                | policy::Effect::Use(_)
                | policy::Effect::NotaryValid
                | policy::Effect::EnrollKeys { .. }
                | policy::Effect::QueueRevoke { .. }
                | policy::Effect::QueueUpdate { .. } => {}
            }
        }
        let action = action.ok_or(Error::NoSeed { device: id })?;
        tracing::debug!(device = %id, generation, via = via.name(), "seed enrolled");
        Ok(StoredEnroll {
            action: action.into(),
            device: Some(id),
            generation: Some(generation),
            reason,
            receipt,
        })
    }

    /// The import's fast path, run outside its transaction (on several
    /// threads): everything an ENROLL of a device that is not registered
    /// yet needs from the card, decided exactly as [`Center::enroll_in_tx`]
    /// decides it for `register` when the device is absent. The import
    /// uses it only after it found the device absent inside its
    /// transaction (else it takes the full path).
    pub(super) fn prepare_new_enroll(
        &self,
        (msg, digest): (&Enroll<'_>, &[u8; 32]),
        register: &DeviceRow,
        now: u64,
    ) -> Result<PreparedEnroll> {
        if msg.header.suite != register.suite {
            return Err(Error::WrongSuite);
        }
        let msg = AnyEnroll::Plain(*msg);
        match self.enroll_decide(&msg, register.clone(), true, Vec::new(), (false, None), now)? {
            // A new device has no earlier ENROLL to match.
            Checked::Again(_) => Err(Error::Replay),
            Checked::Accept(a) => Ok(PreparedEnroll(self.enroll_seal(&msg, digest, a, now)?)),
        }
    }

    /// Writes a [`PreparedEnroll`] in the import's transaction (the device
    /// must have been found absent in it); returns the audit entry to
    /// append for it.
    pub(super) fn store_prepared_enroll(
        &self,
        tx: &mut dyn Tx,
        p: &PreparedEnroll,
        delta: &mut DigestDelta,
        now: u64,
        actor: &str,
    ) -> Result<NewAudit> {
        let s = self.enroll_store(tx, p.0.clone(), delta, now, actor)?;
        Ok(NewAudit::new(now, actor, s.action)
            .on(s.device, s.generation)
            .because(s.reason))
    }
}

/// The card's work of an accepted ENROLL ([`Center::enroll_seal`]): no
/// secret in it (the seed is sealed).
#[derive(Clone)]
struct SealedEnroll {
    dev: DeviceRow,
    is_new: bool,
    seeds: Vec<SeedRow>,
    row: SeedRow,
    receipt: Vec<u8>,
    /// The policy's decision for it ([`policy::Input::Enrolled`]).
    decision: policy::Decision,
}

/// What [`Center::enroll_store`] wrote: its audit entry and the RECEIPT.
struct StoredEnroll {
    action: String,
    device: Option<DeviceId>,
    generation: Option<u8>,
    reason: String,
    receipt: Vec<u8>,
}

/// An ENROLL of a new device, opened, sealed and tagged outside the
/// import's transaction ([`Center::prepare_new_enroll`]).
pub(super) struct PreparedEnroll(SealedEnroll);

impl PreparedEnroll {
    /// The device it registers.
    pub(super) fn device(&self) -> DeviceId {
        self.0.dev.id
    }
}
