//! Two real `microcert serve` processes on one PostgreSQL database (issue
//! 8): the same AUTH sent to both at once is accepted exactly once; a
//! device revoked through one is refused by the other within the
//! documented bound (at once through LISTEN/NOTIFY; the seed cache's TTL,
//! `cache_ttl_secs`, 5 s by default, when notifications are lost); a
//! center killed with SIGKILL while the other keeps serving loses nothing
//! it acknowledged.
//!
//! The PostgreSQL server is a throw-away cluster on 127.0.0.1. When
//! PostgreSQL is not installed the test prints why it skipped, unless CI
//! is set: then it fails.

mod harness;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::Server;
use microcert_testkit::nodes::{Chip, chip_auth, chip_from_image};
use microcert_testkit::postgres::PgServer;
use serde_json::Value;

const EXPORT_PASSPHRASE: &str = "key ceremony export passphrase";
/// How soon another center's life-cycle change is seen: NOTIFY delivers it
/// in milliseconds; one second leaves room for a loaded machine and is
/// well under the fallback bound, the default `cache_ttl_secs` (5 s), so a
/// broken notification path fails this test.
const BOUND: Duration = Duration::from_secs(1);

/// The kit's throw-away PostgreSQL (stopped when dropped) with the empty
/// database `microcert`.
struct Postgres(PgServer);

impl Postgres {
    fn start() -> Option<Postgres> {
        PgServer::start(&["microcert"]).map(Postgres)
    }

    fn url(&self) -> String {
        self.0.url("microcert")
    }
}

// ---- the binary, on a database ---------------------------------------------

/// The harness's binary with `MICROCERT_DATABASE` set ("": the data
/// directory's SQLite file).
fn bin(database: &str) -> Command {
    let mut c = harness::bin();
    c.env("MICROCERT_EXPORT_PASSPHRASE", EXPORT_PASSPHRASE)
        .env("MICROCERT_DATABASE", database);
    c
}

fn run(database: &str, args: &[&str]) -> String {
    harness::stdout(&microcert_testkit::process::must(&mut bin(database), args))
}

/// `microcert serve` of the data directory `data` on `database`.
fn serve(database: &str, data: &Path) -> Server {
    Server::start_with(
        data,
        &[],
        &[
            ("MICROCERT_EXPORT_PASSPHRASE", EXPORT_PASSPHRASE),
            ("MICROCERT_DATABASE", database),
        ],
    )
}

/// The card id in "card ID initialised/imported ..." output.
fn card_id(out: &str) -> String {
    out.split_whitespace().nth(1).unwrap().to_owned()
}

