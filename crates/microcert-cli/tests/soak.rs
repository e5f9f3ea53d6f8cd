//! A soak under faults (issue 15 item 7), bounded: the real binary under a
//! mixed load from the simulator (ENROLL, AUTH, challenge and
//! AUTH_RESPONSE, SIGNATURE and SEALED checked by a relying party, command
//! polls and the commands they bring: UPDATE_SEED and REVOKE), operators
//! revoking, suspending, resuming, queueing updates and making tokens,
//! while a chaos loop SIGKILLs the center at random points (and stops it
//! cleanly now and then) and starts it again.
//!
//! Afterwards: every acknowledged revocation, suspension and token is
//! there, every enrolled chip's seed is there, no accepted AUTH is
//! accepted twice (each is replayed after every restart), the integrity
//! check is clean (no half-written record), the audit chain verifies, and
//! the center's resident memory stays bounded (sampled and printed).
//!
//! `SOAK_SECONDS` sets the length (90 by default, the CI run; the
//! PostgreSQL soak runs half as long beside it, `SOAK_PG_SECONDS`).
//! A long run: `SOAK_SECONDS=1800 cargo test -p microcert-cli --test soak
//! -- --nocapture` prints its figures (cycles, kills, replays refused,
//! changes kept, RSS samples).

mod harness;

use std::collections::BTreeSet;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use microcert_core::Audience;
use microcert_node::{EntropyFailure, SecureChip, SoftChip};

type Chip = SoftChip<fn(&mut [u8]) -> Result<(), EntropyFailure>>;

fn os_entropy(buf: &mut [u8]) -> Result<(), EntropyFailure> {
    getrandom::fill(buf).map_err(|_| EntropyFailure)
}

fn now32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as u32
}

fn rand_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_le_bytes(b) % n.max(1)
}

fn soak_seconds() -> u64 {
    std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(90)
}

