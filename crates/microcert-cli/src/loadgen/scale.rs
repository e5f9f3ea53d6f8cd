//! `microcert bench scale`: N devices imported into one SQLite database
//! (or the PostgreSQL database `--database` names), then cold
//! verification latency and an integrity check, all in process; the
//! import's rate and the process's memory (RSS) at each chunk.
//!
//! The ENROLLs are made with the core directly (two threads), under the
//! transport keys of a throw-away in-memory card, and written as a factory
//! batch file; the center imports that file exactly as `microcert import`
//! would. The seeds are filled from a fast non-cryptographic generator:
//! benchmark data, never real keys. The run stops by itself.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;
use microcert_center::{Center, CenterConfig, EncryptionCard, SoftwareCard};
use microcert_core::{
    Audience, DeviceId, EnrollKey, Header, KeySeed, Suite, make_auth, make_enroll, time,
};

/// Arguments of `bench scale`.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// Devices to import.
    #[arg(long, default_value_t = 1_000_000)]
    pub devices: u64,
    /// A new (or empty) directory for the batch file and the database.
    #[arg(long)]
    pub data: PathBuf,
    /// Batch entries per import transaction.
    #[arg(long, default_value_t = CenterConfig::default().import_chunk)]
    pub chunk: usize,
    /// Devices sampled for the cold verification latency.
    #[arg(long, default_value_t = 10_000)]
    pub sample: u64,
    /// Keep the batch file (about 2 KB per device) after the import.
    #[arg(long)]
    pub keep_batch: bool,
    /// Import into this database (a PostgreSQL URL) instead of a new
    /// SQLite file in `--data`; it must be empty. The batch file is still
    /// written in `--data`.
    #[arg(long)]
    pub database: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// This process's resident set and its peak so far, in KiB (Linux
/// /proc/self/status; zeros elsewhere).
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

const ID_BASE: u64 = 0x5ca1_e000_0000_0000;

fn device(i: u64) -> DeviceId {
    DeviceId::from_u64(ID_BASE + i)
}

/// splitmix64: benchmark seed material only.
fn fill(i: u64, buf: &mut [u8]) {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed;
    for chunk in buf.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_be_bytes()[..chunk.len()]);
    }
}

fn seed(i: u64, base_year: u16) -> KeySeed {
    KeySeed::generate(base_year, |b| fill(i, b))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes the batch file for devices `0..n`, two threads.
fn write_batch(card: &dyn EncryptionCard, n: u64, path: &Path, now: u64) -> anyhow::Result<()> {
    let year = u16::try_from(time::date_of(now as i64).year)?;
    let t = u32::try_from(now)?;
    let parts = 2u64;
    let per = n.div_ceil(parts);
    let files: Vec<PathBuf> = (0..parts)
        .map(|p| path.with_extension(format!("part{p}")))
        .collect();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let mut handles = Vec::new();
        for (p, file) in files.iter().enumerate() {
            let (lo, hi) = (p as u64 * per, ((p as u64 + 1) * per).min(n));
            handles.push(s.spawn(move || -> anyhow::Result<()> {
                let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(file)?);
                let mut out = [0u8; 1100];
                let mut hexbuf = vec![0u8; 2200];
                for i in lo..hi {
                    let id = device(i);
                    let ktr = card.transport_key(id, 0)?;
                    let h = Header {
                        suite: Suite::CMAC64,
                        device: id,
                        generation: 0,
                        t,
                        r: i ^ 0xe000_0000_0000_0000,
                    };
                    let len = make_enroll(EnrollKey::Transport(&ktr), &seed(i, year), &h, &mut out)
                        .map_err(|e| anyhow::anyhow!("making an ENROLL: {e}"))?;
                    let hx = &mut hexbuf[..2 * len];
                    hex::encode_to_slice(&out[..len], hx)?;
                    write!(
                        w,
                        "{{\"device_id\":\"{}\",\"class\":1,\"epoch\":0,\"enroll\":\"",
                        hex::encode(id.0)
                    )?;
                    w.write_all(hx)?;
                    w.write_all(b"\"}\n")?;
                }
                w.flush()?;
                Ok(())
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("batch writer panicked"))??;
        }
        Ok(())
    })?;
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    for f in &files {
        std::io::copy(&mut std::fs::File::open(f)?, &mut out)?;
        std::fs::remove_file(f)?;
    }
    out.flush()?;
    Ok(())
}

