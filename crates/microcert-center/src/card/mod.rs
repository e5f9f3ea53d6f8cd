//! The encryption card: the center's keys, and every operation that needs
//! them (ARCHITECTURE.md, "Key types and where they live").
//!
//! [`EncryptionCard`] is shaped after what a PKCS#11 token can do: every
//! method is an operation on keys the card holds, none hands a card key to
//! the caller. The one exception is [`EncryptionCard::transport_key`], which
//! exists for the factory: Ktr(device, epoch) is what gets written into a
//! chip. A seed's plaintext leaves the card only as a [`KeySeed`], which
//! zeroizes itself on drop.

mod kw;
mod shares;
mod software;

pub use shares::{ShareError, recover_secret, split_secret};
pub(crate) use software::write_atomically;
pub use software::{KdfParams, SoftwareCard, card_random};

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use microcert_core::{CHALLENGE_LEN, DeviceId, Enroll, Key128, KeySeed, aes_cmac};
use subtle::ConstantTimeEq;

use crate::{Error, Result};

/// KDF Label of the per-window challenge key (docs/protocol.md section 6).
pub const CHALLENGE_LABEL: &[u8] = b"MC-CHAL";

/// The KDF fixed input of the challenge key of window `w`, with the
/// counter: `0x00000001 || "MC-CHAL" || 0x00 || u32(w) || 0x00000080`, so
/// `Kw = AES-CMAC(Kchal, challenge_key_input(w))` = KDF(Kchal, "MC-CHAL",
/// u32(w)). A PKCS#11 card computes it as one CKM_AES_CMAC signature.
pub fn challenge_key_input(w: u32) -> [u8; 20] {
    let mut input = [0u8; 20];
    input[..4].copy_from_slice(&1u32.to_be_bytes());
    input[4..11].copy_from_slice(CHALLENGE_LABEL);
    input[12..16].copy_from_slice(&w.to_be_bytes());
    input[16..].copy_from_slice(&128u32.to_be_bytes());
    input
}

/// The challenge of `device` with random part `c` under the window key
/// `kw`: `c || AES-CMAC(Kw, device_id || c)[0..8]`.
pub fn challenge_with(kw: &Key128, device: DeviceId, c: &[u8; 8]) -> [u8; CHALLENGE_LEN] {
    let mut input = [0u8; 16];
    input[..8].copy_from_slice(&device.0);
    input[8..].copy_from_slice(c);
    let mut mac = zeroize::Zeroizing::new(aes_cmac(kw.expose(), &input));
    let mut out = [0u8; CHALLENGE_LEN];
    out[..8].copy_from_slice(c);
    out[8..].copy_from_slice(&mac[..8]);
    zeroize::Zeroize::zeroize(&mut *mac);
    out
}

/// Whether `challenge` is the challenge of `device` under `kw` (constant
/// time in the tag).
pub fn challenge_matches(kw: &Key128, device: DeviceId, challenge: &[u8; CHALLENGE_LEN]) -> bool {
    let mut c = [0u8; 8];
    c.copy_from_slice(&challenge[..8]);
    let expect = challenge_with(kw, device, &c);
    bool::from(expect[8..].ct_eq(&challenge[8..]))
}

/// The challenge windows a challenge checked at `w` may come from: `w`
/// and `w - 1` (window 0 has no previous window).
pub const fn challenge_windows(w: u32) -> [u32; 2] {
    [w, w.saturating_sub(1)]
}

/// The per-window challenge keys a card derived, for the current and the
/// previous window only (zeroized when replaced or dropped), so that a
/// token derives Kw once per window instead of MACing every challenge.
#[derive(Default)]
pub struct ChallengeKeys {
    slots: Mutex<Vec<(u32, Key128)>>,
}

impl fmt::Debug for ChallengeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let windows: Vec<u32> = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(w, _)| *w)
            .collect();
        f.debug_struct("ChallengeKeys")
            .field("windows", &windows)
            .finish_non_exhaustive()
    }
}

