//! Rough throughput figures of the center in process, for
//! docs/benchmarks.md ("Center in process"); the criterion benchmarks are
//! in `benches/`. A measurement that prints, not a test:
//!
//! ```text
//! cargo run --release -p microcert-bench --example throughput -- [throughput|warm-floor|import-only|backends]...
//! ```
//!
//! No argument runs `throughput`. `backends` puts SQLite and PostgreSQL
//! side by side (docs/benchmarks.md, "Key database backends side by
//! side") on the test kit's throw-away PostgreSQL cluster; `MC_PG_DURABLE=1`
//! keeps PostgreSQL's durable defaults (fsync on). `MC_TP_DEVICES` sets the fleet size
//! (default 20,000), `MC_TP_MODES` (memory, database) the replay modes of
//! `throughput`, `MC_TP_AUTHS` the messages of `warm-floor`.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use microcert_center::{Center, CenterConfig, ReplayMode, SoftwareCard, SqliteOptions};
use microcert_core::Audience;
use microcert_testkit::nodes::{NOW, RP, TestNode, make_fleet, write_batch};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        throughput();
    }
    for a in &args {
        match a.as_str() {
            "throughput" => throughput(),
            "warm-floor" => warm_floor(),
            "import-only" => import_only(),
            "backends" => backends_side_by_side(),
            other => {
                eprintln!(
                    "unknown measurement {other:?}: throughput, warm-floor, import-only or backends"
                );
                std::process::exit(2);
            }
        }
    }
}

/// CPU time (user + system) this process has used so far, in seconds
/// (Linux /proc/self/stat, in clock ticks of 10 ms; 0 elsewhere).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    match (f.get(11), f.get(12)) {
        (Some(u), Some(s)) => (u + s) as f64 / 100.0,
        _ => 0.0,
    }
}

/// CPU time (user + system, and that of exited children) of the
/// PostgreSQL cluster in `data`: its postmaster and every process it
/// started (the connections' backends, the WAL writer, the
/// checkpointer), in seconds. 0 when it cannot be read.
fn pg_cpu_secs(data: &Path) -> f64 {
    let Some(pm) = std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u64>().ok()))
    else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // Fields from the state on: ppid is f[1], utime f[11], stime f[12],
        // cutime f[13], cstime f[14].
        if f.len() > 14 && (pid == pm || f[1] == pm) {
            ticks += f[11] + f[12] + f[13] + f[14];
        }
    }
    ticks as f64 / 100.0
}

fn rate(n: usize, start: Instant) -> f64 {
    n as f64 / start.elapsed().as_secs_f64()
}

