//! The import's two stages (issue 14, import at speed): the card work of a
//! chunk is done ahead, outside its transaction, for devices expected to
//! be new; the transaction then decides each line against the database as
//! it is. These tests feed it batches where that expectation is wrong.

mod common;

use std::sync::Arc;

use common::*;
use microcert_center::{Center, CenterConfig, Error, SoftwareCard};
use microcert_core::Audience;
use sha2::{Digest, Sha256};

const C: Audience = Audience::CENTER;

fn center_with_chunk(loc: &str, card: Arc<SoftwareCard>, chunk: usize) -> Center {
    Center::open_url(
        loc,
        card,
        CenterConfig {
            import_chunk: chunk,
            ..CenterConfig::default()
        },
    )
    .unwrap()
}

fn enroll_bytes(line: &str) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    hex::decode(v["enroll"].as_str().unwrap()).unwrap()
}

/// Attack: one chunk carries a device twice, with two different ENROLLs
/// made under its transport key (a second chip personalised with the same
/// Ktr, or a replayed factory file with a forged line). Both were
/// prepared ahead as "new device"; only the first may be stored, the
/// second is refused as a second ENROLL under a closed transport
/// enrollment would be, and an exact copy of a line counts as already
/// enrolled.
fn a_device_twice_in_one_chunk_is_enrolled_once(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let loc = backend.location(dir.path(), "c.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = center_with_chunk(&loc, card.clone(), 1000);
    let mut fleet = make_fleet(&*card, 6);
    let lines: Vec<String> = fleet.iter_mut().map(|n| batch_line(n, NOW)).collect();
    // Device 2 again with another ENROLL (same seed, fresh r), device 3
    // again byte for byte.
    let second = batch_line(&mut fleet[2], NOW);
    assert_ne!(second, lines[2]);
    let mut text = lines.concat();
    text.push_str(&second);
    text.push_str(&lines[3]);
    let path = dir.path().join("b.jsonl");
    std::fs::write(&path, &text).unwrap();
    let report = center
        .import_batch(&path, "factory", NOW, &mut |_| {})
        .unwrap();
    assert_eq!((report.enrolled, report.already), (6, 1), "{report:?}");
    assert_eq!(report.rejected.len(), 1, "{report:?}");
    assert_eq!(report.rejected[0].line, 7);
    let v = center.device(fleet[2].id).unwrap().unwrap();
    assert_eq!(v.seeds.len(), 1, "one seed for the device");
    let first: [u8; 32] = Sha256::digest(enroll_bytes(&lines[2])).into();
    assert_eq!(v.seeds[0].enroll_digest, first, "the first ENROLL is kept");
    assert!(center.integrity_scan().unwrap().is_clean());
    let (_, finding) = center.verify_audit().unwrap();
    assert_eq!(finding, None);
    // Every device authenticates.
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&C, NOW);
        center.verify_auth(&a, &C, NOW).unwrap();
    }
}

/// Devices registered before the import (by provisioning, one of them
/// with another class) were prepared as if new: the transaction finds
/// them and takes the full path, which enrolls the one registered alike
/// and refuses the other; the audit log keeps line order and its chain.
fn registered_devices_take_the_full_path(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let loc = backend.location(dir.path(), "c.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    // Small chunks: the lines cross chunk boundaries, so preparation of
    // one chunk overlaps the transaction of the one before.
    let center = center_with_chunk(&loc, card.clone(), 3);
    let mut fleet = make_fleet(&*card, 10);
    center
        .register_device(fleet[4].id, 1, None, 0, "factory", NOW)
        .unwrap();
    center
        .register_device(fleet[7].id, 2, None, 0, "factory", NOW)
        .unwrap();
    let path = dir.path().join("b.jsonl");
    write_batch(&path, &mut fleet, NOW);
    let before = center.audit_log(0, 1000).unwrap().len();
    let mut chunks = 0;
    let report = center
        .import_batch(&path, "factory", NOW, &mut |_| chunks += 1)
        .unwrap();
    assert_eq!(chunks, 4);
    assert_eq!(report.enrolled, 9, "{report:?}");
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.rejected[0].line, 8);
    assert_eq!(
        report.rejected[0].kind,
        Error::RegisteredDifferently {
            device: fleet[7].id,
            class: 2,
            epoch: 0
        }
        .kind()
    );
    let log = center.audit_log(0, 1000).unwrap();
    let enrolled: Vec<_> = log[before..]
        .iter()
        .filter(|r| r.entry.action == "enroll")
        .map(|r| r.entry.device.unwrap())
        .collect();
    let expect: Vec<_> = fleet
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 7)
        .map(|(_, n)| n.id)
        .collect();
    assert_eq!(enrolled, expect, "one audit entry per seed, in line order");
    let (_, finding) = center.verify_audit().unwrap();
    assert_eq!(finding, None);
    assert!(center.integrity_scan().unwrap().is_clean());
    // Running the file again changes nothing.
    let again = center
        .import_batch(&path, "factory", NOW, &mut |_| {})
        .unwrap();
    assert_eq!(again.enrolled, 0);
    assert!(center.integrity_scan().unwrap().is_clean());
}

both_backends!(
    a_device_twice_in_one_chunk_is_enrolled_once,
    registered_devices_take_the_full_path,
);
