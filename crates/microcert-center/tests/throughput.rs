//! Rough throughput figures for the report (not a benchmark suite; the
//! criterion benchmarks are issue 7's). Ignored by default; run with
//! `cargo test -p microcert-center --release --test throughput -- --ignored --nocapture`.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use microcert_center::{Center, CenterConfig, SoftwareCard, SqliteDatabase, SqliteOptions};
use microcert_core::Audience;

fn run(sync_every_commit: bool) {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let opts = SqliteOptions {
        sync_every_commit,
        ..SqliteOptions::default()
    };
    let db = SqliteDatabase::open_with(&dir.path().join("c.db"), opts).unwrap();
    let center = Center::new(Arc::new(db), card.clone(), CenterConfig::default());
    let n = 20_000u64;
    let mut fleet = make_fleet(&*card, n);
    let batch = dir.path().join("b.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    let start = Instant::now();
    let r = center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(r.enrolled, n);
    println!(
        "sync_every_commit={sync_every_commit}: import {n} seeds in {secs:.2} s = {:.0} seeds/s",
        n as f64 / secs
    );

    let c = Audience::CENTER;
    let m = 5_000usize;
    let auths: Vec<Vec<u8>> = fleet
        .iter_mut()
        .take(m)
        .map(|node| node.auth(&c, NOW).0)
        .collect();
    center.clear_cache();
    let start = Instant::now();
    for a in &auths {
        center.verify_auth(a, &c, NOW).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "  verify AUTH, cold cache (read + unseal + replay insert): {:.0}/s",
        m as f64 / secs
    );
    let auths: Vec<Vec<u8>> = fleet
        .iter_mut()
        .take(m)
        .map(|node| node.auth(&c, NOW + 1).0)
        .collect();
    let start = Instant::now();
    for a in &auths {
        center.verify_auth(a, &c, NOW + 1).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "  verify AUTH, warm cache (replay insert only): {:.0}/s",
        m as f64 / secs
    );
    // The same from 8 threads: the replay records share commits.
    let auths: Vec<Vec<u8>> = fleet
        .iter_mut()
        .take(m)
        .map(|node| node.auth(&c, NOW + 2).0)
        .collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        for part in auths.chunks(m / 8) {
            let center = &center;
            s.spawn(move || {
                for a in part {
                    center.verify_auth(a, &c, NOW + 2).unwrap();
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    println!(
        "  verify AUTH, warm cache, 8 threads (group commit): {:.0}/s",
        m as f64 / secs
    );
}

#[test]
#[ignore = "measurement; run in release with --ignored --nocapture"]
fn throughput() {
    run(false);
    run(true);
}
