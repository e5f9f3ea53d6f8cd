//! Cloning a card to a second token of the same center, with standard
//! PKCS#11 key wrapping (docs/hsm.md, "Cloning to a second token").
//!
//! Only a card made with [`KeyPolicy::WrapWithTrusted`] can be cloned this
//! way: its keys are CKA_EXTRACTABLE but CKA_WRAP_WITH_TRUSTED, so they leave
//! the token only wrapped under a key its security officer marked
//! CKA_TRUSTED. The ceremony, in order:
//!
//! 1. On the new token: [`prepare_clone_target`] makes an RSA-3072 key pair
//!    inside it; only the public half leaves it, as a [`CloneRequest`].
//! 2. On the old token, its security officer checks the request's
//!    fingerprint out of band and runs [`trust_clone_target`], which stores
//!    the public key with CKA_TRUSTED (only an SO may set it).
//! 3. The old card runs [`Pkcs11Card::export_for_clone`]: every key is
//!    wrapped inside the old token with RSA-OAEP under the trusted public
//!    key. The [`ClonePackage`] holds ciphertext only the new token opens.
//! 4. On the new token: [`Pkcs11Card::import_clone`] unwraps the keys
//!    inside it with the same labels and attributes, destroys the key-
//!    transport pair, and opens the card.
//! 5. The old token's SO removes the trusted key with
//!    [`forget_clone_target`].

use std::fmt;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::card::{Pkcs11Card, make_all, one_session, refuse_existing};
use crate::config::Pkcs11Config;
use crate::error::{Pkcs11Error, Result};
use crate::keys::{self, KeyPolicy, Role};
use crate::pool;

/// Label of the key-transport private key made on a clone target.
pub const CLONE_KEK_LABEL: &str = "microcert-clone-kek";
/// Label of the trusted public key stored on the source token.
pub const CLONE_TARGET_LABEL: &str = "microcert-clone-target";

const RSA_BITS: u64 = 3072;

/// The public key-transport key of a clone target (public data).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneRequest {
    /// RSA modulus, big-endian.
    pub modulus: Vec<u8>,
    /// RSA public exponent, big-endian.
    pub public_exponent: Vec<u8>,
}

impl CloneRequest {
    /// SHA-256 of modulus and exponent, in hex: the operators of both
    /// tokens compare it out of band before the SO trusts the key.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update((self.modulus.len() as u32).to_be_bytes());
        h.update(&self.modulus);
        h.update(&self.public_exponent);
        hex::encode(h.finalize())
    }
}

impl fmt::Debug for CloneRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloneRequest")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// OAEP's hash, recorded in the package so that the target unwraps with
/// the one the source could use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OaepHash {
    /// SHA-256 with MGF1-SHA-256.
    Sha256,
    /// SHA-1 with MGF1-SHA-1 (SoftHSM2 2.6 supports only this for OAEP;
    /// OAEP's security does not rest on collision resistance).
    Sha1,
}

impl OaepHash {
    fn mechanism(self) -> Mechanism<'static> {
        let (hash, mgf) = match self {
            OaepHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
            OaepHash::Sha1 => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
        };
        Mechanism::RsaPkcsOaep(PkcsOaepParams::new(hash, mgf, PkcsOaepSource::empty()))
    }
}

/// One card key wrapped for the clone target.
#[derive(Clone, Serialize, Deserialize)]
pub struct WrappedKey {
    /// The key's object label.
    pub label: String,
    /// RSA-OAEP ciphertext of the key value.
    pub wrapped: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey")
            .field("label", &self.label)
            .field("len", &self.wrapped.len())
            .finish()
    }
}

/// Every key of a card, wrapped for one clone target; only that target
/// token can open it.
#[derive(Clone, Serialize, Deserialize)]
pub struct ClonePackage {
    /// The keys' policy, kept on the clone.
    pub policy: KeyPolicy,
    /// The OAEP hash used.
    pub oaep: OaepHash,
    /// The wrapped keys.
    pub keys: Vec<WrappedKey>,
}

impl fmt::Debug for ClonePackage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labels: Vec<_> = self.keys.iter().map(|k| k.label.as_str()).collect();
        f.debug_struct("ClonePackage")
            .field("policy", &self.policy)
            .field("oaep", &self.oaep)
            .field("keys", &labels)
            .finish()
    }
}

fn find_one(session: &Session, template: &[Attribute]) -> Result<Option<ObjectHandle>> {
    Ok(session.find_objects(template)?.into_iter().next())
}

/// Step 1, on the new token (which must hold no card keys): makes the
/// key-transport pair inside it and returns its public half. Running it
/// again replaces an earlier pair.
pub fn prepare_clone_target(config: &Pkcs11Config) -> Result<CloneRequest> {
    let session = one_session(config)?;
    refuse_existing(&session)?;
    let kek = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Label(CLONE_KEK_LABEL.as_bytes().to_vec()),
    ];
    for h in session.find_objects(&kek)? {
        session.destroy_object(h)?;
    }
    let public = [
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::ModulusBits(RSA_BITS.into()),
        Attribute::PublicExponent(vec![1, 0, 1]),
        Attribute::Wrap(true),
        Attribute::Encrypt(false),
        Attribute::Verify(false),
    ];
    let private = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Unwrap(true),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Label(CLONE_KEK_LABEL.as_bytes().to_vec()),
    ];
    let (pub_h, _) = session.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)?;
    let mut req = CloneRequest {
        modulus: Vec::new(),
        public_exponent: Vec::new(),
    };
    for a in session.get_attributes(
        pub_h,
        &[AttributeType::Modulus, AttributeType::PublicExponent],
    )? {
        match a {
            Attribute::Modulus(m) => req.modulus = m,
            Attribute::PublicExponent(e) => req.public_exponent = e,
            _ => {}
        }
    }
    session.destroy_object(pub_h)?;
    if req.modulus.is_empty() || req.public_exponent.is_empty() {
        return Err(Pkcs11Error::Token(
            "the token did not return the public key".into(),
        ));
    }
    Ok(req)
}

