//! Backups: made, verified (MAC over the whole file), refused when altered
//! or cut short or made by another card, restored into an empty database
//! with everything working, rotated by count, made automatically only when
//! something changed and the interval has passed.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use microcert_center::backup;
use microcert_center::{AutoBackup, Center, CenterConfig, Error, ReplayMode, SoftwareCard};
use microcert_core::{Audience, Command, KeyState, Opcode};

const C: Audience = Audience::CENTER;

fn config() -> CenterConfig {
    CenterConfig {
        replay: ReplayMode::Database,
        ..CenterConfig::default()
    }
}

fn fleet_center(dir: &Path, card: Arc<SoftwareCard>, n: u64) -> (Center, Vec<TestNode>) {
    let c = Center::open_sqlite(&dir.join("center.db"), card.clone(), config()).unwrap();
    let mut fleet = make_fleet(&*card, n);
    let batch = dir.join("batch.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    c.import_batch(&batch, "factory", NOW, &mut |_| {}).unwrap();
    (c, fleet)
}

#[test]
fn backup_restores_into_an_empty_database() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (c, mut fleet) = fleet_center(dir.path(), card.clone(), 30);
    for node in fleet.iter_mut().take(20) {
        let (a, _) = node.auth(&C, NOW + 1);
        c.verify_auth(&a, &C, NOW + 1).unwrap();
    }
    c.revoke(fleet[3].id, "ops", "lost", NOW + 2).unwrap();
    c.deactivate(fleet[4].id, "ops", "retired", NOW + 2)
        .unwrap();
    c.destroy(fleet[4].id, 0, "ops", "retired", NOW + 2)
        .unwrap();
    c.queue_update(fleet[5].id, "ops", "roll-out", NOW + 2)
        .unwrap();
    let sig = fleet[6].sign(b"meter reading", NOW + 2);
    c.verify_signature(&sig, b"meter reading", NOW + 2).unwrap();

    let backups = dir.path().join("backups");
    let s = c.create_backup(&backups, 5, None, "ops", NOW + 3).unwrap();
    assert_eq!((s.seeds, s.devices), (30, 30));
    assert_eq!(s.kstore_versions, vec![1]);
    let b = backup::read(&s.path, &*card).unwrap();
    assert_eq!(b.seeds.len(), 30);
    assert_eq!(b.notary.len(), 1);
    assert_eq!(b.commands.len(), 2, "a REVOKE and an UPDATE_SEED");
    // The destroyed seed's ciphertext is not in the backup.
    assert!(
        b.seeds
            .iter()
            .find(|x| x.device == fleet[4].id)
            .unwrap()
            .ciphertext
            .is_none()
    );
    let pending = c.command(fleet[5].id).unwrap().unwrap();
    drop(c);

    let dir2 = tempfile::tempdir().unwrap();
    let db2 = microcert_center::SqliteDatabase::open(&dir2.path().join("center.db")).unwrap();
    backup::restore_into(&db2, &*card, &b, "ops", NOW + 4).unwrap();
    // A second restore into the same, now full, database is refused.
    assert!(matches!(
        backup::restore_into(&db2, &*card, &b, "ops", NOW + 4),
        Err(Error::RestoreTargetNotEmpty)
    ));
    drop(db2);
    let c2 = Center::open_sqlite(&dir2.path().join("center.db"), card.clone(), config()).unwrap();
    assert!(c2.integrity_check(None, NOW + 5).unwrap().is_clean());
    assert_eq!(c2.verify_audit().unwrap().1, None);
    let last = c2.audit_log(0, 10_000).unwrap().pop().unwrap();
    assert_eq!(last.entry.action, "restore");
    for (i, node) in fleet.iter_mut().enumerate() {
        let (a, _) = node.auth(&C, NOW + 6);
        let r = c2.verify_auth(&a, &C, NOW + 6);
        match i {
            3 => assert!(matches!(r, Err(Error::Revoked))),
            4 => assert!(matches!(r, Err(Error::NotActive))),
            _ => {
                r.unwrap();
            }
        }
    }
    let state = c2.device(fleet[4].id).unwrap().unwrap().seeds[0].state;
    assert_eq!(state, KeyState::Destroyed);
    assert_eq!(c2.command(fleet[5].id).unwrap().unwrap(), pending);
    // PROTOCOL.md section 6: after a restore the pending commands (the
    // REVOKE of fleet[3], the UPDATE_SEED of fleet[5]) are built again with
    // a fresh counter, t and r.
    assert_eq!(c2.rebuild_pending_commands("ops", NOW + 8).unwrap(), 2);
    let rebuilt = c2.command(fleet[5].id).unwrap().unwrap();
    let (old, new) = (
        Command::decode(&pending).unwrap(),
        Command::decode(&rebuilt).unwrap(),
    );
    assert!(
        new.counter > old.counter,
        "{} <= {}",
        new.counter,
        old.counter
    );
    assert_ne!(new.header.r, old.header.r);
    assert_eq!(new.header.t, u32::try_from(NOW + 8).unwrap());
    assert_eq!(new.opcode, Opcode::UPDATE_SEED);
    assert!(matches!(
        fleet[5].handle_command(&rebuilt, NOW + 8),
        Reply::Enroll(_)
    ));
    assert_eq!(c2.verify_audit().unwrap().1, None);
    let v = c2
        .verify_signature(&sig, b"meter reading", NOW + 7)
        .unwrap();
    assert_eq!(format!("{v:?}"), format!("{:?}", v));
}

