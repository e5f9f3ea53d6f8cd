//! The table of issue 16: every performance figure beside its target and
//! beside ECDSA P-256 verification measured in the same process, in a few
//! seconds. Printed at the end of `cargo bench -p microcert-bench --bench
//! center` and by `cargo run --release -p microcert-bench --example
//! verify_rate`.
//!
//! Each figure is the median over batches (see [`crate::timing`]); the
//! ECDSA column is how many ECDSA P-256 verifications (ring, one thread)
//! the same time would have paid for: `figure rate / ECDSA rate`. Ratios
//! are what to compare between runs on a shared machine, not the rates.

use std::time::Instant;

use microcert_center::{Center, CenterConfig, memory_model};
use microcert_core::Audience;

use crate::fleet::{self, AuthMaker, BoxError, Fleet, NOW};
use crate::{ratio, timing};

/// Devices of the fleet the verification rates are measured on.
pub const RATE_DEVICES: u64 = 1000;
/// Devices imported for the import rate and the memory figures
/// (`MC_BENCH_IMPORT` changes it).
pub const IMPORT_DEVICES: u64 = 10_000;
/// The node's worst-case stack while issuing AUTH on a Cortex-M4, bytes:
/// the static bound of `crates/microcert-node/size-check/measure.sh`
/// (docs/benchmarks.md, "Code size and worst-case stack"). It needs the
/// thumbv7em target and a nightly flag, so it is quoted here, not
/// re-measured; the script's last run (2026-12-02) gave 1,708 bytes.
pub const NODE_STACK_AUTH: u64 = 1708;
/// Devices the memory model is scaled to.
pub const FLEET_1M: u64 = 1_000_000;
/// Messages per device per second at one AUTH per device per minute.
const AUTH_PER_MINUTE: f64 = 1.0 / 60.0;

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What is measured.
    pub figure: &'static str,
    /// The measured value, formatted.
    pub value: String,
    /// Operations per second, when the figure is a rate.
    pub per_second: Option<f64>,
    /// The target, formatted.
    pub target: &'static str,
    /// Whether it is met (None: no target or not measured here).
    pub met: Option<bool>,
    /// Where the figure comes from.
    pub command: &'static str,
}

/// Memory per device of the structures that grow with the fleet.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// Devices whose cache entries were measured.
    pub devices: u64,
    /// Model: heap bytes per cached device (one seed), from struct sizes.
    pub cache_model: usize,
    /// Resident memory added per cached device, measured.
    pub cache_rss: f64,
    /// Model: heap bytes per message in the replay guard.
    pub replay_model: usize,
    /// Resident memory added per accepted message, measured.
    pub replay_rss: f64,
    /// Messages alive in the replay guard per device at one AUTH per
    /// minute: the window (skew + instance skew + 1 s) over 60 s.
    pub replay_live_per_device: f64,
}

impl Memory {
    /// Bytes of cache for [`FLEET_1M`] devices all warm (measured rate).
    pub fn cache_1m(&self) -> f64 {
        self.cache_rss.max(self.cache_model as f64) * FLEET_1M as f64
    }