/// `MC_TP_DEVICES`, default 20,000.
fn devices() -> u64 {
    std::env::var("MC_TP_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// A center with the default configuration over a new SQLite file, its
/// card and the file's directory.
fn sqlite_center() -> (tempfile::TempDir, Arc<SoftwareCard>, Center) {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = Center::open_sqlite(
        &dir.path().join("c.db"),
        card.clone(),
        CenterConfig::default(),
    )
    .unwrap();
    (dir, card, center)
}

/// Verifies `auths` at `t` on `threads` threads; AUTHs per second.
fn verify_threaded(center: &Center, auths: &[Vec<u8>], t: u64, threads: usize) -> f64 {
    let c = Audience::CENTER;
    let start = Instant::now();
    std::thread::scope(|s| {
        for part in auths.chunks(auths.len().div_ceil(threads)) {
            s.spawn(move || {
                for a in part {
                    center.verify_auth(a, &c, t).unwrap();
                }
            });
        }
    });
    rate(auths.len(), start)
}

/// A fleet of `n` nodes for `card`, imported into `center` from one batch
/// file in `dir`; the import's rate in seeds per second.
fn import(center: &Center, card: &SoftwareCard, dir: &Path, n: u64) -> (Vec<TestNode>, f64) {
    let mut fleet = make_fleet(card, n);
    let batch = dir.join("b.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    let start = Instant::now();
    let cpu = cpu_secs();
    let r = center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    assert_eq!(r.enrolled, n);
    let r = rate(n as usize, start);
    // The center's own CPU per seed (a PostgreSQL server's is not in it).
    println!(
        "  import: {:.1} us of this process's CPU per seed, load average {}",
        (cpu_secs() - cpu) * 1e6 / n as f64,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or("?")
    );
    (fleet, r)
}

fn run(sync_every_commit: bool, replay: ReplayMode) {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let opts = SqliteOptions {
        sync_every_commit,
        ..SqliteOptions::default()
    };
    let path = dir.path().join("c.db");
    let config = CenterConfig {
        replay,
        ..CenterConfig::default()
    };
    let center = Center::open_sqlite_with(&path, opts, card.clone(), config.clone()).unwrap();
    let n = devices();
    let (mut fleet, import_rate) = import(&center, &card, dir.path(), n);
    println!(
        "sync_every_commit={sync_every_commit} replay={replay:?}: import {n} seeds: {import_rate:.0} seeds/s"
    );

    let c = Audience::CENTER;
    let m = n as usize;
    // First use of every seed: activation, one transaction each.
    let auths: Vec<Vec<u8>> = fleet.iter_mut().map(|node| node.auth(&c, NOW).0).collect();
    let start = Instant::now();
    for a in &auths {
        center.verify_auth(a, &c, NOW).unwrap();
    }
    println!(
        "  first AUTH per device (activation write): {:.0}/s",
        rate(m, start)
    );

    // Cold: a second center on the file with the seed cache off, so every
    // AUTH reads the device and its seeds, checks their tags and unseals.
    let cold = Center::open_sqlite_with(
        &path,
        opts,
        card.clone(),
        CenterConfig {
            cache_capacity: 0,
            ..config.clone()
        },
    )
    .unwrap();
    let auths: Vec<Vec<u8>> = fleet
        .iter_mut()
        .map(|node| node.auth(&c, NOW + 1).0)
        .collect();
    let start = Instant::now();
    for a in &auths {
        cold.verify_auth(a, &c, NOW + 1).unwrap();
    }
    println!(
        "  verify AUTH, cold (read + tag checks + unseal every time), 1 thread: {:.0}/s",
        rate(m, start)
    );

    for round in 0..2u64 {
        let t = NOW + 2 + round;
        let auths: Vec<Vec<u8>> = fleet.iter_mut().map(|node| node.auth(&c, t).0).collect();
        let start = Instant::now();
        for a in &auths {
            center.verify_auth(a, &c, t).unwrap();
        }
        println!(
            "  verify AUTH, warm cache, 1 thread: {:.0}/s",
            rate(m, start)
        );
    }
    for threads in [2usize, 8] {
        let t = NOW + 10 + threads as u64;
        let auths: Vec<Vec<u8>> = fleet.iter_mut().map(|node| node.auth(&c, t).0).collect();
        let r = verify_threaded(&center, &auths, t, threads);
        println!("  verify AUTH, warm cache, {threads} threads: {r:.0}/s");
    }
}

fn throughput() {
    let which = std::env::var("MC_TP_MODES").unwrap_or_default();
    if which.is_empty() || which.contains("memory") {
        run(true, ReplayMode::Memory);
    }
    if which.is_empty() || which.contains("database") {
        run(false, ReplayMode::Database);
        run(true, ReplayMode::Database);
    }
}

/// The warm path against its crypto floor: the core's verify_auth alone,
/// with the RECEIPT, and the center's verify_auth (cache warm, memory
/// replay guard), on one thread.
fn warm_floor() {
    use microcert_core::{Auth, Header, Sender, make_receipt, verify_auth};
    let (dir, card, center) = sqlite_center();
    let n = 1000u64;
    let (mut fleet, _) = import(&center, &card, dir.path(), n);
    let c = Audience::CENTER;
    for node in fleet.iter_mut() {
        center.verify_auth(&node.auth(&c, NOW).0, &c, NOW).unwrap();
    }
    let m: usize = std::env::var("MC_TP_AUTHS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let t = NOW + 1;
    let auths: Vec<Vec<u8>> = (0..m)
        .map(|i| fleet[i % n as usize].auth(&c, t).0)
        .collect();
    let seeds: Vec<_> = fleet.iter().map(|f| f.seed.as_ref().unwrap()).collect();
    let start = Instant::now();
    for (i, a) in auths.iter().enumerate() {
        let msg = Auth::decode(a).unwrap();
        verify_auth(seeds[i % n as usize], &msg, &c).unwrap();
    }
    println!("core verify_auth only: {:.0}/s", rate(m, start));
    let start = Instant::now();
    let mut out = [0u8; 64];
    for (i, a) in auths.iter().enumerate() {
        let msg = Auth::decode(a).unwrap();
        let seed = seeds[i % n as usize];
        verify_auth(seed, &msg, &c).unwrap();
        let h = Header {
            t: t as u32,
            r: i as u64,
            ..msg.header
        };
        make_receipt(seed, &h, Sender::Center, msg.header.r, 0, &mut out).unwrap();
    }
    println!("core verify_auth + make_receipt: {:.0}/s", rate(m, start));
    let start = Instant::now();
    for a in &auths {
        center.verify_auth(a, &c, t).unwrap();
    }
    println!(
        "center verify_auth, warm, memory guard: {:.0}/s",
        rate(m, start)
    );
    // A relying party's /v1/verify: the same checks, no RECEIPT to make.
    let rp = Audience::relying_party(RP);
    let t = NOW + 2;
    let auths: Vec<Vec<u8>> = (0..m)
        .map(|i| fleet[i % n as usize].auth(&rp, t).0)
        .collect();
    let start = Instant::now();
    for a in &auths {
        center.verify(a, &rp, t).unwrap();
    }
    println!(
        "center verify (relying party, no RECEIPT), warm, memory guard: {:.0}/s",
        rate(m, start)
    );
}

/// Batch import alone (for profiling): `MC_TP_DEVICES` seeds.
fn import_only() {
    let (dir, card, center) = sqlite_center();
    let n = devices();
    let (_, import_rate) = import(&center, &card, dir.path(), n);
    println!("import {n} seeds: {import_rate:.0} seeds/s");
}

/// Import and cold-cache verification throughput of the key database
/// backends side by side: SQLite, then PostgreSQL when it is installed.
fn backends_side_by_side() {
    // MC_TP_ONLY=pg skips SQLite.
    if std::env::var("MC_TP_ONLY").as_deref() != Ok("pg") {
        measure_backend(None);
    }
    if let Some(pg) = microcert_testkit::postgres::shared() {
        measure_backend(Some(pg));
    }
}

fn measure_backend(pg: Option<&microcert_testkit::postgres::PgServer>) {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    // No seed cache: every AUTH reads its device and seeds from the
    // database and unseals the seed (the "cold cache" figure).
    let config = CenterConfig {
        cache_capacity: 0,
        ..CenterConfig::default()
    };
    let (backend, loc) = match pg {
        Some(pg) => ("Postgres", pg.fresh_database("c.db")),
        None => (
            "Sqlite",
            dir.path().join("c.db").to_string_lossy().into_owned(),
        ),
    };
    let center = Arc::new(Center::open_url(&loc, card.clone(), config).unwrap());
    let n = devices();
    let server_cpu = || pg.map_or(0.0, |pg| pg_cpu_secs(&pg.data));
    let pg0 = server_cpu();
    let (mut fleet, import_rate) = import(&center, &card, dir.path(), n);
    println!("{backend}: import {n} seeds: {import_rate:.0} seeds/s");
    if pg.is_some() {
        println!(
            "  import: {:.1} us of PostgreSQL server CPU per seed",
            (server_cpu() - pg0) * 1e6 / n as f64
        );
    }

    let c = Audience::CENTER;
    // First use activates each seed (a write); not measured.
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&c, NOW);
        center.verify_auth(&a, &c, NOW).unwrap();
    }
    // MC_TP_THREADS: the verifying threads of each round (default 1,4,16).
    let counts: Vec<usize> = std::env::var("MC_TP_THREADS")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16]);
    for (round, threads) in counts.into_iter().enumerate() {
        let t = NOW + 1 + round as u64;
        let auths: Vec<Vec<u8>> = fleet.iter_mut().map(|node| node.auth(&c, t).0).collect();
        let (cpu, pg0) = (cpu_secs(), server_cpu());
        let r = verify_threaded(&center, &auths, t, threads);
        println!(
            "{backend}: verify AUTH, cold cache, {threads} thread(s): {r:.0}/s \
             (CPU per verification: center {:.1} us, database server {:.1} us; load average {})",
            (cpu_secs() - cpu) * 1e6 / auths.len() as f64,
            (server_cpu() - pg0) * 1e6 / auths.len() as f64,
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .next()
                .unwrap_or("?")
        );
    }
}
