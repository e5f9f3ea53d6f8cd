//! Clock steps (issue 12): a wall clock that jumps forward does not
//! deactivate seeds or end grace periods, one that jumps backwards below
//! the highest time seen raises the alarm too, until an operator confirms;
//! the shared high-water marks carry card tags. Run with a hand-moved
//! clock, on SQLite and PostgreSQL.

mod common;

use std::sync::Arc;

use common::*;
use microcert_center::clock::{Clock, ManualClock};
use microcert_center::{Center, CenterConfig, Error, ReplayMode, SoftwareCard};
use microcert_core::{Audience, KeyState};

const C: Audience = Audience::CENTER;

/// 2031-01-01T00:01:00Z: seeds of base year 2026 are over.
const Y2031: u64 = 1_924_992_000 + 60;

struct Fixture {
    _dir: tempfile::TempDir,
    loc: String,
    card: Arc<SoftwareCard>,
}

impl Fixture {
    fn center(&self, clock: &Arc<ManualClock>) -> Center {
        let config = CenterConfig {
            replay: ReplayMode::Database,
            ..CenterConfig::default()
        };
        Center::open_url(&self.loc, self.card.clone(), config)
            .unwrap()
            .with_clock(clock.clone())
    }
}

fn setup(backend: Backend, n: u64) -> (Fixture, Arc<ManualClock>, Center, Vec<TestNode>) {
    let dir = tempfile::tempdir().unwrap();
    let loc = backend.location(dir.path(), "c.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let f = Fixture {
        _dir: dir,
        loc,
        card,
    };
    let clock = ManualClock::new(NOW);
    let center = f.center(&clock);
    let mut fleet = make_fleet(&*f.card, n);
    let batch = f._dir.path().join("b.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&C, NOW);
        center.verify_auth(&a, &C, NOW).unwrap();
    }
    center.housekeeping(clock.wall()).unwrap();
    (f, clock, center, fleet)
}

fn state(center: &Center, node: &TestNode, g: usize) -> KeyState {
    center.device(node.id).unwrap().unwrap().seeds[g].state
}

/// The clock jumps to 2031 while the center runs: nothing is deactivated,
/// the alarm holds on every center of the database until an operator
/// confirms, then housekeeping resumes.
fn forward_jump_deactivates_nothing_until_confirmed(backend: Backend) {
    let (f, clock, center, fleet) = setup(backend, 5);
    clock.advance(60);
    center.housekeeping(clock.wall()).unwrap();
    clock.step(Y2031);
    let r = center.housekeeping(clock.wall());
    assert!(matches!(r, Err(Error::ClockUnconfirmed { .. })), "{r:?}");
    assert!(
        fleet
            .iter()
            .all(|n| state(&center, n, 0) == KeyState::Active)
    );
    assert!(center.clock_alarm().unwrap().is_some());
    // Still refused later, and by another center (the alarm is durable
    // and shared; the other center has no monotonic reference yet).
    clock.advance(60);
    assert!(center.housekeeping(clock.wall()).is_err());
    let other = f.center(&ManualClock::new(clock.wall()));
    assert!(other.housekeeping(clock.wall()).is_err());
    assert!(
        fleet
            .iter()
            .all(|n| state(&center, n, 0) == KeyState::Active)
    );
    // The operator confirms: the jump was real.
    center
        .confirm_clock_step("operator:ann", clock.wall())
        .unwrap();
    assert_eq!(center.clock_alarm().unwrap(), None);
    assert_eq!(center.housekeeping(clock.wall()).unwrap().deactivated, 5);
    let audit = center.audit_log(0, 10_000).unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.entry.action == "confirm-clock" && e.entry.actor == "operator:ann")
    );
}

/// A jump past the end of a grace period does not end it; the previous
/// generation keeps verifying at the right time.
fn forward_jump_ends_no_grace_period(backend: Backend) {
    let (_f, clock, center, mut fleet) = setup(backend, 1);
    let node = &mut fleet[0];
    let t = clock.wall();
    center
        .queue_update(node.id, "operator:ann", "roll-out", t)
        .unwrap();
    let cmd = center.command(node.id).unwrap().unwrap();
    let Reply::Enroll(e) = node.handle_command(&cmd, t) else {
        panic!()
    };
    center.enroll(&e, t).unwrap();
    clock.advance(60);
    center.housekeeping(clock.wall()).unwrap();
    let grace = CenterConfig::default().grace_period;
    clock.step(t + grace + 86_400);
    assert!(center.housekeeping(clock.wall()).is_err());
    assert_eq!(state(&center, node, 0), KeyState::Active);
    // The clock is put right again: the old generation still verifies.
    clock.step(t + 120);
    let (a, _) = node.auth(&C, clock.wall());
    center.verify_auth(&a, &C, clock.wall()).unwrap();
}

