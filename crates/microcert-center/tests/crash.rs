//! A batch import killed with SIGKILL half-way leaves no partial record,
//! and resuming it ends where an uninterrupted import ends.
//!
//! The test runs its own test binary again as the child (the
//! `MC_CRASH_CHILD` variable switches `child_import` on), waits until the
//! child has committed a few chunks, and kills it.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use microcert_center::{Center, CenterConfig, KdfParams, SoftwareCard};
use sha2::{Digest, Sha256};

const N: u64 = 600;
const CHUNK: usize = 50;
const PASS: &[u8] = b"crash test";

fn center(location: &str, card: Arc<SoftwareCard>) -> Center {
    let config = CenterConfig {
        import_chunk: CHUNK,
        ..CenterConfig::default()
    };
    Center::open_url(location, card, config).unwrap()
}

/// The child: imports slowly, printing each committed chunk.
#[test]
fn child_import() {
    let Ok(dir) = std::env::var("MC_CRASH_CHILD") else {
        return; // only meaningful as the child of `killed_import_resumes`
    };
    let dir = Path::new(&dir);
    let card = Arc::new(SoftwareCard::open(&dir.join("card"), PASS).unwrap());
    let location = std::env::var("MC_CRASH_DB").unwrap();
    let c = center(&location, card);
    c.import_batch(&dir.join("batch.jsonl"), "factory", NOW, &mut |p| {
        println!("committed {}", p.lines_done);
        std::thread::sleep(std::time::Duration::from_millis(150));
    })
    .unwrap();
    println!("finished");
}

/// Everything about a device that must not depend on how the import ran
/// (ciphertexts and receipts carry fresh randomness, so seeds are compared
/// opened).
fn snapshot(c: &Center) -> Vec<String> {
    let mut out = Vec::new();
    for s in c.database().scan_seeds(None, 1_000_000).unwrap() {
        let dev = c.device(s.device).unwrap().unwrap().device;
        let seed = c
            .card()
            .unseal_seed(
                s.device,
                s.generation,
                s.kstore_version,
                &s.ciphertext.unwrap().0,
            )
            .unwrap();
        out.push(format!(
            "{} class={} suite={} epoch={} open={} hi={:?} gen={} state={} base={} via={} enroll={} seed={}",
            s.device,
            dev.class,
            dev.suite,
            dev.epoch,
            dev.transport_open,
            dev.highest_generation,
            s.generation,
            s.state,
            s.base_year,
            s.via.name(),
            hex::encode(s.enroll_digest),
            hex::encode(Sha256::digest(seed.expose())),
        ));
    }
    out
}

fn killed_import_resumes(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(
        SoftwareCard::init(
            &dir.path().join("card"),
            PASS,
            KdfParams::insecure_for_tests(),
        )
        .unwrap(),
    );
    let mut fleet = make_fleet(&*card, N);
    let batch = dir.path().join("batch.jsonl");
    write_batch(&batch, &mut fleet, NOW);

    let killed_db = backend.location(dir.path(), "killed.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_import", "--exact", "--nocapture", "--test-threads=1"])
        .env("MC_CRASH_CHILD", dir.path())
        .env("MC_CRASH_DB", &killed_db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut committed = 0;
    while committed < 3 {
        let line = lines.next().expect("child output").unwrap();
        if line.starts_with("committed") {
            committed += 1;
        }
        assert_ne!(line, "finished", "the child finished before it was killed");
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());

    // No partial record: whole chunks only, every device with its seed.
    let killed = center(&killed_db, card.clone());
    let devices = killed
        .list_devices(&microcert_center::DeviceQuery {
            limit: 10_000,
            ..Default::default()
        })
        .unwrap();
    let n = devices.len();
    assert!(
        n >= 3 * CHUNK && n < N as usize,
        "{n} devices after the kill"
    );
    assert_eq!(n % CHUNK, 0, "a chunk was committed in part");
    assert!(devices.iter().all(|d| d.seeds.len() == 1));
    assert!(killed.integrity_scan().unwrap().is_clean());
    assert_eq!(killed.verify_audit_chain().unwrap(), None);

    // Resume.
    let report = killed
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    assert_eq!(report.resumed_after as usize, n);
    assert_eq!(report.enrolled as usize, N as usize - n);
    assert!(report.rejected.is_empty());

    // The same as an uninterrupted import.
    let whole = center(&backend.location(dir.path(), "whole.db"), card.clone());
    assert_eq!(
        whole
            .import_batch(&batch, "factory", NOW, &mut |_| {})
            .unwrap()
            .enrolled,
        N
    );
    let (a, b) = (snapshot(&killed), snapshot(&whole));
    assert_eq!(a.len(), N as usize);
    assert_eq!(a, b);
    assert!(killed.integrity_scan().unwrap().is_clean());
}

both_backends!(killed_import_resumes);
