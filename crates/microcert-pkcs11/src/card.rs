//! [`Pkcs11Card`]: the center's encryption card on a PKCS#11 token.

use std::fmt;
use std::sync::{PoisonError, RwLock};

use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use microcert_center::card::{
    ChallengeKeys, EncryptionCard, SealedSeed, TAG_LEN, challenge_key_input,
};
use microcert_core::{CHALLENGE_LEN, DeviceId, Key128, KeySeed, SEED_LEN, challenge_window};
use zeroize::Zeroizing;

use crate::config::Pkcs11Config;
use crate::error::{Pkcs11Error, Result};
use crate::keys::{self, KCHAL_LABEL, KINT_LABEL, KTRANS_LABEL, KeyPolicy, Role};
use crate::pool::{self, SessionPool};

const GCM_NONCE: usize = 12;
const GCM_TAG: usize = 16;
const SEED_PLAIN: usize = SEED_LEN + 2;
const SEALED_LEN: usize = GCM_NONCE + SEED_PLAIN + GCM_TAG;

/// The handles of the fixed card keys. Found at open, and found again
/// when the token stops knowing them (a token that logged the process out
/// when its sessions were closed, an HSM restarted).
#[derive(Clone, Copy)]
struct Fixed {
    ktrans: ObjectHandle,
    kint: ObjectHandle,
    kchal: ObjectHandle,
    /// The keyring root key `microcert-kroot`, when the token has one.
    kroot: Option<ObjectHandle>,
}

/// Whether an error means the token no longer knows a key handle.
fn handle_lost(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _)
    )
}

/// The Kstore versions on the token, the keyring's versions held as
/// session objects, and the one new seeds are sealed under.
struct Kstores {
    current: u32,
    /// Token objects `microcert-kstore-vN` (made before the keyring, or
    /// by the card's own rotation outside a keyring).
    keys: Vec<(u32, ObjectHandle)>,
    /// Keyring versions: unwrapped under the root into session objects
    /// (CKA_TOKEN false, sensitive, non-extractable), with their wrapped
    /// bytes to unwrap them again when the token drops the sessions.
    held: Vec<Held>,
}

/// One keyring version held by the card.
struct Held {
    version: u32,
    wrapped: Vec<u8>,
    handle: ObjectHandle,
}

impl Kstores {
    fn handle(&self, version: u32) -> Option<ObjectHandle> {
        self.keys
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, h)| *h)
            .or_else(|| {
                self.held
                    .iter()
                    .find(|h| h.version == version)
                    .map(|h| h.handle)
            })
    }

    fn versions(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.keys.iter().map(|(v, _)| *v).collect();
        v.extend(self.held.iter().map(|h| h.version));
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// An encryption card whose keys live in a PKCS#11 token.
///
/// Every operation with a card key runs inside the token; the values that
/// reach host memory are listed in docs/hsm.md. Object handles are valid in
/// every session of the process, so they are found once at [`open`] and
/// each operation borrows any session of the pool.
///
/// [`open`]: Pkcs11Card::open
pub struct Pkcs11Card {
    // Kept so that the module stays loaded as long as a card uses it.
    _ctx: Pkcs11,
    slot: Slot,
    token_label: String,
    serial: String,
    pool: SessionPool,
    policy: KeyPolicy,
    fixed: RwLock<Fixed>,
    kstore: RwLock<Kstores>,
    /// Kw of the current and the previous challenge window, each derived
    /// once in the token (docs/hsm.md: the one value of Kchal's that
    /// leaves the token).
    chal_keys: ChallengeKeys,
}

impl fmt::Debug for Pkcs11Card {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Card")
            .field("token_label", &self.token_label)
            .field("serial", &self.serial)
            .field("slot", &self.slot.id())
            .field("sessions", &self.pool.size())
            .field("policy", &self.policy)
            .field("kstore_version", &self.storage_key_version())
            .finish_non_exhaustive()
    }
}

/// A session on the configured token, logged in as the user, for one-off
/// work (init, import) before the card's pool exists.
pub(crate) fn one_session(config: &Pkcs11Config) -> Result<Session> {
    let ctx = pool::module(&config.module)?;
    let slot = pool::find_slot(&ctx, &config.token_label)?;
    let pin = config.read_pin()?;
    pool::user_session(&ctx, slot, &pin)
}

