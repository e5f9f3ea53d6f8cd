//! The PKCS#11 card against a real SoftHSM2 token made for this test run.

mod common;

use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass};
use microcert_center::Error;
use microcert_center::card::{
    EncryptionCard, EnrollVia, SoftwareCard, challenge_matches, challenge_with, split_secret,
};
use microcert_core::{
    DeviceId, Enroll, EnrollKey, Header, Key128, KeySeed, Suite, challenge_window, derive_key,
    make_enroll, transport_key,
};
use microcert_pkcs11::{
    KCHAL_LABEL, KINT_LABEL, KTRANS_LABEL, KeyPolicy, Pkcs11Card, Pkcs11Config, Pkcs11Error,
    SOFTHSM2_MODULE,
};

use common::{PIN, config, hsm, main_card, raw_session};

fn seed(fill: u8) -> KeySeed {
    KeySeed::generate(2026, |b| {
        for (i, x) in b.iter_mut().enumerate() {
            *x = fill ^ (i as u8);
        }
    })
}

#[test]
fn init_then_open_finds_the_keys_and_init_is_not_repeated() {
    let Some(_) = hsm() else { return };
    let made = Pkcs11Card::init(&config("mc-init")).unwrap();
    assert_eq!(made.storage_key_version(), 1);
    assert_eq!(made.key_policy(), KeyPolicy::NonExtractable);
    let opened = Pkcs11Card::open(&config("mc-init")).unwrap();
    // The same keys: what one instance makes, the other checks.
    let dev = DeviceId::from_u64(7);
    assert_eq!(
        made.record_tag(b"r").unwrap(),
        opened.record_tag(b"r").unwrap()
    );
    let sealed = made.seal_seed(dev, 0, &seed(1)).unwrap();
    let back = opened
        .unseal_seed(dev, 0, sealed.kstore_version, &sealed.ciphertext)
        .unwrap();
    assert!(back == seed(1));
    assert!(matches!(
        Pkcs11Card::init(&config("mc-init")),
        Err(Pkcs11Error::KeysExist { .. })
    ));
}

#[test]
fn no_key_can_be_read_out_of_the_token() {
    let Some(_) = main_card() else { return };
    let s = raw_session("mc-main");
    let labels = [KTRANS_LABEL, KINT_LABEL, KCHAL_LABEL, "microcert-kstore-v1"];
    for label in labels {
        let found = s
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .unwrap();
        assert_eq!(found.len(), 1, "{label}");
        let h = found[0];
        // C_GetAttributeValue(CKA_VALUE) answers CKR_ATTRIBUTE_SENSITIVE.
        let info = s.get_attribute_info(h, &[AttributeType::Value]).unwrap();
        assert!(
            matches!(info[0], AttributeInfo::Sensitive),
            "{label}: {info:?}"
        );
        let got = s.get_attributes(h, &[AttributeType::Value]).unwrap();
        assert!(
            !got.iter().any(|a| matches!(a, Attribute::Value(_))),
            "{label}: value returned"
        );
        let flags = s
            .get_attributes(
                h,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Token,
                    AttributeType::Private,
                ],
            )
            .unwrap();
        for a in flags {
            match a {
                Attribute::Sensitive(b)
                | Attribute::AlwaysSensitive(b)
                | Attribute::NeverExtractable(b)
                | Attribute::Token(b)
                | Attribute::Private(b) => assert!(b, "{label}: {a:?}"),
                Attribute::Extractable(b) => assert!(!b, "{label}: extractable"),
                other => panic!("unexpected {other:?}"),
            }
        }
        // Nor can it be wrapped out under a key the caller controls.
        let wrapper = s
            .generate_key(
                &cryptoki::mechanism::Mechanism::AesKeyGen,
                &[
                    Attribute::Token(false),
                    Attribute::ValueLen(16.into()),
                    Attribute::Wrap(true),
                ],
            )
            .unwrap();
        let wrapped = s.wrap_key(&cryptoki::mechanism::Mechanism::AesKeyWrapPad, wrapper, h);
        assert!(wrapped.is_err(), "{label} was wrapped out");
        s.destroy_object(wrapper).unwrap();
    }
}

