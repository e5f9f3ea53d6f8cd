//! The secure chip's interface: what a node's application may ask of it.
//!
//! Nothing here hands out the seed, Ktr or a derived key. The application
//! asks the chip to make or check messages, and the chip decides with its own
//! state (device id, epoch, suite, seed and generation, command counter, node
//! time, the message it waits an answer for).

use microcert_core::{Audience, CHALLENGE_LEN, DataDigest, DeviceId, Key128, Suite};

use crate::Result;

/// The fields of one line of the factory personalization file
/// (PROTOCOL.md section 9), already parsed: the chip reads no JSON.
#[derive(Debug)]
pub struct Personalization {
    /// The chip's EUI-64.
    pub device: DeviceId,
    /// The personalization count: 0 at manufacture, +1 for each later one.
    pub epoch: u8,
    /// The device's suite; the chip refuses every other.
    pub suite: Suite,
    /// Ktr(device, epoch), the transport key that protects the first ENROLL.
    pub transport_key: Key128,
    /// The device class (RFC 7228); class 1 bounds SEALED plaintexts to
    /// [`crate::CLASS1_MAX_SEALED`] bytes.
    pub class: u8,
    /// Time of provisioning (Unix seconds): a node without a real-time clock
    /// starts its time here.
    pub issued: u32,
}

/// Where the chip is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    /// Never personalized.
    Blank,
    /// Personalized; may or may not hold a seed yet.
    Personalized,
    /// Revoked by a COMMAND: keys wiped; only a re-personalization with the
    /// next epoch brings it back.
    Revoked,
    /// Tamper flag set: keys wiped, refuses everything for good.
    Tampered,
}

/// What the chip shows about itself: identifiers and flags, no key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Life-cycle position of the chip.
    pub life: Life,
    /// The device id (all zero while blank).
    pub device: DeviceId,
    /// The personalization epoch.
    pub epoch: u8,
    /// The chip's suite.
    pub suite: Suite,
    /// The generation of the seed in use, if the chip holds one.
    pub generation: Option<u8>,
    /// The generation of an ENROLL still waiting for the center's RECEIPT.
    pub pending_generation: Option<u8>,
    /// The node's time: only moves forward.
    pub node_time: u32,
    /// The highest COMMAND counter accepted so far (0 = none).
    pub highest_counter: u32,
}

/// Which of the chip's messages an accepted RECEIPT answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// The ENROLL of this generation: the new seed is now in use and the
    /// previous one (if any) is wiped.
    Enrollment {
        /// The generation now in use.
        generation: u8,
    },
    /// An AUTH or AUTH_RESPONSE to the center: the center holds the seed
    /// (mutual authentication).
    Authentication,
}

/// A source of random bytes for the chip (a TRNG on a device, the OS on a
/// host, a fixed sequence in tests).
pub trait Entropy {
    /// Fills `buf` with random bytes, or reports that it cannot.
    fn fill(&mut self, buf: &mut [u8]) -> core::result::Result<(), EntropyFailure>;
}

/// The entropy source could not deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntropyFailure;

impl<F> Entropy for F
where
    F: FnMut(&mut [u8]) -> core::result::Result<(), EntropyFailure>,
{
    fn fill(&mut self, buf: &mut [u8]) -> core::result::Result<(), EntropyFailure> {
        self(buf)
    }
}

/// The secure chip of a sensor node.
///
/// `now` arguments are the device's real-time clock in Unix seconds, or 0
/// for a device without one: the chip uses the later of `now` and its own
/// node time, which moves forward only (also from accepted RECEIPTs and
/// COMMANDs). Every method that returns `Ok` may have changed the chip's
/// persistent state; a software chip says so through its dirty flag.
pub trait SecureChip {
    /// Writes the personalization of a factory line into the chip. A blank
    /// chip accepts any epoch; a personalized one only `epoch + 1` of its
    /// own device, after it was revoked or while it holds no seed.
    fn personalize(&mut self, p: &Personalization) -> Result<()>;

    /// Identifiers and flags; never key material.
    fn status(&self) -> Status;

    /// Adds a relying party by its exact UTF-8 name and returns its
    /// audience; adding a configured name again returns the same audience.
    fn add_audience(&mut self, name: &str) -> Result<Audience>;

    /// Makes the ENROLL that carries a fresh seed (base year = the node's
    /// current year) under Ktr: generation 0 for the first seed, the last
    /// generation + 1 when the previous seed has expired. While an ENROLL
    /// waits for its RECEIPT, returns the identical bytes again.
    ///
    /// It never makes an ENROLL under Kupd: a seed update is only ever the
    /// answer to the center's UPDATE_SEED ([`SecureChip::handle_command`]),
    /// and the center refuses an update ENROLL it did not ask for
    /// (PROTOCOL.md v1.1 section 6).
    fn enroll(&mut self, now: u32, out: &mut [u8]) -> Result<usize>;

    /// Makes an AUTH for the center ([`Audience::CENTER`]) or a configured
    /// relying party. An AUTH for the center waits for its RECEIPT.
    fn auth(&mut self, now: u32, aud: &Audience, out: &mut [u8]) -> Result<usize>;

    /// Makes an AUTH_RESPONSE to a challenge of the center; it waits for its
    /// RECEIPT.
    fn auth_response(
        &mut self,
        now: u32,
        challenge: &[u8; CHALLENGE_LEN],
        out: &mut [u8],
    ) -> Result<usize>;

    /// Makes a SIGNATURE over data the caller fed into `digest` in pieces.
    fn sign(&mut self, now: u32, digest: DataDigest, out: &mut [u8]) -> Result<usize>;

    /// Makes a SEALED message for a configured relying party in place: the
    /// caller puts `len` bytes of plaintext at
    /// `buf[HEADER_LEN..]`; the chip writes the header before it, encrypts
    /// it in place and appends the tag. Returns the message length.
    fn seal(&mut self, now: u32, aud: &Audience, buf: &mut [u8], len: usize) -> Result<usize>;

    /// Checks a RECEIPT from the center: accepted once, and only when it
    /// answers the chip's own unanswered ENROLL, AUTH or AUTH_RESPONSE.
    fn accept_receipt(&mut self, receipt: &[u8]) -> Result<Answered>;

    /// Verifies and carries out a COMMAND; writes the reply into `out` (an
    /// ENROLL for UPDATE_SEED, a RECEIPT for REVOKE) and returns its length.
    fn handle_command(&mut self, now: u32, command: &[u8], out: &mut [u8]) -> Result<usize>;

    /// The identical bytes of the message still waiting for a RECEIPT
    /// (a pending ENROLL first, else the last AUTH or AUTH_RESPONSE to the
    /// center).
    fn retransmit(&self, out: &mut [u8]) -> Result<usize>;

    /// Whole days left before the seed in use stops serving (0 once it has).
    fn days_left(&self, now: u32) -> Result<u32>;

    /// Sets the tamper flag: every key is wiped and the chip refuses
    /// everything from now on.
    fn tamper(&mut self);
}
