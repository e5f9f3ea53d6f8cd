//! The committed known-answer vectors of `testdata/kat.txt` (made once by
//! `examples/gen_vectors.rs`, cross-checked by the independent
//! `testdata/kat_crosscheck.py`): every make gives the committed bytes,
//! every check accepts them, and every single-bit change is rejected.

mod common;

use common::{Kat, Record};
use microcert_core::csk::combine;
use microcert_core::{
    Audience, AuthResponse, Command, DataDigest, DeviceId, Enroll, EnrollKey, Error, Key128,
    KeySeed, Opcode, Purpose, Receipt, SEED_LEN, Sender, Signature, check_challenge, make_auth,
    make_auth_response, make_challenge, make_command, make_enroll, make_receipt, make_signature,
    open_enroll, open_in_place, seal, transport_key, verify_auth, verify_auth_response,
    verify_command, verify_receipt, verify_signature, working_key,
};

/// Flips each bit of `msg` in turn; `check` must refuse every variant.
fn every_bit_flip_is_rejected(rec: &Record, msg: &[u8], check: impl Fn(&[u8]) -> bool) {
    flips_are_rejected(rec, msg, 0..msg.len() * 8, check);
}

/// Flips the given bits of `msg` in turn; `check` must refuse every variant.
fn flips_are_rejected(
    rec: &Record,
    msg: &[u8],
    bits: impl Iterator<Item = usize>,
    check: impl Fn(&[u8]) -> bool,
) {
    assert!(
        check(msg),
        "COUNT {}: the vector itself must pass",
        rec.count()
    );
    let mut m = msg.to_vec();
    for bit in bits {
        m[bit / 8] ^= 1 << (bit % 8);
        assert!(
            !check(&m),
            "COUNT {}: bit {bit} flipped was accepted",
            rec.count()
        );
        m[bit / 8] ^= 1 << (bit % 8);
    }
}

fn check_keys(rec: &Record, seed: &KeySeed, purpose: Purpose) {
    let h = rec.header();
    let k0 = combine(seed, h.t, h.r).unwrap();
    assert_eq!(
        hex::encode(k0.expose()),
        rec.str("K0"),
        "COUNT {} K0",
        rec.count()
    );
    let key = working_key(seed, purpose, &h).unwrap();
    assert_eq!(
        hex::encode(key.expose()),
        rec.str("KEY"),
        "COUNT {} KEY",
        rec.count()
    );
}

fn audience(rec: &Record) -> Audience {
    let aud = Audience(rec.array("AUDIENCE"));
    if let Some(name) = rec.get("AUDIENCE_NAME") {
        assert_eq!(Audience::relying_party(name), aud, "COUNT {}", rec.count());
    }
    aud
}

fn expect_message(rec: &Record, made: &[u8]) {
    assert_eq!(
        hex::encode(made),
        rec.str("MESSAGE"),
        "COUNT {} MESSAGE",
        rec.count()
    );
}

fn expected_len(ty: &str, suite: u8, data_len: usize) -> usize {
    let tag = if suite == 1 { 8 } else { 16 };
    23 + tag
        + match ty {
            "auth" | "signature" => 0,
            "auth-response" => 16,
            "sealed" => data_len,
            "enroll-transport" | "enroll-update" => 978,
            "command" => 5,
            "receipt-center" | "receipt-node" => 9,
            other => panic!("{other}"),
        }
}

