//! Cloning a card to a second token by trusted key wrapping, against a
//! real SoftHSM2.

mod common;

use microcert_center::Error;
use microcert_center::card::EncryptionCard;
use microcert_core::{DeviceId, KeySeed};
use microcert_pkcs11::clone::{forget_clone_target, prepare_clone_target, trust_clone_target};
use microcert_pkcs11::{KeyPolicy, Pkcs11Card, Pkcs11Error};

use common::{SO_PIN, config, hsm, main_card};

#[test]
fn a_clone_holds_the_same_keys() {
    let Some(_) = hsm() else { return };
    let a = config("mc-clone-a");
    let b = config("mc-clone-b");
    let source = Pkcs11Card::init_with_policy(&a, KeyPolicy::WrapWithTrusted).unwrap();
    assert_eq!(source.rotate_storage_key().unwrap(), 2);
    let dev = DeviceId::from_u64(9);
    let seed = KeySeed::generate(2026, |b| b.fill(0x42));
    let sealed_v2 = source.seal_seed(dev, 0, &seed).unwrap();
    let ktr = source.transport_key(dev, 0).unwrap();
    let tag = source.record_tag(b"record").unwrap();

    // Extractable only under a trusted key: a wrapping key the user makes
    // (untrusted) gets nothing out, and the value is still unreadable.
    {
        use cryptoki::mechanism::Mechanism;
        use cryptoki::object::{Attribute, AttributeInfo, AttributeType};
        let s = common::raw_session("mc-clone-a");
        let ktrans = s
            .find_objects(&[Attribute::Label(b"microcert-ktrans".to_vec())])
            .unwrap()[0];
        let mine = s
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Token(false),
                    Attribute::ValueLen(32.into()),
                    Attribute::Wrap(true),
                ],
            )
            .unwrap();
        assert!(s.wrap_key(&Mechanism::AesKeyWrapPad, mine, ktrans).is_err());
        let info = s
            .get_attribute_info(ktrans, &[AttributeType::Value])
            .unwrap();
        assert!(matches!(info[0], AttributeInfo::Sensitive));
    }

    // 1. The target makes its key-transport pair.
    let request = prepare_clone_target(&b).unwrap();
    assert_eq!(request.fingerprint().len(), 64);
    // 3 before 2: not trusted yet, refused.
    assert!(matches!(
        source.export_for_clone(&request),
        Err(Pkcs11Error::CloneTargetNotTrusted)
    ));
    // 2. The SO cannot log in while the card (user) is logged in...
    assert!(matches!(
        trust_clone_target(&a, SO_PIN, &request),
        Err(Pkcs11Error::UserLoggedIn)
    ));
    drop(source);
    // ...and can once it is closed; a wrong SO PIN is refused.
    assert!(matches!(
        trust_clone_target(&a, "wrong-so-pin", &request),
        Err(Pkcs11Error::WrongPin)
    ));
    trust_clone_target(&a, SO_PIN, &request).unwrap();
    // 3. The source wraps its keys for the target.
    let source = Pkcs11Card::open(&a).unwrap();
    let package = source.export_for_clone(&request).unwrap();
    // Ktrans, Kint, Kchal, the keyring root and two Kstore versions.
    assert_eq!(package.keys.len(), 6);
    eprintln!("{package:?}");
    assert!(!format!("{package:?}").contains("wrapped: ["));
    // 4. The target unwraps them.
    let clone = Pkcs11Card::import_clone(&b, &package).unwrap();
    assert_eq!(clone.storage_key_versions(), [1, 2]);
    assert_eq!(clone.key_policy(), KeyPolicy::WrapWithTrusted);
    assert!(clone.unseal_seed(dev, 0, 2, &sealed_v2.ciphertext).unwrap() == seed);
    assert!(clone.transport_key(dev, 0).unwrap() == ktr);
    assert_eq!(clone.record_tag(b"record").unwrap(), tag);
    let back = clone.seal_seed(dev, 1, &seed).unwrap();
    assert!(source.unseal_seed(dev, 1, 2, &back.ciphertext).unwrap() == seed);
    // The keyring root came along: a storage key A wraps, B unwraps, and
    // what B seals under it A opens.
    assert!(clone.has_keyring_root());
    let wrapped = source.new_wrapped_storage_key().unwrap();
    source.hold_storage_key(7, &wrapped).unwrap();
    clone.hold_storage_key(7, &wrapped).unwrap();
    clone.set_storage_key_version(7).unwrap();
    let held = clone.seal_seed(dev, 2, &seed).unwrap();
    assert_eq!(held.kstore_version, 7);
    assert!(source.unseal_seed(dev, 2, 7, &held.ciphertext).unwrap() == seed);
    // The clone's root kept its unwrap template: no readable key from it.
    {
        use cryptoki::mechanism::Mechanism;
        use cryptoki::object::{Attribute, KeyType, ObjectClass};
        let s = common::raw_session("mc-clone-b");
        let root = s
            .find_objects(&[Attribute::Label(b"microcert-kroot".to_vec())])
            .unwrap()[0];
        let readable = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
        ];
        assert!(
            s.unwrap_key(&Mechanism::AesKeyWrap, root, &wrapped, &readable)
                .is_err()
        );
    }
    // The package opens on no other token (its key-transport key is gone).
    drop(clone);
    assert!(Pkcs11Card::import_clone(&b, &package).is_err());
    // 5. The SO removes the trust.
    drop(source);
    assert_eq!(forget_clone_target(&a, SO_PIN).unwrap(), 1);
}

#[test]
fn a_non_extractable_card_cannot_be_exported() {
    let Some(card) = main_card() else { return };
    let request = microcert_pkcs11::clone::CloneRequest {
        modulus: vec![0xff; 384],
        public_exponent: vec![1, 0, 1],
    };
    assert!(matches!(
        card.export_for_clone(&request),
        Err(Pkcs11Error::KeysNotExtractable)
    ));
    // Still a working card.
    let mut b = [0u8; 4];
    card.random(&mut b).unwrap();
    let _ = Error::Verification;
}