#[test]
fn a_wrong_pin_is_a_clear_error() {
    let Some(_) = hsm() else { return };
    let wrong = Pkcs11Config::new(SOFTHSM2_MODULE, "mc-pin").with_pin("not-the-pin");
    let err = Pkcs11Card::open(&wrong).unwrap_err();
    assert!(matches!(err, Pkcs11Error::WrongPin), "{err:?}");
    assert!(!err.to_string().contains("not-the-pin"));
    let wrong_init = Pkcs11Card::init(&wrong).unwrap_err();
    assert!(
        matches!(wrong_init, Pkcs11Error::WrongPin),
        "{wrong_init:?}"
    );
}

#[test]
fn a_missing_token_is_a_clear_error() {
    let Some(_) = hsm() else { return };
    let err = Pkcs11Card::open(&config("mc-no-such-token")).unwrap_err();
    assert!(
        matches!(&err, Pkcs11Error::TokenNotFound { label } if label == "mc-no-such-token"),
        "{err:?}"
    );
}

#[test]
fn a_missing_module_is_a_clear_error() {
    let cfg = Pkcs11Config::new("/nonexistent/libpkcs11.so", "x").with_pin(PIN);
    let err = Pkcs11Card::open(&cfg).unwrap_err();
    assert!(matches!(err, Pkcs11Error::Module { .. }), "{err:?}");
}

#[test]
fn a_missing_key_is_a_clear_error() {
    let Some(_) = hsm() else { return };
    // A token that was never initialised as a card.
    let err = Pkcs11Card::open(&config("mc-nokey")).unwrap_err();
    assert!(
        matches!(&err, Pkcs11Error::KeyMissing { label } if label == KTRANS_LABEL),
        "{err:?}"
    );
    // A card token that lost one key.
    drop(Pkcs11Card::init(&config("mc-partial")).unwrap());
    let s = raw_session("mc-partial");
    let kchal = s
        .find_objects(&[Attribute::Label(KCHAL_LABEL.as_bytes().to_vec())])
        .unwrap();
    s.destroy_object(kchal[0]).unwrap();
    let err = Pkcs11Card::open(&config("mc-partial")).unwrap_err();
    assert!(
        matches!(&err, Pkcs11Error::KeyMissing { label } if label == KCHAL_LABEL),
        "{err:?}"
    );
}

#[test]
fn a_missing_pin_is_a_clear_error() {
    let Some(_) = hsm() else { return };
    let mut cfg = Pkcs11Config::new(SOFTHSM2_MODULE, "mc-pin");
    cfg.pin_env = Some("MICROCERT_TEST_PIN_THAT_IS_NOT_SET".into());
    assert!(matches!(
        Pkcs11Card::open(&cfg),
        Err(Pkcs11Error::PinSource(_))
    ));
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("pin");
    std::fs::write(&empty, "\n").unwrap();
    let cfg = Pkcs11Config::new(SOFTHSM2_MODULE, "mc-pin").with_pin_file(&empty);
    assert!(matches!(
        Pkcs11Card::open(&cfg),
        Err(Pkcs11Error::PinSource(_))
    ));
}

#[test]
fn a_pin_file_opens_the_card() {
    let Some(_) = main_card() else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pin");
    std::fs::write(&file, format!("{PIN}\n")).unwrap();
    let cfg = Pkcs11Config::new(SOFTHSM2_MODULE, "mc-main").with_pin_file(&file);
    Pkcs11Card::open(&cfg).unwrap();
}

#[test]
fn a_readable_key_is_refused_at_open() {
    let Some(_) = hsm() else { return };
    drop(Pkcs11Card::init(&config("mc-weak")).unwrap());
    // Replace Kint by a key whose value anyone logged in can read.
    let s = raw_session("mc-weak");
    let old = s
        .find_objects(&[Attribute::Label(KINT_LABEL.as_bytes().to_vec())])
        .unwrap();
    s.destroy_object(old[0]).unwrap();
    s.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(cryptoki::object::KeyType::GENERIC_SECRET),
        Attribute::Label(KINT_LABEL.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Sign(true),
        Attribute::Value(vec![5; 32]),
    ])
    .unwrap();
    let err = Pkcs11Card::open(&config("mc-weak")).unwrap_err();
    assert!(
        matches!(&err, Pkcs11Error::KeyAttributes { label, .. } if label == KINT_LABEL),
        "{err:?}"
    );
}