fn check_record(rec: &Record, seed: &KeySeed) {
    let mut buf = vec![0u8; 2048];
    let ty = rec.ty();
    if ty == "challenge" {
        let kchal = Key128::from_bytes(rec.array("KCHAL"));
        let device = DeviceId(rec.array("DEVICE"));
        let now: u32 = rec.num("NOW");
        assert_eq!(now / 60, rec.num::<u32>("W"));
        let ch = make_challenge(&kchal, device, rec.array("C"), now);
        expect_message(rec, &ch);
        // Accepted in its window and the next one, refused after.
        check_challenge(&kchal, device, &ch, now).unwrap();
        check_challenge(&kchal, device, &ch, now + 60).unwrap();
        assert_eq!(
            check_challenge(&kchal, device, &ch, now + 120),
            Err(Error::Verification)
        );
        let other = DeviceId::from_u64(device.to_u64() + 1);
        assert_eq!(
            check_challenge(&kchal, other, &ch, now),
            Err(Error::Verification)
        );
        every_bit_flip_is_rejected(rec, &ch, |m| {
            check_challenge(&kchal, device, m.try_into().unwrap(), now).is_ok()
        });
        return;
    }
    if ty == "transport-key" {
        let ktr = transport_key(
            &Key128::from_bytes(rec.array("KTRANS")),
            DeviceId(rec.array("DEVICE")),
            rec.num("EPOCH"),
        );
        assert_eq!(hex::encode(ktr.expose()), rec.str("KTR"));
        return;
    }

    let h = rec.header();
    let msg = rec.hex("MESSAGE");
    let data_len = rec.get("DATA").map_or(0, |d| d.len() / 2);
    assert_eq!(
        msg.len(),
        expected_len(ty, h.suite.id(), data_len),
        "COUNT {} length",
        rec.count()
    );
    match ty {
        "auth" => {
            check_keys(rec, seed, Purpose::Auth);
            let aud = audience(rec);
            let n = make_auth(seed, &h, &aud, &mut buf).unwrap();
            expect_message(rec, &buf[..n]);
            every_bit_flip_is_rejected(rec, &msg, |m| {
                microcert_core::Auth::decode(m).is_ok_and(|a| verify_auth(seed, &a, &aud).is_ok())
            });
            let wrong = Audience::relying_party("other.example");
            let a = microcert_core::Auth::decode(&msg).unwrap();
            assert_eq!(verify_auth(seed, &a, &wrong), Err(Error::Verification));
        }
        "auth-response" => {
            check_keys(rec, seed, Purpose::Auth);
            let aud = audience(rec);
            let ch = rec.array("CHALLENGE");
            let n = make_auth_response(seed, &h, &ch, &aud, &mut buf).unwrap();
            expect_message(rec, &buf[..n]);
            assert_eq!(AuthResponse::decode(&msg).unwrap().challenge, &ch);
            every_bit_flip_is_rejected(rec, &msg, |m| {
                AuthResponse::decode(m).is_ok_and(|a| verify_auth_response(seed, &a, &aud).is_ok())
            });
        }
        "signature" => {
            check_keys(rec, seed, Purpose::Sign);
            let data = rec.hex("DATA");
            let digest: [u8; 32] = rec.array("DIGEST");
            assert_eq!(DataDigest::of(&data), digest);
            let n = make_signature(seed, &h, &digest, &mut buf).unwrap();
            expect_message(rec, &buf[..n]);
            every_bit_flip_is_rejected(rec, &msg, |m| {
                Signature::decode(m).is_ok_and(|s| verify_signature(seed, &s, &digest).is_ok())
            });
            // Any bit of the signed data, too.
            let sig = Signature::decode(&msg).unwrap();
            every_bit_flip_is_rejected(rec, &data, |d| {
                verify_signature(seed, &sig, &DataDigest::of(d)).is_ok()
            });
        }
        "sealed" => {
            check_keys(rec, seed, Purpose::Enc);
            let aud = audience(rec);
            let data = rec.hex("DATA");
            let n = seal(seed, &h, &aud, &data, &mut buf).unwrap();
            expect_message(rec, &buf[..n]);
            let mut m = msg.clone();
            let (opened_h, pt) = open_in_place(seed, &mut m, &aud).unwrap();
            assert_eq!((opened_h, &*pt), (h, data.as_slice()));
            every_bit_flip_is_rejected(rec, &msg, |m| {
                open_in_place(seed, &mut m.to_vec(), &aud).is_ok()
            });
            assert_eq!(
                open_in_place(seed, &mut msg.clone(), &Audience::relying_party("x")),
                Err(Error::Verification)
            );
        }
        "enroll-transport" | "enroll-update" => {
            let new_seed: [u8; SEED_LEN] = rec.array("NEW_SEED");
            let new_seed = KeySeed::from_bytes(&new_seed, rec.num("NEW_SEED_BASE_YEAR"));
            let ktr;
            let key = if ty == "enroll-transport" {
                ktr = transport_key(
                    &Key128::from_bytes(rec.array("KTRANS")),
                    h.device,
                    rec.num("EPOCH"),
                );
                assert_eq!(hex::encode(ktr.expose()), rec.str("KTR"));
                assert_eq!(rec.str("KEY"), rec.str("KTR"));
                EnrollKey::Transport(&ktr)
            } else {
                check_keys(rec, seed, Purpose::Upd);
                EnrollKey::Update(seed)
            };
            let n = make_enroll(key, &new_seed, &h, &mut buf).unwrap();
            expect_message(rec, &buf[..n]);
            let opened = open_enroll(key, &Enroll::decode(&msg).unwrap()).unwrap();
            assert!(opened == new_seed, "COUNT {}: opened seed", rec.count());
            // Every bit of the header and the tag, and one bit of every
            // ciphertext byte (all 8,000 bits take seconds in a debug build).
            let body = 23..23 + 978;
            let bits =
                (0..msg.len() * 8).filter(|b| !body.contains(&(b / 8)) || b % 8 == (b / 8) % 8);
            flips_are_rejected(rec, &msg, bits, |m| {
                Enroll::decode(m).is_ok_and(|e| open_enroll(key, &e).is_ok())
            });
        }
        "command" => {
            check_keys(rec, seed, Purpose::Cmd);
            let opcode = Opcode::new(rec.num("OPCODE")).unwrap();
            let n = make_command(seed, &h, rec.num("COUNTER"), opcode, &mut buf).unwrap();
            expect_message(rec, &buf[..n]);
            every_bit_flip_is_rejected(rec, &msg, |m| {
                Command::decode(m).is_ok_and(|c| verify_command(seed, &c).is_ok())
            });
        }
        "receipt-center" | "receipt-node" => {
            let (sender, purpose, other) = if ty == "receipt-center" {
                (Sender::Center, Purpose::ReceiptCenter, Sender::Node)
            } else {
                (Sender::Node, Purpose::ReceiptNode, Sender::Center)
            };
            check_keys(rec, seed, purpose);
            let reference = rec.u64_hex("REF");
            let status = rec.num("STATUS");
            let n = make_receipt(seed, &h, sender, reference, status, &mut buf).unwrap();
            expect_message(rec, &buf[..n]);
            every_bit_flip_is_rejected(rec, &msg, |m| {
                Receipt::decode(m).is_ok_and(|r| verify_receipt(seed, &r, sender).is_ok())
            });
            // A receipt of one side never passes as the other side's.
            let r = Receipt::decode(&msg).unwrap();
            assert_eq!(verify_receipt(seed, &r, other), Err(Error::Verification));
        }
        other => panic!("unknown TYPE {other}"),
    }
}

