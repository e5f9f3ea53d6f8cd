//! Moving a software card into a token: its key block (the bytes its
//! Shamir backup shares recover) becomes token objects, so that a key
//! database sealed by the software card opens unchanged on the token.
//!
//! The key block, version 1 (microcert-center's `CardKeys` encoding):
//!
//! | size | field |
//! | --- | --- |
//! | 1 | version = 1 |
//! | 16 | card id |
//! | 16 | Ktrans |
//! | 32 | integrity key |
//! | 16 | Kchal |
//! | 4 | current Kstore version |
//! | 1 | n, number of Kstore versions (at least 1) |
//! | 36 x n | version (4) \|\| Kstore (32) |
//!
//! Version 2 is a card whose storage keys are in the keyring of the key
//! database (issue 14): n = 0, and the token gets the card's keyring root
//! instead, HMAC-SHA256(integrity key, "MC-KEYRING-ROOT\0") as the
//! software card derives it, so the keyring rows, wrapped under that
//! root, open in the token unchanged.

use zeroize::Zeroizing;

use crate::card::{Pkcs11Card, make_all, one_session, refuse_existing};
use crate::config::Pkcs11Config;
use crate::error::{Pkcs11Error, Result};
use crate::keys::{self, KCHAL_LABEL, KINT_LABEL, KTRANS_LABEL, KeyPolicy, Role};

const BLOCK_VERSION: u8 = 1;
const BLOCK_VERSION_KEYRING: u8 = 2;
/// The software card's derivation of its keyring root from its integrity
/// key (HMAC-SHA256 message).
const ROOT_LABEL: &[u8] = b"MC-KEYRING-ROOT\0";
const FIXED: usize = 1 + 16 + 16 + 32 + 16 + 4 + 1;

/// A block's keys, by label, in zeroizing buffers.
type Labelled = Vec<(String, Zeroizing<Vec<u8>>)>;

/// The keys of a block, and whether it is a keyring card's (version 2:
/// no storage keys, a root instead).
fn parse(block: &[u8]) -> Result<(Labelled, bool)> {
    let bad = |why: &str| Pkcs11Error::Format(format!("software card key block: {why}"));
    if block.len() < FIXED || (block[0] != BLOCK_VERSION && block[0] != BLOCK_VERSION_KEYRING) {
        return Err(bad("wrong length or version"));
    }
    let keyring = block[0] == BLOCK_VERSION_KEYRING;
    let n = usize::from(block[FIXED - 1]);
    if (n == 0) != keyring || block.len() != FIXED + 36 * n {
        return Err(bad("wrong length"));
    }
    let current = u32::from_be_bytes([block[81], block[82], block[83], block[84]]);
    let key = |r: std::ops::Range<usize>| Zeroizing::new(block[r].to_vec());
    let mut out = vec![
        (KTRANS_LABEL.to_owned(), key(17..33)),
        (KINT_LABEL.to_owned(), key(33..65)),
        (KCHAL_LABEL.to_owned(), key(65..81)),
    ];
    let mut versions = Vec::with_capacity(n);
    for i in 0..n {
        let o = FIXED + 36 * i;
        let v = u32::from_be_bytes([block[o], block[o + 1], block[o + 2], block[o + 3]]);
        if v == 0 || versions.contains(&v) {
            return Err(bad("Kstore version 0 or repeated"));
        }
        versions.push(v);
        out.push((keys::kstore_label(v), key(o + 4..o + 36)));
    }
    // The token's current version is its highest: the block must agree.
    if !keyring && versions.iter().max() != Some(&current) {
        return Err(bad("the current Kstore version is not the highest"));
    }
    Ok((out, keyring))
}

