//! A fleet of 1,000 nodes through a whole life: batch enrollment, mutual
//! authentication, signatures, sealed data, seed updates, revocation,
//! suspension; and every refusal kind provoked.

mod common;

use std::sync::Arc;

use common::*;
use microcert_center::{Center, EncryptionCard, Error, SoftwareCard};
use microcert_core::{Audience, DeviceId, KeyState, Suite};

const FLEET: u64 = 1000;

fn state_of(center: &Center, id: DeviceId, generation: u8) -> KeyState {
    let v = center.device(id).unwrap().unwrap();
    v.seeds
        .iter()
        .find(|s| s.generation == generation)
        .unwrap()
        .state
}

#[allow(clippy::needless_range_loop)] // fleet[i] reads better beside the ranges
fn fleet_of_1000(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = open_center(&backend.location(dir.path(), "center.db"), card.clone());
    let mut fleet = make_fleet(&*card, FLEET);
    let batch = dir.path().join("batch.jsonl");
    write_batch(&batch, &mut fleet, NOW - 86_400);

    // Enrollment through the batch file, with progress.
    let mut calls = 0;
    let report = center
        .import_batch(&batch, "factory", NOW, &mut |p| {
            calls += 1;
            assert!(p.lines_done <= p.lines_total);
        })
        .unwrap();
    assert_eq!(report.enrolled, FLEET);
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(calls, 1, "1,000 lines are one chunk of the default 1,000");
    // Again: idempotent.
    let again = center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    assert_eq!((again.enrolled, again.resumed_after), (0, FLEET));
    assert_eq!(state_of(&center, fleet[0].id, 0), KeyState::PreActivation);

    // Every node authenticates (mutually), signs and seals.
    let rp = Audience::relying_party(RP);
    let mut t = NOW;
    for node in fleet.iter_mut() {
        t += 1;
        let (auth, r) = node.auth(&Audience::CENTER, t);
        let out = center.verify_auth(&auth, &Audience::CENTER, t).unwrap();
        assert_eq!((out.device, out.generation), (node.id, 0));
        assert!(
            node.check_receipt(&out.receipt, r),
            "center RECEIPT verifies at the node"
        );
        let sig = node.sign(b"reading 21.5C", t);
        let s = center.verify_signature(&sig, b"reading 21.5C", t).unwrap();
        assert_eq!(s.first_seen, t);
        let sealed = node.seal(&rp, b"secret reading", t);
        let opened = center.open_sealed(&sealed, &rp, t).unwrap();
        assert_eq!(&opened.plaintext[..], b"secret reading");
    }
    assert_eq!(
        state_of(&center, fleet[0].id, 0),
        KeyState::Active,
        "first AUTH activates"
    );
    assert_eq!(state_of(&center, fleet[999].id, 0), KeyState::Active);

    // A relying party's AUTH on /v1/verify; a signature with its data.
    t += 1;
    let (auth, _) = fleet[5].auth(&rp, t);
    assert!(matches!(
        center.verify(&auth, &rp, t).unwrap(),
        microcert_center::VerifyOutcome::Auth(_)
    ));
    let mut body = fleet[5].sign(b"invoice 42", t);
    body.extend_from_slice(b"invoice 42");
    match center.verify(&body, &rp, t + 50).unwrap() {
        microcert_center::VerifyOutcome::Signature(s) => assert_eq!(s.first_seen, t + 50),
        other => panic!("{other:?}"),
    }
    // Verified again later: first_seen stays.
    match center.verify(&body, &rp, t + 500).unwrap() {
        microcert_center::VerifyOutcome::Signature(s) => assert_eq!(s.first_seen, t + 50),
        other => panic!("{other:?}"),
    }

    // Challenge and AUTH_RESPONSE.
    for node in fleet.iter_mut().take(5) {
        t += 1;
        let ch = center.issue_challenge(node.id, t).unwrap();
        let (resp, r) = node.auth_response(&ch, t);
        let out = center
            .verify_auth_response(&resp, &Audience::CENTER, t + 30)
            .unwrap();
        assert!(node.check_receipt(&out.receipt, r));
        // The same challenge once more, in a new message: spent.
        let (resp2, _) = node.auth_response(&ch, t);
        assert!(matches!(
            center.verify_auth_response(&resp2, &Audience::CENTER, t + 31),
            Err(Error::Replay)
        ));
    }

    // 10 nodes updated to generation 1.
    let old_sig = fleet[10].sign(b"before update", t);
    center
        .verify_signature(&old_sig, b"before update", t)
        .unwrap();
    for i in 10..20 {
        t += 1;
        let id = fleet[i].id;
        center
            .queue_update(id, "operator:ann", "test roll-out", t)
            .unwrap();
        let cmd = center.command(id).unwrap().expect("UPDATE_SEED pending");
        assert_eq!(
            center.command(id).unwrap().unwrap(),
            cmd,
            "served unchanged"
        );
        let common::Reply::Enroll(enroll) = fleet[i].handle_command(&cmd, t) else {
            panic!("expected an ENROLL")
        };
        let receipt = center.enroll(&enroll, t).unwrap();
        // A retransmission of the identical ENROLL: the same RECEIPT.
        assert_eq!(center.enroll(&enroll, t + 5).unwrap(), receipt);
        assert!(
            center.command(id).unwrap().is_none(),
            "the ENROLL answered the command"
        );
        if i == 10 {
            // Grace: the old generation keeps verifying until the new is used.
            let (auth, _) = fleet[i].auth(&Audience::CENTER, t);
            center.verify_auth(&auth, &Audience::CENTER, t).unwrap();
        }
        assert!(fleet[i].finish_update(&receipt));
        let (auth, r) = fleet[i].auth(&Audience::CENTER, t);
        let out = center.verify_auth(&auth, &Audience::CENTER, t).unwrap();
        assert_eq!(out.generation, 1);
        assert!(fleet[i].check_receipt(&out.receipt, r));
        assert_eq!(state_of(&center, id, 0), KeyState::Deactivated);
        assert_eq!(state_of(&center, id, 1), KeyState::Active);
    }
    // The notarised signature under the now deactivated generation 0 stays
    // valid; an unrecorded one under it is refused.
    assert!(
        center
            .verify_signature(&old_sig, b"before update", t)
            .is_ok()
    );
    let mut old_node = TestNode::new(
        fleet[10].id,
        1,
        Suite::CMAC64,
        card.transport_key(fleet[10].id, 0).unwrap(),
    );
    let unrecorded = old_node.sign(b"forged later", t);
    assert!(matches!(
        center.verify_signature(&unrecorded, b"forged later", t),
        Err(Error::NotActive)
    ));

    // 10 nodes revoked; the REVOKE is served and acknowledged.
    for i in 20..30 {
        t += 1;
        let id = fleet[i].id;
        center
            .revoke(id, "operator:ann", "reported stolen", t)
            .unwrap();
        let (auth, _) = fleet[i].auth(&Audience::CENTER, t);
        assert!(matches!(
            center.verify_auth(&auth, &Audience::CENTER, t),
            Err(Error::Revoked)
        ));
        let cmd = center.command(id).unwrap().expect("REVOKE pending");
        let common::Reply::Receipt(receipt) = fleet[i].handle_command(&cmd, t) else {
            panic!("expected a RECEIPT")
        };
        center.accept_receipt(&receipt, t).unwrap();
        assert!(matches!(
            center.accept_receipt(&receipt, t),
            Err(Error::Replay)
        ));
        assert!(center.command(id).unwrap().is_none());
        assert_eq!(state_of(&center, id, 0), KeyState::Compromised);
    }
    // A signature notarised before the compromise stays valid.
    // (fleet[20] signed during the first round at its own t.)

    // 10 nodes suspended and resumed.
    for i in 30..40 {
        t += 1;
        let id = fleet[i].id;
        center
            .suspend(id, "operator:bob", "maintenance", t)
            .unwrap();
        let (auth, _) = fleet[i].auth(&Audience::CENTER, t);
        assert!(matches!(
            center.verify_auth(&auth, &Audience::CENTER, t),
            Err(Error::Suspended)
        ));
        center
            .resume(id, "operator:bob", "maintenance done", t)
            .unwrap();
        let (auth, r) = fleet[i].auth(&Audience::CENTER, t);
        let out = center.verify_auth(&auth, &Audience::CENTER, t).unwrap();
        assert!(fleet[i].check_receipt(&out.receipt, r));
    }

    refusals(&center, &card, &mut fleet, t + 1);

    // The books balance.
    let integrity = center.integrity_scan().unwrap();
    assert!(integrity.is_clean(), "{integrity:?}");
    assert_eq!(integrity.records, FLEET + 10);
    assert_eq!(center.verify_audit_chain().unwrap(), None);
    let log = center.audit_log(0, 100_000).unwrap();
    assert!(log.iter().any(|e| e.entry.action == "revoke"
        && e.entry.actor == "operator:ann"
        && e.entry.reason == "reported stolen"));
    assert!(log.iter().any(|e| e.entry.action == "command-answered"));
    assert!(
        log.iter()
            .any(|e| e.entry.action == "suspend" && e.entry.actor == "operator:bob")
    );
    assert_eq!(
        log.iter().filter(|e| e.entry.action == "enroll").count() as u64,
        FLEET + 10
    );
}

