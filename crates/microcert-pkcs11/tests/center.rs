//! A center whose card is a SoftHSM2 token: a small fleet enrolls under
//! the token's transport keys, authenticates (seeds unsealed by the token),
//! answers challenges, is updated and revoked; the integrity scan and the
//! audit chain, tagged by the token, stay clean.

mod common;

use std::sync::Arc;

use microcert_center::{Center, CenterConfig, Error};
use microcert_core::{
    Audience, Command, DeviceId, EnrollKey, Header, Key128, KeySeed, Opcode, Receipt, Sender,
    Suite, make_auth, make_auth_response, make_enroll, make_receipt, verify_command,
    verify_receipt,
};
use microcert_pkcs11::Pkcs11Card;

use common::{config, hsm};

/// 2026-06-01T00:00:00Z.
const NOW: u64 = 1_780_272_000;

struct Node {
    id: DeviceId,
    ktr: Key128,
    seed: KeySeed,
    generation: u8,
    r: u64,
}

impl Node {
    fn header(&mut self, generation: u8) -> Header {
        self.r = self
            .r
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        Header {
            suite: Suite::CMAC64,
            device: self.id,
            generation,
            t: NOW as u32,
            r: self.r,
        }
    }

    fn enroll(&mut self, key: EnrollKey<'_>, seed: &KeySeed, generation: u8) -> (Vec<u8>, u64) {
        let h = self.header(generation);
        let mut out = vec![0u8; 1100];
        let n = make_enroll(key, seed, &h, &mut out).unwrap();
        out.truncate(n);
        (out, h.r)
    }

    fn auth(&mut self) -> (Vec<u8>, u64) {
        let h = self.header(self.generation);
        let mut out = vec![0u8; 64];
        let n = make_auth(&self.seed, &h, &Audience::CENTER, &mut out).unwrap();
        out.truncate(n);
        (out, h.r)
    }

    fn receipt_ok(seed: &KeySeed, receipt: &[u8], r: u64) -> bool {
        let msg = Receipt::decode(receipt).unwrap();
        msg.reference == r && verify_receipt(seed, &msg, Sender::Center).is_ok()
    }
}

fn seed_for(id: DeviceId, generation: u8) -> KeySeed {
    KeySeed::generate(2026, |b| {
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8) ^ id.0[7] ^ generation.wrapping_mul(31);
        }
    })
}

#[test]
fn a_fleet_lives_its_life_on_a_token() {
    let Some(_) = hsm() else { return };
    let card = Arc::new(Pkcs11Card::init(&config("mc-center")).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let center =
        Center::open_sqlite(&dir.path().join("keys.db"), card, CenterConfig::default()).unwrap();

    // Factory: Ktr(device, 0) from the token for every chip.
    let ids: Vec<_> = (0..20)
        .map(|i| DeviceId::from_u64(0x0300_0000_0000_0000 + i))
        .collect();
    let ktrs = center.provision(&ids, 1, None, 0, "factory", NOW).unwrap();
    let mut nodes: Vec<Node> = ids
        .iter()
        .zip(ktrs)
        .map(|(&id, ktr)| Node {
            id,
            ktr,
            seed: seed_for(id, 0),
            generation: 0,
            r: id.to_u64(),
        })
        .collect();

    // First enrollment under Ktr, then a mutual AUTH with a cold cache, so
    // that every seed is unsealed by the token.
    for n in &mut nodes {
        let seed = seed_for(n.id, 0);
        let ktr = Key128::from_bytes(*n.ktr.expose());
        let (bytes, r) = n.enroll(EnrollKey::Transport(&ktr), &seed, 0);
        let receipt = center.enroll(&bytes, NOW).unwrap();
        assert!(Node::receipt_ok(&n.seed, &receipt, r));
    }
    center.clear_cache();
    for n in &mut nodes {
        let (bytes, r) = n.auth();
        let out = center.verify_auth(&bytes, &Audience::CENTER, NOW).unwrap();
        assert!(Node::receipt_ok(&n.seed, &out.receipt, r));
        // A replay is refused.
        assert!(matches!(
            center.verify_auth(&bytes, &Audience::CENTER, NOW),
            Err(Error::Replay)
        ));
    }

    // Challenge and response, the challenge made and checked under Kchal
    // in the token.
    let n = &mut nodes[2];
    let ch = center.issue_challenge(n.id, NOW).unwrap();
    let h = n.header(0);
    let mut resp = vec![0u8; 64];
    let len = make_auth_response(&n.seed, &h, &ch, &Audience::CENTER, &mut resp).unwrap();
    resp.truncate(len);
    center.clear_cache();
    center
        .verify_auth_response(&resp, &Audience::CENTER, NOW)
        .unwrap();

    // Seed update of node 0: UPDATE_SEED, then ENROLL g+1 under Kupd.
    center
        .queue_update(nodes[0].id, "operator", "test", NOW)
        .unwrap();
    let cmd_bytes = center.command(nodes[0].id).unwrap().unwrap();
    let cmd = Command::decode(&cmd_bytes).unwrap();
    verify_command(&nodes[0].seed, &cmd).unwrap();
    assert_eq!(cmd.opcode, Opcode::UPDATE_SEED);
    let new_seed = seed_for(nodes[0].id, 1);
    let old_seed = seed_for(nodes[0].id, 0);
    let (bytes, r) = nodes[0].enroll(EnrollKey::Update(&old_seed), &new_seed, 1);
    center.clear_cache();
    let receipt = center.enroll(&bytes, NOW + 10).unwrap();
    assert!(Node::receipt_ok(&new_seed, &receipt, r));
    nodes[0].seed = new_seed;
    nodes[0].generation = 1;
    center.clear_cache();
    let (bytes, _) = nodes[0].auth();
    let out = center
        .verify_auth(&bytes, &Audience::CENTER, NOW + 20)
        .unwrap();
    assert_eq!(out.generation, 1);

    // Revocation of node 1: refused at once, REVOKE queued and answered.
    center
        .revoke(nodes[1].id, "operator", "lost", NOW + 30)
        .unwrap();
    let (bytes, _) = nodes[1].auth();
    assert!(matches!(
        center.verify_auth(&bytes, &Audience::CENTER, NOW + 30),
        Err(Error::Revoked)
    ));
    let cmd_bytes = center.command(nodes[1].id).unwrap().unwrap();
    let cmd = Command::decode(&cmd_bytes).unwrap();
    verify_command(&nodes[1].seed, &cmd).unwrap();
    assert_eq!(cmd.opcode, Opcode::REVOKE);
    let h = nodes[1].header(0);
    let mut out = vec![0u8; 64];
    let len = make_receipt(&nodes[1].seed, &h, Sender::Node, cmd.header.r, 0, &mut out).unwrap();
    out.truncate(len);
    center.accept_receipt(&out, NOW + 40).unwrap();

    // Integrity tags and the audit chain, all made by the token, check.
    let report = center.integrity_scan().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(report.records >= 21);
    center.verify_audit_chain().unwrap();
}
