//! Every performance figure of issue 16 beside its target and beside ECDSA
//! P-256 verification measured in the same process, single thread, in
//! about ten seconds, without criterion:
//!
//! ```text
//! cargo run --release -p microcert-bench --example verify_rate
//! MC_BENCH_IMPORT=20000 cargo run --release -p microcert-bench --example verify_rate
//! ```
//!
//! Prints a Markdown table (docs/benchmarks.md, "Round two"): core
//! `verify_auth`, the center warm (with the RECEIPT, and without it for a
//! relying party), the center cold (seed read from SQLite and unsealed
//! every time), the import rate, the node's stack (quoted from its static
//! analysis), the ECDSA ratio, and the memory per device of the seed cache
//! and the replay guard. AUTH over CoAP is printed by `microcert bench`.

use microcert_bench::fleet;
use microcert_bench::targets;

fn main() -> Result<(), fleet::BoxError> {
    let report = targets::measure(targets::import_devices_from_env())?;
    print!("{}", report.table());
    Ok(())
}
