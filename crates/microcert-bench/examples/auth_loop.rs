//! Verifies one AUTH (suite 0x01, seed in memory) N times and nothing
//! else: a steady target for profilers.
//!
//! ```text
//! cargo build --release -p microcert-bench --example auth_loop
//! valgrind --tool=callgrind target/release/examples/auth_loop 100000
//! perf record -g target/release/examples/auth_loop 5000000
//! ```

use std::hint::black_box;

use microcert_bench::fixtures;
use microcert_core::{Audience, Auth, Suite, verify_auth};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => 1_000_000,
    };
    let seed = fixtures::seed();
    let msg = fixtures::auth(Suite::CMAC64)?;
    let mut ok = 0u64;
    for _ in 0..n {
        let m = Auth::decode(black_box(msg.bytes()))?;
        ok += u64::from(verify_auth(&seed, &m, &Audience::CENTER).is_ok());
    }
    println!("{ok} of {n} verified");
    Ok(())
}
