//! The key database's metadata (migration "meta", issue 14): an identity
//! drawn at creation, different for every database, kept across opens;
//! values written by the CLI (the card last used with it) replaced in
//! place.

use microcert_center::{KeyDatabase, SqliteDatabase};

#[test]
fn a_database_has_its_own_identity_from_creation() {
    let dir = tempfile::tempdir().unwrap();
    let a = SqliteDatabase::open(&dir.path().join("a.db")).unwrap();
    let b = SqliteDatabase::open(&dir.path().join("b.db")).unwrap();
    let id_a = a
        .meta("database_id")
        .unwrap()
        .expect("an identity at creation");
    let id_b = b.meta("database_id").unwrap().unwrap();
    assert_eq!(id_a.len(), 32);
    assert!(id_a.bytes().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(id_a, id_b, "two databases share an identity");
    assert_eq!(a.meta("card_id").unwrap(), None);
    a.set_meta("card_id", "0011").unwrap();
    a.set_meta("card_id", "2233").unwrap();
    drop(a);
    let a = SqliteDatabase::open(&dir.path().join("a.db")).unwrap();
    assert_eq!(a.meta("database_id").unwrap(), Some(id_a));
    assert_eq!(a.meta("card_id").unwrap().as_deref(), Some("2233"));
}
