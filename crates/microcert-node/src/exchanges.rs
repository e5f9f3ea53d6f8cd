//! The exchanges with the center that move seeds: ENROLL (first seed,
//! re-enrollment, update), the center's RECEIPTs, its COMMANDs, and
//! retransmission. The public entry points in `node.rs` run these out of
//! line and then wipe the stack they used (see `crate::scrub`), because
//! they expand whole seeds.

use microcert_core::{
    Command, ENROLL_PLAINTEXT_LEN, EnrollKey, HEADER_LEN, KeySeed, Opcode, Receipt, Sender,
    make_enroll, make_receipt, time, verify_command, verify_receipt,
};

use crate::chip::{Answered, Life};
use crate::error::{from_make, from_verify};
use crate::node::Node;
use crate::seedgen::{self, SEED_INPUT_LEN, SeedInput};
use crate::storage::{Awaiting, ChipStorage, Pending};
use crate::{Error, Result};

impl<S: ChipStorage> Node<S> {
    pub(crate) fn enroll_len(&self) -> usize {
        HEADER_LEN + ENROLL_PLAINTEXT_LEN + self.st().suite.tag_len()
    }

    /// Length of a forward-secret update ENROLL (v1.2).
    #[cfg(feature = "forward-secret")]
    pub(crate) fn enroll_fs_len(&self) -> usize {
        HEADER_LEN
            + microcert_core::FS_PUBLIC_LEN
            + ENROLL_PLAINTEXT_LEN
            + 2 * self.st().suite.tag_len()
    }

    /// Rebuilds the identical bytes of the pending ENROLL.
    pub(crate) fn build_pending(&self, out: &mut [u8]) -> Result<usize> {
        let p = self
            .st()
            .pending
            .as_ref()
            .ok_or(Error::NothingToRetransmit)?;
        let new_seed = seedgen::expand(&p.input, p.base_year)?;
        let header = self.header(p.generation, p.t, p.r);
        #[cfg(feature = "forward-secret")]
        if let Some(fs) = &p.fs {
            if !self.st().has_seed {
                return Err(Error::NotEnrolled);
            }
            return microcert_core::make_enroll_fs(
                &self.st().seed,
                &fs.kfs,
                &fs.public,
                &new_seed,
                &header,
                out,
            )
            .map_err(from_make);
        }
        let key = if p.under_update {
            if !self.st().has_seed {
                return Err(Error::NotEnrolled);
            }
            EnrollKey::Update(&self.st().seed)
        } else {
            EnrollKey::Transport(&self.st().ktr)
        };
        make_enroll(key, &new_seed, &header, out).map_err(from_make)
    }

    /// Draws a fresh seed input and t, r for generation `generation`, keeps
    /// them as the pending ENROLL and writes its bytes.
    pub(crate) fn start_enrollment(
        &mut self,
        t: u32,
        generation: u8,
        under_update: bool,
        out: &mut [u8],
    ) -> Result<usize> {
        if out.len() < self.enroll_len() {
            return Err(Error::BufferTooSmall);
        }
        self.draw_pending(t, generation, under_update)?;
        self.build_pending(out)
    }

    /// Draws a fresh seed input and r for generation `generation` and keeps
    /// them as the pending ENROLL (not built yet).
    fn draw_pending(&mut self, t: u32, generation: u8, under_update: bool) -> Result<()> {
        let base_year =
            u16::try_from(time::date_of(i64::from(t)).year).map_err(|_| Error::SeedExpired)?;
        let r = self.next_r()?;
        // The generator input is drawn straight into the chip state, so no
        // copy of it is left in a stack frame.
        let (record, rng) = self.store.parts();
        let pending = record.pending.insert(Pending {
            generation,
            t,
            r,
            base_year,
            under_update,
            input: SeedInput([0; SEED_INPUT_LEN]),
            #[cfg(feature = "forward-secret")]
            fs: None,
        });
        // With prediction resistance: the DRBG reseeds from the entropy
        // source right before it generates the seed's input.
        let drawn = self
            .rng
            .fill(rng, record.device, record.epoch, &mut pending.input.0, true);
        if let Err(e) = drawn {
            record.pending = None;
            return Err(e);
        }
        self.changed();
        Ok(())
    }

    /// Runs `check` with the pending ENROLL's seed. Kept out of line, like
    /// [`Node::commit_pending`], so the 976-byte seed it expands lives
    /// in its own short-lived frame, not in every caller's.
    #[inline(never)]
    pub(crate) fn check_with_pending(
        &self,
        check: impl FnOnce(&KeySeed) -> microcert_core::Result<()>,
    ) -> Result<()> {
        let p = self.st().pending.as_ref().ok_or(Error::NotPending)?;
        let new_seed = seedgen::expand(&p.input, p.base_year)?;
        check(&new_seed).map_err(from_verify)
    }

