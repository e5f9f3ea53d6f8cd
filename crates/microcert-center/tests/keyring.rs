//! The keyring in the key database and the leader lease (issue 14):
//! migration from a card file with two storage-key versions, a rotation at
//! one center used by another at once, backups that carry the keyring, and
//! the attacks: rows swapped, the keyring rolled back, a lease forged to
//! stop every periodic job.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use microcert_center::db::LeaseRow;
use microcert_center::keyring::Leader;
use microcert_center::{
    Center, CenterConfig, EncryptionCard, Error, KdfParams, KeyDatabase, ReplayMode, SoftwareCard,
    SqliteDatabase, backup,
};
use microcert_core::Audience;

const PASS: &[u8] = b"keyring test";
const C: Audience = Audience::CENTER;

fn config() -> CenterConfig {
    CenterConfig {
        replay: ReplayMode::Database,
        // No cached seed hides a key problem.
        cache_capacity: 0,
        ..CenterConfig::default()
    }
}

fn center(db: &Path, card: Arc<SoftwareCard>) -> Center {
    Center::open_sqlite(db, card, config()).unwrap()
}

fn init_card(path: &Path) -> Arc<SoftwareCard> {
    Arc::new(SoftwareCard::init(path, PASS, KdfParams::insecure_for_tests()).unwrap())
}

fn import(c: &Center, dir: &Path, fleet: &mut [TestNode], name: &str) {
    let batch = dir.join(name);
    write_batch(&batch, fleet, NOW);
    c.import_batch(&batch, "factory", NOW, &mut |_| {}).unwrap();
}

fn auth_all(c: &Center, fleet: &mut [TestNode], t: u64) {
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&C, t);
        c.verify_auth(&a, &C, t)
            .unwrap_or_else(|e| panic!("{:?}: {e}", node.id));
    }
}

fn versions_in_records(c: &Center) -> Vec<u32> {
    let mut v: Vec<u32> = c
        .database()
        .scan_seeds(None, 1_000_000)
        .unwrap()
        .iter()
        .filter(|s| s.ciphertext.is_some())
        .map(|s| s.kstore_version)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn rows(db: &Path) -> Vec<(u32, Vec<u8>, Vec<u8>)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut st = conn
        .prepare("SELECT version, bytes, tag FROM keyring ORDER BY version")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<Vec<_>>>()
        .unwrap()
}

fn put_rows(db: &Path, rows: &[(u32, Vec<u8>, Vec<u8>)]) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute("DELETE FROM keyring", []).unwrap();
    for (v, b, t) in rows {
        conn.execute(
            "INSERT INTO keyring (version, bytes, tag) VALUES (?1, ?2, ?3)",
            rusqlite::params![v, b, t],
        )
        .unwrap();
    }
}

/// A data directory of a release before the keyring: the card file holds
/// storage keys 1 and 2 (current 2), seeds are sealed under both, and the
/// database has no keyring. Returns (card file, database, fleet).
fn pre_keyring_dir(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<TestNode>) {
    let db = dir.join("center.db");
    let card = init_card(&dir.join("made.mccard"));
    let mut fleet = make_fleet(&*card, 20);
    {
        let c = center(&db, card.clone());
        import(&c, dir, &mut fleet[..10], "a.jsonl");
        // A new version without re-sealing: seeds under 1 and 2.
        c.card().rotate_storage_key().unwrap();
        import(&c, dir, &mut fleet[10..], "b.jsonl");
        assert_eq!(versions_in_records(&c), vec![1, 2]);
    }
    let old = dir.join("old.mccard");
    card.save_pre_keyring(&old, PASS, KdfParams::insecure_for_tests())
        .unwrap();
    // The database as the old release left it: no keyring.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("DELETE FROM keyring", []).unwrap();
    (old, db, fleet)
}

