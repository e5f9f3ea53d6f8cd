//! What the center stores survives a new Center on the same files, and no
//! seed is ever stored in the clear.

mod common;

use std::sync::Arc;

use common::*;
use microcert_center::db::DeviceQuery;
use microcert_center::{EncryptionCard, Error, SoftwareCard};
use microcert_core::{Audience, KeyState};

fn reopened_database_holds_everything(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = backend.location(dir.path(), "center.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let mut fleet = make_fleet(&*card, 20);
    let batch = dir.path().join("batch.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    let c = Audience::CENTER;
    let t = NOW + 10;
    let (replayed, pending_cmd, sig, audit_len, digest) = {
        let center = open_center(&db, card.clone());
        assert_eq!(
            center
                .import_batch(&batch, "factory", NOW, &mut |_| {})
                .unwrap()
                .enrolled,
            20
        );
        for node in fleet.iter_mut() {
            let (a, _) = node.auth(&c, t);
            center.verify_auth(&a, &c, t).unwrap();
        }
        let (replayed, _) = fleet[0].auth(&c, t);
        center.verify_auth(&replayed, &c, t).unwrap();
        center
            .revoke(fleet[1].id, "operator:ann", "stolen", t)
            .unwrap();
        center
            .suspend(fleet[2].id, "operator:ann", "audit", t)
            .unwrap();
        center
            .queue_update(fleet[3].id, "operator:ann", "roll-out", t)
            .unwrap();
        let sig = fleet[4].sign(b"data", t);
        center.verify_signature(&sig, b"data", t).unwrap();
        let pending = center.command(fleet[3].id).unwrap().unwrap();
        let audit_len = center.audit_log(0, 10_000).unwrap().len();
        let digest = center.database().digest_shards().unwrap();
        (replayed, pending, sig, audit_len, digest)
    };

    let center = open_center(&db, card.clone());
    let all = center.list_devices(&DeviceQuery::default()).unwrap();
    assert_eq!(all.len(), 20);
    let state = |i: usize| center.device(fleet[i].id).unwrap().unwrap().seeds[0].state;
    assert_eq!(state(0), KeyState::Active);
    assert_eq!(state(1), KeyState::Compromised);
    assert_eq!(state(2), KeyState::Suspended);
    // The replay record survived: the same AUTH is refused.
    assert!(matches!(
        center.verify_auth(&replayed, &c, t + 1),
        Err(Error::Replay)
    ));
    // The pending command is served unchanged.
    assert_eq!(center.command(fleet[3].id).unwrap().unwrap(), pending_cmd);
    // The notary remembers the first sighting.
    assert_eq!(
        center
            .verify_signature(&sig, b"data", t + 99)
            .unwrap()
            .first_seen,
        t
    );
    assert!(matches!(
        center.verify_auth(&fleet[1].auth(&c, t).0, &c, t),
        Err(Error::Revoked)
    ));
    assert!(matches!(
        center.verify_auth(&fleet[2].auth(&c, t).0, &c, t),
        Err(Error::Suspended)
    ));
    let (a, r) = fleet[5].auth(&c, t);
    assert!(fleet[5].check_receipt(&center.verify_auth(&a, &c, t).unwrap().receipt, r));
    assert_eq!(center.audit_log(0, 10_000).unwrap().len(), audit_len);
    assert_eq!(center.verify_audit_chain().unwrap(), None);
    // Every shard as it was, but the marks' (shard 80): each start moves
    // the replay guard's start counter, a mark with its place there.
    let but_marks = |v: Vec<microcert_center::db::DigestShard>| {
        v.into_iter().filter(|s| s.shard != 80).collect::<Vec<_>>()
    };
    assert_eq!(
        but_marks(center.database().digest_shards().unwrap()),
        but_marks(digest.clone())
    );
    assert!(center.integrity_scan().unwrap().is_clean());

    // Filters and paging.
    let q = DeviceQuery {
        state: Some(KeyState::Suspended),
        ..DeviceQuery::default()
    };
    let suspended = center.list_devices(&q).unwrap();
    assert_eq!(suspended.len(), 1);
    assert_eq!(suspended[0].device.id, fleet[2].id);
    let page1 = center
        .list_devices(&DeviceQuery {
            limit: 8,
            ..DeviceQuery::default()
        })
        .unwrap();
    let page2 = center
        .list_devices(&DeviceQuery {
            limit: 8,
            after: Some(page1[7].device.id),
            ..DeviceQuery::default()
        })
        .unwrap();
    assert_eq!((page1.len(), page2.len()), (8, 8));
    assert!(page2[0].device.id > page1[7].device.id);
    let class3 = center
        .list_devices(&DeviceQuery {
            class: Some(3),
            ..DeviceQuery::default()
        })
        .unwrap();
    assert_eq!(class3.len(), 2);
    let expiring = center
        .list_devices(&DeviceQuery {
            last_year_at_most: Some(2030),
            ..DeviceQuery::default()
        })
        .unwrap();
    assert_eq!(expiring.len(), 20);
    let none = center
        .list_devices(&DeviceQuery {
            last_year_at_most: Some(2029),
            ..DeviceQuery::default()
        })
        .unwrap();
    assert!(none.is_empty());
}

fn database_holds_no_seed_in_the_clear(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = backend.location(dir.path(), "center.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let mut fleet = make_fleet(&*card, 50);
    let batch = dir.path().join("batch.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    let center = open_center(&db, card.clone());
    center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    // A seed update too, so a generation-1 seed went through ENROLL.
    let t = NOW + 5;
    let (a, _) = fleet[0].auth(&Audience::CENTER, t);
    center.verify_auth(&a, &Audience::CENTER, t).unwrap();
    center
        .queue_update(fleet[0].id, "operator:ann", "test", t)
        .unwrap();
    let cmd = center.command(fleet[0].id).unwrap().unwrap();
    let Reply::Enroll(e) = fleet[0].handle_command(&cmd, t) else {
        panic!()
    };
    center.enroll(&e, t).unwrap();

    let files = |name: &str| match backend {
        Backend::Sqlite => {
            let mut bytes = std::fs::read(dir.path().join(name)).unwrap_or_default();
            bytes.extend(std::fs::read(dir.path().join(format!("{name}-wal"))).unwrap_or_default());
            bytes
        }
        Backend::Postgres => {
            // This database's table files and the cluster's WAL, after a
            // checkpoint has written the shared buffers out.
            let pg = pg_server().unwrap();
            pg.psql("postgres", "CHECKPOINT");
            let name = db.rsplit('/').next().unwrap();
            let oid = pg.psql(
                "postgres",
                &format!("SELECT oid FROM pg_database WHERE datname = '{name}'"),
            );
            let mut bytes = Vec::new();
            read_tree(&pg.data.join("base").join(oid.trim()), &mut bytes);
            read_tree(&pg.data.join("pg_wal"), &mut bytes);
            bytes
        }
    };
    let stored = files("center.db");
    assert!(
        stored.len() > 50 * 976,
        "the database holds the ciphertexts"
    );
    let mut seeds: Vec<_> = fleet.iter().map(|n| test_seed(n.id, 0, 2026)).collect();
    seeds.push(test_seed(fleet[0].id, 1, 2026));
    // Any 16-byte row of any seed would be a leak.
    let rows: std::collections::HashSet<[u8; 16]> = seeds
        .iter()
        .flat_map(|s| {
            s.expose()
                .chunks(16)
                .map(|r| <[u8; 16]>::try_from(r).unwrap())
        })
        .collect();
    let leaked = |hay: &[u8]| {
        hay.windows(16)
            .any(|w| rows.contains(<&[u8; 16]>::try_from(w).unwrap()))
    };
    assert!(
        !leaked(&stored),
        "a seed row is in the database in the clear"
    );
    // The check is able to fail: the seed bytes are findable where they are.
    let mut planted = stored.clone();
    planted.extend_from_slice(&seeds[3].expose()[160..176]);
    assert!(leaked(&planted));

    // Destroy: the ciphertext is erased from the files too.
    let id = fleet[9].id;
    let ct = center
        .database()
        .scan_seeds(None, 10_000)
        .unwrap()
        .into_iter()
        .find(|s| s.device == id)
        .unwrap()
        .ciphertext
        .unwrap();
    assert!(contains(&files("center.db"), &ct.0[..64]));
    center.revoke(id, "operator:ann", "end of life", t).unwrap();
    center
        .destroy(id, 0, "operator:ann", "end of life", t)
        .unwrap();
    let v = center.device(id).unwrap().unwrap();
    assert_eq!(v.seeds[0].state, KeyState::Destroyed);
    assert_eq!(v.seeds[0].base_year, 2026, "attributes kept");
    match backend {
        Backend::Sqlite => assert!(
            !contains(&files("center.db"), &ct.0[..64]),
            "destroyed ciphertext still in the files"
        ),
        // PostgreSQL keeps the old row version until VACUUM reuses its
        // space, and WAL segments until they are recycled (documented in
        // docs/deployment.md): only the live row is checked here.
        Backend::Postgres => assert!(
            center
                .database()
                .scan_seeds(None, 10_000)
                .unwrap()
                .iter()
                .all(|s| s.device != id || s.ciphertext.is_none())
        ),
    }
    assert!(center.integrity_scan().unwrap().is_clean());
    let _ = card.storage_key_version();
}

/// Appends every file under `dir` to `out`.
fn read_tree(dir: &std::path::Path, out: &mut Vec<u8>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            read_tree(&p, out);
        } else if let Ok(b) = std::fs::read(&p) {
            // WAL segments are preallocated with zeros: leave the tail out.
            let end = b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
            out.extend_from_slice(&b[..end]);
        }
    }
}

both_backends!(
    reopened_database_holds_everything,
    database_holds_no_seed_in_the_clear,
);
