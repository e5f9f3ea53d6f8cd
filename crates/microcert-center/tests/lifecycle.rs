//! Life-cycle rules of PROTOCOL.md section 6 one by one: updates due,
//! grace periods, re-enrollment and epochs, destroy, compromise and the
//! notary, commands, corrupt batch entries, tampering, threads.

mod common;

use std::sync::Arc;

use common::*;
use microcert_center::{Center, CenterConfig, EncryptionCard, Error, SoftwareCard};
use microcert_core::{Audience, DeviceId, Event, KeyState, Suite};

const C: Audience = Audience::CENTER;

fn setup(backend: Backend, n: u64) -> (Fixture, Arc<SoftwareCard>, Center, Vec<TestNode>) {
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
    (Fixture { _dir: dir, loc }, card, center, fleet)
}

/// The test directory and the database location.
struct Fixture {
    _dir: tempfile::TempDir,
    loc: String,
}

fn state(center: &Center, id: DeviceId, g: usize) -> KeyState {
    center.device(id).unwrap().unwrap().seeds[g].state
}

fn update_due_in_the_last_year_only(backend: Backend) {
    let (_d, _card, center, fleet) = setup(backend, 12);
    // Seeds of base year 2026 serve 2026..=2030: due in 2030, not before.
    let y2029 = 1_861_920_000 + 86_400 * 100; // 2029-04-11
    assert_eq!(center.update_due("operator:ann", y2029).unwrap(), 0);
    let y2030 = 1_893_456_000 + 86_400 * 10; // 2030-01-11
    assert_eq!(center.update_due("operator:ann", y2030).unwrap(), 12);
    // Pending commands are not queued twice.
    assert_eq!(center.update_due("operator:ann", y2030 + 60).unwrap(), 0);
    // Never updated, the seeds expire with 2030.
    let y2031 = 1_924_992_000 + 60;
    assert_eq!(center.housekeeping(y2031).unwrap().deactivated, 12);
    assert_eq!(state(&center, fleet[0].id, 0), KeyState::Deactivated);
    assert_eq!(center.housekeeping(y2031 + 60).unwrap().deactivated, 0);
}

fn grace_period_ends_in_deactivation(backend: Backend) {
    let (_d, _card, center, mut fleet) = setup(backend, 2);
    let node = &mut fleet[0];
    let t = NOW + 10;
    center
        .queue_update(node.id, "operator:ann", "roll-out", t)
        .unwrap();
    let cmd = center.command(node.id).unwrap().unwrap();
    let Reply::Enroll(e) = node.handle_command(&cmd, t) else {
        panic!()
    };
    center.enroll(&e, t).unwrap();
    // The node has not switched: generation 0 verifies within the grace.
    let (a, _) = node.auth(&C, t + 60);
    center.verify_auth(&a, &C, t + 60).unwrap();
    let grace = CenterConfig::default().grace_period;
    let after = t + grace + 1;
    let report = center.housekeeping(after).unwrap();
    assert_eq!(report.deactivated, 1);
    assert_eq!(state(&center, node.id, 0), KeyState::Deactivated);
    assert_eq!(state(&center, node.id, 1), KeyState::PreActivation);
    let (a, _) = node.auth(&C, after);
    assert!(matches!(
        center.verify_auth(&a, &C, after),
        Err(Error::NotActive)
    ));
}

