//! Issue 12, life-cycle gaps: the operator's events during an update's
//! grace period apply to both generations; one grace and expiry rule for
//! every message type; an update ENROLL under Kupd only while an
//! UPDATE_SEED is pending (PROTOCOL.md v1.1, section 6).

mod common;

use std::sync::Arc;

use common::*;
use microcert_center::{Center, CenterConfig, EncryptionCard, Error, SoftwareCard};
use microcert_core::{Audience, DeviceId, EnrollKey, Header, KeyState, Suite, make_enroll};

const C: Audience = Audience::CENTER;

struct Fx {
    _dir: tempfile::TempDir,
    card: Arc<SoftwareCard>,
    center: Center,
    fleet: Vec<TestNode>,
}

fn setup(backend: Backend, n: u64) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let loc = backend.location(dir.path(), "c.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = open_center(&loc, card.clone());
    let mut fleet = make_fleet(&*card, n);
    let batch = dir.path().join("b.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&C, NOW);
        center.verify_auth(&a, &C, NOW).unwrap();
    }
    Fx {
        _dir: dir,
        card,
        center,
        fleet,
    }
}

fn states(center: &Center, id: DeviceId) -> Vec<KeyState> {
    center
        .device(id)
        .unwrap()
        .unwrap()
        .seeds
        .iter()
        .map(|s| s.state)
        .collect()
}

/// Queues an update, lets the node answer it and the center accept the
/// ENROLL: generation g+1 PreActivation, g Active in its grace period.
/// Returns the RECEIPT (the node has not switched yet).
fn start_update(center: &Center, node: &mut TestNode, t: u64) -> Vec<u8> {
    center
        .queue_update(node.id, "operator:ann", "roll-out", t)
        .unwrap();
    let cmd = center.command(node.id).unwrap().unwrap();
    let Reply::Enroll(e) = node.handle_command(&cmd, t) else {
        panic!("UPDATE_SEED answered with an ENROLL")
    };
    center.enroll(&e, t).unwrap()
}

/// A node holding generation 0 of `node`'s device (the deterministic test
/// seed), with r values far from the original's.
fn old_node(card: &dyn EncryptionCard, node: &TestNode) -> TestNode {
    let mut n = TestNode::new(
        node.id,
        node.class,
        node.suite,
        card.transport_key(node.id, 0).unwrap(),
    );
    for _ in 0..10_000 {
        n.fresh_r();
    }
    n
}

fn audit_actions(center: &Center, id: DeviceId) -> Vec<(String, Option<u8>)> {
    center
        .audit_log(0, 100_000)
        .unwrap()
        .into_iter()
        .filter(|a| a.entry.device == Some(id))
        .map(|a| (a.entry.action, a.entry.generation))
        .collect()
}

