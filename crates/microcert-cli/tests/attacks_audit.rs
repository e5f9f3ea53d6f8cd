//! Audit completeness of the real binary (issue 15 item 5): `card clone`,
//! `card split` and `card recover` are recorded in the configured
//! database's audit log or refused, and a configured audit sink that
//! cannot record refuses the change.

mod harness;

use std::path::Path;

use harness::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The actions of the audit log of the data directory `data`.
fn actions(data: &Path) -> Vec<serde_json::Value> {
    let out = run(&["audit", "export-local", "--data", s(data)]);
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn count(data: &Path, action: &str) -> usize {
    actions(data)
        .iter()
        .filter(|e| e["action"] == action)
        .count()
}

fn failed(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = bin().args(args).envs(env.iter().copied()).output().unwrap();
    assert!(!out.status.success(), "microcert {args:?} succeeded");
    assert!(
        out.stdout.is_empty(),
        "nothing printed by a refused {args:?}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Attack: an insider with the data directory and its passphrase copies
/// the card's keys out (`card split`, `card clone`) or makes a second card
/// (`card recover`) and nothing in the audit log shows it. Defence: each
/// is an audit entry in the configured database (the one `serve` uses)
/// before the keys leave; a database that cannot record it refuses the
/// command, unless --unaudited says so explicitly (with a warning).
#[test]
fn card_exports_are_audited_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    run(&["card", "init", "--data", s(&a)]);
    // Before any `serve`: the database is made so that the log starts
    // with the export.
    let out = run(&[
        "card",
        "split",
        "--data",
        s(&a),
        "--shares",
        "3",
        "--threshold",
        "2",
    ]);
    let shares = stdout(&out);
    assert_eq!(shares.lines().count(), 3);
    assert_eq!(count(&a, "card-split"), 1);
    run_with(
        &[
            "card",
            "clone",
            "--data",
            s(&a),
            "--out",
            s(&dir.path().join("x")),
        ],
        &[("MICROCERT_EXPORT_PASSPHRASE", "another passphrase")],
    );
    assert_eq!(count(&a, "card-clone"), 1);
    let e = actions(&a).pop().unwrap();
    assert!(e["reason"].as_str().unwrap().contains("export passphrase"));
    assert!(e["actor"].as_str().unwrap().starts_with("cli"));

    // A database that cannot be opened: refused, nothing printed or written.
    let bad = dir.path().join("not-a-dir");
    std::fs::write(&bad, b"a file").unwrap();
    let bad_db = bad.join("center.db");
    let err = failed(
        &["card", "split", "--data", s(&a), "--database", s(&bad_db)],
        &[],
    );
    assert!(err.contains("--unaudited"), "{err}");
    assert!(err.contains("audit log"), "{err}");
    let err = failed(
        &[
            "card",
            "clone",
            "--data",
            s(&a),
            "--database",
            s(&bad_db),
            "--out",
            s(&dir.path().join("y")),
        ],
        &[("MICROCERT_EXPORT_PASSPHRASE", "another passphrase")],
    );
    assert!(err.contains("refused"), "{err}");
    assert!(
        !dir.path().join("y").exists(),
        "no export without its entry"
    );
    // --unaudited: done, with a warning.
    let out = try_run(&[
        "card",
        "split",
        "--data",
        s(&a),
        "--database",
        s(&bad_db),
        "--unaudited",
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT recorded"));

    // Recover into a new data directory over A's database: audited there.
    let two = dir.path().join("two");
    std::fs::write(&two, shares.lines().take(2).collect::<Vec<_>>().join("\n")).unwrap();
    let b = dir.path().join("b");
    run(&[
        "card",
        "recover",
        "--data",
        s(&b),
        "--database",
        s(&a.join("center.db")),
        "--shares-file",
        s(&two),
    ]);
    assert!(b.join("card.mccard").exists());
    assert_eq!(count(&a, "card-recover"), 1);
    // Recover where there is no database (a disaster): refused, no card
    // file, unless --unaudited.
    let c = dir.path().join("c");
    let err = failed(
        &["card", "recover", "--data", s(&c), "--shares-file", s(&two)],
        &[],
    );
    assert!(err.contains("--unaudited"), "{err}");
    assert!(!c.join("card.mccard").exists());
    run(&[
        "card",
        "recover",
        "--data",
        s(&c),
        "--shares-file",
        s(&two),
        "--unaudited",
    ]);
    assert!(c.join("card.mccard").exists());
    assert!(stdout(&run(&["audit", "verify-local", "--data", s(&a)])).contains("intact"));
}

/// Attack: make the second audit sink unwritable, then revoke (or make)
/// tokens so that only the database, which the attacker may edit, holds
/// the entries. Defence: the configured sink records every entry with its
/// chain hash before the change commits; when it cannot, the command is
/// refused and the token is unchanged.
#[test]
fn an_unwritable_audit_sink_refuses_the_change() {
    let setup = Setup::new(1);
    let data = setup.data();
    let sink = setup.dir.path().join("audit.jsonl");
    let config = setup.dir.path().join("microcert.toml");
    let write_config = |file: &Path| {
        std::fs::write(
            &config,
            format!("data = {:?}\n[audit]\nfile = {:?}\n", s(&data), s(file)),
        )
        .unwrap();
    };
    write_config(&sink);
    let cfg = ["--config", s(&config)];
    run(&[
        &["token", "create", "--role", "operator", "--name", "bob"][..],
        &cfg,
    ]
    .concat());
    let text = std::fs::read_to_string(&sink).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let head = actions(&data).pop().unwrap();
    assert_eq!(line["action"], "token-create");
    assert_eq!(
        line["hash"], head["hash"],
        "the sink carries the chain hash"
    );

    // The sink becomes unwritable: the revoke is refused, bob's token stays.
    std::fs::remove_file(&sink).unwrap();
    std::fs::create_dir(&sink).unwrap();
    let err = failed(
        &[&["token", "revoke", "--name", "bob"][..], &cfg].concat(),
        &[],
    );
    assert!(err.contains("audit"), "{err}");
    // (Read without the configuration: `token list` may write, so with
    // the broken sink it is refused too.)
    let list = stdout(&run(&["token", "list", "--json", "--data", s(&data)]));
    let bob: serde_json::Value = list
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|t| t["name"] == "bob")
        .unwrap();
    assert_eq!(bob["status"], "valid", "{bob}");
    assert_eq!(count(&data, "token-revoke"), 0);
}

/// Retention from the command line: `audit archive --before` moves the old
/// entries into a verifiable archive, `audit verify-archive` checks it
/// against the card and the table's checkpoint, and an edited archive is
/// BROKEN (exit 1).
#[test]
fn audit_archive_and_verify_archive() {
    let setup = Setup::new(1);
    let data = setup.data();
    let before = actions(&data).len();
    assert!(before >= 3);
    let out = setup.dir.path().join("audit-2026.jsonl");
    let far = "2999-01-01";
    let said = stdout(&run(&[
        "audit",
        "archive",
        "--data",
        s(&data),
        "--before",
        far,
        "--out",
        s(&out),
    ]));
    assert!(
        said.contains(&format!("{} audit entries", before - 1)),
        "{said}"
    );
    // The table keeps its newest entry and the archive's own entry.
    assert_eq!(actions(&data).len(), 2);
    assert!(stdout(&run(&["audit", "verify-local", "--data", s(&data)])).contains("intact"));
    let ok = stdout(&run(&[
        "audit",
        "verify-archive",
        "--data",
        s(&data),
        s(&out),
    ]));
    assert!(ok.contains("archive intact"), "{ok}");
    assert!(ok.contains("goes on from its last entry"), "{ok}");
    // An edited archive.
    let text = std::fs::read_to_string(&out).unwrap();
    std::fs::write(&out, text.replacen("alice", "mallory", 1)).unwrap();
    let o = try_run(&["audit", "verify-archive", "--data", s(&data), s(&out)]);
    assert!(!o.status.success());
    assert!(stdout(&o).contains("BROKEN"), "{}", stdout(&o));
    // A bad date changes nothing.
    let o = try_run(&[
        "audit",
        "archive",
        "--data",
        s(&data),
        "--before",
        "yesterday",
        "--out",
        s(&setup.dir.path().join("x")),
    ]);
    assert!(!o.status.success());
}

/// The notary table's retention from the command line.
#[test]
fn notary_archive_from_the_command_line() {
    let setup = Setup::new(1);
    let data = setup.data();
    // No signature verified yet: nothing to archive, no file.
    let out = setup.dir.path().join("notary.jsonl");
    let said = stdout(&run(&[
        "audit",
        "archive",
        "--table",
        "notary",
        "--data",
        s(&data),
        "--before",
        "2999-01-01",
        "--out",
        s(&out),
    ]));
    assert!(said.contains("no notary record"), "{said}");
    assert!(!out.exists());
}
