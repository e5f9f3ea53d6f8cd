//! NIST CAVP HMAC_DRBG vectors (SP 800-90A, SHA-256) against
//! `microcert_core::drbg`, with and without prediction resistance.
//!
//! Source: `testdata/hmac_drbg_sha256_pr_{false,true}.rsp`, the `[SHA-256]`
//! sections of CAVS 14.3 `HMAC_DRBG.rsp` (origin in `testdata/README.md`).
//!
//! DRBGVS flow. PredictionResistance = False: instantiate, reseed with
//! EntropyInputReseed and AdditionalInputReseed, generate twice with the two
//! AdditionalInputs, compare the second output. PredictionResistance = True:
//! instantiate, then twice a generate with prediction resistance, which
//! reseeds with EntropyInputPR and the AdditionalInput first (SP 800-90A
//! 9.3.1) and generates with no additional input; compare the second output.
//! Both flows run once through the mechanism (`HmacDrbgState`) and once
//! through the DRBG functions (`Drbg`) fed by the vector's entropy inputs.

use microcert_core::drbg::{self, Drbg, DrbgError, HmacDrbgState, MAX_RESEED_INTERVAL};

const PR_FALSE: &str = include_str!("../testdata/hmac_drbg_sha256_pr_false.rsp");
const PR_TRUE: &str = include_str!("../testdata/hmac_drbg_sha256_pr_true.rsp");

#[derive(Default, Debug)]
struct Vector {
    section: String,
    count: String,
    entropy: Vec<u8>,
    nonce: Vec<u8>,
    personalization: Vec<u8>,
    entropy_reseed: Vec<u8>,
    additional_reseed: Vec<u8>,
    /// The AdditionalInput of each of the two generate calls.
    additional: Vec<Vec<u8>>,
    entropy_pr: Vec<Vec<u8>>,
    returned: Vec<u8>,
}

fn parse(rsp: &str) -> Vec<Vector> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut v = Vector::default();
    for line in rsp.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            if line.starts_with("[SHA-") {
                section.clear();
            }
            section.push_str(line);
            continue;
        }
        let (name, value) = line.split_once('=').expect("NAME = value");
        let value = value.trim();
        let bytes = || hex::decode(value).expect("hex");
        match name.trim() {
            "COUNT" => {
                v = Vector {
                    section: section.clone(),
                    count: value.to_owned(),
                    ..Vector::default()
                }
            }
            "EntropyInput" => v.entropy = bytes(),
            "Nonce" => v.nonce = bytes(),
            "PersonalizationString" => v.personalization = bytes(),
            "EntropyInputReseed" => v.entropy_reseed = bytes(),
            "AdditionalInputReseed" => v.additional_reseed = bytes(),
            "AdditionalInput" => v.additional.push(bytes()),
            "EntropyInputPR" => v.entropy_pr.push(bytes()),
            "ReturnedBits" => {
                v.returned = bytes();
                out.push(std::mem::take(&mut v));
            }
            other => panic!("unknown field {other}"),
        }
    }
    out
}

/// An entropy source that hands out the vector's inputs in order, and
/// fails once they run out.
struct Script(Vec<Vec<u8>>);

impl drbg::EntropySource for Script {
    fn fill_entropy(&mut self, buf: &mut [u8]) -> Result<(), DrbgError> {
        if self.0.is_empty() {
            return Err(DrbgError::Entropy);
        }
        let next = self.0.remove(0);
        assert_eq!(next.len(), buf.len(), "entropy request of the wrong size");
        buf.copy_from_slice(&next);
        Ok(())
    }
}

fn check_pr_false(v: &Vector) {
    assert_eq!(v.additional.len(), 2, "{} COUNT {}", v.section, v.count);
    let n = v.returned.len();
    let mut out = vec![0u8; n];
    let mut s = HmacDrbgState::instantiate(&v.entropy, &v.nonce, &v.personalization);
    s.reseed(&v.entropy_reseed, &v.additional_reseed);
    s.generate(&mut out, &v.additional[0], MAX_RESEED_INTERVAL)
        .unwrap();
    s.generate(&mut out, &v.additional[1], MAX_RESEED_INTERVAL)
        .unwrap();
    assert_eq!(
        out, v.returned,
        "mechanism: {} COUNT {}",
        v.section, v.count
    );

    // The same through the DRBG functions: entropy || nonce in one draw.
    let mut src = Script(vec![
        [v.entropy.clone(), v.nonce.clone()].concat(),
        v.entropy_reseed.clone(),
    ]);
    let mut d = Drbg::instantiate(&mut src, &v.personalization, false).unwrap();
    d.reseed(&mut src, &v.additional_reseed).unwrap();
    let mut out = vec![0u8; n];
    d.generate(&mut src, &mut out, false, &v.additional[0])
        .unwrap();
    d.generate(&mut src, &mut out, false, &v.additional[1])
        .unwrap();
    assert_eq!(
        out, v.returned,
        "functions: {} COUNT {}",
        v.section, v.count
    );
    assert!(src.0.is_empty(), "every entropy input used");
}

