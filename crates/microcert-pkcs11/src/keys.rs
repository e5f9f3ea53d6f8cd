//! The card's key objects on the token: labels, attribute templates,
//! generation, import, lookup and the attribute check made at open.

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::error::{Pkcs11Error, Result};

/// Label of the transport master key Ktrans.
pub const KTRANS_LABEL: &str = "microcert-ktrans";
/// Label of the integrity key (HMAC-SHA256).
pub const KINT_LABEL: &str = "microcert-kint";
/// Label of the challenge key Kchal.
pub const KCHAL_LABEL: &str = "microcert-kchal";
/// Prefix of the storage keys' labels; the version follows
/// (`microcert-kstore-v1`, `microcert-kstore-v2`, ...).
pub const KSTORE_PREFIX: &str = "microcert-kstore-v";
/// Prefix shared by every object the card makes.
pub const LABEL_PREFIX: &str = "microcert-";

/// The label of Kstore version `v`.
pub fn kstore_label(v: u32) -> String {
    format!("{KSTORE_PREFIX}{v}")
}

/// Whether the card's keys may ever leave the token, chosen once at
/// `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyPolicy {
    /// CKA_EXTRACTABLE false: no key leaves the token in any form, not even
    /// wrapped. A second token of the same center can then only be made
    /// with the HSM vendor's own cloning or backup (docs/hsm.md).
    #[default]
    NonExtractable,
    /// CKA_EXTRACTABLE true with CKA_WRAP_WITH_TRUSTED true: a key leaves
    /// the token only wrapped under a key that the token's security officer
    /// marked CKA_TRUSTED (the clone procedure of [`crate::clone`]). Its
    /// value is still never readable (CKA_SENSITIVE).
    WrapWithTrusted,
}

/// What a card key is for, which fixes its type, size and use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// AES-128 for CKM_AES_CMAC (Ktrans, Kchal).
    Cmac,
    /// 32-byte generic secret for CKM_SHA256_HMAC (integrity key).
    Hmac,
    /// AES-256 for CKM_AES_GCM (Kstore).
    Gcm,
}

impl Role {
    pub(crate) fn key_type(self) -> KeyType {
        match self {
            Role::Cmac | Role::Gcm => KeyType::AES,
            Role::Hmac => KeyType::GENERIC_SECRET,
        }
    }

    pub(crate) fn len(self) -> usize {
        match self {
            Role::Cmac => 16,
            Role::Hmac | Role::Gcm => 32,
        }
    }

    pub(crate) fn of_label(label: &str) -> Option<Role> {
        match label {
            KTRANS_LABEL | KCHAL_LABEL => Some(Role::Cmac),
            KINT_LABEL => Some(Role::Hmac),
            l if parse_kstore_label(l).is_some() => Some(Role::Gcm),
            _ => None,
        }
    }

    fn mechanism(self) -> MechanismType {
        match self {
            Role::Cmac => MechanismType::AES_CMAC,
            Role::Hmac => MechanismType::SHA256_HMAC,
            Role::Gcm => MechanismType::AES_GCM,
        }
    }

    fn gen_mechanism(self) -> Mechanism<'static> {
        match self {
            Role::Cmac | Role::Gcm => Mechanism::AesKeyGen,
            Role::Hmac => Mechanism::GenericSecretKeyGen,
        }
    }
}

/// The version in a Kstore label, if it is one.
pub(crate) fn parse_kstore_label(label: &str) -> Option<u32> {
    let v = label.strip_prefix(KSTORE_PREFIX)?;
    if v.is_empty() || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// The attributes every card key gets, less its value or length: a private
/// token object, sensitive, usable for one mechanism and one direction pair
/// only.
pub(crate) fn template(label: &str, role: Role, policy: KeyPolicy) -> Vec<Attribute> {
    let mac = matches!(role, Role::Cmac | Role::Hmac);
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(role.key_type()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(policy == KeyPolicy::WrapWithTrusted),
        Attribute::WrapWithTrusted(policy == KeyPolicy::WrapWithTrusted),
        Attribute::Sign(mac),
        Attribute::Verify(mac),
        Attribute::Encrypt(!mac),
        Attribute::Decrypt(!mac),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![role.mechanism()]),
    ]
}

/// Makes a new key inside the token.
pub(crate) fn generate(
    session: &Session,
    label: &str,
    role: Role,
    policy: KeyPolicy,
) -> Result<ObjectHandle> {
    let mut t = template(label, role, policy);
    t.push(Attribute::ValueLen((role.len() as u64).into()));
    Ok(session.generate_key(&role.gen_mechanism(), &t)?)
}