#[test]
fn seal_unseal_round_trip_and_a_moved_ciphertext_fails() {
    let Some(card) = main_card() else { return };
    let dev = DeviceId::from_u64(0x1122_3344_5566_7788);
    let s = seed(0x5a);
    let sealed = card.seal_seed(dev, 3, &s).unwrap();
    assert_eq!(sealed.kstore_version, 1);
    assert_eq!(sealed.ciphertext.len(), 12 + 978 + 16);
    // The seed's bytes are not in the ciphertext.
    assert!(
        !sealed
            .ciphertext
            .windows(32)
            .any(|w| w == &s.expose()[100..132])
    );
    let back = card.unseal_seed(dev, 3, 1, &sealed.ciphertext).unwrap();
    assert!(back == s);
    assert_eq!(back.base_year(), 2026);
    // Two seals of one seed differ (fresh nonce from the token's RNG).
    let again = card.seal_seed(dev, 3, &s).unwrap();
    assert_ne!(again.ciphertext, sealed.ciphertext);
    // Moved to another device or generation, altered, truncated: refused.
    let other = DeviceId::from_u64(0x1122_3344_5566_7789);
    assert!(matches!(
        card.unseal_seed(other, 3, 1, &sealed.ciphertext),
        Err(Error::Verification)
    ));
    assert!(matches!(
        card.unseal_seed(dev, 4, 1, &sealed.ciphertext),
        Err(Error::Verification)
    ));
    for i in [0, 12, 500, 12 + 978, sealed.ciphertext.len() - 1] {
        let mut flipped = sealed.ciphertext.clone();
        flipped[i] ^= 0x01;
        assert!(
            matches!(
                card.unseal_seed(dev, 3, 1, &flipped),
                Err(Error::Verification)
            ),
            "flip at {i}"
        );
    }
    assert!(matches!(
        card.unseal_seed(dev, 3, 1, &sealed.ciphertext[..100]),
        Err(Error::Verification)
    ));
    // A Kstore version the token does not hold is a card error.
    assert!(matches!(
        card.unseal_seed(dev, 3, 9, &sealed.ciphertext),
        Err(Error::Card(_))
    ));
}

#[test]
fn challenges_made_by_the_token_check_and_expire() {
    let Some(card) = main_card() else { return };
    let dev = DeviceId::from_u64(42);
    let now = 1_800_000_000;
    let ch = card.make_challenge(dev, now).unwrap();
    card.check_challenge(dev, &ch, now).unwrap();
    card.check_challenge(dev, &ch, now + 60).unwrap();
    assert!(matches!(
        card.check_challenge(dev, &ch, now + 120),
        Err(Error::Verification)
    ));
    assert!(
        card.check_challenge(DeviceId::from_u64(43), &ch, now)
            .is_err()
    );
    let mut bad = ch;
    bad[15] ^= 1;
    assert!(card.check_challenge(dev, &bad, now).is_err());
}

fn enroll_bytes(key: EnrollKey<'_>, new_seed: &KeySeed, dev: DeviceId, generation: u8) -> Vec<u8> {
    let header = Header {
        suite: Suite::CMAC64,
        device: dev,
        generation,
        t: 1_780_000_000,
        r: 0x0102_0304_0506_0708,
    };
    let mut out = vec![0u8; 2048];
    let n = make_enroll(key, new_seed, &header, &mut out).unwrap();
    out.truncate(n);
    out
}

