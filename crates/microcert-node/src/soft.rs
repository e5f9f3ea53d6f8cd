//! `SoftChip`: the secure chip in software, with its state in memory and a
//! fixed-size byte image the caller stores in non-volatile memory.

use core::fmt;

use microcert_core::{
    Audience, CHALLENGE_LEN, Command, DataDigest, DeviceId, ENROLL_PLAINTEXT_LEN, EnrollKey,
    HEADER_LEN, Header, Key128, KeySeed, Opcode, Receipt, SEED_LEN, Sender, Suite, csk, make_auth,
    make_auth_response, make_enroll, make_receipt, make_signature, seal_in_place, time,
    verify_command, verify_receipt,
};

use crate::chip::{Answered, Entropy, Life, Personalization, SecureChip, Status};
use crate::error::{from_make, from_verify};
use crate::seedgen::{self, SEED_INPUT_LEN, SeedInput};
use crate::{Error, Result};

/// How many relying parties a chip can be configured for.
pub const MAX_AUDIENCES: usize = 4;
/// Longest SEALED plaintext a class 1 device sends (PROTOCOL.md section 5).
pub const CLASS1_MAX_SEALED: usize = 1024;
/// Longest message kept for retransmission: an AUTH_RESPONSE with 16-byte tags.
pub(crate) const AWAIT_MAX: usize = HEADER_LEN + CHALLENGE_LEN + 16;

/// An ENROLL sent and not yet answered by the center's RECEIPT. Everything
/// needed to rebuild its identical bytes: t, r, generation, base year, the
/// key it is under and the generator input of its seed.
pub(crate) struct Pending {
    pub(crate) generation: u8,
    pub(crate) t: u32,
    pub(crate) r: u64,
    pub(crate) base_year: u16,
    /// Under Kupd of the current seed (an update) rather than Ktr.
    pub(crate) under_update: bool,
    pub(crate) input: SeedInput,
}

/// The bytes of the last AUTH or AUTH_RESPONSE to the center, waiting for
/// its RECEIPT. Not secret.
#[derive(Clone, Copy)]
pub(crate) struct Awaiting {
    pub(crate) len: u8,
    pub(crate) bytes: [u8; AWAIT_MAX],
}

impl Awaiting {
    pub(crate) fn message(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or(&[])
    }

    fn header(&self) -> Option<Header> {
        Header::parse(self.message()).ok().map(|(_, h)| h)
    }
}

/// Everything the chip keeps across power loss; [`crate::image`] turns it
/// into bytes and back.
pub(crate) struct State {
    pub(crate) life: Life,
    pub(crate) device: DeviceId,
    pub(crate) epoch: u8,
    pub(crate) suite: Suite,
    pub(crate) class: u8,
    pub(crate) node_time: u32,
    pub(crate) highest_counter: u32,
    /// High half of every r; bumped before each message goes out.
    pub(crate) r_counter: u32,
    pub(crate) ktr: Key128,
    /// The seed in use; all zero while `has_seed` is false.
    pub(crate) seed: KeySeed,
    pub(crate) has_seed: bool,
    /// Generation of the seed held, or of the last one enrolled.
    pub(crate) generation: u8,
    /// Whether `generation` means anything (an ENROLL was ever accepted).
    pub(crate) enrolled_before: bool,
    pub(crate) pending: Option<Pending>,
    pub(crate) awaiting: Option<Awaiting>,
    pub(crate) audiences: [Audience; MAX_AUDIENCES],
    pub(crate) audience_count: u8,
}

impl State {
    pub(crate) fn blank() -> Self {
        State {
            life: Life::Blank,
            device: DeviceId::default(),
            epoch: 0,
            suite: Suite::CMAC64,
            class: 0,
            node_time: 0,
            highest_counter: 0,
            r_counter: 0,
            ktr: Key128::from_bytes([0; 16]),
            seed: KeySeed::from_bytes(&[0; SEED_LEN], 0),
            has_seed: false,
            generation: 0,
            enrolled_before: false,
            pending: None,
            awaiting: None,
            audiences: [Audience::CENTER; MAX_AUDIENCES],
            audience_count: 0,
        }
    }

    /// Drops every key; the old values zeroize as they are dropped.
    fn wipe_keys(&mut self) {
        self.ktr = Key128::from_bytes([0; 16]);
        self.seed = KeySeed::from_bytes(&[0; SEED_LEN], 0);
        self.has_seed = false;
        self.pending = None;
        self.awaiting = None;
    }

