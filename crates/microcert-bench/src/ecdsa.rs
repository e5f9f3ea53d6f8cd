//! The baseline: what an X.509 device certificate costs a server, a
//! device's ECDSA P-256 signature checked with `ring` (the fastest P-256
//! available to Rust; the pure-Rust `p256` crate is slower and would flatter
//! microcert).
//!
//! The key pair is generated once with ring's `SystemRandom` and the
//! signature made once; only verification is measured. Verification goes
//! through `UnparsedPublicKey`, so each call decodes and checks the public
//! point as a server holding the key from a certificate does. Certificate
//! parsing and chain validation are NOT included: the baseline is the
//! cheapest part of a certificate check, which again favours ECDSA.

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};

/// Length of the signed device message.
pub const MESSAGE_LEN: usize = 300;

/// Why the baseline could not be set up (ring reports no detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupError(&'static str);

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ECDSA baseline setup failed: {}", self.0)
    }
}

impl std::error::Error for SetupError {}

/// A device public key, a 300-byte message and its signature.
pub struct Baseline {
    public_key: UnparsedPublicKey<Vec<u8>>,
    message: [u8; MESSAGE_LEN],
    signature: Vec<u8>,
}

impl std::fmt::Debug for Baseline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Baseline")
            .field("message_len", &self.message.len())
            .field("signature_len", &self.signature.len())
            .finish_non_exhaustive()
    }
}

impl Baseline {
    /// Generates a key pair and signs a fixed 300-byte message.
    pub fn new() -> Result<Self, SetupError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| SetupError("key generation"))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| SetupError("key import"))?;
        let message = crate::fixtures::pattern::<MESSAGE_LEN>(29, 17);
        let signature = pair
            .sign(&rng, &message)
            .map_err(|_| SetupError("signing"))?
            .as_ref()
            .to_vec();
        let public_key =
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, pair.public_key().as_ref().to_vec());
        Ok(Baseline {
            public_key,
            message,
            signature,
        })
    }

    /// Verifies the signature over the message: the measured operation.
    pub fn verify(&self) -> bool {
        self.public_key
            .verify(&self.message, &self.signature)
            .is_ok()
    }

    /// Verifies the signature over another message (for the tests).
    pub fn verify_message(&self, message: &[u8]) -> bool {
        self.public_key.verify(message, &self.signature).is_ok()
    }

    /// The signature's length (DER, 70 to 72 bytes).
    pub fn signature_len(&self) -> usize {
        self.signature.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_its_own_signature_only() {
        let b = Baseline::new().unwrap();
        assert!(b.verify());
        let mut other = b.message;
        other[123] ^= 1;
        assert!(!b.verify_message(&other));
        assert!((68..=72).contains(&b.signature_len()));
    }
}