    /// Makes the pending seed the one in use; the old one is wiped (it
    /// zeroizes as it is dropped).
    #[inline(never)]
    pub(crate) fn commit_pending(&mut self) -> Result<()> {
        let Some(p) = self.st().pending.as_ref() else {
            return Ok(());
        };
        let generation = p.generation;
        let seed = seedgen::expand(&p.input, p.base_year)?;
        let st = self.st_mut();
        st.seed = seed;
        st.pending = None;
        st.has_seed = true;
        st.generation = generation;
        st.enrolled_before = true;
        // An AUTH under the old generation can no longer be checked.
        st.awaiting = None;
        self.changed();
        Ok(())
    }

    /// The node's time and the next generation, for an update: the
    /// current seed must still serve now.
    fn next_generation(&mut self) -> Result<(u32, u8)> {
        let t = self.st().node_time;
        self.seed_serves(t)?;
        let generation = self
            .st()
            .generation
            .checked_add(1)
            .ok_or(Error::GenerationsExhausted)?;
        Ok((t, generation))
    }

    pub(crate) fn update_seed(&mut self, out: &mut [u8]) -> Result<usize> {
        if self.st().pending.is_some() {
            // A repeated or newer UPDATE_SEED while the ENROLL waits for its
            // RECEIPT: the same seed again, never a second one.
            return self.build_pending(out);
        }
        let (t, generation) = self.next_generation()?;
        self.start_enrollment(t, generation, true, out)
    }

    /// Answers UPDATE_SEED_FS (v1.2): a fresh seed as for UPDATE_SEED, and
    /// an ephemeral P-256 key pair from the chip's DRBG (with prediction
    /// resistance); Kfs from the ECDH with the center's key `qc`. The
    /// private key is wiped here; the pending ENROLL keeps Qn and Kfs to
    /// be resent byte for byte until its RECEIPT.
    #[cfg(feature = "forward-secret")]
    pub(crate) fn update_seed_fs(
        &mut self,
        qc: &[u8; microcert_core::FS_PUBLIC_LEN],
        command_r: u64,
        out: &mut [u8],
    ) -> Result<usize> {
        if self.st().pending.is_some() {
            // The same ENROLL again, never a second seed or key pair.
            return self.build_pending(out);
        }
        if out.len() < self.enroll_fs_len() {
            return Err(Error::BufferTooSmall);
        }
        let (t, generation) = self.next_generation()?;
        // The key pair first (SP 800-56A 5.6.1.2.2: candidates from the
        // DRBG until one is in [1, n - 1]): nothing is pending if it fails.
        let key = {
            let (record, rng) = self.store.parts();
            let (device, epoch) = (record.device, record.epoch);
            let mut candidate = zeroize::Zeroizing::new([0u8; 32]);
            let mut found = None;
            for _ in 0..8 {
                self.rng
                    .fill(rng, device, epoch, &mut candidate[..], true)?;
                found = microcert_core::fs::EphemeralKey::from_candidate(&candidate);
                if found.is_some() {
                    break;
                }
            }
            found.ok_or(Error::Entropy)?
        };
        // The seed input and r, as for any ENROLL.
        self.draw_pending(t, generation, true)?;
        let st = self.st_mut();
        let p = st.pending.as_mut().ok_or(Error::NotPending)?;
        let binding = microcert_core::fs::FsBinding {
            device: st.device,
            new_generation: generation,
            command_r,
            enroll_r: p.r,
            center_public: qc,
            node_public: key.public(),
        };
        let kfs = match key.transport_key(qc, &binding) {
            Ok(k) => k,
            Err(_) => {
                // An invalid center key: nothing stays pending.
                st.pending = None;
                return Err(Error::Malformed(microcert_core::Error::Verification));
            }
        };
        p.fs = Some(crate::storage::FsPending {
            public: *key.public(),
            kfs,
        });
        drop(key);
        self.changed();
        self.build_pending(out)
    }

    /// Answers REVOKE with a RECEIPT, then wipes every key whatever happened.
    pub(crate) fn revoke(&mut self, reference: u64, out: &mut [u8]) -> Result<usize> {
        let reply = self.next_r().and_then(|r| {
            let header = self.header(self.st().generation, self.st().node_time, r);
            make_receipt(&self.st().seed, &header, Sender::Node, reference, 0, out)
                .map_err(from_make)
        });
        self.rng.clear();
        let st = self.st_mut();
        st.wipe_keys();
        st.life = Life::Revoked;
        self.changed();
        reply
    }

    #[inline(never)]
    pub(crate) fn enroll_inner(&mut self, now: u32, out: &mut [u8]) -> Result<usize> {
        self.ready()?;
        let t = self.advance(now);
        if self.st().pending.is_some() {
            return self.build_pending(out);
        }
        if self.seed_serves(t).is_ok() {
            return Err(Error::AlreadyEnrolled);
        }
        // No seed, or one that no longer serves: a fresh seed under Ktr.
        let generation = if self.st().enrolled_before {
            self.st()
                .generation
                .checked_add(1)
                .ok_or(Error::GenerationsExhausted)?
        } else {
            0
        };
        self.start_enrollment(t, generation, false, out)
    }

