//! AES key wrap (RFC 3394, default IV `A6A6A6A6A6A6A6A6`) under a 256-bit
//! key encryption key: how the keyring's storage keys are stored under the
//! card's root key ([`crate::keyring`]). Written here on the `aes` block
//! cipher the workspace already uses (no new crate); checked against the
//! RFC's test vector 4.6.

use aes_gcm::aes::Aes256;
use aes_gcm::aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

const IV: [u8; 8] = [0xa6; 8];

/// Wraps a 256-bit key: 40 bytes out.
pub(crate) fn wrap(kek: &[u8; 32], key: &[u8; 32]) -> [u8; 40] {
    let aes = Aes256::new(kek.into());
    let mut a = IV;
    let mut r = Zeroizing::new([[0u8; 8]; 4]);
    for (i, blk) in r.iter_mut().enumerate() {
        blk.copy_from_slice(&key[i * 8..i * 8 + 8]);
    }
    let mut b = Zeroizing::new([0u8; 16]);
    for j in 0..6u64 {
        for i in 0..4usize {
            b[..8].copy_from_slice(&a);
            b[8..].copy_from_slice(&r[i]);
            aes.encrypt_block((&mut *b).into());
            let t = j * 4 + i as u64 + 1;
            a.copy_from_slice(&b[..8]);
            for (x, y) in a.iter_mut().zip(t.to_be_bytes()) {
                *x ^= y;
            }
            r[i].copy_from_slice(&b[8..]);
        }
    }
    let mut out = [0u8; 40];
    out[..8].copy_from_slice(&a);
    for (i, blk) in r.iter().enumerate() {
        out[8 + i * 8..16 + i * 8].copy_from_slice(blk);
    }
    out
}

/// Unwraps a 40-byte wrapped 256-bit key; None when it does not
/// authenticate (wrong key encryption key, altered bytes, wrong length).
pub(crate) fn unwrap(kek: &[u8; 32], wrapped: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    if wrapped.len() != 40 {
        return None;
    }
    let aes = Aes256::new(kek.into());
    let mut a = [0u8; 8];
    a.copy_from_slice(&wrapped[..8]);
    let mut r = Zeroizing::new([[0u8; 8]; 4]);
    for (i, blk) in r.iter_mut().enumerate() {
        blk.copy_from_slice(&wrapped[8 + i * 8..16 + i * 8]);
    }
    let mut b = Zeroizing::new([0u8; 16]);
    for j in (0..6u64).rev() {
        for i in (0..4usize).rev() {
            let t = j * 4 + i as u64 + 1;
            for (x, y) in a.iter_mut().zip(t.to_be_bytes()) {
                *x ^= y;
            }
            b[..8].copy_from_slice(&a);
            b[8..].copy_from_slice(&r[i]);
            aes.decrypt_block((&mut *b).into());
            a.copy_from_slice(&b[..8]);
            r[i].copy_from_slice(&b[8..]);
        }
    }
    let ok: bool = a.ct_eq(&IV).into();
    a.zeroize();
    if !ok {
        return None;
    }
    let mut out = Zeroizing::new([0u8; 32]);
    for (i, blk) in r.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(blk);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3394_vector_4_6() {
        let kek: [u8; 32] = core::array::from_fn(|i| i as u8);
        let key: [u8; 32] =
            hex::decode("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
                .unwrap()
                .try_into()
                .unwrap();
        let w = wrap(&kek, &key);
        assert_eq!(
            hex::encode_upper(w),
            "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"
        );
        assert_eq!(&*unwrap(&kek, &w).unwrap(), &key);
        let mut bad = w;
        bad[20] ^= 1;
        assert!(unwrap(&kek, &bad).is_none());
        let mut other = kek;
        other[0] ^= 1;
        assert!(unwrap(&other, &w).is_none());
        assert!(unwrap(&kek, &w[..39]).is_none());
    }
}
