//! End to end: the real `microcert` binary on ephemeral loopback ports,
//! driven over UDP (CoAP) and HTTP through a whole fleet's life.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use harness::{Server, Setup, bin, run, run_with, stdout};
use serde_json::Value;

struct Fleet {
    dir: tempfile::TempDir,
    server: Server,
    operator: String,
    verifier: String,
}

impl Fleet {
    fn chips(&self) -> PathBuf {
        self.dir.path().join("chips").join("chips.jsonl")
    }

    fn new(count: u32) -> Fleet {
        let Setup {
            dir,
            operator,
            verifier,
            ..
        } = Setup::new(count);
        let server = Server::start(&dir.path().join("data"));
        Fleet {
            dir,
            server,
            operator,
            verifier,
        }
    }

    /// Two rounds per node (bounded by a generous time limit, so a slow
    /// machine changes nothing but the duration).
    fn simulate(&self, transport: &str) -> Value {
        let out = run(&[
            "simulate",
            "--server",
            &self.server.http,
            "--coap",
            &self.server.coap.to_string(),
            "--transport",
            transport,
            "--chips",
            self.chips().to_str().unwrap(),
            "--state",
            self.dir.path().join("state").to_str().unwrap(),
            "--rounds",
            "2",
            "--duration",
            "120",
            "--concurrency",
            "4",
            "--verifier-token",
            &self.verifier,
            "--relying-party",
            "billing.example",
            "--json",
        ]);
        serde_json::from_str(&stdout(&out)).unwrap()
    }

    fn device(&self, args: &[&str]) -> Output {
        let mut all = vec!["device"];
        all.extend_from_slice(&args[..1]);
        all.extend_from_slice(&["--server", &self.server.http, "--token", &self.operator]);
        all.extend_from_slice(&args[1..]);
        run(&all)
    }