    fn configured(&self) -> &[Audience] {
        self.audiences
            .get(..usize::from(self.audience_count))
            .unwrap_or(&[])
    }
}

/// A secure chip in software.
///
/// Persistence contract: every call that returns `Ok` with a message may
/// have advanced the r counter or stored an unanswered message. Before
/// transmitting anything the chip wrote, the caller checks
/// [`SoftChip::is_dirty`], stores [`SoftChip::to_image`] in non-volatile
/// memory and calls [`SoftChip::mark_persisted`]. Skipping this can reuse a
/// (t, r) pair after a power loss, or lose an ENROLL whose seed the center
/// then holds.
pub struct SoftChip<E> {
    pub(crate) state: State,
    entropy: E,
    dirty: bool,
}

impl<E: Entropy> SoftChip<E> {
    /// A blank chip drawing its randomness from `entropy`.
    pub fn new(entropy: E) -> Self {
        SoftChip {
            state: State::blank(),
            entropy,
            dirty: true,
        }
    }

    pub(crate) fn from_state(state: State, entropy: E) -> Self {
        SoftChip {
            state,
            entropy,
            dirty: false,
        }
    }

    /// True when the state changed since the last [`SoftChip::mark_persisted`]:
    /// save the image before transmitting.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Records that the caller stored the current image.
    pub fn mark_persisted(&mut self) {
        self.dirty = false;
    }

    fn ready(&self) -> Result<()> {
        match self.state.life {
            Life::Personalized => Ok(()),
            Life::Blank => Err(Error::NotPersonalized),
            Life::Revoked => Err(Error::Revoked),
            Life::Tampered => Err(Error::Tampered),
        }
    }

    /// The later of `now` and the node time, which becomes the node time.
    fn advance(&mut self, now: u32) -> u32 {
        if now > self.state.node_time {
            self.state.node_time = now;
            self.dirty = true;
        }
        self.state.node_time
    }

    /// A fresh r: the persisted counter, bumped, || 32 random bits.
    fn next_r(&mut self) -> Result<u64> {
        let counter = self
            .state
            .r_counter
            .checked_add(1)
            .ok_or(Error::CounterExhausted)?;
        let mut random = [0u8; 4];
        self.entropy.fill(&mut random).map_err(|_| Error::Entropy)?;
        self.state.r_counter = counter;
        self.dirty = true;
        Ok((u64::from(counter) << 32) | u64::from(u32::from_be_bytes(random)))
    }

    /// Checks that the seed in use serves time `t`.
    fn seed_serves(&self, t: u32) -> Result<()> {
        if !self.state.has_seed {
            return Err(Error::NotEnrolled);
        }
        csk::year_index(self.state.seed.base_year(), t)
            .map(|_| ())
            .map_err(from_make)
    }

    fn header(&self, generation: u8, t: u32, r: u64) -> Header {
        Header {
            suite: self.state.suite,
            device: self.state.device,
            generation,
            t,
            r,
        }
    }

    /// Time and r for a message under the seed in use.
    fn fresh_header(&mut self, now: u32) -> Result<Header> {
        self.ready()?;
        let t = self.advance(now);
        self.seed_serves(t)?;
        let r = self.next_r()?;
        Ok(self.header(self.state.generation, t, r))
    }

    fn check_audience(&self, aud: &Audience) -> Result<()> {
        if aud.is_center() || self.state.configured().contains(aud) {
            Ok(())
        } else {
            Err(Error::UnknownAudience)
        }
    }

    fn remember(&mut self, msg: &[u8]) {
        let mut a = Awaiting {
            len: 0,
            bytes: [0; AWAIT_MAX],
        };
        if let (Some(dst), Ok(len)) = (a.bytes.get_mut(..msg.len()), u8::try_from(msg.len())) {
            dst.copy_from_slice(msg);
            a.len = len;
            self.state.awaiting = Some(a);
            self.dirty = true;
        }
    }

    fn enroll_len(&self) -> usize {
        HEADER_LEN + ENROLL_PLAINTEXT_LEN + self.state.suite.tag_len()
    }

