//! Verification services: AUTH, challenges and AUTH_RESPONSE, SIGNATURE
//! with the notary, SEALED (PROTOCOL.md sections 6 and 8).
//!
//! Order of checks, cheapest and least revealing first: decode (malformed),
//! device (unknown), suite, freshness, seed state, then the MAC, and only
//! after the MAC the database write that makes a message count once
//! (so garbage cannot fill the replay table).

use microcert_core::{
    Audience, Auth, AuthResponse, CHALLENGE_LEN, DataDigest, DeviceId, Header, KeySeed, KeyState,
    MsgType, Sealed, Signature, open_in_place, verify_auth, verify_auth_response, verify_signature,
};
use zeroize::Zeroizing;

use super::group::Mark;
use super::{CENTER_ACTOR, Center, Replay, malformed, now32};
use crate::cache::{CachedDevice, CachedSeed};
use crate::db::{NotaryRow, with_tx};
use crate::policy::{self, Use};
use crate::{Error, Result};

/// An accepted AUTH or AUTH_RESPONSE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthOutcome {
    /// The device.
    pub device: DeviceId,
    /// The generation of the seed that verified.
    pub generation: u8,
    /// The message's t.
    pub time: u32,
    /// The center's RECEIPT (ref = the message's r), keyed by that seed:
    /// the node checks it, which makes the authentication mutual. Empty
    /// when a relying party verified the AUTH ([`Center::verify`]): the
    /// RECEIPT is for the device, and making it costs as much as the
    /// verification itself.
    pub receipt: Vec<u8>,
}

/// A valid SIGNATURE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureOutcome {
    /// The device.
    pub device: DeviceId,
    /// The seed's generation.
    pub generation: u8,
    /// The signature's t.
    pub time: u32,
    /// When the center's notary first saw this signature.
    pub first_seen: u64,
}

/// The answer of `/v1/verify`: an AUTH or a SIGNATURE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// An AUTH for the relying party.
    Auth(AuthOutcome),
    /// A SIGNATURE over the data that followed it.
    Signature(SignatureOutcome),
}

/// An opened SEALED message.
pub struct OpenedSealed {
    /// The device.
    pub device: DeviceId,
    /// The seed's generation.
    pub generation: u8,
    /// The message's t.
    pub time: u32,
    /// The plaintext (zeroized on drop).
    pub plaintext: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for OpenedSealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedSealed")
            .field("device", &self.device)
            .field("generation", &self.generation)
            .field("time", &self.time)
            .field("plaintext_len", &self.plaintext.len())
            .finish()
    }
}