    fn device_ids(&self) -> Vec<String> {
        std::fs::read_to_string(self.chips())
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["device_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }
}

fn op<'a>(summary: &'a Value, name: &str) -> Option<&'a Value> {
    summary["operations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["op"] == name)
}

fn count(summary: &Value, name: &str) -> u64 {
    op(summary, name).map_or(0, |o| o["count"].as_u64().unwrap())
}

fn refused(summary: &Value, name: &str, kind: &str) -> u64 {
    summary["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["op"] == name && r["kind"] == kind)
        .map(|r| r["count"].as_u64().unwrap())
        .sum()
}

fn total_refused(summary: &Value) -> u64 {
    summary["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum()
}

#[test]
fn a_fleet_lives_over_coap_and_http() {
    let fleet = Fleet::new(12);
    let ids = fleet.device_ids();
    assert_eq!(ids.len(), 12);

    // Enrollment over CoAP (Block1), then authentication, signatures and
    // sealed data checked by the relying party.
    let s = fleet.simulate("coap");
    assert_eq!(count(&s, "enroll"), 12, "{s}");
    assert_eq!(total_refused(&s), 0, "{s}");
    assert!(count(&s, "auth") >= 12, "{s}");
    assert!(count(&s, "auth-response") >= 12, "{s}");
    assert!(count(&s, "rp-verify-signature") >= 12, "{s}");
    assert!(count(&s, "rp-open-sealed") >= 12, "{s}");

    // The same nodes (restored from their images) over HTTP.
    let s = fleet.simulate("http");
    assert_eq!(count(&s, "enroll"), 0, "{s}");
    assert_eq!(total_refused(&s), 0, "{s}");
    assert!(count(&s, "auth") >= 12, "{s}");

    // Revoke one, suspend one, update one.
    let (revoked, suspended, updated) = (&ids[0], &ids[1], &ids[2]);
    fleet.device(&["revoke", revoked, "--reason", "stolen from site 4"]);
    fleet.device(&["suspend", suspended, "--reason", "maintenance"]);
    fleet.device(&["update", updated, "--reason", "test roll-out"]);

    let s = fleet.simulate("coap");
    assert!(refused(&s, "auth", "revoked") >= 1, "{s}");
    assert!(refused(&s, "auth", "suspended") >= 1, "{s}");
    assert_eq!(count(&s, "revoke-receipt"), 1, "{s}");
    assert_eq!(count(&s, "update-enroll"), 1, "{s}");
    assert_eq!(refused(&s, "update-enroll", "not-active"), 0, "{s}");

    let show = |id: &str| -> Value {
        serde_json::from_str(&stdout(&fleet.device(&["show", id, "--json"]))).unwrap()
    };
    assert_eq!(show(revoked)["state"], "compromised");
    assert_eq!(show(suspended)["state"], "suspended");
    let up = show(updated);
    assert_eq!(up["seeds"].as_array().unwrap().len(), 2, "{up}");
    assert_eq!(up["seeds"][1]["generation"], 1);

    // Resume: the suspended node authenticates again.
    fleet.device(&["resume", suspended, "--reason", "back"]);
    let s = fleet.simulate("http");
    assert_eq!(refused(&s, "auth", "suspended"), 0, "{s}");
    assert!(
        refused(&s, "auth", "revoked") == 0,
        "a revoked node stops after its RECEIPT: {s}"
    );

    // The operator's view: audit chain intact, database clean.
    let data_token = &fleet.operator;
    let audit = bin()
        .args([
            "integrity",
            "check",
            "--server",
            &fleet.server.http,
            "--token",
            data_token,
        ])
        .output()
        .unwrap();
    assert!(audit.status.success(), "{}", stdout(&audit));
    let list = stdout(&fleet.device(&["list", "--state", "compromised", "--json"]));
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["devices"].as_array().unwrap().len(), 1, "{list}");

    // The load generator runs against it and stops by itself; the revoked
    // chip sits out, every other AUTH is accepted.
    for transport in ["coap", "http"] {
        let out = run(&[
            "bench",
            "--server",
            &fleet.server.http,
            "--coap",
            &fleet.server.coap.to_string(),
            "--transport",
            transport,
            "--chips",
            fleet.chips().to_str().unwrap(),
            "--state",
            fleet.dir.path().join("state").to_str().unwrap(),
            "--concurrency",
            "4",
            "--duration",
            "1",
            "--json",
        ]);
        let b: Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert!(b["accepted"].as_u64().unwrap() > 0, "{b}");
        assert_eq!(b["errors"].as_object().unwrap().len(), 0, "{b}");
    }
}

#[test]
fn garbage_is_refused_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Random bytes, truncated headers, oversized datagrams: bounded.
    for i in 0..300 {
        let len = match i % 3 {
            0 => (next() % 64) as usize,
            1 => (next() % 4) as usize,
            _ => 1400,
        };
        let junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        sock.send_to(&junk, server.coap).unwrap();
    }
    // A CoAP POST with a malformed AUTH gets 4.00, not silence.
    let malformed = [
        0x40, 0x02, 0x12, 0x34, // CON POST, message id 0x1234
        0xb2, b'v', b'1', 0x06, b'd', b'e', b'v', b'i', b'c', b'e', 0x04, b'a', b'u', b't', b'h',
        0xff, 0x11, 0x01, 0x02,
    ];
    // The flood may overflow the socket buffer, so retransmit as a CoAP
    // client would (a bounded number of times).
    let mut buf = [0u8; 1500];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut code = None;
    while Instant::now() < deadline && code.is_none() {
        sock.send_to(&malformed, server.coap).unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf)
            && n >= 4
            && buf[2..4] == [0x12, 0x34]
        {
            code = Some(buf[1]);
        }
    }
    assert_eq!(code, Some(0x80), "4.00 Bad Request, got {code:x?}"); // class 4, detail 0

    // HTTP: malformed, wrong method, oversized.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = client();
        let r = c
            .post(format!("{}/v1/device/auth", server.http))
            .body(vec![1, 2, 3])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let r = c
            .get(format!("{}/v1/device/auth", server.http))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405);
        let r = c
            .post(format!("{}/v1/device/enroll", server.http))
            .body(vec![0u8; 200_000])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        // The server may close a connection whose body it refused unread:
        // the next request goes on a new connection (a new client).
        let r = client()
            .post(format!("{}/v1/device/challenge", server.http))
            .body(vec![0u8; 8])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().len(), 16);
    });
    // Still serving CoAP after all that.
    let ok = rt.block_on(async {
        let mut c = microcert_server::coap_client::CoapClient::connect(server.coap)
            .await
            .unwrap();
        c.post("/v1/device/challenge", &[9; 8]).await.unwrap()
    });
    assert!(ok.is_success(), "{ok:?}");
    assert_eq!(ok.payload.len(), 16);
}

