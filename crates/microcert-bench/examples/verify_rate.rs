//! A quick check of verification rates on one core (single thread), in a
//! few seconds, without criterion:
//!
//! ```text
//! cargo run --release -p microcert-bench --example verify_rate
//! ```
//!
//! Prints AUTH verifications per second for the core alone (seed in
//! memory), for the center with its seed cache warm and with it off, and
//! the ECDSA P-256 baseline beside them.

use std::time::Instant;

use microcert_bench::fleet::{self, AuthMaker, Fleet, NOW};
use microcert_bench::{ratio, timing};
use microcert_center::{Center, CenterConfig};
use microcert_core::Audience;

const DEVICES: u64 = 1000;

/// AUTHs per second of `center` over `n` pre-made fresh messages.
fn center_rate(center: &Center, maker: &mut AuthMaker, n: usize) -> Result<f64, fleet::BoxError> {
    let mut pool = Vec::with_capacity(n);
    for _ in 0..n {
        let mut buf = [0u8; 64];
        let len = maker.next_auth(&mut buf)?;
        pool.push((buf, len));
    }
    let start = Instant::now();
    for (buf, len) in &pool {
        center.verify_auth(&buf[..*len], &Audience::CENTER, NOW)?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn main() -> Result<(), fleet::BoxError> {
    let cmp = ratio::measure(21).map_err(|e| e.to_string())?;
    println!("single thread, one core:");
    println!(
        "  core verify_auth (suite 0x01, seed in memory): {:>12} /s  (target >= 1,000,000 warm)",
        timing::grouped(timing::per_second(cmp.auth_ns))
    );
    println!(
        "  ECDSA P-256 verify (ring):                      {:>12} /s  ({:.0}x slower, target >= 40x)",
        timing::grouped(timing::per_second(cmp.ecdsa_ns)),
        cmp.ratio()
    );

    let fleet = Fleet::new(
        DEVICES,
        CenterConfig {
            cache_ttl_secs: 3600,
            ..CenterConfig::default()
        },
    )?;
    let mut maker = AuthMaker::new(DEVICES);
    // First pass fills the cache; the second is the warm figure.
    center_rate(&fleet.center, &mut maker, DEVICES as usize)?;
    let warm = center_rate(&fleet.center, &mut maker, 4000)?;
    let cold_center = fleet.another_center(fleet::cold_config())?;
    let cold = center_rate(&cold_center, &mut maker, 2000)?;
    println!(
        "  center verify_auth, seed cache warm:            {:>12} /s  (target >= 1,000,000)",
        timing::grouped(warm)
    );
    println!(
        "  center verify_auth, cache off (SQLite+unseal):  {:>12} /s  (target >= 200,000)",
        timing::grouped(cold)
    );
    println!("  database: {}", fleet.dir.path().display());
    Ok(())
}
