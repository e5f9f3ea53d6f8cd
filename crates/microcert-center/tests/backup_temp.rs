//! Backups clean their temporary files (issue 15 item 5): a backup that
//! fails half-way leaves none, one killed half-way leaves one that the
//! next backup of the directory removes; a streamed backup reads back
//! the same.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use microcert_center::SoftwareCard;
use microcert_center::backup::{self, BackupFault};

fn temps(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with('.') && n.ends_with(".tmp")
        })
        .collect()
}

#[test]
fn failed_and_killed_backups_leave_no_temp_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = new_center(&dir.path().join("c.db"), card.clone());
    let mut fleet = make_fleet(&*card, 40);
    let batch = dir.path().join("b.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    let backups = dir.path().join("backups");

    // A write error half-way (a full disk): refused, nothing left.
    let r = backup::create_with_fault(
        center.database(),
        &*card,
        &backups,
        NOW,
        Some(BackupFault::WriteError),
    );
    assert!(r.is_err());
    assert!(temps(&backups).is_empty(), "{:?}", temps(&backups));
    assert!(backup::list(&backups).unwrap().is_empty());

    // Killed half-way: its temporary file stays (no clean-up runs)...
    let r = backup::create_with_fault(
        center.database(),
        &*card,
        &backups,
        NOW,
        Some(BackupFault::Kill),
    );
    assert!(r.is_err());
    assert_eq!(temps(&backups).len(), 1);
    assert!(backup::list(&backups).unwrap().is_empty());
    // ... until the next backup, which removes it.
    let made = backup::create(center.database(), &*card, &backups, NOW + 1).unwrap();
    assert!(temps(&backups).is_empty(), "{:?}", temps(&backups));
    assert_eq!(backup::list(&backups).unwrap(), vec![made.path.clone()]);

    // Streamed out, streamed in: the same backup as the in-memory one.
    let b = backup::read(&made.path, &*card).unwrap();
    assert_eq!(b.devices.len(), 40);
    let again = backup::encode(&b, &*card).unwrap();
    assert_eq!(again, std::fs::read(&made.path).unwrap());
    // A byte changed: refused.
    let mut bytes = std::fs::read(&made.path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    let bad = dir.path().join("bad.mcbak");
    std::fs::write(&bad, &bytes).unwrap();
    assert!(backup::read(&bad, &*card).is_err());
    // Cut short: refused.
    std::fs::write(&bad, &std::fs::read(&made.path).unwrap()[..at]).unwrap();
    assert!(backup::read(&bad, &*card).is_err());
}