/// The random bytes the vectors were made from, drawn once from the OS.
const RANDOM: &str = include_str!("../testdata/kat_random.txt");

fn random(name: &str) -> String {
    RANDOM
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(" = "))
        .unwrap_or_else(|| panic!("{name} missing"))
        .to_owned()
}

fn distinct_rows(seed: &[u8]) -> usize {
    assert_eq!(seed.len(), SEED_LEN);
    seed.chunks(16)
        .collect::<std::collections::HashSet<_>>()
        .len()
}

#[test]
fn seed_is_the_committed_random_bytes() {
    let kat = Kat::load();
    let seed = kat.seed();
    assert_eq!(seed.base_year(), 2026);
    assert_eq!(hex::encode(seed.expose()), random("SEED"));
    for rec in kat.of_type("enroll-update") {
        assert_eq!(rec.str("NEW_SEED"), random("NEW_SEED"));
    }
}

/// A periodic seed (the first vectors' had 16 distinct rows of 61) lets an
/// implementation that reads rows at a wrong offset pass every vector.
#[test]
fn every_seed_of_the_vectors_has_61_distinct_rows() {
    let kat = Kat::load();
    assert_eq!(distinct_rows(kat.seed().expose()), 61, "SEED");
    let mut seen = 0;
    for rec in kat.records.iter().filter(|r| r.get("NEW_SEED").is_some()) {
        assert_eq!(
            distinct_rows(&rec.hex("NEW_SEED")),
            61,
            "COUNT {}",
            rec.count()
        );
        seen += 1;
    }
    assert!(seen >= 2);
}

/// Vectors in two years of the seed, so a wrong year row is caught too.
#[test]
fn vectors_use_more_than_one_year_row() {
    let kat = Kat::load();
    let years: std::collections::BTreeSet<i64> = kat
        .records
        .iter()
        .filter_map(|r| r.get("TIME"))
        .map(|t| microcert_core::time::date_of(t.parse().unwrap()).year)
        .collect();
    assert!(years.contains(&2026) && years.contains(&2029), "{years:?}");
}