fn revoke_supersedes_update_and_counters_rise(backend: Backend) {
    let (_d, _card, center, mut fleet) = setup(backend, 1);
    let node = &mut fleet[0];
    let t = NOW + 10;
    center
        .queue_update(node.id, "operator:ann", "roll-out", t)
        .unwrap();
    let update = center.command(node.id).unwrap().unwrap();
    // Queuing again leaves the pending command unchanged.
    center
        .queue_update(node.id, "operator:ann", "again", t + 1)
        .unwrap();
    assert_eq!(center.command(node.id).unwrap().unwrap(), update);
    center
        .revoke(node.id, "operator:ann", "stolen", t + 2)
        .unwrap();
    let revoke = center.command(node.id).unwrap().unwrap();
    assert_ne!(revoke, update);
    let cu = microcert_core::Command::decode(&update).unwrap();
    let cr = microcert_core::Command::decode(&revoke).unwrap();
    assert_eq!(cr.opcode, microcert_core::Opcode::REVOKE);
    assert_eq!(cu.counter, (t) as u32, "counter = max(prev + 1, now)");
    assert_eq!(cr.counter, (t + 2) as u32);
    // An update cannot replace a pending REVOKE (and the seed is revoked).
    assert!(
        center
            .queue_update(node.id, "operator:ann", "x", t + 3)
            .is_err()
    );
    // A RECEIPT that answers nothing is refused, opaquely.
    let Reply::Receipt(mut receipt) = node.handle_command(&revoke, t + 3) else {
        panic!()
    };
    let last = receipt.len() - 1;
    receipt[last] ^= 1;
    assert!(matches!(
        center.accept_receipt(&receipt, t + 4),
        Err(Error::Verification)
    ));
    // Revoking twice is an illegal transition.
    assert!(matches!(
        center.revoke(node.id, "operator:ann", "again", t + 5),
        Err(Error::IllegalTransition { .. })
    ));
}

fn re_enrollment_after_expiry_and_after_revocation(backend: Backend) {
    let (_d, card, center, fleet) = setup(backend, 2);
    // Expired: base year 2026 ends with 2030; in 2031 the operator reopens
    // with the same epoch and the node enrolls generation 1 under Ktr.
    let id = fleet[0].id;
    let y2031 = 1_924_992_000 + 86_400; // 2031-01-02
    assert!(
        center
            .reopen_transport(id, None, "operator:ann", "too early", NOW)
            .is_err()
    );
    assert_eq!(
        center
            .reopen_transport(id, None, "operator:ann", "expired", y2031)
            .unwrap(),
        0
    );
    assert_eq!(state(&center, id, 0), KeyState::Deactivated);
    let mut node = TestNode::new(id, 1, Suite::CMAC64, card.transport_key(id, 0).unwrap());
    node.generation = 1;
    node.seed = Some(test_seed(id, 1, 2031));
    let e = node.enroll_transport(y2031);
    let receipt = center.enroll(&e, y2031).unwrap();
    assert!(node.check_receipt(
        &receipt,
        microcert_core::Enroll::decode(&e).unwrap().header.r
    ));
    // Transport enrollment closed again.
    node.generation = 2;
    node.seed = Some(test_seed(id, 2, 2031));
    assert!(center.enroll(&node.enroll_transport(y2031), y2031).is_err());

    // Revoked: only the next epoch reopens, with the re-personalized Ktr.
    let id = fleet[1].id;
    center
        .revoke(id, "operator:ann", "stolen", NOW + 5)
        .unwrap();
    assert!(
        center
            .reopen_transport(id, None, "operator:ann", "x", NOW + 6)
            .is_err()
    );
    assert!(
        center
            .reopen_transport(id, Some(2), "operator:ann", "x", NOW + 6)
            .is_err()
    );
    assert_eq!(
        center
            .reopen_transport(id, Some(1), "operator:ann", "new chip", NOW + 6)
            .unwrap(),
        1
    );
    let mut old_ktr = TestNode::new(id, 1, Suite::CMAC64, card.transport_key(id, 0).unwrap());
    old_ktr.generation = 1;
    old_ktr.seed = Some(test_seed(id, 1, 2026));
    assert!(matches!(
        center.enroll(&old_ktr.enroll_transport(NOW + 7), NOW + 7),
        Err(Error::Verification)
    ));
    let mut fresh = TestNode::new(id, 1, Suite::CMAC64, card.transport_key(id, 1).unwrap());
    fresh.generation = 1;
    fresh.seed = Some(test_seed(id, 1, 2026));
    center
        .enroll(&fresh.enroll_transport(NOW + 8), NOW + 8)
        .unwrap();
    let (a, r) = fresh.auth(&C, NOW + 9);
    assert!(fresh.check_receipt(&center.verify_auth(&a, &C, NOW + 9).unwrap().receipt, r));
}

fn epoch_255_is_final(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = open_center(&backend.location(dir.path(), "c.db"), card.clone());
    let id = DeviceId::from_u64(0x7777);
    center
        .register_device(id, 1, None, 255, "factory", NOW)
        .unwrap();
    let mut node = TestNode::new(id, 1, Suite::CMAC64, card.transport_key(id, 255).unwrap());
    center.enroll(&node.enroll_transport(NOW), NOW).unwrap();
    center
        .revoke(id, "operator:ann", "stolen", NOW + 1)
        .unwrap();
    let e = center
        .reopen_transport(id, Some(0), "operator:ann", "x", NOW + 2)
        .unwrap_err();
    assert!(e.to_string().contains("255"), "{e}");
}

