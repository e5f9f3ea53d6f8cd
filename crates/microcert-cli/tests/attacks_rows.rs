//! Tamper gaps 2 and 3 of SECURITY.md against the real binary, by someone
//! with write access to the key database:
//!
//! - a replay record deleted from a shared PostgreSQL database (database
//!   replay mode), then the recorded AUTH sent again over HTTP: before the
//!   fix it was accepted a second time (200); now it is refused (409);
//! - a token row put back (sqlite3 on the file) to its copy from before its
//!   revocation: before the fix the running server accepted the revoked
//!   token again within a second; now the token stays refused,
//!   `integrity check-local` names the token shard and `integrity repair`
//!   makes it whole (revoking the shard's tokens).

mod harness;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use microcert_testkit::nodes::{chip_auth, chip_from_image};
use microcert_testkit::postgres::PgServer;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn post_auth(rt: &tokio::runtime::Runtime, server: &Server, body: &[u8]) -> u16 {
    let c = client();
    rt.block_on(async {
        c.post(format!("{}/v1/device/auth", server.http))
            .body(body.to_vec())
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    })
}

fn simulate(server: &Server, chips: &Path, state: &Path, env: &[(&str, &str)]) {
    run_with(
        &[
            "simulate",
            "--server",
            &server.http,
            "--coap",
            &server.coap.to_string(),
            "--transport",
            "http",
            "--chips",
            chips.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--rounds",
            "1",
            "--duration",
            "30",
            "--concurrency",
            "1",
        ],
        env,
    );
}

/// The one chip image the simulator kept in `state`.
fn enrolled_chip(state: &Path) -> microcert_testkit::nodes::Chip {
    let images: Vec<_> = std::fs::read_dir(state)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "img"))
        .collect();
    assert_eq!(images.len(), 1, "one chip image in {}", state.display());
    chip_from_image(&std::fs::read(images[0].path()).unwrap())
}

/// Gap 2 through `serve` on PostgreSQL (database replay mode).
#[test]
fn a_deleted_replay_row_reopens_no_auth() {
    let Some(pg) = PgServer::start(&["microcert"]) else {
        return;
    };
    let url = pg.url("microcert");
    let env = [("MICROCERT_DATABASE", url.as_str())];
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    run_with(&["card", "init", "--data", d], &env);
    let chips = dir.path().join("chips");
    run_with(
        &[
            "factory",
            "provision",
            "--data",
            d,
            "--count",
            "1",
            "--class",
            "1",
            "--out",
            chips.to_str().unwrap(),
        ],
        &env,
    );
    let server = Server::start_with(&data, &[], &env);
    let state = dir.path().join("state");
    simulate(&server, &chips.join("chips.jsonl"), &state, &env);
    let mut chip = enrolled_chip(&state);
    let auth = chip_auth(&mut chip);
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(post_auth(&rt, &server, &auth), 200, "the first AUTH");
    assert_eq!(post_auth(&rt, &server, &auth), 409, "a plain replay");
    // The attacker deletes the record from the database.
    let out = pg.psql("microcert", "DELETE FROM replay RETURNING 1");
    assert!(out.contains('1'), "a replay row deleted: {out:?}");
    let status = post_auth(&rt, &server, &auth);
    assert_ne!(
        status, 200,
        "the recorded AUTH was accepted again after its replay row was deleted"
    );
    assert_eq!(status, 409);
    server.stop();
}

fn sqlite(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().unwrap();
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Gap 3 through `serve` on SQLite.
#[test]
fn a_token_row_put_back_before_its_revocation_stays_refused() {
    if !require_tool("sqlite3", "apt-get install sqlite3") {
        return;
    }
    let s = Setup::new(1);
    let data = s.data();
    let d = data.to_str().unwrap();
    let db = data.join("center.db");
    let carol = stdout(&run(&[
        "token", "create", "--data", d, "--role", "operator", "--name", "carol",
    ]))
    .trim()
    .to_owned();
    let before = sqlite(&db, "SELECT hex(tag) FROM tokens WHERE name = 'carol'");
    let line = std::fs::read_to_string(s.chips()).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    let id = v["device_id"].as_str().unwrap().to_owned();
    let server = Server::start(&data);
    let works = |token: &str| {
        bin()
            .args([
                "device",
                "show",
                &id,
                "--server",
                &server.http,
                "--token",
                token,
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(works(&carol));
    run(&["token", "revoke", "--data", d, "--name", "carol"]);
    let start = Instant::now();
    while works(&carol) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "revocation not seen"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Put back from outside while the server runs.
    sqlite(
        &db,
        &format!("UPDATE tokens SET revoked = NULL, tag = X'{before}' WHERE name = 'carol'"),
    );
    // Past the token cache's refresh bound (1 s), twice over.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !works(&carol),
        "a revoked token works again after its row was put back"
    );
    server.stop();
    let check = |expect: bool| {
        let out = try_run(&["integrity", "check-local", "--data", d]);
        assert_eq!(out.status.success(), expect, "{}", stdout(&out));
        stdout(&out)
    };
    let found = check(false);
    assert!(found.contains("(tokens)"), "{found}");
    let repaired = try_run(&["integrity", "repair", "--data", d]);
    assert!(
        stdout(&repaired).contains("token digest shard"),
        "{}{}",
        stdout(&repaired),
        stderr(&repaired)
    );
    check(true);
    // Still refused after the repair and a restart.
    let server = Server::start(&data);
    let works_now = bin()
        .args([
            "device",
            "show",
            &id,
            "--server",
            &server.http,
            "--token",
            &carol,
        ])
        .output()
        .unwrap()
        .status
        .success();
    assert!(!works_now);
    server.stop();
}
