//! The audit log edited from outside, as an attacker with the database
//! file would: triggers dropped first, then entries edited, deleted,
//! inserted, reordered, cut off, or the whole chain recomputed. Each is
//! found by `verify_audit`. And no change is made when its audit entry
//! cannot be written.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use microcert_center::audit::{AuditFinding, chain_hash};
use microcert_center::db::NewAudit;
use microcert_center::{Center, CenterConfig, ReplayMode, SoftwareCard};
use microcert_core::{DeviceId, KeyState};
use rusqlite::{Connection, params};

fn center(dir: &Path) -> (Center, PathBuf) {
    let db = dir.join("center.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let config = CenterConfig {
        replay: ReplayMode::Database,
        ..CenterConfig::default()
    };
    let c = Center::open_sqlite(&db, card, config).unwrap();
    // Ten audited registrations: entries 1..=10.
    for i in 0..10 {
        c.register_device(DeviceId::from_u64(100 + i), 1, None, 0, "ops", NOW + i)
            .unwrap();
    }
    assert_eq!(c.verify_audit().unwrap(), (10, None));
    (c, db)
}

/// A connection with the append-only triggers dropped.
fn attacker(db: &Path) -> Connection {
    let conn = Connection::open(db).unwrap();
    conn.execute_batch("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
        .unwrap();
    conn
}

fn finding(f: impl FnOnce(&Connection)) -> Option<AuditFinding> {
    let dir = tempfile::tempdir().unwrap();
    let (c, db) = center(dir.path());
    f(&attacker(&db));
    c.verify_audit().unwrap().1
}

type Row = (
    i64,
    i64,
    String,
    String,
    Option<Vec<u8>>,
    Option<u8>,
    String,
);

fn entry(conn: &Connection, seq: i64) -> Row {
    conn.query_row(
        "SELECT seq, time, actor, action, device, generation, reason FROM audit WHERE seq = ?1",
        [seq],
        |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        },
    )
    .unwrap()
}

fn as_new(r: &Row) -> NewAudit {
    NewAudit {
        time: r.1 as u64,
        actor: r.2.clone(),
        action: r.3.clone(),
        device: r.4.clone().map(|d| DeviceId(d.try_into().unwrap())),
        generation: r.5,
        reason: r.6.clone(),
    }
}

/// Recomputes prev_hash and hash of every entry from `from` on, as an
/// attacker who knows the (keyless) chain function would.
fn rechain(conn: &Connection, from: i64) {
    let mut prev: [u8; 32] = if from == 1 {
        [0; 32]
    } else {
        conn.query_row("SELECT hash FROM audit WHERE seq = ?1", [from - 1], |r| {
            r.get::<_, Vec<u8>>(0)
        })
        .unwrap()
        .try_into()
        .unwrap()
    };
    let last: i64 = conn
        .query_row("SELECT max(seq) FROM audit", [], |r| r.get(0))
        .unwrap();
    for seq in from..=last {
        let e = as_new(&entry(conn, seq));
        let h = chain_hash(&prev, seq as u64, &e);
        conn.execute(
            "UPDATE audit SET prev_hash = ?2, hash = ?3 WHERE seq = ?1",
            params![seq, &prev[..], &h[..]],
        )
        .unwrap();
        prev = h;
    }
}

#[test]
fn an_edited_entry_is_found() {
    let f = finding(|c| {
        c.execute(
            "UPDATE audit SET reason = 'nothing happened' WHERE seq = 4",
            [],
        )
        .unwrap();
    });
    assert_eq!(f, Some(AuditFinding::Broken { seq: 4 }));
}

#[test]
fn a_deleted_entry_is_found() {
    let f = finding(|c| {
        c.execute("DELETE FROM audit WHERE seq = 6", []).unwrap();
    });
    assert_eq!(f, Some(AuditFinding::Broken { seq: 6 }));
}

#[test]
fn a_deleted_entry_with_the_rest_renumbered_and_rechained_is_found() {
    let f = finding(|c| {
        c.execute("DELETE FROM audit WHERE seq = 6", []).unwrap();
        for seq in 7..=10 {
            c.execute("UPDATE audit SET seq = ?1 - 1 WHERE seq = ?1", [seq])
                .unwrap();
        }
        rechain(c, 6);
    });
    assert_eq!(
        f,
        Some(AuditFinding::Truncated {
            last: 9,
            tagged: 10
        })
    );
}

#[test]
fn an_inserted_entry_is_found() {
    let f = finding(|c| {
        for seq in (5..=10).rev() {
            c.execute("UPDATE audit SET seq = ?1 + 1 WHERE seq = ?1", [seq])
                .unwrap();
        }
        c.execute(
            "INSERT INTO audit (seq, time, actor, action, device, generation, reason, prev_hash, hash) \
             SELECT 5, time, 'ops', 'resume', device, NULL, 'forged', hash, hash FROM audit WHERE seq = 4",
            [],
        )
        .unwrap();
    });
    assert_eq!(f, Some(AuditFinding::Broken { seq: 5 }));
}

