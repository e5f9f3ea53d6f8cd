//! A throw-away PostgreSQL cluster on 127.0.0.1: `initdb` and `pg_ctl` in
//! a temporary directory, on a free port, trust authentication for the
//! user `postgres`. PostgreSQL is found under /usr/lib/postgresql/*/bin or
//! on PATH; when it is missing the [`crate::skip`] rule applies.
//!
//! [`PgServer::start`] gives a server of the test's own, stopped (and its
//! files removed) when dropped; [`shared`] gives one server per test
//! binary, started on first use and stopped by a watchdog once the test
//! process has exited (a static is never dropped).
//!
//! Tests trade durability for speed (the server is not what they kill):
//! `MC_PG_DURABLE=1` keeps PostgreSQL's defaults (fsync on), for
//! measurements.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::skip;

/// A running throw-away PostgreSQL cluster.
#[derive(Debug)]
pub struct PgServer {
    pub port: u16,
    /// The cluster's data directory.
    pub data: PathBuf,
    root: PathBuf,
    bin: PathBuf,
    /// Run the server's programs as this user (PostgreSQL refuses root).
    runas: Option<String>,
    next: AtomicU32,
    /// Stopped by `Drop` (false: by the watchdog of [`shared`]).
    owned: bool,
    /// The `pg_ctl -o` options and the log file it was started with (for
    /// [`PgServer::start_again`] on the same port).
    opts: String,
    log: PathBuf,
}

/// The shared server of this test binary, started on first use; None
/// (after the skip rule) when PostgreSQL is not installed.
pub fn shared() -> Option<&'static PgServer> {
    static SERVER: OnceLock<Option<PgServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let bin = skip::require("PostgreSQL tests", find_bin())?;
            let server = PgServer::launch(bin, false, None);
            server.watch();
            Some(server)
        })
        .as_ref()
}

/// The directory of `initdb`, `pg_ctl` and `psql`, or why there is none.
pub fn find_bin() -> Result<PathBuf, String> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
        .collect();
    found.sort();
    if let Some(b) = found.pop() {
        return Ok(b);
    }
    let missing = || {
        "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin \
         or on PATH; apt-get install postgresql)"
            .to_owned()
    };
    let out = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .map_err(|_| missing())?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    p.parent()
        .filter(|d| out.status.success() && d.join("pg_ctl").exists())
        .map(Path::to_path_buf)
        .ok_or_else(missing)
}

/// A free TCP port on 127.0.0.1 (free when asked).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run_as(user: Option<&str>, program: &Path, args: &[&str]) -> Output {
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

impl PgServer {
    /// A server of this test's own (stopped when dropped), with the empty
    /// databases `databases`; None (after the skip rule) when PostgreSQL
    /// is not installed.
    pub fn start(databases: &[&str]) -> Option<PgServer> {
        PgServer::start_tls(databases, None)
    }

    /// Like [`PgServer::start`], serving TLS (`ssl=on`) with `tls`
    /// (certificate and key, PEM) when given.
    pub fn start_tls(databases: &[&str], tls: Option<(String, String)>) -> Option<PgServer> {
        let bin = skip::require("PostgreSQL tests", find_bin())?;
        let server = PgServer::launch(bin, true, tls);
        for db in databases {
            server.create_database(db);
        }
        Some(server)
    }

    /// `pg_ctl stop -m fast`: the server closes every connection and exits.
    pub fn stop(&self) {
        let d = self.data.to_str().unwrap();
        let out = self.run("pg_ctl", &["-D", d, "-m", "fast", "-w", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the stopped server again on the same port.
    pub fn start_again(&self) {
        let d = self.data.to_str().unwrap();
        let log = self.log.to_str().unwrap();
        let out = self.run(
            "pg_ctl",
            &["-D", d, "-o", &self.opts, "-l", log, "-w", "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        run_as(self.runas.as_deref(), &self.bin.join(program), args)
    }

    fn launch(bin: PathBuf, owned: bool, tls: Option<(String, String)>) -> PgServer {
        let root = std::env::temp_dir().join(format!(
            "microcert-pg-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let runas = is_root().then(|| "postgres".to_string());
        if let Some(u) = &runas {
            let ok = Command::new("chown")
                .args([&format!("{u}:"), root.to_str().unwrap()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "cannot give {} to user {u}", root.display());
        }
        let data = root.join("data");
        let mut server = PgServer {
            port: 0,
            data: data.clone(),
            root,
            bin,
            runas,
            next: AtomicU32::new(0),
            owned,
            opts: String::new(),
            log: PathBuf::new(),
        };
        let d = data.to_str().unwrap();
        let out = server.run("initdb", &["-D", d, "-U", "postgres", "--auth=trust", "-N"]);
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let fast = if std::env::var("MC_PG_DURABLE").is_ok_and(|v| v == "1") {
            ""
        } else {
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        };
        let mut ssl = String::new();
        if let Some((cert, key)) = &tls {
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = data.join(name);
                std::fs::write(&path, pem).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
                if let Some(u) = &server.runas {
                    let ok = Command::new("chown")
                        .args([&format!("{u}:"), path.to_str().unwrap()])
                        .status()
                        .unwrap()
                        .success();
                    assert!(ok, "cannot give {} to user {u}", path.display());
                }
            }
            ssl = "-c ssl=on".to_string();
        }
        let log = server.root.join("log");
        server.log = log.clone();
        // A port taken between free_port and the server's bind: try again.
        for _ in 0..5 {
            let port = free_port();
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 {fast} -c max_connections=300 {ssl}",
                server.root.display()
            );
            let args = ["-D", d, "-o", &opts, "-l", log.to_str().unwrap()];
            if server
                .run("pg_ctl", &[&args[..], &["-w", "start"]].concat())
                .status
                .success()
            {
                server.port = port;
                server.opts = opts;
                break;
            }
        }
        assert_ne!(
            server.port,
            0,
            "PostgreSQL did not start; see {}",
            server.root.display()
        );
        server
    }

    fn stop_command(&self) -> String {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = format!(
            "{} -D {} -m immediate stop",
            pg_ctl.display(),
            self.data.display()
        );
        match &self.runas {
            Some(u) => format!("runuser -u {u} -- {stop}"),
            None => stop,
        }
    }

    /// Stops the server and removes its files once this test process has
    /// exited.
    #[allow(clippy::zombie_processes)] // it must outlive this process, never waited for
    fn watch(&self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; {stop}; rm -rf {root}",
            pid = std::process::id(),
            stop = self.stop_command(),
            root = self.root.display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("watchdog shell");
    }

    /// The URL of a database on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates the empty database `name`.
    pub fn create_database(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
    }

    /// Creates an empty database named after `hint` and returns its URL.
    pub fn fresh_database(&self, hint: &str) -> String {
        let clean: String = hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(30)
            .collect();
        let name = format!(
            "t{}_{}_{clean}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::SeqCst)
        );
        self.create_database(&name);
        self.url(&name)
    }

    /// Runs SQL with psql on a database of this server; its output
    /// (unaligned, tuples only). The SQL must succeed.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let out = run_as(
            None,
            &self.bin.join("psql"),
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ],
        );
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.owned {
            let _ = Command::new("sh")
                .args(["-c", &self.stop_command()])
                .current_dir("/")
                .stdin(Stdio::null())
                .output();
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}
