//! Runs one center path N times and nothing else, for profilers:
//!
//! ```text
//! cargo build --release -p microcert-bench --example center_loop
//! MICROCERT_BENCH_DIR=/dev/shm perf record -e cpu-clock --call-graph dwarf \
//!     target/release/examples/center_loop warm 20000
//! ```
//!
//! Modes: `warm` (seed cache on), `cold` (cache off), `import` (N seeds
//! imported into a fresh database). Instruction counts of the verification
//! alone (the AUTHs are made first, outside `verify_all`):
//!
//! ```text
//! MICROCERT_BENCH_DIR=/dev/shm valgrind --tool=callgrind --toggle-collect='*verify_all*' \
//!     --callgrind-out-file=/tmp/cg.warm target/release/examples/center_loop warm 5000
//! callgrind_annotate --inclusive=yes /tmp/cg.warm
//! ```

use microcert_bench::fleet::{self, AuthMaker, Fleet, NOW};
use microcert_center::{Center, CenterConfig};
use microcert_core::Audience;

const DEVICES: u64 = 1000;

/// Verifies `n` fresh AUTHs, made before any is verified, so that a
/// profiler can count only [`verify_all`]:
/// `valgrind --tool=callgrind --toggle-collect='*verify_all*' ...`.
fn verify_n(center: &Center, maker: &mut AuthMaker, n: u64) -> Result<(), fleet::BoxError> {
    let mut pool = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let mut buf = [0u8; 64];
        let len = maker.next_auth(&mut buf)?;
        pool.push((buf, len));
    }
    verify_all(center, &pool)
}

/// One AUTH per device, outside [`verify_all`].
fn warm_up(center: &Center, maker: &mut AuthMaker) -> Result<(), fleet::BoxError> {
    let mut buf = [0u8; 64];
    for _ in 0..DEVICES {
        let len = maker.next_auth(&mut buf)?;
        center.verify_auth(&buf[..len], &Audience::CENTER, NOW)?;
    }
    Ok(())
}

#[inline(never)]
fn verify_all(center: &Center, pool: &[([u8; 64], usize)]) -> Result<(), fleet::BoxError> {
    for (buf, len) in pool {
        center.verify_auth(&buf[..*len], &Audience::CENTER, NOW)?;
    }
    Ok(())
}

fn main() -> Result<(), fleet::BoxError> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "warm".into());
    let n: u64 = std::env::args().nth(2).map_or(Ok(10_000), |a| a.parse())?;
    match mode.as_str() {
        "import" => {
            Fleet::new(n, CenterConfig::default())?;
        }
        "warm" | "cold" => {
            let config = CenterConfig {
                cache_ttl_secs: 3600,
                ..CenterConfig::default()
            };
            let fleet = Fleet::new(DEVICES, config)?;
            let mut maker = AuthMaker::new(DEVICES);
            // The first AUTH of each device activates its seed (a
            // transaction); the second fills the cache. Neither is counted.
            warm_up(&fleet.center, &mut maker)?;
            warm_up(&fleet.center, &mut maker)?;
            if mode == "warm" {
                verify_n(&fleet.center, &mut maker, n)?;
            } else {
                let cold = fleet.another_center(fleet::cold_config())?;
                verify_n(&cold, &mut maker, n)?;
            }
        }
        other => return Err(format!("unknown mode {other}: warm, cold or import").into()),
    }
    println!("{mode}: {n} done");
    Ok(())
}
