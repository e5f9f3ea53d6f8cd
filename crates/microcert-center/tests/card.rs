//! The software card at rest: passphrase, file contents, Shamir backup.

use microcert_center::card::recover_secret;
use microcert_center::{EncryptionCard, Error, KdfParams, SoftwareCard};
use microcert_core::DeviceId;

const PASS: &[u8] = b"correct horse battery staple";

/// The secret key slices of a card's key block (layout in card/software.rs:
/// version, card id, Ktrans, integrity key, Kchal, current version, count,
/// then (version, Kstore) pairs).
fn secret_keys(block: &[u8]) -> Vec<&[u8]> {
    let mut keys = vec![&block[17..33], &block[33..65], &block[65..81]];
    let n = block[85] as usize;
    for i in 0..n {
        let o = 86 + 36 * i + 4;
        keys.push(&block[o..o + 32]);
    }
    keys
}

#[test]
fn card_file_opens_only_with_its_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("card");
    let card = SoftwareCard::init(&path, PASS, KdfParams::insecure_for_tests()).unwrap();
    let dev = DeviceId::from_u64(42);
    let ktr = card.transport_key(dev, 0).unwrap();

    let again = SoftwareCard::open(&path, PASS).unwrap();
    assert_eq!(again.card_id(), card.card_id());
    assert!(again.transport_key(dev, 0).unwrap() == ktr);

    let e = SoftwareCard::open(&path, b"wrong passphrase").unwrap_err();
    assert!(matches!(e, Error::WrongPassphrase), "{e:?}");
    assert_eq!(e.kind(), "wrong-passphrase");
    assert!(e.to_string().contains("wrong passphrase"));

    // An existing card file is never overwritten by init.
    assert!(matches!(
        SoftwareCard::init(&path, PASS, KdfParams::insecure_for_tests()),
        Err(Error::CardFileExists { .. })
    ));
    // A flipped byte anywhere (header or body) is refused.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[40] ^= 1;
    std::fs::write(dir.path().join("card2"), &bytes).unwrap();
    assert!(SoftwareCard::open(&dir.path().join("card2"), PASS).is_err());
    // Not a card file at all.
    std::fs::write(dir.path().join("card3"), b"hello").unwrap();
    assert!(matches!(
        SoftwareCard::open(&dir.path().join("card3"), PASS),
        Err(Error::CardFormat(_))
    ));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn card_file_holds_no_key_in_the_clear() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("card");
    let card = SoftwareCard::init(&path, PASS, KdfParams::insecure_for_tests()).unwrap();
    // The shares give the key block back: that is how the test knows the keys.
    let block = recover_secret(&card.split(3, 2).unwrap()[..2]).unwrap();
    let file = std::fs::read(&path).unwrap();
    let keys = secret_keys(&block);
    assert_eq!(keys.len(), 4);
    for key in keys {
        for w in key.windows(8) {
            assert!(
                !file.windows(8).any(|f| f == w),
                "key bytes in the card file"
            );
        }
    }
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn shamir_five_three() {
    let card = SoftwareCard::ephemeral().unwrap();
    let dev = DeviceId::from_u64(7);
    let ktr = card.transport_key(dev, 3).unwrap();
    let shares = card.split(5, 3).unwrap();
    assert_eq!(shares.len(), 5);
    assert!(
        shares
            .iter()
            .all(|s| s.starts_with("mcs1-") && s.is_ascii())
    );
    for a in 0..5 {
        for b in a + 1..5 {
            for c in b + 1..5 {
                let pick = [shares[a].as_str(), shares[b].as_str(), shares[c].as_str()];
                let back = SoftwareCard::recover(&pick).unwrap();
                assert_eq!(back.card_id(), card.card_id());
                assert!(back.transport_key(dev, 3).unwrap() == ktr);
            }
            let two = [shares[a].as_str(), shares[b].as_str()];
            let e = SoftwareCard::recover(&two).unwrap_err();
            assert!(matches!(e, Error::Shares(_)), "{e:?}");
        }
    }
    // Shares of two different splits do not mix.
    let other = card.split(5, 3).unwrap();
    assert!(SoftwareCard::recover(&[&shares[0], &shares[1], &other[2]]).is_err());

    // A recovered card is written under a new passphrase and opens again,
    // and seeds sealed by the original open under it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("card");
    let back = SoftwareCard::recover(&shares[2..]).unwrap();
    back.save(&path, b"new passphrase", KdfParams::insecure_for_tests())
        .unwrap();
    let reopened = SoftwareCard::open(&path, b"new passphrase").unwrap();
    let seed = microcert_core::KeySeed::generate(2026, |b| b.fill(0x5a));
    let sealed = card.seal_seed(dev, 0, &seed).unwrap();
    let opened = reopened
        .unseal_seed(dev, 0, sealed.kstore_version, &sealed.ciphertext)
        .unwrap();
    assert!(opened == seed);
}

#[test]
fn debug_output_has_no_key() {
    let card = SoftwareCard::ephemeral().unwrap();
    let block = recover_secret(&card.split(2, 2).unwrap()).unwrap();
    let dbg = format!("{card:?}");
    for key in secret_keys(&block) {
        assert!(!dbg.contains(&hex::encode(key)), "{dbg}");
    }
}
