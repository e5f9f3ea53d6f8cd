//! [`Node`]: the protocol logic of a chip, generic over where its record
//! is stored ([`ChipStorage`]). AUTH, AUTH_RESPONSE, SIGNATURE and SEALED
//! are made here; ENROLL, RECEIPT and COMMAND handling are in
//! `exchanges.rs`.

use core::fmt;

use microcert_core::{
    Audience, CHALLENGE_LEN, DataDigest, Header, Key128, csk, make_auth, make_auth_response,
    make_signature, seal_in_place, time,
};

use crate::chip::{Answered, Life, Personalization, SecureChip, Status};
use crate::error::from_make;
use crate::scrub::scrub_stack;
use crate::seedgen::Rng;
use crate::storage::{AWAIT_MAX, Awaiting, CLASS1_MAX_SEALED, ChipStorage, NodeRecord};
use crate::{Error, Result};

/// A secure chip: the protocol logic over a [`ChipStorage`].
///
/// It implements [`SecureChip`]; the storage only keeps the record, draws
/// random bytes and is told when the record changed (see the persistence
/// contract on [`ChipStorage`]). [`crate::SoftChip`] is a `Node` over
/// [`crate::SoftStorage`].
pub struct Node<S> {
    pub(crate) store: S,
    /// The SP 800-90A DRBG every random byte comes from (RAM only).
    pub(crate) rng: Rng,
}

impl<S: ChipStorage> Node<S> {
    /// The node over `store` (a blank record for a new chip, or one loaded
    /// from the element's non-volatile memory).
    pub fn from_storage(store: S) -> Self {
        Node {
            store,
            rng: Rng::default(),
        }
    }

    /// The storage, to save its record.
    pub fn storage(&self) -> &S {
        &self.store
    }

    /// The storage, mutably (to mark a saved record persisted, say).
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Gives the storage back.
    pub fn into_storage(self) -> S {
        self.store
    }

    #[inline(always)]
    pub(crate) fn st(&self) -> &NodeRecord {
        self.store.record()
    }

    #[inline(always)]
    pub(crate) fn st_mut(&mut self) -> &mut NodeRecord {
        self.store.parts().0
    }

    #[inline(always)]
    pub(crate) fn changed(&mut self) {
        self.store.mark_changed();
    }

    pub(crate) fn ready(&self) -> Result<()> {
        match self.st().life {
            Life::Personalized => Ok(()),
            Life::Blank => Err(Error::NotPersonalized),
            Life::Revoked => Err(Error::Revoked),
            Life::Tampered => Err(Error::Tampered),
        }
    }

    /// The later of `now` and the node time, which becomes the node time.
    pub(crate) fn advance(&mut self, now: u32) -> u32 {
        if now > self.st().node_time {
            self.st_mut().node_time = now;
            self.changed();
        }
        self.st().node_time
    }

    /// A fresh r: the persisted counter, bumped, || 32 random bits.
    pub(crate) fn next_r(&mut self) -> Result<u64> {
        let counter = self
            .st()
            .r_counter
            .checked_add(1)
            .ok_or(Error::CounterExhausted)?;
        let mut random = [0u8; 4];
        let (record, entropy) = self.store.parts();
        self.rng
            .fill(entropy, record.device, record.epoch, &mut random, false)?;
        record.r_counter = counter;
        self.changed();
        Ok((u64::from(counter) << 32) | u64::from(u32::from_be_bytes(random)))
    }

    /// Checks that the seed in use serves time `t`.
    pub(crate) fn seed_serves(&self, t: u32) -> Result<()> {
        if !self.st().has_seed {
            return Err(Error::NotEnrolled);
        }
        csk::year_index(self.st().seed.base_year(), t)
            .map(|_| ())
            .map_err(from_make)
    }

