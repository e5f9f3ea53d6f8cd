//! HMAC_DRBG with SHA-256 (NIST SP 800-90A Rev. 1, section 10.1.2), the
//! system's only deterministic random bit generator. `no_std`, no allocator.
//!
//! Two layers, as in the standard:
//!
//! - [`HmacDrbgState`], the DRBG *mechanism* (10.1.2.2 to 10.1.2.5):
//!   `instantiate`, `reseed`, `generate` and `uninstantiate` over caller-given
//!   entropy input. It is what the NIST CAVP vectors exercise
//!   (`tests/cavp_hmac_drbg.rs`).
//! - [`Drbg`], the DRBG *functions* (section 9) around it: the entropy input
//!   and nonce are drawn from an [`EntropySource`] (the chip's TRNG, the
//!   operating system), prediction resistance on request (9.3.1: reseed from
//!   the source before generating), a reseed counter limit (automatic reseed
//!   once the counter passes the reseed interval), bounds on request and
//!   input lengths, and the health tests of section 11.3.
//!
//! Parameters (SP 800-90A table 2, SHA-256): security strength 256 bits;
//! entropy input 256 bits and nonce 128 bits from the source (8.6.7: a
//! random nonce of at least half the security strength); at most
//! [`MAX_REQUEST_LEN`] bytes per request (2^16 bytes <= 2^19 bits); inputs
//! (personalization string, additional input) at most [`MAX_INPUT_LEN`]
//! bytes; reseed interval [`DEFAULT_RESEED_INTERVAL`] requests by default,
//! never more than [`MAX_RESEED_INTERVAL`] (2^48).
//!
//! Health tests (11.3): [`self_test`] is a known-answer test of instantiate,
//! reseed and generate against one NIST CAVP vector (HMAC_DRBG.rsp,
//! drbgvectors_pr_false, SHA-256, COUNT 0 of the section with 256-bit
//! additional input), run by [`Drbg::instantiate`] before every
//! instantiation: a failure refuses the instantiation
//! ([`DrbgError::SelfTest`]) and nothing is generated. Error handling (11.3,
//! 11.4): an entropy source failure leaves no output and, during a reseed,
//! puts the DRBG in an error state in which it refuses to generate until it
//! is reseeded successfully; a request over the limits changes nothing.
//! Uninstantiate (11.3.5): the state zeroizes on drop and
//! [`HmacDrbgState::uninstantiate`] zeroizes it in place; `Debug` prints
//! only the reseed counter.

use core::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Security strength in bits.
pub const SECURITY_STRENGTH: u32 = 256;
/// Bytes of entropy input drawn for an instantiation or a reseed.
pub const ENTROPY_LEN: usize = 32;
/// Bytes of nonce drawn for an instantiation.
pub const NONCE_LEN: usize = 16;
/// Most bytes one generate request may return (2^16 bytes; the standard's
/// limit for HMAC_DRBG is 2^19 bits).
pub const MAX_REQUEST_LEN: usize = 1 << 16;
/// Longest personalization string or additional input accepted, in bytes.
pub const MAX_INPUT_LEN: usize = 1 << 16;
/// The standard's largest reseed interval (2^48 requests).
pub const MAX_RESEED_INTERVAL: u64 = 1 << 48;
/// Requests between reseeds unless the caller chooses fewer or more.
pub const DEFAULT_RESEED_INTERVAL: u64 = 1 << 16;

const OUT_LEN: usize = 32;
const BLOCK_LEN: usize = 64;

/// Why the DRBG refused a request. Nothing was output when it is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrbgError {
    /// The entropy source failed to deliver.
    Entropy,
    /// More than [`MAX_REQUEST_LEN`] bytes were requested.
    RequestTooLong,
    /// A personalization string or additional input is longer than
    /// [`MAX_INPUT_LEN`].
    InputTooLong,
    /// The mechanism's reseed counter passed the reseed interval (10.1.2.5
    /// step 1): reseed before generating.
    ReseedRequired,
    /// The known-answer self-test failed: the DRBG must not be used.
    SelfTest,
    /// A reseed interval of 0 or above [`MAX_RESEED_INTERVAL`].
    ReseedInterval,
    /// A reseed from the entropy source failed earlier: the DRBG outputs
    /// nothing until a reseed succeeds.
    ErrorState,
}

impl fmt::Display for DrbgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DrbgError::Entropy => "DRBG: the entropy source failed",
            DrbgError::RequestTooLong => "DRBG: request longer than the maximum",
            DrbgError::InputTooLong => "DRBG: input longer than the maximum",
            DrbgError::ReseedRequired => "DRBG: reseed required",
            DrbgError::SelfTest => "DRBG: known-answer self-test failed",
            DrbgError::ReseedInterval => "DRBG: reseed interval out of range",
            DrbgError::ErrorState => "DRBG: in error state after a failed reseed",
        })
    }
}