fn check_pr_true(v: &Vector) {
    assert_eq!(v.additional.len(), 2, "{} COUNT {}", v.section, v.count);
    assert_eq!(v.entropy_pr.len(), 2, "{} COUNT {}", v.section, v.count);
    let n = v.returned.len();
    let mut out = vec![0u8; n];
    let mut s = HmacDrbgState::instantiate(&v.entropy, &v.nonce, &v.personalization);
    for i in 0..2 {
        s.reseed(&v.entropy_pr[i], &v.additional[i]);
        s.generate(&mut out, &[], MAX_RESEED_INTERVAL).unwrap();
    }
    assert_eq!(
        out, v.returned,
        "mechanism: {} COUNT {}",
        v.section, v.count
    );

    // Prediction resistance requested per call ...
    let mut src = Script(vec![
        [v.entropy.clone(), v.nonce.clone()].concat(),
        v.entropy_pr[0].clone(),
        v.entropy_pr[1].clone(),
    ]);
    let mut d = Drbg::instantiate(&mut src, &v.personalization, false).unwrap();
    let mut out = vec![0u8; n];
    for i in 0..2 {
        d.generate(&mut src, &mut out, true, &v.additional[i])
            .unwrap();
    }
    assert_eq!(
        out, v.returned,
        "functions: {} COUNT {}",
        v.section, v.count
    );
    assert!(src.0.is_empty());

    // ... and set at instantiation.
    let mut src = Script(vec![
        [v.entropy.clone(), v.nonce.clone()].concat(),
        v.entropy_pr[0].clone(),
        v.entropy_pr[1].clone(),
    ]);
    let mut d = Drbg::instantiate(&mut src, &v.personalization, true).unwrap();
    let mut out = vec![0u8; n];
    for i in 0..2 {
        d.generate(&mut src, &mut out, false, &v.additional[i])
            .unwrap();
    }
    assert_eq!(
        out, v.returned,
        "PR at instantiation: {} COUNT {}",
        v.section, v.count
    );
}

#[test]
fn cavp_hmac_drbg_sha256_no_prediction_resistance() {
    let vectors = parse(PR_FALSE);
    // 16 sections (personalization 0/256 x additional 0/256 x ...) of 15.
    assert_eq!(vectors.len(), 240);
    assert!(
        vectors.iter().all(|v| v.section.contains("[SHA-256]")
            && v.section.contains("[PredictionResistance = False]"))
    );
    assert!(vectors.iter().any(|v| !v.personalization.is_empty()));
    assert!(vectors.iter().any(|v| !v.additional[0].is_empty()));
    for v in &vectors {
        check_pr_false(v);
    }
}

#[test]
fn cavp_hmac_drbg_sha256_prediction_resistance() {
    let vectors = parse(PR_TRUE);
    assert_eq!(vectors.len(), 240);
    assert!(
        vectors.iter().all(|v| v.section.contains("[SHA-256]")
            && v.section.contains("[PredictionResistance = True]"))
    );
    assert!(vectors.iter().any(|v| !v.additional[0].is_empty()));
    for v in &vectors {
        check_pr_true(v);
    }
}

#[test]
fn one_flipped_entropy_bit_fails_the_first_vector() {
    let mut v = parse(PR_FALSE).remove(0);
    v.entropy[0] ^= 1;
    let mut out = vec![0u8; v.returned.len()];
    let mut s = HmacDrbgState::instantiate(&v.entropy, &v.nonce, &v.personalization);
    s.reseed(&v.entropy_reseed, &v.additional_reseed);
    s.generate(&mut out, &v.additional[0], MAX_RESEED_INTERVAL)
        .unwrap();
    s.generate(&mut out, &v.additional[1], MAX_RESEED_INTERVAL)
        .unwrap();
    assert_ne!(out, v.returned);
}
