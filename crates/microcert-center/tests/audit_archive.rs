//! Retention of the audit log (issue 15 item 5): old entries move into an
//! archive file that stays verifiable, the table's chain goes on from a
//! card-tagged checkpoint, backups and restores keep working, and a kill
//! at each step of an archive leaves the entries in the table or in a
//! complete archive, never in neither.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use microcert_center::audit::AuditFinding;
use microcert_center::audit_archive::{ArchiveJob, ArchiveLink, ArchiveStep, ArchiveTable};
use microcert_center::db::NewAudit;
use microcert_center::{Center, SoftwareCard, backup};

/// An archive by "alice" stopped at `step`.
fn job(before: u64, out: &Path, now: u64, step: ArchiveStep) -> ArchiveJob<'_> {
    ArchiveJob {
        before,
        out,
        actor: "alice",
        now,
        stop: Some(step),
    }
}

fn entry(t: u64, i: u64) -> NewAudit {
    NewAudit {
        time: t,
        actor: "test".into(),
        action: "note".into(),
        device: None,
        generation: None,
        reason: format!("entry {i}"),
    }
}

/// A center whose log has 10 entries at t = 100..110 and 5 at 200..205.
fn center_with_log(backend: Backend, dir: &Path, name: &str) -> (Center, Arc<SoftwareCard>) {
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let c = open_center(&backend.location(dir, name), card.clone());
    let old: Vec<_> = (0..10).map(|i| entry(100 + i, i)).collect();
    c.record_audit(&old).unwrap();
    let new: Vec<_> = (0..5).map(|i| entry(200 + i, 10 + i)).collect();
    c.record_audit(&new).unwrap();
    (c, card)
}

fn seqs(c: &Center) -> Vec<u64> {
    c.audit_log(0, 1000)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect()
}

fn temps(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".tmp-"))
        .collect()
}

fn archive_keeps_the_log_verifiable(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (c, card) = center_with_log(backend, dir.path(), "archive.db");
    let a1 = dir.path().join("a1.jsonl");
    let r = c.archive_audit(150, &a1, "alice", 300).unwrap().unwrap();
    assert_eq!((r.entries, r.first, r.last), (10, 1, 10));
    // The table goes on from the checkpoint (the archive entry appended).
    assert_eq!(seqs(&c), (11..=16).collect::<Vec<_>>());
    assert_eq!(c.verify_audit().unwrap().1, None);
    let check = c.verify_audit_archive(&a1).unwrap();
    assert_eq!((check.entries, check.first, check.last), (10, 1, 10));
    assert_eq!(check.link, ArchiveLink::Checkpoint);
    let text = std::fs::read_to_string(&a1).unwrap();
    assert!(text.contains("\"entry 0\""));
    // The change is audited.
    let last = c.audit_log(0, 1000).unwrap().pop().unwrap();
    assert_eq!(last.entry.action, "audit-archive");
    assert_eq!(last.entry.actor, "alice");
    // Nothing old enough: nothing done, no file.
    let none = dir.path().join("none.jsonl");
    assert!(c.archive_audit(150, &none, "alice", 300).unwrap().is_none());
    assert!(!none.exists());
    assert!(temps(dir.path()).is_empty());

    // More entries, a second archive: the first is now an older one.
    c.record_audit(&[entry(400, 99)]).unwrap();
    let a2 = dir.path().join("a2.jsonl");
    let r = c.archive_audit(350, &a2, "alice", 500).unwrap().unwrap();
    assert_eq!((r.first, r.last), (11, 16));
    assert_eq!(c.verify_audit().unwrap().1, None);
    assert_eq!(
        c.verify_audit_archive(&a1).unwrap().link,
        ArchiveLink::Older
    );
    assert_eq!(
        c.verify_audit_archive(&a2).unwrap().link,
        ArchiveLink::Checkpoint
    );
    // Never the newest entry: the table keeps its head.
    assert_eq!(seqs(&c), vec![17, 18]);

    // A backup of the archived table verifies and restores.
    let backups = dir.path().join("backups");
    let made = backup::create(c.database(), c.card(), &backups, 600).unwrap();
    let b = backup::read(&made.path, &*card).unwrap();
    let restored = open_center(&backend.location(dir.path(), "restored.db"), card.clone());
    backup::restore_into(restored.database(), &*card, &b, "test", 700).unwrap();
    assert_eq!(restored.verify_audit().unwrap().1, None);
    assert_eq!(seqs(&restored), vec![17, 18, 19]);
    assert_eq!(
        restored.verify_audit_archive(&a2).unwrap().link,
        ArchiveLink::Checkpoint
    );

    // An edited archive line fails its MAC.
    std::fs::write(&a1, text.replace("entry 3", "entry 4")).unwrap();
    assert!(c.verify_audit_archive(&a1).is_err());
}

