//! M-of-N Shamir backup of a card's keys (vsss-rs, byte-wise over GF(2^8)).
//!
//! A share is one printable line:
//!
//! ```text
//! mcs1-<hex of: set id (8) || threshold (1) || share count (1) || x (1) || y (secret length)>-<hex checksum (4)>
//! ```
//!
//! The checksum is SHA-256 of everything before it (the `mcs1-...` text,
//! without the final dash) cut to 4 bytes: it catches a mistyped share
//! before any arithmetic. The set id ties the shares of one split
//! together. The secret that is split is the card's key block followed by
//! the first 16 bytes of its SHA-256, so a combination of too few (or of
//! mismatched) shares is detected instead of yielding wrong keys.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use vsss_rs::Gf256;
use zeroize::{Zeroize, Zeroizing};

use crate::{Error, Result};

const PREFIX: &str = "mcs1-";
const CHECK_LEN: usize = 16;

/// Why shares were refused; carried in [`Error::Shares`] as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareError {
    /// A share is not in the `mcs1-` format or its checksum is wrong.
    Format,
    /// Shares of different splits were mixed.
    MixedSets,
    /// Fewer shares than the threshold.
    TooFew,
    /// The shares combined to something that is not the split secret.
    Mismatch,
}

impl ShareError {
    fn into_error(self, detail: &str) -> Error {
        let what = match self {
            ShareError::Format => "malformed share",
            ShareError::MixedSets => "shares come from different splits",
            ShareError::TooFew => "fewer shares than the threshold",
            ShareError::Mismatch => "shares do not combine to a valid secret",
        };
        if detail.is_empty() {
            Error::Shares(what.into())
        } else {
            Error::Shares(format!("{what}: {detail}"))
        }
    }
}

fn checksum(text: &str) -> [u8; 4] {
    let d = Sha256::digest(text.as_bytes());
    [d[0], d[1], d[2], d[3]]
}

/// Splits `secret` into `shares` printable shares, any `threshold` of which
/// recover it.
pub fn split_secret(secret: &[u8], shares: u8, threshold: u8) -> Result<Vec<String>> {
    if threshold < 2 || shares < threshold {
        return Err(Error::ShareThreshold { threshold, shares });
    }
    let mut set_id = [0u8; 8];
    super::software::card_random(&mut set_id)?;
    let mut with_check = Zeroizing::new(Vec::with_capacity(secret.len() + CHECK_LEN));
    with_check.extend_from_slice(secret);
    with_check.extend_from_slice(&Sha256::digest(secret)[..CHECK_LEN]);
    // The share polynomials' coefficients are key material: from the
    // card's SP 800-90A DRBG like every other key the software card makes.
    let rng = rand_core::UnwrapErr(CardRng);
    let mut raw = Gf256::split_bytes(
        usize::from(threshold),
        usize::from(shares),
        &with_check[..],
        rng,
    )
    .map_err(|e| Error::Shares(format!("split failed: {e}")))?;
    let mut out = Vec::with_capacity(raw.len());
    for share in &raw {
        let mut body = Zeroizing::new(Vec::with_capacity(10 + share.len()));
        body.extend_from_slice(&set_id);
        body.push(threshold);
        body.push(shares);
        body.extend_from_slice(share);
        let text = format!("{PREFIX}{}", hex::encode(&body[..]));
        let check = hex::encode(checksum(&text));
        out.push(format!("{text}-{check}"));
    }
    for s in raw.iter_mut() {
        s.zeroize();
    }
    Ok(out)
}

/// The software card's DRBG as a `rand_core` generator.
#[derive(Debug)]
struct CardRng;

/// Why the card's DRBG gave no bytes.
#[derive(Debug)]
struct CardRngError;

impl core::fmt::Display for CardRngError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("the card's random generator failed")
    }
}

impl core::error::Error for CardRngError {}

impl rand_core::TryRng for CardRng {
    type Error = CardRngError;

    fn try_next_u32(&mut self) -> core::result::Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> core::result::Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> core::result::Result<(), Self::Error> {
        super::software::card_random(dst).map_err(|_| CardRngError)
    }
}

impl rand_core::TryCryptoRng for CardRng {}

struct Parsed {
    set_id: [u8; 8],
    threshold: u8,
    share: Zeroizing<Vec<u8>>,
}

