//! The center against the node crate's software chip: the same bytes a
//! real node sends, end to end (personalize, enroll online, mutual AUTH,
//! seed update, revocation).

mod common;

use std::sync::Arc;

use common::Backend;

use microcert_center::{Center, CenterConfig, SoftwareCard};
use microcert_core::{Audience, DataDigest, DeviceId, KeyState, Suite};
use microcert_node::{Answered, EntropyFailure, Personalization, SecureChip, SoftChip};

const NOW: u64 = 1_780_272_000; // 2026-06-01

fn os_entropy(buf: &mut [u8]) -> Result<(), EntropyFailure> {
    getrandom::fill(buf).map_err(|_| EntropyFailure)
}

fn soft_chip_through_its_life(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = Center::open_url(
        &backend.location(dir.path(), "c.db"),
        card,
        CenterConfig::default(),
    )
    .unwrap();
    let id = DeviceId::from_u64(0x0011_2233_4455_6677);

    // Factory: register, hand Ktr to the chip.
    center
        .register_device(id, 1, None, 0, "factory", NOW)
        .unwrap();
    let ktr = center.factory_transport_key(id, "factory", NOW).unwrap();
    let mut chip = SoftChip::new(os_entropy);
    chip.personalize(&Personalization {
        device: id,
        epoch: 0,
        suite: Suite::CMAC64,
        transport_key: ktr,
        class: 1,
        issued: NOW as u32,
    })
    .unwrap();
    let mut buf = vec![0u8; 2048];

    // Online enrollment; a retransmission gets the same RECEIPT.
    let n = chip.enroll(NOW as u32, &mut buf).unwrap();
    let enroll = buf[..n].to_vec();
    let receipt = center.enroll(&enroll, NOW).unwrap();
    assert_eq!(center.enroll(&enroll, NOW + 60).unwrap(), receipt);
    assert_eq!(
        chip.accept_receipt(&receipt).unwrap(),
        Answered::Enrollment { generation: 0 }
    );

    // Mutual authentication.
    let t = NOW + 100;
    let n = chip.auth(t as u32, &Audience::CENTER, &mut buf).unwrap();
    let out = center.verify_auth(&buf[..n], &Audience::CENTER, t).unwrap();
    assert_eq!(
        chip.accept_receipt(&out.receipt).unwrap(),
        Answered::Authentication
    );
    assert_eq!(
        center.device(id).unwrap().unwrap().seeds[0].state,
        KeyState::Active
    );

    // Challenge-response.
    let ch = center.issue_challenge(id, t).unwrap();
    let n = chip.auth_response(t as u32, &ch, &mut buf).unwrap();
    let out = center
        .verify_auth_response(&buf[..n], &Audience::CENTER, t)
        .unwrap();
    assert_eq!(
        chip.accept_receipt(&out.receipt).unwrap(),
        Answered::Authentication
    );

    // Signature and sealed data for a relying party.
    let rp = chip.add_audience("meter.example").unwrap();
    let mut d = DataDigest::new();
    d.update(b"42 kWh");
    let n = chip.sign(t as u32, d, &mut buf).unwrap();
    assert_eq!(
        center
            .verify_signature(&buf[..n], b"42 kWh", t)
            .unwrap()
            .first_seen,
        t
    );
    buf[23..29].copy_from_slice(b"secret");
    let n = chip.seal(t as u32, &rp, &mut buf, 6).unwrap();
    let opened = center
        .open_sealed(&buf[..n], &Audience::relying_party("meter.example"), t)
        .unwrap();
    assert_eq!(&opened.plaintext[..], b"secret");

    // Seed update over COMMAND.
    let t = t + 100;
    center
        .queue_update(id, "operator:ann", "roll-out", t)
        .unwrap();
    let cmd = center.command(id).unwrap().unwrap();
    let n = chip.handle_command(t as u32, &cmd, &mut buf).unwrap();
    let receipt = center.enroll(&buf[..n], t).unwrap();
    assert_eq!(
        chip.accept_receipt(&receipt).unwrap(),
        Answered::Enrollment { generation: 1 }
    );
    let n = chip.auth(t as u32, &Audience::CENTER, &mut buf).unwrap();
    let out = center.verify_auth(&buf[..n], &Audience::CENTER, t).unwrap();
    assert_eq!(out.generation, 1);
    chip.accept_receipt(&out.receipt).unwrap();

    // Revocation over COMMAND.
    let t = t + 100;
    center.revoke(id, "operator:ann", "stolen", t).unwrap();
    let cmd = center.command(id).unwrap().unwrap();
    let n = chip.handle_command(t as u32, &cmd, &mut buf).unwrap();
    center.accept_receipt(&buf[..n], t).unwrap();
    assert!(center.command(id).unwrap().is_none());
    assert!(
        chip.auth(t as u32, &Audience::CENTER, &mut buf).is_err(),
        "the chip wiped its keys"
    );
}

both_backends!(soft_chip_through_its_life);
