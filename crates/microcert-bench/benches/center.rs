//! The authentication center in process, through its public API:
//!
//! ```text
//! cargo bench -p microcert-bench --bench center -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! - `center/verify_auth/warm`: `Center::verify_auth` with the device's seed
//!   in the cache (TTL raised to an hour so no entry expires mid-run);
//! - `center/verify_auth/cold`: the same with `cache_capacity = 0`, so every
//!   AUTH reads the device from SQLite, checks its record tag and unseals
//!   the seed;
//! - `center/verify_auth/warm_no_receipt`: warm, through `Center::verify`
//!   (the relying party's `/v1/verify`), which makes no RECEIPT;
//! - `center/verify_auth/warm_replay_in_db`: warm, with `ReplayMode::Database`
//!   (a durable replay record per AUTH, as centers sharing a database need);
//!   the other two use the default for `Center::open_sqlite`, the in-memory
//!   replay guard;
//! - `center/parts/*`: the pieces of those paths on their own, to show
//!   where the time goes;
//! - `center/import`: `Center::import_batch` of a factory file into a fresh
//!   database, per seed;
//! - `center/integrity`: `Center::integrity_scan` of 10,000 records.
//!
//! Every AUTH is fresh (new r): the center records each one against replay.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, SamplingMode, Throughput};
use microcert_bench::ecdsa::Baseline;
use microcert_bench::fleet::{self, AuthMaker, Fleet, NOW};
use microcert_bench::{targets, timing};
use microcert_center::db::with_tx;
use microcert_center::{Center, CenterConfig, ReplayMode, SoftwareCard, integrity};
use microcert_core::Audience;

/// Devices in the verification fleet.
const FLEET: u64 = 1000;
/// Seeds per import run.
const IMPORT: u64 = 2000;
/// Records per integrity scan.
const SCAN: u64 = 10_000;

fn warm_config() -> CenterConfig {
    CenterConfig {
        cache_ttl_secs: 3600,
        ..CenterConfig::default()
    }
}

type Msg = ([u8; 64], usize);

fn next(maker: &mut AuthMaker) -> Msg {
    let mut buf = [0u8; 64];
    let n = maker.next_auth(&mut buf).expect("AUTH");
    (buf, n)
}

fn verify(center: &Center, m: &Msg) {
    center
        .verify_auth(black_box(&m.0[..m.1]), &Audience::CENTER, NOW)
        .expect("a fresh AUTH verifies");
}

fn warm_up_cache(center: &Center, maker: &mut AuthMaker) {
    for _ in 0..FLEET {
        verify(center, &next(maker));
    }
}