/// Creates a key object from known bytes (migration from a software card).
/// The attribute buffer holding the bytes is zeroized afterwards.
pub(crate) fn import(
    session: &Session,
    label: &str,
    role: Role,
    policy: KeyPolicy,
    value: &[u8],
) -> Result<ObjectHandle> {
    if value.len() != role.len() {
        return Err(Pkcs11Error::Format(format!("{label}: wrong key length")));
    }
    let mut t = template(label, role, policy);
    t.push(Attribute::Value(value.to_vec()));
    let result = session.create_object(&t);
    for a in &mut t {
        if let Attribute::Value(v) = a {
            v.zeroize();
        }
    }
    Ok(result?)
}

/// Every secret key object on the token whose label starts with the card's
/// prefix, with its label.
pub(crate) fn card_objects(session: &Session) -> Result<Vec<(String, ObjectHandle)>> {
    let mut out = Vec::new();
    for h in session.find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])? {
        for a in session.get_attributes(h, &[AttributeType::Label])? {
            if let Attribute::Label(l) = a
                && let Ok(l) = String::from_utf8(l)
                && l.starts_with(LABEL_PREFIX)
            {
                out.push((l, h));
            }
        }
    }
    Ok(out)
}

/// The one key labelled `label`.
pub(crate) fn find(session: &Session, label: &str) -> Result<ObjectHandle> {
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    match found.as_slice() {
        [] => Err(Pkcs11Error::KeyMissing {
            label: label.to_owned(),
        }),
        [h] => Ok(*h),
        _ => Err(Pkcs11Error::KeyAttributes {
            label: label.to_owned(),
            reason: format!("{} objects carry this label", found.len()),
        }),
    }
}

/// The refusal of the key `label`'s attributes.
fn refusal(label: &str) -> impl Fn(&str) -> Pkcs11Error + '_ {
    move |reason| Pkcs11Error::KeyAttributes {
        label: label.to_owned(),
        reason: reason.to_owned(),
    }
}

/// The attributes that say whether a key can leave the token (type,
/// length, sensitive, extractable, wrap-with-trusted), then `more`.
fn key_attributes(
    session: &Session,
    h: ObjectHandle,
    more: &[AttributeType],
) -> Result<Vec<Attribute>> {
    let mut types = vec![
        AttributeType::KeyType,
        AttributeType::ValueLen,
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::WrapWithTrusted,
    ];
    types.extend_from_slice(more);
    Ok(session.get_attributes(h, &types)?)
}

/// Refuses a key that could be read out of the token, or that is not the
/// type and size its role needs. Returns the key's policy.
pub(crate) fn check(
    session: &Session,
    h: ObjectHandle,
    label: &str,
    role: Role,
) -> Result<KeyPolicy> {
    let bad = refusal(label);
    let attrs = key_attributes(session, h, &[])?;
    let (mut key_type, mut len, mut sensitive, mut extractable, mut trusted_only) =
        (None, None, false, true, false);
    for a in attrs {
        match a {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::ValueLen(l) => len = Some(u64::from(l)),
            Attribute::Sensitive(b) => sensitive = b,
            Attribute::Extractable(b) => extractable = b,
            Attribute::WrapWithTrusted(b) => trusted_only = b,
            _ => {}
        }
    }
    // SoftHSM2 2.6 records CKA_VALUE_LEN 0 for a key made by C_UnwrapKey
    // (a clone) and refuses it in the unwrap template: 0 means unknown.
    let len_ok = matches!(len, Some(l) if l == role.len() as u64 || l == 0);
    if key_type != Some(role.key_type()) || !len_ok {
        return Err(bad("wrong key type or length"));
    }
    if !sensitive {
        return Err(bad("not sensitive: its value could be read out"));
    }
    match (extractable, trusted_only) {
        (false, _) => Ok(KeyPolicy::NonExtractable),
        (true, true) => Ok(KeyPolicy::WrapWithTrusted),
        (true, false) => Err(bad("extractable under any wrapping key")),
    }
}

/// Label of the keyring root key: AES-256, wraps and unwraps the storage
/// keys of the keyring in the key database (CKM_AES_KEY_WRAP only).
pub const KROOT_LABEL: &str = "microcert-kroot";

/// The attributes of the root key, less its length and its unwrap
/// template: a private token object, sensitive, extractable only as the
/// card's policy allows (never readable), that
/// can only wrap and unwrap with CKM_AES_KEY_WRAP (RFC 3394): no
/// encryption, decryption, signature or derivation with it.
pub(crate) fn root_template(policy: KeyPolicy) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(KROOT_LABEL.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        // Cloneable like the card's other keys (only under a key the
        // token's SO trusted) when the card is.
        Attribute::Extractable(policy == KeyPolicy::WrapWithTrusted),
        Attribute::WrapWithTrusted(policy == KeyPolicy::WrapWithTrusted),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::AES_KEY_WRAP]),
    ]
}

