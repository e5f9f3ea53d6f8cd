//! Every stored value that decides an outcome is covered by the card
//! (issue 12), as a table: for every table and every column of the key
//! database, an edit, a swap between rows, a deletion and an insertion made
//! from outside (rusqlite on the real SQLite file, as an attacker with file
//! access would) is either detected and named by the integrity scan, or
//! shown harmless by a test that tries to use it. Where a covered value is
//! used, the use is refused too (the notary, the grace period, commands,
//! import progress).
//!
//! Tokens and the shared marks have their digest shards (gap 3), and
//! replay records have their per-device accumulators (gap 2): an edit,
//! swap, deletion or insertion of them is named by the scan or refused
//! where used. (Spent challenges share the replay records' accumulators:
//! `row_tamper.rs` deletes one.)

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use microcert_center::{Center, CenterConfig, Error, ReplayMode, SoftwareCard};
use microcert_core::{Audience, DeviceId};
use rusqlite::Connection;

const C: Audience = Audience::CENTER;

fn config() -> CenterConfig {
    CenterConfig {
        replay: ReplayMode::Database,
        ..CenterConfig::default()
    }
}

/// The template database and what is in it.
struct Template {
    _dir: tempfile::TempDir,
    db: PathBuf,
    batch: PathBuf,
    card: Arc<SoftwareCard>,
    fleet: Vec<TestNode>,
    /// dev0's signature over "meter 0", notarised before its revocation.
    sig0: Vec<u8>,
    /// dev3's AUTH accepted at NOW + 1 (its replay record is stored).
    auth3: Vec<u8>,
    /// Token "alice"'s card tag before its revocation.
    alice_tag: Vec<u8>,
}

/// Four devices (fleet member i in shard i): dev0 signed twice then was
/// revoked (two notary records, a pending REVOKE); dev1 is mid-update (its
/// generation 0 in a grace period, generation 1 PreActivation, its
/// UPDATE_SEED answered); dev2 has a pending UPDATE_SEED; dev3 is Active
/// with two notary records. All from one batch import (progress row).
fn template() -> Template {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = Center::open_sqlite(&db, card.clone(), config()).unwrap();
    let batch = dir.path().join("batch.jsonl");
    let (mut fleet, sig0) = populate(&center, &card, &batch);
    let (auth3, _) = fleet[3].auth(&C, NOW + 4);
    center.verify_auth(&auth3, &C, NOW + 4).unwrap();
    // Tokens: alice (operator, revoked; her row before the revocation
    // kept), bob (auditor, valid); the marks of a housekeeping run.
    center
        .create_token("alice", "operator", None, "test", NOW + 4)
        .unwrap();
    center
        .create_token("bob", "auditor", None, "test", NOW + 4)
        .unwrap();
    let alice_tag = center
        .database()
        .list_tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.name == "alice")
        .unwrap()
        .tag;
    center
        .revoke_tokens("alice", None, "test", NOW + 4)
        .unwrap();
    center.housekeeping(NOW + 4).unwrap();
    let r = center.integrity_check(None, NOW + 4).unwrap();
    assert!(r.is_clean(), "{r:?}");
    drop(center);
    Template {
        _dir: dir,
        db,
        batch,
        card,
        fleet,
        sig0,
        auth3,
        alice_tag,
    }
}

/// Fills a center as [`template`] describes; returns the fleet and dev0's
/// notarised signature over "meter 0".
fn populate(center: &Center, card: &SoftwareCard, batch: &Path) -> (Vec<TestNode>, Vec<u8>) {
    let mut fleet = make_fleet(card, 4);
    write_batch(batch, &mut fleet, NOW);
    center
        .import_batch(batch, "factory", NOW, &mut |_| {})
        .unwrap();
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&C, NOW + 1);
        center.verify_auth(&a, &C, NOW + 1).unwrap();
    }
    let sig0 = fleet[0].sign(b"meter 0", NOW + 2);
    center.verify_signature(&sig0, b"meter 0", NOW + 2).unwrap();
    let s = fleet[0].sign(b"meter 0b", NOW + 2);
    center.verify_signature(&s, b"meter 0b", NOW + 2).unwrap();
    for data in [&b"meter 3"[..], b"meter 3b"] {
        let s = fleet[3].sign(data, NOW + 2);
        center.verify_signature(&s, data, NOW + 2).unwrap();
    }
    center
        .revoke(fleet[0].id, "ops", "stolen", NOW + 3)
        .unwrap();
    center
        .queue_update(fleet[1].id, "ops", "roll-out", NOW + 3)
        .unwrap();
    let cmd = center.command(fleet[1].id).unwrap().unwrap();
    let Reply::Enroll(e) = fleet[1].handle_command(&cmd, NOW + 3) else {
        panic!("an UPDATE_SEED")
    };
    center.enroll(&e, NOW + 3).unwrap();
    center
        .queue_update(fleet[2].id, "ops", "roll-out", NOW + 3)
        .unwrap();
    let r = center.integrity_scan().unwrap();
    assert!(r.is_clean(), "{r:?}");
    (fleet, sig0)
}

