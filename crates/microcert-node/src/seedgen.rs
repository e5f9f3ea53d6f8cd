//! The chip's random generator and seed generator.
//!
//! Every random byte the node uses (the random half of each r, a seed's
//! generator input) is output of the SP 800-90A HMAC_DRBG of
//! `microcert_core::drbg` ([`Rng`]). It is instantiated from the chip's
//! entropy source (the storage's [`crate::ChipStorage::Rng`]: 32 bytes of
//! entropy input and a 16-byte nonce, the device id and epoch as
//! personalization string) at the first draw after power-up, after its
//! known-answer self-test passed. Its state lives in RAM only: it is never
//! written to the image, so a restored image cannot replay it, and a power
//! cycle instantiates it anew. A seed's generator input is generated with
//! prediction resistance (a reseed from the entropy source just before), so
//! it depends on fresh entropy and on the state from power-up together.
//!
//! A new seed is 976 bytes expanded from a 32-byte generator input drawn from
//! the DRBG: SP 800-108 counter-mode KDF with AES-128-CMAC (the core's
//! `kdf_ctr_cmac`) keyed by the first 16 bytes, with the other 16 in the
//! fixed input (a key derivation key from an approved DRBG, SP 800-133r2
//! section 6.3). A seed is never derived from an older seed: every
//! generation draws its own input.
//!
//! Why not keep all 976 output bytes: during an update the chip must keep the
//! old seed and be able to rebuild the identical ENROLL of the new one after
//! a power loss, so the new seed must be in non-volatile state. Keeping its
//! 32-byte generator input instead of its 976 bytes keeps the whole chip
//! state under 1.2 KiB; the center never runs this generator, it receives
//! the seed bytes in the ENROLL.

use microcert_core::drbg::{Drbg, DrbgError, EntropySource};
use microcert_core::{DeviceId, KeySeed, SEED_LEN, kdf_ctr_cmac};
use zeroize::Zeroize;

use crate::chip::Entropy;
use crate::{Error, Result};

/// The chip's entropy source as the DRBG's.
struct Source<'a, E>(&'a mut E);

impl<E: Entropy> EntropySource for Source<'_, E> {
    fn fill_entropy(&mut self, buf: &mut [u8]) -> core::result::Result<(), DrbgError> {
        self.0.fill(buf).map_err(|_| DrbgError::Entropy)
    }
}

/// The node's DRBG: not instantiated until the first draw after power-up.
/// Its working state zeroizes on drop and its `Debug` is redacted.
#[derive(Debug, Default)]
pub(crate) struct Rng(Option<Drbg>);

/// Personalization string prefix of the node's DRBG.
const PERSONALIZATION: &[u8] = b"MC-NODE-DRBG";

impl Rng {
    /// Fills `out` from the DRBG, instantiating it from `entropy` first if
    /// needed; with `prediction_resistance`, reseeds from `entropy` before.
    /// Any failure (entropy source, self-test) outputs nothing.
    pub(crate) fn fill<E: Entropy>(
        &mut self,
        entropy: &mut E,
        device: DeviceId,
        epoch: u8,
        out: &mut [u8],
        prediction_resistance: bool,
    ) -> Result<()> {
        let mut source = Source(entropy);
        let drbg = match &mut self.0 {
            Some(d) => d,
            empty => {
                let mut pers = [0u8; PERSONALIZATION.len() + 9];
                let (label, rest) = pers.split_at_mut(PERSONALIZATION.len());
                label.copy_from_slice(PERSONALIZATION);
                if let Some(dev) = rest.get_mut(..8) {
                    dev.copy_from_slice(&device.0);
                }
                if let Some(e) = rest.get_mut(8) {
                    *e = epoch;
                }
                let d = Drbg::instantiate(&mut source, &pers, false).map_err(from_drbg)?;
                empty.insert(d)
            }
        };
        drbg.generate(&mut source, out, prediction_resistance, &[])
            .map_err(from_drbg)
    }

    /// Uninstantiates the DRBG (tamper, revoke): the next draw instantiates
    /// a new one from the entropy source.
    pub(crate) fn clear(&mut self) {
        self.0 = None;
    }
}

fn from_drbg(e: DrbgError) -> Error {
    match e {
        DrbgError::SelfTest => Error::SelfTest,
        _ => Error::Entropy,
    }
}

/// Length of the fresh entropy a seed is generated from.
pub const SEED_INPUT_LEN: usize = 32;

/// KDF label of the seed generator (local to the node, not a protocol label).
const LABEL: &[u8] = b"MC-NODE-SEED";
/// Output length in bits, the KDF's L field.
const L_BITS: u32 = (SEED_LEN as u32) * 8;
const FIXED_LEN: usize = LABEL.len() + 1 + 16 + 4;

/// The 32-byte generator input of a seed; zeroized on drop.
pub(crate) struct SeedInput(pub(crate) [u8; SEED_INPUT_LEN]);

impl Drop for SeedInput {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Expands a generator input into the seed of `base_year`.
pub(crate) fn expand(input: &SeedInput, base_year: u16) -> Result<KeySeed> {
    let (key, nonce) = input.0.split_at(16);
    let key: &[u8; 16] = key.try_into().map_err(|_| Error::ImageInvalid)?;
    let mut fixed = [0u8; FIXED_LEN];
    let (label, rest) = fixed.split_at_mut(LABEL.len());
    label.copy_from_slice(LABEL);
    // rest = 0x00 || nonce(16) || L(4); rest[0] is already the 0x00 separator.
    if let Some(n) = rest.get_mut(1..17) {
        n.copy_from_slice(nonce);
    }
    if let Some(l) = rest.get_mut(17..) {
        l.copy_from_slice(&L_BITS.to_be_bytes());
    }
    let mut outcome = Ok(());
    let seed = KeySeed::generate(base_year, |buf| {
        outcome = kdf_ctr_cmac(key, &fixed, buf);
    });
    fixed.zeroize();
    outcome.map_err(Error::Core)?;
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_input_layout() {
        assert_eq!(FIXED_LEN, 12 + 1 + 16 + 4);
        assert_eq!(L_BITS, 7808);
    }

    #[test]
    fn different_inputs_give_different_seeds() {
        let a = expand(&SeedInput([1; 32]), 2026).unwrap();
        let b = expand(&SeedInput([2; 32]), 2026).unwrap();
        let mut c_in = [1; 32];
        c_in[31] = 9; // only the nonce half differs
        let c = expand(&SeedInput(c_in), 2026).unwrap();
        assert!(a != b);
        assert!(a != c);
        assert_eq!(a.base_year(), 2026);
        assert_ne!(a.expose(), &[0u8; SEED_LEN]);
    }
}
