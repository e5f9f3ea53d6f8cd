//! The chip's seed generator.
//!
//! A new seed is 976 bytes of output of a deterministic random bit generator
//! instantiated with 32 fresh bytes from the entropy source: SP 800-108
//! counter-mode KDF with AES-128-CMAC (the core's `kdf_ctr_cmac`) keyed by
//! the first 16 bytes, with the other 16 in the fixed input. A seed is never
//! derived from an older seed: every generation draws its own entropy.
//!
//! Why not keep all 976 output bytes: during an update the chip must keep the
//! old seed and be able to rebuild the identical ENROLL of the new one after
//! a power loss, so the new seed must be in non-volatile state. Keeping its
//! 32-byte generator input instead of its 976 bytes keeps the whole chip
//! state under 1.2 KiB; the center never runs this generator, it receives
//! the seed bytes in the ENROLL.

use microcert_core::{KeySeed, SEED_LEN, kdf_ctr_cmac};
use zeroize::Zeroize;

use crate::{Error, Result};

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
