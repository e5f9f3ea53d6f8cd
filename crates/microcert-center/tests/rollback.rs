//! Rollback of any acknowledged change is detected (issue 12, attack 3),
//! restores keep command counters above what a node accepted and rebuild
//! pending commands (life-cycle gaps), and a database written before the
//! card covered every stored value is upgraded once.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use microcert_center::anchor::{self, Anchor};
use microcert_center::{Center, CenterConfig, EncryptionCard, ReplayMode, SoftwareCard};
use microcert_core::{Audience, Command};
use rusqlite::Connection;

const C: Audience = Audience::CENTER;

fn config() -> CenterConfig {
    CenterConfig {
        replay: ReplayMode::Database,
        ..CenterConfig::default()
    }
}

fn enrolled_center(db: &Path, card: &Arc<SoftwareCard>, n: u64) -> (Center, Vec<TestNode>) {
    let center = Center::open_sqlite(db, card.clone(), config()).unwrap();
    let mut fleet = make_fleet(&**card, n);
    let batch = db.with_file_name("batch.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&C, NOW + 1);
        center.verify_auth(&a, &C, NOW + 1).unwrap();
    }
    (center, fleet)
}

/// The keeper moves the anchor within about a second of a committed
/// change, without any integrity check or backup.
#[test]
fn the_anchor_follows_every_change_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let path = dir.path().join("center.anchor");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (center, fleet) = enrolled_center(&db, &card, 3);
    assert_eq!(center.keep_anchor(&path).unwrap(), None);
    center
        .suspend(fleet[1].id, "ops", "maintenance", NOW + 2)
        .unwrap();
    let want = Anchor::of(center.database(), &*card, 0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = anchor::load(&path, &*card).unwrap();
        if a.as_ref().is_some_and(|a| want.is_covered_by(a)) {
            break;
        }
        assert!(Instant::now() < deadline, "the anchor did not follow");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A copy taken, a change acknowledged, the center dropped cleanly, the
/// copy put back: found at the next start and by the integrity check.
#[test]
fn a_copy_older_than_an_acknowledged_change_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let path = dir.path().join("center.anchor");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (center, fleet) = enrolled_center(&db, &card, 3);
    center.keep_anchor(&path).unwrap();
    drop(center);
    let old = dir.path().join("center.db.old");
    std::fs::copy(&db, &old).unwrap();

    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    assert_eq!(center.keep_anchor(&path).unwrap(), None);
    // Acknowledged, and the center stopped cleanly at once (no check, no
    // backup, no time for the keeper's tick): the drop writes the anchor.
    center
        .revoke(fleet[2].id, "ops", "stolen", NOW + 3)
        .unwrap();
    drop(center);

    std::fs::copy(&old, &db).unwrap();
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    let found = center.keep_anchor(&path).unwrap();
    assert!(
        found.as_deref().is_some_and(|f| f.contains("older")),
        "{found:?}"
    );
    assert!(center.rolled_back().is_some());
    let r = center.integrity_check(Some(&path), NOW + 4).unwrap();
    assert!(!r.is_clean());
    assert!(r.rolled_back_shards.contains(&2), "{r:?}");
    // The anchor stays where it was (never moved back by the keeper).
    drop(center);
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    assert!(center.keep_anchor(&path).unwrap().is_some());
}

fn counter_of(bytes: &[u8]) -> u32 {
    Command::decode(bytes).unwrap().counter
}

