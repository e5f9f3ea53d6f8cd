//! Runs one center path N times and nothing else, for profilers:
//!
//! ```text
//! cargo build --release -p microcert-bench --example center_loop
//! MICROCERT_BENCH_DIR=/dev/shm perf record -e cpu-clock --call-graph dwarf \
//!     target/release/examples/center_loop warm 20000
//! ```
//!
//! Modes: `warm` (seed cache on), `cold` (cache off), `import` (N seeds
//! imported into a fresh database).

use microcert_bench::fleet::{self, AuthMaker, Fleet, NOW};
use microcert_center::{Center, CenterConfig};
use microcert_core::Audience;

const DEVICES: u64 = 1000;

fn verify_n(center: &Center, maker: &mut AuthMaker, n: u64) -> Result<(), fleet::BoxError> {
    let mut buf = [0u8; 64];
    for _ in 0..n {
        let len = maker.next_auth(&mut buf)?;
        center.verify_auth(&buf[..len], &Audience::CENTER, NOW)?;
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
            if mode == "warm" {
                verify_n(&fleet.center, &mut maker, DEVICES)?;
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