impl Pkcs11Card {
    /// Creates the keys of a software card's key block (as recovered by
    /// `microcert_center::card::recover_secret` from its backup shares)
    /// as token objects with `policy`, and opens the card. Refused when
    /// the token already holds card keys.
    ///
    /// The keys were in host memory before, so the token marks them as not
    /// always sensitive (CKA_ALWAYS_SENSITIVE false); from now on they are
    /// as protected as generated ones, and the block and its shares should
    /// be destroyed.
    ///
    /// A keyring card's block (version 2) gives the token the card's
    /// keyring root (`microcert-kroot`, the value the software card
    /// derives, computed by the token from the imported integrity key), so
    /// the key database's keyring opens on the token as it did on the
    /// software card. A version 1 block gives no root: its storage keys
    /// become token objects, as before the keyring.
    pub fn import_key_block(
        config: &Pkcs11Config,
        block: &[u8],
        policy: KeyPolicy,
    ) -> Result<Self> {
        let (parsed, keyring) = parse(block)?;
        let session = one_session(config)?;
        refuse_existing(&session)?;
        let labels: Vec<&str> = parsed.iter().map(|(l, _)| l.as_str()).collect();
        make_all(&session, &labels, |label| {
            let value = parsed
                .iter()
                .find(|(l, _)| l == label)
                .map(|(_, v)| v)
                .ok_or_else(|| Pkcs11Error::Format(label.into()))?;
            let role = Role::of_label(label).ok_or_else(|| Pkcs11Error::Format(label.into()))?;
            keys::import(&session, label, role, policy, value)
        })?;
        if keyring && let Err(e) = import_root(config, &session, policy) {
            for (_, h) in keys::card_objects(&session).unwrap_or_default() {
                let _ = session.destroy_object(h);
            }
            return Err(e);
        }
        drop(session);
        tracing::info!(token = %config.token_label, "software card keys imported into the token");
        Self::open(config)
    }
}

/// The software card's root, derived in the token from the imported
/// integrity key and created as `microcert-kroot` (it crosses host memory
/// once, as the block did).
fn import_root(
    config: &Pkcs11Config,
    session: &cryptoki::session::Session,
    policy: KeyPolicy,
) -> Result<()> {
    let kint = keys::find(session, KINT_LABEL)?;
    let root = Zeroizing::new(session.sign(
        &cryptoki::mechanism::Mechanism::Sha256Hmac,
        kint,
        ROOT_LABEL,
    )?);
    keys::create_root(&config.module, session, policy, &root)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(versions: &[u32], current: u32) -> Vec<u8> {
        let mut b = vec![BLOCK_VERSION];
        b.extend_from_slice(&[0u8; 16 + 16 + 32 + 16]);
        b.extend_from_slice(&current.to_be_bytes());
        b.push(versions.len() as u8);
        for v in versions {
            b.extend_from_slice(&v.to_be_bytes());
            b.extend_from_slice(&[9u8; 32]);
        }
        b
    }

    #[test]
    fn parses_a_block() {
        let (keys, keyring) = parse(&block(&[1, 2], 2)).unwrap();
        assert!(!keyring);
        let labels: Vec<_> = keys.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(
            labels,
            [
                KTRANS_LABEL,
                KINT_LABEL,
                KCHAL_LABEL,
                "microcert-kstore-v1",
                "microcert-kstore-v2"
            ]
        );
        assert_eq!(keys[4].1.len(), 32);
    }

    #[test]
    fn rejects_bad_blocks() {
        let good = block(&[1], 1);
        assert!(parse(&good[..good.len() - 1]).is_err());
        let mut wrong_version = good.clone();
        wrong_version[0] = 2;
        assert!(parse(&wrong_version).is_err());
        assert!(parse(&block(&[], 1)).is_err());
        assert!(parse(&block(&[1, 2], 1)).is_err());
        assert!(parse(&block(&[1, 1], 1)).is_err());
        assert!(parse(&block(&[0], 0)).is_err());
        // A keyring card's block has no storage keys, and only it.
        let mut keyring = block(&[], 0);
        keyring[0] = 2;
        let (keys, is_keyring) = parse(&keyring).unwrap();
        assert!(is_keyring && keys.len() == 3);
        let mut v2_with_keys = block(&[1], 1);
        v2_with_keys[0] = 2;
        assert!(parse(&v2_with_keys).is_err());
    }
}
