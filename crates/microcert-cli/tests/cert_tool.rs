//! The offline `microcert cert` tool against the committed known-answer
//! vectors of the core (crates/microcert-core/testdata/kat.txt): its output
//! must be the bytes printed in docs/protocol.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KAT: &str = include_str!("../../microcert-core/testdata/kat.txt");

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_microcert"))
}

/// The file's global fields and its vectors, each a map of NAME = value.
fn vectors() -> (HashMap<String, String>, Vec<HashMap<String, String>>) {
    let mut global = HashMap::new();
    let mut all: Vec<HashMap<String, String>> = Vec::new();
    for line in KAT.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let (k, v) = (k.trim().to_owned(), v.trim().to_owned());
        if k == "COUNT" {
            all.push(HashMap::new());
        }
        match all.last_mut() {
            Some(vector) => vector.insert(k, v),
            None => global.insert(k, v),
        };
    }
    (global, all)
}

struct Fixture {
    dir: tempfile::TempDir,
    base_year: String,
}

impl Fixture {
    fn new() -> Self {
        let (global, _) = vectors();
        let dir = tempfile::tempdir().unwrap();
        let seed = hex::decode(&global["SEED"]).unwrap();
        assert_eq!(seed.len(), 976);
        std::fs::write(dir.path().join("seed.bin"), seed).unwrap();
        Fixture {
            dir,
            base_year: global["BASE_YEAR"].clone(),
        }
    }

    fn seed(&self) -> PathBuf {
        self.dir.path().join("seed.bin")
    }

    fn data_file(&self, count: &str, hex_data: &str) -> PathBuf {
        let p = self.dir.path().join(format!("data-{count}.bin"));
        std::fs::write(&p, hex::decode(hex_data).unwrap()).unwrap();
        p
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn seed_args<'a>(cmd: &'a mut Command, f: &Fixture) -> &'a mut Command {
    cmd.arg("--seed")
        .arg(f.seed())
        .arg("--base-year")
        .arg(&f.base_year)
}

fn makeable(ty: &str) -> bool {
    matches!(ty, "auth" | "auth-response" | "signature" | "sealed")
}

#[test]
fn make_reproduces_every_known_answer_vector() {
    let f = Fixture::new();
    let (_, vectors) = vectors();
    let mut checked = 0;
    for v in vectors.iter().filter(|v| makeable(&v["TYPE"])) {
        let mut cmd = bin();
        cmd.args(["cert", "make", &v["TYPE"]]);
        seed_args(&mut cmd, &f);
        cmd.args(["--device", &v["DEVICE"], "--generation", &v["GENERATION"]]);
        cmd.args([
            "--time",
            &v["TIME"],
            "--nonce",
            &v["NONCE"],
            "--suite",
            &v["SUITE"],
        ]);
        if let Some(a) = v.get("AUDIENCE") {
            cmd.args(["--audience", a]);
        }
        if let Some(c) = v.get("CHALLENGE") {
            cmd.args(["--challenge", c]);
        }
        if let Some(d) = v.get("DATA") {
            cmd.arg("--data").arg(f.data_file(&v["COUNT"], d));
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "COUNT {}: {out:?}", v["COUNT"]);
        assert_eq!(
            stdout(&out),
            v["MESSAGE"],
            "COUNT {} ({})",
            v["COUNT"],
            v["TYPE"]
        );
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} makeable vectors in kat.txt");
}

fn verify(f: &Fixture, v: &HashMap<String, String>, message: &str) -> Output {
    let mut cmd = bin();
    cmd.args(["cert", "verify"]);
    seed_args(&mut cmd, f);
    if let Some(a) = v.get("AUDIENCE") {
        cmd.args(["--audience", a]);
    }
    if v["TYPE"] == "signature" {
        cmd.arg("--data").arg(f.data_file(&v["COUNT"], &v["DATA"]));
    }
    cmd.arg(message).output().unwrap()
}

