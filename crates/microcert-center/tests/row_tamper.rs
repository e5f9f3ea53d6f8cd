//! Tamper gaps 2 and 3 of SECURITY.md ("What is not protected"), attacked
//! through the center's public API and a raw edit of the database from
//! outside, as someone with write access to the database would:
//!
//! - a replay or challenge row deleted in database replay mode, then the
//!   recorded AUTH / AUTH_RESPONSE sent again (SQLite and PostgreSQL);
//! - the `pruned` mark lowered (its tag then fails) so that a pruned
//!   record can be inserted again;
//! - a token row put back to its copy from before its revocation;
//! - a `marks` row (`pruned`, `clock_alarm`) deleted.
//!
//! Each ran against the code before the fix and the attack succeeded
//! (see the report of branch `rows`).

mod common;

use std::sync::Arc;

use common::*;
use microcert_center::tokens::TokenStatus;
use microcert_center::{Center, CenterConfig, Error, ReplayMode, SoftwareCard};
use microcert_core::Audience;

const C: Audience = Audience::CENTER;

struct Two {
    _dir: tempfile::TempDir,
    loc: String,
    a: Center,
    b: Center,
    fleet: Vec<TestNode>,
}

/// Two centers on one database in replay mode "database".
fn two_centers(backend: Backend) -> Two {
    let dir = tempfile::tempdir().unwrap();
    let loc = backend.location(dir.path(), "c.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let config = || CenterConfig {
        replay: ReplayMode::Database,
        ..CenterConfig::default()
    };
    let a = Center::open_url(&loc, card.clone(), config()).unwrap();
    let b = Center::open_url(&loc, card.clone(), config()).unwrap();
    assert!(!a.replay_in_memory() && !b.replay_in_memory());
    let mut fleet = make_fleet(&*card, 2);
    let batch = dir.path().join("b.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    a.import_batch(&batch, "factory", NOW, &mut |_| {}).unwrap();
    Two {
        _dir: dir,
        loc,
        a,
        b,
        fleet,
    }
}

/// Gap 2: an accepted AUTH's replay row is deleted from outside; the same
/// AUTH sent again to the other center within its window must be refused.
/// Once every record the device had has expired (and been pruned), the
/// device works again without an operator.
fn a_deleted_replay_row_reopens_no_auth(backend: Backend) {
    let mut w = two_centers(backend);
    let t = NOW + 100;
    let (a1, _) = w.fleet[0].auth(&C, t);
    w.a.verify_auth(&a1, &C, t).unwrap();
    // A second device's record stays, so the table is not empty.
    let (other, _) = w.fleet[1].auth(&C, t);
    w.a.verify_auth(&other, &C, t).unwrap();
    let id = w.fleet[0].id.0;
    assert_eq!(
        raw_update(&w.loc, "DELETE FROM replay WHERE device = {id}", &id),
        1
    );
    let r = w.b.verify_auth(&a1, &C, t + 1);
    assert!(
        r.is_err(),
        "a recorded AUTH accepted again after its replay row was deleted: {r:?}"
    );
    let r = w.a.verify_auth(&a1, &C, t + 2);
    assert!(r.is_err(), "accepted again at the first center: {r:?}");
    // The other device is not affected.
    let (o2, _) = w.fleet[1].auth(&C, t + 3);
    w.b.verify_auth(&o2, &C, t + 3).unwrap();
    // Later, once everything recorded for the device has expired and been
    // pruned, a new AUTH of it is accepted (and counts once).
    let later = t + 3600;
    w.a.housekeeping(later).unwrap();
    let (a2, _) = w.fleet[0].auth(&C, later);
    w.b.verify_auth(&a2, &C, later).unwrap();
    assert!(matches!(
        w.a.verify_auth(&a2, &C, later),
        Err(Error::Replay)
    ));
}

/// Gap 2: a spent challenge's row deleted; the same AUTH_RESPONSE sent
/// again must be refused.
fn a_deleted_challenge_row_respends_nothing(backend: Backend) {
    let mut w = two_centers(backend);
    let issued = (NOW + 600) / 60 * 60;
    let ch = w.a.issue_challenge(w.fleet[0].id, issued).unwrap();
    let (m, _) = w.fleet[0].auth_response(&ch, issued);
    w.a.verify_auth_response(&m, &C, issued).unwrap();
    let id = w.fleet[0].id.0;
    assert_eq!(
        raw_update(&w.loc, "DELETE FROM challenges WHERE device = {id}", &id),
        1
    );
    let r = w.b.verify_auth_response(&m, &C, issued + 5);
    assert!(
        r.is_err(),
        "a challenge spent twice after its row was deleted: {r:?}"
    );
}

/// Gap 2: the `pruned` mark lowered from outside (its tag no longer
/// matches): a center whose clock stepped back must still refuse an AUTH
/// whose record was pruned.
fn a_lowered_pruned_mark_reopens_no_pruned_record(backend: Backend) {
    let mut w = two_centers(backend);
    let t = NOW + 100;
    let (a1, _) = w.fleet[0].auth(&C, t);
    w.a.verify_auth(&a1, &C, t).unwrap();
    assert!(w.a.housekeeping(t + 600).unwrap().pruned >= 1);
    assert_eq!(
        raw_update(
            &w.loc,
            "UPDATE marks SET value = 0 WHERE name = 'pruned' AND {id} IS NOT NULL",
            b"x"
        ),
        1
    );
    // B's clock is stepped back to t + 5: the AUTH looks fresh to it.
    let r = w.b.verify_auth(&a1, &C, t + 5);
    assert!(
        r.is_err(),
        "a pruned AUTH accepted again under a lowered pruned mark: {r:?}"
    );
    // The integrity check names the mark.
    let report = w.a.integrity_check(None, t + 600).unwrap();
    assert!(report.bad_marks.iter().any(|m| m == "pruned"), "{report:?}");
}

/// Gap 3: a token row put back to its copy from before its revocation
/// (a valid card tag) must stay revoked, and the integrity check must say
/// which kind of row was put back.
fn a_token_put_back_before_its_revocation_stays_revoked(backend: Backend) {
    let w = two_centers(backend);
    let now = NOW + 10;
    w.a.create_token("alice", "operator", None, "test", now)
        .unwrap();
    w.a.create_token("bob", "auditor", None, "test", now)
        .unwrap();
    let before =
        w.a.database()
            .list_tokens()
            .unwrap()
            .into_iter()
            .find(|t| t.name == "alice")
            .unwrap();
    assert_eq!(
        w.a.revoke_tokens("alice", None, "test", now + 1).unwrap(),
        1
    );
    let status = |c: &Center| {
        c.list_tokens(now + 2)
            .unwrap()
            .into_iter()
            .find(|(t, _)| t.name == "alice")
            .unwrap()
            .1
    };
    assert_eq!(status(&w.b), TokenStatus::Revoked);
    // The old copy put back: revoked cleared, the old (valid) tag.
    let sql = format!(
        "UPDATE tokens SET revoked = NULL, tag = {{id}} WHERE hash = '{}'",
        before.hash
    );
    assert_eq!(raw_update(&w.loc, &sql, &before.tag), 1);
    let s = status(&w.b);
    assert_ne!(
        s,
        TokenStatus::Valid,
        "a revoked token is valid again after its row was put back"
    );
    // What a server's token cache loads: alice is not among the usable.
    let usable = w.b.trusted_tokens().unwrap();
    assert!(!usable.iter().any(|t| t.name == "alice"), "{usable:?}");
    let report = w.a.integrity_check(None, now + 2).unwrap();
    assert!(!report.bad_shards.is_empty(), "{report:?}");
    assert!(
        report.findings().iter().any(|f| f.contains("tokens")),
        "{:?}",
        report.findings()
    );
    // The repair revokes every token of the shard that cannot be trusted
    // and makes the shard whole again; alice stays revoked.
    let repaired = w.a.repair_token_shards("test", now + 3).unwrap();
    assert!(repaired >= 1);
    assert_ne!(status(&w.b), TokenStatus::Valid);
    let report = w.a.integrity_check(None, now + 3).unwrap();
    assert!(report.is_clean(), "{:?}", report.findings());
}

/// Gap 3: a `marks` row deleted from outside (the clock-step alarm, the
/// pruning high-water) is found by the integrity check.
fn a_deleted_mark_is_found(backend: Backend) {
    let w = two_centers(backend);
    w.a.housekeeping(NOW + 100).unwrap();
    assert!(w.a.integrity_check(None, NOW + 100).unwrap().is_clean());
    for name in ["pruned", "clock"] {
        let sql = format!("DELETE FROM marks WHERE name = '{name}' AND {{id}} IS NOT NULL");
        assert_eq!(raw_update(&w.loc, &sql, b"x"), 1, "{name}");
    }
    let report = w.a.integrity_check(None, NOW + 101).unwrap();
    assert!(
        report.findings().iter().any(|f| f.contains("marks")),
        "a deleted mark is not found: {:?}",
        report.findings()
    );
}

/// Runs SQL against the database from outside (several statements).
fn raw_batch(location: &str, sqlite: &str, postgres: &str) {
    if microcert_center::db::is_postgres_url(location) {
        let db = location.rsplit('/').next().unwrap();
        pg_server().unwrap().psql(db, postgres);
    } else {
        let conn = rusqlite::Connection::open(location).unwrap();
        conn.execute_batch(sqlite).unwrap();
    }
}

/// Gap 2: the device's accumulator deleted together with all its records
/// (so that what is left looks like a device never seen): the recorded
/// AUTH is refused, and so is the device, until the pruning high-water
/// passes the quarantine; then it works again on its own.
fn a_deleted_accumulator_with_its_rows_reopens_no_auth(backend: Backend) {
    let mut w = two_centers(backend);
    let t = NOW + 100;
    let (a1, _) = w.fleet[0].auth(&C, t);
    w.a.verify_auth(&a1, &C, t).unwrap();
    let id = w.fleet[0].id.0;
    assert_eq!(
        raw_update(&w.loc, "DELETE FROM replay WHERE device = {id}", &id),
        1
    );
    assert_eq!(
        raw_update(&w.loc, "DELETE FROM replay_acc WHERE device = {id}", &id),
        1
    );
    let r = w.b.verify_auth(&a1, &C, t + 1);
    assert!(r.is_err(), "replayed after its accumulator went: {r:?}");
    // Quarantined: a new AUTH of it is refused for now too.
    let (a2, _) = w.fleet[0].auth(&C, t + 10);
    assert!(w.a.verify_auth(&a2, &C, t + 10).is_err());
    // The other device works.
    let (o, _) = w.fleet[1].auth(&C, t + 10);
    w.a.verify_auth(&o, &C, t + 10).unwrap();
    // Hours later, past the quarantine: the device works again, once.
    let later = t + 4 * 3600;
    w.b.housekeeping(later).unwrap();
    let (a3, _) = w.fleet[0].auth(&C, later);
    w.a.verify_auth(&a3, &C, later).unwrap();
    assert!(matches!(
        w.b.verify_auth(&a3, &C, later),
        Err(Error::Replay)
    ));
}

/// Several centers record AUTHs of one device at once: each message
/// counts exactly once, and no update of the accumulator is lost (the
/// device's next AUTH still matches it).
fn concurrent_centers_lose_no_update(backend: Backend) {
    let mut w = two_centers(backend);
    let n = 24u64;
    let msgs: Vec<(Vec<u8>, u64)> = (0..n)
        .map(|i| {
            let t = NOW + 100 + i;
            (w.fleet[0].auth(&C, t).0, t)
        })
        .collect();
    let accepted = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for k in 0..4usize {
            let (msgs, accepted) = (&msgs, &accepted);
            let center = if k % 2 == 0 { &w.a } else { &w.b };
            s.spawn(move || {
                // Every message goes to both centers (threads 0/1 forward,
                // 2/3 backward).
                let order: Vec<usize> = if k < 2 {
                    (0..msgs.len()).collect()
                } else {
                    (0..msgs.len()).rev().collect()
                };
                for i in order {
                    let (m, t) = &msgs[i];
                    if center.verify_auth(m, &C, *t).is_ok() {
                        accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(
        accepted.into_inner(),
        n,
        "each AUTH must count exactly once"
    );
    let t = NOW + 100 + n;
    let (next, _) = w.fleet[0].auth(&C, t);
    w.b.verify_auth(&next, &C, t)
        .expect("the accumulator lost an update");
    // Pruning takes them all out of the accumulator again.
    let later = t + 3600;
    assert!(w.a.housekeeping(later).unwrap().pruned > n);
    let (after, _) = w.fleet[0].auth(&C, later);
    w.a.verify_auth(&after, &C, later).unwrap();
}

/// A database written before this version (no accumulators, no token or
/// mark shards): the first open covers it once, audited; a recorded AUTH
/// stays refused and the tokens work. Forcing the cover to run again is
/// named by the integrity check.
fn a_database_from_before_is_covered_once(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let loc = backend.location(dir.path(), "c.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let config = || CenterConfig {
        replay: ReplayMode::Database,
        ..CenterConfig::default()
    };
    let mut fleet = make_fleet(&*card, 2);
    let t = NOW + 100;
    let a1 = {
        let a = Center::open_url(&loc, card.clone(), config()).unwrap();
        let batch = dir.path().join("b.jsonl");
        write_batch(&batch, &mut fleet, NOW);
        a.import_batch(&batch, "factory", NOW, &mut |_| {}).unwrap();
        a.create_token("alice", "operator", None, "test", NOW)
            .unwrap();
        a.housekeeping(NOW + 1).unwrap();
        let (a1, _) = fleet[0].auth(&C, t);
        a.verify_auth(&a1, &C, t).unwrap();
        a1
    };
    // Back to the schema and rows of the version before.
    let undo = "DELETE FROM digest WHERE shard >= 64 AND shard < 255; DROP TABLE replay_acc; \
                DELETE FROM meta WHERE key = 'rows_cover';";
    raw_batch(
        &loc,
        &format!("{undo} PRAGMA user_version = 4;"),
        &format!("{undo} UPDATE schema_version SET version = 4;"),
    );
    let c = Center::open_url(&loc, card.clone(), config()).unwrap();
    let r = c.integrity_check(None, t + 1).unwrap();
    assert!(r.is_clean(), "{:?}", r.findings());
    assert!(c.verify_auth(&a1, &C, t + 1).is_err());
    let (a2, _) = fleet[0].auth(&C, t + 2);
    c.verify_auth(&a2, &C, t + 2).unwrap();
    assert_eq!(c.trusted_tokens().unwrap().len(), 1);
    let covers = |c: &Center| {
        c.audit_log(0, 10_000)
            .unwrap()
            .iter()
            .filter(|e| e.entry.action == "digest-upgrade")
            .count()
    };
    assert_eq!(covers(&c), 1);
    drop(c);
    // Opened again: nothing more.
    let c = Center::open_url(&loc, card.clone(), config()).unwrap();
    assert_eq!(covers(&c), 1);
    drop(c);
    // Forced again (to have a put-back row blessed): named.
    let force = "DELETE FROM digest WHERE shard >= 64 AND shard < 255; \
                 UPDATE meta SET value = 'pending' WHERE key = 'rows_cover';";
    raw_batch(&loc, force, force);
    let c = Center::open_url(&loc, card, config()).unwrap();
    assert_eq!(covers(&c), 2);
    let r = c.integrity_check(None, t + 3).unwrap();
    assert!(
        r.audit.as_deref().is_some_and(|a| a.contains("2 times")),
        "{:?}",
        r.findings()
    );
}

/// Gap 3: a deleted mark found by the check is repaired by `integrity
/// repair` to its safe values: the pruning high-water is not lowered and
/// the clock-step alarm is raised until an operator confirms the time.
fn a_deleted_mark_is_repaired_to_safe_values(backend: Backend) {
    let w = two_centers(backend);
    let now = NOW + 100;
    w.a.housekeeping(now).unwrap();
    raw_update(
        &w.loc,
        "DELETE FROM marks WHERE name = 'pruned' AND {id} IS NOT NULL",
        b"x",
    );
    let backups = w._dir.path().join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    let report = w.a.repair(&backups, None, "ops", now + 1).unwrap();
    assert!(report.marks, "{report:?}");
    // Not lower than the repair time plus the instance skew (30 s).
    assert!(w.a.pruned_high_water().unwrap() >= now + 31);
    assert!(w.a.clock_alarm().unwrap().is_some());
    assert!(w.a.housekeeping(now + 2).is_err());
    w.a.confirm_clock_step("ops", now + 2).unwrap();
    w.a.housekeeping(now + 3).unwrap();
    let r = w.a.integrity_check(None, now + 3).unwrap();
    assert!(r.is_clean(), "{:?}", r.findings());
}

/// The sealing layer keeps every replay accumulator in step with its rows:
/// its transaction refuses the raw row and accumulator writes that only
/// its own paths may make (an untagged accumulator, a pruned row not taken
/// out, a record inserted without being added), so no caller of
/// `Center::database()` can put them out of step by mistake.
/// One raw write tried through the sealing layer.
type RawWrite<'a> = dyn Fn(&mut dyn microcert_center::db::Tx) -> microcert_center::Result<()> + 'a;

fn the_sealed_layer_refuses_raw_accumulator_writes(backend: Backend) {
    let w = two_centers(backend);
    let id = w.fleet[0].id;
    let acc = microcert_center::db::ReplayAcc {
        device: id,
        acc: [0; 32],
        count: 0,
        max_expires: 0,
        tag: [0; 32],
    };
    let db = w.a.database();
    let attempts: [(&str, &RawWrite<'_>); 4] = [
        ("put_replay_accs", &|tx| {
            tx.put_replay_accs(std::slice::from_ref(&acc))
        }),
        ("prune_replay_rows", &|tx| {
            tx.prune_replay_rows(NOW + 10_000, 10).map(|_| ())
        }),
        ("record_replays_above", &|tx| {
            tx.record_replays_above(&[(id, 1, 5, 7, NOW + 60)], 0)
                .map(|_| ())
        }),
        ("spend_challenge_above", &|tx| {
            tx.spend_challenge_above(id, &[1; 8], NOW + 60, 0)
                .map(|_| ())
        }),
    ];
    for (name, f) in attempts {
        let r = db.transaction(&mut |tx| f(tx));
        assert!(r.is_err(), "{name} went through the sealing layer");
    }
    // Nothing was written: the check is clean and the device works.
    let r = w.a.integrity_check(None, NOW + 1).unwrap();
    assert!(r.is_clean(), "{:?}", r.findings());
}

/// Attack: a token row put back together with its digest shard row (a
/// consistent partial rollback of the token tables, after the token's
/// revocation). The tag and the shard agree; the card's anchor follows the
/// token shards too, so the integrity check finds the shard older than
/// the anchor.
fn a_token_put_back_with_its_shard_is_older_than_the_anchor(backend: Backend) {
    let w = two_centers(backend);
    let now = NOW + 10;
    let anchor = w._dir.path().join("center.anchor");
    w.a.create_token("alice", "operator", None, "test", now)
        .unwrap();
    let before =
        w.a.database()
            .list_tokens()
            .unwrap()
            .into_iter()
            .find(|t| t.name == "alice")
            .unwrap();
    let shard = microcert_center::integrity::token_shard(&before.hash);
    let old_shard =
        w.a.database()
            .digest_shards()
            .unwrap()
            .into_iter()
            .find(|s| s.shard == shard)
            .unwrap();
    w.a.revoke_tokens("alice", None, "test", now + 1).unwrap();
    w.a.refresh_anchor(&anchor, now + 1).unwrap();
    let sql = format!(
        "UPDATE tokens SET revoked = NULL, tag = {{id}} WHERE hash = '{}'",
        before.hash
    );
    assert_eq!(raw_update(&w.loc, &sql, &before.tag), 1);
    let sql = format!(
        "UPDATE digest SET acc = {{id}}, count = {}, seq = {} WHERE shard = {shard}",
        old_shard.count, old_shard.seq
    );
    assert_eq!(raw_update(&w.loc, &sql, &old_shard.acc), 1);
    let sql = format!("UPDATE digest SET tag = {{id}} WHERE shard = {shard}");
    assert_eq!(raw_update(&w.loc, &sql, &old_shard.tag), 1);
    let report = w.b.integrity_check(Some(&anchor), now + 2).unwrap();
    assert!(
        report.rolled_back_shards.contains(&shard),
        "a token row put back with its shard is not found: {:?}",
        report.findings()
    );
    // Repaired in place (backups hold no tokens, and nothing else was
    // put back): the shard's tokens are revoked, its count moves past the
    // anchor's, and no whole restore is asked for.
    let backups = w._dir.path().join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    let r = w.b.repair(&backups, Some(&anchor), "ops", now + 3).unwrap();
    assert!(r.whole_restore.is_none(), "{r:?}");
    assert!(r.token_shards >= 1, "{r:?}");
    let alice =
        w.b.list_tokens(now + 4)
            .unwrap()
            .into_iter()
            .find(|(t, _)| t.name == "alice")
            .unwrap()
            .1;
    assert_eq!(alice, TokenStatus::Revoked);
    let report = w.b.integrity_check(Some(&anchor), now + 4).unwrap();
    assert!(report.is_clean(), "{:?}", report.findings());
}

both_backends!(
    a_deleted_replay_row_reopens_no_auth,
    a_deleted_challenge_row_respends_nothing,
    a_lowered_pruned_mark_reopens_no_pruned_record,
    a_token_put_back_before_its_revocation_stays_revoked,
    a_deleted_mark_is_found,
    a_deleted_accumulator_with_its_rows_reopens_no_auth,
    concurrent_centers_lose_no_update,
    a_database_from_before_is_covered_once,
    a_deleted_mark_is_repaired_to_safe_values,
    the_sealed_layer_refuses_raw_accumulator_writes,
    a_token_put_back_with_its_shard_is_older_than_the_anchor,
);
