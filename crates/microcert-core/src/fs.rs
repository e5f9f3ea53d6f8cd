//! Forward-secret seed update (protocol v1.2, docs/protocol.md section 6,
//! "Forward-secret update"): an ephemeral-ephemeral ECDH on P-256
//! (SP 800-56A rev. 3, C(2e, 0s) with the ECC CDH primitive), each public
//! key authenticated by a MAC under the current seed (the center's by the
//! COMMAND's Kcmd tag, the node's by the ENROLL's Kupd tag), and the key
//! that encrypts the new seed derived from the shared secret Z with the
//! SP 800-56C rev. 2 two-step KDF:
//!
//! ```text
//! salt = r(COMMAND) || r(ENROLL)                               16 bytes
//! Kdk  = AES-CMAC(salt, Z)                                     extraction
//! Kfs  = KDF(Kdk, "MC-FS-UPD", device || g || g+1 || Qc || Qn) expansion, SP 800-108, L = 128
//! ```
//!
//! The derivation, the messages and their MACs need no elliptic-curve
//! code and are always built; the key pairs and Z ([`EphemeralKey`]) are
//! behind the `forward-secret` cargo feature, so a Class 1 node built
//! without it carries no P-256 code.

use crate::kdf::{cmac_parts, derive_key};
use crate::msg::FS_PUBLIC_LEN;
use crate::secret::Key128;
use crate::wire::DeviceId;

/// The SP 800-108 label of Kfs.
pub const FS_LABEL: &[u8] = b"MC-FS-UPD";

/// Length of the expansion's Context: device, g, g + 1, Qc, Qn.
pub const FS_CONTEXT_LEN: usize = 8 + 1 + 1 + 2 * FS_PUBLIC_LEN;

/// The public values a forward-secret update binds its key to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsBinding<'a> {
    /// The device.
    pub device: DeviceId,
    /// The generation of the new seed (g + 1); the COMMAND's is g.
    pub new_generation: u8,
    /// r of the UPDATE_SEED_FS COMMAND's header.
    pub command_r: u64,
    /// r of the ENROLL's header.
    pub enroll_r: u64,
    /// The center's ephemeral public key (in the COMMAND).
    pub center_public: &'a [u8; FS_PUBLIC_LEN],
    /// The node's ephemeral public key (in the ENROLL).
    pub node_public: &'a [u8; FS_PUBLIC_LEN],
}

impl FsBinding<'_> {
    /// The extraction salt: r(COMMAND) || r(ENROLL).
    pub fn salt(&self) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&self.command_r.to_be_bytes());
        s[8..].copy_from_slice(&self.enroll_r.to_be_bytes());
        s
    }

    /// The expansion's Context: device(8) || g(1) || g+1(1) || Qc(33) || Qn(33).
    pub fn context(&self) -> [u8; FS_CONTEXT_LEN] {
        let mut c = [0u8; FS_CONTEXT_LEN];
        c[..8].copy_from_slice(&self.device.0);
        c[8] = self.new_generation.wrapping_sub(1);
        c[9] = self.new_generation;
        c[10..10 + FS_PUBLIC_LEN].copy_from_slice(self.center_public);
        c[10 + FS_PUBLIC_LEN..].copy_from_slice(self.node_public);
        c
    }
}

/// SP 800-56C rev. 2 two-step KDF from the shared secret `z` (the x
/// coordinate of the ECDH point, 32 bytes): AES-CMAC extraction with the
/// binding's salt, then the SP 800-108 counter KDF of section 3.
pub fn fs_key(z: &[u8; 32], binding: &FsBinding<'_>) -> Key128 {
    let kdk = cmac_parts(&binding.salt(), &[z]);
    derive_key(&kdk, FS_LABEL, &binding.context())
}

#[cfg(feature = "forward-secret")]
pub use ecc::EphemeralKey;

#[cfg(feature = "forward-secret")]
mod ecc {
    use core::fmt;

    use p256::elliptic_curve::PrimeField;
    use p256::elliptic_curve::sec1::CompressedPoint;
    use p256::{NistP256, NonZeroScalar, PublicKey};
    use zeroize::{Zeroize, Zeroizing};

    use super::*;
    use crate::{Error, Result};

    /// How many 32-byte candidates [`EphemeralKey::generate`] draws before
    /// giving up: each is refused with probability below 2^-32, so running
    /// out means the generator is broken.
    const MAX_CANDIDATES: usize = 8;

    /// An ephemeral P-256 key pair of one forward-secret update. The
    /// private scalar zeroizes on drop and never prints.
    pub struct EphemeralKey {
        d: NonZeroScalar,
        public: [u8; FS_PUBLIC_LEN],
    }

    impl Drop for EphemeralKey {
        fn drop(&mut self) {
            self.d.zeroize();
        }
    }