/// A source of entropy input: a TRNG, the operating system's generator.
pub trait EntropySource {
    /// Fills `buf` with full-entropy bytes, or fails without a partial result
    /// being used.
    fn fill_entropy(&mut self, buf: &mut [u8]) -> Result<(), DrbgError>;
}

impl<F> EntropySource for F
where
    F: FnMut(&mut [u8]) -> Result<(), DrbgError>,
{
    fn fill_entropy(&mut self, buf: &mut [u8]) -> Result<(), DrbgError> {
        self(buf)
    }
}

/// The HMAC_DRBG working state (Key, V, reseed_counter) and the mechanism
/// functions of SP 800-90A 10.1.2. Zeroizes on drop; `Debug` is redacted.
pub struct HmacDrbgState {
    key: [u8; OUT_LEN],
    v: [u8; OUT_LEN],
    reseed_counter: u64,
}

fn hmac(key: &[u8; OUT_LEN], parts: &[&[u8]]) -> [u8; OUT_LEN] {
    // A key shorter than the block is zero-padded by HMAC itself (FIPS 198-1
    // step 3), so the padded block is the same key.
    let mut block = [0u8; BLOCK_LEN];
    if let Some(head) = block.get_mut(..OUT_LEN) {
        head.copy_from_slice(key);
    }
    let mut mac = <Hmac<Sha256> as KeyInit>::new(&block.into());
    block.zeroize();
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

impl HmacDrbgState {
    /// HMAC_DRBG_Update (10.1.2.2) over the concatenation of `provided`
    /// (at most three pieces).
    fn update(&mut self, provided: &[&[u8]; 3]) {
        let empty = provided.iter().all(|p| p.is_empty());
        for round in [0x00u8, 0x01] {
            if round == 0x01 && empty {
                return;
            }
            let mut k = hmac(
                &self.key,
                &[&self.v, &[round], provided[0], provided[1], provided[2]],
            );
            self.key.copy_from_slice(&k);
            k.zeroize();
            self.v = hmac(&self.key, &[&self.v]);
        }
    }

    /// HMAC_DRBG_Instantiate_algorithm (10.1.2.3):
    /// seed_material = entropy_input || nonce || personalization_string.
    pub fn instantiate(entropy_input: &[u8], nonce: &[u8], personalization: &[u8]) -> Self {
        let mut s = HmacDrbgState {
            key: [0x00; OUT_LEN],
            v: [0x01; OUT_LEN],
            reseed_counter: 1,
        };
        s.update(&[entropy_input, nonce, personalization]);
        s
    }

    /// HMAC_DRBG_Reseed_algorithm (10.1.2.4):
    /// seed_material = entropy_input || additional_input.
    pub fn reseed(&mut self, entropy_input: &[u8], additional_input: &[u8]) {
        self.update(&[entropy_input, additional_input, &[]]);
        self.reseed_counter = 1;
    }

    /// HMAC_DRBG_Generate_algorithm (10.1.2.5): fills `out` (any length)
    /// unless the reseed counter is above `reseed_interval`.
    pub fn generate(
        &mut self,
        out: &mut [u8],
        additional_input: &[u8],
        reseed_interval: u64,
    ) -> Result<(), DrbgError> {
        if self.reseed_counter > reseed_interval {
            return Err(DrbgError::ReseedRequired);
        }
        if !additional_input.is_empty() {
            self.update(&[additional_input, &[], &[]]);
        }
        for chunk in out.chunks_mut(OUT_LEN) {
            self.v = hmac(&self.key, &[&self.v]);
            if let Some(src) = self.v.get(..chunk.len()) {
                chunk.copy_from_slice(src);
            }
        }
        self.update(&[additional_input, &[], &[]]);
        self.reseed_counter = self.reseed_counter.saturating_add(1);
        Ok(())
    }

    /// The number of generate requests since the last (re)seeding, plus one.
    pub fn reseed_counter(&self) -> u64 {
        self.reseed_counter
    }

    /// Uninstantiate (9.4): zeroizes the working state in place.
    pub fn uninstantiate(&mut self) {
        self.key.zeroize();
        self.v.zeroize();
        self.reseed_counter = 0;
    }

    /// True when Key and V are all zero (after [`Self::uninstantiate`]); for
    /// the uninstantiate health test.
    pub fn is_zeroized(&self) -> bool {
        self.key.iter().chain(self.v.iter()).all(|b| *b == 0)
    }
}

impl Drop for HmacDrbgState {
    fn drop(&mut self) {
        self.uninstantiate();
    }
}

impl ZeroizeOnDrop for HmacDrbgState {}

impl fmt::Debug for HmacDrbgState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HmacDrbgState")
            .field("key", &"<redacted>")
            .field("v", &"<redacted>")
            .field("reseed_counter", &self.reseed_counter)
            .finish()
    }
}