    /// Rebuilds the identical bytes of the pending ENROLL.
    fn build_pending(&self, out: &mut [u8]) -> Result<usize> {
        let p = self
            .state
            .pending
            .as_ref()
            .ok_or(Error::NothingToRetransmit)?;
        let new_seed = seedgen::expand(&p.input, p.base_year)?;
        let header = self.header(p.generation, p.t, p.r);
        let key = if p.under_update {
            if !self.state.has_seed {
                return Err(Error::NotEnrolled);
            }
            EnrollKey::Update(&self.state.seed)
        } else {
            EnrollKey::Transport(&self.state.ktr)
        };
        make_enroll(key, &new_seed, &header, out).map_err(from_make)
    }

    /// Draws a fresh seed input and t, r for generation `generation`, keeps
    /// them as the pending ENROLL and writes its bytes.
    fn start_enrollment(
        &mut self,
        t: u32,
        generation: u8,
        under_update: bool,
        out: &mut [u8],
    ) -> Result<usize> {
        if out.len() < self.enroll_len() {
            return Err(Error::BufferTooSmall);
        }
        let base_year =
            u16::try_from(time::date_of(i64::from(t)).year).map_err(|_| Error::SeedExpired)?;
        let mut input = SeedInput([0; SEED_INPUT_LEN]);
        self.entropy
            .fill(&mut input.0)
            .map_err(|_| Error::Entropy)?;
        let r = self.next_r()?;
        self.state.pending = Some(Pending {
            generation,
            t,
            r,
            base_year,
            under_update,
            input,
        });
        self.dirty = true;
        self.build_pending(out)
    }

    /// Runs `check` with the pending ENROLL's seed. Kept out of line, like
    /// [`SoftChip::commit_pending`], so the 976-byte seed it expands lives
    /// in its own short-lived frame, not in every caller's.
    #[inline(never)]
    fn check_with_pending(
        &self,
        check: impl FnOnce(&KeySeed) -> microcert_core::Result<()>,
    ) -> Result<()> {
        let p = self.state.pending.as_ref().ok_or(Error::NotPending)?;
        let new_seed = seedgen::expand(&p.input, p.base_year)?;
        check(&new_seed).map_err(from_verify)
    }

    /// Makes the pending seed the one in use; the old one is wiped (it
    /// zeroizes as it is dropped).
    #[inline(never)]
    fn commit_pending(&mut self) -> Result<()> {
        let Some(p) = self.state.pending.as_ref() else {
            return Ok(());
        };
        let generation = p.generation;
        self.state.seed = seedgen::expand(&p.input, p.base_year)?;
        self.state.pending = None;
        self.state.has_seed = true;
        self.state.generation = generation;
        self.state.enrolled_before = true;
        // An AUTH under the old generation can no longer be checked.
        self.state.awaiting = None;
        self.dirty = true;
        Ok(())
    }

    fn update_seed(&mut self, out: &mut [u8]) -> Result<usize> {
        if self.state.pending.is_some() {
            // A repeated or newer UPDATE_SEED while the ENROLL waits for its
            // RECEIPT: the same seed again, never a second one.
            return self.build_pending(out);
        }
        let t = self.state.node_time;
        self.seed_serves(t)?;
        let generation = self
            .state
            .generation
            .checked_add(1)
            .ok_or(Error::GenerationsExhausted)?;
        self.start_enrollment(t, generation, true, out)
    }

    /// Answers REVOKE with a RECEIPT, then wipes every key whatever happened.
    fn revoke(&mut self, reference: u64, out: &mut [u8]) -> Result<usize> {
        let reply = self.next_r().and_then(|r| {
            let header = self.header(self.state.generation, self.state.node_time, r);
            make_receipt(&self.state.seed, &header, Sender::Node, reference, 0, out)
                .map_err(from_make)
        });
        self.state.wipe_keys();
        self.state.life = Life::Revoked;
        self.dirty = true;
        reply
    }

    fn check_origin(&self, header: &Header) -> Result<()> {
        if header.suite != self.state.suite {
            return Err(Error::WrongSuite);
        }
        if header.device != self.state.device {
            return Err(Error::WrongDevice);
        }
        Ok(())
    }
}

