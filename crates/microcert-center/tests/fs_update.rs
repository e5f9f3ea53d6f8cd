//! Issue 17 item 2: the forward-secret seed update (protocol v1.2) at the
//! center, on a real SQLite file: Class 2 and 3 devices are asked with
//! UPDATE_SEED_FS (the center's ephemeral P-256 key in the COMMAND, its
//! private key sealed in the command row until the update is answered),
//! Class 1 keeps the symmetric UPDATE_SEED, and a symmetric update ENROLL
//! is refused for a device whose profile requires the forward-secret one.

mod common;

use std::sync::Arc;

use common::*;
use microcert_center::{Center, CenterConfig, EncryptionCard, Error, SoftwareCard};
use microcert_core::fs::{FsBinding, fs_key};
use microcert_core::{
    Audience, Command, DeviceId, EnrollFs, EnrollKey, Header, Key128, KeyState, Opcode, Purpose,
    Suite, make_enroll, open_enroll_fs, verify_enroll_fs, working_key,
};

const C: Audience = Audience::CENTER;

struct Fx {
    dir: tempfile::TempDir,
    card: Arc<SoftwareCard>,
    center: Center,
}

impl Fx {
    fn new(config: CenterConfig) -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let card = Arc::new(SoftwareCard::ephemeral().unwrap());
        let center = Center::open_sqlite(&dir.path().join("c.db"), card.clone(), config).unwrap();
        Fx { dir, card, center }
    }

    /// A device of `class`, enrolled under Ktr and used once (Active).
    fn device(&self, i: u64, class: u8, suite: Suite) -> TestNode {
        let id = DeviceId::from_u64(0x0170_0000_0000_0000 + i);
        self.center
            .register_device(id, class, Some(suite), 0, "factory", NOW)
            .unwrap();
        let mut node = TestNode::new(id, class, suite, self.card.transport_key(id, 0).unwrap());
        let e = node.enroll_transport(NOW);
        self.center.enroll(&e, NOW).unwrap();
        let (a, _) = node.auth(&C, NOW + 1);
        self.center.verify_auth(&a, &C, NOW + 1).unwrap();
        node
    }

    /// Length of the device's command row's bytes, straight from the file.
    fn command_row_len(&self, id: DeviceId) -> usize {
        let conn = rusqlite::Connection::open(self.dir.path().join("c.db")).unwrap();
        conn.query_row(
            "SELECT length(bytes) FROM commands WHERE device = ?1",
            [&id.0[..]],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as usize
    }

    fn generations(&self, id: DeviceId) -> Vec<(u8, KeyState)> {
        let v = self.center.device(id).unwrap().unwrap();
        v.seeds.iter().map(|s| (s.generation, s.state)).collect()
    }
}

/// A node holding the device's generation 0 (the deterministic test seed)
/// with r values far from the real node's: a thief who stole seed g.
fn thief_of(fx: &Fx, node: &TestNode) -> TestNode {
    let mut n = TestNode::new(
        node.id,
        node.class,
        node.suite,
        fx.card.transport_key(node.id, 0).unwrap(),
    );
    for _ in 0..10_000 {
        n.fresh_r();
    }
    n
}

