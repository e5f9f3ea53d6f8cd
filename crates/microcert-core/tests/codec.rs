//! The [`Codec`] trait on the committed known-answer messages: for every
//! type and suite, decode then encode gives the same bytes, `len` is the
//! encoded length and `BODY_LEN` the bytes between header and tag, and the
//! shared encoder refuses a tag of the wrong length and a short buffer
//! without writing.

mod common;

use common::Kat;
use microcert_core::{
    Auth, AuthResponse, Codec, Command, Enroll, Error, HEADER_LEN, Receipt, Sealed, Signature,
};

fn round_trip<'a, M: Codec<'a> + core::fmt::Debug + PartialEq>(bytes: &'a [u8]) {
    let msg = <M as Codec<'a>>::decode(bytes).unwrap();
    assert_eq!(Codec::len(&msg), bytes.len());
    let tag_len = msg.header().suite.tag_len();
    assert_eq!(msg.tag().len(), tag_len);
    assert_eq!(msg.tag(), &bytes[bytes.len() - tag_len..]);
    assert_eq!(HEADER_LEN + msg.body_len() + tag_len, bytes.len());
    if let Some(n) = M::BODY_LEN {
        assert_eq!(n, msg.body_len());
    }
    assert_eq!(&bytes[0], &(0x10 | M::TYPE.get()));

    let mut out = vec![0xa5u8; bytes.len() + 7];
    let n = Codec::encode(&msg, &mut out).unwrap();
    assert_eq!(&out[..n], bytes);
    assert!(out[n..].iter().all(|&b| b == 0xa5), "wrote past the end");

    // One byte short: refused, nothing written.
    let mut short = vec![0xa5u8; bytes.len() - 1];
    assert_eq!(Codec::encode(&msg, &mut short), Err(Error::BufferTooSmall));
    assert!(short.iter().all(|&b| b == 0xa5));
}

fn each(ty: &str, f: impl Fn(&[u8])) {
    let kat = Kat::load();
    let mut seen = 0;
    for rec in kat.of_type(ty) {
        f(&rec.hex("MESSAGE"));
        seen += 1;
    }
    assert!(seen >= 2, "{ty}: {seen} vectors");
}

#[test]
fn every_type_round_trips_through_the_trait() {
    each("auth", |m| round_trip::<Auth<'_>>(m));
    each("auth-response", |m| round_trip::<AuthResponse<'_>>(m));
    each("signature", |m| round_trip::<Signature<'_>>(m));
    each("sealed", |m| round_trip::<Sealed<'_>>(m));
    each("enroll-transport", |m| round_trip::<Enroll<'_>>(m));
    each("enroll-update", |m| round_trip::<Enroll<'_>>(m));
    each("command", |m| round_trip::<Command<'_>>(m));
    each("receipt-center", |m| round_trip::<Receipt<'_>>(m));
    each("receipt-node", |m| round_trip::<Receipt<'_>>(m));
}

#[test]
fn a_tag_of_the_wrong_length_is_not_encoded() {
    let kat = Kat::load();
    let m = kat.message("receipt-node", 1);
    let good = Receipt::decode(&m).unwrap();
    for len in [0usize, 7, 9, 16] {
        let tag = vec![0u8; len];
        let bad = Receipt { tag: &tag, ..good };
        let mut out = [0x5au8; 64];
        assert_eq!(Codec::encode(&bad, &mut out), Err(Error::Length), "{len}");
        assert!(out.iter().all(|&b| b == 0x5a));
    }
}

#[test]
fn a_sealed_body_over_the_ccm_limit_is_not_encoded() {
    let kat = Kat::load();
    let m = kat.message("sealed", 1);
    let good = Sealed::decode(&m).unwrap();
    let big = vec![0u8; microcert_core::MAX_SEALED_PLAINTEXT + 1];
    let bad = Sealed {
        ciphertext: &big,
        ..good
    };
    let mut out = vec![0u8; big.len() + 64];
    assert_eq!(Codec::encode(&bad, &mut out), Err(Error::PlaintextTooLong));
}