/// Refuses to make keys on a token that already holds card keys.
pub(crate) fn refuse_existing(session: &Session) -> Result<()> {
    match keys::card_objects(session)?.into_iter().next() {
        Some((label, _)) => Err(Pkcs11Error::KeysExist { label }),
        None => Ok(()),
    }
}

/// Runs `make` for every label; when one fails, destroys the objects
/// already made, so that a retried init starts from an empty token.
pub(crate) fn make_all(
    session: &Session,
    labels: &[&str],
    mut make: impl FnMut(&str) -> Result<ObjectHandle>,
) -> Result<()> {
    let mut made = Vec::new();
    for label in labels {
        match make(label) {
            Ok(h) => made.push(h),
            Err(e) => {
                for h in made {
                    let _ = session.destroy_object(h);
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

impl Pkcs11Card {
    /// Makes the card's keys inside the token (non-extractable) and opens
    /// the card. Refused when the token already holds card keys.
    pub fn init(config: &Pkcs11Config) -> Result<Self> {
        Self::init_with_policy(config, KeyPolicy::NonExtractable)
    }

    /// [`Pkcs11Card::init`] with a chosen [`KeyPolicy`]:
    /// [`KeyPolicy::WrapWithTrusted`] allows cloning to a second token.
    pub fn init_with_policy(config: &Pkcs11Config, policy: KeyPolicy) -> Result<Self> {
        let session = one_session(config)?;
        refuse_existing(&session)?;
        let kstore1 = keys::kstore_label(1);
        make_all(
            &session,
            &[KTRANS_LABEL, KINT_LABEL, KCHAL_LABEL, &kstore1],
            |label| {
                let role =
                    Role::of_label(label).ok_or_else(|| Pkcs11Error::Format(label.into()))?;
                keys::generate(&session, label, role, policy)
            },
        )?;
        if let Err(e) = keys::generate_root(&config.module, &session, policy) {
            for (_, h) in keys::card_objects(&session).unwrap_or_default() {
                let _ = session.destroy_object(h);
            }
            return Err(e);
        }
        drop(session);
        tracing::info!(token = %config.token_label, ?policy, "PKCS#11 card initialised");
        Self::open(config)
    }

    /// Makes the keyring root key `microcert-kroot` on a token initialised
    /// before the keyring (issue 14). Refused with
    /// [`Pkcs11Error::KeysExist`] when it is there already, and with
    /// [`Pkcs11Error::KeyMissing`] on a token without card keys. Run it on
    /// ONE token of a deployment, then copy that token to the others with
    /// the vendor's cloning: a root made on each token separately differs,
    /// and a center whose root does not unwrap the keyring fails to load
    /// it (docs/hsm.md).
    pub fn add_keyring_root(config: &Pkcs11Config) -> Result<()> {
        let session = one_session(config)?;
        let ktrans = keys::find(&session, KTRANS_LABEL)?;
        let policy = keys::check(&session, ktrans, KTRANS_LABEL, Role::Cmac)?;
        match keys::find(&session, keys::KROOT_LABEL) {
            Ok(_) => {
                return Err(Pkcs11Error::KeysExist {
                    label: keys::KROOT_LABEL.to_owned(),
                });
            }
            Err(Pkcs11Error::KeyMissing { .. }) => {}
            Err(e) => return Err(e),
        }
        keys::generate_root(&config.module, &session, policy)?;
        tracing::info!(token = %config.token_label, "keyring root key made");
        Ok(())
    }

    /// Opens the card on its token: loads the module, finds the token by
    /// label, logs in the session pool and finds every key by label.
    ///
    /// A wrong PIN is [`Pkcs11Error::WrongPin`], a missing token
    /// [`Pkcs11Error::TokenNotFound`], a missing key
    /// [`Pkcs11Error::KeyMissing`]; a key whose value could be read out is
    /// [`Pkcs11Error::KeyAttributes`].
    pub fn open(config: &Pkcs11Config) -> Result<Self> {
        let ctx = pool::module(&config.module)?;
        let slot = pool::find_slot(&ctx, &config.token_label)?;
        let serial = ctx.get_token_info(slot)?.serial_number().to_owned();
        let pin = config.read_pin()?;
        let pool = SessionPool::open(&ctx, slot, &pin, config.sessions)?;
        drop(pin);
        let (ktrans, kint, kchal, kroot, kstore, policy) = pool.with(|s| -> Result<_> {
            let ktrans = keys::find(s, KTRANS_LABEL)?;
            let kint = keys::find(s, KINT_LABEL)?;
            let kchal = keys::find(s, KCHAL_LABEL)?;
            let policy = keys::check(s, ktrans, KTRANS_LABEL, Role::Cmac)?;
            keys::check(s, kint, KINT_LABEL, Role::Hmac)?;
            keys::check(s, kchal, KCHAL_LABEL, Role::Cmac)?;
            let kroot = match keys::find(s, keys::KROOT_LABEL) {
                Ok(h) => {
                    keys::check_root(s, h)?;
                    Some(h)
                }
                Err(Pkcs11Error::KeyMissing { .. }) => None,
                Err(e) => return Err(e),
            };
            let mut stores = Vec::new();
            for (label, h) in keys::card_objects(s)? {
                if let Some(v) = keys::parse_kstore_label(&label) {
                    keys::check(s, h, &label, Role::Gcm)?;
                    stores.push((v, h));
                }
            }
            stores.sort_by_key(|(v, _)| *v);
            // With a root key the storage keys may all be in the keyring.
            let current = match stores.last() {
                Some((v, _)) => *v,
                None if kroot.is_some() => 0,
                None => {
                    return Err(Pkcs11Error::KeyMissing {
                        label: keys::kstore_label(1),
                    });
                }
            };
            let kstore = Kstores {
                current,
                keys: stores,
                held: Vec::new(),
            };
            Ok((ktrans, kint, kchal, kroot, kstore, policy))
        })?;
        Ok(Pkcs11Card {
            _ctx: ctx,
            slot,
            token_label: config.token_label.clone(),
            serial,
            pool,
            policy,
            fixed: RwLock::new(Fixed {
                ktrans,
                kint,
                kchal,
                kroot,
            }),
            kstore: RwLock::new(kstore),
            chal_keys: ChallengeKeys::default(),
        })
    }

    /// The label of the card's token.
    pub fn token_label(&self) -> &str {
        &self.token_label
    }

    /// Whether the card's keys may leave the token wrapped.
    pub fn key_policy(&self) -> KeyPolicy {
        self.policy
    }

    /// Every Kstore version the card can unseal with (token objects and
    /// held keyring versions), oldest first.
    pub fn storage_key_versions(&self) -> Vec<u32> {
        self.kstore
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .versions()
    }

    /// Whether the token has the keyring root key `microcert-kroot`.
    pub fn has_keyring_root(&self) -> bool {
        self.fixed().kroot.is_some()
    }

    /// Makes the next Kstore version inside the token and seals new seeds
    /// under it from now on; older versions stay for unsealing until
    /// [`Pkcs11Card::destroy_storage_key`]. Returns the new version.
    pub fn rotate_storage_key(&self) -> Result<u32> {
        let mut k = self.kstore.write().unwrap_or_else(PoisonError::into_inner);
        let next = k
            .versions()
            .into_iter()
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or(Pkcs11Error::StorageKeysExhausted)?;
        let label = keys::kstore_label(next);
        let h = self
            .pool
            .with(|s| keys::generate(s, &label, Role::Gcm, self.policy))?;
        k.keys.push((next, h));
        k.current = next;
        tracing::info!(token = %self.token_label, version = next, "new storage key");
        Ok(next)
    }

    /// Destroys an old Kstore version on the token (every record must have
    /// been re-sealed first). The current version cannot be destroyed.
    pub fn destroy_storage_key(&self, version: u32) -> Result<()> {
        let mut k = self.kstore.write().unwrap_or_else(PoisonError::into_inner);
        if version == k.current {
            return Err(Pkcs11Error::CurrentStorageKey { version });
        }
        let i = k
            .keys
            .iter()
            .position(|(v, _)| *v == version)
            .ok_or_else(|| Pkcs11Error::KeyMissing {
                label: keys::kstore_label(version),
            })?;
        self.pool.with(|s| s.destroy_object(k.keys[i].1))?;
        k.keys.remove(i);
        Ok(())
    }

    pub(crate) fn pool(&self) -> &SessionPool {
        &self.pool
    }

    /// Every card key with its label, for cloning.
    pub(crate) fn labelled_keys(&self) -> Vec<(String, ObjectHandle)> {
        let mut out = vec![
            (KTRANS_LABEL.to_owned(), self.fixed().ktrans),
            (KINT_LABEL.to_owned(), self.fixed().kint),
            (KCHAL_LABEL.to_owned(), self.fixed().kchal),
        ];
        if let Some(root) = self.fixed().kroot {
            out.push((keys::KROOT_LABEL.to_owned(), root));
        }
        let k = self.kstore.read().unwrap_or_else(PoisonError::into_inner);
        out.extend(k.keys.iter().map(|(v, h)| (keys::kstore_label(*v), *h)));
        out
    }

    fn fixed(&self) -> Fixed {
        *self.fixed.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Finds every card key again by label (their handles changed: the
    /// token logged the process out, or restarted).
    fn refind(&self) -> Result<()> {
        let (fixed, stores) = self.pool.with(|s| -> Result<_> {
            let fixed = Fixed {
                ktrans: keys::find(s, KTRANS_LABEL)?,
                kint: keys::find(s, KINT_LABEL)?,
                kchal: keys::find(s, KCHAL_LABEL)?,
                kroot: match keys::find(s, keys::KROOT_LABEL) {
                    Ok(h) => Some(h),
                    Err(Pkcs11Error::KeyMissing { .. }) => None,
                    Err(e) => return Err(e),
                },
            };
            let mut stores = Vec::new();
            for (label, h) in keys::card_objects(s)? {
                if let Some(v) = keys::parse_kstore_label(&label) {
                    stores.push((v, h));
                }
            }
            stores.sort_by_key(|(v, _)| *v);
            Ok((fixed, stores))
        })?;
        *self.fixed.write().unwrap_or_else(PoisonError::into_inner) = fixed;
        self.kstore
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .keys = stores;
        self.rehold()?;
        tracing::warn!(token = %self.token_label, "PKCS#11 key handles found again");
        Ok(())
    }

    /// Unwraps again every held keyring version whose session object the
    /// token dropped (its sessions were closed: a token reset, an HSM
    /// restart). The token work runs without the lock (an operation in
    /// the pool may be waiting for it); a version replaced meanwhile by
    /// another thread keeps that thread's object and ours is destroyed.
    fn rehold(&self) -> Result<()> {
        let Some(root) = self.fixed().kroot else {
            return Ok(());
        };
        let held: Vec<(u32, Vec<u8>, ObjectHandle)> = {
            let k = self.kstore.read().unwrap_or_else(PoisonError::into_inner);
            k.held
                .iter()
                .map(|h| (h.version, h.wrapped.clone(), h.handle))
                .collect()
        };
        for (version, wrapped, old) in held {
            let alive = self
                .pool
                .with_retry(|s| s.get_attributes(old, &[AttributeType::Class]))
                .is_ok();
            if alive {
                continue;
            }
            let new = self.pool.with_retry(|s| {
                s.unwrap_key(
                    &Mechanism::AesKeyWrap,
                    root,
                    &wrapped,
                    &keys::held_key_unwrap_template(),
                )
            })?;
            let mut k = self.kstore.write().unwrap_or_else(PoisonError::into_inner);
            match k.held.iter_mut().find(|h| h.version == version) {
                Some(h) if h.handle == old => h.handle = new,
                _ => {
                    drop(k);
                    let _ = self.pool.with_retry(|s| s.destroy_object(new));
                }
            }
        }
        Ok(())
    }

    /// Runs `f` in the token: a session the token invalidated is replaced
    /// ([`SessionPool::with_retry`]), and key handles it no longer knows
    /// are found again by label, each at most once per call. `f` reads
    /// the handles it uses when it runs.
    fn in_token<T>(
        &self,
        mut f: impl FnMut(&Session) -> std::result::Result<T, CkError>,
    ) -> std::result::Result<T, CkError> {
        match self.pool.with_retry(&mut f) {
            Err(e) if handle_lost(&e) => match self.refind() {
                Ok(()) => self.pool.with_retry(f),
                Err(_) => Err(e),
            },
            other => other,
        }
    }

    fn kstore_handle(&self, version: u32) -> microcert_center::Result<ObjectHandle> {
        let k = self.kstore.read().unwrap_or_else(PoisonError::into_inner);
        k.handle(version)
            .ok_or_else(|| card_err(format!("no storage key of version {version}")))
    }

    fn root(&self) -> microcert_center::Result<ObjectHandle> {
        self.fixed()
            .kroot
            .ok_or(microcert_center::Error::CardUnsupported {
                operation: "keep a keyring root key (no microcert-kroot on this token)",
            })
    }

    /// A one-block CMAC inside the token; the result lands in a zeroizing
    /// buffer because for Ktrans it is a transport key.
    fn cmac(
        &self,
        key: fn(Fixed) -> ObjectHandle,
        data: &[u8],
    ) -> microcert_center::Result<Zeroizing<[u8; 16]>> {
        let out = Zeroizing::new(
            self.in_token(|s| s.sign(&Mechanism::AesCMac, key(self.fixed()), data))
                .map_err(ck_err)?,
        );
        let mut mac = Zeroizing::new([0u8; 16]);
        if out.len() != 16 {
            return Err(card_err("CMAC of unexpected length".into()));
        }
        mac.copy_from_slice(&out);
        Ok(mac)
    }

    fn ktr(&self, device: DeviceId, epoch: u8) -> microcert_center::Result<Key128> {
        // KDF(Ktrans, "MC-TRANSPORT", device || epoch): PROTOCOL.md section 3.
        let mut input = [0u8; 4 + 12 + 1 + 9 + 4];
        input[..4].copy_from_slice(&1u32.to_be_bytes());
        input[4..16].copy_from_slice(b"MC-TRANSPORT");
        input[17..25].copy_from_slice(&device.0);
        input[25] = epoch;
        input[26..].copy_from_slice(&128u32.to_be_bytes());
        let mac = self.cmac(|f| f.ktrans, &input)?;
        Ok(Key128::from_bytes(*mac))
    }

    /// Kw = KDF(Kchal, "MC-CHAL", u32(w)): one CKM_AES_CMAC signature in
    /// the token over the fixed input, once per challenge window.
    fn challenge_key(&self, w: u32) -> microcert_center::Result<Key128> {
        let mac = self.cmac(|f| f.kchal, &challenge_key_input(w))?;
        Ok(Key128::from_bytes(*mac))
    }

    fn hmac(&self, domain: &[u8], data: &[u8]) -> microcert_center::Result<[u8; TAG_LEN]> {
        // The same bytes the software card feeds its HMAC: domain || data.
        let mut input = Vec::with_capacity(domain.len() + data.len());
        input.extend_from_slice(domain);
        input.extend_from_slice(data);
        let tag = self
            .in_token(|s| s.sign(&Mechanism::Sha256Hmac, self.fixed().kint, &input))
            .map_err(ck_err)?;
        tag.try_into()
            .map_err(|_| card_err("HMAC of unexpected length".into()))
    }
}

/// The attributes that find the anchor object named `name`.
fn anchor_template(name: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Label(name.as_bytes().to_vec()),
    ]
}

fn card_err(msg: String) -> microcert_center::Error {
    microcert_center::Error::Card(msg)
}

fn ck_err(e: CkError) -> microcert_center::Error {
    card_err(format!("PKCS#11: {e}"))
}

fn seed_aad(device: DeviceId, generation: u8) -> [u8; 9] {
    let mut aad = [0u8; 9];
    aad[..8].copy_from_slice(&device.0);
    aad[8] = generation;
    aad
}

impl EncryptionCard for Pkcs11Card {
    fn transport_key(&self, device: DeviceId, epoch: u8) -> microcert_center::Result<Key128> {
        self.ktr(device, epoch)
    }

    fn make_challenge(
        &self,
        device: DeviceId,
        now: u32,
    ) -> microcert_center::Result<[u8; CHALLENGE_LEN]> {
        // c from the OS: a challenge costs no token operation at all.
        let mut c = [0u8; 8];
        getrandom::fill(&mut c).map_err(|e| card_err(format!("OS random generator: {e}")))?;
        self.chal_keys
            .make(challenge_window(now), device, &c, |w| self.challenge_key(w))
    }

    fn check_challenge(
        &self,
        device: DeviceId,
        challenge: &[u8; CHALLENGE_LEN],
        now: u32,
    ) -> microcert_center::Result<()> {
        self.chal_keys
            .check(challenge_window(now), device, challenge, |w| {
                self.challenge_key(w)
            })
    }

    fn seal_seed(
        &self,
        device: DeviceId,
        generation: u8,
        seed: &KeySeed,
    ) -> microcert_center::Result<SealedSeed> {
        let (version, key) = {
            let k = self.kstore.read().unwrap_or_else(PoisonError::into_inner);
            let h = k
                .handle(k.current)
                .ok_or_else(|| card_err("current storage key missing".into()))?;
            (k.current, h)
        };
        let mut plain = Zeroizing::new([0u8; SEED_PLAIN]);
        plain[..SEED_LEN].copy_from_slice(seed.expose());
        plain[SEED_LEN..].copy_from_slice(&seed.base_year().to_be_bytes());
        let aad = seed_aad(device, generation);
        let (nonce, ct) = self
            .in_token(|s| -> std::result::Result<_, CkError> {
                let key = self.kstore_handle(version).unwrap_or(key);
                let mut nonce = [0u8; GCM_NONCE];
                s.generate_random_slice(&mut nonce)?;
                let mut iv = nonce;
                let params = GcmParams::new(&mut iv, &aad, (GCM_TAG as u64 * 8).into())?;
                let ct = s.encrypt(&Mechanism::AesGcm(params), key, &plain[..])?;
                Ok((nonce, ct))
            })
            .map_err(ck_err)?;
        if ct.len() != SEED_PLAIN + GCM_TAG {
            return Err(card_err("AES-GCM output of unexpected length".into()));
        }
        let mut out = Vec::with_capacity(SEALED_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(SealedSeed {
            kstore_version: version,
            ciphertext: out,
        })
    }

    fn unseal_seed(
        &self,
        id: DeviceId,
        g: u8,
        version: u32,
        ct: &[u8],
    ) -> microcert_center::Result<KeySeed> {
        if ct.len() != SEALED_LEN {
            return Err(microcert_center::Error::Verification);
        }
        let key = self.kstore_handle(version)?;
        let aad = seed_aad(id, g);
        let mut iv = [0u8; GCM_NONCE];
        iv.copy_from_slice(&ct[..GCM_NONCE]);
        let plain = self
            .in_token(|s| -> std::result::Result<_, CkError> {
                let key = self.kstore_handle(version).unwrap_or(key);
                let params = GcmParams::new(&mut iv, &aad, (GCM_TAG as u64 * 8).into())?;
                s.decrypt(&Mechanism::AesGcm(params), key, &ct[GCM_NONCE..])
            })
            .map(Zeroizing::new)
            .map_err(|e| match e {
                // A tag that does not verify: moved, altered or foreign.
                // PKCS#11 3.0 says CKR_ENCRYPTED_DATA_INVALID; SoftHSM2 2.6
                // answers CKR_GENERAL_ERROR from C_Decrypt (not from
                // C_DecryptInit) when the GCM tag fails. With a key found at
                // open and an input of the right length, nothing else makes
                // C_Decrypt fail that way.
                CkError::Pkcs11(
                    RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange,
                    _,
                )
                | CkError::Pkcs11(RvError::GeneralError, Function::Decrypt) => {
                    microcert_center::Error::Verification
                }
                other => ck_err(other),
            })?;
        if plain.len() != SEED_PLAIN {
            return Err(microcert_center::Error::Verification);
        }
        let base_year = u16::from_be_bytes([plain[SEED_LEN], plain[SEED_LEN + 1]]);
        KeySeed::from_slice(&plain[..SEED_LEN], base_year)
            .map_err(|_| microcert_center::Error::Verification)
    }

    fn record_tag(&self, record: &[u8]) -> microcert_center::Result<[u8; TAG_LEN]> {
        self.hmac(b"MC-REC\0", record)
    }

    fn digest_tag(&self, state: &[u8]) -> microcert_center::Result<[u8; TAG_LEN]> {
        self.hmac(b"MC-DIGEST\0", state)
    }

    fn random(&self, out: &mut [u8]) -> microcert_center::Result<()> {
        self.in_token(|s| s.generate_random_slice(out))
            .map_err(ck_err)
    }

    fn storage_key_version(&self) -> u32 {
        self.kstore
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .current
    }

    // The trait's rotation calls the token's own (the same behaviour as
    // before, now reachable through `dyn EncryptionCard`).
    fn storage_key_versions(&self) -> Vec<u32> {
        Pkcs11Card::storage_key_versions(self)
    }

    fn rotate_storage_key(&self) -> microcert_center::Result<u32> {
        Pkcs11Card::rotate_storage_key(self).map_err(Into::into)
    }

    /// The anchor is a private token object (CKO_DATA, CKA_TOKEN true,
    /// labelled `name`): it cannot be read, written or put back without
    /// the token's PIN (issue 12).
    fn load_anchor(&self, name: &str) -> microcert_center::Result<Option<Vec<u8>>> {
        self.pool
            .with(|s| {
                let Some(h) = s.find_objects(&anchor_template(name))?.into_iter().next() else {
                    return Ok(None);
                };
                let value = s
                    .get_attributes(h, &[AttributeType::Value])?
                    .into_iter()
                    .find_map(|a| match a {
                        Attribute::Value(v) => Some(v),
                        _ => None,
                    });
                Ok(value)
            })
            .map_err(ck_err)
    }

    fn store_anchor(&self, name: &str, bytes: &[u8]) -> microcert_center::Result<bool> {
        self.pool
            .with(|s| {
                // A new object first, then the old ones destroyed (SoftHSM2
                // does not let CKA_VALUE of a data object change): a crash
                // in between leaves two, and either is at or behind the
                // database, never ahead.
                let old = s.find_objects(&anchor_template(name))?;
                let mut t = anchor_template(name);
                t.extend([
                    Attribute::Private(true),
                    Attribute::Application(b"microcert".to_vec()),
                    Attribute::Value(bytes.to_vec()),
                ]);
                s.create_object(&t)?;
                for x in old {
                    s.destroy_object(x)?;
                }
                Ok(true)
            })
            .map_err(ck_err)
    }

    fn destroy_storage_key(&self, version: u32) -> microcert_center::Result<()> {
        Pkcs11Card::destroy_storage_key(self, version).map_err(Into::into)
    }

    // The keyring (issue 14): the root key `microcert-kroot` wraps and
    // unwraps storage keys with CKM_AES_KEY_WRAP (RFC 3394) inside the
    // token; an unwrapped key is a session object that never leaves it.

    fn has_keyring_root(&self) -> bool {
        Pkcs11Card::has_keyring_root(self)
    }

    /// C_GenerateKey of an extractable session key, C_WrapKey under the
    /// root, C_DestroyObject: the key exists outside the token only
    /// wrapped.
    fn new_wrapped_storage_key(&self) -> microcert_center::Result<Vec<u8>> {
        let root = self.root()?;
        let wrapped = self
            .in_token(|s| {
                let k = s.generate_key(&Mechanism::AesKeyGen, &keys::fresh_key_template())?;
                let w = s.wrap_key(
                    &Mechanism::AesKeyWrap,
                    self.fixed().kroot.unwrap_or(root),
                    k,
                );
                let d = s.destroy_object(k);
                let w = w?;
                d?;
                Ok(w)
            })
            .map_err(ck_err)?;
        if wrapped.len() != 40 {
            return Err(card_err("AES key wrap output of unexpected length".into()));
        }
        Ok(wrapped)
    }

    /// C_UnwrapKey under the root into a sensitive, non-extractable
    /// session object for CKM_AES_GCM (the root's CKA_UNWRAP_TEMPLATE
    /// allows nothing else).
    fn hold_storage_key(&self, version: u32, wrapped: &[u8]) -> microcert_center::Result<()> {
        let root = self.root()?;
        {
            let k = self.kstore.read().unwrap_or_else(PoisonError::into_inner);
            // Held already with the same bytes (the keyring is re-read
            // every few seconds): nothing to do; a handle the token
            // dropped since is unwrapped again by `rehold`.
            if k.held
                .iter()
                .any(|h| h.version == version && h.wrapped == wrapped)
            {
                return Ok(());
            }
            if k.keys.iter().any(|(v, _)| *v == version) {
                return Err(microcert_center::Error::Keyring(format!(
                    "the keyring's storage key version {version} is also a token object \
                     ({}) on this token: not the keyring of this card",
                    keys::kstore_label(version)
                )));
            }
        }
        let h = self
            .in_token(|s| {
                s.unwrap_key(
                    &Mechanism::AesKeyWrap,
                    self.fixed().kroot.unwrap_or(root),
                    wrapped,
                    &keys::held_key_unwrap_template(),
                )
            })
            .map_err(|e| match e {
                CkError::Pkcs11(
                    RvError::WrappedKeyInvalid
                    | RvError::WrappedKeyLenRange
                    | RvError::EncryptedDataInvalid
                    | RvError::GeneralError,
                    _,
                ) => microcert_center::Error::Keyring(format!(
                    "storage key version {version} does not unwrap under this token's root key \
                     ({}): is this token a clone of the one that made the keyring?",
                    keys::KROOT_LABEL
                )),
                other => ck_err(other),
            })?;
        let old = {
            let mut k = self.kstore.write().unwrap_or_else(PoisonError::into_inner);
            let old = k
                .held
                .iter()
                .position(|x| x.version == version)
                .map(|i| k.held.remove(i).handle);
            k.held.push(Held {
                version,
                wrapped: wrapped.to_vec(),
                handle: h,
            });
            k.held.sort_by_key(|x| x.version);
            old
        };
        if let Some(old) = old {
            let _ = self.pool.with_retry(|s| s.destroy_object(old));
        }
        Ok(())
    }

    fn release_storage_key(&self, version: u32) -> microcert_center::Result<()> {
        let old = {
            let mut k = self.kstore.write().unwrap_or_else(PoisonError::into_inner);
            if version == k.current {
                return Err(microcert_center::Error::CurrentStorageKey { version });
            }
            k.held
                .iter()
                .position(|x| x.version == version)
                .map(|i| k.held.remove(i).handle)
        };
        if let Some(old) = old {
            let _ = self.pool.with_retry(|s| s.destroy_object(old));
        }
        Ok(())
    }

    fn set_storage_key_version(&self, version: u32) -> microcert_center::Result<()> {
        let mut k = self.kstore.write().unwrap_or_else(PoisonError::into_inner);
        if k.handle(version).is_none() {
            return Err(microcert_center::Error::NoStorageKey { version });
        }
        k.current = version;
        Ok(())
    }

    fn held_storage_keys(
        &self,
    ) -> microcert_center::Result<Option<microcert_center::card::WrappedStorageKeys>> {
        let k = self.kstore.read().unwrap_or_else(PoisonError::into_inner);
        let Some(newest) = k.held.last().map(|h| h.version) else {
            return Ok(None);
        };
        let current = if k.held.iter().any(|h| h.version == k.current) {
            k.current
        } else {
            newest
        };
        Ok(Some((
            current,
            k.held
                .iter()
                .map(|h| (h.version, h.wrapped.clone()))
                .collect(),
        )))
    }

    /// The token objects `microcert-kstore-vN`: non-extractable, they
    /// cannot join the keyring and stay on the token beside it.
    fn resident_storage_keys(&self) -> Vec<u32> {
        let k = self.kstore.read().unwrap_or_else(PoisonError::into_inner);
        k.keys.iter().map(|(v, _)| *v).collect()
    }
}