/// A center whose clock is behind the highest time another center saw by
/// more than the tolerance plus the instance skew raises the alarm; 20 s
/// behind (inside the 30 s instance skew) does not.
fn backward_step_below_the_high_water_is_an_alarm(backend: Backend) {
    let (f, clock, center, _fleet) = setup(backend, 1);
    clock.advance(600);
    center.housekeeping(clock.wall()).unwrap();
    let slow = f.center(&ManualClock::new(clock.wall() - 20));
    slow.housekeeping(clock.wall() - 20).unwrap();
    let stepped = f.center(&ManualClock::new(clock.wall() - 3600));
    let r = stepped.housekeeping(clock.wall() - 3600);
    assert!(matches!(r, Err(Error::ClockUnconfirmed { .. })), "{r:?}");
    assert!(center.clock_alarm().unwrap().is_some());
    // The pruning high-water never goes down.
    assert_eq!(center.pruned_high_water().unwrap(), clock.wall());
}

/// The shared marks carry card tags: an edit from outside is named in the
/// log and does not lower what they protect.
fn edited_marks_are_detected(backend: Backend) {
    let (f, clock, center, mut fleet) = setup(backend, 2);
    let t = clock.wall() + 10;
    let (a, _) = fleet[0].auth(&C, t);
    center.verify_auth(&a, &C, t).unwrap();
    clock.advance(1200);
    center.housekeeping(clock.wall()).unwrap();
    assert!(center.check_marks().unwrap().is_empty());
    // The pruning high-water lowered from outside: the next housekeeping
    // finds the bad tag and puts back a safe value (now + instance skew).
    assert_eq!(
        raw_update(
            &f.loc,
            "UPDATE marks SET value = 0 WHERE name = 'pruned'",
            b""
        ),
        1
    );
    assert_eq!(center.check_marks().unwrap(), vec!["pruned".to_string()]);
    // ... and the integrity check names it.
    let report = center.integrity_check(None, clock.wall()).unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.bad_marks, vec!["pruned".to_string()]);
    assert!(report.findings().iter().any(|f| f.contains("pruned")));
    clock.advance(60);
    center.housekeeping(clock.wall()).unwrap();
    assert_eq!(center.pruned_high_water().unwrap(), clock.wall() + 30);
    assert!(center.check_marks().unwrap().is_empty());
    let stepped_back = f.center(&ManualClock::new(t + 1));
    assert!(matches!(
        stepped_back.verify_auth(&a, &C, t + 1),
        Err(Error::Replay)
    ));
    // The clock high-water lowered: an alarm, not a silent pass.
    assert_eq!(
        raw_update(
            &f.loc,
            "UPDATE marks SET value = 1 WHERE name = 'clock'",
            b""
        ),
        1
    );
    clock.advance(60);
    assert!(center.housekeeping(clock.wall()).is_err());
    center
        .confirm_clock_step("operator:ann", clock.wall())
        .unwrap();
    center.housekeeping(clock.wall()).unwrap();
    // An alarm cleared from outside stays an alarm.
    clock.step(Y2031);
    assert!(center.housekeeping(clock.wall()).is_err());
    assert_eq!(
        raw_update(
            &f.loc,
            "UPDATE marks SET value = 0 WHERE name = 'clock_alarm'",
            b""
        ),
        1
    );
    assert!(center.housekeeping(clock.wall()).is_err());
    assert!(
        fleet
            .iter()
            .all(|n| state(&center, n, 0) == KeyState::Active)
    );
}