#[test]
fn every_known_answer_vector_passes() {
    let kat = Kat::load();
    let seed = kat.seed();
    for rec in &kat.records {
        check_record(rec, &seed);
    }
    assert_eq!(kat.records.len(), 29);
}

#[test]
fn every_type_is_covered_in_both_suites() {
    let kat = Kat::load();
    for ty in [
        "auth",
        "auth-response",
        "signature",
        "sealed",
        "enroll-transport",
        "enroll-update",
        "command",
        "receipt-center",
        "receipt-node",
    ] {
        for suite in ["1", "2"] {
            assert!(
                kat.of_type(ty).any(|r| r.get("SUITE") == Some(suite)),
                "{ty} suite {suite}"
            );
        }
    }
    assert_eq!(kat.of_type("challenge").count(), 1);
    assert_eq!(kat.of_type("transport-key").count(), 2);
    assert!(
        kat.records
            .iter()
            .any(|r| r.get("AUDIENCE_NAME") == Some("billing.example"))
    );
}

#[test]
fn suite_1_sizes_are_those_of_the_protocol() {
    let kat = Kat::load();
    assert_eq!(kat.message("auth", 1).len(), 31);
    assert_eq!(kat.message("auth-response", 1).len(), 47);
    assert_eq!(kat.message("signature", 1).len(), 31);
    assert_eq!(kat.message("enroll-transport", 1).len(), 23 + 978 + 8);
}

#[test]
fn working_keys_do_not_depend_on_the_suite() {
    // The KDF context holds no suite byte: the same t and r give the same
    // K0 and KEY in both suites, and only the header byte separates tags.
    let kat = Kat::load();
    let seed = kat.seed();
    let rec = kat.of_type("auth").next().unwrap();
    let mut h = rec.header();
    let k1 = working_key(&seed, Purpose::Auth, &h).unwrap();
    h.suite = microcert_core::Suite::CMAC128;
    let k2 = working_key(&seed, Purpose::Auth, &h).unwrap();
    assert!(k1 == k2);
}

#[test]
fn enroll_under_the_wrong_epoch_or_seed_is_rejected() {
    let kat = Kat::load();
    let seed = kat.seed();
    let rec = kat.of_type("enroll-transport").next().unwrap();
    let msg = rec.hex("MESSAGE");
    let e = Enroll::decode(&msg).unwrap();
    let ktrans = Key128::from_bytes(rec.array("KTRANS"));
    let wrong = transport_key(&ktrans, e.header.device, rec.num::<u8>("EPOCH") + 1);
    assert!(matches!(
        open_enroll(EnrollKey::Transport(&wrong), &e),
        Err(Error::Verification)
    ));
    // A transport ENROLL is not accepted as an update under the seed.
    assert!(matches!(
        open_enroll(EnrollKey::Update(&seed), &e),
        Err(Error::Verification)
    ));
}

/// docs/protocol.md section 11 prints the committed vectors: every seed
/// row, and the MESSAGE (or KTR) of the challenge, the transport keys,
/// every suite 0x01 record and the first suite 0x02 AUTH.
#[test]
fn the_protocol_document_prints_the_committed_vectors() {
    let doc: String = include_str!("../../../docs/protocol.md")
        .split_whitespace()
        .collect();
    let kat = Kat::load();
    for row in kat.seed().expose().chunks(16) {
        assert!(
            doc.contains(&hex::encode(row)),
            "seed row {}",
            hex::encode(row)
        );
    }
    let first_suite_2_auth = kat
        .of_type("auth")
        .find(|r| r.get("SUITE") == Some("2"))
        .unwrap()
        .count()
        .to_owned();
    let mut shown = 0;
    for rec in &kat.records {
        let value = match rec.ty() {
            "transport-key" => rec.str("KTR"),
            _ if rec.get("SUITE").is_none_or(|s| s == "1") => rec.str("MESSAGE"),
            _ if rec.count() == first_suite_2_auth => rec.str("MESSAGE"),
            _ => continue,
        };
        assert!(
            doc.contains(&format!("COUNT{}:", rec.count())) && doc.contains(value),
            "COUNT {} is not in docs/protocol.md as committed",
            rec.count()
        );
        shown += 1;
    }
    assert_eq!(shown, 3 + 13 + 1);
}