/// Attack: a thief holding seed g of a Class 2 device answers the pending
/// UPDATE_SEED (forward-secret) with a plain v1.1 ENROLL under Kupd,
/// carrying a seed of its own, so that it skips the ECDH (and the real
/// node's update) and owns generation g + 1. Refused as if the MAC did
/// not verify, before any write: no new generation, the command still
/// pending, no audit entry; the real node's forward-secret answer is then
/// accepted.
#[test]
fn a_thief_cannot_answer_a_forward_secret_update_with_a_symmetric_enroll() {
    let fx = Fx::new(CenterConfig::default());
    let mut node = fx.device(1, 2, Suite::CMAC64);
    let t = NOW + 100;
    fx.center
        .queue_update(node.id, "operator:ann", "roll-out", t)
        .unwrap();
    let cmd = fx.center.command(node.id).unwrap().unwrap();
    let audit_before = fx.center.audit_log(0, 100_000).unwrap().len();

    let mut thief = thief_of(&fx, &node);
    let h = Header {
        suite: thief.suite,
        device: node.id,
        generation: 1,
        t: (t + 5) as u32,
        r: thief.fresh_r(),
    };
    let mine = test_seed(DeviceId::from_u64(0x7417), 1, 2026);
    let mut e = vec![0u8; 1100];
    let n = make_enroll(
        EnrollKey::Update(thief.seed.as_ref().unwrap()),
        &mine,
        &h,
        &mut e,
    )
    .unwrap();
    let refused = fx.center.enroll(&e[..n], t + 5);
    assert!(
        matches!(refused, Err(Error::Verification)),
        "a symmetric update ENROLL for a Class 2 device: {refused:?}"
    );
    assert_eq!(fx.generations(node.id), vec![(0, KeyState::Active)]);
    assert_eq!(fx.center.command(node.id).unwrap(), Some(cmd.clone()));
    assert_eq!(fx.center.audit_log(0, 100_000).unwrap().len(), audit_before);

    // The real node answers with the forward-secret ENROLL: accepted.
    let Reply::Enroll(e) = node.handle_command(&cmd, t + 10) else {
        panic!("UPDATE_SEED_FS answered with an ENROLL")
    };
    let receipt = fx.center.enroll(&e, t + 10).unwrap();
    assert!(node.finish_update(&receipt));
    assert_eq!(
        fx.generations(node.id),
        vec![(0, KeyState::Active), (1, KeyState::PreActivation)]
    );
}

/// A Class 2 and a Class 3 device get UPDATE_SEED_FS (69 and 77 bytes),
/// a Class 1 device the symmetric UPDATE_SEED (36 bytes); all three
/// update and keep authenticating with the new seed. The center's
/// ephemeral private key is in the command row only while the update is
/// pending (sealed: more bytes than the COMMAND), and gone once answered.
#[test]
fn class_2_and_3_update_with_forward_secrecy_and_class_1_symmetrically() {
    let fx = Fx::new(CenterConfig::default());
    let mut nodes = [
        fx.device(1, 1, Suite::CMAC64),
        fx.device(2, 2, Suite::CMAC64),
        fx.device(3, 3, Suite::CMAC128),
    ];
    let t = NOW + 100;
    for node in nodes.iter_mut() {
        fx.center
            .queue_update(node.id, "operator:ann", "roll-out", t)
            .unwrap();
        let cmd = fx.center.command(node.id).unwrap().unwrap();
        let decoded = Command::decode(&cmd).unwrap();
        let (opcode, len) = match node.class {
            1 => (Opcode::UPDATE_SEED, 36),
            2 => (Opcode::UPDATE_SEED_FS, 69),
            _ => (Opcode::UPDATE_SEED_FS, 77),
        };
        assert_eq!(decoded.opcode, opcode, "class {}", node.class);
        assert_eq!(cmd.len(), len);
        if node.class == 1 {
            assert_eq!(fx.command_row_len(node.id), len);
        } else {
            // The sealed key follows the COMMAND (version + AES-GCM seal).
            assert!(fx.command_row_len(node.id) > len + 900);
        }
        let Reply::Enroll(e) = node.handle_command(&cmd, t + 10) else {
            panic!("an update answered with an ENROLL")
        };
        let receipt = fx.center.enroll(&e, t + 10).unwrap();
        assert!(node.finish_update(&receipt), "class {}", node.class);
        assert_eq!(fx.center.command(node.id).unwrap(), None, "answered");
        // Destroyed with the answer: only the COMMAND's bytes are left.
        assert_eq!(fx.command_row_len(node.id), len, "class {}", node.class);
        // A byte-identical retransmission gets the same RECEIPT.
        assert_eq!(fx.center.enroll(&e, t + 20).unwrap(), receipt);
        let (a, _) = node.auth(&C, t + 30);
        let out = fx.center.verify_auth(&a, &C, t + 30).unwrap();
        assert_eq!(out.generation, 1);
    }
}