impl ChallengeKeys {
    /// Runs `f` with the key of window `w`, derived by `derive` if it is
    /// not held; at most two keys are held (the two newest windows).
    pub fn with<T>(
        &self,
        w: u32,
        derive: impl FnOnce(u32) -> Result<Key128>,
        f: impl FnOnce(&Key128) -> T,
    ) -> Result<T> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, k)) = slots.iter().find(|(sw, _)| *sw == w) {
            return Ok(f(k));
        }
        let k = derive(w)?;
        let out = f(&k);
        // Keep the two newest windows; an older window's key is derived
        // on demand and not kept (a challenge from before w - 1 fails
        // anyway).
        if slots.len() < 2 || slots.iter().any(|(sw, _)| *sw < w) {
            slots.push((w, k));
            slots.sort_by_key(|(sw, _)| std::cmp::Reverse(*sw));
            slots.truncate(2);
        }
        Ok(out)
    }

    /// A challenge for `device` at window `w` with random part `c`.
    pub fn make(
        &self,
        w: u32,
        device: DeviceId,
        c: &[u8; 8],
        derive: impl FnOnce(u32) -> Result<Key128>,
    ) -> Result<[u8; CHALLENGE_LEN]> {
        self.with(w, derive, |k| challenge_with(k, device, c))
    }

    /// Checks a challenge for window `w` or `w - 1`.
    pub fn check(
        &self,
        w: u32,
        device: DeviceId,
        challenge: &[u8; CHALLENGE_LEN],
        derive: impl Fn(u32) -> Result<Key128>,
    ) -> Result<()> {
        let [cur, prev] = challenge_windows(w);
        let a = self.with(cur, &derive, |k| challenge_matches(k, device, challenge))?;
        let b = self.with(prev, &derive, |k| challenge_matches(k, device, challenge))?;
        if a | b {
            Ok(())
        } else {
            Err(Error::Verification)
        }
    }
}

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
    /// (docs/protocol.md section 6): c random, the tag under the window key
    /// Kw = KDF(Kchal, "MC-CHAL", u32(w)), derived once per window.
    fn make_challenge(&self, device: DeviceId, now: u32) -> Result<[u8; CHALLENGE_LEN]>;

    /// Checks a challenge's MAC for the current or the previous window.
    fn check_challenge(&self, device: DeviceId, c: &[u8; CHALLENGE_LEN], now: u32) -> Result<()>;

    /// Opens an ENROLL: first with Kupd of `current` when given (a seed
    /// the caller unsealed and checked is allowed to update), then with
    /// Ktr(device, epoch) when `transport_epoch` is given
    /// ([`EncryptionCard::transport_key`]: a PKCS#11 token has no AES-CCM,
    /// so Ktr leaves it, docs/hsm.md). Which key opened it is returned
    /// beside the new seed; neither: [`Error::Verification`].
    fn open_enroll(
        &self,
        msg: &Enroll<'_>,
        current: Option<&KeySeed>,
        transport_epoch: Option<u8>,
    ) -> Result<(KeySeed, EnrollVia)> {
        use microcert_core::EnrollKey;
        if let Some(seed) = current
            && let Ok(s) = microcert_core::open_enroll(EnrollKey::Update(seed), msg)
        {
            return Ok((s, EnrollVia::Update));
        }
        if let Some(epoch) = transport_epoch {
            let ktr = self.transport_key(msg.header.device, epoch)?;
            if let Ok(s) = microcert_core::open_enroll(EnrollKey::Transport(&ktr), msg) {
                return Ok((s, EnrollVia::Transport));
            }
        }
        Err(Error::Verification)
    }

    /// Seals a seed for storage under the current Kstore.
    fn seal_seed(&self, device: DeviceId, generation: u8, seed: &KeySeed) -> Result<SealedSeed>;

    /// Opens a stored seed; fails when it was moved to another
    /// device or generation, or altered.
    fn unseal_seed(&self, id: DeviceId, g: u8, version: u32, ct: &[u8]) -> Result<KeySeed>;

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
        Err(crate::Error::CardUnsupported {
            operation: "rotate its storage key",
        })
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
        let _ = version;
        Err(crate::Error::CardUnsupported {
            operation: "destroy a storage key",
        })
    }

    // The keyring in the key database (issue 14, [`crate::keyring`]): the
    // card keeps a root key, the storage keys live in the database wrapped
    // under it (AES-KW, RFC 3394), and the card holds the unwrapped ones
    // in memory (a token: session objects) for seal and unseal.

    /// Whether the card has a root key for a keyring in the key database.
    /// The default: no (the card keeps its storage keys itself).
    fn has_keyring_root(&self) -> bool {
        false
    }

    /// A fresh storage key, wrapped under the root key (not held yet).
    fn new_wrapped_storage_key(&self) -> Result<Vec<u8>> {
        Err(crate::Error::CardUnsupported {
            operation: "keep a keyring root key",
        })
    }

    /// Unwraps `wrapped` under the root key and holds it as Kstore
    /// `version` (never written to the card file or token), replacing a
    /// key held under that version.
    fn hold_storage_key(&self, version: u32, wrapped: &[u8]) -> Result<()> {
        let _ = (version, wrapped);
        Err(crate::Error::CardUnsupported {
            operation: "keep a keyring root key",
        })
    }

    /// Forgets a held Kstore version (not the current one).
    fn release_storage_key(&self, version: u32) -> Result<()> {
        let _ = version;
        Err(crate::Error::CardUnsupported {
            operation: "keep a keyring root key",
        })
    }

    /// Seals new seeds under the held Kstore `version` from now on.
    fn set_storage_key_version(&self, version: u32) -> Result<()> {
        let _ = version;
        Err(crate::Error::CardUnsupported {
            operation: "keep a keyring root key",
        })
    }

    /// The storage keys the card keeps itself (from before the keyring),
    /// wrapped under the root key, with the current version: what the
    /// migration copies into the key database. None once migrated.
    fn legacy_storage_keys(&self) -> Result<Option<WrappedStorageKeys>> {
        Ok(None)
    }

    /// The storage keys the card holds now (from a keyring it was used
    /// with in this process, or its own), wrapped under the root key, with
    /// the current version; None when it holds none. A keyring made for a
    /// new, empty database starts from these, so one card's seeds open in
    /// every database it serves.
    fn held_storage_keys(&self) -> Result<Option<WrappedStorageKeys>> {
        Ok(None)
    }

    /// Forgets the storage keys the card keeps itself, durably (the card
    /// file keeps only the root key from then on). Called once the
    /// keyring in the database holds them.
    fn drop_legacy_storage_keys(&self) -> Result<()> {
        Ok(())
    }

    /// Storage-key versions the card keeps itself and cannot wrap (a
    /// token's non-extractable `microcert-kstore-vN` objects from before
    /// the keyring): they stay on the card beside the keyring, for
    /// unsealing, and the keyring's versions start above them. The
    /// default: none.
    fn resident_storage_keys(&self) -> Vec<u32> {
        Vec::new()
    }

    /// The card under a keyring wrapper ([`crate::keyring::KeyringCard`]);
    /// None for a card itself.
    fn keyring_base(&self) -> Option<Arc<dyn EncryptionCard>> {
        None
    }
}