    #[inline(never)]
    pub(crate) fn accept_receipt_inner(&mut self, receipt: &[u8]) -> Result<Answered> {
        self.ready()?;
        let rc = Receipt::decode(receipt).map_err(Error::Malformed)?;
        self.check_origin(&rc.header)?;
        if let Some(p) = self.st().pending.as_ref().filter(|p| p.r == rc.reference) {
            // The RECEIPT of an ENROLL is keyed by the seed it enrolled.
            if rc.header.generation != p.generation {
                return Err(Error::WrongGeneration);
            }
            let generation = p.generation;
            self.check_with_pending(|seed| verify_receipt(seed, &rc, Sender::Center))?;
            self.advance(rc.header.t);
            if rc.status != 0 {
                return Err(Error::CenterRefused(rc.status));
            }
            self.commit_pending()?;
            return Ok(Answered::Enrollment { generation });
        }
        let awaited = self.st().awaiting.as_ref().and_then(Awaiting::header);
        match awaited {
            Some(h) if h.r == rc.reference => {
                if !self.st().has_seed || rc.header.generation != h.generation {
                    return Err(Error::WrongGeneration);
                }
                verify_receipt(&self.st().seed, &rc, Sender::Center).map_err(from_verify)?;
                self.advance(rc.header.t);
                self.st_mut().awaiting = None;
                self.changed();
                if rc.status != 0 {
                    return Err(Error::CenterRefused(rc.status));
                }
                Ok(Answered::Authentication)
            }
            _ => Err(Error::NotPending),
        }
    }

    #[inline(never)]
    pub(crate) fn handle_command_inner(
        &mut self,
        now: u32,
        command: &[u8],
        out: &mut [u8],
    ) -> Result<usize> {
        self.ready()?;
        let cmd = Command::decode(command).map_err(Error::Malformed)?;
        self.check_origin(&cmd.header)?;
        let gen_ = cmd.header.generation;
        // A COMMAND is keyed by the seed in use, or by the pending one when
        // the center accepted its ENROLL and the RECEIPT got lost.
        let pending_gen = self.st().pending.as_ref().map(|p| p.generation);
        let promote = if self.st().has_seed && gen_ == self.st().generation {
            verify_command(&self.st().seed, &cmd).map_err(from_verify)?;
            false
        } else if pending_gen == Some(gen_) {
            self.check_with_pending(|seed| verify_command(seed, &cmd))?;
            true
        } else {
            return Err(Error::WrongGeneration);
        };
        if cmd.counter <= self.st().highest_counter {
            return Err(Error::Replay);
        }
        let reply_len = if cmd.opcode == Opcode::UPDATE_SEED {
            self.enroll_len()
        } else if cmd.opcode == Opcode::UPDATE_SEED_FS {
            // v1.2: only a build with the forward-secret feature answers
            // it; a Class 1 build refuses it before accepting anything.
            #[cfg(feature = "forward-secret")]
            {
                self.enroll_fs_len()
            }
            #[cfg(not(feature = "forward-secret"))]
            {
                return Err(Error::Malformed(microcert_core::Error::UnknownOpcode(
                    Opcode::UPDATE_SEED_FS.get(),
                )));
            }
        } else {
            HEADER_LEN + 9 + self.st().suite.tag_len()
        };
        // Refuse before accepting, so the center can resend the same command.
        if out.len() < reply_len {
            return Err(Error::BufferTooSmall);
        }
        self.st_mut().highest_counter = cmd.counter;
        self.advance(now.max(cmd.header.t));
        self.changed();
        if promote {
            // The center proved it holds the new seed: as good as its RECEIPT.
            self.commit_pending()?;
        }
        #[cfg(feature = "forward-secret")]
        if let Some(qc) = cmd.ephemeral {
            return self.update_seed_fs(qc, cmd.header.r, out);
        }
        if cmd.opcode == Opcode::UPDATE_SEED {
            self.update_seed(out)
        } else {
            self.revoke(cmd.header.r, out)
        }
    }

    #[inline(never)]
    pub(crate) fn retransmit_inner(&self, out: &mut [u8]) -> Result<usize> {
        self.ready()?;
        if self.st().pending.is_some() {
            return self.build_pending(out);
        }
        let a = self
            .st()
            .awaiting
            .as_ref()
            .ok_or(Error::NothingToRetransmit)?;
        let msg = a.message();
        let dst = out.get_mut(..msg.len()).ok_or(Error::BufferTooSmall)?;
        dst.copy_from_slice(msg);
        Ok(msg.len())
    }
}