// Known-answer test: NIST CAVP drbgvectors_pr_false/HMAC_DRBG.rsp, [SHA-256]
// [PredictionResistance = False] [EntropyInputLen = 256] [NonceLen = 128]
// [PersonalizationStringLen = 0] [AdditionalInputLen = 256]
// [ReturnedBitsLen = 1024], COUNT = 0 (also in testdata/).
const KAT_ENTROPY: [u8; 32] =
    hex32(b"05ac9fc4c62a02e3f90840da5616218c6de5743d66b8e0fbf833759c5928b53d");
const KAT_NONCE: [u8; 16] = hex16(b"2b89a17904922ed8f017a63044848545");
const KAT_ENTROPY_RESEED: [u8; 32] =
    hex32(b"2791126b8b52ee1fd9392a0a13e0083bed4186dc649b739607ac70ec8dcecf9b");
const KAT_ADDITIONAL_RESEED: [u8; 32] =
    hex32(b"43bac13bae715092cf7eb280a2e10a962faf7233c41412f69bc74a35a584e54c");
const KAT_ADDITIONAL_1: [u8; 32] =
    hex32(b"3f2fed4b68d506ecefa21f3f5bb907beb0f17dbc30f6ffbba5e5861408c53a1e");
const KAT_ADDITIONAL_2: [u8; 32] =
    hex32(b"529030df50f410985fde068df82b935ec23d839cb4b269414c0ede6cffea5b68");
const KAT_RETURNED: [u8; 128] = hex128(b"02ddff5173da2fcffa10215b030d660d61179e61ecc22609b1151a75f1cbcbb4363c3a89299b4b63aca5e581e73c860491010aa35de3337cc6c09ebec8c91a6287586f3a74d9694b462d2720ea2e11bbd02af33adefb4a16e6b370fa0effd57d607547bdcfbb7831f54de7073ad2a7da987a0016a82fa958779a168674b56524");

const fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => 0xff,
    }
}

const fn hex<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N && 2 * i + 1 < s.len() {
        out[i] = (nibble(s[2 * i]) << 4) | nibble(s[2 * i + 1]);
        i += 1;
    }
    out
}

const fn hex16(s: &[u8]) -> [u8; 16] {
    hex::<16>(s)
}

const fn hex32(s: &[u8]) -> [u8; 32] {
    hex::<32>(s)
}

const fn hex128(s: &[u8]) -> [u8; 128] {
    hex::<128>(s)
}

/// Runs the known-answer test against `expected` (the CAVP ReturnedBits).
fn known_answer(expected: &[u8; 128]) -> Result<(), DrbgError> {
    let mut s = HmacDrbgState::instantiate(&KAT_ENTROPY, &KAT_NONCE, &[]);
    s.reseed(&KAT_ENTROPY_RESEED, &KAT_ADDITIONAL_RESEED);
    let mut out = [0u8; 128];
    s.generate(&mut out, &KAT_ADDITIONAL_1, MAX_RESEED_INTERVAL)?;
    s.generate(&mut out, &KAT_ADDITIONAL_2, MAX_RESEED_INTERVAL)?;
    let ok = subtle::ConstantTimeEq::ct_eq(&out[..], &expected[..]);
    out.zeroize();
    s.uninstantiate();
    if !bool::from(ok) || !s.is_zeroized() {
        return Err(DrbgError::SelfTest);
    }
    Ok(())
}

/// The health test of SP 800-90A 11.3: a known-answer test of instantiate,
/// reseed and generate (one NIST CAVP vector) and of uninstantiate (the
/// state is all zero afterwards). [`Drbg::instantiate`] runs it every time.
pub fn self_test() -> Result<(), DrbgError> {
    known_answer(&KAT_RETURNED)
}

/// An instantiated HMAC_DRBG (SHA-256, 256-bit security strength) with its
/// reseed policy: the DRBG functions of SP 800-90A section 9.
///
/// It holds no entropy source: each call that may need fresh entropy takes
/// the source as an argument, so a chip can keep the source in its storage.
pub struct Drbg {
    state: HmacDrbgState,
    reseed_interval: u64,
    prediction_resistance: bool,
    failed: bool,
}