    impl fmt::Debug for EphemeralKey {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("EphemeralKey")
                .field("public", &self.public)
                .finish_non_exhaustive()
        }
    }

    impl EphemeralKey {
        /// The key pair of a candidate private key: SP 800-56A rev. 3
        /// section 5.6.1.2.2 (key-pair generation by testing candidates,
        /// FIPS 186-5 A.2.2): the 32 bytes, read big-endian, must be in
        /// [1, n - 1]. None otherwise (draw again).
        pub fn from_candidate(bytes: &[u8; 32]) -> Option<Self> {
            let d: Option<NonZeroScalar> = NonZeroScalar::from_repr((*bytes).into()).into_option();
            let d = d?;
            let point: CompressedPoint<NistP256> = PublicKey::from_secret_scalar(&d).into();
            let mut public = [0u8; FS_PUBLIC_LEN];
            public.copy_from_slice(&point);
            Some(EphemeralKey { d, public })
        }

        /// A fresh key pair from a random generator (the caller's DRBG):
        /// 32-byte candidates until one is in range (at most 8).
        pub fn generate(mut fill: impl FnMut(&mut [u8; 32]) -> Result<()>) -> Result<Self> {
            let mut c = Zeroizing::new([0u8; 32]);
            for _ in 0..MAX_CANDIDATES {
                fill(&mut c)?;
                if let Some(k) = Self::from_candidate(&c) {
                    return Ok(k);
                }
            }
            Err(Error::Verification)
        }

        /// The public key, SEC1 compressed (33 bytes).
        pub fn public(&self) -> &[u8; FS_PUBLIC_LEN] {
            &self.public
        }

        /// The private scalar, big-endian (for the center to seal it
        /// under its card while its UPDATE_SEED_FS is pending).
        pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
            let mut out = Zeroizing::new([0u8; 32]);
            out.copy_from_slice(&PrimeField::to_repr(&*self.d));
            out
        }

        /// The shared secret Z with a peer's public key: the x coordinate
        /// of d * Q (SP 800-56A ECC CDH; P-256 has cofactor 1). The peer's
        /// key is fully validated (SP 800-56A 5.6.2.3.3 for P-256: SEC1
        /// compressed, x below p, on the curve, not the point at infinity);
        /// an invalid one is [`Error::Verification`].
        pub fn shared_secret(&self, peer: &[u8; FS_PUBLIC_LEN]) -> Result<Zeroizing<[u8; 32]>> {
            // Only the SEC1 compressed form (0x02 or 0x03): the decoder
            // would also take the non-standard "compact" tag 0x05.
            if !matches!(peer[0], 0x02 | 0x03) {
                return Err(Error::Verification);
            }
            let q = PublicKey::from_sec1_bytes(peer).map_err(|_| Error::Verification)?;
            let shared = p256::ecdh::diffie_hellman(self.d, q.as_affine());
            let mut z = Zeroizing::new([0u8; 32]);
            z.copy_from_slice(shared.raw_secret_bytes());
            Ok(z)
        }

        /// Kfs of the update this key pair takes part in: Z with the
        /// peer's key, then [`fs_key`].
        pub fn transport_key(
            &self,
            peer: &[u8; FS_PUBLIC_LEN],
            binding: &FsBinding<'_>,
        ) -> Result<Key128> {
            let z = self.shared_secret(peer)?;
            Ok(fs_key(&z, binding))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn both_sides_derive_the_same_key_and_others_do_not() {
            let c = EphemeralKey::from_candidate(&[0x11; 32]).unwrap();
            let n = EphemeralKey::from_candidate(&[0x22; 32]).unwrap();
            let b = FsBinding {
                device: DeviceId([1, 2, 3, 4, 5, 6, 7, 8]),
                new_generation: 1,
                command_r: 5,
                enroll_r: 6,
                center_public: c.public(),
                node_public: n.public(),
            };
            let kc = c.transport_key(n.public(), &b).unwrap();
            let kn = n.transport_key(c.public(), &b).unwrap();
            assert_eq!(kc.expose(), kn.expose());
            let other = EphemeralKey::from_candidate(&[0x33; 32]).unwrap();
            let ko = other.transport_key(c.public(), &b).unwrap();
            assert_ne!(ko.expose(), kc.expose());
        }

        #[test]
        fn candidates_out_of_range_and_bad_points_are_refused() {
            assert!(EphemeralKey::from_candidate(&[0; 32]).is_none());
            assert!(EphemeralKey::from_candidate(&[0xff; 32]).is_none());
            let k = EphemeralKey::from_candidate(&[0x11; 32]).unwrap();
            let mut bad = *k.public();
            for tag in [0x00, 0x01, 0x04, 0x05, 0x06, 0x07] {
                bad[0] = tag;
                assert_eq!(k.shared_secret(&bad).err(), Some(Error::Verification));
            }
            assert_eq!(k.shared_secret(&[0; 33]).err(), Some(Error::Verification));
        }
    }
}