fn hex_id(d: DeviceId) -> String {
    format!("X'{}'", hex::encode(d.0))
}

/// What a tampering must lead to.
enum Expect {
    /// The scan names it: its findings contain this text.
    Named(&'static str),
    /// Not detected by the scan; the check uses the tampered database and
    /// shows that nothing is accepted that should not be (or that the use
    /// is refused).
    Harmless(fn(&Center, &mut Template)),
}

struct Case {
    table: &'static str,
    what: String,
    sql: String,
    expect: Expect,
}

fn copy_db(from: &Path, to_dir: &Path) -> PathBuf {
    let to = to_dir.join("center.db");
    std::fs::copy(from, &to).unwrap();
    to
}

fn auth_ok(center: &Center, node: &mut TestNode, t: u64) -> bool {
    let (a, _) = node.auth(&C, t);
    center.verify_auth(&a, &C, t).is_ok()
}

fn harmless_fleet_works(center: &Center, t: &mut Template) {
    let r = center.integrity_scan().unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert!(auth_ok(center, &mut t.fleet[3], NOW + 20));
    // The revoked device stays refused, its notarised signature valid.
    assert!(!auth_ok(center, &mut t.fleet[0], NOW + 20));
    center
        .verify_signature(&t.sig0, b"meter 0", NOW + 20)
        .unwrap();
}

fn import_refused(center: &Center, t: &mut Template) {
    let r = center.import_batch(&t.batch, "factory", NOW + 20, &mut |_| {});
    assert!(matches!(r, Err(Error::Integrity(_))), "{r:?}");
}

fn import_idempotent(center: &Center, t: &mut Template) {
    let r = center
        .import_batch(&t.batch, "factory", NOW + 20, &mut |_| {})
        .unwrap();
    assert_eq!(r.enrolled, 0, "{r:?}");
    harmless_fleet_works(center, t);
}

/// dev3's recorded AUTH is refused again.
fn recorded_auth_refused(center: &Center, t: &mut Template) {
    let r = center.verify_auth(&t.auth3, &C, NOW + 5);
    assert!(r.is_err(), "recorded AUTH accepted again: {r:?}");
}

/// As [`recorded_auth_refused`], and dev3 keeps working.
fn replay_harmless(center: &Center, t: &mut Template) {
    recorded_auth_refused(center, t);
    assert!(auth_ok(center, &mut t.fleet[3], NOW + 20));
}

/// No token may do more than before: only bob, an auditor without expiry,
/// is valid (if anything); revoked alice is not.
fn tokens_not_widened(center: &Center, _t: &mut Template) {
    use microcert_center::tokens::TokenStatus;
    for (row, status) in center.list_tokens(NOW + 20).unwrap() {
        if status == TokenStatus::Valid {
            assert_eq!(
                (
                    row.name.as_str(),
                    row.role.as_str(),
                    row.expires,
                    row.revoked
                ),
                ("bob", "auditor", None, None),
                "{row:?}"
            );
        }
    }
    // What a server's token cache loads and then checks row by row.
    for row in center.trusted_tokens().unwrap() {
        let status = microcert_center::tokens::token_status(center.card(), &row, NOW + 20);
        assert!(
            row.name != "alice" || status != TokenStatus::Valid,
            "{row:?}"
        );
    }
}

fn cases(t: &Template) -> Vec<Case> {
    let [d0, d1, d2, d3] = [0, 1, 2, 3].map(|i| hex_id(t.fleet[i].id));
    let new = hex_id(fleet_id(100));
    let mut v = Vec::new();
    let mut add = |table: &'static str, what: &str, sql: String, expect: Expect| {
        v.push(Case {
            table,
            what: what.to_string(),
            sql,
            expect,
        })
    };
    use Expect::*;
    // devices
    let dev_bad = "device row fails its integrity tag";
    for (col, set) in [
        ("id", format!("id = {new}")),
        ("class", "class = class % 3 + 1".into()),
        ("suite", "suite = 3 - suite".into()),
        ("epoch", "epoch = epoch + 1".into()),
        (
            "transport_open",
            "transport_open = 1 - transport_open".into(),
        ),
        ("highest_gen", "highest_gen = highest_gen + 1".into()),
        (
            "command_counter",
            "command_counter = command_counter + 1".into(),
        ),
        ("tag", "tag = randomblob(32)".into()),
    ] {
        add(
            "devices",
            &format!("edit {col}"),
            format!("UPDATE devices SET {set} WHERE id = {d3}"),
            Named(dev_bad),
        );
    }
    add(
        "devices",
        "edit created (registration time: shown, decides nothing)",
        format!("UPDATE devices SET created = created + 99 WHERE id = {d3}"),
        Harmless(harmless_fleet_works),
    );
    add(
        "devices",
        "swap tags",
        format!(
            "UPDATE devices SET tag = CASE id WHEN {d3} THEN (SELECT tag FROM devices WHERE id = {d2}) \
             ELSE (SELECT tag FROM devices WHERE id = {d3}) END WHERE id IN ({d2}, {d3})"
        ),
        Named(dev_bad),
    );
    add(
        "devices",
        "delete",
        format!("DELETE FROM devices WHERE id = {d3}"),
        Named("(device rows)"),
    );
    add(
        "devices",
        "insert",
        format!(
            "INSERT INTO devices SELECT {new}, class, suite, epoch, transport_open, created, \
             highest_gen, command_counter, tag FROM devices WHERE id = {d3}"
        ),
        Named(dev_bad),
    );
    // seeds: every column of dev3's generation 0 (dev0's for the
    // compromise time, dev1's for the grace period)
    let rec_bad = "fails its integrity tag (changed";
    for (col, set, who) in [
        ("device", format!("device = {new}"), &d3),
        ("generation", "generation = generation + 5".into(), &d3),
        ("state", "state = 'suspended'".into(), &d3),
        ("base_year", "base_year = base_year + 1".into(), &d3),
        ("suite", "suite = 3 - suite".into(), &d3),
        (
            "kstore_version",
            "kstore_version = kstore_version + 1".into(),
            &d3,
        ),
        (
            "ciphertext",
            "ciphertext = randomblob(length(ciphertext))".into(),
            &d3,
        ),
        ("tag", "tag = randomblob(32)".into(), &d3),
        ("via", "via = 'update'".into(), &d3),
        ("enroll_t", "enroll_t = enroll_t + 1".into(), &d3),
        ("enroll_r", "enroll_r = enroll_r + 1".into(), &d3),
        (
            "enroll_digest",
            "enroll_digest = randomblob(32)".into(),
            &d3,
        ),
        (
            "receipt",
            "receipt = randomblob(length(receipt))".into(),
            &d3,
        ),
        ("created", "created = created + 1".into(), &d3),
        (
            "activated_at",
            "activated_at = activated_at + 1".into(),
            &d3,
        ),
        ("suspended_at", format!("suspended_at = {}", NOW + 1), &d3),
        (
            "deactivated_at",
            format!("deactivated_at = {}", NOW + 1),
            &d3,
        ),
        (
            "compromised_at",
            "compromised_at = compromised_at + 999".into(),
            &d0,
        ),
        ("destroyed_at", format!("destroyed_at = {}", NOW + 1), &d3),
        (
            "grace_until",
            "grace_until = grace_until + 99999999".into(),
            &d1,
        ),
    ] {
        add(
            "seeds",
            &format!("edit {col}"),
            format!("UPDATE seeds SET {set} WHERE device = {who} AND generation = 0"),
            Named(rec_bad),
        );
    }
    add(
        "seeds",
        "swap tags",
        format!(
            "UPDATE seeds SET tag = CASE device WHEN {d3} THEN (SELECT tag FROM seeds WHERE device = {d2} AND generation = 0) \
             ELSE (SELECT tag FROM seeds WHERE device = {d3} AND generation = 0) END \
             WHERE device IN ({d2}, {d3}) AND generation = 0"
        ),
        Named(rec_bad),
    );
    add(
        "seeds",
        "delete",
        format!("DELETE FROM seeds WHERE device = {d3} AND generation = 0"),
        Named("missing from the database (deleted)"),
    );
    add(
        "seeds",
        "insert",
        format!(
            "INSERT INTO seeds SELECT device, 7, state, base_year, suite, kstore_version, ciphertext, \
             tag, via, enroll_t + 7, enroll_r, enroll_digest, receipt, created, activated_at, \
             suspended_at, deactivated_at, compromised_at, destroyed_at, grace_until \
             FROM seeds WHERE device = {d3} AND generation = 0"
        ),
        Named(rec_bad),
    );
    // notary
    let not_bad = "notary record";
    for (col, set) in [
        ("device", format!("device = {d2}")),
        ("generation", "generation = generation + 1".into()),
        ("t", "t = t + 1".into()),
        ("r", "r = r + 1".into()),
        ("digest", "digest = randomblob(32)".into()),
        ("tag", "tag = randomblob(length(tag))".into()),
        ("first_seen", "first_seen = first_seen - 1".into()),
        ("seal", "seal = randomblob(32)".into()),
    ] {
        add(
            "notary",
            &format!("edit {col}"),
            format!("UPDATE notary SET {set} WHERE device = {d0}"),
            Named(not_bad),
        );
    }
    add(
        "notary",
        "swap digests",
        format!(
            "UPDATE notary SET digest = CASE digest WHEN (SELECT min(digest) FROM notary WHERE device = {d3}) \
             THEN (SELECT max(digest) FROM notary WHERE device = {d3}) \
             ELSE (SELECT min(digest) FROM notary WHERE device = {d3}) END WHERE device = {d3}"
        ),
        Named(not_bad),
    );
    add(
        "notary",
        "delete",
        format!(
            "DELETE FROM notary WHERE device = {d3} AND digest = (SELECT min(digest) FROM notary WHERE device = {d3})"
        ),
        Named("(notary records)"),
    );
    add(
        "notary",
        "insert",
        format!(
            "INSERT INTO notary SELECT device, generation, t, r, randomblob(32), tag, first_seen, seal \
             FROM notary WHERE device = {d0} LIMIT 1"
        ),
        Named(not_bad),
    );
    // commands: dev0's pending REVOKE, dev1's answered UPDATE_SEED, dev2's
    // pending UPDATE_SEED
    let cmd_bad = "command of";
    for (col, set) in [
        ("device", format!("device = {d3}")),
        ("counter", "counter = counter + 1".into()),
        ("opcode", "opcode = 3 - opcode".into()),
        ("generation", "generation = generation + 1".into()),
        ("r", "r = r + 1".into()),
        ("bytes", "bytes = randomblob(length(bytes))".into()),
        ("created", "created = created + 1".into()),
        ("answered_at", format!("answered_at = {}", NOW + 4)),
        ("status", "status = 0".into()),
        ("seal", "seal = randomblob(32)".into()),
    ] {
        add(
            "commands",
            &format!("edit {col}"),
            format!("UPDATE commands SET {set} WHERE device = {d2}"),
            Named(cmd_bad),
        );
    }
    add(
        "commands",
        "swap seals",
        format!(
            "UPDATE commands SET seal = CASE device WHEN {d0} THEN (SELECT seal FROM commands WHERE device = {d2}) \
             ELSE (SELECT seal FROM commands WHERE device = {d0}) END WHERE device IN ({d0}, {d2})"
        ),
        Named(cmd_bad),
    );
    add(
        "commands",
        "delete",
        format!("DELETE FROM commands WHERE device = {d2}"),
        Named("(commands)"),
    );
    add(
        "commands",
        "insert",
        format!(
            "INSERT INTO commands SELECT {d3}, counter, opcode, generation, r, bytes, created, \
             answered_at, status, seal FROM commands WHERE device = {d2}"
        ),
        Named(cmd_bad),
    );
    // digest
    for (col, set) in [
        ("shard", "shard = 15"),
        ("acc", "acc = randomblob(32)"),
        ("count", "count = count + 1"),
        ("seq", "seq = seq + 1"),
        ("tag", "tag = randomblob(32)"),
    ] {
        add(
            "digest",
            &format!("edit {col}"),
            format!("UPDATE digest SET {set} WHERE shard = 3"),
            Named("digest shard 3 "),
        );
    }
    add(
        "digest",
        "swap accumulators",
        "UPDATE digest SET acc = CASE shard WHEN 2 THEN (SELECT acc FROM digest WHERE shard = 3) \
         ELSE (SELECT acc FROM digest WHERE shard = 2) END WHERE shard IN (2, 3)"
            .into(),
        Named("digest shard 2 "),
    );
    add(
        "digest",
        "delete a notary shard",
        "DELETE FROM digest WHERE shard = 19".into(),
        Named("digest shard 19 (notary records)"),
    );
    add(
        "digest",
        "insert a row no kind of record uses (nothing reads it)",
        "INSERT INTO digest VALUES (100, randomblob(32), 1, 1, randomblob(32))".into(),
        Expect::Harmless(harmless_fleet_works),
    );
    // audit (its triggers dropped first, as an attacker would)
    let drop_triggers = "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;";
    for (what, sql) in [
        (
            "edit reason",
            "UPDATE audit SET reason = 'nothing' WHERE seq = 3",
        ),
        (
            "edit action",
            "UPDATE audit SET action = 'suspend' WHERE seq = 3",
        ),
        (
            "swap reasons",
            "UPDATE audit SET reason = CASE seq WHEN 2 THEN (SELECT reason FROM audit WHERE seq = 12) \
             ELSE (SELECT reason FROM audit WHERE seq = 2) END WHERE seq IN (2, 12)",
        ),
        (
            "delete the last entry",
            "DELETE FROM audit WHERE seq = (SELECT max(seq) FROM audit)",
        ),
        (
            "insert",
            "INSERT INTO audit SELECT seq + 1000, time, actor, action, device, generation, reason, \
             prev_hash, hash FROM audit WHERE seq = 3",
        ),
    ] {
        add(
            "audit",
            what,
            format!("{drop_triggers} {sql}"),
            Named("audit log:"),
        );
    }
    // replay records (database replay mode): checked against the device's
    // accumulator at its next record
    for (what, sql) in [
        (
            "edit t",
            format!("UPDATE replay SET t = t + 1 WHERE device = {d3}"),
        ),
        (
            "edit r",
            format!("UPDATE replay SET r = r + 1 WHERE device = {d3}"),
        ),
        (
            "edit generation",
            format!("UPDATE replay SET generation = generation + 1 WHERE device = {d3}"),
        ),
        (
            "edit expires",
            format!("UPDATE replay SET expires = expires - 1000 WHERE device = {d3}"),
        ),
        (
            "edit device",
            format!("UPDATE replay SET device = {new} WHERE device = {d3}"),
        ),
        (
            "swap devices",
            format!(
                "UPDATE replay SET device = CASE device WHEN {d2} THEN {d3} ELSE {d2} END \
                 WHERE device IN ({d2}, {d3})"
            ),
        ),
        ("delete", format!("DELETE FROM replay WHERE device = {d3}")),
        (
            "insert",
            format!("INSERT INTO replay VALUES ({d3}, 0, 1, 1, 9999999999)"),
        ),
    ] {
        add("replay", what, sql, Harmless(recorded_auth_refused));
    }
    // replay accumulators: their tag covers every column
    for (col, set) in [
        ("acc", "acc = randomblob(32)"),
        ("count", "count = count + 1"),
        ("max_expires", "max_expires = 0"),
        ("tag", "tag = randomblob(32)"),
    ] {
        add(
            "replay_acc",
            &format!("edit {col}"),
            format!("UPDATE replay_acc SET {set} WHERE device = {d3}"),
            Harmless(recorded_auth_refused),
        );
    }
    add(
        "replay_acc",
        "swap between devices (every column but the device)",
        {
            let col = |c: &str| {
                format!(
                    "{c} = CASE device WHEN {d2} THEN (SELECT {c} FROM replay_acc WHERE device = {d3}) \
                     ELSE (SELECT {c} FROM replay_acc WHERE device = {d2}) END"
                )
            };
            format!(
                "UPDATE replay_acc SET {}, {}, {}, {} WHERE device IN ({d2}, {d3})",
                col("acc"),
                col("count"),
                col("max_expires"),
                col("tag")
            )
        },
        Harmless(recorded_auth_refused),
    );
    add(
        "replay_acc",
        "delete",
        format!("DELETE FROM replay_acc WHERE device = {d3}"),
        Harmless(recorded_auth_refused),
    );
    add(
        "replay_acc",
        "insert (another device's copy for a device that has none)",
        format!(
            "INSERT INTO replay_acc SELECT {new}, acc, count, max_expires, tag FROM replay_acc \
             WHERE device = {d3}"
        ),
        Harmless(replay_harmless),
    );
    // tokens: decision-bearing columns under the row's tag (refused where
    // used), every row in its token shard
    for (col, set, who) in [
        ("hash", "hash = 'f' || substr(hash, 2)", "bob"),
        ("name", "name = 'root'", "bob"),
        ("role", "role = 'admin'", "bob"),
        ("created", "created = created + 1", "bob"),
        ("expires", "expires = NULL", "alice"),
        ("revoked", "revoked = NULL", "alice"),
        ("last_used (bookkeeping)", "last_used = 1", "bob"),
        ("failures (bookkeeping)", "failures = 99", "bob"),
    ] {
        add(
            "tokens",
            &format!("edit {col}"),
            format!("UPDATE tokens SET {set} WHERE name = '{who}'"),
            Harmless(tokens_not_widened),
        );
    }
    let tokens_bad = "(tokens): does not match";
    add(
        "tokens",
        "edit tag",
        "UPDATE tokens SET tag = randomblob(32) WHERE name = 'bob'".into(),
        Named(tokens_bad),
    );
    add(
        "tokens",
        "put back alice's row from before its revocation",
        format!(
            "UPDATE tokens SET revoked = NULL, tag = X'{}' WHERE name = 'alice'",
            hex::encode(&t.alice_tag)
        ),
        Named(tokens_bad),
    );
    add(
        "tokens",
        "swap tags",
        "UPDATE tokens SET tag = CASE name WHEN 'alice' THEN (SELECT tag FROM tokens WHERE name = 'bob') \
         ELSE (SELECT tag FROM tokens WHERE name = 'alice') END"
            .into(),
        Harmless(tokens_not_widened),
    );
    add(
        "tokens",
        "delete",
        "DELETE FROM tokens WHERE name = 'alice'".into(),
        Named(tokens_bad),
    );
    add(
        "tokens",
        "insert",
        "INSERT INTO tokens SELECT 'e' || substr(hash, 2), 'mallory', 'admin', created, NULL, NULL, \
         NULL, 0, tag FROM tokens WHERE name = 'bob'"
            .into(),
        Named(tokens_bad),
    );
    // marks: each under its own tag, every row in the marks' shard
    add(
        "marks",
        "edit value",
        "UPDATE marks SET value = value - 100 WHERE name = 'clock'".into(),
        Named("high-water mark \"clock\""),
    );
    add(
        "marks",
        "edit tag",
        "UPDATE marks SET tag = randomblob(32) WHERE name = 'pruned'".into(),
        Named("(marks): does not match"),
    );
    add(
        "marks",
        "swap tags",
        "UPDATE marks SET tag = CASE name WHEN 'clock' THEN (SELECT tag FROM marks WHERE name = 'pruned') \
         ELSE (SELECT tag FROM marks WHERE name = 'clock') END WHERE name IN ('clock', 'pruned')"
            .into(),
        Named("high-water mark"),
    );
    add(
        "marks",
        "delete the pruning high-water",
        "DELETE FROM marks WHERE name = 'pruned'".into(),
        Named("(marks): does not match"),
    );
    add(
        "marks",
        "delete the clock high-water",
        "DELETE FROM marks WHERE name = 'clock'".into(),
        Named("(marks): does not match"),
    );
    add(
        "marks",
        "insert a cleared clock alarm",
        "INSERT INTO marks VALUES ('clock_alarm', 0, randomblob(32))".into(),
        Named("(marks): does not match"),
    );
    // imports: checked where used (refused), or starting again from the
    // first line, which is idempotent
    add(
        "imports",
        "edit next_line (would skip lines)",
        "UPDATE imports SET next_line = next_line + 5".into(),
        Harmless(import_refused),
    );
    add(
        "imports",
        "edit seal",
        "UPDATE imports SET seal = randomblob(32)".into(),
        Harmless(import_refused),
    );
    add(
        "imports",
        "edit updated (shown only)",
        "UPDATE imports SET updated = updated + 5".into(),
        Harmless(import_idempotent),
    );
    add(
        "imports",
        "edit file_digest (the file starts again)",
        "UPDATE imports SET file_digest = randomblob(32)".into(),
        Harmless(import_idempotent),
    );
    add(
        "imports",
        "delete (the file starts again)",
        "DELETE FROM imports".into(),
        Harmless(import_idempotent),
    );
    add(
        "imports",
        "insert (another file's row, or this file's with another seal)",
        "INSERT INTO imports SELECT randomblob(32), next_line + 3, updated, seal FROM imports"
            .into(),
        Harmless(import_idempotent),
    );
    v
}

