//! The shared test kit of the microcert workspace (not published).
//!
//! - [`skip`]: the one rule for a test whose tool is missing: skip with a
//!   printed reason, or fail when `CI` is set.
//! - [`process`]: the real `microcert` binary, run as a command or served
//!   on ephemeral loopback ports, stopped cleanly or killed.
//! - [`postgres`]: a throw-away PostgreSQL cluster on 127.0.0.1.
//! - [`softhsm`]: SoftHSM2 tokens in a directory of their own.
//! - [`nodes`]: test nodes (made from the core's functions, with
//!   deterministic seeds), fleets of them, and software chips.
//!
//! Each crate's old helper modules (`tests/common`, `tests/harness`)
//! re-export these under the names their tests use.

pub mod nodes;
pub mod postgres;
pub mod process;
pub mod skip;
pub mod softhsm;
