//! The real `microcert` binary: commands with a clean environment, and
//! `microcert serve` on ephemeral loopback ports that a test stops cleanly
//! (SIGTERM) or kills (SIGKILL) at will.
//!
//! The binary's path is known only to the test crate that builds it
//! (`env!("CARGO_BIN_EXE_microcert")`), so the test names it once through
//! a [`Binary`] and uses the kit's types at that binary:
//!
//! ```ignore
//! struct Microcert;
//! impl microcert_testkit::process::Binary for Microcert {
//!     const EXE: &'static str = env!("CARGO_BIN_EXE_microcert");
//!     const PASSPHRASE: &'static str = "test passphrase";
//! }
//! type Server = microcert_testkit::process::Server<Microcert>;
//! ```

use std::io::{BufRead, BufReader};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The program under test and the card passphrase its commands use.
pub trait Binary {
    /// Path of the executable.
    const EXE: &'static str;
    /// `MICROCERT_PASSPHRASE` of every command.
    const PASSPHRASE: &'static str;
}

/// The binary with a clean environment (no operator variables inherited).
pub fn bin<B: Binary>() -> Command {
    let mut c = Command::new(B::EXE);
    c.env("MICROCERT_PASSPHRASE", B::PASSPHRASE)
        .env_remove("MICROCERT_DATA")
        .env_remove("MICROCERT_TOKEN")
        .env_remove("MICROCERT_SERVER")
        .env_remove("MICROCERT_DATABASE")
        .env_remove("MICROCERT_CONFIG");
    c
}

/// Runs a command; it must succeed.
#[track_caller]
pub fn must(cmd: &mut Command, args: &[&str]) -> Output {
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "microcert {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command with extra environment; it must succeed.
#[track_caller]
pub fn run_with<B: Binary>(args: &[&str], env: &[(&str, &str)]) -> Output {
    must(bin::<B>().envs(env.iter().copied()), args)
}

/// Runs a command that may fail.
pub fn try_run<B: Binary>(args: &[&str]) -> Output {
    bin::<B>().args(args).output().unwrap()
}

/// Standard output, trimmed.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Standard error, trimmed.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_owned()
}

/// A `microcert serve` process on loopback. Dropped: SIGTERM, then SIGKILL
/// after 10 s.
#[derive(Debug)]
pub struct Server<B: Binary> {
    pub child: Child,
    /// `http://127.0.0.1:P`.
    pub http: String,
    pub coap: SocketAddr,
    binary: PhantomData<B>,
}

impl<B: Binary> Server<B> {
    pub fn start(data: &Path) -> Self {
        Self::start_with(data, &[], &[])
    }

    pub fn start_with(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = bin::<B>()
            .args(["serve", "--data"])
            .arg(data)
            .args(["--http", "127.0.0.1:0", "--coap", "127.0.0.1:0"])
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "microcert serving http=127.0.0.1:P coap=127.0.0.1:Q"
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .to_owned()
        };
        Server {
            http: format!("http://{}", field("http=")),
            coap: field("coap=").parse().unwrap(),
            child,
            binary: PhantomData,
        }
    }

    /// SIGKILL, as a crash or a power loss would stop it.
    pub fn kill(mut self) {
        self.kill9();
    }

    /// SIGKILL without giving the value up (dropping it later does
    /// nothing more).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the clean shutdown to finish.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return; // already gone: its pid may be someone else's now
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Resident memory of the process in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl<B: Binary> Drop for Server<B> {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A data directory with a software card, an operator and a verifier
/// token, and `count` chips provisioned (class 1) into `DIR/chips/chips.jsonl`.
#[derive(Debug)]
pub struct Setup<B: Binary> {
    pub dir: tempfile::TempDir,
    pub operator: String,
    pub verifier: String,
    binary: PhantomData<B>,
}

impl<B: Binary> Setup<B> {
    pub fn new(count: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let d = data.to_str().unwrap();
        run_with::<B>(&["card", "init", "--data", d], &[]);
        let token = |role: &str, name: &str| {
            let args = ["token", "create", "--data", d, "--role", role];
            stdout(&run_with::<B>(
                &[&args[..], &["--name", name]].concat(),
                &[],
            ))
        };
        let operator = token("operator", "alice");
        let verifier = token("verifier", "billing.example");
        let out = dir.path().join("chips");
        let count = count.to_string();
        run_with::<B>(
            &[
                "factory",
                "provision",
                "--data",
                d,
                "--count",
                &count,
                "--class",
                "1",
                "--out",
                out.to_str().unwrap(),
            ],
            &[],
        );
        Setup {
            dir,
            operator,
            verifier,
            binary: PhantomData,
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn chips(&self) -> PathBuf {
        self.dir.path().join("chips").join("chips.jsonl")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

/// Sends one datagram and waits (bounded) for one answer.
pub fn udp_exchange(to: SocketAddr, datagram: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.send_to(datagram, to).unwrap();
    let mut buf = [0u8; 2048];
    match s.recv_from(&mut buf) {
        Ok((n, _)) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}