/// A backup taken while an UPDATE_SEED was pending; after the backup the
/// device got a REVOKE (a higher counter, accepted by the node... here the
/// node sees it); the database is then restored whole from the backup by
/// `integrity repair`: the pending command is rebuilt with a fresh counter,
/// t and r, above what the node accepted, and the node takes it.
#[test]
fn a_whole_restore_rebuilds_pending_commands_above_accepted_counters() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let path = dir.path().join("center.anchor");
    let backups = dir.path().join("backups");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (center, mut fleet) = enrolled_center(&db, &card, 2);
    let t = NOW + 10;
    center
        .queue_update(fleet[0].id, "ops", "roll-out", t)
        .unwrap();
    let pending = center.command(fleet[0].id).unwrap().unwrap();
    center
        .create_backup(&backups, 3, Some(&path), "ops", t + 1)
        .unwrap();
    // After the backup: several commands in one second run the counter
    // ahead of the clock; the node accepts the last.
    center.revoke(fleet[1].id, "ops", "x", t + 2).unwrap();
    center
        .queue_update(fleet[0].id, "ops", "again", t + 2)
        .unwrap();
    let later = center.command(fleet[0].id).unwrap().unwrap();
    assert!(counter_of(&later) >= counter_of(&pending));
    fleet[0].counter_seen = counter_of(&later);
    drop(center);

    // The file put back to the backup's state: the repair restores the
    // backup whole.
    std::fs::copy(&db, dir.path().join("newer.db")).unwrap();
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    center.refresh_anchor(&path, t + 3).unwrap();
    drop(center);
    let card_dyn: Arc<dyn EncryptionCard> = card.clone();
    microcert_center::repair::restore_sqlite_file(
        &db,
        &microcert_center::backup::list(&backups).unwrap()[0],
        &card_dyn,
        Some(&path),
        "ops",
        t + 100,
    )
    .unwrap();
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    let rebuilt = center.command(fleet[0].id).unwrap().unwrap();
    assert_ne!(rebuilt, pending, "rebuilt with a fresh counter, t and r");
    assert!(counter_of(&rebuilt) > counter_of(&later));
    // The node takes it (its handler asserts the counter rises).
    let r = fleet[0].handle_command(&rebuilt, t + 101);
    assert!(matches!(r, Reply::Enroll(_)));
    // Every device's counter is at least the restore time.
    for n in &fleet {
        let v = center.database().device_view(n.id).unwrap().unwrap();
        assert!(v.device.command_counter >= (t + 100) as u32);
    }
    let report = center.integrity_check(Some(&path), t + 102).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// A database as version 1 wrote it (schema 1, seed tags over fewer
/// columns, no tags on notary records and commands, no device shards):
/// the first open tags it once, and it checks clean; the notarised
/// signature of a revoked device stays valid.
#[test]
fn a_version_1_database_is_upgraded_once() {
    version_1_upgrade(false);
}

/// The schema migration committed, the process stopped before the card
/// tagged the rows: the next start does it.
#[test]
fn an_upgrade_cut_short_after_the_migration_is_finished_at_the_next_start() {
    version_1_upgrade(true);
}