#[test]
fn an_old_data_dir_with_two_versions_migrates_at_first_open() {
    let dir = tempfile::tempdir().unwrap();
    let (old, db, mut fleet) = pre_keyring_dir(dir.path());
    let clone = dir.path().join("clone.mccard");
    std::fs::copy(&old, &clone).unwrap();

    let card = Arc::new(SoftwareCard::open(&old, PASS).unwrap());
    assert_eq!(card.storage_key_versions(), vec![1, 2]);
    let c = center(&db, card);
    let head = c.sync_keyring().unwrap().unwrap();
    assert_eq!((head.current, head.versions.clone()), (2, vec![1, 2]));
    assert_eq!(rows(&db).len(), 3, "head and two wrapped keys");
    auth_all(&c, &mut fleet, NOW + 1);
    drop(c);

    // The card file now keeps only the root key.
    let reopened = Arc::new(SoftwareCard::open(&old, PASS).unwrap());
    assert!(reopened.storage_key_versions().is_empty());
    assert!(reopened.legacy_storage_keys().unwrap().is_none());
    let c = center(&db, reopened);
    assert_eq!(c.sync_keyring().unwrap().unwrap(), head, "idempotent");
    auth_all(&c, &mut fleet, NOW + 2);
    drop(c);

    // A clone of the old card file (another center's data directory)
    // migrates onto the same rows: AES-KW is deterministic.
    let before = rows(&db);
    let c = center(&db, Arc::new(SoftwareCard::open(&clone, PASS).unwrap()));
    assert_eq!(c.sync_keyring().unwrap().unwrap(), head);
    assert_eq!(rows(&db), before);
    auth_all(&c, &mut fleet, NOW + 3);
    assert!(
        SoftwareCard::open(&clone, PASS)
            .unwrap()
            .storage_key_versions()
            .is_empty()
    );
}

#[test]
fn a_rotation_at_one_center_is_used_by_the_other_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let file_a = dir.path().join("a.mccard");
    let card_a = init_card(&file_a);
    let file_b = dir.path().join("b.mccard");
    std::fs::copy(&file_a, &file_b).unwrap();
    let mut fleet = make_fleet(&*card_a, 30);
    let a = center(&db, card_a);
    let b = center(&db, Arc::new(SoftwareCard::open(&file_b, PASS).unwrap()));
    import(&a, dir.path(), &mut fleet[..20], "a.jsonl");
    auth_all(&b, &mut fleet[..20], NOW + 1);
    assert_eq!(b.card().storage_key_version(), 1);

    let r = a
        .rotate_storage_key(7, None, "ops", NOW + 2, &mut |_| {})
        .unwrap();
    assert_eq!(
        (r.version, r.resealed, r.destroyed.clone()),
        (2, 20, vec![1])
    );
    // B opens what A re-sealed under a version it did not hold.
    auth_all(&b, &mut fleet[..20], NOW + 3);
    // B seals under the new version (re-read within REFRESH).
    std::thread::sleep(microcert_center::keyring::REFRESH + Duration::from_millis(200));
    import(&b, dir.path(), &mut fleet[20..], "b.jsonl");
    assert_eq!(versions_in_records(&b), vec![2]);
    auth_all(&a, &mut fleet, NOW + 4);
    assert_eq!(b.card().storage_key_versions(), vec![2]);
}

/// Attack: with write access to the database, swap the wrapped keys of
/// two versions (or move a row's bytes and tag to another version). The
/// tags cover the version: refused, nothing unsealed under a wrong key.
#[test]
fn attack_keyring_rows_swapped_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let card = init_card(&dir.path().join("card"));
    let mut fleet = make_fleet(&*card, 6);
    let c = center(&db, card.clone());
    import(&c, dir.path(), &mut fleet[..3], "a.jsonl");
    c.card().rotate_storage_key().unwrap();
    import(&c, dir.path(), &mut fleet[3..], "b.jsonl");
    drop(c);
    let good = rows(&db);
    assert_eq!(good.len(), 3);

    // Bytes swapped, tags left.
    let mut swapped = good.clone();
    let (b1, b2) = (swapped[1].1.clone(), swapped[2].1.clone());
    swapped[1].1 = b2;
    swapped[2].1 = b1;
    // Whole rows moved to the other version.
    let mut moved = good.clone();
    let (r1, r2) = (moved[1].clone(), moved[2].clone());
    moved[1] = (1, r2.1, r2.2);
    moved[2] = (2, r1.1, r1.2);
    // The head re-pointed at version 1 with a made-up tag.
    let mut forged = good.clone();
    forged[0].1[8..12].copy_from_slice(&1u32.to_be_bytes());
    for bad in [swapped, moved, forged] {
        put_rows(&db, &bad);
        let c = center(&db, card.clone());
        let e = c.sync_keyring().unwrap_err();
        assert!(matches!(e, Error::Keyring(_)), "{e}");
        assert!(e.to_string().contains("card tag"), "{e}");
        // The seeds do not open either: no wrong key is ever used.
        let (a, _) = fleet[0].auth(&C, NOW + 1);
        assert!(c.verify_auth(&a, &C, NOW + 1).is_err());
    }
    put_rows(&db, &good);
    let c = center(&db, card);
    auth_all(&c, &mut fleet, NOW + 2);
}