    /// Bytes of replay guard for [`FLEET_1M`] devices at one AUTH each per
    /// minute.
    pub fn replay_1m(&self) -> f64 {
        self.replay_rss.max(self.replay_model as f64)
            * self.replay_live_per_device
            * FLEET_1M as f64
    }
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct Report {
    /// ECDSA P-256 verification, ns, measured in this run.
    pub ecdsa_ns: f64,
    /// The figures.
    pub rows: Vec<Row>,
    /// The memory figures.
    pub memory: Option<Memory>,
}

fn rate_row(
    figure: &'static str,
    per_second: f64,
    unit: &str,
    target: &'static str,
    target_rate: Option<f64>,
    command: &'static str,
) -> Row {
    Row {
        figure,
        value: format!("{} {unit}", timing::grouped(per_second)),
        per_second: Some(per_second),
        target,
        met: target_rate.map(|t| per_second >= t),
        command,
    }
}

/// Median ns per AUTH of `f` over `chunks` chunks of `chunk` fresh AUTHs
/// (made before the clock starts).
fn per_auth_ns(
    maker: &mut AuthMaker,
    chunks: usize,
    chunk: usize,
    mut f: impl FnMut(&[u8]) -> Result<(), BoxError>,
) -> Result<f64, BoxError> {
    let mut pool = Vec::with_capacity(chunk);
    let mut times = Vec::with_capacity(chunks);
    for _ in 0..chunks {
        pool.clear();
        for _ in 0..chunk {
            let mut buf = [0u8; 64];
            let len = maker.next_auth(&mut buf)?;
            pool.push((buf, len));
        }
        let start = Instant::now();
        for (buf, len) in &pool {
            f(&buf[..*len])?;
        }
        times.push(start.elapsed().as_secs_f64() * 1e9 / chunk as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// One AUTH per device of `center`, in order (not timed).
fn pass(center: &Center, maker: &mut AuthMaker, n: u64) -> Result<(), BoxError> {
    let mut buf = [0u8; 64];
    for _ in 0..n {
        let len = maker.next_auth(&mut buf)?;
        center.verify_auth(&buf[..len], &Audience::CENTER, NOW)?;
    }
    Ok(())
}

/// Resident set size of this process, bytes (Linux; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn warm_config() -> CenterConfig {
    CenterConfig {
        cache_ttl_secs: 3600,
        ..CenterConfig::default()
    }
}

/// The freshness window of a class 1 device, seconds: what a key stays in
/// the replay guard.
fn replay_window_secs() -> f64 {
    let c = CenterConfig::default();
    let skew = c.profile(fleet::CLASS).map_or(300, |p| p.skew);
    f64::from(skew) + c.instance_skew as f64 + 1.0
}

/// Measures every figure. `import_devices` sets the import run's size (and
/// that of the memory figures).
pub fn measure(import_devices: u64) -> Result<Report, BoxError> {
    let cmp = ratio::measure(21).map_err(|e| e.to_string())?;
    let mut rows = vec![rate_row(
        "core verify_auth (suite 0x01, seed in memory), 1 thread",
        timing::per_second(cmp.auth_ns),
        "/s",
        "- (ECDSA ratio >= 40x)",
        None,
        "verify_rate; criterion core/auth/verify/0x01",
    )];

    let fleet = Fleet::new(RATE_DEVICES, warm_config())?;
    let mut maker = AuthMaker::new(RATE_DEVICES);
    // First AUTH of each device activates its seed (a transaction, which
    // drops the cache entry); the second fills the cache.
    pass(&fleet.center, &mut maker, RATE_DEVICES)?;
    pass(&fleet.center, &mut maker, RATE_DEVICES)?;
    let warm = per_auth_ns(&mut maker, 21, 5000, |m| {
        fleet.center.verify_auth(m, &Audience::CENTER, NOW)?;
        Ok(())
    })?;
    rows.push(rate_row(
        "center verify AUTH + RECEIPT, cache warm, 1 thread",
        timing::per_second(warm),
        "/s",
        ">= 1,000,000 /s",
        Some(1_000_000.0),
        "verify_rate; criterion center/verify_auth/warm",
    ));
    let rp = per_auth_ns(&mut maker, 21, 5000, |m| {
        fleet.center.verify(m, &Audience::CENTER, NOW)?;
        Ok(())
    })?;
    rows.push(rate_row(
        "center verify AUTH, relying party (no RECEIPT), warm, 1 thread",
        timing::per_second(rp),
        "/s",
        "(>= 1,000,000 /s)",
        Some(1_000_000.0),
        "verify_rate",
    ));
    let cold_center = fleet.another_center(fleet::cold_config())?;
    let cold = per_auth_ns(&mut maker, 11, 1000, |m| {
        cold_center.verify_auth(m, &Audience::CENTER, NOW)?;
        Ok(())
    })?;
    rows.push(rate_row(
        "center verify AUTH, seed from SQLite + unseal (cache off), 1 thread",
        timing::per_second(cold),
        "/s",
        ">= 200,000 /s",
        Some(200_000.0),
        "verify_rate; criterion center/verify_auth/cold",
    ));
    drop(cold_center);
    drop(fleet);

    let (big, took) = Fleet::new_timed(import_devices, warm_config())?;
    let import_rate = import_devices as f64 / took.as_secs_f64();
    rows.push(rate_row(
        "import into SQLite (factory batch, `import_batch`, pipelined over the cores)",
        import_rate,
        "seeds/s",
        ">= 50,000 seeds/s",
        Some(50_000.0),
        "verify_rate (MC_BENCH_IMPORT devices); throughput import-only",
    ));
    let memory = memory(&big)?;
    rows.push(Row {
        figure: "node stack while issuing AUTH (Cortex-M4, static bound)",
        value: format!("{NODE_STACK_AUTH} B"),
        per_second: None,
        target: "< 1,024 B",
        met: Some(NODE_STACK_AUTH < 1024),
        command: "quoted from crates/microcert-node/size-check/measure.sh (2026-12-02)",
    });
    rows.push(Row {
        figure: "AUTH over CoAP, server and generator on the same cores",
        value: "printed by `microcert bench`".into(),
        per_second: None,
        target: ">= 100,000 /s, p99 < 2 ms",
        met: None,
        command: "microcert bench --coap ... against serve --dev",
    });
    Ok(Report {
        ecdsa_ns: cmp.ecdsa_ns,
        rows,
        memory: Some(memory),
    })
}

/// The memory figures on a freshly imported fleet, from resident memory.
/// Two more centers on the same database (each with its own SQLite
/// connection and page cache; in one process they share the replay guard)
/// make one pass each: the one with the seed cache off grows by its page
/// cache and n replay keys, the one with it on by the same plus n cached
/// devices; the difference is the cache. Two more passes of the warm
/// center then add 2n replay keys and nothing else.
fn memory(big: &Fleet) -> Result<Memory, BoxError> {
    let n = big.devices;
    let mut maker = AuthMaker::new(n);
    // Activation pass on the import's center (each activation drops the
    // device from that center's cache again).
    pass(&big.center, &mut maker, n)?;
    let cold = big.another_center(fleet::cold_config())?;
    let warm = big.another_center(warm_config())?;
    let r0 = rss_bytes();
    pass(&cold, &mut maker, n)?;
    let r1 = rss_bytes();
    pass(&warm, &mut maker, n)?;
    let cached = warm.cached_devices() as u64;
    let r2 = rss_bytes();
    pass(&warm, &mut maker, 2 * n)?;
    let r3 = rss_bytes();
    let replay_rss = r3.saturating_sub(r2) as f64 / (2 * n) as f64;
    let cold_growth = r1.saturating_sub(r0) as f64;
    let warm_growth = r2.saturating_sub(r1) as f64;
    let cache_rss = (warm_growth - cold_growth).max(0.0) / cached.max(1) as f64;
    Ok(Memory {
        devices: cached,
        cache_model: memory_model::cache_bytes_per_device(1),
        cache_rss,
        replay_model: memory_model::replay_bytes_per_message(),
        replay_rss,
        replay_live_per_device: replay_window_secs() * AUTH_PER_MINUTE,
    })
}

fn mib(b: f64) -> String {
    format!("{:.0} MiB", b / (1024.0 * 1024.0))
}

impl Report {
    /// The table, as Markdown (pasted into docs/benchmarks.md as is).
    pub fn table(&self) -> String {
        let ecdsa_rate = timing::per_second(self.ecdsa_ns);
        let mut out = String::new();
        out.push_str(&format!(
            "ECDSA P-256 verify (ring), same run: {} /s ({:.0} ns)\n\n",
            timing::grouped(ecdsa_rate),
            self.ecdsa_ns
        ));
        out.push_str("| figure | value | target | met? | x ECDSA verify | command |\n");
        out.push_str("| --- | --- | --- | --- | --- | --- |\n");
        for r in &self.rows {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "-",
            };
            let x = r
                .per_second
                .map_or_else(|| "-".to_string(), |p| format!("{:.1}x", p / ecdsa_rate));
            out.push_str(&format!(
                "| {} | {} | {} | {met} | {x} | {} |\n",
                r.figure, r.value, r.target, r.command
            ));
        }
        let core = self.rows.first().and_then(|r| r.per_second).unwrap_or(0.0);
        let ratio = core / ecdsa_rate;
        out.push_str(&format!(
            "| ECDSA P-256 verify / core verify_auth | {ratio:.0}x | >= {:.0}x | {} | - | verify_rate; cargo bench --bench core |\n",
            ratio::TARGET_RATIO,
            if ratio >= ratio::TARGET_RATIO {
                "yes"
            } else {
                "**no**"
            }
        ));
        if let Some(m) = &self.memory {
            out.push_str(&format!(
                "\nmemory, {} devices cached: warm cache {:.0} B/device measured (model {} B from struct sizes); \
                 replay guard {:.0} B/accepted message measured (model {} B); \
                 at {} devices: cache {} all warm; replay guard {} at one AUTH per device per minute \
                 ({:.1} live messages per device)\n",
                m.devices,
                m.cache_rss,
                m.cache_model,
                m.replay_rss,
                m.replay_model,
                timing::grouped(FLEET_1M as f64),
                mib(m.cache_1m()),
                mib(m.replay_1m()),
                m.replay_live_per_device,
            ));
        }
        out
    }
}

/// The import run's size: `MC_BENCH_IMPORT` or [`IMPORT_DEVICES`].
pub fn import_devices_from_env() -> u64 {
    std::env::var("MC_BENCH_IMPORT")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(IMPORT_DEVICES)
}