fn suspend_resume_deactivate_during_grace(backend: Backend) {
    let Fx {
        card,
        center,
        mut fleet,
        ..
    } = setup(backend, 3);
    let t = NOW + 10;
    // Device 0: suspended and resumed during its grace period.
    let node = &mut fleet[0];
    let receipt = start_update(&center, node, t);
    assert_eq!(
        states(&center, node.id),
        [KeyState::Active, KeyState::PreActivation]
    );
    assert_eq!(
        center
            .suspend(node.id, "operator:ann", "lost", t + 1)
            .unwrap(),
        KeyState::Suspended
    );
    assert_eq!(
        states(&center, node.id),
        [KeyState::Suspended, KeyState::Suspended]
    );
    let actions = audit_actions(&center, node.id);
    assert!(
        actions.contains(&("suspend".into(), Some(0))),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("suspend".into(), Some(1))),
        "{actions:?}"
    );
    // Neither generation verifies while suspended.
    let (a, _) = node.auth(&C, t + 2);
    assert!(matches!(
        center.verify_auth(&a, &C, t + 2),
        Err(Error::Suspended)
    ));
    assert!(node.finish_update(&receipt));
    let (a, _) = node.auth(&C, t + 3);
    assert!(matches!(
        center.verify_auth(&a, &C, t + 3),
        Err(Error::Suspended)
    ));
    let sig = node.sign(b"data", t + 3);
    assert!(center.verify_signature(&sig, b"data", t + 3).is_err());
    // Resumed: the device works again under its new generation; the old
    // one is superseded.
    assert_eq!(
        center
            .resume(node.id, "operator:ann", "found", t + 4)
            .unwrap(),
        KeyState::Active
    );
    assert_eq!(
        states(&center, node.id),
        [KeyState::Deactivated, KeyState::Active]
    );
    let (a, _) = node.auth(&C, t + 5);
    center.verify_auth(&a, &C, t + 5).unwrap();
    let mut old = old_node(&*card, node);
    let (a, _) = old.auth(&C, t + 5);
    assert!(matches!(
        center.verify_auth(&a, &C, t + 5),
        Err(Error::NotActive)
    ));

    // Device 1: deactivated during its grace period.
    let node = &mut fleet[1];
    let receipt = start_update(&center, node, t);
    assert_eq!(
        center
            .deactivate(node.id, "operator:ann", "retired", t + 1)
            .unwrap(),
        KeyState::Deactivated
    );
    assert_eq!(
        states(&center, node.id),
        [KeyState::Deactivated, KeyState::Deactivated]
    );
    let actions = audit_actions(&center, node.id);
    assert!(
        actions.contains(&("deactivate".into(), Some(0))),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("deactivate".into(), Some(1))),
        "{actions:?}"
    );
    let (a, _) = node.auth(&C, t + 2);
    assert!(matches!(
        center.verify_auth(&a, &C, t + 2),
        Err(Error::NotActive)
    ));
    assert!(node.finish_update(&receipt));
    let (a, _) = node.auth(&C, t + 3);
    assert!(matches!(
        center.verify_auth(&a, &C, t + 3),
        Err(Error::NotActive)
    ));
    // Nothing left to deactivate.
    assert!(matches!(
        center.deactivate(node.id, "operator:ann", "again", t + 4),
        Err(Error::IllegalTransition { .. })
    ));

    // Device 2: revoked during its grace period.
    let node = &mut fleet[2];
    let receipt = start_update(&center, node, t);
    center
        .revoke(node.id, "operator:ann", "stolen", t + 1)
        .unwrap();
    assert_eq!(
        states(&center, node.id),
        [KeyState::Compromised, KeyState::Compromised]
    );
    let (a, _) = node.auth(&C, t + 2);
    assert!(matches!(
        center.verify_auth(&a, &C, t + 2),
        Err(Error::Revoked)
    ));
    assert!(node.finish_update(&receipt));
    let (a, _) = node.auth(&C, t + 3);
    assert!(matches!(
        center.verify_auth(&a, &C, t + 3),
        Err(Error::Revoked)
    ));
}

/// 2027-01-01T00:00:00Z and 2031-01-01T00:00:00Z.
const JAN1_2027: u64 = 1_798_761_600;
const JAN1_2031: u64 = 1_924_992_000;

/// What each message type answers in one situation.
#[derive(Debug)]
struct Answers {
    auth: Result<(), String>,
    auth_response: Result<(), String>,
    signature: Result<(), String>,
    sealed: Result<(), String>,
}

fn kind<T>(r: microcert_center::Result<T>) -> Result<(), String> {
    r.map(|_| ()).map_err(|e| e.kind().to_string())
}

/// One fresh message of each type from `node` at `now` (t = now).
fn try_all(center: &Center, node: &mut TestNode, now: u64) -> Answers {
    try_all_at(center, node, now, now)
}

/// One fresh message of each type with time `t` from `node`, received at
/// `now` (the node's core refuses to make a message whose t its seed does
/// not cover, so an expired seed is tried just across the year's end).
fn try_all_at(center: &Center, node: &mut TestNode, t: u64, now: u64) -> Answers {
    let rp = Audience::relying_party(RP);
    let (a, _) = node.auth(&C, t);
    let auth = kind(center.verify_auth(&a, &C, now));
    let ch = center.issue_challenge(node.id, now).unwrap();
    let (ar, _) = node.auth_response(&ch, t);
    let auth_response = kind(center.verify_auth_response(&ar, &C, now));
    let data = format!("reading at {now}");
    let sig = node.sign(data.as_bytes(), t);
    let signature = kind(center.verify_signature(&sig, data.as_bytes(), now));
    let s = node.seal(&rp, b"secret reading", t);
    let sealed = kind(center.open_sealed(&s, &rp, now));
    Answers {
        auth,
        auth_response,
        signature,
        sealed,
    }
}