struct Http {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Http {
    fn new() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Http {
            rt: tokio::runtime::Runtime::new().unwrap(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    /// POST; the status (0: no answer, e.g. the center was just killed).
    fn post(&self, url: String, token: Option<&str>, body: Vec<u8>) -> u16 {
        self.rt.block_on(async {
            let mut req = self.client.post(url).body(body);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            req.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
        })
    }

    fn get_json(&self, url: String, token: &str) -> (u16, serde_json::Value) {
        self.rt.block_on(async {
            match self.client.get(url).bearer_auth(token).send().await {
                Ok(r) => {
                    let st = r.status().as_u16();
                    (st, r.json().await.unwrap_or(serde_json::Value::Null))
                }
                Err(_) => (0, serde_json::Value::Null),
            }
        })
    }
}

/// The simulator as a child process: `args` after the common ones.
fn simulate(server: &Server, chips: &str, state: &str, rp: &str, extra: &[&str]) -> Child {
    bin()
        .args(["simulate", "--server", &server.http])
        .args(["--coap", &server.coap.to_string()])
        .args(["--chips", chips, "--state", state])
        .args(["--verifier-token", rp, "--relying-party", "billing.example"])
        .args(extra)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_bounded(mut child: Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// The chip images the simulator keeps, by device id (hex).
fn chip_images(state: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(state).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "img") {
            let id = p.file_stem().unwrap().to_string_lossy().to_string();
            out.push((id, std::fs::read(&p).unwrap()));
        }
    }
    out
}

/// A data directory with a card, an operator and a verifier token and
/// `count` chips, on `database` (None: SQLite in the data directory).
struct Fleet {
    dir: tempfile::TempDir,
    db: Vec<String>,
    operator: String,
    verifier: String,
}

impl Fleet {
    fn new(count: u32, database: Option<String>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db: Vec<String> = database
            .map(|u| vec!["--database".to_owned(), u])
            .unwrap_or_default();
        let data = dir.path().join("data");
        let d = data.to_str().unwrap().to_owned();
        let cmd = |args: &[&str]| {
            let mut all: Vec<&str> = args.to_vec();
            all.extend(["--data", &d]);
            all.extend(db.iter().map(String::as_str));
            stdout(&run(&all)).trim().to_owned()
        };
        cmd(&["card", "init"]);
        let operator = cmd(&["token", "create", "--role", "operator", "--name", "alice"]);
        let verifier = cmd(&[
            "token",
            "create",
            "--role",
            "verifier",
            "--name",
            "billing.example",
        ]);
        let out = dir.path().join("chips");
        cmd(&[
            "factory",
            "provision",
            "--count",
            &count.to_string(),
            "--class",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]);
        Fleet {
            dir,
            db,
            operator,
            verifier,
        }
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    fn chips(&self) -> std::path::PathBuf {
        self.dir.path().join("chips").join("chips.jsonl")
    }

    fn state(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    fn serve(&self) -> Server {
        let extra: Vec<&str> = self.db.iter().map(String::as_str).collect();
        Server::start_with(&self.data(), &extra, &[])
    }

    /// A local command on this fleet's data directory and database.
    fn local(&self, args: &[&str]) -> std::process::Output {
        bin()
            .args(args)
            .arg("--data")
            .arg(self.data())
            .args(&self.db)
            .env("MICROCERT_PASSPHRASE", PASSPHRASE)
            .output()
            .unwrap()
    }
}

#[test]
fn soak_under_kills_keeps_every_acknowledged_change() {
    soak(&Fleet::new(25, None), soak_seconds(), None);
}

/// The same on PostgreSQL, whose server is also restarted under the load
/// every fourth cycle (the center must fail fast while it is gone and
/// recover when it is back, losing nothing it acknowledged).
#[test]
fn soak_on_postgresql_under_kills_and_database_restarts() {
    let Some(pg) = microcert_testkit::postgres::PgServer::start(&["soak"]) else {
        return;
    };
    let seconds = std::env::var("SOAK_PG_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(soak_seconds() / 2);
    soak(&Fleet::new(25, Some(pg.url("soak"))), seconds, Some(&pg));
}

fn soak(setup: &Fleet, seconds: u64, pg: Option<&microcert_testkit::postgres::PgServer>) {
    let all: Vec<String> = std::fs::read_to_string(setup.chips())
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    // One chip is the replay probe, kept out of the load; the others are
    // the fleet. Operators act on the last few of the fleet.
    let dir = setup.dir.path();
    let probe_chips = dir.join("probe.jsonl");
    let fleet_chips = dir.join("fleet.jsonl");
    std::fs::write(&probe_chips, format!("{}\n", all[0])).unwrap();
    std::fs::write(&fleet_chips, all[1..].join("\n") + "\n").unwrap();
    let probe_state = dir.join("probe-state");
    let fleet_state = setup.state();
    let (probe_chips, fleet_chips) = (
        probe_chips.to_str().unwrap().to_owned(),
        fleet_chips.to_str().unwrap().to_owned(),
    );
    let (probe_state_s, fleet_state_s) = (
        probe_state.to_str().unwrap().to_owned(),
        fleet_state.to_str().unwrap().to_owned(),
    );
    let ids: Vec<String> = all[1..]
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["device_id"].as_str().unwrap().to_lowercase()
        })
        .collect();
    let http = Http::new();
    let op = setup.operator.clone();
    let rp = setup.verifier.clone();

    // Enrollment of every chip while the center is steady.
    let mut server = setup.serve();
    for (chips, state) in [
        (&probe_chips, &probe_state_s),
        (&fleet_chips, &fleet_state_s),
    ] {
        let st = wait_bounded(
            simulate(
                &server,
                chips,
                state,
                &rp,
                &["--rounds", "1", "--duration", "20"],
            ),
            Duration::from_secs(60),
        );
        assert!(st.is_some_and(|s| s.success()), "enrollment run");
    }
    let enrolled: BTreeSet<String> = chip_images(&fleet_state)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(enrolled.len(), ids.len(), "every fleet chip enrolled");

    let probe_image = chip_images(&probe_state).remove(0).1;
    let f: fn(&mut [u8]) -> Result<(), EntropyFailure> = os_entropy;
    let mut probe: Chip = SoftChip::from_image(&probe_image, f).unwrap();

    let mut accepted_auths: Vec<Vec<u8>> = Vec::new();
    let mut revoked: Vec<String> = Vec::new();
    let mut suspended: BTreeSet<String> = BTreeSet::new();
    let mut tokens: Vec<String> = Vec::new();
    let mut rss: Vec<u64> = Vec::new();
    let (mut kills, mut clean_stops, mut cycles, mut db_restarts) = (0u32, 0u32, 0u32, 0u32);
    let mut replays_refused = 0u64;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    // Operators act on these, one a cycle, from the end of the fleet.
    let mut victims = ids.iter().rev().take(8).cloned().collect::<Vec<_>>();

    while Instant::now() < deadline {
        cycles += 1;
        let transport = if cycles % 2 == 0 { "http" } else { "coap" };
        let load = simulate(
            &server,
            &fleet_chips,
            &fleet_state_s,
            &rp,
            &[
                "--duration",
                "4",
                "--concurrency",
                "4",
                "--transport",
                transport,
            ],
        );

        // Every AUTH accepted so far is refused by this (restarted) center.
        for a in &accepted_auths {
            let st = http.post(format!("{}/v1/device/auth", server.http), None, a.clone());
            assert_ne!(
                st, 200,
                "an AUTH accepted before a restart is accepted again"
            );
            if st == 409 {
                replays_refused += 1;
            }
        }
        // A fresh AUTH from the probe.
        let mut buf = [0u8; 64];
        let n = probe.auth(now32(), &Audience::CENTER, &mut buf).unwrap();
        let auth = buf[..n].to_vec();
        if http.post(
            format!("{}/v1/device/auth", server.http),
            None,
            auth.clone(),
        ) == 200
        {
            accepted_auths.push(auth);
        }

        // Operators, while the load runs.
        match cycles % 4 {
            0 => {
                if let Some(v) = victims.pop() {
                    let st = http.post(
                        format!("{}/v1/devices/{v}/revoke", server.http),
                        Some(&op),
                        br#"{"reason":"soak"}"#.to_vec(),
                    );
                    if (200..300).contains(&st) {
                        revoked.push(v);
                    }
                }
            }
            1 => {
                let v = &ids[rand_below(8) as usize + 2];
                if !revoked.contains(v) {
                    let action = if suspended.contains(v) {
                        "resume"
                    } else {
                        "suspend"
                    };
                    let st = http.post(
                        format!("{}/v1/devices/{v}/{action}", server.http),
                        Some(&op),
                        br#"{"reason":"soak"}"#.to_vec(),
                    );
                    if (200..300).contains(&st) {
                        if action == "suspend" {
                            suspended.insert(v.clone());
                        } else {
                            suspended.remove(v);
                        }
                    }
                }
            }
            2 => {
                let v = &ids[rand_below(ids.len() as u64) as usize];
                let _ = http.post(
                    format!("{}/v1/devices/{v}/update", server.http),
                    Some(&op),
                    br#"{"reason":"soak"}"#.to_vec(),
                );
            }
            _ => {
                let name = format!("soak-{cycles}");
                let out = setup.local(&["token", "create", "--role", "auditor", "--name", &name]);
                if out.status.success() {
                    tokens.push(stdout(&out).trim().to_owned());
                }
            }
        }

        // The fault: at a random point of the load, a SIGKILL (two cycles
        // in three) or a clean stop; on PostgreSQL every fourth cycle the
        // database goes away under the load and comes back instead.
        std::thread::sleep(Duration::from_millis(300 + rand_below(2500)));
        rss.push(server.rss_kib());
        if let Some(pg) = pg.filter(|_| cycles % 4 == 2) {
            pg.stop();
            std::thread::sleep(Duration::from_millis(500 + rand_below(1500)));
            pg.start_again();
            db_restarts += 1;
            let _ = wait_bounded(load, Duration::from_secs(30));
            // The same center process serves again once the database is back.
            let back = Instant::now() + Duration::from_secs(30);
            let mut ok = false;
            while Instant::now() < back && !ok {
                let (st, _) = http.get_json(format!("{}/v1/devices?limit=1", server.http), &op);
                ok = st == 200;
                if !ok {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            assert!(
                ok,
                "the center did not recover within 30 s of the database's return"
            );
            continue;
        }
        if cycles % 3 == 0 {
            server.stop();
            clean_stops += 1;
        } else {
            server.kill();
            kills += 1;
        }
        let _ = wait_bounded(load, Duration::from_secs(30));
        server = setup.serve();
    }

    // Steady again: let one clean load run finish so commands are obeyed.
    let _ = wait_bounded(
        simulate(
            &server,
            &fleet_chips,
            &fleet_state_s,
            &rp,
            &["--duration", "3", "--concurrency", "4"],
        ),
        Duration::from_secs(40),
    );
    for a in &accepted_auths {
        let st = http.post(format!("{}/v1/device/auth", server.http), None, a.clone());
        assert_ne!(st, 200, "an accepted AUTH is accepted again at the end");
    }
    for v in &revoked {
        let (st, dev) = http.get_json(format!("{}/v1/devices/{v}", server.http), &op);
        assert_eq!(st, 200, "{v}");
        let seeds = dev["seeds"].as_array().unwrap();
        assert!(
            seeds
                .iter()
                .all(|s| s["state"] == "compromised" || s["state"] == "destroyed"),
            "acknowledged revocation of {v} lost: {dev}"
        );
    }
    for v in &suspended {
        let (_, dev) = http.get_json(format!("{}/v1/devices/{v}", server.http), &op);
        assert_eq!(
            dev["state"], "suspended",
            "acknowledged suspension of {v} lost: {dev}"
        );
    }
    for v in &enrolled {
        let (st, dev) = http.get_json(format!("{}/v1/devices/{v}", server.http), &op);
        assert_eq!(st, 200);
        assert!(
            !dev["seeds"].as_array().unwrap().is_empty(),
            "the enrolled seed of {v} is lost"
        );
    }
    for t in &tokens {
        let (st, _) = http.get_json(format!("{}/v1/audit/verify", server.http), t);
        assert_eq!(st, 200, "a token made during the soak does not work");
    }
    let (st, chain) = http.get_json(format!("{}/v1/audit/verify", server.http), &op);
    assert!(st == 200 || st == 403, "{chain}");
    rss.push(server.rss_kib());
    server.stop();

    let check = setup.local(&["integrity", "check-local"]);
    assert!(
        check.status.success(),
        "integrity after the soak: {}{}",
        stdout(&check),
        stderr(&check)
    );
    let audit = setup.local(&["audit", "verify-local"]);
    assert!(
        audit.status.success(),
        "audit chain after the soak: {}{}",
        stdout(&audit),
        stderr(&audit)
    );

    let max = rss.iter().copied().max().unwrap_or(0);
    let min = rss.iter().copied().filter(|&r| r > 0).min().unwrap_or(0);
    println!(
        "soak: {seconds} s, {cycles} cycles, {kills} SIGKILLs, {clean_stops} clean stops, \
         {db_restarts} database restarts; \
         {} AUTHs probed, {replays_refused} replays refused; {} revocations, {} suspensions, \
         {} tokens acknowledged and kept; RSS KiB min {min} max {max} samples {rss:?}",
        accepted_auths.len(),
        revoked.len(),
        suspended.len(),
        tokens.len()
    );
    assert!(cycles >= 3, "the soak ran too few cycles to mean anything");
    assert!(kills >= 1);
    assert!(
        pg.is_none() || db_restarts >= 1,
        "the database was never restarted"
    );
    assert!(
        !accepted_auths.is_empty(),
        "the probe's AUTHs were never accepted"
    );
    assert!(max < 256 * 1024, "resident memory {max} KiB is not bounded");
}
