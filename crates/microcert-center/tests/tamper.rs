//! The key database changed from outside the center, with a raw SQLite
//! connection as an attacker with file access would: each change is
//! detected and named, the tampered device is refused while the rest of
//! the fleet keeps working, and `repair` puts it right from a backup where
//! one holds it (and refuses, saying why, where none does).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use microcert_center::{Center, CenterConfig, Error, ReplayMode, SoftwareCard};
use microcert_core::{Audience, DeviceId};
use rusqlite::{Connection, params};

const N: u64 = 40;
const C: Audience = Audience::CENTER;

struct Setup {
    _dir: tempfile::TempDir,
    db: PathBuf,
    backups: PathBuf,
    anchor: PathBuf,
    card: Arc<SoftwareCard>,
    center: Center,
    fleet: Vec<TestNode>,
}

fn config() -> CenterConfig {
    CenterConfig {
        replay: ReplayMode::Database,
        ..CenterConfig::default()
    }
}

/// 40 devices enrolled and activated (fleet member i is in shard i % 16),
/// device 2 revoked, then one backup.
fn setup(with_backup: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    let mut fleet = make_fleet(&*card, N);
    let batch = dir.path().join("batch.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&C, NOW + 1);
        center.verify_auth(&a, &C, NOW + 1).unwrap();
    }
    center
        .revoke(fleet[2].id, "ops", "stolen", NOW + 2)
        .unwrap();
    let backups = dir.path().join("backups");
    let anchor = dir.path().join("center.anchor");
    if with_backup {
        center
            .create_backup(&backups, 3, Some(&anchor), "ops", NOW + 3)
            .unwrap();
    }
    assert!(
        center
            .integrity_check(Some(&anchor), NOW + 4)
            .unwrap()
            .is_clean()
    );
    Setup {
        _dir: dir,
        db,
        backups,
        anchor,
        card,
        center,
        fleet,
    }
}

fn raw(db: &Path) -> Connection {
    Connection::open(db).unwrap()
}

fn ciphertext(conn: &Connection, d: DeviceId) -> Vec<u8> {
    conn.query_row(
        "SELECT ciphertext FROM seeds WHERE device = ?1 AND generation = 0",
        [&d.0[..]],
        |r| r.get(0),
    )
    .unwrap()
}

fn set_ciphertext(conn: &Connection, d: DeviceId, ct: &[u8]) {
    conn.execute(
        "UPDATE seeds SET ciphertext = ?2 WHERE device = ?1 AND generation = 0",
        params![&d.0[..], ct],
    )
    .unwrap();
}

fn auth(s: &mut Setup, i: usize, t: u64) -> microcert_center::Result<()> {
    let (a, _) = s.fleet[i].auth(&C, t);
    s.center.verify_auth(&a, &C, t).map(|_| ())
}