fn destroy_and_the_notary(backend: Backend) {
    let (_d, _card, center, mut fleet) = setup(backend, 3);
    let node = &mut fleet[0];
    let t = NOW + 100;
    let sig = node.sign(b"meter 1", t);
    center.verify_signature(&sig, b"meter 1", t).unwrap();
    let unseen = node.sign(b"meter 2", t);
    // Destroy is only for Deactivated or Compromised seeds.
    assert!(matches!(
        center.destroy(node.id, 0, "operator:ann", "x", t),
        Err(Error::IllegalTransition {
            from: KeyState::Active,
            event: Event::Destroy
        })
    ));
    center
        .revoke(node.id, "operator:ann", "compromised", t + 10)
        .unwrap();
    // Notarised before the compromise: valid. Never seen: refused.
    assert_eq!(
        center
            .verify_signature(&sig, b"meter 1", t + 20)
            .unwrap()
            .first_seen,
        t
    );
    assert!(matches!(
        center.verify_signature(&unseen, b"meter 2", t + 20),
        Err(Error::Revoked)
    ));
    // Same signature with other data: not the recorded one.
    assert!(center.verify_signature(&sig, b"meter X", t + 20).is_err());
    center
        .destroy(node.id, 0, "operator:ann", "end of life", t + 30)
        .unwrap();
    assert_eq!(
        center
            .verify_signature(&sig, b"meter 1", t + 40)
            .unwrap()
            .first_seen,
        t
    );
    let v = center.device(node.id).unwrap().unwrap();
    assert_eq!(v.seeds[0].destroyed_at, Some(t + 30));
    assert_eq!(v.seeds[0].compromised_at, Some(t + 10));
    // A suspended seed's update ENROLL (Kupd) is refused.
    let n1 = &mut fleet[1];
    center.suspend(n1.id, "operator:ann", "check", t).unwrap();
    // Operator activation and deactivation go through the same table.
    assert!(matches!(
        center.activate(n1.id, "operator:ann", "x", t),
        Err(Error::IllegalTransition { .. })
    ));
    center.resume(n1.id, "operator:ann", "ok", t).unwrap();
    assert_eq!(
        center
            .deactivate(n1.id, "operator:ann", "retired", t)
            .unwrap(),
        KeyState::Deactivated
    );
    let (a, _) = n1.auth(&C, t);
    assert!(matches!(
        center.verify_auth(&a, &C, t),
        Err(Error::NotActive)
    ));
}

fn corrupt_batch_entries_are_reported_and_not_stored(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = open_center(&backend.location(dir.path(), "c.db"), card.clone());
    let mut fleet = make_fleet(&*card, 7);
    let mut text = Vec::new();
    for (i, node) in fleet.iter_mut().enumerate() {
        let mut line = batch_line(node, NOW);
        match i {
            1 => line = "{not json\n".into(),
            2 => {
                // A flipped ciphertext byte: the ENROLL does not open.
                let at = line.find("\"enroll\":\"").unwrap() + 10 + 100;
                let c = if &line[at..at + 1] == "0" { "1" } else { "0" };
                line.replace_range(at..at + 1, c);
            }
            3 => line = line.replace("\"epoch\":0", "\"epoch\":1"), // wrong Ktr
            4 => line = line.replace("\"class\":1", "\"class\":9"),
            _ => {}
        }
        if i == 6 {
            // A line that is not UTF-8, then a last line without its newline.
            text.extend_from_slice(b"\xff\xfe\n");
            text.extend_from_slice(line.trim_end().as_bytes());
            break;
        }
        text.extend_from_slice(line.as_bytes());
        if i == 0 {
            text.push(b'\n'); // a blank line is skipped but counted
        }
    }
    let path = dir.path().join("b.jsonl");
    std::fs::write(&path, text).unwrap();
    let report = center
        .import_batch(&path, "factory", NOW, &mut |_| {})
        .unwrap();
    assert_eq!(report.enrolled, 3);
    assert_eq!(report.lines, 9);
    let lines: Vec<_> = report.rejected.iter().map(|r| (r.line, r.kind)).collect();
    assert_eq!(
        lines,
        vec![
            (3, "malformed"),
            (4, "verification-failed"),
            (5, "verification-failed"),
            (6, "no-profile"),
            (8, "malformed"),
        ]
    );
    for node in &fleet[1..5] {
        assert!(
            center.device(node.id).unwrap().is_none(),
            "nothing of a rejected entry is stored"
        );
    }
    assert!(center.device(fleet[5].id).unwrap().is_some());
    assert!(
        center.device(fleet[6].id).unwrap().is_some(),
        "the last line without newline"
    );
    assert!(center.integrity_scan().unwrap().is_clean());
}