#[test]
fn open_enroll_under_the_tokens_transport_key_and_under_kupd() {
    let Some(card) = main_card() else { return };
    let dev = DeviceId::from_u64(0xabc);
    // The factory writes the token's Ktr(dev, 2) into the chip.
    let ktr = card.transport_key(dev, 2).unwrap();
    let first = seed(3);
    let bytes = enroll_bytes(EnrollKey::Transport(&ktr), &first, dev, 0);
    let msg = Enroll::decode(&bytes).unwrap();
    let (got, via) = card.open_enroll(&msg, None, Some(2)).unwrap();
    assert!(got == first);
    assert_eq!(via, EnrollVia::Transport);
    // Another epoch's key does not open it.
    assert!(matches!(
        card.open_enroll(&msg, None, Some(1)),
        Err(Error::Verification)
    ));
    // A seed update under Kupd of the current seed.
    let next = seed(4);
    let bytes = enroll_bytes(EnrollKey::Update(&first), &next, dev, 1);
    let msg = Enroll::decode(&bytes).unwrap();
    let (got, via) = card.open_enroll(&msg, Some(&first), Some(2)).unwrap();
    assert!(got == next);
    assert_eq!(via, EnrollVia::Update);
    assert!(card.open_enroll(&msg, Some(&next), None).is_err());
}

#[test]
fn random_bytes_come_from_the_token() {
    let Some(card) = main_card() else { return };
    let mut a = [0u8; 32];
    let mut b = [0u8; 32];
    card.random(&mut a).unwrap();
    card.random(&mut b).unwrap();
    assert_ne!(a, b);
    assert_ne!(a, [0u8; 32]);
}

#[test]
fn storage_key_rotation_keeps_old_seeds_readable() {
    let Some(_) = hsm() else { return };
    let card = Pkcs11Card::init(&config("mc-rotate")).unwrap();
    let dev = DeviceId::from_u64(5);
    let old = card.seal_seed(dev, 0, &seed(8)).unwrap();
    assert_eq!(card.rotate_storage_key().unwrap(), 2);
    assert_eq!(card.storage_key_version(), 2);
    let new = card.seal_seed(dev, 0, &seed(8)).unwrap();
    assert_eq!(new.kstore_version, 2);
    assert!(card.unseal_seed(dev, 0, 1, &old.ciphertext).unwrap() == seed(8));
    // Sealed under v1, presented as v2: does not open.
    assert!(matches!(
        card.unseal_seed(dev, 0, 2, &old.ciphertext),
        Err(Error::Verification)
    ));
    // A reopened card finds both versions and seals under the newest.
    let reopened = Pkcs11Card::open(&config("mc-rotate")).unwrap();
    assert_eq!(reopened.storage_key_versions(), [1, 2]);
    assert_eq!(reopened.storage_key_version(), 2);
    assert!(matches!(
        card.destroy_storage_key(2),
        Err(Pkcs11Error::CurrentStorageKey { version: 2 })
    ));
    card.destroy_storage_key(1).unwrap();
    assert_eq!(card.storage_key_versions(), [2]);
    assert!(matches!(
        card.unseal_seed(dev, 0, 1, &old.ciphertext),
        Err(Error::Card(_))
    ));
    drop(reopened);
    assert_eq!(
        Pkcs11Card::open(&config("mc-rotate"))
            .unwrap()
            .storage_key_versions(),
        [2]
    );
}

#[test]
fn concurrent_checks_and_unseals_from_eight_threads() {
    let Some(card) = main_card() else { return };
    let now = 1_800_000_000;
    let work: Vec<_> = (0..8u64)
        .map(|i| {
            let dev = DeviceId::from_u64(1000 + i);
            let s = seed(i as u8);
            let sealed = card.seal_seed(dev, 0, &s).unwrap();
            let ch = card.make_challenge(dev, now).unwrap();
            (dev, s, sealed, ch)
        })
        .collect();
    std::thread::scope(|scope| {
        for (dev, s, sealed, ch) in &work {
            scope.spawn(move || {
                for _ in 0..50 {
                    card.check_challenge(*dev, ch, now).unwrap();
                    let back = card
                        .unseal_seed(*dev, 0, sealed.kstore_version, &sealed.ciphertext)
                        .unwrap();
                    assert!(back == *s);
                    // Failures in between must not disturb the sessions.
                    assert!(card.check_challenge(*dev, ch, now + 600).is_err());
                    assert!(matches!(
                        card.unseal_seed(*dev, 1, sealed.kstore_version, &sealed.ciphertext),
                        Err(Error::Verification)
                    ));
                }
            });
        }
    });
}