/// Attack: copy the keyring rows, wait for a rotation (the old key is
/// retired because it leaked), then put the old rows back so that new
/// seeds are sealed under the retired key again. A center that has seen
/// the newer keyring refuses the older one; an older head beside newer
/// rows is refused by every center.
#[test]
fn attack_keyring_rolled_back_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let card = init_card(&dir.path().join("card"));
    let mut fleet = make_fleet(&*card, 6);
    let c = center(&db, card.clone());
    import(&c, dir.path(), &mut fleet[..3], "a.jsonl");
    let saved = rows(&db);
    let r = c
        .rotate_storage_key(10, None, "ops", NOW + 1, &mut |_| {})
        .unwrap();
    assert_eq!(r.destroyed, vec![1]);
    let newer = rows(&db);

    // The old head alone beside the newer rows: inconsistent for anyone.
    let mixed = vec![saved[0].clone(), newer[1].clone()];
    put_rows(&db, &mixed);
    let other = center(&db, card.clone());
    let e = other.sync_keyring().unwrap_err();
    assert!(e.to_string().contains("head"), "{e}");
    drop(other);

    // The whole old keyring put back: the running center refuses it and
    // keeps sealing under the newest version it has seen, never under 1.
    put_rows(&db, &saved);
    std::thread::sleep(microcert_center::keyring::REFRESH + Duration::from_millis(200));
    let e = c.sync_keyring().unwrap_err();
    assert!(e.to_string().contains("rolled back"), "{e}");
    import(&c, dir.path(), &mut fleet[3..], "b.jsonl");
    assert_eq!(versions_in_records(&c), vec![2]);
    assert_eq!(c.card().storage_key_version(), 2);

    put_rows(&db, &newer);
    assert_eq!(c.sync_keyring().unwrap().unwrap().current, 2);
    auth_all(&c, &mut fleet, NOW + 2);
}

#[test]
fn a_backup_carries_the_keyring_and_a_restore_without_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let card = init_card(&dir.path().join("card"));
    let mut fleet = make_fleet(&*card, 8);
    let c = center(&db, card.clone());
    import(&c, dir.path(), &mut fleet[..4], "a.jsonl");
    c.card().rotate_storage_key().unwrap();
    import(&c, dir.path(), &mut fleet[4..], "b.jsonl");
    let s = c
        .create_backup(&dir.path().join("backups"), 5, None, "ops", NOW + 1)
        .unwrap();
    assert_eq!(s.kstore_versions, vec![1, 2]);
    drop(c);
    let b = backup::read(&s.path, &*card).unwrap();
    assert_eq!(b.keyring.len(), 3);

    // Into a new database, with the card (which keeps only its root key).
    let db2 = dir.path().join("restored.db");
    {
        let raw = SqliteDatabase::open(&db2).unwrap();
        backup::restore_into(&raw, &*card, &b, "ops", NOW + 2).unwrap();
    }
    let c2 = center(&db2, card.clone());
    auth_all(&c2, &mut fleet, NOW + 3);
    drop(c2);

    // A backup without its keyring (made by hand, or cut) is refused
    // clearly, before anything is written.
    let mut stripped = b.clone();
    stripped.keyring.clear();
    let db3 = dir.path().join("refused.db");
    let raw = SqliteDatabase::open(&db3).unwrap();
    let e = backup::restore_into(&raw, &*card, &stripped, "ops", NOW + 2).unwrap_err();
    assert!(matches!(e, Error::Keyring(_)), "{e}");
    assert!(e.to_string().contains("[1, 2]"), "{e}");
    assert!(raw.list_devices(&Default::default()).unwrap().is_empty());
    drop(raw);
    // Nor does a center on such a database make a new version 1.
    let raw = SqliteDatabase::open(&db3).unwrap();
    assert!(raw.digest_shards().unwrap().is_empty());
}

fn lease_db(dir: &Path) -> (Arc<dyn KeyDatabase>, Arc<SoftwareCard>) {
    let card = init_card(&dir.join("card"));
    let db: Arc<dyn KeyDatabase> = Arc::new(SqliteDatabase::open(&dir.join("center.db")).unwrap());
    (db, card)
}

#[test]
fn one_leader_and_a_dead_leaders_lease_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (db, card) = lease_db(dir.path());
    let period = Duration::from_millis(400);
    let a = Leader::new(db.clone(), card.clone(), "periodic", period).unwrap();
    let b = Leader::new(db.clone(), card.clone(), "periodic", period).unwrap();
    let t = 1_000_000;
    assert!(a.poll(t).unwrap());
    assert!(!b.poll(t + 10).unwrap());
    // Renewed by its holder, still not B's.
    assert!(a.poll(t + 300).unwrap());
    assert!(!b.poll(t + 500).unwrap());
    // A dies (no more renewals): once lapsed, B takes it; A then stops.
    assert!(b.poll(t + 300 + 400).unwrap());
    assert!(!a.poll(t + 710).unwrap());
    assert!(!a.is_leader());
    // A clean stop hands it over at once.
    b.release().unwrap();
    assert!(a.poll(t + 720).unwrap());
}