fn assert_all(what: &str, got: &Answers, expected: Result<(), &str>) {
    let expected = expected.map_err(str::to_string);
    for (ty, r) in [
        ("AUTH", &got.auth),
        ("AUTH_RESPONSE", &got.auth_response),
        ("SIGNATURE", &got.signature),
        ("SEALED", &got.sealed),
    ] {
        assert_eq!(r, &expected, "{what}: {ty} ({got:?})");
    }
}

/// PROTOCOL.md v1.1: "The same grace and expiry rules apply to every
/// message type". One table, every message type against each row.
#[test]
fn one_grace_and_expiry_rule_for_every_message_type() {
    let Fx {
        _dir,
        card,
        center,
        mut fleet,
    } = setup(Backend::Sqlite, 4);
    let grace = CenterConfig::default().grace_period;
    let t = NOW + 100;

    // 1. The current generation, Active.
    let got = try_all(&center, &mut fleet[0], t);
    assert_all("current generation active", &got, Ok(()));

    // 2. The previous generation during its grace period.
    start_update(&center, &mut fleet[1], t);
    let got = try_all(&center, &mut fleet[1], t + 60);
    assert_all("previous generation in grace", &got, Ok(()));

    // 3. The same, after the grace period ended (housekeeping not run yet).
    let after = t + grace + 60;
    let got = try_all(&center, &mut fleet[1], after);
    assert_all(
        "previous generation after grace end",
        &got,
        Err("not-active"),
    );

    // 4. Grace ended early by the first use of the new generation.
    let receipt = start_update(&center, &mut fleet[2], t);
    let mut old = old_node(&*card, &fleet[2]);
    assert!(fleet[2].finish_update(&receipt));
    let (a, _) = fleet[2].auth(&C, t + 30);
    center.verify_auth(&a, &C, t + 30).unwrap();
    let got = try_all(&center, &mut old, t + 60);
    assert_all("grace ended by first use", &got, Err("not-active"));

    // 5. The seed expired: base year 2026 serves 2026..=2030 (housekeeping
    //    not run yet).
    let got = try_all_at(&center, &mut fleet[0], JAN1_2031 - 60, JAN1_2031 + 60);
    assert_all("seed expired", &got, Err("expired"));

    // 6. Not yet valid: a seed of base year 2027 on a center whose date is
    //    back in 2026.
    let id = DeviceId::from_u64(0x0900_0000_0000_0001);
    let ktr = center
        .provision(&[id], 1, Some(Suite::CMAC64), 0, "factory", NOW)
        .unwrap()
        .remove(0);
    let mut node = TestNode::new(id, 1, Suite::CMAC64, ktr);
    node.seed = Some(test_seed(id, 0, 2027));
    let y2027 = JAN1_2027 + 3600;
    let e = node.enroll_transport(y2027);
    center.enroll(&e, y2027).unwrap();
    let (a, _) = node.auth(&C, y2027);
    center.verify_auth(&a, &C, y2027).unwrap();
    let got = try_all_at(&center, &mut node, JAN1_2027 + 60, JAN1_2027 - 60);
    assert_all("seed not yet valid", &got, Err("not-active"));
    // The same seed is fine in its own years.
    let got = try_all(&center, &mut node, y2027 + 600);
    assert_all("seed in its years", &got, Ok(()));
}

/// A signature recorded while its seed was usable stays valid after the
/// grace period ended (the notary), an unrecorded one does not.
#[test]
fn recorded_signatures_outlive_the_grace_period() {
    let Fx {
        _dir,
        center,
        mut fleet,
        ..
    } = setup(Backend::Sqlite, 1);
    let grace = CenterConfig::default().grace_period;
    let t = NOW + 100;
    start_update(&center, &mut fleet[0], t);
    let sig = fleet[0].sign(b"meter 1", t + 10);
    center.verify_signature(&sig, b"meter 1", t + 10).unwrap();
    let after = t + grace + 60;
    center.verify_signature(&sig, b"meter 1", after).unwrap();
    let unrecorded = fleet[0].sign(b"meter 2", t + 20);
    assert!(matches!(
        center.verify_signature(&unrecorded, b"meter 2", after),
        Err(Error::NotActive)
    ));
}

