//! The encryption card: the center's keys, and every operation that needs
//! them (ARCHITECTURE.md, "Key types and where they live").
//!
//! [`EncryptionCard`] is shaped after what a PKCS#11 token can do: every
//! method is an operation on keys the card holds, none hands a card key to
//! the caller. The one exception is [`EncryptionCard::transport_key`], which
//! exists for the factory: Ktr(device, epoch) is what gets written into a
//! chip. A seed's plaintext leaves the card only as a [`KeySeed`], which
//! zeroizes itself on drop.

mod shares;
mod software;

pub use shares::{ShareError, recover_secret, split_secret};
pub(crate) use software::write_atomically;
pub use software::{KdfParams, SoftwareCard};

use std::fmt;

use microcert_core::{CHALLENGE_LEN, DeviceId, Enroll, Key128, KeySeed};

use crate::Result;

/// Length of a record integrity tag and of a digest tag (HMAC-SHA256).
pub const TAG_LEN: usize = 32;

/// Which key opened an ENROLL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollVia {
    /// Kupd of the device's current seed: a seed update.
    Update,
    /// Ktr(device, epoch): first enrollment or an operator-opened re-enrollment.
    Transport,
}

impl EnrollVia {
    /// The stable name stored in the database.
    pub const fn name(self) -> &'static str {
        match self {
            EnrollVia::Update => "update",
            EnrollVia::Transport => "transport",
        }
    }

    /// The value of a stored name.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "update" => Some(EnrollVia::Update),
            "transport" => Some(EnrollVia::Transport),
            _ => None,
        }
    }
}

/// A seed sealed for storage: AES-256-GCM under Kstore version
/// `kstore_version`, associated data `device_id || generation`.
/// `ciphertext` is `nonce(12) || ciphertext(978) || tag(16)`; the plaintext
/// is the seed's 976 bytes followed by its base year.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedSeed {
    /// The Kstore version that sealed it.
    pub kstore_version: u32,
    /// Nonce, ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for SealedSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedSeed")
            .field("kstore_version", &self.kstore_version)
            .field("len", &self.ciphertext.len())
            .finish()
    }
}

/// The keys and operations of one encryption card.
///
/// Implementations must be usable from many threads at once. Errors are
/// [`crate::Error::Verification`] for anything that does not authenticate
/// and [`crate::Error::Card`] for a failure of the card itself.
pub trait EncryptionCard: Send + Sync + fmt::Debug {
    /// Ktr(device, epoch) = KDF(Ktrans, "MC-TRANSPORT", device || epoch):
    /// for the factory, which writes it into a chip. Never used otherwise.
    fn transport_key(&self, device: DeviceId, epoch: u8) -> Result<Key128>;

    /// A fresh stateless challenge for `device` at time `now`
    /// (PROTOCOL.md section 6): c from the card's RNG, MAC under Kchal.
    fn make_challenge(&self, device: DeviceId, now: u32) -> Result<[u8; CHALLENGE_LEN]>;

    /// Checks a challenge's MAC for the current or the previous window.
    fn check_challenge(
        &self,
        device: DeviceId,
        challenge: &[u8; CHALLENGE_LEN],
        now: u32,
    ) -> Result<()>;

    /// Opens an ENROLL: first with Kupd of `current` when given (a seed
    /// the caller unsealed and checked is allowed to update), then with
    /// Ktr(device, epoch) when `transport_epoch` is given. Which key opened
    /// it is returned beside the new seed.
    fn open_enroll(
        &self,
        msg: &Enroll<'_>,
        current: Option<&KeySeed>,
        transport_epoch: Option<u8>,
    ) -> Result<(KeySeed, EnrollVia)>;

    /// Seals a seed for storage under the current Kstore.
    fn seal_seed(&self, device: DeviceId, generation: u8, seed: &KeySeed) -> Result<SealedSeed>;

    /// Opens a stored seed; fails when it was moved to another
    /// device or generation, or altered.
    fn unseal_seed(
        &self,
        device: DeviceId,
        generation: u8,
        kstore_version: u32,
        ciphertext: &[u8],
    ) -> Result<KeySeed>;

    /// The integrity tag of a record's canonical bytes (HMAC-SHA256 under
    /// the integrity key, domain "MC-REC").
    fn record_tag(&self, record: &[u8]) -> Result<[u8; TAG_LEN]>;

    /// The tag of a digest shard's canonical bytes (domain "MC-DIGEST").
    fn digest_tag(&self, state: &[u8]) -> Result<[u8; TAG_LEN]>;

    /// Fills `out` from the card's random generator.
    fn random(&self, out: &mut [u8]) -> Result<()>;

    /// The Kstore version new seeds are sealed under.
    fn storage_key_version(&self) -> u32;

    /// Every Kstore version the card still holds, oldest first. The
    /// default suits a card that cannot rotate: only the current one.
    fn storage_key_versions(&self) -> Vec<u32> {
        vec![self.storage_key_version()]
    }

    /// Makes the next Kstore version and seals new seeds under it from now
    /// on; older versions stay for unsealing. Durable before it returns
    /// (the software card rewrites its card file, a token keeps the key as
    /// a token object). Returns the new version. The default refuses.
    fn rotate_storage_key(&self) -> Result<u32> {
        Err(crate::Error::Refused(
            "this encryption card cannot rotate its storage key".into(),
        ))
    }

    /// The card's copy of the anchor named `name` ([`crate::anchor`]), if
    /// the card keeps one. The default keeps none (the anchor is then only
    /// the file beside the database: the software card).
    fn load_anchor(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let _ = name;
        Ok(None)
    }

    /// Keeps `bytes` (an anchor with its tag) as the card's copy named
    /// `name`, replacing the previous one; false when the card keeps none
    /// (the default). A PKCS#11 token keeps it as a private token object.
    fn store_anchor(&self, name: &str, bytes: &[u8]) -> Result<bool> {
        let _ = (name, bytes);
        Ok(false)
    }

    /// Destroys an old Kstore version (never the current one): the center
    /// calls it once no record and no kept backup is sealed under it
    /// ([`crate::Center::rotate_storage_key`]). The default refuses.
    fn destroy_storage_key(&self, version: u32) -> Result<()> {
        Err(crate::Error::Refused(format!(
            "this encryption card cannot destroy storage key version {version}"
        )))
    }
}

/// A u64 from the card's random generator.
pub(crate) fn random_u64(card: &dyn EncryptionCard) -> Result<u64> {
    let mut b = [0u8; 8];
    card.random(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
