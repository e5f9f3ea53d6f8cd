//! Storage-key rotation: a rotation killed with SIGKILL half-way resumes
//! and ends with every seed under the new version and every device still
//! verifying; an old version is destroyed only once no record and no kept
//! backup uses it.
//!
//! The kill test runs its own test binary again as the child (the
//! `MC_ROTATE_CHILD` variable switches `child_rotate` on), as crash.rs does.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use microcert_center::{Center, CenterConfig, EncryptionCard, KdfParams, ReplayMode, SoftwareCard};
use microcert_core::Audience;

const N: u64 = 200;
const BATCH: usize = 10;
const PASS: &[u8] = b"rotation test";
const C: Audience = Audience::CENTER;

fn center(dir: &Path, card: Arc<SoftwareCard>) -> Center {
    let config = CenterConfig {
        replay: ReplayMode::Database,
        ..CenterConfig::default()
    };
    Center::open_sqlite(&dir.join("center.db"), card, config).unwrap()
}

fn versions(c: &Center) -> BTreeMap<u32, usize> {
    let mut m = BTreeMap::new();
    for s in c.database().scan_seeds(None, 1_000_000).unwrap() {
        *m.entry(s.kstore_version).or_insert(0) += 1;
    }
    m
}

/// The child: rotates slowly, printing each committed batch.
#[test]
fn child_rotate() {
    let Ok(dir) = std::env::var("MC_ROTATE_CHILD") else {
        return; // only meaningful as the child of `killed_rotation_resumes`
    };
    let dir = Path::new(&dir);
    let card = Arc::new(SoftwareCard::open(&dir.join("card"), PASS).unwrap());
    let c = center(dir, card);
    c.rotate_storage_key(BATCH, None, "ops", NOW + 10, &mut |n| {
        println!("resealed {n}");
        std::thread::sleep(std::time::Duration::from_millis(150));
    })
    .unwrap();
    println!("finished");
}

#[test]
fn killed_rotation_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let card_file = dir.path().join("card");
    let card =
        Arc::new(SoftwareCard::init(&card_file, PASS, KdfParams::insecure_for_tests()).unwrap());
    let mut fleet = make_fleet(&*card, N);
    {
        let c = center(dir.path(), card.clone());
        let batch = dir.path().join("batch.jsonl");
        write_batch(&batch, &mut fleet, NOW);
        c.import_batch(&batch, "factory", NOW, &mut |_| {}).unwrap();
        for node in fleet.iter_mut() {
            let (a, _) = node.auth(&C, NOW + 1);
            c.verify_auth(&a, &C, NOW + 1).unwrap();
        }
        assert_eq!(versions(&c), BTreeMap::from([(1, N as usize)]));
    }
    drop(card);

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_rotate", "--exact", "--nocapture", "--test-threads=1"])
        .env("MC_ROTATE_CHILD", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut batches = 0;
    while batches < 3 {
        let line = lines.next().expect("child output").unwrap();
        if line.starts_with("resealed") {
            batches += 1;
        }
        assert_ne!(line, "finished", "the child finished before it was killed");
    }
    child.kill().unwrap(); // SIGKILL
    assert!(!child.wait().unwrap().success());

    // Half-way: the keyring holds the new version (current) and the old
    // one, records are under both; the card file keeps only its root key
    // (issue 14: the storage keys live in the key database).
    let card = Arc::new(SoftwareCard::open(&card_file, PASS).unwrap());
    let c = center(dir.path(), card.clone());
    let head = c.sync_keyring().unwrap().unwrap();
    assert_eq!((head.current, head.versions), (2, vec![1, 2]));
    assert_eq!(card.storage_key_versions(), vec![1, 2]);
    let v = versions(&c);
    assert!(
        v.get(&1).copied().unwrap_or(0) > 0 && v.get(&2).copied().unwrap_or(0) >= 3 * BATCH,
        "{v:?}"
    );
    // Each batch is whole: the database is consistent.
    assert!(c.integrity_check(None, NOW + 11).unwrap().is_clean());
    assert_eq!(c.verify_audit().unwrap().1, None);
    // Devices under either version verify meanwhile.
    for node in fleet.iter_mut().step_by(7) {
        let (a, _) = node.auth(&C, NOW + 12);
        c.verify_auth(&a, &C, NOW + 12).unwrap();
    }

    let r = c
        .rotate_storage_key(BATCH, None, "ops", NOW + 20, &mut |_| {})
        .unwrap();
    assert!(r.resumed, "{r:?}");
    assert_eq!(r.version, 2);
    assert_eq!(r.resealed as usize, v[&1]);
    assert_eq!(r.destroyed, vec![1]);
    assert_eq!(versions(&c), BTreeMap::from([(2, N as usize)]));
    assert!(c.integrity_check(None, NOW + 21).unwrap().is_clean());
    assert_eq!(c.verify_audit().unwrap().1, None);
    let log = c.audit_log(0, 100_000).unwrap();
    assert_eq!(
        log.iter()
            .filter(|e| e.entry.action == "rotate-storage-key")
            .count(),
        1
    );
    assert_eq!(
        log.iter()
            .filter(|e| e.entry.action == "destroy-storage-key")
            .count(),
        1
    );
    drop(c);

    // A new process: the keyring holds only version 2, every device verifies.
    let card = Arc::new(SoftwareCard::open(&card_file, PASS).unwrap());
    assert!(
        card.storage_key_versions().is_empty(),
        "the card file keeps no storage key"
    );
    let c = center(dir.path(), card);
    assert_eq!(c.sync_keyring().unwrap().unwrap().versions, vec![2]);
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&C, NOW + 30);
        c.verify_auth(&a, &C, NOW + 30).unwrap();
    }
}

#[test]
fn an_old_version_stays_while_a_kept_backup_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let mut fleet = make_fleet(&*card, 20);
    let c = center(dir.path(), card.clone());
    let batch = dir.path().join("batch.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    c.import_batch(&batch, "factory", NOW, &mut |_| {}).unwrap();
    let backups = dir.path().join("backups");
    c.create_backup(&backups, 1, None, "ops", NOW + 1).unwrap();

    let r = c
        .rotate_storage_key(5, Some(&backups), "ops", NOW + 2, &mut |_| {})
        .unwrap();
    assert!(!r.resumed);
    assert_eq!(r.resealed, 20);
    assert!(r.destroyed.is_empty());
    assert_eq!(r.kept.len(), 1);
    assert_eq!(r.kept[0].0, 1);
    assert!(r.kept[0].1.contains("backup"));
    assert_eq!(card.storage_key_versions(), vec![1, 2]);

    // A new backup (under version 2) rotates the old one out (keep 1):
    // now nothing needs version 1.
    c.create_backup(&backups, 1, None, "ops", NOW + 3).unwrap();
    let (destroyed, kept) = c
        .destroy_unused_storage_keys(Some(&backups), false, "ops", NOW + 4)
        .unwrap();
    assert_eq!(destroyed, vec![1]);
    assert!(kept.is_empty());
    assert_eq!(card.storage_key_versions(), vec![2]);
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&C, NOW + 5);
        c.verify_auth(&a, &C, NOW + 5).unwrap();
    }
    // Enrolled during or after: under the new version.
    assert_eq!(versions(&c), BTreeMap::from([(2, 20)]));
}