#[test]
fn an_inserted_entry_with_a_recomputed_chain_is_found() {
    let f = finding(|c| {
        for seq in (5..=10).rev() {
            c.execute("UPDATE audit SET seq = ?1 + 1 WHERE seq = ?1", [seq])
                .unwrap();
        }
        c.execute(
            "INSERT INTO audit (seq, time, actor, action, device, generation, reason, prev_hash, hash) \
             VALUES (5, 1, 'ops', 'resume', NULL, NULL, 'forged', x'', x'')",
            [],
        )
        .unwrap();
        rechain(c, 5);
    });
    assert_eq!(f, Some(AuditFinding::Untagged { first: 11 }));
}

#[test]
fn an_entry_appended_outside_the_center_is_found() {
    let f = finding(|c| {
        c.execute(
            "INSERT INTO audit (seq, time, actor, action, device, generation, reason, prev_hash, hash) \
             VALUES (11, 1, 'ops', 'resume', NULL, NULL, 'forged', x'', x'')",
            [],
        )
        .unwrap();
        rechain(c, 11);
    });
    assert_eq!(f, Some(AuditFinding::Untagged { first: 11 }));
}

#[test]
fn reordered_entries_are_found() {
    let f = finding(|c| {
        c.execute_batch(
            "UPDATE audit SET seq = 100 WHERE seq = 3; \
             UPDATE audit SET seq = 3 WHERE seq = 4; \
             UPDATE audit SET seq = 4 WHERE seq = 100;",
        )
        .unwrap();
    });
    assert_eq!(f, Some(AuditFinding::Broken { seq: 3 }));
}

#[test]
fn reordered_entries_with_a_recomputed_chain_are_found() {
    let f = finding(|c| {
        c.execute_batch(
            "UPDATE audit SET seq = 100 WHERE seq = 3; \
             UPDATE audit SET seq = 3 WHERE seq = 4; \
             UPDATE audit SET seq = 4 WHERE seq = 100;",
        )
        .unwrap();
        rechain(c, 3);
    });
    assert_eq!(f, Some(AuditFinding::HeadMismatch { seq: 10 }));
}

#[test]
fn a_log_cut_short_is_found() {
    let f = finding(|c| {
        c.execute("DELETE FROM audit WHERE seq > 7", []).unwrap();
    });
    assert_eq!(
        f,
        Some(AuditFinding::Truncated {
            last: 7,
            tagged: 10
        })
    );
}

#[test]
fn a_forged_head_is_found_and_stops_audited_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (c, db) = center(dir.path());
    {
        let conn = attacker(&db);
        conn.execute("DELETE FROM audit WHERE seq > 7", []).unwrap();
        conn.execute(
            "UPDATE digest SET count = 7, seq = 7, acc = (SELECT hash FROM audit WHERE seq = 7) \
             WHERE shard = 255",
            [],
        )
        .unwrap();
    }
    assert_eq!(c.verify_audit().unwrap().1, Some(AuditFinding::HeadTag));
    // The next audited change does not launder the forged head.
    assert!(
        c.register_device(DeviceId::from_u64(999), 1, None, 0, "ops", NOW)
            .is_err()
    );
    assert!(c.device(DeviceId::from_u64(999)).unwrap().is_none());
}

#[test]
fn no_change_without_its_audit_entry() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let config = CenterConfig {
        replay: ReplayMode::Database,
        ..CenterConfig::default()
    };
    let c = Center::open_sqlite(&db, card.clone(), config).unwrap();
    let mut fleet = make_fleet(&*card, 2);
    let batch = dir.path().join("batch.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    c.import_batch(&batch, "factory", NOW, &mut |_| {}).unwrap();
    c.activate(fleet[0].id, "ops", "go", NOW).unwrap();
    let entries = c.audit_log(0, 1000).unwrap().len();
    let digest = c.database().digest_shards().unwrap();

    // The audit table refuses every insert (a full disk, say).
    let conn = Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER audit_full BEFORE INSERT ON audit \
         BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
    )
    .unwrap();
    assert!(c.suspend(fleet[0].id, "ops", "x", NOW + 1).is_err());
    assert!(c.revoke(fleet[0].id, "ops", "x", NOW + 1).is_err());
    assert!(c.activate(fleet[1].id, "ops", "x", NOW + 1).is_err());
    let view = |i: usize| c.device(fleet[i].id).unwrap().unwrap().seeds[0].state;
    assert_eq!(view(0), KeyState::Active);
    assert_eq!(view(1), KeyState::PreActivation);
    assert_eq!(c.database().digest_shards().unwrap(), digest);

    conn.execute_batch("DROP TRIGGER audit_full;").unwrap();
    c.suspend(fleet[0].id, "ops", "x", NOW + 2).unwrap();
    assert_eq!(c.audit_log(0, 1000).unwrap().len(), entries + 1);
    assert_eq!(c.verify_audit().unwrap().1, None);
}

#[test]
fn export_writes_json_lines_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _) = center(dir.path());
    let mut out = Vec::new();
    assert_eq!(c.export_audit(&mut out).unwrap(), 10);
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["seq"], i as u64 + 1);
        assert_eq!(v["action"], "register");
        assert_eq!(v["actor"], "ops");
        assert_eq!(v["device"], format!("{:016x}", 100 + i));
        assert_eq!(v["hash"].as_str().unwrap().len(), 64);
    }
    assert_eq!(lines[1]["prev_hash"], lines[0]["hash"]);
    assert_eq!(lines[0]["prev_hash"], "0".repeat(64));
}
