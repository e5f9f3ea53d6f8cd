//! The key database backends the integration tests run against: SQLite
//! files in the test's directory, and the test kit's throw-away PostgreSQL
//! cluster on 127.0.0.1 (`microcert_testkit::postgres`), started once per
//! test binary (a fresh database per test).
//!
//! When PostgreSQL is missing, a PostgreSQL test follows the kit's skip
//! rule: it prints why it skipped, unless CI is set: then it fails.

use std::path::Path;
// The imports this module had before the kit, kept so that helpers
// appended to it compile unchanged.
#[allow(unused_imports)]
use std::path::PathBuf;
#[allow(unused_imports)]
use std::process::{Command, Stdio};
#[allow(unused_imports)]
use std::sync::OnceLock;
#[allow(unused_imports)]
use std::sync::atomic::{AtomicU32, Ordering};

#[allow(unused_imports)] // not every test binary reaches the server itself
pub use microcert_testkit::postgres::{PgServer, shared as pg_server};

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
/// that stops and starts the server or needs TLS. None (after the skip
/// rule) when PostgreSQL is not installed.
pub fn private_pg_server(tls: Option<(String, String)>) -> Option<PgServer> {
    PgServer::start_tls(&[], tls)
}