/// Attack: interrupt an archive (a crash, a kill, a full disk) to make
/// entries vanish from the table without a complete archive of them.
/// Defence: the archive is written and fsync'd before one transaction
/// deletes the rows and moves the checkpoint; at every step the entries
/// are in the table or in a complete, verifying archive, and the next
/// archive removes what the interrupted one left.
fn a_kill_at_each_step_loses_no_entry(backend: Backend) {
    for (i, step) in [
        ArchiveStep::PartWritten,
        ArchiveStep::Written,
        ArchiveStep::Renamed,
        ArchiveStep::Deleted,
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = center_with_log(backend, dir.path(), &format!("kill{i}.db"));
        let before = c.audit_log(0, 1000).unwrap();
        let out = dir.path().join("a.jsonl");
        assert!(
            c.archive(ArchiveTable::Audit, job(150, &out, 300, step))
                .is_err(),
            "{step:?}"
        );
        // The rows are still in the table, the chain whole...
        assert_eq!(c.audit_log(0, 1000).unwrap(), before, "{step:?}");
        assert_eq!(c.verify_audit().unwrap().1, None, "{step:?}");
        // ... and an archive that exists is complete.
        if out.exists() {
            let check = c.verify_audit_archive(&out).unwrap();
            assert_eq!(check.entries, 10, "{step:?}");
            assert_eq!(check.link, ArchiveLink::InTable, "{step:?}");
        } else {
            assert!(
                !temps(dir.path()).is_empty(),
                "{step:?}: a kill leaves its temp"
            );
        }
        // The next archive (to the same path when it was not made) ends
        // the work and removes the stale temporary file.
        let out2 = if out.exists() {
            dir.path().join("b.jsonl")
        } else {
            out.clone()
        };
        let r = c.archive_audit(150, &out2, "alice", 300).unwrap().unwrap();
        assert_eq!((r.first, r.last), (1, 10), "{step:?}");
        assert!(temps(dir.path()).is_empty(), "{step:?}: stale temp removed");
        assert_eq!(c.verify_audit().unwrap().1, None);
        assert_eq!(
            c.verify_audit_archive(&out2).unwrap().link,
            ArchiveLink::Checkpoint
        );
    }
}