/// Gap 4 (issue 12 review): the clock steps forward while the center
/// runs and the process is killed before its next housekeeping. The
/// restarted center (same machine, same boot: the same clock here) must
/// find the step instead of taking the stepped time as its reference.
fn a_forward_step_then_a_kill_is_found_at_restart(backend: Backend) {
    let (f, clock, center, fleet) = setup(backend, 3);
    clock.advance(60);
    center.housekeeping(clock.wall()).unwrap();
    clock.step(Y2031);
    // Killed before the next housekeeping.
    center.abandon();
    let restarted = f.center(&clock);
    let r = restarted.housekeeping(clock.wall());
    assert!(matches!(r, Err(Error::ClockUnconfirmed { .. })), "{r:?}");
    assert!(
        fleet
            .iter()
            .all(|n| state(&restarted, n, 0) == KeyState::Active),
        "seeds deactivated by a stepped clock"
    );
    assert!(restarted.clock_alarm().unwrap().is_some());
    // Time passes normally after the step: still an alarm, until confirmed.
    clock.advance(60);
    assert!(restarted.housekeeping(clock.wall()).is_err());
    restarted
        .confirm_clock_step("operator:ann", clock.wall())
        .unwrap();
    assert_eq!(restarted.housekeeping(clock.wall()).unwrap().deactivated, 3);
}

/// Gap 4: a raised alarm cannot be cleared from outside by deleting the
/// rows that hold it, nor by putting back their copies from before the
/// step; the center restarted on another boot (a new clock) must still
/// refuse housekeeping.
fn a_deleted_or_rolled_back_alarm_stays_raised(backend: Backend) {
    for attack in ["delete", "roll back"] {
        let (f, clock, center, fleet) = setup(backend, 2);
        clock.advance(60);
        center.housekeeping(clock.wall()).unwrap();
        let saved = snapshot_marks(&f.loc);
        clock.step(Y2031);
        assert!(center.housekeeping(clock.wall()).is_err());
        assert!(center.clock_alarm().unwrap().is_some());
        center.abandon();
        match attack {
            "delete" => {
                raw_update(&f.loc, "DELETE FROM marks WHERE name LIKE 'clock%'", b"");
            }
            _ => restore_marks(&f.loc, &saved),
        }
        let other = f.center(&ManualClock::new(Y2031));
        let r = other.housekeeping(Y2031);
        assert!(
            matches!(r, Err(Error::ClockUnconfirmed { .. })),
            "{attack}: {r:?}"
        );
        assert!(
            fleet
                .iter()
                .all(|n| state(&other, n, 0) == KeyState::Active),
            "{attack}: seeds deactivated"
        );
        assert!(other.clock_alarm().unwrap().is_some(), "{attack}");
    }
}

/// Every row of the marks table (name, value, tag), as an attacker would
/// save them.
fn snapshot_marks(loc: &str) -> Vec<(String, i64, Vec<u8>)> {
    if microcert_center::db::is_postgres_url(loc) {
        let db = loc.rsplit('/').next().unwrap();
        let out = pg_server().unwrap().psql(
            db,
            "SELECT name || '|' || value || '|' || encode(tag, 'hex') FROM marks",
        );
        out.lines()
            .filter(|l| l.contains('|'))
            .map(|l| {
                let mut p = l.trim().split('|');
                (
                    p.next().unwrap().to_string(),
                    p.next().unwrap().parse().unwrap(),
                    hex::decode(p.next().unwrap()).unwrap(),
                )
            })
            .collect()
    } else {
        let conn = rusqlite::Connection::open(loc).unwrap();
        let mut st = conn.prepare("SELECT name, value, tag FROM marks").unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }
}

/// Puts the clock's rows of the marks table back as they were saved
/// (those written since are deleted).
fn restore_marks(loc: &str, rows: &[(String, i64, Vec<u8>)]) {
    raw_update(loc, "DELETE FROM marks WHERE name LIKE 'clock%'", b"");
    for (name, value, tag) in rows.iter().filter(|r| r.0.starts_with("clock")) {
        raw_update(
            loc,
            &format!("INSERT INTO marks (name, value, tag) VALUES ('{name}', {value}, {{id}})"),
            tag,
        );
    }
}

both_backends!(
    forward_jump_deactivates_nothing_until_confirmed,
    forward_jump_ends_no_grace_period,
    backward_step_below_the_high_water_is_an_alarm,
    edited_marks_are_detected,
    a_forward_step_then_a_kill_is_found_at_restart,
    a_deleted_or_rolled_back_alarm_stays_raised,
);