fn parse(line: &str) -> Result<Parsed> {
    let line = line.trim();
    let (text, check) = line
        .rsplit_once('-')
        .ok_or_else(|| ShareError::Format.into_error("no checksum"))?;
    let body_hex = text
        .strip_prefix(PREFIX)
        .ok_or_else(|| ShareError::Format.into_error("does not start with mcs1-"))?;
    let check = hex::decode(check).map_err(|_| ShareError::Format.into_error("checksum"))?;
    if check != checksum(text) {
        return Err(ShareError::Format.into_error("checksum mismatch (mistyped share?)"));
    }
    let body =
        Zeroizing::new(hex::decode(body_hex).map_err(|_| ShareError::Format.into_error("hex"))?);
    if body.len() < 12 {
        return Err(ShareError::Format.into_error("too short"));
    }
    let mut set_id = [0u8; 8];
    set_id.copy_from_slice(&body[..8]);
    Ok(Parsed {
        set_id,
        threshold: body[8],
        share: Zeroizing::new(body[10..].to_vec()),
    })
}

/// Recovers the secret from at least its threshold of shares.
pub fn recover_secret<S: AsRef<str>>(shares: &[S]) -> Result<Zeroizing<Vec<u8>>> {
    let parsed = shares
        .iter()
        .map(|s| parse(s.as_ref()))
        .collect::<Result<Vec<_>>>()?;
    let first = parsed
        .first()
        .ok_or_else(|| ShareError::TooFew.into_error("no shares"))?;
    if parsed
        .iter()
        .any(|p| p.set_id != first.set_id || p.share.len() != first.share.len())
    {
        return Err(ShareError::MixedSets.into_error(""));
    }
    let mut xs: Vec<u8> = parsed.iter().map(|p| p.share[0]).collect();
    xs.sort_unstable();
    xs.dedup();
    if xs.len() < usize::from(first.threshold) {
        return Err(ShareError::TooFew.into_error(&format!(
            "{} distinct shares, {} needed",
            xs.len(),
            first.threshold
        )));
    }
    let raw: Vec<Vec<u8>> = parsed.iter().map(|p| p.share.to_vec()).collect();
    let mut raw = Zeroizing::new(raw);
    let combined =
        Gf256::combine_bytes(&raw[..]).map_err(|e| ShareError::Mismatch.into_error(&e.to_string()));
    for s in raw.iter_mut() {
        s.zeroize();
    }
    let combined = Zeroizing::new(combined?);
    if combined.len() < CHECK_LEN {
        return Err(ShareError::Mismatch.into_error(""));
    }
    let (secret, check) = combined.split_at(combined.len() - CHECK_LEN);
    if !bool::from(Sha256::digest(secret)[..CHECK_LEN].ct_eq(check)) {
        return Err(ShareError::Mismatch.into_error(""));
    }
    Ok(Zeroizing::new(secret.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_three_of_five() {
        let secret = b"the card's key block, for the test".to_vec();
        let shares = split_secret(&secret, 5, 3).unwrap();
        assert_eq!(shares.len(), 5);
        for a in 0..5 {
            for b in a + 1..5 {
                for c in b + 1..5 {
                    let pick = [&shares[a], &shares[b], &shares[c]];
                    assert_eq!(&recover_secret(&pick).unwrap()[..], &secret[..]);
                }
                assert!(matches!(
                    recover_secret(&[&shares[a], &shares[b]]),
                    Err(Error::Shares(_))
                ));
            }
        }
    }

    #[test]
    fn mistyped_share_is_caught_by_checksum() {
        let shares = split_secret(b"secret", 3, 2).unwrap();
        let mut bad = shares[0].clone().into_bytes();
        let i = PREFIX.len() + 30;
        bad[i] = if bad[i] == b'0' { b'1' } else { b'0' };
        let bad = String::from_utf8(bad).unwrap();
        let err = recover_secret(&[bad.as_str(), shares[1].as_str()]).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn forged_threshold_still_detected() {
        // Rewrite a share's threshold byte to 1 with a fresh checksum: the
        // early count check passes, the secret's own check must not.
        let shares = split_secret(b"secret material", 5, 3).unwrap();
        let forge = |s: &str| {
            let (text, _) = s.rsplit_once('-').unwrap();
            let mut body = hex::decode(text.strip_prefix(PREFIX).unwrap()).unwrap();
            body[8] = 1;
            let text = format!("{PREFIX}{}", hex::encode(body));
            let check = hex::encode(checksum(&text));
            format!("{text}-{check}")
        };
        let two = [forge(&shares[0]), forge(&shares[1])];
        assert!(matches!(recover_secret(&two), Err(Error::Shares(_))));
    }
}