#[test]
fn every_column_of_every_table_is_covered_or_harmless() {
    let mut t = template();
    let cases = cases(&t);
    let mut failures = Vec::new();
    for case in &cases {
        let dir = tempfile::tempdir().unwrap();
        let db = copy_db(&t.db, dir.path());
        {
            let conn = Connection::open(&db).unwrap();
            conn.execute_batch(&format!("PRAGMA foreign_keys = OFF; {}", case.sql))
                .unwrap_or_else(|e| panic!("{} {}: {e}\n{}", case.table, case.what, case.sql));
        }
        let center = Center::open_sqlite(&db, t.card.clone(), config()).unwrap();
        match &case.expect {
            Expect::Named(text) => {
                let found = match center.integrity_scan() {
                    Ok(r) => {
                        let mut f = r.findings();
                        if let Ok((_, Some(a))) = center.verify_audit() {
                            f.push(format!("audit log: {a}"));
                        }
                        for m in center.check_marks().unwrap_or_default() {
                            f.push(format!("high-water mark {m:?}: fails its integrity tag"));
                        }
                        f.join("\n")
                    }
                    Err(e) => format!("scan error: {e}"),
                };
                if !found.contains(text) {
                    failures.push(format!(
                        "{} / {}: expected a finding with {text:?}, got:\n{found}",
                        case.table, case.what
                    ));
                }
            }
            Expect::Harmless(check) => {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    check(&center, &mut t)
                }));
                if r.is_err() {
                    failures.push(format!("{} / {}: not harmless", case.table, case.what));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Every table of the schema has its rows in the table (spent
    // challenges share the replay records' accumulators: row_tamper.rs).
    for table in [
        "devices",
        "seeds",
        "notary",
        "commands",
        "digest",
        "audit",
        "imports",
        "replay",
        "replay_acc",
        "tokens",
        "marks",
    ] {
        for kind in ["edit", "swap", "delete", "insert"] {
            assert!(
                cases
                    .iter()
                    .any(|c| c.table == table && c.what.starts_with(kind))
                    || (kind == "swap" && table == "imports"),
                "{table}: no {kind} case"
            );
        }
    }
}

/// Attack 2 at the library: a notarised signature of a since-revoked
/// device, its notary row's digest edited to another data's: the forged
/// data is refused (and the scan names the record).
#[test]
fn an_edited_notary_record_does_not_make_other_data_valid() {
    let t = template();
    let dir = tempfile::tempdir().unwrap();
    let db = copy_db(&t.db, dir.path());
    let forged = microcert_core::DataDigest::of(b"pay 1000000 to mallory");
    {
        let conn = Connection::open(&db).unwrap();
        let n = conn
            .execute(
                "UPDATE notary SET digest = ?1 WHERE device = ?2 AND digest = ?3",
                rusqlite::params![
                    &forged[..],
                    &t.fleet[0].id.0[..],
                    &microcert_core::DataDigest::of(b"meter 0")[..]
                ],
            )
            .unwrap();
        assert_eq!(n, 1);
    }
    let center = Center::open_sqlite(&db, t.card.clone(), config()).unwrap();
    let r = center.verify_signature(&t.sig0, b"pay 1000000 to mallory", NOW + 20);
    assert!(matches!(r, Err(Error::Integrity(_))), "{r:?}");
    let scan = center.integrity_scan().unwrap();
    assert_eq!(scan.bad_notary.len(), 1, "{scan:?}");
    assert_eq!(scan.bad_notary[0].0, t.fleet[0].id);
}

/// grace_until pushed forward from outside: the old generation is not
/// accepted after the real grace end (the record is refused).
#[test]
fn an_extended_grace_period_is_refused() {
    let mut t = template();
    let dir = tempfile::tempdir().unwrap();
    let db = copy_db(&t.db, dir.path());
    {
        let conn = Connection::open(&db).unwrap();
        conn.execute(
            "UPDATE seeds SET grace_until = grace_until + 100000000 WHERE device = ?1 AND generation = 0",
            [&t.fleet[1].id.0[..]],
        )
        .unwrap();
    }
    let center = Center::open_sqlite(&db, t.card.clone(), config()).unwrap();
    let late = NOW + 3 + CenterConfig::default().grace_period + 10;
    let (a, _) = t.fleet[1].auth(&C, late);
    let r = center.verify_auth(&a, &C, late);
    assert!(matches!(r, Err(Error::Integrity(_))), "{r:?}");
}

/// A pending command edited from outside is not served.
#[test]
fn an_edited_command_is_not_served() {
    let mut t = template();
    let dir = tempfile::tempdir().unwrap();
    let db = copy_db(&t.db, dir.path());
    {
        let conn = Connection::open(&db).unwrap();
        conn.execute(
            "UPDATE commands SET counter = counter - 1 WHERE device = ?1",
            [&t.fleet[2].id.0[..]],
        )
        .unwrap();
    }
    let center = Center::open_sqlite(&db, t.card.clone(), config()).unwrap();
    let r = center.command(t.fleet[2].id);
    assert!(matches!(r, Err(Error::Integrity(_))), "{r:?}");
    // The rest of the fleet is served.
    assert!(center.command(t.fleet[0].id).unwrap().is_some());
    assert!(auth_ok(&center, &mut t.fleet[3], NOW + 20));
}

/// The same on both backends with edits portable between SQLite and
/// PostgreSQL, each undone after its check (one database per backend):
/// every kind of row, detected and named; then attack 2.
fn portable_table(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let location = backend.location(dir.path(), "center.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = Center::open_url(&location, card.clone(), config()).unwrap();
    let (fleet, sig0) = populate(&center, &card, &dir.path().join("batch.jsonl"));
    let id = |i: usize| fleet[i].id.0;
    let cases: Vec<(usize, &str, &str, &str)> = vec![
        (
            3,
            "UPDATE devices SET epoch = epoch + 1 WHERE id = {id}",
            "UPDATE devices SET epoch = epoch - 1 WHERE id = {id}",
            "device row fails",
        ),
        (
            2,
            "UPDATE devices SET command_counter = command_counter + 1 WHERE id = {id}",
            "UPDATE devices SET command_counter = command_counter - 1 WHERE id = {id}",
            "device row fails",
        ),
        (
            1,
            "UPDATE seeds SET grace_until = grace_until + 1000 WHERE device = {id} AND generation = 0",
            "UPDATE seeds SET grace_until = grace_until - 1000 WHERE device = {id} AND generation = 0",
            "fails its integrity tag (changed",
        ),
        (
            3,
            "UPDATE seeds SET created = created + 1 WHERE device = {id}",
            "UPDATE seeds SET created = created - 1 WHERE device = {id}",
            "fails its integrity tag (changed",
        ),
        (
            0,
            "UPDATE notary SET first_seen = first_seen - 1 WHERE device = {id}",
            "UPDATE notary SET first_seen = first_seen + 1 WHERE device = {id}",
            "notary record",
        ),
        (
            3,
            "UPDATE notary SET t = t + 1 WHERE device = {id}",
            "UPDATE notary SET t = t - 1 WHERE device = {id}",
            "notary record",
        ),
        (
            2,
            "UPDATE commands SET counter = counter + 1 WHERE device = {id}",
            "UPDATE commands SET counter = counter - 1 WHERE device = {id}",
            "command of",
        ),
        (
            0,
            "UPDATE commands SET created = created + 1 WHERE device = {id}",
            "UPDATE commands SET created = created - 1 WHERE device = {id}",
            "command of",
        ),
        (
            0,
            "UPDATE digest SET count = count + 1 WHERE shard = 19",
            "UPDATE digest SET count = count - 1 WHERE shard = 19",
            "digest shard 19 (notary records)",
        ),
    ];
    for (who, edit, undo, want) in &cases {
        let n = raw_update(&location, edit, &id(*who));
        assert!(n >= 1, "{edit}");
        center.clear_cache();
        let found = center.integrity_scan().unwrap().findings().join("\n");
        assert!(found.contains(want), "{backend:?} {edit}: {found}");
        assert_eq!(raw_update(&location, undo, &id(*who)), n, "{undo}");
        let r = center.integrity_scan().unwrap();
        assert!(r.is_clean(), "{backend:?} after undoing {edit}: {r:?}");
    }
    // Attack 2: the notary record's digest edited to the forged data's.
    let forged = microcert_core::DataDigest::of(b"pay 1000000 to mallory");
    let sql = format!(
        "UPDATE notary SET digest = {} WHERE device = {{id}} AND t = {}",
        match backend {
            Backend::Sqlite => format!("X'{}'", hex::encode(forged)),
            Backend::Postgres => format!("'\\x{}'::bytea", hex::encode(forged)),
        },
        microcert_core::Signature::decode(&sig0).unwrap().header.t
    );
    assert!(raw_update(&location, &sql, &id(0)) >= 1);
    center.clear_cache();
    let r = center.verify_signature(&sig0, b"pay 1000000 to mallory", NOW + 20);
    assert!(matches!(r, Err(Error::Integrity(_))), "{backend:?}: {r:?}");
    assert!(!center.integrity_scan().unwrap().bad_notary.is_empty());
}

both_backends!(portable_table);
