//! One configuration for every command (issue 14): with `database =` in
//! the configuration file, every local command works on that database (not
//! DATA/center.db), and a command that changes or destroys records refuses
//! a database the card was not last used with.
//!
//! The data loss reproduced first (`rotation_honours_the_configured_database`):
//! `card rotate-storage-key --config FILE` used to open DATA/center.db, re-seal
//! 0 seeds and destroy storage-key version 1, under which the configured
//! database's devices were sealed.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Output;

use harness::{Server, bin, run, stderr, stdout, try_run};
use serde_json::Value;

/// A data directory whose `serve` configuration puts the key database
/// elsewhere, with `count` devices enrolled through `serve` into it.
struct Configured {
    dir: tempfile::TempDir,
}

impl Configured {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn database(&self) -> PathBuf {
        self.dir.path().join("elsewhere").join("keys.db")
    }
    fn config(&self) -> PathBuf {
        self.dir.path().join("center.toml")
    }
    fn chips(&self) -> PathBuf {
        self.dir.path().join("chips").join("chips.jsonl")
    }
    fn d(&self) -> String {
        self.data().to_str().unwrap().to_owned()
    }
    fn c(&self) -> String {
        self.config().to_str().unwrap().to_owned()
    }

    /// The card, the configuration, `count` chips provisioned into the
    /// configured database (through MICROCERT_DATABASE, which every
    /// version honoured) and enrolled through `serve --config`.
    fn new(count: u32) -> Configured {
        let dir = tempfile::tempdir().unwrap();
        let this = Configured { dir };
        std::fs::create_dir_all(this.database().parent().unwrap()).unwrap();
        std::fs::write(
            this.config(),
            format!("database = \"{}\"\n", this.database().display()),
        )
        .unwrap();
        run(&["card", "init", "--data", &this.d()]);
        let out = this.dir.path().join("chips");
        harness::run_with(
            &[
                "factory",
                "provision",
                "--data",
                &this.d(),
                "--count",
                &count.to_string(),
                "--out",
                out.to_str().unwrap(),
            ],
            &[("MICROCERT_DATABASE", this.database().to_str().unwrap())],
        );
        let s = this.simulate();
        assert_eq!(count_of(&s, "enroll"), u64::from(count), "{s}");
        this
    }

    /// `serve --config` and one round of every node over HTTP.
    fn simulate(&self) -> Value {
        let server = Server::start_with(&self.data(), &["--config", &self.c()], &[]);
        let out = run(&[
            "simulate",
            "--server",
            &server.http,
            "--transport",
            "http",
            "--chips",
            self.chips().to_str().unwrap(),
            "--state",
            self.dir.path().join("state").to_str().unwrap(),
            "--rounds",
            "1",
            "--duration",
            "60",
            "--concurrency",
            "2",
            "--json",
        ]);
        server.stop();
        serde_json::from_str(&stdout(&out)).unwrap()
    }

    /// A local command with `--data DATA --config FILE`.
    fn local(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        let (d, c) = (self.d(), self.c());
        all.extend_from_slice(&["--data", &d, "--config", &c]);
        bin().args(&all).output().unwrap()
    }

    fn default_db(&self) -> PathBuf {
        self.data().join("center.db")
    }
}