#[test]
fn debug_output_holds_no_pin() {
    let Some(card) = main_card() else { return };
    let cfg = config("mc-main");
    let shown = format!("{cfg:?} {card:?}");
    assert!(!shown.contains(PIN), "{shown}");
    assert!(shown.contains("mc-main"));
    assert!(shown.contains("<set>"));
}

#[test]
fn config_reads_from_a_file_format() {
    let cfg: Pkcs11Config = serde_json::from_str(
        r#"{"module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "microcert",
            "pin_file": "/etc/microcert/pin"}"#,
    )
    .unwrap();
    assert_eq!(cfg.token_label, "microcert");
    assert_eq!(cfg.sessions, 8);
    assert!(cfg.pin_env.is_none());
    assert!(
        serde_json::from_str::<Pkcs11Config>(
            r#"{"module": "m", "token_label": "t", "pin": "1234"}"#
        )
        .is_err(),
        "a PIN in the configuration file is refused"
    );
}

// ---- Known answers, and equality with the software card ----------------

/// Key block (software card format, version 1) with known keys:
/// Ktrans = 00..0f, Kint = 40..5f, Kchal = 20..2f, Kstore v1 = 80..9f.
fn known_block() -> Vec<u8> {
    let mut b = vec![1u8];
    b.extend_from_slice(&[0xee; 16]); // card id
    b.extend((0x00..0x10).collect::<Vec<u8>>());
    b.extend((0x40..0x60).collect::<Vec<u8>>());
    b.extend((0x20..0x30).collect::<Vec<u8>>());
    b.extend_from_slice(&1u32.to_be_bytes());
    b.push(1);
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend((0x80..0xa0).collect::<Vec<u8>>());
    b
}

// Computed outside this code base, with OpenSSL 3's command line (and
// checked with Python's `cryptography`):
//   printf '000000014d432d5452414e53504f52540000010203040506070000000080' | xxd -r -p |
//     openssl mac -cipher AES-128-CBC -macopt hexkey:000102030405060708090a0b0c0d0e0f CMAC
const KAT_KTR: &str = "a6498125b3e3d4728ec60a1182bc761d";
//   device 0001020304050607 || c a0a1a2a3a4a5a6a7 || w = 1800000000/60 = 0x01c9c380, under
//   Kchal 20..2f: openssl mac -cipher AES-128-CBC ... CMAC, first 8 bytes after c.
/// docs/protocol.md section 6: Kchal = 20..2f, device 0001020304050607,
/// now = 1,800,000,000 (w = 30,000,000), c = a0..a7; Kw =
/// 5e1d0a228dd766fc2b83de4ceb011d67.
const KAT_CHALLENGE: &str = "a0a1a2a3a4a5a6a70b3fe563a6210cca";
const KAT_CHALLENGE_KEY: &str = "5e1d0a228dd766fc2b83de4ceb011d67";
//   printf 'MC-REC\0record' | openssl mac -digest SHA256 -macopt hexkey:404142...5f HMAC
const KAT_RECORD_TAG: &str = "d0c4f3140dd61437b948936749af6ae0aaf11cba3db01c5df6c90ce6a10c7783";
//   printf 'MC-DIGEST\0state' | openssl mac -digest SHA256 -macopt hexkey:404142...5f HMAC
const KAT_DIGEST_TAG: &str = "824a3520da2411e1cda3c524d24faff887af0626c72c7ead308e41e815cc3f35";

fn known_cards() -> Option<&'static (Pkcs11Card, SoftwareCard)> {
    static CARDS: std::sync::OnceLock<Option<(Pkcs11Card, SoftwareCard)>> =
        std::sync::OnceLock::new();
    hsm()?;
    CARDS
        .get_or_init(|| {
            let block = known_block();
            let token = Pkcs11Card::import_key_block(
                &config("mc-known"),
                &block,
                KeyPolicy::NonExtractable,
            )
            .unwrap();
            let shares = split_secret(&block, 2, 2).unwrap();
            let soft = SoftwareCard::recover(&shares).unwrap();
            Some((token, soft))
        })
        .as_ref()
}

