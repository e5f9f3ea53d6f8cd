//! `SoftChip`: the secure chip in software, with its state in memory and a
//! fixed-size byte image the caller stores in non-volatile memory.

use core::fmt;

use microcert_core::{
    Audience, CHALLENGE_LEN, DataDigest, DeviceId, HEADER_LEN, Header, Key128, KeySeed, SEED_LEN,
    Suite, csk, make_auth, make_auth_response, make_signature, seal_in_place, time,
};

use crate::chip::{Answered, Entropy, Life, Personalization, SecureChip, Status};
use crate::error::from_make;
use crate::scrub::scrub_stack;
use crate::seedgen::SeedInput;
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

    pub(crate) fn header(&self) -> Option<Header> {
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
    pub(crate) fn wipe_keys(&mut self) {
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
    pub(crate) entropy: E,
    pub(crate) dirty: bool,
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

    pub(crate) fn ready(&self) -> Result<()> {
        match self.state.life {
            Life::Personalized => Ok(()),
            Life::Blank => Err(Error::NotPersonalized),
            Life::Revoked => Err(Error::Revoked),
            Life::Tampered => Err(Error::Tampered),
        }
    }

    /// The later of `now` and the node time, which becomes the node time.
    pub(crate) fn advance(&mut self, now: u32) -> u32 {
        if now > self.state.node_time {
            self.state.node_time = now;
            self.dirty = true;
        }
        self.state.node_time
    }

    /// A fresh r: the persisted counter, bumped, || 32 random bits.
    pub(crate) fn next_r(&mut self) -> Result<u64> {
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
    pub(crate) fn seed_serves(&self, t: u32) -> Result<()> {
        if !self.state.has_seed {
            return Err(Error::NotEnrolled);
        }
        csk::year_index(self.state.seed.base_year(), t)
            .map(|_| ())
            .map_err(from_make)
    }

    pub(crate) fn header(&self, generation: u8, t: u32, r: u64) -> Header {
        Header {
            suite: self.state.suite,
            device: self.state.device,
            generation,
            t,
            r,
        }
    }

    /// Time and r for a message under the seed in use.
    pub(crate) fn fresh_header(&mut self, now: u32) -> Result<Header> {
        self.ready()?;
        let t = self.advance(now);
        self.seed_serves(t)?;
        let r = self.next_r()?;
        Ok(self.header(self.state.generation, t, r))
    }

    pub(crate) fn check_audience(&self, aud: &Audience) -> Result<()> {
        if aud.is_center() || self.state.configured().contains(aud) {
            Ok(())
        } else {
            Err(Error::UnknownAudience)
        }
    }

    pub(crate) fn remember(&mut self, msg: &[u8]) {
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

    /// Out of line so `scrub_stack` can wipe the copy of Ktr it makes.
    #[inline(never)]
    fn personalize_inner(&mut self, p: &Personalization) -> Result<()> {
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

    pub(crate) fn check_origin(&self, header: &Header) -> Result<()> {
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
        let result = self.personalize_inner(p);
        scrub_stack();
        result
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
        let result = self.enroll_inner(now, out);
        scrub_stack();
        result
    }

    fn auth(&mut self, now: u32, aud: &Audience, out: &mut [u8]) -> Result<usize> {
        self.ready()?;
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
        self.ready()?;
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
        let result = self.accept_receipt_inner(receipt);
        scrub_stack();
        result
    }

    fn handle_command(&mut self, now: u32, command: &[u8], out: &mut [u8]) -> Result<usize> {
        let result = self.handle_command_inner(now, command, out);
        scrub_stack();
        result
    }

    fn retransmit(&self, out: &mut [u8]) -> Result<usize> {
        let result = self.retransmit_inner(out);
        scrub_stack();
        result
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