/// Attack: with write access to the database, write a lease "held" by a
/// made-up center until the far future, so that no center runs the
/// integrity scan while records are tampered with. A lease that fails its
/// card tag, or claims more than one period ahead, is taken over.
#[test]
fn attack_forged_lease_does_not_stop_the_periodic_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let (db, card) = lease_db(dir.path());
    let period = Duration::from_secs(15);
    let a = Leader::new(db.clone(), card.clone(), "periodic", period).unwrap();
    let t = 2_000_000_000;
    let forged = LeaseRow {
        name: "periodic".into(),
        holder: "attacker".into(),
        expires_ms: u64::MAX / 2,
        tag: vec![0; 32],
    };
    assert!(db.swap_lease(None, &forged).unwrap());
    assert!(a.poll(t).unwrap(), "a forged lease is taken over");
    assert_eq!(db.lease("periodic").unwrap().unwrap().holder, a.holder());

    // A real holder's lease replayed later with its old expiry: lapsed.
    let old = db.lease("periodic").unwrap().unwrap();
    let b = Leader::new(db.clone(), card.clone(), "periodic", period).unwrap();
    assert!(!b.poll(t + 1).unwrap());
    assert!(b.poll(t + 16_000).unwrap());
    let cur = db.lease("periodic").unwrap().unwrap();
    assert!(db.swap_lease(Some(&cur), &old).unwrap());
    assert!(
        b.poll(t + 16_001).unwrap(),
        "a replayed lapsed lease counts for nothing"
    );

    // A lease tagged by the card but claiming far ahead (a holder's clock
    // far in the future) is not honoured either.
    let c = Leader::new(db.clone(), card.clone(), "periodic", period).unwrap();
    assert!(c.poll(t + 10_000_000).unwrap());
    assert!(b.poll(t + 17_000).unwrap());
}

/// A seed record naming a version no center holds (a restore of an old
/// backup, an edited row) is refused with `NoStorageKey`, again and again
/// without a reload each time, and the versions held keep working.
#[test]
fn an_unknown_version_is_refused_at_once_and_the_rest_works() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let card = init_card(&dir.path().join("a.mccard"));
    let mut fleet = make_fleet(&*card, 3);
    let c = center(&db, card);
    import(&c, dir.path(), &mut fleet, "a.jsonl");
    let started = std::time::Instant::now();
    for _ in 0..50 {
        let e = c
            .card()
            .unseal_seed(fleet[0].id, 0, 99, &[0u8; 1024])
            .unwrap_err();
        assert!(matches!(e, Error::NoStorageKey { version: 99 }), "{e:?}");
    }
    // One reload for the first miss, none for the next 49 (bounded far
    // below 50 waits of MISS_WAIT each).
    assert!(started.elapsed() < microcert_center::keyring::MISS_WAIT * 2);
    auth_all(&c, &mut fleet, NOW + 1);
}

/// Attack: with every center stopped, the whole older keyring (head and
/// rows, validly tagged) put back. The running centers' epoch floor is
/// gone with them; the card's anchor keeps the keyring's epoch, so the
/// next start finds the database older than its anchor (and `serve`
/// refuses to start on it).
#[test]
fn attack_keyring_put_back_while_stopped_is_found_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let anchor = dir.path().join("center.anchor");
    let card = init_card(&dir.path().join("card"));
    let mut fleet = make_fleet(&*card, 3);
    let c = center(&db, card.clone());
    assert!(c.keep_anchor(&anchor).unwrap().is_none());
    import(&c, dir.path(), &mut fleet, "a.jsonl");
    let saved = rows(&db);
    c.rotate_storage_key(10, None, "ops", NOW + 1, &mut |_| {})
        .unwrap();
    c.refresh_anchor(&anchor, NOW + 2).unwrap();
    drop(c);

    put_rows(&db, &saved);
    let c = center(&db, card);
    let found = c.keep_anchor(&anchor).unwrap();
    assert!(
        found.as_deref().is_some_and(|f| f.contains("keyring")),
        "a keyring put back while every center was stopped is not found: {found:?}"
    );
    let r = c.integrity_check(Some(&anchor), NOW + 3).unwrap();
    assert!(!r.is_clean(), "{:?}", r.findings());
}
