//! NIST CAVP SP 800-108 KBKDF vectors (counter mode, CMAC-AES128, counter
//! before the fixed input, r = 32 bits) against `kdf_ctr_cmac`.
//!
//! Source: `testdata/kbkdf_ctr_cmac_aes128_r32.rsp`, the PRF=CMAC_AES128,
//! CTRLOCATION=BEFORE_FIXED, RLEN=32_BITS section of CAVS 14.4
//! `KDFCTR_gen.rsp`, header kept.

use microcert_core::kdf_ctr_cmac;

const RSP: &str = include_str!("../testdata/kbkdf_ctr_cmac_aes128_r32.rsp");

#[derive(Default)]
struct Vector {
    count: String,
    l_bits: usize,
    ki: Vec<u8>,
    fixed: Vec<u8>,
    fixed_len: usize,
    ko: Vec<u8>,
}

fn vectors() -> Vec<Vector> {
    let mut out = Vec::new();
    let mut v = Vector::default();
    for line in RSP.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        let (name, value) = line.split_once('=').expect("NAME = value");
        let value = value.trim();
        match name.trim() {
            "COUNT" => v.count = value.to_owned(),
            "L" => v.l_bits = value.parse().unwrap(),
            "KI" => v.ki = hex::decode(value).unwrap(),
            "FixedInputDataByteLen" => v.fixed_len = value.parse().unwrap(),
            "FixedInputData" => v.fixed = hex::decode(value).unwrap(),
            "KO" => {
                v.ko = hex::decode(value).unwrap();
                out.push(std::mem::take(&mut v));
            }
            other => panic!("unexpected line {other}"),
        }
    }
    out
}

#[test]
fn all_40_cavp_counter_mode_cmac_aes128_vectors_pass() {
    let vectors = vectors();
    let mut run = 0;
    let mut per_length = std::collections::BTreeMap::new();
    for v in &vectors {
        assert_eq!(v.fixed.len(), v.fixed_len, "COUNT {}", v.count);
        assert_eq!(v.ko.len() * 8, v.l_bits, "COUNT {}", v.count);
        let key: [u8; 16] = v.ki.as_slice().try_into().expect("128-bit KI");
        let mut out = vec![0u8; v.l_bits / 8];
        kdf_ctr_cmac(&key, &v.fixed, &mut out).unwrap();
        assert_eq!(
            hex::encode(&out),
            hex::encode(&v.ko),
            "L = {} COUNT = {}",
            v.l_bits,
            v.count
        );
        *per_length.entry(v.l_bits).or_insert(0) += 1;
        run += 1;
    }
    assert_eq!(run, 40);
    assert_eq!(
        per_length.into_iter().collect::<Vec<_>>(),
        vec![(128, 10), (160, 10), (256, 10), (320, 10)]
    );
}

#[test]
fn a_wrong_key_fails_the_first_vector() {
    let v = &vectors()[0];
    let mut key: [u8; 16] = v.ki.as_slice().try_into().unwrap();
    key[15] ^= 1;
    let mut out = vec![0u8; v.ko.len()];
    kdf_ctr_cmac(&key, &v.fixed, &mut out).unwrap();
    assert_ne!(out, v.ko);
}

#[test]
fn prefix_of_a_longer_output_is_the_shorter_output() {
    // The KDF only counts blocks; L is the caller's to encode in the fixed
    // input. With the same fixed input a shorter output is a prefix.
    let key = [0x42; 16];
    let mut long = [0u8; 40];
    let mut short = [0u8; 20];
    kdf_ctr_cmac(&key, b"fixed", &mut long).unwrap();
    kdf_ctr_cmac(&key, b"fixed", &mut short).unwrap();
    assert_eq!(long[..20], short);
}
