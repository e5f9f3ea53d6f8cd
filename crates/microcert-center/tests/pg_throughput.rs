//! Import and cold-cache verification throughput of the key database
//! backends side by side (docs/benchmarks.md, "Key database backends side by side"). A measurement, not
//! a test: ignored by default; run with
//! `MC_PG_DURABLE=1 cargo test -p microcert-center --release --test pg_throughput -- --ignored --nocapture`
//! (`MC_TP_DEVICES`: fleet size, default 20,000; `MC_TP_THREADS`: the
//! verifying threads of each round, default `1,4,16`; `MC_TP_ONLY=pg`
//! skips SQLite).

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use microcert_center::{Center, CenterConfig, SoftwareCard};
use microcert_core::Audience;

fn rate(n: usize, start: Instant) -> f64 {
    n as f64 / start.elapsed().as_secs_f64()
}

fn measure(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    // No seed cache: every AUTH reads its device and seeds from the
    // database and unseals the seed (the "cold cache" figure).
    let config = CenterConfig {
        cache_capacity: 0,
        ..CenterConfig::default()
    };
    let loc = backend.location(dir.path(), "c.db");
    let center = Arc::new(Center::open_url(&loc, card.clone(), config).unwrap());
    let n: u64 = std::env::var("MC_TP_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut fleet = make_fleet(&*card, n);
    let batch = dir.path().join("b.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    let start = Instant::now();
    let r = center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    assert_eq!(r.enrolled, n);
    println!(
        "{backend:?}: import {n} seeds: {:.0} seeds/s",
        rate(n as usize, start)
    );

    let c = Audience::CENTER;
    // First use activates each seed (a write); not measured.
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&c, NOW);
        center.verify_auth(&a, &c, NOW).unwrap();
    }
    let counts: Vec<usize> = std::env::var("MC_TP_THREADS")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16]);
    for (round, threads) in counts.into_iter().enumerate() {
        let t = NOW + 1 + round as u64;
        let auths: Vec<Vec<u8>> = fleet.iter_mut().map(|node| node.auth(&c, t).0).collect();
        let start = Instant::now();
        std::thread::scope(|s| {
            for part in auths.chunks(auths.len().div_ceil(threads)) {
                let center = &center;
                s.spawn(move || {
                    for a in part {
                        center.verify_auth(a, &c, t).unwrap();
                    }
                });
            }
        });
        println!(
            "{backend:?}: verify AUTH, cold cache, {threads} thread(s): {:.0}/s",
            rate(auths.len(), start)
        );
    }
}

#[test]
#[ignore = "measurement; run in release with --ignored --nocapture"]
fn backends_side_by_side() {
    if std::env::var("MC_TP_ONLY").as_deref() != Ok("pg") {
        measure(Backend::Sqlite);
    }
    if let Some(b) = postgres() {
        measure(b);
    }
}
