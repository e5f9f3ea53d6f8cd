//! A process harness shared by the suites of the real binary
//! (`tests/attacks_*.rs`, e2e, multi_center): the test kit's
//! (`microcert_testkit::process`) at the `microcert` binary this crate
//! builds, started on ephemeral loopback ports, that a test can stop
//! cleanly (SIGTERM) or kill (SIGKILL) at will.
//!
//! Each suite includes it with `mod harness;`; not every suite uses every
//! helper.
#![allow(dead_code, unused_imports)]

// The imports the harness had before the kit, kept so that helpers
// appended to this file compile unchanged.
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use microcert_testkit::process::{stderr, stdout, udp_exchange};
pub use microcert_testkit::skip::{in_ci, require_tool, skip};

pub const PASSPHRASE: &str = "attack test passphrase";

/// The binary this crate builds, for the kit's types.
#[derive(Debug)]
pub struct Microcert;

impl microcert_testkit::process::Binary for Microcert {
    const EXE: &'static str = env!("CARGO_BIN_EXE_microcert");
    const PASSPHRASE: &'static str = PASSPHRASE;
}

/// A `microcert serve` process on loopback (`Server::start`,
/// `start_with`, `kill`, `stop`, `rss_kib`). Dropped: SIGTERM, then
/// SIGKILL after 10 s.
pub type Server = microcert_testkit::process::Server<Microcert>;

/// A data directory with a software card, an operator and a verifier
/// token, and `count` chips provisioned (class 1) into `DIR/chips/chips.jsonl`.
pub type Setup = microcert_testkit::process::Setup<Microcert>;

/// The binary with a clean environment (no operator variables inherited).
pub fn bin() -> Command {
    microcert_testkit::process::bin::<Microcert>()
}

/// Runs a command that must succeed.
pub fn run(args: &[&str]) -> Output {
    run_with(args, &[])
}

/// Runs a command with extra environment; it must succeed.
pub fn run_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    microcert_testkit::process::run_with::<Microcert>(args, env)
}

/// Runs a command that may fail.
pub fn try_run(args: &[&str]) -> Output {
    microcert_testkit::process::try_run::<Microcert>(args)
}