fn refusals(center: &Center, card: &SoftwareCard, fleet: &mut [TestNode], t: u64) {
    let c = Audience::CENTER;
    let node = &mut fleet[100];

    // malformed
    let (auth, _) = node.auth(&c, t);
    let e = center
        .verify_auth(&auth[..auth.len() - 1], &c, t)
        .unwrap_err();
    assert!(matches!(e, Error::Malformed(_)) && e.kind() == "malformed");
    // verification failed (opaque)
    let mut bad = auth.clone();
    *bad.last_mut().unwrap() ^= 1;
    let e = center.verify_auth(&bad, &c, t).unwrap_err();
    assert!(matches!(e, Error::Verification));
    assert_eq!(e.to_string(), "verification failed");
    // replay
    center.verify_auth(&auth, &c, t).unwrap();
    assert_eq!(
        center.verify_auth(&auth, &c, t).unwrap_err().kind(),
        "replay"
    );
    // stale
    let (old, _) = node.auth(&c, t - 301);
    assert!(matches!(center.verify_auth(&old, &c, t), Err(Error::Stale)));
    let (future, _) = node.auth(&c, t + 301);
    assert!(matches!(
        center.verify_auth(&future, &c, t),
        Err(Error::Stale)
    ));
    // expired: an ENROLL carrying a seed that does not cover the current
    // year (2020..=2024 in 2026)
    let eid = DeviceId::from_u64(0x0300_0000_0000_0001);
    center
        .register_device(eid, 1, None, 0, "factory", t)
        .unwrap();
    let mut enode = TestNode::new(eid, 1, Suite::CMAC64, card.transport_key(eid, 0).unwrap());
    enode.seed = Some(test_seed(eid, 0, 2020));
    let ee = enode.enroll_transport(t);
    assert_eq!(center.enroll(&ee, t).unwrap_err().kind(), "expired");
    // wrong suite: a Class 1 device (suite 0x01) speaking 0x02
    node.suite = Suite::CMAC128;
    let (ws, _) = node.auth(&c, t);
    node.suite = Suite::CMAC64;
    assert!(matches!(
        center.verify_auth(&ws, &c, t),
        Err(Error::WrongSuite)
    ));
    // wrong generation
    node.generation = 7;
    let (wg, _) = node.auth(&c, t);
    node.generation = 0;
    assert!(matches!(
        center.verify_auth(&wg, &c, t),
        Err(Error::WrongGeneration)
    ));
    // unknown device
    let mut stranger = TestNode::new(
        DeviceId::from_u64(0xdead_beef),
        1,
        Suite::CMAC64,
        card.transport_key(DeviceId::from_u64(0xdead_beef), 0)
            .unwrap(),
    );
    let (sa, _) = stranger.auth(&c, t);
    assert_eq!(
        center.verify_auth(&sa, &c, t).unwrap_err().kind(),
        "unknown-device"
    );
    // revoked, suspended
    let (rv, _) = fleet[21].auth_unchecked(&c, t);
    assert_eq!(
        center.verify_auth(&rv, &c, t).unwrap_err().kind(),
        "revoked"
    );
    center
        .suspend(fleet[200].id, "operator:bob", "check", t)
        .unwrap();
    let (su, _) = fleet[200].auth(&c, t);
    assert_eq!(
        center.verify_auth(&su, &c, t).unwrap_err().kind(),
        "suspended"
    );
    // not active: the superseded generation 0 of an updated node
    let mut gen0 = TestNode::new(
        fleet[11].id,
        1,
        Suite::CMAC64,
        card.transport_key(fleet[11].id, 0).unwrap(),
    );
    let (na, _) = gen0.auth(&c, t);
    assert_eq!(
        center.verify_auth(&na, &c, t).unwrap_err().kind(),
        "not-active"
    );
    // illegal transition: resume an active seed
    let e = center
        .resume(fleet[300].id, "operator:bob", "oops", t)
        .unwrap_err();
    assert!(matches!(e, Error::IllegalTransition { .. }), "{e:?}");
    // SEALED to the center's audience is malformed; too long for Class 1
    let rp = Audience::relying_party(RP);
    let big = fleet[301].seal(&rp, &[7u8; 1025], t);
    assert!(matches!(
        center.open_sealed(&big, &rp, t),
        Err(Error::Malformed(_))
    ));
    let ok = fleet[301].seal(&rp, &[7u8; 1024], t);
    assert!(matches!(
        center.open_sealed(&ok, &c, t),
        Err(Error::Malformed(_))
    ));
    // SEALED for another relying party: does not verify
    let other = Audience::relying_party("other.example");
    assert!(matches!(
        center.open_sealed(&ok, &other, t),
        Err(Error::Verification)
    ));
    assert_eq!(
        &center.open_sealed(&ok, &rp, t).unwrap().plaintext[..],
        &[7u8; 1024][..]
    );
    // an ENROLL from a node that already holds a seed, under Ktr: transport
    // enrollment closed at its first ENROLL
    let mut again = TestNode::new(
        fleet[400].id,
        1,
        Suite::CMAC64,
        card.transport_key(fleet[400].id, 0).unwrap(),
    );
    again.generation = 1;
    let e = again.enroll_transport(t);
    assert!(matches!(center.enroll(&e, t), Err(Error::Verification)));
}

impl TestNode {
    /// AUTH by a node that has wiped its seed: made from the same
    /// deterministic seed, to show the center refuses it as revoked.
    fn auth_unchecked(&mut self, aud: &Audience, t: u64) -> (Vec<u8>, u64) {
        if self.seed.is_none() {
            self.seed = Some(test_seed(self.id, self.generation, 2026));
        }
        self.auth(aud, t)
    }
}

both_backends!();

both_backends!(fleet_of_1000);