fn version_1_upgrade(migrated_but_not_tagged: bool) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (center, mut fleet) = enrolled_center(&db, &card, 3);
    let sig = fleet[0].sign(b"meter", NOW + 2);
    center.verify_signature(&sig, b"meter", NOW + 2).unwrap();
    center.revoke(fleet[0].id, "ops", "x", NOW + 3).unwrap();
    center
        .queue_update(fleet[1].id, "ops", "x", NOW + 3)
        .unwrap();
    let seeds: Vec<_> = {
        let mut v = Vec::new();
        let mut after = None;
        loop {
            let p = center.database().scan_seeds(after, 100).unwrap();
            let Some(l) = p.last() else { break };
            after = Some((l.device, l.generation));
            v.extend(p);
        }
        v
    };
    drop(center);
    // Back to what version 1 wrote.
    {
        let conn = Connection::open(&db).unwrap();
        for s in &seeds {
            let tag = card
                .record_tag(&microcert_center::integrity::record_bytes_v1(s))
                .unwrap();
            conn.execute(
                "UPDATE seeds SET tag = ?3 WHERE device = ?1 AND generation = ?2",
                rusqlite::params![&s.device.0[..], s.generation, &tag[..]],
            )
            .unwrap();
        }
        let mut acc = [[0u8; 32]; 16];
        for s in &seeds {
            let t = card
                .record_tag(&microcert_center::integrity::record_bytes_v1(s))
                .unwrap();
            let a = &mut acc[usize::from(microcert_center::integrity::shard_of(s.device))];
            for (x, y) in a.iter_mut().zip(&t) {
                *x ^= y;
            }
        }
        let rows: Vec<(u8, u64, u64)> = conn
            .prepare("SELECT shard, count, seq FROM digest WHERE shard < 16")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for (shard, count, seq) in rows {
            let d = microcert_center::db::DigestShard {
                shard,
                acc: acc[usize::from(shard)],
                count,
                seq,
                tag: [0; 32],
            };
            let tag = card
                .digest_tag(&microcert_center::integrity::shard_bytes(&d))
                .unwrap();
            conn.execute(
                "UPDATE digest SET acc = ?2, tag = ?3 WHERE shard = ?1",
                rusqlite::params![shard, &d.acc[..], &tag[..]],
            )
            .unwrap();
        }
        if migrated_but_not_tagged {
            conn.execute_batch(
                "DELETE FROM digest WHERE shard >= 16 AND shard < 255;
                 UPDATE notary SET seal = NULL; UPDATE commands SET seal = NULL;
                 UPDATE imports SET seal = NULL;",
            )
            .unwrap();
        } else {
            conn.execute_batch(
                "DELETE FROM digest WHERE shard >= 16 AND shard < 255;
                 ALTER TABLE notary DROP COLUMN seal;
                 ALTER TABLE commands DROP COLUMN seal;
                 ALTER TABLE imports DROP COLUMN seal;
                 DROP TABLE IF EXISTS meta;
                 DROP TABLE IF EXISTS tokens;
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
    }
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    let r = center.integrity_scan().unwrap();
    assert!(r.is_clean(), "{r:?}");
    center.verify_signature(&sig, b"meter", NOW + 5).unwrap();
    assert!(center.command(fleet[1].id).unwrap().is_some());
    let log = center.database().audit_log(0, 10_000).unwrap();
    assert_eq!(
        log.iter().filter(|e| e.entry.action == "upgrade").count(),
        1
    );
    drop(center);
    // Opened again: nothing to upgrade, still clean, no second entry.
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    assert!(center.integrity_scan().unwrap().is_clean());
    let log = center.database().audit_log(0, 10_000).unwrap();
    assert_eq!(
        log.iter().filter(|e| e.entry.action == "upgrade").count(),
        1
    );
}

/// Someone forces the one-time upgrade to run on a database made by this
/// version, to have edited rows tagged (the shards it makes deleted, the
/// notary's seals cleared, a record edited): nothing is tagged, the record
/// is named and refused.
#[test]
fn a_forced_upgrade_tags_nothing_on_a_new_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (center, mut fleet) = enrolled_center(&db, &card, 2);
    let sig = fleet[0].sign(b"meter", NOW + 2);
    center.verify_signature(&sig, b"meter", NOW + 2).unwrap();
    center.revoke(fleet[0].id, "ops", "x", NOW + 3).unwrap();
    drop(center);
    {
        let conn = Connection::open(&db).unwrap();
        conn.execute_batch(
            "DELETE FROM digest WHERE shard >= 16 AND shard < 255;
             UPDATE notary SET seal = NULL, digest = randomblob(32);",
        )
        .unwrap();
    }
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    let r = center.integrity_scan().unwrap();
    assert_eq!(r.bad_notary.len(), 1, "{r:?}");
    // The data never signed is not valid through the edited record.
    let r = center.verify_signature(&sig, b"meter", NOW + 5);
    assert!(r.is_err(), "{r:?}");
}

/// The same on a database that was upgraded once: the second run is
/// named from the audit log.
#[test]
fn a_second_upgrade_is_named_from_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (center, _) = enrolled_center(&db, &card, 2);
    drop(center);
    // Made to look like version 1 and upgraded: one "upgrade" entry.
    let undo = "DELETE FROM digest WHERE shard >= 16 AND shard < 255;
         ALTER TABLE notary DROP COLUMN seal;
         ALTER TABLE commands DROP COLUMN seal;
         ALTER TABLE imports DROP COLUMN seal;
         PRAGMA user_version = 1;";
    Connection::open(&db).unwrap().execute_batch(undo).unwrap();
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    assert!(center.integrity_scan().unwrap().is_clean());
    drop(center);
    // Forced again.
    Connection::open(&db).unwrap().execute_batch(undo).unwrap();
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    let r = center.integrity_scan().unwrap();
    assert!(
        r.audit
            .as_deref()
            .is_some_and(|a| a.contains("ran 2 times")),
        "{r:?}"
    );
}