impl<E: Entropy> SecureChip for SoftChip<E> {
    fn personalize(&mut self, p: &Personalization) -> Result<()> {
        let st = &self.state;
        match st.life {
            Life::Tampered => return Err(Error::Tampered),
            Life::Blank => {}
            Life::Personalized | Life::Revoked => {
                if p.device != st.device {
                    return Err(Error::WrongDevice);
                }
                let next = st.epoch.checked_add(1).ok_or(Error::FinalEpoch)?;
                let holds_keys = st.has_seed || st.pending.is_some();
                if p.epoch != next || (st.life == Life::Personalized && holds_keys) {
                    return Err(Error::AlreadyPersonalized);
                }
            }
        }
        self.state.wipe_keys();
        let st = &mut self.state;
        st.ktr = Key128::from_bytes(*p.transport_key.expose());
        st.device = p.device;
        st.epoch = p.epoch;
        st.suite = p.suite;
        st.class = p.class;
        st.life = Life::Personalized;
        self.advance(p.issued);
        self.dirty = true;
        Ok(())
    }

    fn status(&self) -> Status {
        let st = &self.state;
        Status {
            life: st.life,
            device: st.device,
            epoch: st.epoch,
            suite: st.suite,
            generation: st.has_seed.then_some(st.generation),
            pending_generation: st.pending.as_ref().map(|p| p.generation),
            node_time: st.node_time,
            highest_counter: st.highest_counter,
        }
    }

    fn add_audience(&mut self, name: &str) -> Result<Audience> {
        match self.state.life {
            Life::Tampered => return Err(Error::Tampered),
            Life::Revoked => return Err(Error::Revoked),
            Life::Blank | Life::Personalized => {}
        }
        let aud = Audience::relying_party(name);
        if aud.is_center() {
            return Err(Error::CenterAudience);
        }
        if self.state.configured().contains(&aud) {
            return Ok(aud);
        }
        let i = usize::from(self.state.audience_count);
        let slot = self
            .state
            .audiences
            .get_mut(i)
            .ok_or(Error::AudienceTableFull)?;
        *slot = aud;
        self.state.audience_count = self.state.audience_count.saturating_add(1);
        self.dirty = true;
        Ok(aud)
    }

    fn enroll(&mut self, now: u32, out: &mut [u8]) -> Result<usize> {
        self.ready()?;
        let t = self.advance(now);
        if self.state.pending.is_some() {
            return self.build_pending(out);
        }
        if self.seed_serves(t).is_ok() {
            return Err(Error::AlreadyEnrolled);
        }
        // No seed, or one that no longer serves: a fresh seed under Ktr.
        let generation = if self.state.enrolled_before {
            self.state
                .generation
                .checked_add(1)
                .ok_or(Error::GenerationsExhausted)?
        } else {
            0
        };
        self.start_enrollment(t, generation, false, out)
    }

    fn auth(&mut self, now: u32, aud: &Audience, out: &mut [u8]) -> Result<usize> {
        self.check_audience(aud)?;
        let header = self.fresh_header(now)?;
        let n = make_auth(&self.state.seed, &header, aud, out).map_err(from_make)?;
        if aud.is_center() {
            self.remember(out.get(..n).unwrap_or(&[]));
        }
        Ok(n)
    }

    fn auth_response(
        &mut self,
        now: u32,
        challenge: &[u8; CHALLENGE_LEN],
        out: &mut [u8],
    ) -> Result<usize> {
        let header = self.fresh_header(now)?;
        let n = make_auth_response(&self.state.seed, &header, challenge, &Audience::CENTER, out)
            .map_err(from_make)?;
        self.remember(out.get(..n).unwrap_or(&[]));
        Ok(n)
    }

    fn sign(&mut self, now: u32, digest: DataDigest, out: &mut [u8]) -> Result<usize> {
        let header = self.fresh_header(now)?;
        make_signature(&self.state.seed, &header, &digest.finish(), out).map_err(from_make)
    }

    fn seal(
        &mut self,
        now: u32,
        aud: &Audience,
        buf: &mut [u8],
        plaintext_len: usize,
    ) -> Result<usize> {
        if aud.is_center() {
            return Err(Error::CenterAudience);
        }
        self.check_audience(aud)?;
        let limit = if self.state.class == 1 {
            CLASS1_MAX_SEALED
        } else {
            microcert_core::MAX_SEALED_PLAINTEXT
        };
        if plaintext_len > limit {
            return Err(Error::PlaintextTooLong);
        }
        let header = self.fresh_header(now)?;
        seal_in_place(&self.state.seed, &header, aud, buf, plaintext_len).map_err(from_make)
    }