/// A fresh AUTH from a chip, for the center's audience.
fn auth(chip: &mut Chip) -> Vec<u8> {
    chip_auth(chip)
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn post_auth(c: &reqwest::Client, server: &str, body: Vec<u8>) -> u16 {
    c.post(format!("{server}/v1/device/auth"))
        .body(body)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[test]
fn two_centers_on_one_postgres() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.url();
    let dir = tempfile::tempdir().unwrap();
    let (data_a, data_b) = (dir.path().join("a"), dir.path().join("b"));
    let made = run(&url, &["card", "init", "--data", data_a.to_str().unwrap()]);
    // The second center's card gets the same keys through the key
    // ceremony: an export sealed under its own passphrase, imported.
    let export = dir.path().join("export.mccard");
    run(
        &url,
        &[
            "card",
            "clone",
            "--data",
            data_a.to_str().unwrap(),
            "--out",
            export.to_str().unwrap(),
        ],
    );
    let imported = run(
        &url,
        &[
            "card",
            "init",
            "--data",
            data_b.to_str().unwrap(),
            "--from",
            export.to_str().unwrap(),
        ],
    );
    assert_eq!(card_id(&made), card_id(&imported));
    let token = |role: &str, name: &str| {
        run(
            &url,
            &[
                "token",
                "create",
                "--data",
                data_a.to_str().unwrap(),
                "--role",
                role,
                "--name",
                name,
            ],
        )
    };
    let operator = token("operator", "alice");
    let verifier = token("verifier", "billing.example");
    let chips_dir = dir.path().join("chips");
    let devices: u32 = 16;
    run(
        &url,
        &[
            "factory",
            "provision",
            "--data",
            data_a.to_str().unwrap(),
            "--count",
            &devices.to_string(),
            "--class",
            "1",
            "--out",
            chips_dir.to_str().unwrap(),
        ],
    );
    let mut a = serve(&url, &data_a);
    let b = serve(&url, &data_b);

    // Enroll every chip through A (the simulator keeps the chip images).
    let state = dir.path().join("state");
    let s: Value = serde_json::from_str(&run(
        &url,
        &[
            "simulate",
            "--server",
            &a.http,
            "--coap",
            &a.coap.to_string(),
            "--transport",
            "http",
            "--chips",
            chips_dir.join("chips.jsonl").to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--duration",
            "2",
            "--concurrency",
            "4",
            "--verifier-token",
            &verifier,
            "--relying-party",
            "billing.example",
            "--json",
        ],
    ))
    .unwrap();
    let enrolled: u64 = s["operations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["op"] == "enroll")
        .map(|o| o["count"].as_u64().unwrap())
        .sum();
    assert_eq!(enrolled, u64::from(devices), "{s}");
    let mut chips: Vec<(String, Chip)> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "img"))
        .map(|e| {
            let id = e.path().file_stem().unwrap().to_string_lossy().into_owned();
            let image = std::fs::read(e.path()).unwrap();
            (id, chip_from_image(&image))
        })
        .collect();
    chips.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(chips.len(), devices as usize);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = client();

    // 0. Tokens live in the shared database (issue 14): one made with A's
    // data directory works at B, one made with B's works at A, and a
    // revocation through either is refused by both within the cache bound.
    let shown = |server: &str, token: &str| {
        bin(&url)
            .args([
                "device",
                "show",
                &chips[14].0,
                "--server",
                server,
                "--token",
                token,
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(shown(&b.http, &operator), "A's token refused at B");
    let carol = run(
        &url,
        &[
            "token",
            "create",
            "--data",
            data_b.to_str().unwrap(),
            "--role",
            "auditor",
            "--name",
            "carol",
            "--ttl",
            "1h",
        ],
    );
    assert!(shown(&a.http, &carol), "B's token refused at A");
    run(
        &url,
        &[
            "token",
            "revoke",
            "--data",
            data_a.to_str().unwrap(),
            "--name",
            "carol",
        ],
    );
    let revoked_at = Instant::now();
    while shown(&a.http, &carol) || shown(&b.http, &carol) {
        assert!(
            revoked_at.elapsed() <= Duration::from_secs(3),
            "a revoked token still works after {:?}",
            revoked_at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(shown(&b.http, &operator));

    // 1. The same AUTH to both centers at once: accepted exactly once.
    let tries = 1000;
    let (mut both, mut none) = (0, 0);
    rt.block_on(async {
        for i in 0..tries {
            let m = auth(&mut chips[i % 12].1);
            let (x, y) = tokio::join!(post_auth(&c, &a.http, m.clone()), post_auth(&c, &b.http, m));
            match (x, y) {
                (200, 409) | (409, 200) => {}
                (200, 200) => both += 1,
                other => {
                    none += 1;
                    eprintln!("try {i}: statuses {other:?}");
                }
            }
        }
    });
    assert_eq!(both, 0, "an AUTH was accepted by both centers");
    assert_eq!(none, 0, "an AUTH was accepted by neither center");

    // 2. Revoked through A, refused by B within the bound. B has the device
    // cached (it just accepted one of its AUTHs).
    let victim = 12;
    rt.block_on(async {
        let m = auth(&mut chips[victim].1);
        assert_eq!(post_auth(&c, &b.http, m).await, 200);
    });
    run(
        &url,
        &[
            "device",
            "revoke",
            &chips[victim].0,
            "--server",
            &a.http,
            "--token",
            &operator,
            "--reason",
            "stolen",
        ],
    );
    let revoked_at = Instant::now();
    let seen_after = rt.block_on(async {
        let m = auth(&mut chips[victim].1);
        assert_eq!(post_auth(&c, &a.http, m).await, 403, "A refuses at once");
        loop {
            let m = auth(&mut chips[victim].1);
            let st = post_auth(&c, &b.http, m).await;
            if st == 403 {
                return revoked_at.elapsed();
            }
            assert_eq!(st, 200);
            assert!(
                revoked_at.elapsed() <= BOUND,
                "B still accepts the revoked device after {:?}",
                revoked_at.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    eprintln!("revocation through A refused by B after {seen_after:?} (bound {BOUND:?})");

    // 3. A is killed with SIGKILL while it acknowledges AUTHs and B keeps
    // serving; every AUTH A acknowledged stays accepted (B refuses it as a
    // replay) and so does A's last life-cycle change.
    run(
        &url,
        &[
            "device",
            "suspend",
            &chips[13].0,
            "--server",
            &a.http,
            "--token",
            &operator,
            "--reason",
            "maintenance",
        ],
    );
    let acked = rt.block_on(async {
        let mut msgs: Vec<Vec<u8>> = Vec::new();
        for round in 0..40 {
            for (_, chip) in chips.iter_mut().take(12) {
                msgs.push(auth(chip));
            }
            let _ = round;
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let http = a.http.clone();
        let sender = {
            let c = c.clone();
            tokio::spawn(async move {
                for m in msgs {
                    let st = post_auth(&c, &http, m.clone()).await;
                    if st == 200 {
                        let _ = tx.send(m);
                    } else if st == 0 {
                        break; // A is gone
                    }
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::task::spawn_blocking(move || {
            a.kill9();
            a
        })
        .await
        .map(drop)
        .unwrap();
        sender.await.unwrap();
        let mut acked = Vec::new();
        while let Ok(m) = rx.try_recv() {
            acked.push(m);
        }
        acked
    });
    assert!(
        acked.len() > 10,
        "A acknowledged {} AUTHs before the kill",
        acked.len()
    );
    assert!(acked.len() < 480, "A was killed before it finished");
    rt.block_on(async {
        for m in &acked {
            assert_eq!(
                post_auth(&c, &b.http, m.clone()).await,
                409,
                "an acknowledged AUTH was lost"
            );
        }
        // B keeps serving fresh AUTHs, and sees A's suspension.
        let m = auth(&mut chips[0].1);
        assert_eq!(post_auth(&c, &b.http, m).await, 200);
        let m = auth(&mut chips[13].1);
        assert_eq!(post_auth(&c, &b.http, m).await, 403, "A's suspension lost");
    });
    drop(b);
    drop(pg);
}

/// `card clone` by M-of-N shares and `card init --from-shares`; and what
/// must be refused: too few shares, a wrong export passphrase, an import
/// over an existing card.
#[test]
fn card_clone_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let made = run("", &["card", "init", "--data", &d("a")]);
    run(
        "",
        &[
            "card",
            "clone",
            "--data",
            &d("a"),
            "--shares",
            "3",
            "--threshold",
            "2",
            "--out",
            &d("shares"),
        ],
    );
    let share = |i: u32| {
        std::fs::read_to_string(
            dir.path()
                .join("shares")
                .join(format!("share-{i}-of-3.txt")),
        )
        .unwrap()
    };
    std::fs::write(dir.path().join("two"), share(1) + &share(3)).unwrap();
    std::fs::write(dir.path().join("one"), share(2)).unwrap();
    let imported = run(
        "",
        &[
            "card",
            "init",
            "--data",
            &d("b"),
            "--from-shares",
            &d("two"),
        ],
    );
    assert_eq!(card_id(&made), card_id(&imported));
    let refused = |args: &[&str], env: &[(&str, &str)]| {
        let out = bin("")
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success(), "microcert {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    refused(
        &[
            "card",
            "init",
            "--data",
            &d("c"),
            "--from-shares",
            &d("one"),
        ],
        &[],
    );
    assert!(!dir.path().join("c").join("card.mccard").exists());
    // Passphrase mode: the export opens only under the export passphrase.
    run(
        "",
        &["card", "clone", "--data", &d("a"), "--out", &d("export")],
    );
    let err = refused(
        &["card", "init", "--data", &d("e"), "--from", &d("export")],
        &[("MICROCERT_EXPORT_PASSPHRASE", "not the export passphrase")],
    );
    assert!(!err.contains("not the export passphrase"), "{err}");
    refused(
        &["card", "init", "--data", &d("b"), "--from", &d("export")],
        &[],
    );
    refused(
        &["card", "clone", "--data", &d("a"), "--out", &d("same")],
        &[("MICROCERT_EXPORT_PASSPHRASE", harness::PASSPHRASE)],
    );
    let imported = run(
        "",
        &["card", "init", "--data", &d("e"), "--from", &d("export")],
    );
    assert_eq!(card_id(&made), card_id(&imported));
}

/// SQLite is one process per file: a second `serve` on the same data
/// directory stops with a clear error while the first keeps serving.
#[test]
fn second_serve_on_one_sqlite_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    run("", &["card", "init", "--data", data.to_str().unwrap()]);
    let first = serve("", &data);
    let out = bin("")
        .args(["serve", "--data"])
        .arg(&data)
        .args(["--http", "127.0.0.1:0", "--coap", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("serve.lock"), "{err}");
    // The first one still answers.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let st = rt.block_on(post_auth(&client(), &first.http, vec![1, 2, 3]));
    assert_eq!(st, 400);
    drop(first);
    // Once it has stopped, the directory can be served again.
    let again = serve("", &data);
    drop(again);
}
