//! The key database backends the integration tests run against: SQLite
//! files in the test's directory, and a throw-away PostgreSQL cluster on
//! 127.0.0.1 started once per test binary (a fresh database per test).
//!
//! PostgreSQL is found under /usr/lib/postgresql/*/bin or on PATH. When it
//! is missing, a PostgreSQL test prints why it skipped, unless CI is set:
//! then a missing server fails the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Which key database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// A new, empty database of this backend, named for the test: an
    /// SQLite path in `dir`, or the URL of a fresh PostgreSQL database.
    pub fn location(self, dir: &Path, name: &str) -> String {
        match self {
            Backend::Sqlite => dir.join(name).to_string_lossy().into_owned(),
            Backend::Postgres => pg_server()
                .expect("PostgreSQL server (the test should have skipped)")
                .fresh_database(name),
        }
    }
}

/// Whether CI is set (then a missing PostgreSQL is a failure).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The PostgreSQL backend when a server can be started; None (with a
/// message saying why) when PostgreSQL is not installed outside CI.
pub fn postgres() -> Option<Backend> {
    pg_server().map(|_| Backend::Postgres)
}

/// Generates, for each test function `name(backend: Backend)`, a module
/// `name` with the tests `sqlite` and `postgres`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn sqlite() {
                    super::$name($crate::common::Backend::Sqlite);
                }
                #[test]
                fn postgres() {
                    if let Some(b) = $crate::common::postgres() {
                        super::$name(b);
                    }
                }
            }
        )*
    };
}

/// A running throw-away PostgreSQL cluster.
pub struct PgServer {
    pub port: u16,
    pub data: PathBuf,
    bin: PathBuf,
    /// Run the server's programs as this user (PostgreSQL refuses root).
    runas: Option<String>,
    next: AtomicU32,
    /// The `pg_ctl -o` options and log file it was started with (for a
    /// restart on the same port).
    opts: String,
    log: PathBuf,
}

static SERVER: OnceLock<Option<PgServer>> = OnceLock::new();

/// The shared server of this test binary, started on first use.
pub fn pg_server() -> Option<&'static PgServer> {
    SERVER
        .get_or_init(|| match find_bin() {
            Some(bin) => Some(PgServer::start(bin)),
            None if in_ci() => panic!(
                "CI is set but PostgreSQL is not installed (no initdb under \
                 /usr/lib/postgresql/*/bin or on PATH): .ci/run must install it"
            ),
            None => {
                eprintln!(
                    "SKIPPED: PostgreSQL backend tests: PostgreSQL is not installed \
                     (apt-get install postgresql); set CI=true to make this a failure"
                );
                None
            }
        })
        .as_ref()
}

fn find_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
        .collect();
    found.sort();
    if let Some(b) = found.pop() {
        return Some(b);
    }
    let out = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    p.parent()
        .filter(|d| out.status.success() && d.join("pg_ctl").exists())
        .map(Path::to_path_buf)
}

fn free_port() -> u16 {
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
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgServer {
    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        run_as(&self.runas, &self.bin.join(program), args)
    }

    fn start(bin: PathBuf) -> PgServer {
        Self::start_with(bin, None)
    }

    /// Starts a cluster; with `tls` (certificate and key PEM) it serves
    /// TLS (`ssl=on`) with them.
    fn start_with(bin: PathBuf, tls: Option<(String, String)>) -> PgServer {
        let root = std::env::temp_dir().join(format!(
            "microcert-pg-{}-{}",
            std::process::id(),
            free_port()
        ));
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
            bin,
            runas,
            next: AtomicU32::new(0),
            opts: String::new(),
            log: root.join("log"),
        };
        let out = server.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-N",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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
                    assert!(ok);
                }
            }
            ssl = "-c ssl=on".to_string();
        }
        // A port taken between free_port and the server's bind: try again.
        for _ in 0..5 {
            let port = free_port();
            // Tests trade durability for speed (the server is not what they
            // kill); MC_PG_DURABLE=1 keeps PostgreSQL's defaults (fsync on),
            // for measurements.
            let fast = if std::env::var("MC_PG_DURABLE").is_ok_and(|v| v == "1") {
                ""
            } else {
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            };
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 {fast} -c max_connections=300 {ssl}",
                root.display()
            );
            let log = root.join("log");
            let out = server.run(
                "pg_ctl",
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-o",
                    &opts,
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "start",
                ],
            );
            if out.status.success() {
                server.port = port;
                server.opts = opts;
                break;
            }
        }
        assert_ne!(
            server.port,
            0,
            "PostgreSQL did not start; see {}",
            root.display()
        );
        server.watch(&root);
        server
    }

    /// Stops the server and removes its files once this test process has
    /// exited (a static is never dropped, so a watchdog does it).
    #[allow(clippy::zombie_processes)] // it must outlive this process, never waited for
    fn watch(&self, root: &Path) {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = match &self.runas {
            Some(u) => format!(
                "runuser -u {u} -- {} -D {} -m immediate stop",
                pg_ctl.display(),
                self.data.display()
            ),
            None => format!(
                "{} -D {} -m immediate stop",
                pg_ctl.display(),
                self.data.display()
            ),
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; {stop}; rm -rf {root}",
            pid = std::process::id(),
            root = root.display()
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

    /// Creates an empty database and returns its URL.
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
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs SQL with psql on a database of this server.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let out = run_as(
            &None,
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

fn run_as(user: &Option<String>, program: &Path, args: &[&str]) -> std::process::Output {
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

/// Runs an UPDATE against the database at `location` from outside the
/// center (a tamper test's edit) and returns the number of rows changed.
/// `{id}` in the SQL is replaced by the byte string literal of `id` in the
/// backend's syntax.
pub fn raw_update(location: &str, sql: &str, id: &[u8]) -> usize {
    let hexid = hex::encode(id);
    if microcert_center::db::is_postgres_url(location) {
        let sql = sql.replace("{id}", &format!("'\\x{hexid}'::bytea"));
        let db = location.rsplit('/').next().unwrap();
        let out = pg_server().unwrap().psql(db, &format!("{sql} RETURNING 1"));
        out.lines().filter(|l| !l.trim().is_empty()).count()
    } else {
        let sql = sql.replace("{id}", &format!("X'{hexid}'"));
        let conn = rusqlite::Connection::open(location).unwrap();
        conn.execute(&sql, []).unwrap()
    }
}

/// A cluster of a test's own (not the binary's shared one), for a test
/// that stops and starts the server or needs TLS. None (with a message)
/// when PostgreSQL is not installed outside CI.
pub fn private_pg_server(tls: Option<(String, String)>) -> Option<PgServer> {
    pg_server()?;
    find_bin().map(|bin| PgServer::start_with(bin, tls))
}

impl PgServer {
    /// `pg_ctl stop -m fast`: the server closes every connection and exits.
    pub fn stop(&self) {
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the stopped server again on the same port.
    pub fn start_again(&self) {
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-o",
                &self.opts,
                "-l",
                self.log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
