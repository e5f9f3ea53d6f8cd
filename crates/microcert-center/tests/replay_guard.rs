//! The in-memory replay guard (PROTOCOL.md section 6: an AUTH or SEALED
//! is accepted only once): refusal in memory, clean and unclean restarts,
//! pruning, one process per database, and the database mode.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use microcert_center::{Center, CenterConfig, Error, KdfParams, ReplayMode, SoftwareCard};
use microcert_core::{Audience, KeyState};

const C: Audience = Audience::CENTER;

/// The center over the SQLite file of `dir`, default configuration.
fn open(dir: &Path, card: Arc<SoftwareCard>) -> Center {
    Center::open_sqlite(&dir.join("c.db"), card, CenterConfig::default()).unwrap()
}

/// A center with `n` imported devices; the nodes.
fn setup(dir: &Path, card: Arc<SoftwareCard>, n: u64) -> (Center, Vec<TestNode>) {
    let center = open(dir, card.clone());
    let mut fleet = make_fleet(&*card, n);
    let batch = dir.join("b.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    let r = center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    assert_eq!(r.enrolled, n);
    (center, fleet)
}

#[test]
fn replay_is_refused_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (center, mut fleet) = setup(dir.path(), card, 3);
    assert!(
        center.replay_in_memory(),
        "SQLite opened alone: memory mode"
    );
    let t = NOW + 5;
    let (a, _) = fleet[0].auth(&C, t);
    center.verify_auth(&a, &C, t).unwrap();
    assert!(matches!(center.verify_auth(&a, &C, t), Err(Error::Replay)));
    assert!(matches!(
        center.verify_auth(&a, &C, t + 100),
        Err(Error::Replay)
    ));
    // The same t with another r is another message.
    let (b, _) = fleet[0].auth(&C, t);
    center.verify_auth(&b, &C, t).unwrap();

    let rp = Audience::relying_party(RP);
    let s = fleet[1].seal(&rp, b"reading", t);
    // SEALED may not be the first use of a seed: activate by an AUTH.
    center.verify_auth(&fleet[1].auth(&C, t).0, &C, t).unwrap();
    center.open_sealed(&s, &rp, t).unwrap();
    assert!(matches!(center.open_sealed(&s, &rp, t), Err(Error::Replay)));
    assert_eq!(center.replay_entries(), 4);
}

#[test]
fn first_use_activates_once_in_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (center, mut fleet) = setup(dir.path(), card, 1);
    let id = fleet[0].id;
    let state = |c: &Center| c.device(id).unwrap().unwrap().seeds[0].state;
    assert_eq!(state(&center), KeyState::PreActivation);
    for i in 0..3 {
        let (a, _) = fleet[0].auth(&C, NOW + i);
        center.verify_auth(&a, &C, NOW + i).unwrap();
    }
    assert_eq!(state(&center), KeyState::Active);
    let activations = center
        .audit_log(0, 1000)
        .unwrap()
        .iter()
        .filter(|e| e.entry.action == "activate" && e.entry.device == Some(id))
        .count();
    assert_eq!(activations, 1);
}

#[test]
fn clean_restart_keeps_the_accepted_messages() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let t = NOW + 10;
    let (accepted, mut fleet) = {
        let (center, mut fleet) = setup(dir.path(), card.clone(), 2);
        let (a, _) = fleet[0].auth(&C, t);
        center.verify_auth(&a, &C, t).unwrap();
        (a, fleet)
    };
    let center = open(dir.path(), card);
    assert!(matches!(
        center.verify_auth(&accepted, &C, t + 1),
        Err(Error::Replay)
    ));
    // No floor after a clean stop: the same t with a fresh r is accepted.
    let (b, _) = fleet[0].auth(&C, t);
    center.verify_auth(&b, &C, t + 1).unwrap();
}