#[test]
fn verify_accepts_each_vector_and_refuses_a_flipped_bit() {
    let f = Fixture::new();
    let (_, vectors) = vectors();
    let mut checked = 0;
    for v in vectors.iter().filter(|v| makeable(&v["TYPE"])) {
        let good = verify(&f, v, &v["MESSAGE"]);
        assert_eq!(
            good.status.code(),
            Some(0),
            "COUNT {}: {good:?}",
            v["COUNT"]
        );
        assert_eq!(stdout(&good), "valid");

        let mut bytes = hex::decode(&v["MESSAGE"]).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let bad = verify(&f, v, &hex::encode(&bytes));
        assert_eq!(bad.status.code(), Some(1), "COUNT {}", v["COUNT"]);
        assert_eq!(stdout(&bad), "invalid: verification-failed");
        checked += 1;
    }
    assert!(checked >= 8);
}

#[test]
fn open_returns_the_sealed_plaintext() {
    let f = Fixture::new();
    let (_, vectors) = vectors();
    let v = vectors
        .iter()
        .find(|v| v["TYPE"] == "sealed")
        .expect("a sealed vector");
    let mut cmd = bin();
    cmd.args(["cert", "open"]);
    seed_args(&mut cmd, &f);
    let out = cmd
        .args(["--audience", &v["AUDIENCE"], &v["MESSAGE"]])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), v["DATA"]);
}

#[test]
fn inspect_prints_the_header_fields() {
    let (_, vectors) = vectors();
    let v = vectors.iter().find(|v| v["TYPE"] == "auth").unwrap();
    let out = bin()
        .args(["cert", "inspect", &v["MESSAGE"]])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("type: AUTH (1)"), "{text}");
    assert!(text.contains(&format!("device: {}", v["DEVICE"])), "{text}");
    assert!(text.contains(&format!("time: {} (", v["TIME"])), "{text}");
    assert!(text.contains(&format!("nonce: {}", v["NONCE"])), "{text}");
}

#[test]
fn malformed_input_is_invalid_not_an_error() {
    let f = Fixture::new();
    for junk in ["zz", "", "21", "1101"] {
        let mut cmd = bin();
        cmd.args(["cert", "verify"]);
        seed_args(&mut cmd, &f);
        let out = cmd.arg(junk).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{junk:?}: {out:?}");
        assert_eq!(stdout(&out), "invalid: malformed", "{junk:?}");
    }
}

#[test]
fn usage_errors_exit_2_with_a_message() {
    let f = Fixture::new();
    let short_seed = f.dir.path().join("short.bin");
    std::fs::write(&short_seed, [0u8; 100]).unwrap();
    let base = |seed: &Path| {
        let mut cmd = bin();
        cmd.args(["cert", "make", "auth", "--base-year", "2026", "--seed"])
            .arg(seed)
            .args(["--generation", "0", "--time", "1790000000"])
            .args(["--nonce", "0123456789abcdef"]);
        cmd
    };
    let cases: Vec<(Command, &str)> = vec![
        (
            {
                let mut c = base(&short_seed);
                c.args(["--device", "0102030405060708"]);
                c
            },
            "exactly 976",
        ),
        (
            {
                let mut c = base(&f.seed());
                c.args(["--device", "0102"]);
                c
            },
            "16 hex digits",
        ),
        (
            {
                let mut c = base(&f.seed());
                c.args(["--device", "0102030405060708", "--suite", "3"]);
                c
            },
            "suite",
        ),
    ];
    for (mut cmd, needle) in cases {
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "expected {needle:?} in {err}");
    }
    // auth-response without its challenge
    let mut cmd = bin();
    cmd.args(["cert", "make", "auth-response"]);
    seed_args(&mut cmd, &f);
    let out = cmd
        .args(["--device", "0102030405060708", "--generation", "0"])
        .args(["--time", "1790000000", "--nonce", "0123456789abcdef"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--challenge"));
}

#[test]
fn an_expired_seed_is_named() {
    let f = Fixture::new();
    let (_, vectors) = vectors();
    let v = vectors.iter().find(|v| v["TYPE"] == "auth").unwrap();
    // The same message checked with a seed that claims to start six years later.
    let out = bin()
        .args(["cert", "verify", "--seed"])
        .arg(f.seed())
        .args(["--base-year", "2032", &v["MESSAGE"]])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out), "invalid: seed-not-yet-valid");
}
