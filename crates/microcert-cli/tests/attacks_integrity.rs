//! Issue 12, attacks 2 and 3, against the real binary: a notary record
//! edited from outside (sqlite3 on the file) must not make other data
//! valid, and a database put back to a copy older than an acknowledged
//! change must be reported by `integrity check-local` and refused by
//! `serve` at start-up.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use microcert_core::{DataDigest, DeviceId, Header, MsgType, Suite};
use serde_json::Value;

fn sqlite(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().unwrap();
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn simulate(s: &Setup, server: &Server) -> Value {
    let out = run(&[
        "simulate",
        "--server",
        &server.http,
        "--coap",
        &server.coap.to_string(),
        "--transport",
        "http",
        "--chips",
        s.chips().to_str().unwrap(),
        "--state",
        s.state().to_str().unwrap(),
        "--rounds",
        "1",
        "--duration",
        "60",
        "--concurrency",
        "1",
        "--verifier-token",
        &s.verifier,
        "--relying-party",
        "billing.example",
        "--json",
    ]);
    serde_json::from_str(&stdout(&out)).unwrap()
}

fn device_id(s: &Setup) -> String {
    let line = std::fs::read_to_string(s.chips()).unwrap();
    let v: Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    v["device_id"].as_str().unwrap().to_owned()
}

fn check_local(s: &Setup) -> (bool, String) {
    let out = try_run(&[
        "integrity",
        "check-local",
        "--data",
        s.data().to_str().unwrap(),
    ]);
    (out.status.success(), stdout(&out))
}

fn db(s: &Setup) -> PathBuf {
    s.data().join("center.db")
}

/// POST /v1/verify as the relying party; the JSON answer.
fn verify(server: &Server, token: &str, body: Vec<u8>) -> Value {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/verify", server.http))
            .bearer_auth(token)
            .body(body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        r.json::<Value>().await.unwrap()
    })
}

/// Attack 2: a signature verified while the device was active (notary
/// record), the device revoked, the record's digest edited to another
/// data's from outside: `/v1/verify` must not say valid for the other data,
/// and `integrity check-local` must name the record.
#[test]
fn attack2_an_edited_notary_record_forges_no_signature() {
    let s = Setup::new(1);
    let id = device_id(&s);
    let server = Server::start(&s.data());
    let summary = simulate(&s, &server);
    assert!(
        summary.to_string().contains("rp-verify-signature"),
        "{summary}"
    );
    // Revoked a moment after the signature was notarised (a record
    // counts only if first seen before the revocation's second).
    std::thread::sleep(Duration::from_millis(1500));
    run(&[
        "device",
        "revoke",
        &id,
        "--server",
        &server.http,
        "--token",
        &s.operator,
        "--reason",
        "stolen",
    ]);
    server.stop();

    let row = sqlite(
        &db(&s),
        "SELECT generation, t, r, hex(tag), hex(digest), \
         (SELECT suite FROM devices WHERE id = notary.device) FROM notary LIMIT 1",
    );
    let f: Vec<&str> = row.split('|').collect();
    assert_eq!(f.len(), 6, "a notary record: {row:?}");
    let (generation, t, r) = (
        f[0].parse::<u8>().unwrap(),
        f[1].parse::<u32>().unwrap(),
        f[2].parse::<i64>().unwrap() as u64,
    );
    let tag = hex::decode(f[3]).unwrap();
    let suite = if f[5] == "1" {
        Suite::CMAC64
    } else {
        Suite::CMAC128
    };
    let device = DeviceId::from_u64(u64::from_str_radix(&id, 16).unwrap());
    let forged = b"pay 1000000 to mallory".to_vec();
    sqlite(
        &db(&s),
        &format!(
            "UPDATE notary SET digest = X'{}' WHERE digest = X'{}'",
            hex::encode(DataDigest::of(&forged)),
            f[4]
        ),
    );
    let h = Header {
        suite,
        device,
        generation,
        t,
        r,
    };
    let mut body = h.to_bytes(MsgType::SIGNATURE).to_vec();
    body.extend_from_slice(&tag);
    body.extend_from_slice(&forged);

    let server = Server::start(&s.data());
    let answer = verify(&server, &s.verifier, body);
    assert_ne!(answer["valid"], Value::Bool(true), "forged: {answer}");
    server.stop();

    let (clean, out) = check_local(&s);
    assert!(!clean, "{out}");
    assert!(out.contains("notary record"), "{out}");
}

/// Starts `serve` and reports whether it refused to start (exited with an
/// error within 20 s) and what it said.
fn serve_refuses(data: &Path) -> (bool, String) {
    let mut child = bin()
        .args(["serve", "--data"])
        .arg(data)
        .args(["--http", "127.0.0.1:0", "--coap", "127.0.0.1:0"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            return (!status.success(), err);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    (false, "still serving after 20 s".into())
}

/// Attack 3: a copy of center.db taken, a device enrolled (acknowledged),
/// the center stopped cleanly, the copy put back: reported, and `serve`
/// refuses to start on it.
#[test]
fn attack3_a_database_put_back_after_an_acknowledged_change_is_detected() {
    let s = Setup::new(1);
    Server::start(&s.data()).stop();
    let copy = s.dir.path().join("center.db.copy");
    std::fs::copy(db(&s), &copy).unwrap();
    let (clean, out) = check_local(&s);
    assert!(clean, "{out}");

    let server = Server::start(&s.data());
    // `serve` runs an integrity check at start-up (which moves the anchor
    // on a clean database): the enrollment comes after it, as any change
    // between two periodic checks does.
    std::thread::sleep(Duration::from_secs(3));
    let summary = simulate(&s, &server);
    assert!(summary.to_string().contains("enroll"), "{summary}");
    server.stop();
    let enrolled = sqlite(&db(&s), "SELECT count(*) FROM seeds");
    assert_eq!(enrolled, "1");

    // The attacker puts the older copy back (consistent in itself).
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db(&s).display()));
    }
    std::fs::copy(&copy, db(&s)).unwrap();
    assert_eq!(sqlite(&db(&s), "SELECT count(*) FROM seeds"), "0");

    let (clean, out) = check_local(&s);
    assert!(!clean, "rollback not reported: {out}");
    assert!(out.contains("rolled back"), "{out}");
    let (refused, err) = serve_refuses(&s.data());
    assert!(refused, "serve started on a rolled-back database: {err}");
    assert!(err.contains("older"), "{err}");
}