fn size_of(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    crate::simulate::percentile(sorted, p)
}

/// The sample's devices: spread over the whole id range.
fn sample_ids(n: u64, k: u64) -> Vec<u64> {
    let k = k.min(n).max(1);
    (0..k).map(|j| j * n / k).collect()
}

/// Verifies one AUTH per sampled device at `t`; sorted latencies.
fn verify_round(
    center: &Center,
    ids: &[u64],
    year: u16,
    t: u32,
    r_base: u64,
) -> anyhow::Result<Vec<Duration>> {
    let mut lat = Vec::with_capacity(ids.len());
    let mut buf = [0u8; 64];
    for &i in ids {
        let h = Header {
            suite: Suite::CMAC64,
            device: device(i),
            generation: 0,
            t,
            r: r_base ^ i,
        };
        let n = make_auth(&seed(i, year), &h, &Audience::CENTER, &mut buf)
            .map_err(|e| anyhow::anyhow!("making an AUTH: {e}"))?;
        let start = Instant::now();
        center
            .verify_auth(&buf[..n], &Audience::CENTER, u64::from(t))
            .with_context(|| format!("verifying an AUTH of {}", device(i)))?;
        lat.push(start.elapsed());
    }
    lat.sort_unstable();
    Ok(lat)
}

/// Runs the scale benchmark.
pub fn run(args: &ScaleArgs) -> anyhow::Result<()> {
    if args.devices == 0 || args.devices > 10_000_000 {
        bail!("--devices is 1 to 10,000,000");
    }
    std::fs::create_dir_all(&args.data)?;
    if std::fs::read_dir(&args.data)?.next().is_some() {
        bail!("{} is not empty", args.data.display());
    }
    let n = args.devices;
    let now = unix_now();
    let year = u16::try_from(time::date_of(now as i64).year)?;
    let card = Arc::new(SoftwareCard::ephemeral()?);
    let batch = args.data.join("batch.jsonl");
    let start = Instant::now();
    write_batch(&*card, n, &batch, now)?;
    let gen_secs = start.elapsed().as_secs_f64();
    let batch_bytes = size_of(&batch);
    eprintln!("batch of {n} ENROLLs written in {gen_secs:.1} s ({batch_bytes} bytes)");

    let db = args.data.join("keys.db");
    let location = match &args.database {
        Some(url) => url.clone(),
        None => db.to_string_lossy().into_owned(),
    };
    let backend = if args.database.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let config = CenterConfig {
        import_chunk: args.chunk.max(1),
        ..CenterConfig::default()
    };
    let center = Center::open_url(&location, card.clone(), config.clone())?;
    let (rss_before, _) = rss_kib();
    let mut rss_min = u64::MAX;
    let mut rss_max = 0u64;
    let start = Instant::now();
    let mut last_print = Instant::now();
    let report = center.import_batch(&batch, "bench-scale", now, &mut |p| {
        let (rss, _) = rss_kib();
        rss_min = rss_min.min(rss);
        rss_max = rss_max.max(rss);
        if last_print.elapsed() > Duration::from_secs(10) {
            last_print = Instant::now();
            let secs = start.elapsed().as_secs_f64();
            let rate = p.enrolled as f64 / secs;
            let left = p.lines_total.saturating_sub(p.lines_done) as f64 / rate.max(1.0);
            eprintln!(
                "  imported {} of {} lines, {rate:.0} seeds/s, ETA {left:.0} s, RSS {} MiB",
                p.lines_done,
                p.lines_total,
                rss / 1024
            );
        }
    })?;
    let import_secs = start.elapsed().as_secs_f64();
    let (_, rss_peak) = rss_kib();
    if rss_min == u64::MAX {
        rss_min = 0;
    }
    if report.enrolled != n || !report.rejected.is_empty() {
        bail!(
            "import: {} of {n} enrolled, {} rejected",
            report.enrolled,
            report.rejected.len()
        );
    }
    if !args.keep_batch {
        std::fs::remove_file(&batch)?;
    }
    // Moves the write-ahead log into the database file, so the size is
    // the database's.
    center.database().flush_erased()?;
    let db_bytes = if args.database.is_some() {
        0
    } else {
        size_of(&db) + size_of(&db.with_extension("db-wal"))
    };
    eprintln!(
        "import done in {import_secs:.1} s; database {db_bytes} bytes; activating the sample"
    );

    // The sample: the first AUTH of each activates its seed (one
    // transaction), then a center with the seed cache off verifies a
    // second AUTH of each (read, tag checks, unseal, every time).
    let ids = sample_ids(n, args.sample);
    let t1 = u32::try_from(now)?;
    let activation = verify_round(&center, &ids, year, t1, 0xa1 << 56)?;
    drop(center);
    let cold_center = Center::open_url(
        &location,
        card.clone(),
        CenterConfig {
            cache_capacity: 0,
            ..config
        },
    )?;
    let start = Instant::now();
    let cold = verify_round(&cold_center, &ids, year, t1 + 1, 0xc0 << 56)?;
    let cold_secs = start.elapsed().as_secs_f64();
    eprintln!("cold verification done; integrity check of every record");

    let start = Instant::now();
    let integrity = cold_center.integrity_scan()?;
    let integrity_secs = start.elapsed().as_secs_f64();
    if !integrity.is_clean() {
        bail!("integrity check found problems: {integrity:?}");
    }

    let import_rate = n as f64 / import_secs;
    let cold_rate = ids.len() as f64 / cold_secs;
    if args.json {
        say!(
            "{}",
            serde_json::json!({
                "devices": n, "chunk": args.chunk,
                "batch_seconds": gen_secs, "batch_bytes": batch_bytes,
                "import_seconds": import_secs, "import_per_second": import_rate,
                "database_bytes": db_bytes, "backend": backend,
                "rss_kib_before_import": rss_before,
                "rss_kib_during_import_min": rss_min,
                "rss_kib_during_import_max": rss_max,
                "rss_kib_peak": rss_peak,
                "sample": ids.len(),
                "activation_p50_us": pct(&activation, 0.5).as_micros() as u64,
                "activation_p99_us": pct(&activation, 0.99).as_micros() as u64,
                "cold_verify_per_second": cold_rate,
                "cold_verify_p50_us": pct(&cold, 0.5).as_micros() as u64,
                "cold_verify_p99_us": pct(&cold, 0.99).as_micros() as u64,
                "integrity_seconds": integrity_secs,
                "integrity_records": integrity.records,
            })
        );
    } else {
        say!(
            "scale run: {n} devices in one {backend} database ({})",
            if args.database.is_some() {
                "--database".to_string()
            } else {
                db.display().to_string()
            }
        );
        say!(
            "  import: {import_secs:.1} s, {import_rate:.0} seeds/s (chunk {})",
            args.chunk
        );
        if db_bytes > 0 {
            say!(
                "  database file: {db_bytes} bytes ({:.0} bytes per device)",
                db_bytes as f64 / n as f64
            );
        }
        say!(
            "  memory: RSS {} MiB before the import, {} to {} MiB at its chunks, peak {} MiB",
            rss_before / 1024,
            rss_min / 1024,
            rss_max / 1024,
            rss_peak / 1024
        );
        say!(
            "  first AUTH (activation, one transaction), {} devices: p50 {:.2?}, p99 {:.2?}",
            ids.len(),
            pct(&activation, 0.5),
            pct(&activation, 0.99)
        );
        say!(
            "  cold verify (cache off: read + tag checks + unseal), {} devices: {cold_rate:.0}/s, p50 {:.2?}, p99 {:.2?}",
            ids.len(),
            pct(&cold, 0.5),
            pct(&cold, 0.99)
        );
        say!(
            "  integrity check: {} records in {integrity_secs:.1} s, clean",
            integrity.records
        );
    }
    Ok(())
}