fn count_of(summary: &Value, name: &str) -> u64 {
    summary["operations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["op"] == name)
        .map_or(0, |o| o["count"].as_u64().unwrap())
}

fn refusals(summary: &Value) -> u64 {
    summary["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}\n{}", stdout(o), stderr(o));
    stdout(o)
}

fn sql(db: &Path, query: &str) -> String {
    let out = std::process::Command::new("sqlite3")
        .arg(db)
        .arg(query)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The reported disaster, reproduced: rotation with `--config` must work
/// on the configured database, re-seal its seeds, and leave every device
/// able to authenticate.
#[test]
fn rotation_honours_the_configured_database() {
    let f = Configured::new(3);
    let out = ok(&f.local(&["card", "rotate-storage-key"]));
    assert!(out.contains(": 3 seeds re-sealed"), "{out}");
    assert!(!f.default_db().exists(), "DATA/center.db was opened");
    assert_eq!(
        sql(&f.database(), "SELECT DISTINCT kstore_version FROM seeds"),
        "2"
    );
    // Every device still authenticates (its seed opens under version 2).
    let s = f.simulate();
    assert!(count_of(&s, "auth") >= 3, "{s}");
    assert_eq!(refusals(&s), 0, "{s}");
}

/// Every local command reads the configured database: none of them makes
/// DATA/center.db, and each sees the configured database's records.
#[test]
fn every_local_command_uses_the_configured_database() {
    let f = Configured::new(2);
    let backup = ok(&f.local(&["backup", "create"]));
    assert!(backup.contains(": 2 devices, 2 seeds"), "{backup}");
    // The file just made (the server may have made an automatic one
    // before, with fewer seeds): named by `backup create`, and listed.
    let file = backup
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_owned();
    let b = ok(&f.local(&["backup", "list"]));
    assert!(b.lines().any(|l| l.trim() == file), "{b}");
    let v = ok(&f.local(&["backup", "verify", &file]));
    assert!(v.contains("2 devices, 2 seeds"), "{v}");
    let check = ok(&f.local(&["integrity", "check-local"]));
    assert!(check.starts_with("clean:"), "{check}");
    assert!(!check.contains(" 0 records"), "{check}");
    let audit = ok(&f.local(&["audit", "verify-local"]));
    assert!(audit.contains("intact"), "{audit}");
    let export = ok(&f.local(&["audit", "export-local"]));
    assert!(export.lines().count() > 2, "{export}");
    let out = f.dir.path().join("more");
    ok(&f.local(&[
        "factory",
        "provision",
        "--count",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert_eq!(sql(&f.database(), "SELECT count(*) FROM devices"), "3");
    let repair = f.local(&["integrity", "repair"]);
    assert!(repair.status.success(), "{}", stderr(&repair));
    assert!(!f.default_db().exists(), "DATA/center.db was opened");
}

/// Precedence: a flag beats the environment, which beats the file.
#[test]
fn flags_beat_the_environment_which_beats_the_file() {
    let f = Configured::new(1);
    let other = f.dir.path().join("nowhere.db");
    // MICROCERT_DATABASE beats the file: the command looks for `nowhere`.
    let o = bin()
        .args([
            "integrity",
            "check-local",
            "--data",
            &f.d(),
            "--config",
            &f.c(),
        ])
        .env("MICROCERT_DATABASE", &other)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nowhere.db"), "{}", stderr(&o));
    assert!(stderr(&o).contains("MICROCERT_DATABASE"), "{}", stderr(&o));
    // --database beats MICROCERT_DATABASE.
    let o = bin()
        .args([
            "integrity",
            "check-local",
            "--data",
            &f.d(),
            "--config",
            &f.c(),
        ])
        .args(["--database", f.database().to_str().unwrap()])
        .env("MICROCERT_DATABASE", &other)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // MICROCERT_CONFIG works like --config, and `data` in the file too.
    let cfg2 = f.dir.path().join("all.toml");
    std::fs::write(
        &cfg2,
        format!(
            "data = \"{}\"\ndatabase = \"{}\"\n",
            f.data().display(),
            f.database().display()
        ),
    )
    .unwrap();
    let o = bin()
        .args(["audit", "verify-local"])
        .env("MICROCERT_CONFIG", &cfg2)
        .current_dir(f.dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!f.dir.path().join("microcert-data").exists());
    assert!(!other.exists(), "a maintenance command made a database");
}

/// A second card's database, to point the first card's commands at.
fn foreign_database(f: &Configured) -> PathBuf {
    let data2 = f.dir.path().join("data2");
    let db2 = f.dir.path().join("other.db");
    run(&["card", "init", "--data", data2.to_str().unwrap()]);
    let out = f.dir.path().join("chips2");
    run(&[
        "factory",
        "provision",
        "--data",
        data2.to_str().unwrap(),
        "--database",
        db2.to_str().unwrap(),
        "--count",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    db2
}

fn digest(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

/// The snapshot of everything a destructive command could change.
fn state(f: &Configured, db: &Path) -> (Vec<u8>, String, String, Vec<u8>) {
    (
        digest(&f.data().join("card.mccard")),
        sql(db, "SELECT count(*), max(seq) FROM audit"),
        sql(
            db,
            "SELECT group_concat(hex(device) || generation || kstore_version) FROM seeds",
        ) + &sql(db, "SELECT group_concat(hex(id)) FROM devices"),
        digest(&f.data().join("database.binding")),
    )
}

/// Each destructive command against a database the card was not last used
/// with (another card's database, given by flag): refused, naming both
/// databases and both cards, and nothing changed on either side.
#[test]
fn destructive_commands_refuse_another_database() {
    let f = Configured::new(2);
    let foreign = foreign_database(&f);
    let before_f = state(&f, &foreign);
    let before_own = state(&f, &f.database());
    let fdb = foreign.to_str().unwrap();
    for cmd in [
        vec!["card", "rotate-storage-key", "--database", fdb],
        vec!["integrity", "repair", "--database", fdb],
        vec![
            "factory",
            "provision",
            "--count",
            "1",
            "--out",
            "/nonexistent/x",
            "--database",
            fdb,
        ],
        vec!["backup", "create", "--database", fdb],
        vec!["integrity", "check-local", "--database", fdb],
    ] {
        let o = f.local(&cmd);
        assert!(!o.status.success(), "{cmd:?} ran: {}", stdout(&o));
        let e = stderr(&o);
        assert!(e.contains("refused"), "{cmd:?}: {e}");
        assert!(e.contains("other.db"), "{cmd:?}: {e}");
        assert!(
            e.contains("keys.db"),
            "{cmd:?} does not name the card's database: {e}"
        );
        assert!(e.contains("card id"), "{cmd:?}: {e}");
        assert_eq!(
            state(&f, &foreign),
            before_f,
            "{cmd:?} changed the other database"
        );
        assert_eq!(
            state(&f, &f.database()),
            before_own,
            "{cmd:?} changed the card"
        );
    }
    // A restore into it: refused as well (it is another card's, and not empty).
    let b = ok(&f.local(&["backup", "create"]));
    let file = b
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_owned();
    let before_own = state(&f, &f.database());
    let o = f.local(&["backup", "restore", &file, "--database", fdb]);
    assert!(!o.status.success());
    assert_eq!(state(&f, &foreign), before_f);
    assert_eq!(state(&f, &f.database()), before_own);
    // A read-only command reads it, with a warning that says why.
    let o = f.local(&["audit", "verify-local", "--database", fdb]);
    assert!(stderr(&o).contains("warning"), "{}", stderr(&o));
}

/// A database that does not exist is never made by a maintenance command
/// (the old default silently made an empty DATA/center.db), and an empty
/// new database is refused by a destructive command.
#[test]
fn a_missing_or_new_database_is_refused() {
    let f = Configured::new(1);
    let missing = f.dir.path().join("missing.db");
    for cmd in [
        vec!["card", "rotate-storage-key"],
        vec!["integrity", "repair"],
        vec!["integrity", "check-local"],
        vec!["backup", "create"],
    ] {
        let mut cmd = cmd;
        cmd.extend_from_slice(&["--database", missing.to_str().unwrap()]);
        let o = f.local(&cmd);
        assert!(!o.status.success(), "{cmd:?}");
        assert!(stderr(&o).contains("no key database"), "{}", stderr(&o));
        assert!(!missing.exists(), "{cmd:?} made a database");
    }
    // Without --config a command now finds no DATA/center.db, and says so.
    let o = bin()
        .args(["card", "rotate-storage-key", "--data", &f.d()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--config"), "{}", stderr(&o));
    assert!(!f.default_db().exists());
    // An empty new database made by `serve` with the same card: serve
    // refuses it too (the card is recorded as the configured one's).
    let fresh = f.dir.path().join("fresh.db");
    let o = bin()
        .args([
            "serve",
            "--data",
            &f.d(),
            "--database",
            fresh.to_str().unwrap(),
        ])
        .args(["--http", "127.0.0.1:0", "--coap", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("refused"), "{}", stderr(&o));
}

/// Destructive commands need the binding recorded; `card bind` records a
/// move on purpose, after which they run against the new database.
#[test]
fn card_bind_records_a_move_on_purpose() {
    let f = Configured::new(1);
    // The record lost on the data directory's side: rotation refuses.
    std::fs::remove_file(f.data().join("database.binding")).unwrap();
    let o = f.local(&["card", "rotate-storage-key"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not recorded"), "{}", stderr(&o));
    assert_eq!(
        sql(&f.database(), "SELECT DISTINCT kstore_version FROM seeds"),
        "1"
    );
    let out = ok(&f.local(&["card", "bind"]));
    assert!(out.contains("keys.db"), "{out}");
    let out = ok(&f.local(&["card", "rotate-storage-key"]));
    assert!(out.contains(": 1 seeds re-sealed"), "{out}");

    // A tampered record is refused (its card tag does not verify).
    let path = f.data().join("database.binding");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut rec: Value = serde_json::from_str(&text).unwrap();
    rec["database_id"] = Value::from("00000000000000000000000000000000");
    std::fs::write(&path, rec.to_string()).unwrap();
    let o = f.local(&["integrity", "repair"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("does not verify"), "{}", stderr(&o));
}

/// A lost database restored at the same place: allowed, and the card's
/// record moves to the restored database; at another place it needs
/// --rebind.
#[test]
fn restore_into_a_new_database() {
    let f = Configured::new(2);
    let b = ok(&f.local(&["backup", "create"]));
    let file = b
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_owned();
    let elsewhere = f.dir.path().join("new.db");
    let o = f.local(&[
        "backup",
        "restore",
        &file,
        "--database",
        elsewhere.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--rebind"), "{}", stderr(&o));
    assert!(!elsewhere.exists(), "a refused restore made a database");
    // The database lost: restored at its place.
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", f.database().display()));
    }
    let out = ok(&f.local(&["backup", "restore", &file]));
    assert!(out.contains("restored 2 devices"), "{out}");
    // Every seed opens after the restore: the challenge-response AUTH goes
    // through. A plain AUTH may be refused as a replay for one freshness
    // window: the restored database's replay-guard record is older than
    // the guard's state file, so the first start waits the window out
    // (SECURITY.md, attack 8) rather than trust either.
    let s = f.simulate();
    assert!(count_of(&s, "auth-response") >= 2, "{s}");
    for r in s["refusals"].as_array().unwrap() {
        assert_eq!(r["kind"], "replay", "{s}");
        assert_eq!(r["op"], "auth", "{s}");
    }
    ok(&f.local(&["card", "rotate-storage-key"]));
}

/// Keys are not taken on the command line: `cert verify --transport-key
/// HEX` is refused with a pointer to --transport-key-file, which works
/// (from a file and from standard input).
#[test]
fn transport_keys_come_from_a_file_not_argv() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.bin");
    run(&["cert", "new-seed", "--out", seed.to_str().unwrap()]);
    let msg = stdout(&run(&[
        "cert",
        "make",
        "auth",
        "--seed",
        seed.to_str().unwrap(),
        "--base-year",
        "2026",
        "--device",
        "0102030405060708",
        "--generation",
        "0",
        "--time",
        "1790000000",
        "--nonce",
        "0123456789abcdef",
    ]));
    let key = "00112233445566778899aabbccddeeff";
    let base = [
        "cert",
        "verify",
        "--seed",
        seed.to_str().unwrap(),
        "--base-year",
        "2026",
    ];
    let o = try_run(&[&base[..], &["--transport-key", key, &msg]].concat());
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("--transport-key-file"), "{e}");
    assert!(!e.contains(key), "the refused key is echoed: {e}");
    let kf = dir.path().join("ktr");
    std::fs::write(&kf, format!("{key}\n")).unwrap();
    let o = run(&[
        &base[..],
        &["--transport-key-file", kf.to_str().unwrap(), &msg],
    ]
    .concat());
    assert_eq!(stdout(&o), "valid");
    std::fs::write(&kf, "zz").unwrap();
    let o = try_run(
        &[
            &base[..],
            &["--transport-key-file", kf.to_str().unwrap(), &msg],
        ]
        .concat(),
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("32 hex digits"), "{}", stderr(&o));
    let mut child = bin()
        .args(base)
        .args(["--transport-key-file", "-", &msg])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(key.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(stdout(&o), "valid");
}

// ---- the reported case on PostgreSQL ----------------------------------------

/// The test kit's throw-away PostgreSQL (stopped when dropped) with the
/// empty databases `microcert` and `other`.
struct Postgres(microcert_testkit::postgres::PgServer);

impl Postgres {
    fn start() -> Option<Postgres> {
        microcert_testkit::postgres::PgServer::start(&["microcert", "other"]).map(Postgres)
    }

    fn url(&self, db: &str) -> String {
        self.0.url(db)
    }

    fn query(&self, db: &str, sql: &str) -> String {
        self.0.psql(db, sql).trim().to_owned()
    }
}

/// The case as reported: `database = "postgres://..."` in the file given
/// with --config, MICROCERT_DATABASE unset, three devices enrolled through
/// `serve --config`; `card rotate-storage-key --config FILE` re-seals the
/// three seeds in PostgreSQL (it used to re-seal 0 in DATA/center.db and
/// destroy version 1), the devices still authenticate, and the rotation
/// pointed at another PostgreSQL database is refused with nothing changed.
#[test]
fn rotation_honours_a_postgres_database_in_the_configuration() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let config = dir.path().join("center.toml");
    std::fs::write(&config, format!("database = \"{}\"\n", pg.url("microcert"))).unwrap();
    let c = config.to_str().unwrap();
    run(&["card", "init", "--data", d]);
    let chips = dir.path().join("chips");
    run(&[
        "factory",
        "provision",
        "--data",
        d,
        "--config",
        c,
        "--count",
        "3",
        "--out",
        chips.to_str().unwrap(),
    ]);
    assert_eq!(pg.query("microcert", "SELECT count(*) FROM devices"), "3");
    let simulate = || -> Value {
        let server = Server::start_with(&data, &["--config", c], &[]);
        let out = run(&[
            "simulate",
            "--server",
            &server.http,
            "--transport",
            "http",
            "--chips",
            chips.join("chips.jsonl").to_str().unwrap(),
            "--state",
            dir.path().join("state").to_str().unwrap(),
            "--rounds",
            "1",
            "--duration",
            "60",
            "--concurrency",
            "2",
            "--json",
        ]);
        server.stop();
        serde_json::from_str(&stdout(&out)).unwrap()
    };
    let s = simulate();
    assert_eq!(count_of(&s, "enroll"), 3, "{s}");

    // Another PostgreSQL database, made by another card: refused.
    let data2 = dir.path().join("data2");
    run(&["card", "init", "--data", data2.to_str().unwrap()]);
    run(&[
        "factory",
        "provision",
        "--data",
        data2.to_str().unwrap(),
        "--database",
        &pg.url("other"),
        "--count",
        "1",
        "--out",
        dir.path().join("chips2").to_str().unwrap(),
    ]);
    let card_before = std::fs::read(data.join("card.mccard")).unwrap();
    let o = bin()
        .args(["card", "rotate-storage-key", "--data", d, "--config", c])
        .args(["--database", &pg.url("other")])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("refused"), "{}", stderr(&o));
    assert!(stderr(&o).contains("/other"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(data.join("card.mccard")).unwrap(),
        card_before
    );

    // The server made an automatic backup at its first tick (or not,
    // depending on how fast it was stopped): without one, version 1 is
    // destroyed once every seed is re-sealed (keeping a version a backup
    // needs is rotation_keeps_a_version_a_configured_record_still_uses).
    let _ = std::fs::remove_dir_all(data.join("backups"));
    let out = stdout(&run(&[
        "card",
        "rotate-storage-key",
        "--data",
        d,
        "--config",
        c,
    ]));
    assert!(out.contains(": 3 seeds re-sealed"), "{out}");
    assert!(out.contains("destroyed storage key version 1"), "{out}");
    assert!(
        !data.join("center.db").exists(),
        "DATA/center.db was opened"
    );
    assert_eq!(
        pg.query("microcert", "SELECT DISTINCT kstore_version FROM seeds"),
        "2"
    );
    let s = simulate();
    assert!(count_of(&s, "auth") >= 3, "{s}");
    assert_eq!(refusals(&s), 0, "{s}");
}

/// The rotation's guard works on the configured database: a seed there
/// that cannot be re-sealed (its record tampered with) keeps version 1.
#[test]
fn rotation_keeps_a_version_a_configured_record_still_uses() {
    let f = Configured::new(2);
    sql(
        &f.database(),
        "UPDATE seeds SET tag = randomblob(length(tag)) \
         WHERE device = (SELECT min(device) FROM seeds)",
    );
    let out = ok(&f.local(&["card", "rotate-storage-key"]));
    assert!(out.contains(": 1 seeds re-sealed"), "{out}");
    assert!(out.contains("SKIPPED device"), "{out}");
    assert!(out.contains("kept storage key version 1"), "{out}");
    assert!(!out.contains("destroyed"), "{out}");
    assert_eq!(
        sql(
            &f.database(),
            "SELECT group_concat(v) FROM (SELECT DISTINCT kstore_version AS v FROM seeds ORDER BY v)"
        ),
        "1,2"
    );
}
