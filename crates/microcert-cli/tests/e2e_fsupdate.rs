//! End to end, issue 17 item 2: a Class 2 fleet on the real `microcert`
//! binary updates its seeds with forward secrecy (protocol v1.2,
//! UPDATE_SEED_FS and the ephemeral ECDH on P-256) over CoAP and HTTP, and
//! keeps authenticating with the new seeds.

mod harness;

use std::path::PathBuf;

use harness::{Server, Setup, run, stdout};
use microcert_core::{Command, Opcode};
use serde_json::Value;

const FLEET: usize = 3;

fn simulate(server: &Server, chips: &str, state: &str, transport: &str, verifier: &str) -> Value {
    let out = run(&[
        "simulate",
        "--server",
        &server.http,
        "--coap",
        &server.coap.to_string(),
        "--transport",
        transport,
        "--chips",
        chips,
        "--state",
        state,
        "--rounds",
        "2",
        "--duration",
        "60",
        "--concurrency",
        "3",
        "--verifier-token",
        verifier,
        "--relying-party",
        "billing.example",
        "--json",
    ]);
    serde_json::from_str(&stdout(&out)).unwrap()
}

fn count(s: &Value, name: &str) -> u64 {
    s["operations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["op"] == name)
        .map_or(0, |o| o["count"].as_u64().unwrap())
}

fn total_refused(s: &Value) -> u64 {
    s["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum()
}

/// The pending COMMAND of a device, as a node fetches it over HTTP.
fn pending_command(server: &Server, id: &str) -> Vec<u8> {
    let url = format!("{}/v1/device/{id}/command", server.http);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let r = reqwest::Client::new().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200, "a command is pending for {id}");
        r.bytes().await.unwrap().to_vec()
    })
}

#[test]
fn a_class_2_fleet_updates_its_seeds_with_forward_secrecy() {
    let setup = Setup::new(1);
    let data = setup.data();
    let d = data.to_str().unwrap();
    let out: PathBuf = setup.dir.path().join("class2");
    run(&[
        "factory",
        "provision",
        "--data",
        d,
        "--count",
        &FLEET.to_string(),
        "--class",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let chips = out.join("chips.jsonl");
    let chips = chips.to_str().unwrap();
    let state = setup.dir.path().join("state2");
    let state = state.to_str().unwrap();
    let ids: Vec<String> = std::fs::read_to_string(chips)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["class"], 2);
            v["device_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), FLEET);
    let server = Server::start(&data);
    let device = |args: &[&str]| {
        let mut all = vec!["device", args[0], "--server", &server.http];
        all.extend_from_slice(&["--token", &setup.operator]);
        all.extend_from_slice(&args[1..]);
        run(&all)
    };

    // Enrolled over CoAP and in use.
    let s = simulate(&server, chips, state, "coap", &setup.verifier);
    assert_eq!(count(&s, "enroll"), FLEET as u64, "{s}");
    assert_eq!(total_refused(&s), 0, "{s}");

    // The operator asks every device for an update: each gets an
    // UPDATE_SEED_FS carrying a fresh center key (69 bytes, suite 0x01).
    let mut keys = Vec::new();
    for id in &ids {
        device(&["update", id, "--reason", "forward-secret roll-out"]);
        let cmd = pending_command(&server, id);
        assert_eq!(cmd.len(), 69);
        let c = Command::decode(&cmd).unwrap();
        assert_eq!(c.opcode, Opcode::UPDATE_SEED_FS);
        keys.push(*c.ephemeral.unwrap());
    }
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), FLEET, "one ephemeral key per update");

    // The nodes answer over HTTP; the center accepts every EnrollFs.
    let s = simulate(&server, chips, state, "http", &setup.verifier);
    assert_eq!(count(&s, "update-enroll"), FLEET as u64, "{s}");
    assert_eq!(total_refused(&s), 0, "{s}");

    // Over CoAP with the new seeds: generation 1 in use, nothing refused.
    let s = simulate(&server, chips, state, "coap", &setup.verifier);
    assert!(count(&s, "auth") >= FLEET as u64, "{s}");
    assert_eq!(total_refused(&s), 0, "{s}");
    for id in &ids {
        let v: Value = serde_json::from_str(&stdout(&device(&["show", id, "--json"]))).unwrap();
        let seeds = v["seeds"].as_array().unwrap();
        assert_eq!(seeds.len(), 2, "{v}");
        assert_eq!(seeds[1]["generation"], 1, "{v}");
        assert_eq!(seeds[1]["state"], "active", "{v}");
    }
}
