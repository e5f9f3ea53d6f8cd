//! Small, named rejection cases for truncated and over-long input of each
//! message type, on the committed known-answer messages.

mod common;

use common::Kat;
use microcert_core::{
    Auth, AuthResponse, Command, Enroll, Error, HEADER_LEN, Header, Message, Receipt, Sealed,
    Signature,
};

fn kat(ty: &str, suite: u8) -> Vec<u8> {
    Kat::load().message(ty, suite)
}

/// The shortest valid encoding of the type: the known answer, or for
/// SEALED (whose ciphertext may have any length) a header and a tag, so
/// that any shorter input cuts into the tag.
fn shortest(ty: &str, suite: u8) -> Vec<u8> {
    let mut m = kat(ty, suite);
    if ty == "sealed" {
        m.truncate(HEADER_LEN + if suite == 1 { 8 } else { 16 });
    }
    m
}

/// Opens a (changed) SEALED known answer with the vectors' seed.
fn open_sealed(m: &[u8]) -> Result<(), Error> {
    let kat = Kat::load();
    let aud = microcert_core::Audience::relying_party("billing.example");
    microcert_core::open_in_place(&kat.seed(), &mut m.to_vec(), &aud).map(|_| ())
}

/// Runs the type's own decoder and the generic one; both must give `want`.
fn both(decode: fn(&[u8]) -> Result<(), Error>, bytes: &[u8], want: Error) {
    assert_eq!(
        decode(bytes),
        Err(want),
        "type decoder, {} bytes",
        bytes.len()
    );
    assert_eq!(
        Message::decode(bytes).map(|_| ()),
        Err(want),
        "Message::decode, {} bytes",
        bytes.len()
    );
}

macro_rules! rejects {
    ($name:ident, $ty:literal, $decode:expr) => {
        mod $name {
            use super::*;

            fn decode(b: &[u8]) -> Result<(), Error> {
                ($decode)(b).map(|_| ())
            }

            #[test]
            fn accepts_the_known_answers() {
                for suite in [1, 2] {
                    decode(&kat($ty, suite)).unwrap();
                }
            }

            #[test]
            fn rejects_empty_input() {
                both(decode, &[], Error::Length);
            }

            #[test]
            fn rejects_a_lone_first_byte() {
                both(decode, &kat($ty, 1)[..1], Error::Length);
            }

            #[test]
            fn rejects_a_truncated_header() {
                for suite in [1, 2] {
                    both(decode, &kat($ty, suite)[..HEADER_LEN - 1], Error::Length);
                }
            }

            #[test]
            fn rejects_a_header_alone() {
                for suite in [1, 2] {
                    both(decode, &kat($ty, suite)[..HEADER_LEN], Error::Length);
                }
            }

            #[test]
            fn rejects_a_tag_one_byte_short() {
                for suite in [1, 2] {
                    let m = shortest($ty, suite);
                    decode(&m).unwrap();
                    both(decode, &m[..m.len() - 1], Error::Length);
                }
            }

            #[test]
            fn rejects_a_half_tag() {
                for suite in [1, 2] {
                    let m = shortest($ty, suite);
                    let tag = if suite == 1 { 8 } else { 16 };
                    both(decode, &m[..m.len() - tag / 2], Error::Length);
                }
            }

            #[test]
            fn rejects_a_suite_1_message_relabelled_suite_2() {
                // Suite 2 wants an 8 bytes longer tag than suite 1 sent.
                let mut m = kat($ty, 1);
                m[1] = 2;
                if $ty != "sealed" {
                    both(decode, &m, Error::Length);
                } else {
                    // A SEALED ciphertext absorbs the difference: it decodes
                    // with 8 fewer ciphertext bytes and fails to open.
                    assert_eq!(Sealed::decode(&m).unwrap().tag.len(), 16);
                    assert_eq!(open_sealed(&m), Err(Error::Verification));
                }
            }

            #[test]
            fn rejects_a_suite_2_message_relabelled_suite_1() {
                let mut m = kat($ty, 2);
                m[1] = 1;
                if $ty != "sealed" {
                    both(decode, &m, Error::Length);
                } else {
                    assert_eq!(Sealed::decode(&m).unwrap().tag.len(), 8);
                    assert_eq!(open_sealed(&m), Err(Error::Verification));
                }
            }
        }
    };
}

rejects!(auth, "auth", Auth::decode);
rejects!(auth_response, "auth-response", AuthResponse::decode);
rejects!(signature, "signature", Signature::decode);
rejects!(sealed, "sealed", Sealed::decode);
rejects!(enroll, "enroll-transport", Enroll::decode);
rejects!(command, "command", Command::decode);
rejects!(receipt, "receipt-center", Receipt::decode);