#[test]
fn an_altered_or_foreign_backup_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (c, _) = fleet_center(dir.path(), card.clone(), 5);
    let s = c
        .create_backup(&dir.path().join("b"), 5, None, "ops", NOW + 1)
        .unwrap();
    let good = std::fs::read(&s.path).unwrap();
    let check = |bytes: &[u8], card: &SoftwareCard| {
        let p = dir.path().join("probe.mcbak");
        std::fs::write(&p, bytes).unwrap();
        backup::read(&p, card).map(|_| ()).unwrap_err().to_string()
    };
    // One changed character in a seed line (its state).
    let text = String::from_utf8(good.clone()).unwrap();
    let edited = text.replacen("\"state\":\"pre-activation\"", "\"state\":\"active\"", 1);
    assert_ne!(edited, text);
    assert!(check(edited.as_bytes(), &card).contains("MAC does not match"));
    // Cut short: the last lines gone.
    let cut: Vec<&str> = text.lines().collect();
    let cut = cut[..cut.len() - 3].join("\n") + "\n";
    let e = check(cut.as_bytes(), &card);
    assert!(e.contains("no MAC line"), "{e}");
    // Cut short with the MAC line kept.
    let mut lines: Vec<&str> = text.lines().collect();
    lines.remove(lines.len() - 3);
    let e = check((lines.join("\n") + "\n").as_bytes(), &card);
    assert!(e.contains("MAC does not match"), "{e}");
    // Another center's card.
    let other = SoftwareCard::ephemeral().unwrap();
    assert!(check(&good, &other).contains("another encryption card"));
    // Not a backup at all.
    assert!(check(b"hello\n", &card).contains("not a backup"));
}

#[test]
fn backups_rotate_by_count() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (c, _) = fleet_center(dir.path(), card.clone(), 3);
    let b = dir.path().join("b");
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(c.create_backup(&b, 3, None, "ops", NOW + i).unwrap().path);
    }
    let left = backup::list(&b).unwrap();
    assert_eq!(
        left,
        vec![made[4].clone(), made[3].clone(), made[2].clone()]
    );
    assert!(!made[0].exists() && !made[1].exists());
    for p in &left {
        backup::read(p, &*card).unwrap();
    }
}

#[test]
fn automatic_backups_are_debounced() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (c, fleet) = fleet_center(dir.path(), card.clone(), 4);
    let b = dir.path().join("b");
    let auto = AutoBackup::new(b.clone(), 600, 10, None);
    // First tick: none exists yet, one is made.
    assert!(auto.tick(&c, NOW).unwrap().is_some());
    // Nothing changed: none.
    assert!(auto.tick(&c, NOW + 1000).unwrap().is_none());
    // A change, but within the interval: none.
    c.activate(fleet[0].id, "ops", "go", NOW + 100).unwrap();
    assert!(auto.tick(&c, NOW + 200).unwrap().is_none());
    // The interval passed: one.
    assert!(auto.tick(&c, NOW + 700).unwrap().is_some());
    assert!(auto.tick(&c, NOW + 2000).unwrap().is_none());
    assert_eq!(backup::list(&b).unwrap().len(), 2);
}