    fn accept_receipt(&mut self, receipt: &[u8]) -> Result<Answered> {
        self.ready()?;
        let rc = Receipt::decode(receipt).map_err(Error::Malformed)?;
        self.check_origin(&rc.header)?;
        if let Some(p) = self.state.pending.as_ref().filter(|p| p.r == rc.reference) {
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
        let awaited = self.state.awaiting.as_ref().and_then(Awaiting::header);
        match awaited {
            Some(h) if h.r == rc.reference => {
                if !self.state.has_seed || rc.header.generation != h.generation {
                    return Err(Error::WrongGeneration);
                }
                verify_receipt(&self.state.seed, &rc, Sender::Center).map_err(from_verify)?;
                self.advance(rc.header.t);
                self.state.awaiting = None;
                self.dirty = true;
                if rc.status != 0 {
                    return Err(Error::CenterRefused(rc.status));
                }
                Ok(Answered::Authentication)
            }
            _ => Err(Error::NotPending),
        }
    }

    fn handle_command(&mut self, now: u32, command: &[u8], out: &mut [u8]) -> Result<usize> {
        self.ready()?;
        let cmd = Command::decode(command).map_err(Error::Malformed)?;
        self.check_origin(&cmd.header)?;
        let gen_ = cmd.header.generation;
        // A COMMAND is keyed by the seed in use, or by the pending one when
        // the center accepted its ENROLL and the RECEIPT got lost.
        let pending_gen = self.state.pending.as_ref().map(|p| p.generation);
        let promote = if self.state.has_seed && gen_ == self.state.generation {
            verify_command(&self.state.seed, &cmd).map_err(from_verify)?;
            false
        } else if pending_gen == Some(gen_) {
            self.check_with_pending(|seed| verify_command(seed, &cmd))?;
            true
        } else {
            return Err(Error::WrongGeneration);
        };
        if cmd.counter <= self.state.highest_counter {
            return Err(Error::Replay);
        }
        let reply_len = if cmd.opcode == Opcode::UPDATE_SEED {
            self.enroll_len()
        } else {
            HEADER_LEN + 9 + self.state.suite.tag_len()
        };
        // Refuse before accepting, so the center can resend the same command.
        if out.len() < reply_len {
            return Err(Error::BufferTooSmall);
        }
        self.state.highest_counter = cmd.counter;
        self.advance(now.max(cmd.header.t));
        self.dirty = true;
        if promote {
            // The center proved it holds the new seed: as good as its RECEIPT.
            self.commit_pending()?;
        }
        if cmd.opcode == Opcode::UPDATE_SEED {
            self.update_seed(out)
        } else {
            self.revoke(cmd.header.r, out)
        }
    }

    fn retransmit(&self, out: &mut [u8]) -> Result<usize> {
        self.ready()?;
        if self.state.pending.is_some() {
            return self.build_pending(out);
        }
        let a = self
            .state
            .awaiting
            .as_ref()
            .ok_or(Error::NothingToRetransmit)?;
        let msg = a.message();
        let dst = out.get_mut(..msg.len()).ok_or(Error::BufferTooSmall)?;
        dst.copy_from_slice(msg);
        Ok(msg.len())
    }

    fn days_left(&self, now: u32) -> Result<u32> {
        self.ready()?;
        if !self.state.has_seed {
            return Err(Error::NotEnrolled);
        }
        let t = i64::from(now.max(self.state.node_time));
        let left = self.state.seed.valid_until().saturating_sub(t).max(0) / time::DAY;
        Ok(u32::try_from(left).unwrap_or(u32::MAX))
    }

    fn tamper(&mut self) {
        self.state.wipe_keys();
        self.state.life = Life::Tampered;
        self.dirty = true;
    }
}

impl<E> fmt::Debug for SoftChip<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = &self.state;
        f.debug_struct("SoftChip")
            .field("life", &st.life)
            .field("device", &st.device)
            .field("epoch", &st.epoch)
            .field("suite", &st.suite)
            .field("class", &st.class)
            .field("generation", &st.has_seed.then_some(st.generation))
            .field(
                "pending_generation",
                &st.pending.as_ref().map(|p| p.generation),
            )
            .field("node_time", &st.node_time)
            .field("highest_counter", &st.highest_counter)
            .field("audiences", &st.audience_count)
            .field("keys", &"<redacted>")
            .field("dirty", &self.dirty)
            .finish()
    }
}