/// The recorded update and the old seed: an attacker who wiretapped the
/// COMMAND and the ENROLL and later steals seed g (and even the center's
/// database and card after the update was answered) cannot open seed
/// g + 1. Every key derivable from seed g and the public values fails to
/// open the ENROLL, while the true Kfs opens it.
#[test]
fn the_old_seed_and_the_recorded_messages_do_not_open_the_new_seed() {
    let fx = Fx::new(CenterConfig::default());
    let mut node = fx.device(2, 2, Suite::CMAC64);
    let t = NOW + 100;
    fx.center
        .queue_update(node.id, "operator:ann", "roll-out", t)
        .unwrap();
    let cmd = fx.center.command(node.id).unwrap().unwrap();
    let Reply::Enroll(e) = node.handle_command(&cmd, t + 10) else {
        panic!()
    };
    let receipt = fx.center.enroll(&e, t + 10).unwrap();
    assert!(node.finish_update(&receipt));
    let rec = node.last_fs.take().unwrap();
    assert_eq!(rec.command, cmd);
    assert_eq!(rec.enroll, e);

    let old = test_seed(node.id, 0, 2026);
    let c = Command::decode(&rec.command).unwrap();
    let m = EnrollFs::decode(&rec.enroll).unwrap();
    verify_enroll_fs(&old, &m).expect("the thief holds the right seed");
    let mut keys: Vec<Key128> = Vec::new();
    for h in [c.header, m.header] {
        let k0 = microcert_core::csk::combine(&old, h.t, h.r).unwrap();
        keys.push(Key128::from_bytes(*k0.expose()));
        for p in [
            Purpose::Auth,
            Purpose::Sign,
            Purpose::Enc,
            Purpose::Cmd,
            Purpose::Upd,
            Purpose::ReceiptCenter,
            Purpose::ReceiptNode,
        ] {
            keys.push(working_key(&old, p, &h).unwrap());
        }
    }
    let binding = FsBinding {
        device: node.id,
        new_generation: 1,
        command_r: c.header.r,
        enroll_r: m.header.r,
        center_public: c.ephemeral.unwrap(),
        node_public: m.ephemeral,
    };
    let mut zs: Vec<[u8; 32]> = vec![[0; 32]];
    zs.push(c.ephemeral.unwrap()[1..].try_into().unwrap());
    zs.push(m.ephemeral[1..].try_into().unwrap());
    for k in &keys {
        let mut z = [0u8; 32];
        z[..16].copy_from_slice(k.expose());
        zs.push(z);
    }
    keys.extend(zs.iter().map(|z| fs_key(z, &binding)));
    for k in &keys {
        assert!(open_enroll_fs(k, &m).is_err());
    }
    let new = open_enroll_fs(&rec.kfs, &m).unwrap();
    assert_eq!(new.expose(), test_seed(node.id, 1, 2026).expose());
}

/// The sealed ephemeral key goes with the command: a REVOKE that replaces
/// a pending UPDATE_SEED_FS leaves only the REVOKE's bytes in the row.
#[test]
fn a_cancelled_forward_secret_update_leaves_no_sealed_key() {
    let fx = Fx::new(CenterConfig::default());
    let node = fx.device(2, 2, Suite::CMAC64);
    fx.center
        .queue_update(node.id, "operator:ann", "roll-out", NOW + 100)
        .unwrap();
    assert!(fx.command_row_len(node.id) > 69 + 900);
    fx.center
        .revoke(node.id, "operator:ann", "lost", NOW + 200)
        .unwrap();
    let cmd = fx.center.command(node.id).unwrap().unwrap();
    assert_eq!(Command::decode(&cmd).unwrap().opcode, Opcode::REVOKE);
    assert_eq!(fx.command_row_len(node.id), 36);
}