/// The thief's attack: with a stolen current seed, an ENROLL under Kupd
/// the center did not ask for. Refused; nothing changes.
fn update_enroll_without_pending_update_seed_is_refused(backend: Backend) {
    let Fx {
        _dir,
        card,
        center,
        fleet,
    } = setup(backend, 1);
    let id = fleet[0].id;
    let mut thief = old_node(&*card, &fleet[0]);
    let before = center.device(id).unwrap().unwrap();
    let audit_before = center.audit_log(0, 100_000).unwrap().len();
    let t = NOW + 100;
    let mine = test_seed(DeviceId::from_u64(0x7417), 1, 2026);
    let h = Header {
        suite: thief.suite,
        device: id,
        generation: 1,
        t: t as u32,
        r: thief.fresh_r(),
    };
    let mut e = vec![0u8; 1100];
    let n = make_enroll(
        EnrollKey::Update(thief.seed.as_ref().unwrap()),
        &mine,
        &h,
        &mut e,
    )
    .unwrap();
    e.truncate(n);
    assert!(
        center.enroll(&e, t).is_err(),
        "an unrequested update ENROLL"
    );
    let after = center.device(id).unwrap().unwrap();
    assert_eq!(after.device, before.device, "device row unchanged");
    assert_eq!(after.seeds.len(), 1, "no new generation");
    assert_eq!(after.seeds[0].state, KeyState::Active);
    assert_eq!(after.seeds[0].grace_until, None, "no grace period started");
    assert_eq!(
        center.audit_log(0, 100_000).unwrap().len(),
        audit_before,
        "no audit entry"
    );
    // The real device keeps working.
    let mut node = old_node(&*card, &fleet[0]);
    for _ in 0..10_000 {
        node.fresh_r();
    }
    let (a, _) = node.auth(&C, t + 1);
    center.verify_auth(&a, &C, t + 1).unwrap();
}

/// An update the center asked for is accepted once; the identical bytes
/// sent again get the same RECEIPT after the command was answered, and a
/// second, different update ENROLL is refused.
fn update_enroll_retransmission_after_the_command_was_answered(backend: Backend) {
    let Fx {
        _dir,
        card,
        center,
        mut fleet,
    } = setup(backend, 1);
    let node = &mut fleet[0];
    let t = NOW + 100;
    center
        .queue_update(node.id, "operator:ann", "roll-out", t)
        .unwrap();
    let cmd = center.command(node.id).unwrap().unwrap();
    let Reply::Enroll(e) = node.handle_command(&cmd, t) else {
        panic!()
    };
    let r1 = center.enroll(&e, t).unwrap();
    assert_eq!(center.command(node.id).unwrap(), None, "command answered");
    let r2 = center.enroll(&e, t + 30).unwrap();
    assert_eq!(r1, r2);
    // A thief with generation 0 tries another ENROLL for generation 2 now
    // that no UPDATE_SEED is pending.
    let mut thief = old_node(&*card, node);
    let h = Header {
        suite: thief.suite,
        device: node.id,
        generation: 2,
        t: (t + 40) as u32,
        r: thief.fresh_r(),
    };
    let mine = test_seed(DeviceId::from_u64(0x7417), 2, 2026);
    let mut e2 = vec![0u8; 1100];
    let n = make_enroll(
        EnrollKey::Update(thief.seed.as_ref().unwrap()),
        &mine,
        &h,
        &mut e2,
    )
    .unwrap();
    e2.truncate(n);
    assert!(center.enroll(&e2, t + 40).is_err());
    assert_eq!(center.device(node.id).unwrap().unwrap().seeds.len(), 2);
    assert!(node.finish_update(&r2));
}

both_backends!(
    suspend_resume_deactivate_during_grace,
    update_enroll_without_pending_update_seed_is_refused,
    update_enroll_retransmission_after_the_command_was_answered,
);