#[test]
fn transport_key_matches_the_protocol_formula() {
    let Some((token, soft)) = known_cards() else {
        return;
    };
    let dev = DeviceId(*b"\x00\x01\x02\x03\x04\x05\x06\x07");
    let ktr = token.transport_key(dev, 0).unwrap();
    assert_eq!(hex::encode(ktr.expose()), KAT_KTR);
    let ktrans = Key128::from_bytes(core::array::from_fn(|i| i as u8));
    for epoch in [0, 1, 255] {
        for d in [dev, DeviceId::from_u64(u64::MAX)] {
            let t = token.transport_key(d, epoch).unwrap();
            assert!(t == transport_key(&ktrans, d, epoch));
            assert!(t == soft.transport_key(d, epoch).unwrap());
        }
    }
}

#[test]
fn challenges_match_the_protocol_formula() {
    let Some((token, soft)) = known_cards() else {
        return;
    };
    let dev = DeviceId(*b"\x00\x01\x02\x03\x04\x05\x06\x07");
    let now = 1_800_000_000;
    let kat: [u8; 16] = hex::decode(KAT_CHALLENGE).unwrap().try_into().unwrap();
    token.check_challenge(dev, &kat, now).unwrap();
    let kchal = Key128::from_bytes(core::array::from_fn(|i| 0x20 + i as u8));
    let w = challenge_window(now);
    let kw = derive_key(&kchal, b"MC-CHAL", &w.to_be_bytes());
    assert_eq!(hex::encode(kw.expose()), KAT_CHALLENGE_KEY);
    assert_eq!(challenge_with(&kw, dev, kat[..8].try_into().unwrap()), kat);
    // The token's own challenges pass the formula's check and the
    // software card's, and the other way round.
    for _ in 0..8 {
        let ch = token.make_challenge(dev, now).unwrap();
        assert!(challenge_matches(&kw, dev, &ch));
        soft.check_challenge(dev, &ch, now).unwrap();
        let ch = soft.make_challenge(dev, now).unwrap();
        token.check_challenge(dev, &ch, now).unwrap();
    }
}

#[test]
fn integrity_tags_match_the_software_card() {
    let Some((token, soft)) = known_cards() else {
        return;
    };
    assert_eq!(
        hex::encode(token.record_tag(b"record").unwrap()),
        KAT_RECORD_TAG
    );
    assert_eq!(
        hex::encode(token.digest_tag(b"state").unwrap()),
        KAT_DIGEST_TAG
    );
    for data in [&b""[..], b"x", &[7u8; 1000][..]] {
        assert_eq!(
            token.record_tag(data).unwrap(),
            soft.record_tag(data).unwrap()
        );
        assert_eq!(
            token.digest_tag(data).unwrap(),
            soft.digest_tag(data).unwrap()
        );
        assert_ne!(
            token.record_tag(data).unwrap(),
            token.digest_tag(data).unwrap()
        );
    }
}

#[test]
fn a_database_moves_between_cards_with_the_same_keys() {
    let Some((token, soft)) = known_cards() else {
        return;
    };
    let Some(other) = main_card() else { return };
    let dev = DeviceId::from_u64(77);
    let s = seed(0x33);
    let by_token = token.seal_seed(dev, 1, &s).unwrap();
    let by_soft = soft.seal_seed(dev, 1, &s).unwrap();
    assert!(soft.unseal_seed(dev, 1, 1, &by_token.ciphertext).unwrap() == s);
    assert!(token.unseal_seed(dev, 1, 1, &by_soft.ciphertext).unwrap() == s);
    // A card with other keys opens neither.
    assert!(matches!(
        other.unseal_seed(dev, 1, 1, &by_token.ciphertext),
        Err(Error::Verification)
    ));
    assert_ne!(
        other.record_tag(b"r").unwrap(),
        token.record_tag(b"r").unwrap()
    );
}