#[test]
fn tokens_and_roles_guard_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let d = data.to_str().unwrap();
    let token = |role: &str, name: &str| {
        stdout(&run(&[
            "token", "create", "--data", d, "--role", role, "--name", name,
        ]))
    };
    let auditor = token("auditor", "carol");
    let verifier = token("verifier", "billing.example");
    let operator = token("operator", "alice");
    // Tokens live in the key database (issue 14), hashed.
    assert!(!data.join("tokens.json").exists());
    let listed = stdout(&run(&["token", "list", "--data", d, "--json"]));
    assert_eq!(listed.lines().count(), 3, "{listed}");
    assert!(!listed.contains(&operator), "tokens are stored hashed");
    let db = std::fs::read(data.join("center.db")).unwrap();
    assert!(
        !db.windows(operator.len()).any(|w| w == operator.as_bytes()),
        "tokens are stored hashed"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = client();
        let url = |p: &str| format!("{}{p}", server.http);
        let revoke = url("/v1/devices/0102030405060708/revoke");
        let body = || vec![0u8; 31];
        // (request, expected status)
        let cases = [
            // No token, a bad token: 401.
            (c.get(url("/v1/devices")), 401),
            (c.get(url("/v1/devices")).bearer_auth("mct_00"), 401),
            (c.post(url("/v1/verify")).body(body()), 401),
            // The wrong role: 403.
            (c.get(url("/v1/devices")).bearer_auth(&verifier), 403),
            (c.post(&revoke).bearer_auth(&auditor), 403),
            (
                c.post(url("/v1/verify"))
                    .bearer_auth(&operator)
                    .body(body()),
                403,
            ),
            // The right role gets through to the center.
            (c.get(url("/v1/devices")).bearer_auth(&auditor), 200),
            (c.post(&revoke).bearer_auth(&operator), 404),
            (
                c.post(url("/v1/verify"))
                    .bearer_auth(&verifier)
                    .body(body()),
                400,
            ),
            // Unauthenticated resources.
            (c.get(url("/healthz")), 200),
        ];
        for (i, (req, want)) in cases.into_iter().enumerate() {
            let got = req.send().await.unwrap().status().as_u16();
            assert_eq!(got, want, "case {i}");
        }
        let doc: Value = c
            .get(url("/v1/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["paths"]["/v1/device/auth"]["post"].is_object());
        let metrics = c
            .get(url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("microcert_"), "{metrics}");
    });
}