#[test]
fn every_tampering_is_named_quarantined_and_repaired() {
    let mut s = setup(true);
    let ids: Vec<DeviceId> = s.fleet.iter().map(|n| n.id).collect();
    {
        let conn = raw(&s.db);
        // 1: one ciphertext byte flipped.
        let mut ct = ciphertext(&conn, ids[1]);
        ct[100] ^= 0x01;
        set_ciphertext(&conn, ids[1], &ct);
        // 2: a revoked device put back to active.
        conn.execute(
            "UPDATE seeds SET state = 'active', compromised_at = NULL WHERE device = ?1",
            [&ids[2].0[..]],
        )
        .unwrap();
        // 3 and 4: ciphertexts swapped.
        let (c3, c4) = (ciphertext(&conn, ids[3]), ciphertext(&conn, ids[4]));
        set_ciphertext(&conn, ids[3], &c4);
        set_ciphertext(&conn, ids[4], &c3);
        // 5: a row deleted.
        conn.execute("DELETE FROM seeds WHERE device = ?1", [&ids[5].0[..]])
            .unwrap();
        // 6: a forged generation 1 inserted, copied from generation 0
        // with a made-up tag.
        conn.execute(
            "INSERT INTO seeds SELECT device, 1, state, base_year, suite, kstore_version, \
             ciphertext, randomblob(32), via, enroll_t, enroll_r + 1, enroll_digest, receipt, \
             created, activated_at, suspended_at, deactivated_at, compromised_at, destroyed_at, \
             grace_until FROM seeds WHERE device = ?1 AND generation = 0",
            [&ids[6].0[..]],
        )
        .unwrap();
    }
    s.center.clear_cache();

    let report = s.center.integrity_check(Some(&s.anchor), NOW + 10).unwrap();
    assert!(!report.is_clean());
    let mut bad = report.bad_records.clone();
    bad.sort();
    assert_eq!(
        bad,
        vec![
            (ids[1], 0),
            (ids[2], 0),
            (ids[3], 0),
            (ids[4], 0),
            (ids[6], 1)
        ],
        "{report:?}"
    );
    assert_eq!(report.missing_records, vec![(ids[5], 0)]);
    // The shards see the deleted and the inserted row (the stored tags of
    // the edited rows are unchanged, so their shards still add up).
    let mut shards = report.bad_shards.clone();
    shards.sort();
    assert_eq!(shards, vec![5, 6]);
    assert!(report.rolled_back_shards.is_empty());
    let text = report.findings().join("\n");
    assert!(text.contains(&format!("record {} generation 0", ids[1])));
    assert!(text.contains(&format!("record {} generation 0: enrolled", ids[5])));

    // Quarantine: the tampered devices are refused, the others work.
    for i in [1, 2, 3, 4, 6] {
        assert!(
            matches!(auth(&mut s, i, NOW + 20), Err(Error::Integrity(_))),
            "device {i}"
        );
    }
    assert!(auth(&mut s, 5, NOW + 20).is_err());
    for i in [0, 7, 8, 20, 39] {
        auth(&mut s, i, NOW + 20).unwrap();
    }

    let fixed = s
        .center
        .repair(&s.backups, Some(&s.anchor), "ops", NOW + 30)
        .unwrap();
    assert!(fixed.refused.is_empty(), "{fixed:?}");
    let mut restored = fixed.restored.clone();
    restored.sort();
    assert_eq!(
        restored,
        vec![
            (ids[1], 0),
            (ids[2], 0),
            (ids[3], 0),
            (ids[4], 0),
            (ids[5], 0)
        ]
    );
    assert_eq!(fixed.removed, vec![(ids[6], 1)]);
    assert_eq!(fixed.used.len(), 1);
    let after = s.center.integrity_check(Some(&s.anchor), NOW + 31).unwrap();
    assert!(after.is_clean(), "{after:?}");

    // Back in service, the revoked one revoked again.
    for i in [1, 3, 4, 5, 6] {
        auth(&mut s, i, NOW + 40).unwrap();
    }
    assert!(matches!(auth(&mut s, 2, NOW + 40), Err(Error::Revoked)));
    let log = s.center.audit_log(0, 10_000).unwrap();
    assert_eq!(log.iter().filter(|e| e.entry.action == "repair").count(), 6);
    assert_eq!(s.center.verify_audit().unwrap().1, None);
}

#[test]
fn repair_without_a_backup_refuses_and_says_why() {
    let s = setup(false);
    let id = s.fleet[1].id;
    {
        let conn = raw(&s.db);
        conn.execute("DELETE FROM seeds WHERE device = ?1", [&id.0[..]])
            .unwrap();
    }
    let fixed = s
        .center
        .repair(&s.backups, Some(&s.anchor), "ops", NOW + 30)
        .unwrap();
    assert!(fixed.restored.is_empty());
    assert_eq!(fixed.refused.len(), 1, "{fixed:?}");
    assert!(fixed.refused[0].contains("digest shard 1"), "{fixed:?}");
    assert!(
        !s.center
            .integrity_check(Some(&s.anchor), NOW + 31)
            .unwrap()
            .is_clean()
    );
}