    pub(crate) fn header(&self, generation: u8, t: u32, r: u64) -> Header {
        Header {
            suite: self.st().suite,
            device: self.st().device,
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
        Ok(self.header(self.st().generation, t, r))
    }

    pub(crate) fn check_audience(&self, aud: &Audience) -> Result<()> {
        if aud.is_center() || self.st().configured().contains(aud) {
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
            self.st_mut().awaiting = Some(a);
            self.changed();
        }
    }

    /// Out of line so `scrub_stack` can wipe the copy of Ktr it makes.
    #[inline(never)]
    fn personalize_inner(&mut self, p: &Personalization) -> Result<()> {
        let st = self.st();
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
        self.st_mut().wipe_keys();
        let st = self.st_mut();
        st.ktr = Key128::from_bytes(*p.transport_key.expose());
        st.device = p.device;
        st.epoch = p.epoch;
        st.suite = p.suite;
        st.class = p.class;
        st.life = Life::Personalized;
        self.advance(p.issued);
        self.changed();
        Ok(())
    }

    pub(crate) fn check_origin(&self, header: &Header) -> Result<()> {
        if header.suite != self.st().suite {
            return Err(Error::WrongSuite);
        }
        if header.device != self.st().device {
            return Err(Error::WrongDevice);
        }
        Ok(())
    }
}

impl<S: ChipStorage> SecureChip for Node<S> {
    fn personalize(&mut self, p: &Personalization) -> Result<()> {
        let result = self.personalize_inner(p);
        scrub_stack();
        result
    }

    fn status(&self) -> Status {
        let st = self.st();
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
        match self.st().life {
            Life::Tampered => return Err(Error::Tampered),
            Life::Revoked => return Err(Error::Revoked),
            Life::Blank | Life::Personalized => {}
        }
        let aud = Audience::relying_party(name);
        if aud.is_center() {
            return Err(Error::CenterAudience);
        }
        if self.st().configured().contains(&aud) {
            return Ok(aud);
        }
        let st = self.st_mut();
        let i = usize::from(st.audience_count);
        let slot = st.audiences.get_mut(i).ok_or(Error::AudienceTableFull)?;
        *slot = aud;
        st.audience_count = st.audience_count.saturating_add(1);
        self.changed();
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
        let n = make_auth(&self.st().seed, &header, aud, out).map_err(from_make)?;
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
        let n = make_auth_response(&self.st().seed, &header, challenge, &Audience::CENTER, out)
            .map_err(from_make)?;
        self.remember(out.get(..n).unwrap_or(&[]));
        Ok(n)
    }

    fn sign(&mut self, now: u32, digest: DataDigest, out: &mut [u8]) -> Result<usize> {
        let header = self.fresh_header(now)?;
        make_signature(&self.st().seed, &header, &digest.finish(), out).map_err(from_make)
    }

    fn seal(&mut self, now: u32, aud: &Audience, buf: &mut [u8], len: usize) -> Result<usize> {
        self.ready()?;
        if aud.is_center() {
            return Err(Error::CenterAudience);
        }
        self.check_audience(aud)?;
        let limit = if self.st().class == 1 {
            CLASS1_MAX_SEALED
        } else {
            microcert_core::MAX_SEALED_PLAINTEXT
        };
        if len > limit {
            return Err(Error::PlaintextTooLong);
        }
        let header = self.fresh_header(now)?;
        seal_in_place(&self.st().seed, &header, aud, buf, len).map_err(from_make)
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
        if !self.st().has_seed {
            return Err(Error::NotEnrolled);
        }
        let t = i64::from(now.max(self.st().node_time));
        let left = self.st().seed.valid_until().saturating_sub(t).max(0) / time::DAY;
        Ok(u32::try_from(left).unwrap_or(u32::MAX))
    }

    fn tamper(&mut self) {
        self.rng.clear();
        let st = self.st_mut();
        st.wipe_keys();
        st.life = Life::Tampered;
        self.changed();
    }
}

/// Identifiers and flags only: the keys print as `<redacted>`.
pub(crate) fn debug_record<'a, 'b>(
    name: &str,
    st: &NodeRecord,
    f: &'a mut fmt::Formatter<'b>,
) -> fmt::DebugStruct<'a, 'b> {
    let mut d = f.debug_struct(name);
    d.field("life", &st.life)
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
        .field("keys", &"<redacted>");
    d
}

impl<S: ChipStorage> fmt::Debug for Node<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_record("Node", self.st(), f).finish()
    }
}