fn enroll_reuse_of_t_and_r_with_other_bytes_is_a_replay(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = open_center(&backend.location(dir.path(), "c.db"), card.clone());
    let id = DeviceId::from_u64(0x4242);
    center
        .register_device(id, 1, None, 0, "factory", NOW)
        .unwrap();
    let ktr = card.transport_key(id, 0).unwrap();
    let seed = test_seed(id, 0, 2026);
    let h = microcert_core::Header {
        suite: Suite::CMAC64,
        device: id,
        generation: 0,
        t: NOW as u32,
        r: 99,
    };
    let mut a = vec![0u8; 1100];
    let n = microcert_core::make_enroll(
        microcert_core::EnrollKey::Transport(&ktr),
        &seed,
        &h,
        &mut a,
    )
    .unwrap();
    a.truncate(n);
    center.enroll(&a, NOW).unwrap();
    let other = test_seed(id, 5, 2026);
    let mut b = vec![0u8; 1100];
    let n = microcert_core::make_enroll(
        microcert_core::EnrollKey::Transport(&ktr),
        &other,
        &h,
        &mut b,
    )
    .unwrap();
    b.truncate(n);
    assert!(matches!(center.enroll(&b, NOW), Err(Error::Replay)));
    // Unregistered device.
    let h2 = microcert_core::Header {
        device: DeviceId::from_u64(1),
        ..h
    };
    let n = microcert_core::make_enroll(
        microcert_core::EnrollKey::Transport(&ktr),
        &seed,
        &h2,
        &mut b,
    )
    .unwrap();
    assert!(matches!(
        center.enroll(&b[..n], NOW),
        Err(Error::UnknownDevice)
    ));
}

fn tampered_record_is_refused_and_named(backend: Backend) {
    let (dir, card, center, mut fleet) = setup(backend, 4);
    let victim = fleet[2].id;
    let ktr3 = card.transport_key(fleet[3].id, 0).unwrap();
    drop(center);
    // An edit from outside the center: a revoked-looking device made
    // suspended would be resumable; here any state edit must be seen.
    let n = raw_update(
        &dir.loc,
        "UPDATE seeds SET state = 'suspended' WHERE device = {id}",
        &victim.0,
    );
    assert_eq!(n, 1);
    let center = open_center(&dir.loc, card);
    let (a, _) = fleet[2].auth(&C, NOW + 1);
    let e = center.verify_auth(&a, &C, NOW + 1).unwrap_err();
    assert!(matches!(e, Error::Integrity(_)), "{e:?}");
    assert!(matches!(
        center.resume(victim, "operator:ann", "x", NOW + 1),
        Err(Error::Integrity(_))
    ));
    let report = center.integrity_scan().unwrap();
    assert_eq!(report.bad_records, vec![(victim, 0)]);
    // The rest of the fleet keeps working.
    let (a, _) = fleet[1].auth(&C, NOW + 1);
    center.verify_auth(&a, &C, NOW + 1).unwrap();

    // A device row edited to reopen transport enrollment: someone holding
    // the (factory-known) Ktr must not get a new seed in.
    let other = fleet[3].id;
    let n = raw_update(
        &dir.loc,
        "UPDATE devices SET transport_open = TRUE WHERE id = {id}",
        &other.0,
    );
    assert_eq!(n, 1);
    center.clear_cache();
    let mut intruder = TestNode::new(other, 1, Suite::CMAC64, ktr3);
    intruder.generation = 1;
    intruder.seed = Some(test_seed(other, 9, 2026));
    let e = center
        .enroll(&intruder.enroll_transport(NOW + 2), NOW + 2)
        .unwrap_err();
    assert!(matches!(e, Error::Integrity(_)), "{e:?}");
}