/// An SO session on the configured token. PKCS#11 allows one user type
/// logged in per token and application, so no card may be open on this
/// token in this process.
fn so_session(config: &Pkcs11Config, so_pin: &str) -> Result<Session> {
    let ctx = pool::module(&config.module)?;
    let slot = pool::find_slot(&ctx, &config.token_label)?;
    let session = ctx.open_rw_session(slot)?;
    match session.login(UserType::So, Some(&AuthPin::new(so_pin.into()))) {
        Ok(()) => Ok(session),
        Err(CkError::Pkcs11(RvError::UserAnotherAlreadyLoggedIn, _)) => {
            Err(Pkcs11Error::UserLoggedIn)
        }
        Err(e) => Err(e.into()),
    }
}

/// Step 2, on the old token, by its security officer: stores the clone
/// target's public key with CKA_TRUSTED, so that the card's keys may be
/// wrapped under it.
pub fn trust_clone_target(
    config: &Pkcs11Config,
    so_pin: &str,
    request: &CloneRequest,
) -> Result<()> {
    let session = so_session(config, so_pin)?;
    session.create_object(&[
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Trusted(true),
        Attribute::Wrap(true),
        Attribute::Encrypt(false),
        Attribute::Verify(false),
        Attribute::Label(CLONE_TARGET_LABEL.as_bytes().to_vec()),
        Attribute::Modulus(request.modulus.clone()),
        Attribute::PublicExponent(request.public_exponent.clone()),
    ])?;
    session.logout()?;
    Ok(())
}

/// Step 5, on the old token, by its security officer: removes every
/// trusted clone-target key.
pub fn forget_clone_target(config: &Pkcs11Config, so_pin: &str) -> Result<usize> {
    let session = so_session(config, so_pin)?;
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::Label(CLONE_TARGET_LABEL.as_bytes().to_vec()),
    ])?;
    for h in &found {
        session.destroy_object(*h)?;
    }
    session.logout()?;
    Ok(found.len())
}

impl Pkcs11Card {
    /// Step 3: wraps every key of this card, inside the token, under the
    /// trusted public key of `request`. Refused for non-extractable keys
    /// and when the SO has not trusted this request's key.
    pub fn export_for_clone(&self, request: &CloneRequest) -> Result<ClonePackage> {
        if self.key_policy() != KeyPolicy::WrapWithTrusted {
            return Err(Pkcs11Error::KeysNotExtractable);
        }
        let labelled = self.labelled_keys();
        self.pool().with(|s| {
            let target = find_one(
                s,
                &[
                    Attribute::Class(ObjectClass::PUBLIC_KEY),
                    Attribute::Label(CLONE_TARGET_LABEL.as_bytes().to_vec()),
                    Attribute::Modulus(request.modulus.clone()),
                    Attribute::Trusted(true),
                ],
            )?
            .ok_or(Pkcs11Error::CloneTargetNotTrusted)?;
            let mut oaep = OaepHash::Sha256;
            let mut keys = Vec::with_capacity(labelled.len());
            for (label, h) in labelled {
                let wrapped = match s.wrap_key(&oaep.mechanism(), target, h) {
                    Err(CkError::Pkcs11(
                        RvError::MechanismParamInvalid | RvError::ArgumentsBad,
                        _,
                    )) if oaep == OaepHash::Sha256 && keys.is_empty() => {
                        oaep = OaepHash::Sha1;
                        s.wrap_key(&oaep.mechanism(), target, h)?
                    }
                    other => other?,
                };
                keys.push(WrappedKey { label, wrapped });
            }
            Ok(ClonePackage {
                policy: self.key_policy(),
                oaep,
                keys,
            })
        })
    }

    /// Step 4, on the new token: unwraps the package's keys inside it with
    /// the source's labels and policy, destroys the key-transport pair and
    /// opens the card.
    pub fn import_clone(config: &Pkcs11Config, package: &ClonePackage) -> Result<Self> {
        let session = one_session(config)?;
        refuse_existing(&session)?;
        let kek = find_one(
            &session,
            &[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(CLONE_KEK_LABEL.as_bytes().to_vec()),
            ],
        )?
        .ok_or_else(|| Pkcs11Error::KeyMissing {
            label: CLONE_KEK_LABEL.into(),
        })?;
        let labels: Vec<&str> = package.keys.iter().map(|k| k.label.as_str()).collect();
        make_all(&session, &labels, |label| {
            let wrapped = package
                .keys
                .iter()
                .find(|k| k.label == label)
                .map(|k| k.wrapped.as_slice())
                .unwrap_or_default();
            if label == keys::KROOT_LABEL {
                // With its unwrap template, which cryptoki cannot express.
                return keys::unwrap_root(
                    &config.module,
                    &session,
                    &package.oaep.mechanism(),
                    kek,
                    wrapped,
                    package.policy,
                );
            }
            let role = Role::of_label(label)
                .ok_or_else(|| Pkcs11Error::Format(format!("unknown key label {label:?}")))?;
            let template = keys::template(label, role, package.policy);
            Ok(session.unwrap_key(&package.oaep.mechanism(), kek, wrapped, &template)?)
        })?;
        session.destroy_object(kek)?;
        drop(session);
        Self::open(config)
    }
}
