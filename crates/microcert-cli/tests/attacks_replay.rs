//! Issue 12, attack 1 against the real binary: an AUTH accepted, the
//! center killed (SIGKILL), restarted, stopped cleanly (SIGTERM), started
//! again, and the same AUTH bytes sent once more over HTTP. Before the fix
//! the last start had forgotten the floor of the unclean restart and
//! accepted it a second time (200); now it is refused as a replay (409) on
//! every start.

mod harness;

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

/// The one chip the simulator enrolled and kept in `state`.
fn enrolled_chip(state: &std::path::Path) -> Chip {
    let mut images: Vec<_> = std::fs::read_dir(state)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "img"))
        .collect();
    assert_eq!(images.len(), 1, "one chip image in {}", state.display());
    let image = std::fs::read(images.remove(0).path()).unwrap();
    let f: fn(&mut [u8]) -> Result<(), EntropyFailure> = os_entropy;
    SoftChip::from_image(&image, f).unwrap()
}

/// POSTs an AUTH to /v1/device/auth; the HTTP status (0 if no answer).
fn post_auth(rt: &tokio::runtime::Runtime, server: &Server, body: &[u8]) -> u16 {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    rt.block_on(async {
        c.post(format!("{}/v1/device/auth", server.http))
            .body(body.to_vec())
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    })
}

/// Enrolls the setup's one chip through `server` (the simulator keeps
/// its image) and returns it.
fn enroll(setup: &Setup, server: &Server) -> Chip {
    run(&[
        "simulate",
        "--server",
        &server.http,
        "--coap",
        &server.coap.to_string(),
        "--transport",
        "http",
        "--chips",
        setup.chips().to_str().unwrap(),
        "--state",
        setup.state().to_str().unwrap(),
        "--rounds",
        "1",
        "--duration",
        "30",
        "--concurrency",
        "1",
    ]);
    enrolled_chip(&setup.state())
}

/// A fresh AUTH of `chip` at the current time.
fn fresh_auth(chip: &mut Chip) -> Vec<u8> {
    let mut buf = [0u8; 64];
    let n = chip.auth(now32(), &Audience::CENTER, &mut buf).unwrap();
    buf[..n].to_vec()
}

#[test]
fn replay_after_kill_restart_and_clean_stop_is_refused() {
    let setup = Setup::new(1);
    let server = Server::start(&setup.data());
    let mut chip = enroll(&setup, &server);
    let auth = fresh_auth(&mut chip);
    let rt = tokio::runtime::Runtime::new().unwrap();

    assert_eq!(post_auth(&rt, &server, &auth), 200, "the first AUTH");
    assert_eq!(
        post_auth(&rt, &server, &auth),
        409,
        "replay in the same run"
    );
    server.kill();

    // Restarted after the crash: the floor refuses it.
    let server = Server::start(&setup.data());
    assert_eq!(post_auth(&rt, &server, &auth), 409, "after SIGKILL");
    server.stop();

    // Started again after a clean stop: still refused (the attack).
    for round in 0..2 {
        let server = Server::start(&setup.data());
        assert_eq!(
            post_auth(&rt, &server, &auth),
            409,
            "the same AUTH after a crash, a restart and clean stop ({round})"
        );
        server.stop();
    }
}

/// `microcert clock status` and `clock confirm` over the operator API: a
/// clock-step alarm (here a flag forged in the database from outside,
/// which fails its card tag and so counts as an alarm) is shown until an
/// operator confirms the time.
#[test]
fn clock_status_and_confirm() {
    let setup = Setup::new(1);
    let server = Server::start(&setup.data());
    let clock = |cmd: &str| {
        try_run(&[
            "clock",
            cmd,
            "--server",
            &server.http,
            "--token",
            &setup.operator,
        ])
    };
    let ok = clock("status");
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    assert!(stdout(&ok).contains("clock ok"), "{}", stdout(&ok));
    let db = setup.data().join("center.db");
    let edit = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(
            "INSERT OR REPLACE INTO marks (name, value, tag) VALUES ('clock_alarm', 12345, x'00');",
        )
        .status()
        .unwrap();
    assert!(edit.success());
    let alarm = clock("status");
    assert_eq!(alarm.status.code(), Some(1), "{}", stdout(&alarm));
    assert!(stdout(&alarm).contains("CLOCK STEP"), "{}", stdout(&alarm));
    let confirm = clock("confirm");
    assert_eq!(confirm.status.code(), Some(0), "{}", stderr(&confirm));
    let ok = clock("status");
    assert_eq!(ok.status.code(), Some(0), "{}", stdout(&ok));
    server.stop();
}

/// Gap 1 against the real binary, on one data directory (one setup: each
/// costs about half a minute in a debug build):
///
/// 1. The replay guard's state file (`center.db-replay`) copied after a
///    clean stop, AUTH b accepted in the next run, the copy put back after
///    that run's clean stop. Before the fix the copy read as the latest
///    clean stop and b was accepted a second time (200); the start counter
///    in the key database now shows the copy is older, and b is refused as
///    a replay (409).
/// 2. The state file and the key database's `memory_guard` row both
///    deleted after a clean stop. Before the fix this read as a first
///    start and the last AUTHs were accepted again (200).
#[test]
fn an_older_or_deleted_state_file_reopens_no_replay() {
    if !require_tool("sqlite3", "apt-get install sqlite3") {
        return;
    }
    let setup = Setup::new(1);
    let server = Server::start(&setup.data());
    let mut chip = enroll(&setup, &server);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = fresh_auth(&mut chip);
    assert_eq!(post_auth(&rt, &server, &a), 200, "AUTH a");
    server.stop();
    let state = setup.data().join("center.db-replay");
    let copy = std::fs::read(&state).unwrap();

    let server = Server::start(&setup.data());
    let b = fresh_auth(&mut chip);
    assert_eq!(post_auth(&rt, &server, &b), 200, "AUTH b");
    server.stop();

    // 1. The older copy put back.
    std::fs::write(&state, &copy).unwrap();
    let server = Server::start(&setup.data());
    assert_eq!(
        post_auth(&rt, &server, &b),
        409,
        "b replayed after the copy was put back"
    );
    assert_eq!(post_auth(&rt, &server, &a), 409, "a replayed");
    server.stop();

    // 2. The file and its marker deleted.
    std::fs::remove_file(&state).unwrap();
    let edit = std::process::Command::new("sqlite3")
        .arg(setup.data().join("center.db"))
        .arg("DELETE FROM marks WHERE name = 'memory_guard';")
        .status()
        .unwrap();
    assert!(edit.success());
    let server = Server::start(&setup.data());
    assert_eq!(
        post_auth(&rt, &server, &b),
        409,
        "b replayed after the deletion"
    );
    assert_eq!(
        post_auth(&rt, &server, &a),
        409,
        "a replayed after the deletion"
    );
    server.stop();
}