/// A card's own storage keys wrapped under its root key, with the current
/// version: (current, [(version, wrapped)]) ([`EncryptionCard::legacy_storage_keys`]).
pub type WrappedStorageKeys = (u32, Vec<(u32, Vec<u8>)>);

/// A u64 from the card's random generator.
pub(crate) fn random_u64(card: &dyn EncryptionCard) -> Result<u64> {
    let mut b = [0u8; 8];
    card.random(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

#[cfg(test)]
mod challenge_tests {
    use std::cell::Cell;

    use microcert_core::derive_key;

    use super::*;

    fn kchal() -> Key128 {
        Key128::from_bytes(core::array::from_fn(|i| 0x20 + i as u8))
    }

    const DEV: DeviceId = DeviceId([0, 1, 2, 3, 4, 5, 6, 7]);

    #[test]
    fn the_vector_of_docs_protocol_section_6() {
        let w = 1_800_000_000 / 60;
        assert_eq!(
            hex::encode(challenge_key_input(w)),
            "000000014d432d4348414c0001c9c38000000080"
        );
        let kw = derive_key(&kchal(), CHALLENGE_LABEL, &w.to_be_bytes());
        assert_eq!(
            kw.expose(),
            &aes_cmac(kchal().expose(), &challenge_key_input(w))
        );
        assert_eq!(hex::encode(kw.expose()), "5e1d0a228dd766fc2b83de4ceb011d67");
        let c = [0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7];
        assert_eq!(
            hex::encode(challenge_with(&kw, DEV, &c)),
            "a0a1a2a3a4a5a6a70b3fe563a6210cca"
        );
    }

    #[test]
    fn a_window_key_is_derived_once_and_two_are_kept() {
        let keys = ChallengeKeys::default();
        let derived = Cell::new(0);
        let derive = |w: u32| {
            derived.set(derived.get() + 1);
            Ok(derive_key(&kchal(), CHALLENGE_LABEL, &w.to_be_bytes()))
        };
        let mut issued = Vec::new();
        for i in 0..1_000u32 {
            let c = i.to_be_bytes();
            let c = [c[0], c[1], c[2], c[3], 0, 0, 0, 0];
            issued.push(keys.make(100, DEV, &c, derive).unwrap());
        }
        assert_eq!(derived.get(), 1);
        // As the clock moves on: checked at window 100, 101, then 102.
        for ch in &issued {
            keys.check(100, DEV, ch, derive).unwrap();
        }
        for ch in &issued {
            keys.check(101, DEV, ch, derive).unwrap();
            assert!(keys.check(101, DeviceId([9; 8]), ch, derive).is_err());
        }
        for ch in &issued {
            assert!(matches!(
                keys.check(102, DEV, ch, derive),
                Err(Error::Verification)
            ));
        }
        // Windows 100, then 99 (checking at 100), 101 and 102: four in all.
        assert_eq!(derived.get(), 4);
        assert_eq!(keys.slots.lock().unwrap().len(), 2);
        let mut bad = issued[0];
        bad[15] ^= 1;
        assert!(keys.check(100, DEV, &bad, derive).is_err());
    }
}
