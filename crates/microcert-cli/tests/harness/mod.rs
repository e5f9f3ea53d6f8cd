//! A process harness shared by the attack suites (`tests/attacks_*.rs`):
//! the real `microcert` binary, started on ephemeral loopback ports, that a
//! test can stop cleanly (SIGTERM) or kill (SIGKILL) at will.
//!
//! Each suite includes it with `mod harness;`; not every suite uses every
//! helper.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const PASSPHRASE: &str = "attack test passphrase";

/// The binary with a clean environment (no operator variables inherited).
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_microcert"));
    c.env("MICROCERT_PASSPHRASE", PASSPHRASE)
        .env_remove("MICROCERT_DATA")
        .env_remove("MICROCERT_TOKEN")
        .env_remove("MICROCERT_SERVER")
        .env_remove("MICROCERT_DATABASE")
        .env_remove("MICROCERT_CONFIG");
    c
}

/// Runs a command that must succeed.
pub fn run(args: &[&str]) -> Output {
    run_with(args, &[])
}

/// Runs a command with extra environment; it must succeed.
pub fn run_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = bin().args(args).envs(env.iter().copied()).output().unwrap();
    assert!(
        out.status.success(),
        "microcert {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command that may fail.
pub fn try_run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_owned()
}

/// A `microcert serve` process on loopback. Dropped: SIGTERM, then SIGKILL
/// after 10 s.
pub struct Server {
    pub child: Child,
    pub http: String,
    pub coap: SocketAddr,
}

impl Server {
    pub fn start(data: &Path) -> Server {
        Server::start_with(data, &[], &[])
    }

    pub fn start_with(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = bin()
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
        }
    }

    /// SIGKILL, as a crash or a power loss would stop it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }

    /// SIGTERM and wait for the clean shutdown to finish.
    pub fn stop(mut self) {
        self.terminate();
        std::mem::forget(self);
    }

    fn terminate(&mut self) {
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

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A data directory with a software card, an operator and a verifier
/// token, and `count` chips provisioned (class 1) into `DIR/chips/chips.jsonl`.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub operator: String,
    pub verifier: String,
}

impl Setup {
    pub fn new(count: u32) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        run(&["card", "init", "--data", data.to_str().unwrap()]);
        let token = |role: &str, name: &str| {
            stdout(&run(&[
                "token",
                "create",
                "--data",
                data.to_str().unwrap(),
                "--role",
                role,
                "--name",
                name,
            ]))
        };
        let operator = token("operator", "alice");
        let verifier = token("verifier", "billing.example");
        let out = dir.path().join("chips");
        run(&[
            "factory",
            "provision",
            "--data",
            data.to_str().unwrap(),
            "--count",
            &count.to_string(),
            "--class",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]);
        Setup {
            dir,
            operator,
            verifier,
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