/// Fixed-length types: one byte too many, and many.
macro_rules! rejects_long {
    ($name:ident, $ty:literal, $decode:expr) => {
        #[test]
        fn $name() {
            fn decode(b: &[u8]) -> Result<(), Error> {
                ($decode)(b).map(|_| ())
            }
            for suite in [1, 2] {
                let mut m = kat($ty, suite);
                m.push(0);
                both(decode, &m, Error::Length);
                m.extend([0xff; 64]);
                both(decode, &m, Error::Length);
                // Two messages back to back are not one message.
                let mut twice = kat($ty, suite);
                twice.extend(kat($ty, suite));
                both(decode, &twice, Error::Length);
            }
        }
    };
}

rejects_long!(rejects_auth_with_trailing_bytes, "auth", Auth::decode);
rejects_long!(
    rejects_auth_response_with_trailing_bytes,
    "auth-response",
    AuthResponse::decode
);
rejects_long!(
    rejects_signature_with_trailing_bytes,
    "signature",
    Signature::decode
);
rejects_long!(
    rejects_enroll_with_trailing_bytes,
    "enroll-update",
    Enroll::decode
);
rejects_long!(
    rejects_command_with_trailing_bytes,
    "command",
    Command::decode
);
rejects_long!(
    rejects_receipt_with_trailing_bytes,
    "receipt-node",
    Receipt::decode
);

#[test]
fn rejects_enroll_missing_one_ciphertext_byte() {
    let m = kat("enroll-update", 1);
    let mut cut = m[..HEADER_LEN + 977].to_vec();
    cut.extend(&m[HEADER_LEN + 978..]);
    both(|b| Enroll::decode(b).map(|_| ()), &cut, Error::Length);
}

#[test]
fn rejects_sealed_longer_than_65535_bytes_of_ciphertext() {
    let m = kat("sealed", 1);
    let mut long = m[..HEADER_LEN].to_vec();
    long.resize(HEADER_LEN + 65_536 + 8, 0);
    both(|b| Sealed::decode(b).map(|_| ()), &long, Error::Length);
    // The longest allowed decodes.
    long.truncate(HEADER_LEN + 65_535 + 8);
    assert_eq!(Sealed::decode(&long).unwrap().ciphertext.len(), 65_535);
}

#[test]
fn accepts_sealed_with_empty_ciphertext() {
    let m = kat("sealed", 2);
    let s = Sealed::decode(&m[..HEADER_LEN + 16]).unwrap();
    assert!(s.ciphertext.is_empty());
}

#[test]
fn signature_decode_prefix_returns_the_data_after_it() {
    let kat = Kat::load();
    let rec = kat.of_type("signature").next().unwrap();
    let mut body = rec.hex("MESSAGE");
    let data = rec.hex("DATA");
    body.extend(&data);
    let (sig, rest) = Signature::decode_prefix(&body).unwrap();
    assert_eq!(rest, &data[..]);
    assert_eq!(sig.tag.len(), 8);
    assert_eq!(
        Signature::decode_prefix(&body[..30]).map(|_| ()),
        Err(Error::Length)
    );
}

#[test]
fn rejects_header_with_version_zero_and_fifteen() {
    for v in [0u8, 2, 15] {
        let mut m = kat("auth", 1);
        m[0] = (v << 4) | 1;
        assert_eq!(Header::parse(&m).map(|_| ()), Err(Error::Version(v)));
    }
}

#[test]
fn rejects_type_zero_and_eight() {
    for t in [0u8, 8, 15] {
        let mut m = kat("auth", 1);
        m[0] = 0x10 | t;
        assert_eq!(Message::decode(&m).map(|_| ()), Err(Error::UnknownType(t)));
    }
}

#[test]
fn rejects_reserved_suite_3_and_zero() {
    for s in [0u8, 3, 0xff] {
        let mut m = kat("auth", 1);
        m[1] = s;
        assert_eq!(Auth::decode(&m).map(|_| ()), Err(Error::UnknownSuite(s)));
    }
}

#[test]
fn encode_refuses_a_tag_of_the_wrong_length() {
    let m = kat("auth", 1);
    let a = Auth::decode(&m).unwrap();
    let long_tag = [0u8; 16];
    let bad = Auth {
        header: a.header,
        tag: &long_tag,
    };
    assert_eq!(bad.encode(&mut [0u8; 64]), Err(Error::Length));
}

#[test]
fn encode_refuses_a_short_buffer() {
    let m = kat("receipt-center", 2);
    let r = Receipt::decode(&m).unwrap();
    assert_eq!(
        r.encode(&mut vec![0u8; m.len() - 1]),
        Err(Error::BufferTooSmall)
    );
    let mut exact = vec![0u8; m.len()];
    assert_eq!(r.encode(&mut exact), Ok(m.len()));
    assert_eq!(exact, m);
}