#[test]
fn unclean_restart_refuses_every_t_up_to_the_mark() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let t = NOW + 10;
    let (accepted, mut fleet) = {
        let (center, mut fleet) = setup(dir.path(), card.clone(), 2);
        let (a, _) = fleet[0].auth(&C, t);
        center.verify_auth(&a, &C, t).unwrap();
        // As if the process were killed: nothing is saved at the stop.
        center.abandon();
        (a, fleet)
    };
    let center = open(dir.path(), card.clone());
    assert!(matches!(
        center.verify_auth(&accepted, &C, t + 1),
        Err(Error::Replay)
    ));
    // Fresh messages at or before the mark are refused too: the guard
    // cannot know which were accepted before the crash.
    let (b, _) = fleet[0].auth(&C, t);
    assert!(matches!(
        center.verify_auth(&b, &C, t + 1),
        Err(Error::Replay)
    ));
    let (c, _) = fleet[1].auth(&C, t + 20);
    assert!(matches!(
        center.verify_auth(&c, &C, t + 20),
        Err(Error::Replay)
    ));
    // Past the mark (t + 30 s lease): accepted again.
    let later = t + 31;
    let (d, _) = fleet[0].auth(&C, later);
    center.verify_auth(&d, &C, later).unwrap();
    // A second crash right after keeps the new mark.
    center.abandon();
    let center = open(dir.path(), card);
    let (e, _) = fleet[1].auth(&C, later);
    assert!(matches!(
        center.verify_auth(&e, &C, later),
        Err(Error::Replay)
    ));
}

#[test]
fn expired_entries_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (center, mut fleet) = setup(dir.path(), card, 10);
    let t = NOW + 10;
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&C, t);
        center.verify_auth(&a, &C, t).unwrap();
    }
    assert_eq!(center.replay_entries(), 10);
    // Kept while the message could still pass the freshness check at any
    // center (t + skew of 300 s + instance skew of 30 s)...
    center.prune_replay(t + 331);
    assert_eq!(center.replay_entries(), 10);
    // ...and dropped after it.
    center.prune_replay(t + 332);
    assert_eq!(center.replay_entries(), 0);
    // New messages prune their shard as they arrive.
    let later = t + 400;
    let (a, _) = fleet[0].auth(&C, later);
    center.verify_auth(&a, &C, later).unwrap();
    assert_eq!(center.replay_entries(), 1);
}

#[test]
fn centers_of_one_process_share_the_guard() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (a_center, mut fleet) = setup(dir.path(), card.clone(), 1);
    let b_center = open(dir.path(), card);
    let (a, _) = fleet[0].auth(&C, NOW);
    a_center.verify_auth(&a, &C, NOW).unwrap();
    assert!(matches!(
        b_center.verify_auth(&a, &C, NOW),
        Err(Error::Replay)
    ));
}

#[test]
fn database_mode_records_in_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let path = dir.path().join("c.db");
    let config = || CenterConfig {
        replay: ReplayMode::Database,
        ..CenterConfig::default()
    };
    let a_center = Center::open_sqlite(&path, card.clone(), config()).unwrap();
    assert!(!a_center.replay_in_memory());
    let mut fleet = make_fleet(&*card, 1);
    let batch = dir.path().join("b.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    a_center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    let (a, _) = fleet[0].auth(&C, NOW);
    a_center.verify_auth(&a, &C, NOW).unwrap();
    let (b, _) = fleet[0].auth(&C, NOW);
    a_center.verify_auth(&b, &C, NOW).unwrap();
    // Another center on the database, as another process would be.
    let b_center = Center::open_sqlite(&path, card, config()).unwrap();
    for m in [&a, &b] {
        assert!(matches!(
            b_center.verify_auth(m, &C, NOW),
            Err(Error::Replay)
        ));
    }
    assert_eq!(a_center.replay_entries(), 0);
}