impl Center {
    /// The seed a message under `generation` with time `t` may be
    /// verified with at `now`, or the refusal: the policy's one grace and
    /// expiry rule of every message type ([`policy::Input::Use`]).
    /// `first_use_ok`: whether a PreActivation seed may be used (AUTH and
    /// AUTH_RESPONSE activate it; other messages may not).
    fn usable<'d>(
        &self,
        dev: &'d CachedDevice,
        generation: u8,
        t: u32,
        now: u64,
        first_use_ok: bool,
    ) -> Result<(&'d CachedSeed, &'d KeySeed, Use)> {
        let input = policy::Input::Use {
            generation,
            t,
            first_use: first_use_ok,
        };
        let how = policy::decide(dev.snapshot(), input, now)?
            .use_()
            .ok_or(Error::NotActive)?;
        let s = dev.seed(generation).ok_or(Error::WrongGeneration)?;
        let seed = s.seed.as_ref().ok_or(Error::NotActive)?;
        Ok((s, seed, how))
    }

    fn check_suite(dev: &CachedDevice, h: &Header) -> Result<()> {
        if h.suite == dev.device.suite {
            Ok(())
        } else {
            Err(Error::WrongSuite)
        }
    }

    fn check_fresh(&self, dev: &CachedDevice, t: u32, now: u64) -> Result<()> {
        let skew = u64::from(self.profile(dev.device.class)?.skew);
        if now.abs_diff(u64::from(t)) <= skew {
            Ok(())
        } else {
            Err(Error::Stale)
        }
    }

    /// Records the use: the replay record (in memory, or through the
    /// group commit in the database) or the spent challenge (always in the
    /// database); on first use, the activation in one transaction.
    fn commit_use(
        &self,
        id: DeviceId,
        generation: u8,
        how: &Use,
        mark: Mark,
        now: u64,
    ) -> Result<()> {
        let guard = match (&self.replay, mark) {
            (Replay::Memory(g), Mark::Replay { .. }) => Some(g),
            _ => None,
        };
        if let (
            Some(g),
            Mark::Replay {
                device,
                generation,
                t,
                r,
                expires,
            },
        ) = (guard, mark)
        {
            if !g.mark(device, generation, t, r, expires, now)? {
                return Err(Error::Replay);
            }
            if !matches!(how, Use::Activates) {
                return Ok(());
            }
            let activated = self.activate_first_use(id, generation, now, None);
            if activated.is_err() {
                // Not accepted after all: a retransmission may try again.
                g.unmark(device, generation, t, r);
            }
            return activated;
        }
        if !matches!(how, Use::Activates) {
            return if self.group.mark(&*self.db, mark)? {
                Ok(())
            } else {
                Err(Error::Replay)
            };
        }
        self.activate_first_use(id, generation, now, Some(mark))
    }

    /// The first successful use of a PreActivation seed activates it, in
    /// one transaction with `mark` when the record is kept in the database.
    fn activate_first_use(
        &self,
        id: DeviceId,
        generation: u8,
        now: u64,
        mark: Option<Mark>,
    ) -> Result<()> {
        let activated = with_tx(&*self.db, |tx| {
            if let Some(m) = &mark
                && !m.apply(tx)?
            {
                return Err(Error::Replay);
            }
            let mut dev = self.device_in(tx, id)?;
            let mut seeds = self.seeds_checked(tx, id)?;
            let still_pending = seeds
                .iter()
                .any(|s| s.generation == generation && s.state == KeyState::PreActivation);
            if still_pending {
                let input = policy::Input::Operator {
                    generation: Some(generation),
                    event: microcert_core::Event::Activate,
                };
                let who = (CENTER_ACTOR, "first successful AUTH");
                self.decide_and_apply(tx, &mut dev, &mut seeds, input, now, who)?;
            }
            Ok(still_pending)
        })?;
        if activated {
            self.cache.invalidate(id);
        }
        Ok(())
    }

    /// After a commit: if this device's cache shard was invalidated since
    /// `ticket` (a life-cycle change may have committed just before this
    /// use did), read the device again and apply the state rules once more,
    /// so a revocation is refused at once, not after the cache TTL.
    /// Records an AUTH's or SEALED's (device, generation, t, r) as used
    /// (refused as a replay if it already was), kept until its skew window
    /// closes, then re-checks the device if its state changed meanwhile.
    fn commit_fresh_use(
        &self,
        dev: &CachedDevice,
        h: &Header,
        how: &Use,
        ticket: u64,
        now: u64,
    ) -> Result<()> {
        // Kept until t + skew + instance_skew (PROTOCOL.md section 6, v1.1):
        // no center can prune a record another still finds fresh.
        let expires = u64::from(h.t)
            + u64::from(self.profile(dev.device.class)?.skew)
            + self.config.instance_skew
            + 1;
        let mark = Mark::Replay {
            device: h.device,
            generation: h.generation,
            t: h.t,
            r: h.r,
            expires,
        };
        self.commit_use(h.device, h.generation, how, mark, now)?;
        self.recheck(h, ticket, now)
    }

    fn recheck(&self, h: &Header, ticket: u64, now: u64) -> Result<()> {
        if self.cache.ticket(h.device) == ticket {
            return Ok(());
        }
        let dev = self.load(h.device)?;
        self.usable(&dev, h.generation, h.t, now, true).map(|_| ())
    }

    fn log_refusal<T>(r: Result<T>, what: &'static str, device: Option<DeviceId>) -> Result<T> {
        if let Err(e) = &r {
            match device {
                Some(d) => tracing::debug!(device = %d, kind = e.kind(), what, "refused"),
                None => tracing::debug!(kind = e.kind(), what, "refused"),
            }
        }
        r
    }

    /// Verifies an AUTH for audience `aud` (the center's 0^8 on the device
    /// resource, a relying party's on `/v1/verify`) and returns the
    /// center's RECEIPT.
    pub fn verify_auth(&self, bytes: &[u8], aud: &Audience, now: u64) -> Result<AuthOutcome> {
        let msg = Auth::decode(bytes).map_err(malformed);
        let id = msg.as_ref().ok().map(|m| m.header.device);
        Self::log_refusal(
            msg.and_then(|m| self.auth_inner(&m, aud, now, true)),
            "AUTH",
            id,
        )
    }

    fn auth_inner(
        &self,
        msg: &Auth<'_>,
        aud: &Audience,
        now: u64,
        with_receipt: bool,
    ) -> Result<AuthOutcome> {
        let h = msg.header;
        let ticket = self.cache.ticket(h.device);
        let dev = self.load(h.device)?;
        Self::check_suite(&dev, &h)?;
        self.check_fresh(&dev, h.t, now)?;
        let (_, seed, how) = self
            .usable(&dev, h.generation, h.t, now, true)
            .map_err(|e| self.hide_state(e, &h, |k| verify_auth(k, msg, aud).is_ok()))?;
        verify_auth(seed, msg, aud).map_err(Error::from_core)?;
        self.commit_fresh_use(&dev, &h, &how, ticket, now)?;
        let receipt = if with_receipt {
            self.receipt(seed, dev.device.suite, h.device, h.generation, h.r, now)?
        } else {
            Vec::new()
        };
        Ok(AuthOutcome {
            device: h.device,
            generation: h.generation,
            time: h.t,
            receipt,
        })
    }

    /// What a device resource may reveal before a MAC verifies
    /// (docs/protocol.md, "What a refusal reveals"): a seed-state refusal
    /// (revoked, suspended, not active, another generation) is given only
    /// to a message whose MAC verifies under that generation's seed, read
    /// and unsealed for this (the cache holds usable seeds only); any
    /// other message gets `Verification`, as a bad MAC on a good device
    /// does. A destroyed seed (its ciphertext gone) verifies nothing, so
    /// its refusal is given as it is (destroyed is final), and so is the
    /// refusal of a generation the device does not have (generations are
    /// not secret). Other errors pass unchanged.
    fn hide_state(&self, e: Error, h: &Header, mac_ok: impl FnOnce(&KeySeed) -> bool) -> Error {
        if !matches!(
            e,
            Error::Revoked | Error::Suspended | Error::NotActive | Error::WrongGeneration
        ) {
            return e;
        }
        match self.seed_of(h.device, h.generation) {
            Ok(Some(Some(seed))) if mac_ok(&seed) => e,
            // No such generation (or none yet): generations are not secret.
            Ok(Some(None) | None) => e,
            Ok(Some(Some(_))) => Error::Verification,
            // The center's own failure (database, card) is reported as such.
            Err(other) => other,
        }
    }

    /// A seed of any state, read (tag checked) and unsealed: None if the
    /// generation does not exist, Some(None) if its ciphertext is destroyed.
    fn seed_of(&self, id: DeviceId, generation: u8) -> Result<Option<Option<KeySeed>>> {
        let rows = match self.db.read_device_unlocked(id) {
            Some(read) => match read? {
                Some((_, rows)) => rows,
                None => return Ok(None),
            },
            None => crate::db::with_read_tx(&*self.db, |tx| tx.seeds(id))?,
        };
        let Some(row) = rows.into_iter().find(|r| r.generation == generation) else {
            return Ok(None);
        };
        crate::integrity::check_record(&*self.card, &row)?;
        if row.ciphertext.is_none() {
            return Ok(Some(None));
        }
        self.unseal(&row).map(|s| Some(Some(s)))
    }

    /// A stateless challenge for any device id, known or not.
    pub fn issue_challenge(&self, device: DeviceId, now: u64) -> Result<[u8; CHALLENGE_LEN]> {
        self.card.make_challenge(device, now32(now)?)
    }

    /// Verifies an AUTH_RESPONSE: the challenge's MAC, the tag, then the
    /// challenge is spent once across all centers; t is checked against
    /// the seed's years only.
    pub fn verify_auth_response(
        &self,
        bytes: &[u8],
        aud: &Audience,
        now: u64,
    ) -> Result<AuthOutcome> {
        let msg = AuthResponse::decode(bytes).map_err(malformed);
        let id = msg.as_ref().ok().map(|m| m.header.device);
        Self::log_refusal(
            msg.and_then(|m| self.auth_response_inner(&m, aud, now)),
            "AUTH_RESPONSE",
            id,
        )
    }

    fn auth_response_inner(
        &self,
        msg: &AuthResponse<'_>,
        aud: &Audience,
        now: u64,
    ) -> Result<AuthOutcome> {
        let h = msg.header;
        self.card
            .check_challenge(h.device, msg.challenge, now32(now)?)?;
        let ticket = self.cache.ticket(h.device);
        let dev = self.load(h.device)?;
        Self::check_suite(&dev, &h)?;
        let (_, seed, how) = self
            .usable(&dev, h.generation, h.t, now, true)
            .map_err(|e| self.hide_state(e, &h, |k| verify_auth_response(k, msg, aud).is_ok()))?;
        verify_auth_response(seed, msg, aud).map_err(Error::from_core)?;
        let mut c = [0u8; 8];
        c.copy_from_slice(&msg.challenge[..8]);
        // Valid for the current and the previous minute: at most 120 s.
        let expires = now + 120 + self.config.instance_skew;
        self.commit_use(
            h.device,
            h.generation,
            &how,
            Mark::Challenge {
                device: h.device,
                c,
                expires,
            },
            now,
        )?;
        self.recheck(&h, ticket, now)?;
        let receipt = self.receipt(seed, dev.device.suite, h.device, h.generation, h.r, now)?;
        Ok(AuthOutcome {
            device: h.device,
            generation: h.generation,
            time: h.t,
            receipt,
        })
    }

    /// Verifies a SIGNATURE over `data` and records it as a notary.
    pub fn verify_signature(
        &self,
        signature: &[u8],
        data: &[u8],
        now: u64,
    ) -> Result<SignatureOutcome> {
        self.verify_signature_digest(signature, &DataDigest::of(data), now)
    }

    /// Like [`Center::verify_signature`], with the data's SHA-256.
    pub fn verify_signature_digest(
        &self,
        signature: &[u8],
        digest: &[u8; 32],
        now: u64,
    ) -> Result<SignatureOutcome> {
        let msg = Signature::decode(signature).map_err(malformed);
        let id = msg.as_ref().ok().map(|m| m.header.device);
        Self::log_refusal(
            msg.and_then(|m| self.signature_inner(&m, digest, now)),
            "SIGNATURE",
            id,
        )
    }

    fn signature_inner(
        &self,
        msg: &Signature<'_>,
        digest: &[u8; 32],
        now: u64,
    ) -> Result<SignatureOutcome> {
        let h = msg.header;
        let dev = self.load(h.device)?;
        Self::check_suite(&dev, &h)?;
        let skew = u64::from(self.profile(dev.device.class)?.skew);
        if u64::from(h.t) > now + skew {
            return Err(Error::Stale);
        }
        dev.seed(h.generation).ok_or(Error::WrongGeneration)?;
        let outcome = |first_seen| SignatureOutcome {
            device: h.device,
            generation: h.generation,
            time: h.t,
            first_seen,
        };
        // The same grace and expiry rule as every other message type.
        let usable = self.usable(&dev, h.generation, h.t, now, false);
        if let Ok((_, seed, _)) = usable {
            verify_signature(seed, msg, digest).map_err(Error::from_core)?;
            let record = NotaryRow {
                device: h.device,
                generation: h.generation,
                t: h.t,
                r: h.r,
                digest: *digest,
                tag: msg.tag.to_vec(),
                first_seen: now,
                seal: None,
            };
            // The sealing layer tags the record and refuses a stored one
            // whose tag fails.
            let (stored, _) = with_tx(&*self.db, |tx| tx.notarize(&record))?;
            return Ok(outcome(stored.first_seen));
        }
        // Not usable now: valid only as the notary recorded it while the
        // seed was usable (for a Compromised seed, before the compromise).
        // A record failing its card tag is refused (Error::Integrity).
        let refused = usable.err().unwrap_or(Error::NotActive);
        let found = with_tx(&*self.db, |tx| {
            tx.notary((h.device, h.generation, h.t, h.r, digest))
        })?;
        match found {
            Some(n)
                if subtle::ConstantTimeEq::ct_eq(&n.tag[..], msg.tag).into()
                    && policy::decide(
                        dev.snapshot(),
                        policy::Input::Notarized {
                            generation: h.generation,
                            first_seen: n.first_seen,
                        },
                        now,
                    )
                    .is_ok() =>
            {
                Ok(outcome(n.first_seen))
            }
            _ => Err(refused),
        }
    }

    /// `/v1/verify`: an AUTH for the relying party `aud`, or a SIGNATURE
    /// followed by the signed data.
    pub fn verify(&self, body: &[u8], aud: &Audience, now: u64) -> Result<VerifyOutcome> {
        let (ty, _) = Header::parse(body).map_err(malformed)?;
        if ty == MsgType::AUTH {
            let msg = Auth::decode(body).map_err(malformed);
            let id = msg.as_ref().ok().map(|m| m.header.device);
            Self::log_refusal(
                msg.and_then(|m| self.auth_inner(&m, aud, now, false)),
                "AUTH",
                id,
            )
            .map(VerifyOutcome::Auth)
        } else if ty == MsgType::SIGNATURE {
            let (sig, data) = Signature::decode_prefix(body).map_err(malformed)?;
            let sig_len = sig.len();
            self.verify_signature(&body[..sig_len], data, now)
                .map(VerifyOutcome::Signature)
        } else {
            Err(Error::Malformed(format!(
                "/v1/verify takes AUTH or SIGNATURE, not {}",
                ty.name()
            )))
        }
    }

    /// Opens a SEALED message for relying party `aud` (never 0^8).
    pub fn open_sealed(&self, bytes: &[u8], aud: &Audience, now: u64) -> Result<OpenedSealed> {
        let msg = Sealed::decode(bytes).map_err(malformed);
        let id = msg.as_ref().ok().map(|m| m.header.device);
        Self::log_refusal(
            msg.and_then(|m| self.sealed_inner(&m, bytes, aud, now)),
            "SEALED",
            id,
        )
    }

    fn sealed_inner(
        &self,
        msg: &Sealed<'_>,
        bytes: &[u8],
        aud: &Audience,
        now: u64,
    ) -> Result<OpenedSealed> {
        if aud.is_center() {
            return Err(Error::Malformed(
                "a SEALED message needs a relying party audience".into(),
            ));
        }
        let h = msg.header;
        let ticket = self.cache.ticket(h.device);
        let dev = self.load(h.device)?;
        Self::check_suite(&dev, &h)?;
        if msg.ciphertext.len() > self.profile(dev.device.class)?.max_sealed {
            return Err(Error::Malformed(
                "SEALED plaintext longer than the device class allows".into(),
            ));
        }
        self.check_fresh(&dev, h.t, now)?;
        let (_, seed, how) = self.usable(&dev, h.generation, h.t, now, false)?;
        // Opened in place in one zeroizing buffer, which becomes the
        // plaintext: no other copy of it is made (a zeroizing Vec wipes its
        // whole capacity, the truncated tail included).
        let mut plaintext = Zeroizing::new(bytes.to_vec());
        // open_in_place leaves the plaintext right after the header.
        let len = open_in_place(seed, &mut plaintext[..], aud)
            .map_err(Error::from_core)?
            .1
            .len();
        let start = microcert_core::HEADER_LEN;
        plaintext.copy_within(start..start + len, 0);
        plaintext.truncate(len);
        self.commit_fresh_use(&dev, &h, &how, ticket, now)?;
        Ok(OpenedSealed {
            device: h.device,
            generation: h.generation,
            time: h.t,
            plaintext,
        })
    }
}
