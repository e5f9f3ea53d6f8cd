//! Issue 12, attacks 1 and 4 as a library user would mount them (only the
//! center's public API of before the fix, so they ran unchanged against
//! the old code, where they failed):
//!
//! - a replay after a crash, a restart and a clean stop (memory mode);
//! - a replay across two centers on one database whose clocks differ by
//!   20 s, inside the allowed instance skew, after the fast one prunes
//!   (SQLite and PostgreSQL);
//! - a replay at a center whose clock stepped backwards after another
//!   center pruned.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use microcert_center::{Center, CenterConfig, Error, ReplayMode, SoftwareCard};
use microcert_core::Audience;

const C: Audience = Audience::CENTER;

fn open_memory(dir: &Path, card: Arc<SoftwareCard>) -> Center {
    Center::open_sqlite(&dir.join("c.db"), card, CenterConfig::default()).unwrap()
}

fn import(center: &Center, dir: &Path, card: &SoftwareCard, n: u64) -> Vec<TestNode> {
    let mut fleet = make_fleet(card, n);
    let batch = dir.join("b.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    fleet
}

#[test]
fn replay_after_crash_restart_and_clean_stop_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let t = NOW + 10;
    let accepted = {
        let center = open_memory(dir.path(), card.clone());
        let mut fleet = import(&center, dir.path(), &card, 1);
        let (a, _) = fleet[0].auth(&C, t);
        center.verify_auth(&a, &C, t).unwrap();
        // SIGKILL.
        center.abandon();
        a
    };
    {
        // Restarted: refused by the floor of the unclean stop...
        let center = open_memory(dir.path(), card.clone());
        assert!(matches!(
            center.verify_auth(&accepted, &C, t + 1),
            Err(Error::Replay)
        ));
        // ...then a clean stop (SIGTERM).
    }
    // Started again: the floor must have survived the clean stop.
    let center = open_memory(dir.path(), card.clone());
    let r = center.verify_auth(&accepted, &C, t + 2);
    assert!(
        matches!(r, Err(Error::Replay)),
        "the same AUTH accepted twice: {r:?}"
    );
    // And again after one more clean restart.
    drop(center);
    let center = open_memory(dir.path(), card);
    assert!(matches!(
        center.verify_auth(&accepted, &C, t + 3),
        Err(Error::Replay)
    ));
}

/// Two centers on one database in replay mode "database".
fn two_centers(backend: Backend) -> (tempfile::TempDir, Center, Center, Vec<TestNode>) {
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
    let fleet = import(&a, dir.path(), &card, 2);
    (dir, a, b, fleet)
}

/// Center `fast` runs 20 s ahead of `slow` (instance skew: 30 s). An AUTH
/// accepted at the slow center near the end of its window stays refused
/// there after the fast center prunes by its own clock.
fn fast_center_pruning_reopens_no_replay(backend: Backend) {
    let (_dir, fast, slow, mut fleet) = two_centers(backend);
    let ahead = 20;
    let t = NOW + 100;
    let (a, _) = fleet[0].auth(&C, t);
    slow.verify_auth(&a, &C, t).unwrap();
    // The slow center's clock: t + 290, still inside the 300 s skew.
    let slow_now = t + 290;
    let fast_now = slow_now + ahead;
    fast.housekeeping(fast_now).unwrap();
    let r = slow.verify_auth(&a, &C, slow_now);
    assert!(
        matches!(r, Err(Error::Replay)),
        "replayed AUTH after the fast center pruned: {r:?}"
    );
    // And at the fast center too.
    assert!(matches!(
        fast.verify_auth(&a, &C, slow_now),
        Err(Error::Replay)
    ));
    // The record goes once no center can find the message fresh.
    let (b, _) = fleet[1].auth(&C, fast_now);
    fast.verify_auth(&b, &C, fast_now).unwrap();
}

/// A center whose clock stepped back by 10 minutes after another center
/// pruned: a message whose record was pruned is fresh by its clock again,
/// and must still be refused.
fn clock_stepped_back_reopens_no_replay(backend: Backend) {
    let (_dir, a_center, b_center, mut fleet) = two_centers(backend);
    let t = NOW + 100;
    let (a, _) = fleet[0].auth(&C, t);
    a_center.verify_auth(&a, &C, t).unwrap();
    // Ten minutes on: the record has expired and is pruned.
    let later = t + 600;
    assert!(a_center.housekeeping(later).unwrap().pruned >= 1);
    // B's clock is stepped back to t + 5: the AUTH looks fresh.
    let r = b_center.verify_auth(&a, &C, t + 5);
    assert!(
        matches!(r, Err(Error::Replay)),
        "replay accepted at a center whose clock stepped back: {r:?}"
    );
    // A message never seen with the same old t is refused too (it may be
    // a pruned one), but one fresh by the pruning center's clock is not.
    let (b, _) = fleet[1].auth(&C, later);
    b_center.verify_auth(&b, &C, later).unwrap();
}

/// A spent challenge outlives its validity at every center: the fast
/// center prunes by its clock, the slow one still refuses the same
/// AUTH_RESPONSE while the challenge's MAC is valid by its own clock.
fn fast_center_pruning_respends_no_challenge(backend: Backend) {
    let (_dir, fast, slow, mut fleet) = two_centers(backend);
    let ahead = 20;
    // At the start of a minute: the challenge is valid for 119 s more.
    let issued = (NOW + 600) / 60 * 60;
    let ch = slow.issue_challenge(fleet[0].id, issued).unwrap();
    let (m, _) = fleet[0].auth_response(&ch, issued);
    slow.verify_auth_response(&m, &C, issued).unwrap();
    let slow_now = issued + 119;
    fast.housekeeping(slow_now + ahead).unwrap();
    let r = slow.verify_auth_response(&m, &C, slow_now);
    assert!(
        matches!(r, Err(Error::Replay)),
        "challenge spent twice: {r:?}"
    );
}

both_backends!(
    fast_center_pruning_reopens_no_replay,
    clock_stepped_back_reopens_no_replay,
    fast_center_pruning_respends_no_challenge,
);
