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
use microcert_center::db::{KeyDatabase, NotaryRow, with_snapshot, with_tx};
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

/// A database of a private cluster with `n` devices imported and
/// activated, and a center on it.
fn private_center(server: &PgServer, n: u64) -> (Center, Vec<TestNode>, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = server.fresh_database("private");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = open_center(&url, card.clone());
    let mut fleet = make_fleet(&*card, n);
    let batch = dir.path().join("b.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&C, NOW);
        center.verify_auth(&a, &C, NOW).unwrap();
    }
    let db = url.rsplit('/').next().unwrap().to_string();
    (center, fleet, db, dir)
}

/// The server stops (`pg_ctl stop -m fast`) under load and starts again:
/// requests during the outage fail fast with a database error (none
/// hangs), requests succeed again afterwards on the same center (no
/// restart), and every AUTH acknowledged before, during or after the
/// outage is still recorded (its replay is refused).
#[test]
fn server_restart_under_load_fails_fast_and_recovers() {
    let Some(server) = private_pg_server(None) else {
        return;
    };
    let (center, mut fleet, _db, _dir) = private_center(&server, 40);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let after_restart = std::sync::atomic::AtomicBool::new(false);
    let ok_after = AtomicUsize::new(0);
    // Four workers, each with its own devices, each sending fresh AUTHs.
    let parts: Vec<&mut [TestNode]> = fleet.chunks_mut(10).collect();
    let results = std::thread::scope(|s| {
        let workers: Vec<_> = parts
            .into_iter()
            .enumerate()
            .map(|(w, part)| {
                let (center, stop, after_restart, ok_after) =
                    (&center, &stop, &after_restart, &ok_after);
                s.spawn(move || {
                    let mut acked = Vec::new();
                    let mut failed = 0usize;
                    let mut slowest = std::time::Duration::ZERO;
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) && i < 100_000 {
                        let len = part.len();
                        let t = NOW + 10 + i / len as u64;
                        let node = &mut part[(i as usize) % len];
                        let (a, _) = node.auth(&C, t);
                        let began = std::time::Instant::now();
                        let r = center.verify_auth(&a, &C, t);
                        slowest = slowest.max(began.elapsed());
                        match r {
                            Ok(_) => {
                                if after_restart.load(Ordering::SeqCst) {
                                    ok_after.fetch_add(1, Ordering::SeqCst);
                                }
                                acked.push((a, t));
                            }
                            Err(Error::Database(msg)) => {
                                failed += 1;
                                assert!(msg.message.contains("PostgreSQL"), "worker {w}: {msg}");
                                // A database going away is transient: 503 / 5.03.
                                assert!(msg.kind.is_transient(), "worker {w}: {msg:?}");
                                std::thread::sleep(std::time::Duration::from_millis(20));
                            }
                            Err(e) => panic!("worker {w}: not a database error: {e:?}"),
                        }
                        i += 1;
                    }
                    (acked, failed, slowest)
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(500));
        server.stop();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        server.start_again();
        after_restart.store(true, Ordering::SeqCst);
        let began = std::time::Instant::now();
        while ok_after.load(Ordering::SeqCst) < 40
            && began.elapsed() < std::time::Duration::from_secs(30)
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        stop.store(true, Ordering::SeqCst);
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    });
    let failed: usize = results.iter().map(|r| r.1).sum();
    let slowest = results.iter().map(|r| r.2).max().unwrap();
    assert!(failed > 0, "the outage was not seen");
    assert!(
        ok_after.load(Ordering::SeqCst) >= 40,
        "the center did not recover after the server came back"
    );
    assert!(
        slowest < std::time::Duration::from_secs(4),
        "a request waited {slowest:?} during the outage (should fail fast)"
    );
    // Nothing acknowledged is lost: each acknowledged AUTH is a replay now.
    let mut n = 0;
    for (acked, _, _) in &results {
        for (a, t) in acked {
            assert!(
                matches!(center.verify_auth(a, &C, *t), Err(Error::Replay)),
                "an acknowledged AUTH was not recorded"
            );
            n += 1;
        }
    }
    assert!(n > 40);
}

/// A primary that turns read-only (failed over, demoted): new connections
/// are refused with a clear error naming a read-only server; once it is
/// writable again the same center works.
#[test]
fn read_only_server_is_reported_and_recovered_from() {
    let Some(server) = private_pg_server(None) else {
        return;
    };
    let (center, mut fleet, db, _dir) = private_center(&server, 4);
    // Every session turns read-only at once, the pooled ones included
    // (their next write meets SQLSTATE 25006); new sessions are read-only
    // from the start (refused at connect time).
    let _ = &db;
    server.psql(
        "postgres",
        "ALTER SYSTEM SET default_transaction_read_only = on",
    );
    server.psql("postgres", "SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (a, _) = fleet[0].auth(&C, NOW + 3);
    let mut seen = None;
    for _ in 0..3 {
        match center.verify_auth(&a, &C, NOW + 3) {
            Err(Error::Database(m)) if m.message.contains("read-only") => {
                seen = Some(m);
                break;
            }
            Err(Error::Database(m)) => {
                eprintln!("before the read-only error: {m}");
                continue;
            }
            other => panic!("{other:?}"),
        }
    }
    let m = seen.expect("a read-only error");
    assert!(m.message.contains("primary"), "{m}");
    assert_eq!(m.kind, microcert_center::DbFailure::ReadOnly);
    server.psql(
        "postgres",
        "ALTER SYSTEM RESET default_transaction_read_only",
    );
    server.psql("postgres", "SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(300));
    center.verify_auth(&a, &C, NOW + 3).unwrap();
    assert!(matches!(
        center.verify_auth(&a, &C, NOW + 3),
        Err(Error::Replay)
    ));
}

fn self_signed(names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).unwrap();
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

/// sslmode against a server with and without TLS: require fails clearly
/// without TLS; verify-full accepts the server's certificate for its
/// name and refuses it under another name or another CA; verify-ca
/// accepts it under another name; the session is encrypted.
#[test]
fn tls_sslmodes() {
    let Some(plain) = pg_server() else {
        return;
    };
    let url = plain.fresh_database("plain");
    let err =
        microcert_center::PostgresDatabase::open(&format!("{url}?sslmode=require")).unwrap_err();
    assert!(
        matches!(&err, Error::Database(m) if m.message.contains("TLS")
            && m.kind == microcert_center::DbFailure::Config),
        "{err:?}"
    );
    // disable and the default (prefer) still connect to it.
    microcert_center::PostgresDatabase::open(&format!("{url}?sslmode=disable")).unwrap();
    microcert_center::PostgresDatabase::open(&url).unwrap();

    let (cert, key) = self_signed(&["localhost"]);
    let Some(server) = private_pg_server(Some((cert.clone(), key))) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert).unwrap();
    let (other_cert, _) = self_signed(&["localhost"]);
    let other = dir.path().join("other.pem");
    std::fs::write(&other, &other_cert).unwrap();
    let url = server.fresh_database("tls");
    let dbname = url.rsplit('/').next().unwrap().to_string();
    let kv = |host: &str, mode: &str, root: &std::path::Path| {
        format!(
            "host={host} hostaddr=127.0.0.1 port={} user=postgres dbname={dbname} \
             sslmode={mode} sslrootcert='{}'",
            server.port,
            root.display()
        )
    };
    let db =
        microcert_center::PostgresDatabase::open(&kv("localhost", "verify-full", &ca)).unwrap();
    db.set_meta("tls-test", "1").unwrap();
    let encrypted = server.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'microcert-center' AND s.ssl",
    );
    assert_ne!(encrypted.trim(), "0", "no encrypted session");
    let wrong_name = microcert_center::PostgresDatabase::open(&kv("127.0.0.1", "verify-full", &ca));
    assert!(
        wrong_name.is_err(),
        "verify-full accepted a certificate for another name"
    );
    microcert_center::PostgresDatabase::open(&kv("127.0.0.1", "verify-ca", &ca)).unwrap();
    let wrong_ca =
        microcert_center::PostgresDatabase::open(&kv("localhost", "verify-full", &other));
    assert!(wrong_ca.is_err(), "verify-full accepted an unknown CA");
    // require without a root certificate: encrypted, unchecked (libpq).
    microcert_center::PostgresDatabase::open(&format!(
        "host=127.0.0.1 port={} user=postgres dbname={dbname} sslmode=require",
        server.port
    ))
    .unwrap();
}

/// The group commit's batch insert: each replay key counts once, also
/// when it occurs twice in one batch, and a second batch finds them all.
#[test]
fn batched_replay_records_count_each_key_once() {
    let Some(server) = pg_server() else {
        return;
    };
    let db = microcert_center::PostgresDatabase::open(&server.fresh_database("replays")).unwrap();
    let d = microcert_core::DeviceId([7; 8]);
    let e = microcert_core::DeviceId([8; 8]);
    let far = NOW + 1000;
    let batch = [
        (d, 1, 10, 1, far),
        (e, 1, 10, 1, far),
        (d, 1, 10, 1, far),
        (d, 1, 10, 2, far),
    ];
    let first = with_tx(&db, |tx| tx.record_replays(&batch)).unwrap();
    assert_eq!(first, [true, true, false, true]);
    let again = with_tx(&db, |tx| tx.record_replays(&batch)).unwrap();
    assert_eq!(again, [false; 4]);
    assert!(!with_tx(&db, |tx| tx.record_replay((e, 1, 10, 1, far))).unwrap());
}

/// Cold loads of concurrent verifications are grouped into shared
/// statements (issue 14, cold verify at speed). Attack on the grouping:
/// answers handed to the wrong caller. Eight threads verify the AUTHs of
/// 48 devices with the seed cache off, mixed with AUTHs of unregistered
/// devices and of revoked ones: each must get its own device's answer
/// (a seed mixed up between devices fails the MAC; an unregistered or
/// revoked device answered with another's record would be accepted).
#[test]
fn grouped_cold_loads_answer_each_caller_with_its_own_device() {
    let Some(_) = postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = Backend::Postgres.location(dir.path(), "grouped");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let cold = microcert_center::Center::open_url(
        &url,
        card.clone(),
        microcert_center::CenterConfig {
            cache_capacity: 0,
            ..microcert_center::CenterConfig::default()
        },
    )
    .unwrap();
    let mut fleet = make_fleet(&*card, 56);
    let batch = dir.path().join("b.jsonl");
    // The last 8 are never imported: unknown to the center.
    write_batch(&batch, &mut fleet[..48], NOW);
    cold.import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    for n in fleet[..48].iter_mut() {
        cold.verify_auth(&n.auth(&C, NOW).0, &C, NOW).unwrap();
    }
    for n in &fleet[40..48] {
        cold.revoke(n.id, "operator:ann", "lost", NOW + 1).unwrap();
    }
    let t = NOW + 2;
    // Three AUTHs per device, devices interleaved.
    let mut msgs: Vec<(usize, Vec<u8>)> = Vec::new();
    for _ in 0..3 {
        for (i, n) in fleet.iter_mut().enumerate() {
            msgs.push((i, n.auth(&C, t).0));
        }
    }
    let ok = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for part in msgs.chunks(msgs.len().div_ceil(8)) {
            let (cold, ok) = (&cold, &ok);
            s.spawn(move || {
                for (i, m) in part {
                    let r = cold.verify_auth(m, &C, t);
                    match *i {
                        0..40 => {
                            assert!(r.is_ok(), "device {i}: {r:?}");
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        40..48 => assert!(matches!(r, Err(Error::Revoked)), "device {i}: {r:?}"),
                        _ => assert!(matches!(r, Err(Error::UnknownDevice)), "device {i}: {r:?}"),
                    }
                }
            });
        }
    });
    assert_eq!(ok.load(Ordering::SeqCst), 40 * 3);
}

/// A column whose type was changed behind the center's back (a row the
/// program cannot convert) is a corrupt database, answered as a lasting
/// failure: not "unreachable", which the device API would answer 503 and
/// the device would retry forever.
#[test]
fn an_unconvertible_column_is_corrupt_not_unreachable() {
    let Some(server) = private_pg_server(None) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = server.fresh_database("convert");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let mut fleet = make_fleet(&*card, 2);
    {
        let center = open_center(&url, card.clone());
        let batch = dir.path().join("b.jsonl");
        write_batch(&batch, &mut fleet, NOW);
        center
            .import_batch(&batch, "factory", NOW, &mut |_| {})
            .unwrap();
    }
    let db = url.rsplit('/').next().unwrap();
    server.psql(db, "ALTER TABLE devices ALTER COLUMN class TYPE text");
    // A fresh center: nothing cached, the device row is read and fails
    // to convert.
    let center = open_center(&url, card);
    let (a, _) = fleet[0].auth(&C, NOW + 3);
    match center.verify_auth(&a, &C, NOW + 3) {
        Err(Error::Database(m)) => {
            assert_eq!(m.kind, microcert_center::DbFailure::Corrupt, "{m}");
            assert!(!m.kind.is_transient());
        }
        other => panic!("{other:?}"),
    }
}