/// Attack: forge the checkpoint to hide the start of the table (or make
/// the table start anywhere). Defence: the checkpoint carries the card's
/// tag; a forged one is a finding of the audit verification.
fn a_forged_checkpoint_is_found(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let location = backend.location(dir.path(), "forge.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let c = open_center(&location, card.clone());
    c.record_audit(&(0..5).map(|i| entry(100 + i, i)).collect::<Vec<_>>())
        .unwrap();
    c.record_audit(&[entry(300, 9)]).unwrap();
    c.archive_audit(200, &dir.path().join("a.jsonl"), "alice", 300)
        .unwrap()
        .unwrap();
    drop(c);
    let n = raw_update(
        &location,
        "UPDATE digest SET count = count - 1 WHERE shard = 254",
        &[],
    );
    assert_eq!(n, 1);
    let c = open_center(&location, card);
    assert_eq!(c.verify_audit().unwrap().1, Some(AuditFinding::BaseTag));
}

/// A center with 6 devices, each with one notarized signature: devices
/// 0..4 first seen at NOW + 10, 4..6 at NOW + 500.
fn center_with_notary(backend: Backend, dir: &Path, name: &str) -> Center {
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let c = open_center(&backend.location(dir, name), card.clone());
    let mut fleet = make_fleet(&*card, 6);
    let batch = dir.join(format!("{name}.jsonl"));
    write_batch(&batch, &mut fleet, NOW);
    c.import_batch(&batch, "factory", NOW, &mut |_| {}).unwrap();
    let aud = microcert_core::Audience::CENTER;
    for (i, node) in fleet.iter_mut().enumerate() {
        let t = if i < 4 { NOW + 10 } else { NOW + 500 };
        let (a, _) = node.auth(&aud, t);
        c.verify_auth(&a, &aud, t).unwrap();
        let sig = node.sign(b"reading", t);
        c.verify_signature(&sig, b"reading", t).unwrap();
    }
    c
}

fn notary_rows(c: &Center) -> usize {
    c.database().scan_notary(None, 1000).unwrap().len()
}

/// Retention of the notary table: the old records move into an archive
/// (each with its card seal, the file under the card's MAC), the digest
/// shards follow (the integrity check stays clean), and a kill at each
/// step leaves every record in the table or in a complete archive.
fn notary_archive_keeps_records_verifiable(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let c = center_with_notary(backend, dir.path(), "notary.db");
    assert_eq!(notary_rows(&c), 6);
    let out = dir.path().join("notary-old.jsonl");
    let r = c
        .archive_notary(NOW + 100, &out, "alice", NOW + 600)
        .unwrap()
        .unwrap();
    assert_eq!(r.entries, 4);
    assert_eq!(notary_rows(&c), 2);
    assert!(c.integrity_scan().unwrap().is_clean());
    let check = c.verify_notary_archive(&out).unwrap();
    assert_eq!((check.records, check.in_table), (4, 0));
    assert_eq!(
        c.audit_log(0, 1000).unwrap().pop().unwrap().entry.action,
        "notary-archive"
    );
    // An edited record fails the file's MAC.
    let text = std::fs::read_to_string(&out).unwrap();
    let edited = text.replacen("\"generation\":0", "\"generation\":1", 1);
    assert_ne!(edited, text);
    std::fs::write(&out, edited).unwrap();
    assert!(c.verify_notary_archive(&out).is_err());

    for (i, step) in [
        ArchiveStep::PartWritten,
        ArchiveStep::Written,
        ArchiveStep::Renamed,
        ArchiveStep::Deleted,
    ]
    .into_iter()
    .enumerate()
    {
        let d = tempfile::tempdir().unwrap();
        let c = center_with_notary(backend, d.path(), &format!("nk{i}.db"));
        let out = d.path().join("n.jsonl");
        assert!(
            c.archive(ArchiveTable::Notary, job(NOW + 100, &out, NOW + 600, step))
                .is_err()
        );
        // Every record still in the table, the digest whole.
        assert_eq!(notary_rows(&c), 6, "{step:?}");
        assert!(c.integrity_scan().unwrap().is_clean(), "{step:?}");
        if out.exists() {
            let check = c.verify_notary_archive(&out).unwrap();
            assert_eq!((check.records, check.in_table), (4, 4), "{step:?}");
        }
        // Again, to the same path when it was not made (its stale
        // temporary file is removed).
        let out2 = if out.exists() {
            d.path().join("n2.jsonl")
        } else {
            out.clone()
        };
        let r = c
            .archive_notary(NOW + 100, &out2, "alice", NOW + 600)
            .unwrap()
            .unwrap();
        assert_eq!(r.entries, 4, "{step:?}");
        assert_eq!(notary_rows(&c), 2);
        assert!(temps(d.path()).is_empty(), "{step:?}");
        assert!(c.integrity_scan().unwrap().is_clean());
    }
}

both_backends!(
    notary_archive_keeps_records_verifiable,
    archive_keeps_the_log_verifiable,
    a_kill_at_each_step_loses_no_entry,
    a_forged_checkpoint_is_found
);
