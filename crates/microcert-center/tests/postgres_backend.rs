//! What only several writers on one PostgreSQL database can show: two
//! centers (each with its own connection pool, as two processes would
//! have) accept each message once between them, keep the digest and the
//! audit chain consistent while both change life-cycle states, and a read
//! snapshot sees no concurrent commit. Skips with a message when
//! PostgreSQL is missing outside CI.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use microcert_center::db::{NotaryRow, with_snapshot, with_tx};
use microcert_center::{Center, Error, SoftwareCard};
use microcert_core::{Audience, KeyState};

const C: Audience = Audience::CENTER;

fn two_centers(n: u64) -> Option<(Center, Center, Arc<SoftwareCard>, Vec<TestNode>)> {
    postgres()?;
    let dir = tempfile::tempdir().unwrap();
    let url = Backend::Postgres.location(dir.path(), "shared");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let a = open_center(&url, card.clone());
    let b = open_center(&url, card.clone());
    let mut fleet = make_fleet(&*card, n);
    let batch = dir.path().join("b.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    a.import_batch(&batch, "factory", NOW, &mut |_| {}).unwrap();
    Some((a, b, card, fleet))
}

#[test]
fn two_centers_accept_once_and_keep_the_digest() {
    let Some((a, b, _card, mut fleet)) = two_centers(60) else {
        return;
    };
    // First use (activation) through either center, racing.
    let t = NOW + 5;
    let firsts: Vec<Vec<u8>> = fleet.iter_mut().map(|n| n.auth(&C, t).0).collect();
    let accepted = AtomicUsize::new(0);
    let send_all = |center: &Center, msgs: &[Vec<u8>], acc: &AtomicUsize| {
        for m in msgs {
            match center.verify_auth(m, &C, t) {
                Ok(_) => {
                    acc.fetch_add(1, Ordering::SeqCst);
                }
                Err(Error::Replay) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
    };
    std::thread::scope(|s| {
        for center in [&a, &b, &a, &b] {
            let (firsts, accepted) = (&firsts, &accepted);
            s.spawn(move || send_all(center, firsts, accepted));
        }
    });
    assert_eq!(accepted.load(Ordering::SeqCst), firsts.len());

    // Steady use on both while both change states of other devices.
    let msgs: Vec<Vec<u8>> = fleet[..30]
        .iter_mut()
        .flat_map(|n| (0..5).map(|_| n.auth(&C, t).0).collect::<Vec<_>>())
        .collect();
    let accepted = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for center in [&a, &b] {
            let (msgs, accepted) = (&msgs, &accepted);
            s.spawn(move || send_all(center, msgs, accepted));
        }
        let (a, b, fleet) = (&a, &b, &fleet);
        s.spawn(move || {
            for (i, node) in fleet[30..50].iter().enumerate() {
                let (x, y) = if i % 2 == 0 { (a, b) } else { (b, a) };
                x.suspend(node.id, "operator:ann", "test", t).unwrap();
                y.resume(node.id, "operator:bob", "test", t).unwrap();
            }
        });
        s.spawn(move || {
            for (i, node) in fleet[50..60].iter().enumerate() {
                let x = if i % 2 == 0 { a } else { b };
                x.revoke(node.id, "operator:ann", "test", t).unwrap();
            }
        });
    });
    assert_eq!(accepted.load(Ordering::SeqCst), msgs.len());
    for node in &fleet[50..60] {
        let v = b.device(node.id).unwrap().unwrap();
        assert_eq!(v.seeds[0].state, KeyState::Compromised);
    }
    for center in [&a, &b] {
        let report = center.integrity_scan().unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.records, 60);
        assert_eq!(center.verify_audit_chain().unwrap(), None);
    }
}

#[test]
fn snapshot_sees_no_concurrent_commit() {
    let Some((a, b, _card, fleet)) = two_centers(4) else {
        return;
    };
    let before = a.database().digest_shards().unwrap();
    let (inside, again) = with_snapshot(a.database(), |view| {
        let first = view.digest_shards()?;
        // Another center commits a change while the snapshot is open.
        b.revoke(fleet[0].id, "operator:ann", "test", NOW + 1)
            .unwrap();
        Ok((first, view.digest_shards()?))
    })
    .unwrap();
    assert_eq!(inside, before);
    assert_eq!(again, before, "the snapshot saw a concurrent commit");
    assert_ne!(a.database().digest_shards().unwrap(), before);
}

#[test]
fn notary_pages_and_seed_delete() {
    let Some((a, _b, _card, mut fleet)) = two_centers(5) else {
        return;
    };
    let t = NOW + 5;
    for node in fleet.iter_mut() {
        let (m, _) = node.auth(&C, t);
        a.verify_auth(&m, &C, t).unwrap();
        for k in 0..3u8 {
            let sig = node.sign(&[k; 10], t);
            a.verify_signature(&sig, &[k; 10], t).unwrap();
        }
    }
    let mut all: Vec<NotaryRow> = Vec::new();
    loop {
        let page = a.database().scan_notary(all.last(), 4).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 4);
        all.extend(page);
    }
    assert_eq!(all.len(), 15);
    // Key order as stored: r is kept as the i64 of the same bits (as in
    // SQLite), so it orders as a signed number.
    let keys: Vec<_> = all
        .iter()
        .map(|n| (n.device, n.generation, n.t, n.r as i64, n.digest))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys, sorted, "pages in key order, no repeats");

    // delete_seed (integrity repair): true once, then false.
    let id = fleet[4].id;
    let delete = || with_tx(a.database(), |tx| tx.delete_seed(id, 0)).unwrap();
    assert!(delete());
    assert!(!delete());
    assert!(!with_tx(a.database(), |tx| tx.delete_seed(id, 9)).unwrap());
    let left = a.database().scan_seeds(None, 100).unwrap();
    assert_eq!(left.len(), 4);
    assert!(left.iter().all(|s| s.device != id));
}

/// A change committed through one center drops the device from the other
/// center's seed cache at once (LISTEN/NOTIFY), well before the cache TTL.
#[test]
fn change_through_one_center_is_refused_by_the_other_at_once() {
    let Some((a, b, _card, mut fleet)) = two_centers(2) else {
        return;
    };
    let t = NOW + 5;
    let node = &mut fleet[0];
    let (m, _) = node.auth(&C, t);
    a.verify_auth(&m, &C, t).unwrap();
    let (m, _) = node.auth(&C, t);
    a.verify_auth(&m, &C, t).unwrap();
    assert!(a.cached_devices() >= 1, "A has the device cached");
    b.revoke(node.id, "operator:ann", "stolen", t).unwrap();
    let start = std::time::Instant::now();
    loop {
        let (m, _) = node.auth(&C, t);
        match a.verify_auth(&m, &C, t) {
            Err(Error::Revoked) => break,
            Ok(_) => assert!(
                start.elapsed() < std::time::Duration::from_secs(1),
                "A still accepts a device revoked through B after {:?}",
                start.elapsed()
            ),
            Err(e) => panic!("{e:?}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