/// The profile rule on its own: an UPDATE_SEED of opcode 1 left pending
/// for a Class 2 device (queued by a center configured without the
/// forward-secret update) is not answered by a symmetric ENROLL once the
/// center runs with the built-in profile: refused, nothing written.
#[test]
fn a_profile_that_requires_forward_secrecy_refuses_a_symmetric_update() {
    let mut legacy = CenterConfig::default();
    for p in &mut legacy.profiles {
        p.forward_secret_update = false;
    }
    let fx = Fx::new(legacy);
    let mut node = fx.device(5, 2, Suite::CMAC64);
    let t = NOW + 100;
    fx.center
        .queue_update(node.id, "operator:ann", "roll-out", t)
        .unwrap();
    let cmd = fx.center.command(node.id).unwrap().unwrap();
    assert_eq!(Command::decode(&cmd).unwrap().opcode, Opcode::UPDATE_SEED);
    let Fx { dir, card, center } = fx;
    drop(center);
    let center = Center::open_sqlite(
        &dir.path().join("c.db"),
        card.clone(),
        CenterConfig::default(),
    )
    .unwrap();
    let fx = Fx { dir, card, center };
    let Reply::Enroll(e) = node.handle_command(&cmd, t + 10) else {
        panic!()
    };
    assert!(matches!(
        fx.center.enroll(&e, t + 10),
        Err(Error::Verification)
    ));
    assert_eq!(fx.generations(node.id), vec![(0, KeyState::Active)]);
    assert_eq!(fx.center.command(node.id).unwrap(), Some(cmd));
}

/// A node's RECEIPT that answers a pending UPDATE_SEED_FS (with an error
/// status) ends it: the sealed key is erased with it.
#[test]
fn a_node_receipt_answering_the_update_erases_the_sealed_key() {
    let fx = Fx::new(CenterConfig::default());
    let node = fx.device(6, 2, Suite::CMAC64);
    let t = NOW + 100;
    fx.center
        .queue_update(node.id, "operator:ann", "roll-out", t)
        .unwrap();
    let cmd = fx.center.command(node.id).unwrap().unwrap();
    let c = Command::decode(&cmd).unwrap();
    assert!(fx.command_row_len(node.id) > 69 + 900);
    let h = Header {
        suite: Suite::CMAC64,
        device: node.id,
        generation: 0,
        t: (t + 5) as u32,
        r: 0x5151,
    };
    let mut out = [0u8; 64];
    let n = microcert_core::make_receipt(
        &test_seed(node.id, 0, 2026),
        &h,
        microcert_core::Sender::Node,
        c.header.r,
        3,
        &mut out,
    )
    .unwrap();
    fx.center.accept_receipt(&out[..n], t + 5).unwrap();
    assert_eq!(fx.center.command(node.id).unwrap(), None);
    assert_eq!(fx.command_row_len(node.id), 69);
}

/// A storage-key rotation while an UPDATE_SEED_FS is pending keeps the old
/// Kstore version that seals its ephemeral key (and says why), so the
/// update is still answered; once answered, the old version goes.
#[test]
fn a_rotation_keeps_the_storage_key_of_a_pending_forward_secret_update() {
    let fx = Fx::new(CenterConfig::default());
    let mut node = fx.device(7, 2, Suite::CMAC64);
    let t = NOW + 100;
    fx.center
        .queue_update(node.id, "operator:ann", "roll-out", t)
        .unwrap();
    let cmd = fx.center.command(node.id).unwrap().unwrap();
    let r = fx
        .center
        .rotate_storage_key(10, None, "ops", t + 1, &mut |_| {})
        .unwrap();
    assert!(r.destroyed.is_empty(), "{r:?}");
    assert_eq!(r.kept.len(), 1, "{r:?}");
    assert!(r.kept[0].1.contains("UPDATE_SEED_FS"), "{r:?}");
    let Reply::Enroll(e) = node.handle_command(&cmd, t + 10) else {
        panic!()
    };
    let receipt = fx.center.enroll(&e, t + 10).unwrap();
    assert!(node.finish_update(&receipt));
    let (destroyed, kept) = fx
        .center
        .destroy_unused_storage_keys(None, false, "ops", t + 20)
        .unwrap();
    assert_eq!((destroyed.len(), kept.len()), (1, 0));
}
