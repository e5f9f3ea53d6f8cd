//! `factory provision` killed at each step, and `microcert import` of a
//! factory batch through a running center with its progress stream.
//!
//! The invariant: a run killed anywhere leaves either a complete
//! chips.jsonl whose devices are all registered, or no chips.jsonl and a
//! chips.jsonl.partial listing every device the run registered, which
//! `factory provision --recover` turns into the consistent pair.

mod harness;

use std::collections::BTreeSet;
use std::path::Path;

use harness::*;
use microcert_center::lines::FactoryLine;

fn registered(db: &Path) -> BTreeSet<String> {
    let o = std::process::Command::new("sqlite3")
        .arg(db)
        .arg("SELECT lower(hex(id)) FROM devices")
        .output()
        .expect("sqlite3 (the tests need it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn listed(file: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<FactoryLine<'_>>(l)
                .unwrap()
                .device_id
                .into_owned()
        })
        .collect()
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn factory_provision_killed_at_each_step_leaves_a_recoverable_consistent_pair() {
    // Chunks of 1,000: 1,500 chips are two chunks.
    for (point, registered_then) in [
        ("lines:0", 0),
        ("commit:0", 1000),
        ("lines:1", 1000),
        ("commit:1", 1500),
        ("rename:0", 1500),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let out = dir.path().join("chips");
        run(&["card", "init", "--data", data.to_str().unwrap()]);
        let args = [
            "factory",
            "provision",
            "--data",
            data.to_str().unwrap(),
            "--count",
            "1500",
            "--out",
            out.to_str().unwrap(),
        ];
        let o = bin()
            .args(args)
            .env("MICROCERT_FACTORY_FAULT", point)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{point}: the fault point did not fire");
        let chips = out.join("chips.jsonl");
        let partial = out.join("chips.jsonl.partial");
        assert!(!chips.exists(), "{point}: chips.jsonl appeared incomplete");
        let reg = registered(&data.join("center.db"));
        assert_eq!(reg.len(), registered_then, "{point}");
        let part = listed(&partial);
        assert!(
            reg.is_subset(&part),
            "{point}: a registered device is missing from the partial file"
        );
        #[cfg(unix)]
        assert_eq!(mode(&partial), 0o600);

        // A new run refuses to start over the interrupted one.
        let o = try_run(&args);
        assert!(!o.status.success(), "{point}: ran over a partial file");
        assert!(stderr(&o).contains("--recover"), "{}", stderr(&o));

        run(&[
            "factory",
            "provision",
            "--recover",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!partial.exists());
        assert_eq!(listed(&chips), reg, "{point}: not the consistent pair");
        #[cfg(unix)]
        assert_eq!(mode(&chips), 0o600);
    }
}

#[test]
fn factory_provision_uninterrupted_writes_every_registered_device() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("chips");
    run(&["card", "init", "--data", data.to_str().unwrap()]);
    run(&[
        "factory",
        "provision",
        "--data",
        data.to_str().unwrap(),
        "--count",
        "2100",
        "--out",
        out.to_str().unwrap(),
    ]);
    let chips = out.join("chips.jsonl");
    assert!(!out.join("chips.jsonl.partial").exists());
    let reg = registered(&data.join("center.db"));
    assert_eq!(reg.len(), 2100);
    assert_eq!(listed(&chips), reg);
    // An unknown class is refused at once (it used to loop forever).
    let o = try_run(&[
        "factory",
        "provision",
        "--data",
        data.to_str().unwrap(),
        "--count",
        "1",
        "--class",
        "4",
        "--out",
        dir.path().join("c4").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("class 4"), "{}", stderr(&o));
}