/// What every key unwrapped under the root must be (its CKA_UNWRAP_TEMPLATE,
/// enforced by the token): an AES session object (CKA_TOKEN false),
/// sensitive, not extractable, for encryption and decryption only.
pub(crate) fn held_key_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]
}

/// The template `hold_storage_key` unwraps with: the unwrap template, a
/// private object, CKM_AES_GCM only.
pub(crate) fn held_key_unwrap_template() -> Vec<Attribute> {
    let mut t = held_key_template();
    t.push(Attribute::Private(true));
    t.push(Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]));
    t
}

/// A fresh storage key as a session object, extractable (only so that it
/// can be wrapped under the root once), sensitive, usable for nothing.
pub(crate) fn fresh_key_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32u64.into()),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]
}

/// Runs `call` with the module's function list and the root key's raw
/// template (`outer` plus CKA_UNWRAP_TEMPLATE = [`held_key_template`]).
/// cryptoki 0.12 cannot express an attribute-array attribute, so the calls
/// that make a root key go to the module directly (loaded a second time:
/// the same library state, already initialised by this process), through
/// its C_GetFunctionList (a module need not export every C_ symbol). A
/// function the module lacks is CKR_FUNCTION_NOT_SUPPORTED, never a panic.
#[allow(unsafe_code)]
fn with_root_template(
    module: &std::path::Path,
    outer: &[Attribute],
    call: impl FnOnce(
        &cryptoki_sys::CK_FUNCTION_LIST,
        &mut [cryptoki_sys::CK_ATTRIBUTE],
    ) -> cryptoki_sys::CK_RV,
    function: cryptoki::context::Function,
) -> Result<()> {
    use cryptoki_sys::{CK_ATTRIBUTE, CK_ULONG};

    let inner = held_key_template();
    let mut inner_raw: Vec<CK_ATTRIBUTE> = inner.iter().map(Into::into).collect();
    let mut raw: Vec<CK_ATTRIBUTE> = outer.iter().map(Into::into).collect();
    raw.push(CK_ATTRIBUTE {
        type_: cryptoki_sys::CKA_UNWRAP_TEMPLATE,
        pValue: inner_raw.as_mut_ptr().cast(),
        ulValueLen: (inner_raw.len() * std::mem::size_of::<CK_ATTRIBUTE>()) as CK_ULONG,
    });
    // SAFETY: the module is already loaded and C_Initialize'd by this
    // process (the caller holds a session on it); loading it again gives
    // the same library state and the same function list.
    let err = |reason: String| Pkcs11Error::Module {
        path: module.to_path_buf(),
        reason,
    };
    let lib = unsafe { cryptoki_sys::Pkcs11::new(module) }.map_err(|e| err(e.to_string()))?;
    let get = lib
        .C_GetFunctionList
        .as_ref()
        .map_err(|e| err(format!("C_GetFunctionList: {e}")))?;
    let mut list: *mut cryptoki_sys::CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: C_GetFunctionList writes one pointer into `list`.
    let rv = unsafe { get(&mut list) };
    cryptoki::error::Rv::from(rv).into_result(cryptoki::context::Function::GetFunctionList)?;
    // SAFETY: on success the module points `list` at its static function
    // table, valid while the library is loaded (`lib` is alive here, and
    // the card's own context keeps it loaded anyway).
    let Some(list) = (unsafe { list.as_ref() }) else {
        return Err(err("C_GetFunctionList gave no function list".into()));
    };
    // `raw` points into `outer` and `inner_raw` (into `inner`), all alive
    // until after the call.
    let rv = call(list, &mut raw);
    drop(raw);
    drop(inner_raw);
    cryptoki::error::Rv::from(rv).into_result(function)?;
    Ok(())
}

/// Makes the root key inside the token with its CKA_UNWRAP_TEMPLATE
/// (C_GenerateKey), then finds it by label.
#[allow(unsafe_code)]
pub(crate) fn generate_root(
    module: &std::path::Path,
    session: &Session,
    policy: KeyPolicy,
) -> Result<ObjectHandle> {
    let mut outer = root_template(policy);
    outer.push(Attribute::ValueLen(32u64.into()));
    with_root_template(
        module,
        &outer,
        |list, raw| {
            let mut mech = cryptoki_sys::CK_MECHANISM {
                mechanism: cryptoki_sys::CKM_AES_KEY_GEN,
                pParameter: std::ptr::null_mut(),
                ulParameterLen: 0,
            };
            let mut h: cryptoki_sys::CK_OBJECT_HANDLE = 0;
            let Some(f) = list.C_GenerateKey else {
                return cryptoki_sys::CKR_FUNCTION_NOT_SUPPORTED;
            };
            // SAFETY: every pointer is to a live local or to `raw`, valid
            // for the call; the session handle is the caller's, open.
            unsafe {
                f(
                    session.handle(),
                    &mut mech,
                    raw.as_mut_ptr(),
                    raw.len() as cryptoki_sys::CK_ULONG,
                    &mut h,
                )
            }
        },
        cryptoki::context::Function::GenerateKey,
    )?;
    find(session, KROOT_LABEL)
}

