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

/// `microcert import` of 1,100 chips (a batch above the old 2 MiB body
/// limit) through a running center: the summary comes from the center's
/// progress stream; the same file again is resumed, nothing redone.
#[test]
fn cli_import_streams_a_batch_above_2_mib_and_resumes() {
    use microcert_center::lines::ImportLine;
    use microcert_core::{DeviceId, EnrollKey, Header, Key128, KeySeed, Suite, make_enroll};
    let setup = Setup::new(1100);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let year = u16::try_from(microcert_core::time::date_of(now as i64).year).unwrap();
    let mut batch = Vec::new();
    let mut buf = [0u8; 1100];
    let chips = std::fs::read_to_string(setup.chips()).unwrap();
    for (i, l) in chips.lines().enumerate() {
        let chip: FactoryLine<'_> = serde_json::from_str(l).unwrap();
        let mut id = [0u8; 8];
        hex::decode_to_slice(chip.device_id.as_bytes(), &mut id).unwrap();
        let mut k = [0u8; 16];
        hex::decode_to_slice(chip.transport_key.as_bytes(), &mut k).unwrap();
        let seed = KeySeed::generate(year, |b| {
            for (j, x) in b.iter_mut().enumerate() {
                *x = (i as u8).wrapping_mul(29).wrapping_add(j as u8);
            }
        });
        let h = Header {
            suite: Suite::new(chip.suite).unwrap(),
            device: DeviceId(id),
            generation: 0,
            t: now as u32,
            r: i as u64,
        };
        let len = make_enroll(
            EnrollKey::Transport(&Key128::from_bytes(k)),
            &seed,
            &h,
            &mut buf,
        )
        .unwrap();
        serde_json::to_writer(
            &mut batch,
            &ImportLine {
                device_id: chip.device_id.clone(),
                class: chip.class,
                epoch: chip.epoch,
                enroll: hex::encode(&buf[..len]).into(),
            },
        )
        .unwrap();
        batch.push(b'\n');
    }
    assert!(batch.len() > 2 << 20, "{} bytes", batch.len());
    let file = setup.dir.path().join("batch.jsonl");
    std::fs::write(&file, &batch).unwrap();
    let server = Server::start(&setup.data());
    let import = || {
        let o = run(&[
            "import",
            "--server",
            &server.http,
            "--token",
            &setup.operator,
            "--json",
            file.to_str().unwrap(),
        ]);
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()
    };
    let v = import();
    assert_eq!(v["lines"], 1100);
    assert_eq!(v["enrolled"], 1100);
    assert_eq!(v["resumed_after"], 0);
    let v = import();
    assert_eq!(v["enrolled"], 0);
    assert_eq!(v["resumed_after"], 1100);
    server.stop();
}