#[test]
fn a_later_change_is_not_undone_by_an_older_backup() {
    // The backup has device 7 active; it is revoked afterwards; then its
    // row is put back to the old, validly tagged, active copy from outside.
    let mut s = setup(true);
    let id = s.fleet[7].id;
    let old: Vec<(String, Option<i64>, Vec<u8>)> = {
        let conn = raw(&s.db);
        let mut st = conn
            .prepare("SELECT state, compromised_at, tag FROM seeds WHERE device = ?1")
            .unwrap();
        st.query_map([&id.0[..]], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    s.center.revoke(id, "ops", "lost", NOW + 5).unwrap();
    {
        let conn = raw(&s.db);
        conn.execute(
            "UPDATE seeds SET state = ?2, compromised_at = ?3, tag = ?4 WHERE device = ?1",
            params![&id.0[..], old[0].0, old[0].1, old[0].2],
        )
        .unwrap();
    }
    s.center.clear_cache();
    // The tag is valid (it was the card's once): only the shard shows it.
    let r = s.center.integrity_check(Some(&s.anchor), NOW + 6).unwrap();
    assert_eq!(r.bad_shards, vec![7]);
    // The only backup predates the revocation: no copy matches the card's
    // digest, so nothing is changed.
    let fixed = s
        .center
        .repair(&s.backups, Some(&s.anchor), "ops", NOW + 7)
        .unwrap();
    assert!(fixed.restored.is_empty() && fixed.removed.is_empty());
    assert!(fixed.refused[0].contains("digest shard 7"));
    // A backup made after the revocation holds the right copy ... but the
    // database is tampered, so no backup is made of it.
    assert!(
        s.center
            .create_backup(&s.backups, 3, None, "ops", NOW + 8)
            .is_err()
    );
    auth(&mut s, 0, NOW + 9).unwrap();
}

#[test]
fn an_older_copy_of_the_whole_file_is_detected_and_restored() {
    let s = setup(true);
    let Setup {
        _dir,
        db,
        backups,
        anchor,
        card,
        center,
        mut fleet,
    } = s;
    drop(center);
    let old = db.with_extension("old");
    std::fs::copy(&db, &old).unwrap();

    // Later changes, a backup of them, and the anchor moved on.
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    center.revoke(fleet[9].id, "ops", "lost", NOW + 5).unwrap();
    center
        .suspend(fleet[10].id, "ops", "audit", NOW + 5)
        .unwrap();
    center
        .create_backup(&backups, 3, Some(&anchor), "ops", NOW + 6)
        .unwrap();
    assert!(
        center
            .integrity_check(Some(&anchor), NOW + 7)
            .unwrap()
            .is_clean()
    );
    drop(center);

    // The attacker puts the older file back: consistent in itself.
    std::fs::copy(&old, &db).unwrap();
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    assert!(center.integrity_scan().unwrap().is_clean());
    let r = center.integrity_check(Some(&anchor), NOW + 8).unwrap();
    assert!(!r.is_clean());
    let mut rolled = r.rolled_back_shards.clone();
    rolled.sort();
    // Seed shards 9 and 10, and device 9's REVOKE command and its device
    // row (counter) in the command and device-row shards.
    assert_eq!(rolled, vec![9, 10, 32 + 9, 48 + 9], "{r:?}");
    assert!(r.audit.as_deref().unwrap().contains("older copy"));
    assert!(r.findings().join("\n").contains("database rolled back"));
    // The revoked device would verify on the old copy: the operator sees
    // the check fail and repairs.
    let fixed = center
        .repair(&backups, Some(&anchor), "ops", NOW + 9)
        .unwrap();
    let whole = fixed
        .whole_restore
        .clone()
        .expect("a backup covers the anchor");
    drop(center);
    let aside = microcert_center::repair::restore_sqlite_file(
        &db,
        &whole,
        &(card.clone() as Arc<dyn microcert_center::EncryptionCard>),
        Some(&anchor),
        "ops",
        NOW + 10,
    )
    .unwrap();
    assert!(aside.is_some());
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    let r = center.integrity_check(Some(&anchor), NOW + 11).unwrap();
    assert!(r.is_clean(), "{r:?}");
    let (a, _) = fleet[9].auth(&C, NOW + 12);
    assert!(matches!(
        center.verify_auth(&a, &C, NOW + 12),
        Err(Error::Revoked)
    ));
    let (a, _) = fleet[11].auth(&C, NOW + 12);
    center.verify_auth(&a, &C, NOW + 12).unwrap();
}

#[test]
fn an_older_copy_newer_than_every_backup_is_refused() {
    let s = setup(true);
    let Setup {
        _dir,
        db,
        backups,
        anchor,
        card,
        center,
        ..
    } = s;
    drop(center);
    let old = db.with_extension("old");
    std::fs::copy(&db, &old).unwrap();
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    center
        .suspend(
            DeviceId::from_u64(0x0200_0000_0000_0003),
            "ops",
            "x",
            NOW + 5,
        )
        .unwrap();
    center.refresh_anchor(&anchor, NOW + 6).unwrap();
    drop(center);
    std::fs::copy(&old, &db).unwrap();
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    let fixed = center
        .repair(&backups, Some(&anchor), "ops", NOW + 7)
        .unwrap();
    assert!(fixed.whole_restore.is_none());
    assert!(
        fixed.refused[0].contains("older than the card's anchor"),
        "{fixed:?}"
    );
}