fn many_threads_one_acceptance(backend: Backend) {
    let (_d, _card, center, mut fleet) = setup(backend, 8);
    let center = Arc::new(center);
    let t = NOW + 50;
    let auths: Vec<Vec<u8>> = fleet.iter_mut().map(|n| n.auth(&C, t).0).collect();
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for a in &auths {
                    match center.verify_auth(a, &C, t) {
                        Ok(_) => {
                            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(Error::Replay) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
            });
        }
    });
    assert_eq!(
        accepted.into_inner(),
        auths.len(),
        "each AUTH accepted exactly once"
    );
}

fn revocation_is_seen_at_once_by_other_threads(backend: Backend) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (_d, _card, center, mut fleet) = setup(backend, 1);
    let node = &mut fleet[0];
    let t = NOW + 10;
    // Many fresh AUTHs of one device, made up front.
    let auths: Vec<Vec<u8>> = (0..400).map(|_| node.auth(&C, t).0).collect();
    let id = node.id;
    let revoked = AtomicBool::new(false);
    let late_accepts = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for part in auths.chunks(100) {
            let (center, revoked, late) = (&center, &revoked, &late_accepts);
            s.spawn(move || {
                for a in part {
                    let after = revoked.load(Ordering::SeqCst);
                    let r = center.verify_auth(a, &C, t);
                    if after && r.is_ok() {
                        late.fetch_add(1, Ordering::SeqCst);
                    }
                    if after {
                        assert!(matches!(r, Err(Error::Revoked)), "{r:?}");
                    }
                }
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        center.revoke(id, "operator:ann", "stolen", t).unwrap();
        revoked.store(true, Ordering::SeqCst);
    });
    assert_eq!(late_accepts.into_inner(), 0);
}

fn factory_provisioning_then_online_enrollment(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = open_center(&backend.location(dir.path(), "c.db"), card.clone());
    let ids: Vec<DeviceId> = (0..3).map(|i| DeviceId::from_u64(0x0900 + i)).collect();
    let keys = center.provision(&ids, 3, None, 0, "factory", NOW).unwrap();
    assert_eq!(keys.len(), 3);
    // Provisioning an id twice is refused, and nothing of that batch stays.
    let more = [DeviceId::from_u64(0x0a00), ids[1]];
    assert!(matches!(
        center.provision(&more, 3, None, 0, "factory", NOW),
        Err(Error::AlreadyRegistered { device }) if device == ids[1]
    ));
    assert!(center.device(more[0]).unwrap().is_none());
    // Class 1 does not allow suite 0x02.
    assert!(matches!(
        center.provision(
            &[DeviceId::from_u64(0x0b00)],
            1,
            Some(Suite::CMAC128),
            0,
            "factory",
            NOW
        ),
        Err(Error::WrongSuite)
    ));
    for (id, ktr) in ids.iter().zip(keys) {
        let v = center.device(*id).unwrap().unwrap();
        assert_eq!(
            (v.device.class, v.device.suite, v.device.transport_open),
            (3, Suite::CMAC128, true)
        );
        let mut node = TestNode::new(*id, 3, Suite::CMAC128, ktr);
        let e = node.enroll_transport(NOW);
        let r = center.enroll(&e, NOW).unwrap();
        let enroll_r = microcert_core::Enroll::decode(&e).unwrap().header.r;
        assert!(node.check_receipt(&r, enroll_r));
        assert!(!center.device(*id).unwrap().unwrap().device.transport_open);
    }
}

both_backends!(
    update_due_in_the_last_year_only,
    grace_period_ends_in_deactivation,
    revoke_supersedes_update_and_counters_rise,
    re_enrollment_after_expiry_and_after_revocation,
    epoch_255_is_final,
    destroy_and_the_notary,
    corrupt_batch_entries_are_reported_and_not_stored,
    enroll_reuse_of_t_and_r_with_other_bytes_is_a_replay,
    tampered_record_is_refused_and_named,
    many_threads_one_acceptance,
    revocation_is_seen_at_once_by_other_threads,
    factory_provisioning_then_online_enrollment,
);