fn verification(
    c: &mut Criterion,
    fleet: &Fleet,
    cold: &Center,
    db_replay: &Center,
    maker: &mut AuthMaker,
) {
    warm_up_cache(&fleet.center, maker);
    warm_up_cache(db_replay, maker);
    let mut g = c.benchmark_group("center/verify_auth");
    g.throughput(Throughput::Elements(1));
    g.bench_function("warm", |b| {
        b.iter_batched(
            || next(maker),
            |m| verify(&fleet.center, &m),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("cold", |b| {
        b.iter_batched(|| next(maker), |m| verify(cold, &m), BatchSize::SmallInput)
    });
    g.bench_function("warm_no_receipt", |b| {
        b.iter_batched(
            || next(maker),
            |m| {
                fleet
                    .center
                    .verify(black_box(&m.0[..m.1]), &Audience::CENTER, NOW)
                    .expect("a fresh AUTH verifies")
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("warm_replay_in_db", |b| {
        b.iter_batched(
            || next(maker),
            |m| verify(db_replay, &m),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn parts(c: &mut Criterion, fleet: &Fleet) {
    let db = fleet.center.database();
    let card = fleet.center.card();
    let row = db
        .scan_seeds(None, 1)
        .expect("scan")
        .pop()
        .expect("one seed record");
    let ct = row.ciphertext.clone().expect("ciphertext");
    let mut g = c.benchmark_group("center/parts");
    g.throughput(Throughput::Elements(1));
    let mut r = 0u64;
    g.bench_function("replay_record_commit", |b| {
        b.iter(|| {
            r += 1;
            with_tx(db, |tx| {
                tx.record_replay((row.device, 0, fleet::NOW as u32, r, NOW + 1))
            })
            .expect("replay tx")
        })
    });
    let id = row.device;
    g.bench_function("read_device_and_seeds_tx", |b| {
        b.iter(|| {
            with_tx(db, |tx| Ok((tx.device(black_box(id))?, tx.seeds(id)?))).expect("read tx")
        })
    });
    g.bench_function("record_tag_check", |b| {
        b.iter(|| integrity::check_record(card, black_box(&row)).expect("tag"))
    });
    g.bench_function("unseal_seed", |b| {
        b.iter(|| {
            card.unseal_seed(
                row.device,
                row.generation,
                row.kstore_version,
                black_box(&ct.0),
            )
            .expect("unseal")
        })
    });
    let mut rnd = [0u8; 8];
    g.bench_function("card_random_8B", |b| {
        b.iter(|| card.random(black_box(&mut rnd)).expect("random"))
    });
    g.finish();
}

fn import(c: &mut Criterion) {
    let card = Arc::new(SoftwareCard::ephemeral().expect("card"));
    let files = fleet::temp_dir().expect("temp dir");
    let batch = files.path().join("batch.jsonl");
    fleet::write_batch(&*card, IMPORT, &batch).expect("batch file");
    let mut g = c.benchmark_group("center/import");
    g.throughput(Throughput::Elements(IMPORT));
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.bench_function("seeds_into_sqlite", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // A fresh database each time: importing a file twice is a
                // no-op by design.
                let dir = fleet::temp_dir().expect("temp dir");
                let center = Center::open_sqlite(
                    &dir.path().join("keys.db"),
                    card.clone(),
                    CenterConfig::default(),
                )
                .expect("center");
                let start = Instant::now();
                let report = center
                    .import_batch(&batch, "bench", NOW, &mut |_| {})
                    .expect("import");
                total += start.elapsed();
                assert_eq!(report.enrolled, IMPORT);
            }
            total
        })
    });
    g.finish();
}

fn integrity_scan(c: &mut Criterion) {
    let fleet = Fleet::new(SCAN, CenterConfig::default()).expect("fleet of 10,000");
    let mut g = c.benchmark_group("center/integrity");
    g.throughput(Throughput::Elements(SCAN));
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.bench_function("scan_10000_records", |b| {
        b.iter(|| {
            let report = fleet.center.integrity_scan().expect("scan");
            assert!(report.is_clean() && report.records == SCAN);
            report.records
        })
    });
    g.finish();
}

/// Median ns per AUTH over chunks of pre-made messages.
fn per_auth_ns(center: &Center, maker: &mut AuthMaker, chunks: usize, chunk: usize) -> f64 {
    let pool: Vec<Msg> = (0..chunks * chunk).map(|_| next(maker)).collect();
    let mut t: Vec<f64> = pool
        .chunks(chunk)
        .map(|part| {
            let start = Instant::now();
            for m in part {
                verify(center, m);
            }
            start.elapsed().as_secs_f64() * 1e9 / part.len() as f64
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// The service-level figures and the ratio, timed again here in one
/// process so they print even when criterion ran only some benches.
fn summary(fleet: &Fleet, cold: &Center, db_replay: &Center, maker: &mut AuthMaker) {
    let base = Baseline::new().expect("ECDSA baseline");
    let ecdsa = timing::ns_per_op(|| base.verify(), 21);
    // Warm the cache again: the criterion run may have been long.
    warm_up_cache(&fleet.center, maker);
    let warm = per_auth_ns(&fleet.center, maker, 11, 200);
    let cold_ns = per_auth_ns(cold, maker, 11, 100);
    warm_up_cache(db_replay, maker);
    let db_ns = per_auth_ns(db_replay, maker, 11, 100);
    let line = |name: &str, ns: f64, target: f64| {
        let rate = timing::per_second(ns);
        println!(
            "center verify AUTH, {name}: {ns:.0} ns = {} /s/core (target >= {}): {}",
            timing::grouped(rate),
            timing::grouped(target),
            if rate >= target { "met" } else { "NOT met" }
        );
    };
    println!();
    line("seed cache warm", warm, 1_000_000.0);
    line("cache off (SQLite read + unseal)", cold_ns, 200_000.0);
    line(
        "seed cache warm, replay records in the database",
        db_ns,
        1_000_000.0,
    );
    println!(
        "ratio: ECDSA P-256 verify / center AUTH verify (warm, in-memory replay guard) = {:.1}x (target >= 40x); ECDSA {ecdsa:.0} ns",
        ecdsa / warm
    );
}

fn measuring() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list")
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let fleet = Fleet::new(FLEET, warm_config()).expect("fleet");
    let cold = fleet
        .another_center(fleet::cold_config())
        .expect("cold center");
    // One maker for the whole run: its r values never repeat, so no AUTH
    // is refused as a replay.
    let mut maker = AuthMaker::new(FLEET);
    let db_replay = fleet
        .another_center(CenterConfig {
            replay: ReplayMode::Database,
            ..warm_config()
        })
        .expect("center with replay records in the database");
    verification(&mut c, &fleet, &cold, &db_replay, &mut maker);
    parts(&mut c, &fleet);
    import(&mut c);
    integrity_scan(&mut c);
    c.final_summary();
    if measuring() {
        summary(&fleet, &cold, &db_replay, &mut maker);
        drop((fleet, cold, db_replay));
        // The table of issue 16, every figure beside its target and ECDSA.
        match targets::measure(targets::import_devices_from_env()) {
            Ok(report) => println!("\n{}", report.table()),
            Err(e) => {
                eprintln!("targets: not measured: {e}");
                std::process::exit(1);
            }
        }
    }
}