/// The child of `another_process_cannot_verify`: verifies once (which
/// takes the guard's lock) and holds it until its stdin closes.
#[test]
fn child_holds_the_guard() {
    let Ok(dir) = std::env::var("MC_REPLAY_CHILD") else {
        return;
    };
    let dir = Path::new(&dir);
    let card = Arc::new(SoftwareCard::open(&dir.join("card"), b"pw").unwrap());
    let center = open(dir, card.clone());
    let mut node = make_fleet(&*card, 1).remove(0);
    let (a, _) = node.auth(&C, NOW + 1);
    center.verify_auth(&a, &C, NOW + 1).unwrap();
    println!("holding");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn another_process_cannot_verify() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(
        SoftwareCard::init(
            &dir.path().join("card"),
            b"pw",
            KdfParams::insecure_for_tests(),
        )
        .unwrap(),
    );
    let mut fleet = {
        let (_, fleet) = setup(dir.path(), card.clone(), 1);
        fleet
    };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_holds_the_guard",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MC_REPLAY_CHILD", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    assert!(
        lines.any(|l| l.unwrap().contains("holding")),
        "child did not take the guard"
    );
    let center = open(dir.path(), card.clone());
    let (a, _) = fleet[0].auth(&C, NOW + 2);
    let refused = center.verify_auth(&a, &C, NOW + 2);
    // Operator reads still work beside the serving process.
    assert!(center.device(fleet[0].id).unwrap().is_some());
    drop(child.stdin.take());
    child.wait().unwrap();
    match refused {
        Err(e @ Error::ReplayGuardLocked { .. }) => {
            assert!(e.to_string().contains("replay"), "{e}");
            assert!(
                std::error::Error::source(&e).is_some(),
                "SQLite's error is kept"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Once the other process is gone, this one takes over.
    drop(center);
    let center = open(dir.path(), card);
    center.verify_auth(&a, &C, NOW + 2).unwrap();
}

/// How a run of the center ends.
#[derive(Debug, Clone, Copy)]
enum End {
    /// Killed: nothing saved at the stop.
    Crash,
    /// Stopped cleanly.
    Clean,
}

fn end(center: Center, how: End) {
    match how {
        End::Crash => center.abandon(),
        End::Clean => drop(center),
    }
}

fn refused(center: &Center, m: &[u8], now: u64) -> bool {
    matches!(center.verify_auth(m, &C, now), Err(Error::Replay))
}

/// Issue 12: killed at each step of start-up (the key database's record
/// of the guard written before the state file: step 3 stops between the
/// two) and of shutdown, after a crash or a clean stop or neither, then
/// restarted in every way: the accepted messages stay refused while
/// fresh, and a later message still passes.
#[test]
fn every_step_of_start_and_shutdown_is_safe_to_interrupt() {
    use microcert_center::FaultPoint;
    let mut faults = Vec::new();
    for n in 1..=FaultPoint::START_STEPS {
        faults.push(FaultPoint::Start(n));
    }
    for n in 1..=FaultPoint::STOP_STEPS {
        faults.push(FaultPoint::Stop(n));
    }
    let t = NOW + 10;
    let mut cases = 0;
    for before in [None, Some(End::Crash), Some(End::Clean)] {
        for &fault in &faults {
            if before.is_none() && matches!(fault, FaultPoint::Start(_)) {
                continue;
            }
            let what = format!("{before:?} then a crash at {fault:?}");
            let dir = tempfile::tempdir().unwrap();
            let card = Arc::new(SoftwareCard::ephemeral().unwrap());
            let (center, mut fleet) = setup(dir.path(), card.clone(), 2);
            let (a, _) = fleet[0].auth(&C, t);
            let (b, _) = fleet[1].auth(&C, t + 1);
            center.verify_auth(&a, &C, t).unwrap();
            center.verify_auth(&b, &C, t + 1).unwrap();
            let mut run = center;
            if let Some(how) = before {
                end(run, how);
                run = open(dir.path(), card.clone());
                if matches!(fault, FaultPoint::Stop(_)) {
                    assert!(refused(&run, &a, t + 2), "{what}: before the fault");
                }
            }
            run.inject_replay_fault(fault);
            if matches!(fault, FaultPoint::Start(_)) {
                // The start-up stops part-way: nothing is accepted.
                assert!(run.verify_auth(&b, &C, t + 2).is_err(), "{what}");
            }
            // The process dies (the guard saves nothing more).
            run.abandon();
            for (i, how) in [End::Clean, End::Crash, End::Clean, End::Clean]
                .into_iter()
                .enumerate()
            {
                let c = open(dir.path(), card.clone());
                let now = t + 3 + i as u64;
                assert!(refused(&c, &a, now), "{what}, restart {i}: a replayed");
                assert!(refused(&c, &b, now), "{what}, restart {i}: b replayed");
                end(c, how);
            }
            // Past the floor a new message passes.
            let c = open(dir.path(), card.clone());
            let later = t + 200;
            let (d, _) = fleet[0].auth(&C, later);
            c.verify_auth(&d, &C, later)
                .unwrap_or_else(|e| panic!("{what}: a new message refused: {e}"));
            assert!(refused(&c, &d, later + 1), "{what}: d replayed");
            cases += 1;
        }
    }
    assert_eq!(cases, 27);
}

/// The state file's tag (issue 12): an edit from outside is detected, and
/// the guard starts as after a crash with at least the key database's
/// replay mark as its floor (gap 1: that record is never behind the
/// file), so nothing accepted before passes.
#[test]
fn an_edited_state_file_is_detected() {
    let edits: &[(&str, &str, bool)] = &[
        (
            "lowered mark and floor",
            "UPDATE guard2 SET mark = 0, floor = 0",
            true,
        ),
        ("live keys deleted", "DELETE FROM live", true),
        (
            "clean set after a crash",
            "UPDATE guard2 SET clean = 1",
            false,
        ),
        (
            "pruned high-water lowered",
            "UPDATE guard2 SET pruned = 0",
            true,
        ),
        ("epoch changed", "UPDATE guard2 SET epoch = epoch + 1", true),
        ("state row deleted", "DELETE FROM guard2", true),
        (
            "whole state deleted",
            "DELETE FROM guard2; DELETE FROM live",
            false,
        ),
        (
            "made to look like an old-format file",
            "DELETE FROM guard2; INSERT INTO state (id, mark, clean) VALUES (1, 0, 1)",
            true,
        ),
    ];
    let t = NOW + 10;
    for &(what, sql, clean) in edits {
        let dir = tempfile::tempdir().unwrap();
        let card = Arc::new(SoftwareCard::ephemeral().unwrap());
        let (center, mut fleet) = setup(dir.path(), card.clone(), 2);
        let (a, _) = fleet[0].auth(&C, t);
        center.verify_auth(&a, &C, t).unwrap();
        end(center, if clean { End::Clean } else { End::Crash });
        let state = dir.path().join("c.db-replay");
        let conn = rusqlite::Connection::open(&state).unwrap();
        conn.execute_batch(sql).unwrap();
        drop(conn);
        let now = t + 60;
        let center = open(dir.path(), card.clone());
        assert!(refused(&center, &a, now), "{what}: replay accepted");
        // Every t up to the mark (t + 30 s lease) is refused...
        let (b, _) = fleet[1].auth(&C, t + 25);
        assert!(refused(&center, &b, now), "{what}: floor not raised");
        // ...and the floor is durable: a clean restart keeps it.
        drop(center);
        let center = open(dir.path(), card.clone());
        assert!(refused(&center, &a, now + 1), "{what}: after a restart");
        let (b, _) = fleet[1].auth(&C, t + 26);
        assert!(refused(&center, &b, now + 1), "{what}: floor lost");
        // Past the mark, messages pass: no need to wait out the window.
        let (c, _) = fleet[1].auth(&C, now + 1);
        center
            .verify_auth(&c, &C, now + 1)
            .unwrap_or_else(|e| panic!("{what}: refused past the mark: {e}"));
    }
}

/// Gap 1: the guard's record in the key database (the `memory_guard`
/// mark: epoch and replay mark) edited, deleted or put back to an older
/// copy: the guard cannot trust anything, and waits out the longest
/// freshness window.
#[test]
fn an_edited_guard_record_waits_out_the_window() {
    let t = NOW + 10;
    for what in ["lowered", "deleted", "put back to an older copy"] {
        let dir = tempfile::tempdir().unwrap();
        let card = Arc::new(SoftwareCard::ephemeral().unwrap());
        let db = dir.path().join("c.db");
        let (center, mut fleet) = setup(dir.path(), card.clone(), 2);
        let (a, _) = fleet[0].auth(&C, t);
        center.verify_auth(&a, &C, t).unwrap();
        drop(center);
        let conn = rusqlite::Connection::open(&db).unwrap();
        let old: (i64, Vec<u8>) = conn
            .query_row(
                "SELECT value, tag FROM marks WHERE name = 'memory_guard'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        drop(conn);
        // Another run accepts b and stops cleanly.
        let c = open(dir.path(), card.clone());
        let (b, _) = fleet[1].auth(&C, t + 40);
        c.verify_auth(&b, &C, t + 40).unwrap();
        drop(c);
        let conn = rusqlite::Connection::open(&db).unwrap();
        match what {
            "lowered" => conn.execute(
                "UPDATE marks SET value = value - 100 WHERE name = 'memory_guard'",
                [],
            ),
            "deleted" => conn.execute("DELETE FROM marks WHERE name = 'memory_guard'", []),
            _ => conn.execute(
                "UPDATE marks SET value = ?1, tag = ?2 WHERE name = 'memory_guard'",
                rusqlite::params![old.0, old.1],
            ),
        }
        .unwrap();
        drop(conn);
        let now = t + 41;
        let c = open(dir.path(), card.clone());
        assert!(refused(&c, &b, now), "{what}: b replayed");
        assert!(refused(&c, &a, now), "{what}: a replayed");
        let (d, _) = fleet[0].auth(&C, now + 100);
        assert!(refused(&c, &d, now + 100), "{what}: window not waited out");
        drop(c);
        let c = open(dir.path(), card.clone());
        let later = now + 332;
        let (e, _) = fleet[0].auth(&C, later);
        c.verify_auth(&e, &C, later)
            .unwrap_or_else(|err| panic!("{what}: refused past the window: {err}"));
    }
}

/// A clock stepped backwards in memory mode, without a restart and across
/// a clean one: a message whose entry was pruned stays refused.
#[test]
fn a_clock_stepped_back_reopens_no_replay_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let (center, mut fleet) = setup(dir.path(), card.clone(), 2);
    let t = NOW + 10;
    let (a, _) = fleet[0].auth(&C, t);
    center.verify_auth(&a, &C, t).unwrap();
    // Twenty minutes on, a message prunes the shard of a.
    let later = t + 1200;
    let (b, _) = fleet[1].auth(&C, later);
    center.verify_auth(&b, &C, later).unwrap();
    center.prune_replay(later);
    assert_eq!(center.replay_entries(), 1);
    // The clock steps back to t + 5.
    assert!(refused(&center, &a, t + 5));
    drop(center);
    let center = open(dir.path(), card);
    assert!(refused(&center, &a, t + 6));
}

/// The first start after an upgrade finds a state file of the old format
/// (no tag, no floor): its mark is trusted as after an unclean stop.
#[test]
fn an_old_format_state_file_is_read_as_an_unclean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let mut fleet = {
        let (_, fleet) = setup(dir.path(), card.clone(), 1);
        fleet
    };
    let t = NOW + 10;
    let conn = rusqlite::Connection::open(dir.path().join("c.db-replay")).unwrap();
    conn.execute_batch(&format!(
        "CREATE TABLE state (id INTEGER PRIMARY KEY CHECK (id = 1), mark INTEGER NOT NULL, \
         clean INTEGER NOT NULL);
         CREATE TABLE live (device BLOB NOT NULL, generation INTEGER NOT NULL, \
         t INTEGER NOT NULL, r INTEGER NOT NULL, expires INTEGER NOT NULL);
         INSERT INTO state VALUES (1, {}, 1);",
        t + 30
    ))
    .unwrap();
    drop(conn);
    let center = open(dir.path(), card);
    let (a, _) = fleet[0].auth(&C, t);
    assert!(refused(&center, &a, t));
    let (b, _) = fleet[0].auth(&C, t + 31);
    center.verify_auth(&b, &C, t + 31).unwrap();
}

/// Gap 1 (issue 12 review): a validly tagged *older* copy of the state
/// file put back, after a clean stop or after a crash, must not bring back
/// AUTHs accepted since the copy was taken.
#[test]
fn an_older_state_file_put_back_reopens_no_replay() {
    let t = NOW + 10;
    for how in [End::Clean, End::Crash] {
        let what = format!("a copy taken after a {how:?} stop");
        let dir = tempfile::tempdir().unwrap();
        let card = Arc::new(SoftwareCard::ephemeral().unwrap());
        let state = dir.path().join("c.db-replay");
        let (center, mut fleet) = setup(dir.path(), card.clone(), 2);
        let (a, _) = fleet[0].auth(&C, t);
        center.verify_auth(&a, &C, t).unwrap();
        end(center, how);
        let old = std::fs::read(&state).unwrap();
        // The next run accepts b, past the mark of the copy, and stops
        // the same way.
        let c = open(dir.path(), card.clone());
        let tb = t + 40;
        let (b, _) = fleet[1].auth(&C, tb);
        c.verify_auth(&b, &C, tb)
            .unwrap_or_else(|e| panic!("{what}: b refused: {e}"));
        end(c, how);
        // The attacker puts the older copy back.
        std::fs::write(&state, &old).unwrap();
        let c = open(dir.path(), card.clone());
        assert!(refused(&c, &b, tb + 1), "{what}: b replayed");
        assert!(refused(&c, &a, tb + 1), "{what}: a replayed");
        drop(c);
        // Still refused after a clean restart.
        let c = open(dir.path(), card.clone());
        assert!(refused(&c, &b, tb + 2), "{what}: b replayed later");
    }
}

/// Gap 1: deleting both the state file and the key database's marker of
/// the guard is not a first start while the database has used seeds.
#[test]
fn deleting_the_state_file_and_the_marker_is_not_a_first_start() {
    let t = NOW + 10;
    for how in [End::Clean, End::Crash] {
        let what = format!("after a {how:?} stop");
        let dir = tempfile::tempdir().unwrap();
        let card = Arc::new(SoftwareCard::ephemeral().unwrap());
        let (center, mut fleet) = setup(dir.path(), card.clone(), 2);
        let (a, _) = fleet[0].auth(&C, t);
        center.verify_auth(&a, &C, t).unwrap();
        end(center, how);
        std::fs::remove_file(dir.path().join("c.db-replay")).unwrap();
        let conn = rusqlite::Connection::open(dir.path().join("c.db")).unwrap();
        let n = conn
            .execute("DELETE FROM marks WHERE name = 'memory_guard'", [])
            .unwrap();
        assert_eq!(n, 1, "the marker row exists");
        drop(conn);
        let c = open(dir.path(), card.clone());
        assert!(refused(&c, &a, t + 1), "{what}: a replayed");
        // The safe path: nothing up to now plus the window passes.
        let (b, _) = fleet[1].auth(&C, t + 2);
        assert!(
            refused(&c, &b, t + 2),
            "{what}: a fresh message before the window"
        );
        drop(c);
        let c = open(dir.path(), card.clone());
        let later = t + 1 + 332;
        let (d, _) = fleet[1].auth(&C, later);
        c.verify_auth(&d, &C, later)
            .unwrap_or_else(|e| panic!("{what}: refused past the window: {e}"));
    }
}
