//! The card's anchor on a PKCS#11 token (issue 12): kept as a private
//! token object, so a database put back to an older copy is found even
//! when the anchor file beside it is put back too.

mod common;

use std::sync::Arc;

use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use microcert_center::{Center, CenterConfig, EncryptionCard};
use microcert_core::DeviceId;
use microcert_pkcs11::Pkcs11Card;

use common::{config, hsm, raw_session};

const NOW: u64 = 1_780_272_000;

fn ids(from: u64, n: u64) -> Vec<DeviceId> {
    (0..n)
        .map(|i| DeviceId::from_u64(0x0400_0000_0000_0000 + from + i))
        .collect()
}

#[test]
fn the_token_keeps_the_anchor_when_database_and_file_are_put_back() {
    let Some(_) = hsm() else { return };
    let card = Arc::new(Pkcs11Card::init(&config("mc-center")).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let anchor = dir.path().join("center.anchor");

    let center = Center::open_sqlite(&db, card.clone(), CenterConfig::default()).unwrap();
    center
        .provision(&ids(0, 4), 1, None, 0, "factory", NOW)
        .unwrap();
    assert_eq!(center.keep_anchor(&anchor).unwrap(), None);
    drop(center);
    // The attacker's copies of the database and of the anchor file.
    let db_copy = dir.path().join("keys.db.copy");
    let anchor_copy = dir.path().join("center.anchor.copy");
    std::fs::copy(&db, &db_copy).unwrap();
    std::fs::copy(&anchor, &anchor_copy).unwrap();

    let center = Center::open_sqlite(&db, card.clone(), CenterConfig::default()).unwrap();
    assert_eq!(center.keep_anchor(&anchor).unwrap(), None);
    center
        .provision(&ids(100, 2), 1, None, 0, "factory", NOW + 1)
        .unwrap();
    drop(center);

    // The token holds the anchor as a private token data object.
    let s = raw_session("mc-center");
    let found = s
        .find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
        ])
        .unwrap();
    assert_eq!(found.len(), 1);
    let label = s.get_attributes(found[0], &[AttributeType::Label]).unwrap();
    assert!(matches!(&label[0], Attribute::Label(l) if l.starts_with(b"microcert-anchor-")));

    // Both put back: the file is consistent with the old database, the
    // token's copy is not.
    std::fs::copy(&db_copy, &db).unwrap();
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
    std::fs::copy(&anchor_copy, &anchor).unwrap();
    let center = Center::open_sqlite(&db, card.clone(), CenterConfig::default()).unwrap();
    let found = center.keep_anchor(&anchor).unwrap();
    assert!(
        found.as_deref().is_some_and(|f| f.contains("older")),
        "{found:?}"
    );
    let r = center.integrity_check(Some(&anchor), NOW + 2).unwrap();
    assert!(!r.is_clean(), "{r:?}");

    // A software card keeps no copy: the same trick with it is what
    // remains (SECURITY.md).
    let soft = microcert_center::SoftwareCard::ephemeral().unwrap();
    assert_eq!(soft.load_anchor("x").unwrap(), None);
    assert!(!soft.store_anchor("x", b"y").unwrap());
}