/// Creates the root key from known bytes (C_CreateObject, with its unwrap
/// template): a software card's root moved into the token. The attribute
/// buffer holding the bytes is zeroized afterwards.
#[allow(unsafe_code)]
pub(crate) fn create_root(
    module: &std::path::Path,
    session: &Session,
    policy: KeyPolicy,
    value: &[u8],
) -> Result<ObjectHandle> {
    if value.len() != 32 {
        return Err(Pkcs11Error::Format("keyring root: wrong key length".into()));
    }
    let mut outer = root_template(policy);
    outer.push(Attribute::Value(value.to_vec()));
    let r = with_root_template(
        module,
        &outer,
        |list, raw| {
            let mut h: cryptoki_sys::CK_OBJECT_HANDLE = 0;
            let Some(f) = list.C_CreateObject else {
                return cryptoki_sys::CKR_FUNCTION_NOT_SUPPORTED;
            };
            // SAFETY: the template in `raw` (into `outer`) is valid for the
            // call; the session handle is the caller's, open.
            unsafe {
                f(
                    session.handle(),
                    raw.as_mut_ptr(),
                    raw.len() as cryptoki_sys::CK_ULONG,
                    &mut h,
                )
            }
        },
        cryptoki::context::Function::CreateObject,
    );
    for a in &mut outer {
        if let Attribute::Value(v) = a {
            v.zeroize();
        }
    }
    r?;
    find(session, KROOT_LABEL)
}

/// Unwraps a clone package's root key inside the token (C_UnwrapKey under
/// the key-transport key `kek` with `mechanism`), with its unwrap template.
#[allow(unsafe_code)]
pub(crate) fn unwrap_root(
    module: &std::path::Path,
    session: &Session,
    mechanism: &Mechanism<'_>,
    kek: ObjectHandle,
    wrapped: &[u8],
    policy: KeyPolicy,
) -> Result<ObjectHandle> {
    let outer = root_template(policy);
    let kek = kek.handle();
    with_root_template(
        module,
        &outer,
        |list, raw| {
            let mut mech: cryptoki_sys::CK_MECHANISM = mechanism.into();
            let mut wrapped = wrapped.to_vec();
            let mut h: cryptoki_sys::CK_OBJECT_HANDLE = 0;
            let Some(f) = list.C_UnwrapKey else {
                return cryptoki_sys::CKR_FUNCTION_NOT_SUPPORTED;
            };
            // SAFETY: the mechanism's parameters live in `mechanism`, the
            // wrapped bytes in a local copy, the template in `raw`: all
            // valid for the call; the session handle is the caller's.
            unsafe {
                f(
                    session.handle(),
                    &mut mech,
                    kek,
                    wrapped.as_mut_ptr(),
                    wrapped.len() as cryptoki_sys::CK_ULONG,
                    raw.as_mut_ptr(),
                    raw.len() as cryptoki_sys::CK_ULONG,
                    &mut h,
                )
            }
        },
        cryptoki::context::Function::UnwrapKey,
    )?;
    find(session, KROOT_LABEL)
}

/// Refuses a root key that could be read out, used for anything but
/// wrapping, or is not AES-256.
pub(crate) fn check_root(session: &Session, h: ObjectHandle) -> Result<()> {
    let bad = refusal(KROOT_LABEL);
    let attrs = key_attributes(
        session,
        h,
        &[
            AttributeType::Encrypt,
            AttributeType::Decrypt,
            AttributeType::Sign,
            AttributeType::Derive,
        ],
    )?;
    let trusted_only = attrs.contains(&Attribute::WrapWithTrusted(true));
    for a in attrs {
        let ok = match a {
            Attribute::KeyType(t) => t == KeyType::AES,
            Attribute::ValueLen(l) => matches!(u64::from(l), 32 | 0),
            Attribute::Sensitive(b) => b,
            Attribute::Extractable(b) => !b || trusted_only,
            Attribute::Encrypt(b) | Attribute::Decrypt(b) | Attribute::Sign(b) => !b,
            Attribute::Derive(b) => !b,
            _ => true,
        };
        if !ok {
            return Err(bad(
                "not a sensitive, non-extractable AES-256 key for wrapping only",
            ));
        }
    }
    Ok(())
}