#[test]
fn a_standard_coap_client_gets_a_challenge() {
    if !harness::require_tool("coap-client-notls", "apt-get install libcoap3-bin") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let body = dir.path().join("id.bin");
    std::fs::write(&body, [1u8, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    let out = Command::new("timeout")
        .args(["20", "coap-client-notls", "-m", "post", "-t", "42", "-f"])
        .arg(&body)
        .arg(format!("coap://{}/v1/device/challenge", server.coap))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // coap-client prints the payload, then a newline.
    let payload = out.stdout.strip_suffix(b"\n").unwrap_or(&out.stdout);
    assert_eq!(payload.len(), 16, "{:?}", out.stdout);
    let out = Command::new("timeout")
        .args(["20", "coap-client-notls", "-m", "get"])
        .arg(format!(
            "coap://{}/v1/device/0102030405060708/command",
            server.coap
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Writes DIR/pin and DIR/center.toml, a `serve` configuration whose card
/// is the SoftHSM2 token `label`; returns the configuration's path.
fn pkcs11_config(dir: &Path, label: &str, pin: &str) -> PathBuf {
    let pin_file = dir.join("pin");
    std::fs::write(&pin_file, format!("{pin}\n")).unwrap();
    let config = dir.join("center.toml");
    std::fs::write(
        &config,
        format!(
            "[pkcs11]\nmodule = \"{}\"\ntoken_label = \"{label}\"\npin_file = \"{}\"\n",
            microcert_testkit::softhsm::MODULE,
            pin_file.display()
        ),
    )
    .unwrap();
    config
}

/// A SoftHSM2 token of its own for this test (the kit's launcher, under
/// its skip rule): the value for SOFTHSM2_CONF.
fn softhsm_token(dir: &Path, label: &str) -> Option<String> {
    let conf = microcert_testkit::softhsm::tokens(dir, &[label], "12345678", "1234")?;
    Some(conf.to_str().unwrap().to_owned())
}

#[test]
fn a_fleet_lives_on_a_pkcs11_token_from_configuration_alone() {
    let dir = tempfile::tempdir().unwrap();
    let Some(conf) = softhsm_token(dir.path(), "microcert-e2e") else {
        return;
    };
    let config = pkcs11_config(dir.path(), "microcert-e2e", "1234");
    let env = [
        ("SOFTHSM2_CONF", conf.as_str()),
        ("MICROCERT_PASSPHRASE", ""),
    ];
    let data = dir.path().join("data");
    let (d, c) = (data.to_str().unwrap(), config.to_str().unwrap());
    run_with(&["card", "init", "--data", d, "--pkcs11", c], &env);
    // No software card is made: the token holds the keys.
    let server = Server::start_with(&data, &["--config", c], &env);
    assert!(!data.join("card.mccard").exists());
    // Tokens are card-tagged rows of the key database (issue 14): the
    // command opens the configured card.
    let operator = stdout(&run_with(
        &[
            "token", "create", "--data", d, "--config", c, "--role", "operator", "--name", "ops",
        ],
        &env,
    ));
    let chips = dir.path().join("chips");
    run_with(
        &[
            "factory",
            "provision",
            "--data",
            d,
            "--config",
            c,
            "--count",
            "6",
            "--out",
            chips.to_str().unwrap(),
        ],
        &env,
    );
    let chips_file = chips.join("chips.jsonl");
    let state = dir.path().join("state");
    let simulate = || -> Value {
        let out = run(&[
            "simulate",
            "--server",
            &server.http,
            "--coap",
            &server.coap.to_string(),
            "--chips",
            chips_file.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--duration",
            "1",
            "--concurrency",
            "2",
            "--json",
        ]);
        serde_json::from_str(&stdout(&out)).unwrap()
    };
    let s = simulate();
    assert_eq!(count(&s, "enroll"), 6, "{s}");
    assert_eq!(total_refused(&s), 0, "{s}");
    assert!(count(&s, "auth") >= 6, "{s}");

    let ids: Vec<String> = std::fs::read_to_string(&chips_file)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["device_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let op = |args: &[&str]| {
        let mut all = vec![
            "device",
            args[0],
            "--server",
            &server.http,
            "--token",
            &operator,
        ];
        all.extend_from_slice(&args[1..]);
        run(&all)
    };
    op(&["update", &ids[0], "--reason", "roll-out"]);
    op(&["revoke", &ids[1], "--reason", "lost"]);
    let s = simulate();
    assert_eq!(count(&s, "update-enroll"), 1, "{s}");
    assert_eq!(count(&s, "revoke-receipt"), 1, "{s}");
    let shown: Value = serde_json::from_str(&stdout(&op(&["show", &ids[0], "--json"]))).unwrap();
    assert_eq!(shown["seeds"].as_array().unwrap().len(), 2, "{shown}");
    let shown: Value = serde_json::from_str(&stdout(&op(&["show", &ids[1], "--json"]))).unwrap();
    assert_eq!(shown["state"], "compromised");
}

#[test]
fn a_wrong_pin_is_a_clear_error_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let Some(conf) = softhsm_token(dir.path(), "microcert-pin") else {
        return;
    };
    let config = pkcs11_config(dir.path(), "microcert-pin", "1234");
    let data = dir.path().join("data");
    let (d, c) = (data.to_str().unwrap(), config.to_str().unwrap());
    run_with(
        &["card", "init", "--data", d, "--pkcs11", c],
        &[("SOFTHSM2_CONF", &conf)],
    );
    pkcs11_config(dir.path(), "microcert-pin", "9999");
    let out = bin()
        .args([
            "serve",
            "--data",
            d,
            "--config",
            c,
            "--http",
            "127.0.0.1:0",
            "--coap",
            "127.0.0.1:0",
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("pin"), "{err}");
    assert!(!err.contains("9999"), "the PIN must not be printed: {err}");
}

/// An HTTP client; reqwest's TLS needs the process's rustls provider set.
fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}