impl fmt::Debug for Drbg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drbg")
            .field("state", &self.state)
            .field("reseed_interval", &self.reseed_interval)
            .field("prediction_resistance", &self.prediction_resistance)
            .field("failed", &self.failed)
            .finish()
    }
}

fn check_input(input: &[u8]) -> Result<(), DrbgError> {
    if input.len() > MAX_INPUT_LEN {
        return Err(DrbgError::InputTooLong);
    }
    Ok(())
}

impl Drbg {
    /// Instantiate (9.1): runs [`self_test`], then draws
    /// [`ENTROPY_LEN`] + [`NONCE_LEN`] bytes from `source` and instantiates
    /// with `personalization`. `prediction_resistance` makes every generate
    /// request reseed from the source first.
    pub fn instantiate(
        source: &mut impl EntropySource,
        personalization: &[u8],
        prediction_resistance: bool,
    ) -> Result<Self, DrbgError> {
        check_input(personalization)?;
        self_test()?;
        let mut input = [0u8; ENTROPY_LEN + NONCE_LEN];
        let drawn = source.fill_entropy(&mut input);
        if let Err(e) = drawn {
            input.zeroize();
            return Err(e);
        }
        let (entropy, nonce) = input.split_at(ENTROPY_LEN);
        let state = HmacDrbgState::instantiate(entropy, nonce, personalization);
        input.zeroize();
        Ok(Drbg {
            state,
            reseed_interval: DEFAULT_RESEED_INTERVAL,
            prediction_resistance,
            failed: false,
        })
    }

    /// Sets the reseed interval: after that many generate requests the next
    /// one reseeds from the source first. 1..=[`MAX_RESEED_INTERVAL`].
    pub fn set_reseed_interval(&mut self, requests: u64) -> Result<(), DrbgError> {
        if requests == 0 || requests > MAX_RESEED_INTERVAL {
            return Err(DrbgError::ReseedInterval);
        }
        self.reseed_interval = requests;
        Ok(())
    }

    /// Reseed (9.2): draws [`ENTROPY_LEN`] bytes from `source`. A source
    /// failure puts the DRBG in its error state (nothing is generated until
    /// a reseed succeeds).
    pub fn reseed(
        &mut self,
        source: &mut impl EntropySource,
        additional_input: &[u8],
    ) -> Result<(), DrbgError> {
        check_input(additional_input)?;
        let mut entropy = [0u8; ENTROPY_LEN];
        let drawn = source.fill_entropy(&mut entropy);
        if drawn.is_ok() {
            self.state.reseed(&entropy, additional_input);
        }
        entropy.zeroize();
        self.failed = drawn.is_err();
        drawn
    }

    /// Generate (9.3.1): fills `out` (at most [`MAX_REQUEST_LEN`] bytes).
    /// Reseeds from `source` first when prediction resistance is requested
    /// (here or at instantiation) or when the reseed counter passed the
    /// reseed interval. On an error `out` is left zeroed.
    pub fn generate(
        &mut self,
        source: &mut impl EntropySource,
        out: &mut [u8],
        prediction_resistance: bool,
        additional_input: &[u8],
    ) -> Result<(), DrbgError> {
        if out.len() > MAX_REQUEST_LEN {
            return Err(DrbgError::RequestTooLong);
        }
        check_input(additional_input)?;
        let result = self.generate_inner(source, out, (prediction_resistance, additional_input));
        if result.is_err() {
            out.zeroize();
        }
        result
    }

    /// [`Drbg::generate`] once its request was checked: (prediction
    /// resistance, additional input).
    fn generate_inner(
        &mut self,
        source: &mut impl EntropySource,
        out: &mut [u8],
        (prediction_resistance, additional_input): (bool, &[u8]),
    ) -> Result<(), DrbgError> {
        let mut additional = additional_input;
        if prediction_resistance || self.prediction_resistance || self.failed {
            // 9.3.1 step 7.1: the additional input goes into the reseed and
            // the generate gets none.
            self.reseed(source, additional)?;
            additional = &[];
        }
        match self.state.generate(out, additional, self.reseed_interval) {
            Err(DrbgError::ReseedRequired) => {
                self.reseed(source, additional)?;
                self.state.generate(out, &[], self.reseed_interval)
            }
            other => other,
        }
    }

    /// The reseed counter of the working state.
    pub fn reseed_counter(&self) -> u64 {
        self.state.reseed_counter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_test_passes_and_detects_a_wrong_answer() {
        assert_eq!(self_test(), Ok(()));
        let mut wrong = KAT_RETURNED;
        wrong[127] ^= 1;
        assert_eq!(known_answer(&wrong), Err(DrbgError::SelfTest));
    }
}
