//! Errors the CLI must report at once, with a clear message.

mod harness;

use std::time::{Duration, Instant};

use harness::{bin, run};

/// `factory provision --class 4` (no such class profile) used to retry
/// forever: "id taken" and "no such class" were the same `Refused`. Now
/// only `AlreadyRegistered` draws another id; any other error ends the
/// command with its message.
#[test]
fn factory_provision_of_an_unknown_class_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    run(&["card", "init", "--data", data.to_str().unwrap()]);
    let out = dir.path().join("chips");
    let mut child = bin()
        .args([
            "factory",
            "provision",
            "--data",
            data.to_str().unwrap(),
            "--count",
            "1",
            "--class",
            "4",
            "--out",
            out.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("factory provision --class 4 still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "accepted a class without a profile");
    assert!(
        err.contains("no profile for device class 4"),
        "unclear error: {err}"
    );
}
