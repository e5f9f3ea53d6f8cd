//! Each refusal of the chip, one test apiece.

mod common;

use common::*;
use microcert_core::{
    Audience, Auth, DataDigest, DeviceId, EnrollKey, HEADER_LEN, KeySeed, Opcode, Sender,
    Signature, Suite,
};
use microcert_node::{
    CLASS1_MAX_SEALED, Error, IMAGE_LEN, Life, MAX_AUDIENCES, SecureChip, SoftChip,
};

#[test]
fn rejects_replayed_command() {
    let (mut chip, seed) = enrolled(Suite::CMAC64);
    let mut out = [0u8; 1100];
    let cmd = command(&seed, 0, ISSUED + 60, 1_000, Opcode::UPDATE_SEED);
    chip.handle_command(0, &cmd, &mut out).unwrap();
    assert_eq!(chip.handle_command(0, &cmd, &mut out), Err(Error::Replay));
    let older = command(&seed, 0, ISSUED + 70, 999, Opcode::REVOKE);
    assert_eq!(chip.handle_command(0, &older, &mut out), Err(Error::Replay));
    let same = command(&seed, 0, ISSUED + 80, 1_000, Opcode::REVOKE);
    assert_eq!(chip.handle_command(0, &same, &mut out), Err(Error::Replay));
    assert_eq!(chip.status().life, Life::Personalized);
}

#[test]
fn rejects_forged_command() {
    let (mut chip, seed) = enrolled(Suite::CMAC64);
    let mut out = [0u8; 1100];
    let mut cmd = command(&seed, 0, ISSUED + 60, 5, Opcode::REVOKE);
    let last = cmd.len() - 1;
    cmd[last] ^= 1;
    assert_eq!(
        chip.handle_command(0, &cmd, &mut out),
        Err(Error::Verification)
    );
    let other = KeySeed::from_bytes(&[0x5a; 976], 2026);
    let cmd = command(&other, 0, ISSUED + 60, 5, Opcode::REVOKE);
    assert_eq!(
        chip.handle_command(0, &cmd, &mut out),
        Err(Error::Verification)
    );
    // A changed counter breaks the tag too.
    let mut cmd = command(&seed, 0, ISSUED + 60, 5, Opcode::REVOKE);
    cmd[HEADER_LEN + 3] = 6;
    assert_eq!(
        chip.handle_command(0, &cmd, &mut out),
        Err(Error::Verification)
    );
    let st = chip.status();
    assert_eq!((st.life, st.highest_counter), (Life::Personalized, 0));
}

#[test]
fn rejects_command_for_another_device_generation_or_suite() {
    let (mut chip, seed) = enrolled(Suite::CMAC64);
    let mut out = [0u8; 1100];
    let cmd = command_in(
        &seed,
        Suite::CMAC64,
        DeviceId([9; 8]),
        0,
        ISSUED,
        5,
        Opcode::REVOKE,
    );
    assert_eq!(
        chip.handle_command(0, &cmd, &mut out),
        Err(Error::WrongDevice)
    );
    let cmd = command(&seed, 3, ISSUED, 5, Opcode::REVOKE);
    assert_eq!(
        chip.handle_command(0, &cmd, &mut out),
        Err(Error::WrongGeneration)
    );
    let cmd = command_in(&seed, Suite::CMAC128, DEVICE, 0, ISSUED, 5, Opcode::REVOKE);
    assert_eq!(
        chip.handle_command(0, &cmd, &mut out),
        Err(Error::WrongSuite)
    );
    assert_eq!(
        chip.handle_command(0, &cmd[..10], &mut out),
        Err(Error::Malformed(microcert_core::Error::Length))
    );
}

#[test]
fn command_with_too_small_buffer_is_not_consumed() {
    let (mut chip, seed) = enrolled(Suite::CMAC64);
    let cmd = command(&seed, 0, ISSUED + 60, 5, Opcode::UPDATE_SEED);
    assert_eq!(
        chip.handle_command(0, &cmd, &mut [0; 100]),
        Err(Error::BufferTooSmall)
    );
    assert_eq!(chip.status().highest_counter, 0);
    assert!(chip.handle_command(0, &cmd, &mut [0; 1100]).is_ok());
}

#[test]
fn rejects_wrong_suite_receipt() {
    let mut chip = personalized(Suite::CMAC64);
    let mut buf = [0u8; 1100];
    let n = chip.enroll(0, &mut buf).unwrap();
    let (h, seed) = open(&buf[..n], EnrollKey::Transport(&ktr(0)));
    let rc = receipt_as(&seed, Suite::CMAC128, 0, ISSUED, h.r, 0, Sender::Center);
    assert_eq!(chip.accept_receipt(&rc), Err(Error::WrongSuite));
    assert_eq!(chip.status().pending_generation, Some(0));
}

#[test]
fn rejects_second_personalization() {
    let mut chip = personalized(Suite::CMAC64);
    assert_eq!(
        chip.personalize(&line(0, Suite::CMAC64)),
        Err(Error::AlreadyPersonalized)
    );
    let mut other = line(1, Suite::CMAC64);
    other.device = DeviceId([1; 8]);
    assert_eq!(chip.personalize(&other), Err(Error::WrongDevice));
    // Holding a seed (or a pending one), even the next epoch is refused:
    // re-personalization follows a revocation.
    let (mut chip, _) = enrolled(Suite::CMAC64);
    assert_eq!(
        chip.personalize(&line(1, Suite::CMAC64)),
        Err(Error::AlreadyPersonalized)
    );
    let mut chip = personalized(Suite::CMAC64);
    chip.enroll(0, &mut [0; 1100]).unwrap();
    assert_eq!(
        chip.personalize(&line(1, Suite::CMAC64)),
        Err(Error::AlreadyPersonalized)
    );
}

#[test]
fn epoch_255_is_final() {
    let mut chip = SoftChip::new(Det(3));
    chip.personalize(&line(255, Suite::CMAC64)).unwrap();
    assert_eq!(
        chip.personalize(&line(0, Suite::CMAC64)),
        Err(Error::FinalEpoch)
    );
}

#[test]
fn blank_chip_refuses_everything() {
    let mut chip = SoftChip::new(Det(3));
    let mut buf = [0u8; 1100];
    assert_eq!(chip.enroll(0, &mut buf), Err(Error::NotPersonalized));
    assert_eq!(
        chip.auth(0, &Audience::CENTER, &mut buf),
        Err(Error::NotPersonalized)
    );
    assert_eq!(chip.accept_receipt(&[0; 40]), Err(Error::NotPersonalized));
    assert_eq!(chip.days_left(0), Err(Error::NotPersonalized));
}

#[test]
fn revoked_chip_refuses_everything() {
    let (mut chip, seed) = enrolled(Suite::CMAC64);
    let gw = chip.add_audience("gw").unwrap();
    let mut out = [0u8; 1100];
    let cmd = command(&seed, 0, ISSUED + 60, 1, Opcode::REVOKE);
    chip.handle_command(0, &cmd, &mut out).unwrap();
    assert_eq!(
        chip.auth(0, &Audience::CENTER, &mut out),
        Err(Error::Revoked)
    );
    assert_eq!(
        chip.auth_response(0, &[0; 16], &mut out),
        Err(Error::Revoked)
    );
    assert_eq!(chip.seal(0, &gw, &mut out, 4), Err(Error::Revoked));
    assert_eq!(chip.add_audience("x"), Err(Error::Revoked));
    assert_eq!(chip.days_left(0), Err(Error::Revoked));
    let cmd = command(&seed, 0, ISSUED + 70, 2, Opcode::UPDATE_SEED);
    assert_eq!(chip.handle_command(0, &cmd, &mut out), Err(Error::Revoked));
    // Revoked survives a restart.
    let mut image = [0u8; IMAGE_LEN];
    chip.to_image(&mut image);
    let mut chip = SoftChip::from_image(&image, Det(1)).unwrap();
    assert_eq!(
        chip.auth(0, &Audience::CENTER, &mut out),
        Err(Error::Revoked)
    );
}

#[test]
fn tampered_chip_wipes_keys_and_refuses_everything() {
    let (mut chip, seed) = enrolled(Suite::CMAC64);
    let gw = chip.add_audience("gw").unwrap();
    chip.tamper();
    let mut out = [0u8; 1100];
    assert_eq!(chip.status().life, Life::Tampered);
    assert_eq!(chip.status().generation, None);
    assert_eq!(
        chip.auth(0, &Audience::CENTER, &mut out),
        Err(Error::Tampered)
    );
    assert_eq!(
        chip.auth_response(0, &[0; 16], &mut out),
        Err(Error::Tampered)
    );
    assert_eq!(
        chip.sign(0, DataDigest::new(), &mut out),
        Err(Error::Tampered)
    );
    assert_eq!(chip.seal(0, &gw, &mut out, 4), Err(Error::Tampered));
    assert_eq!(chip.enroll(0, &mut out), Err(Error::Tampered));
    assert_eq!(chip.retransmit(&mut out), Err(Error::Tampered));
    assert_eq!(chip.days_left(0), Err(Error::Tampered));
    assert_eq!(chip.add_audience("x"), Err(Error::Tampered));
    let cmd = command(&seed, 0, ISSUED + 60, 1, Opcode::UPDATE_SEED);
    assert_eq!(chip.handle_command(0, &cmd, &mut out), Err(Error::Tampered));
    assert_eq!(
        chip.accept_receipt(&receipt(&seed, 0, ISSUED, 1, 0)),
        Err(Error::Tampered)
    );
    assert_eq!(
        chip.personalize(&line(1, Suite::CMAC64)),
        Err(Error::Tampered)
    );
    let mut image = [0u8; IMAGE_LEN];
    chip.to_image(&mut image);
    assert!(!image.windows(16).any(|w| w == &seed.expose()[..16]));
    assert!(!image.windows(16).any(|w| w == ktr(0).expose()));
    let mut chip = SoftChip::from_image(&image, Det(1)).unwrap();
    assert_eq!(chip.status().life, Life::Tampered);
    assert_eq!(
        chip.auth(0, &Audience::CENTER, &mut out),
        Err(Error::Tampered)
    );
}

#[test]
fn rejects_forged_receipt() {
    let mut chip = personalized(Suite::CMAC64);
    let mut buf = [0u8; 1100];
    let n = chip.enroll(0, &mut buf).unwrap();
    let (h, seed) = open(&buf[..n], EnrollKey::Transport(&ktr(0)));
    let mut rc = receipt(&seed, 0, ISSUED + 5, h.r, 0);
    let last = rc.len() - 1;
    rc[last] ^= 0x80;
    assert_eq!(chip.accept_receipt(&rc), Err(Error::Verification));
    // Made with the node's receipt key instead of the center's.
    let rc = receipt_as(&seed, Suite::CMAC64, 0, ISSUED + 5, h.r, 0, Sender::Node);
    assert_eq!(chip.accept_receipt(&rc), Err(Error::Verification));
    // Keyed by another seed.
    let other = KeySeed::from_bytes(&[1; 976], 2026);
    assert_eq!(
        chip.accept_receipt(&receipt(&other, 0, ISSUED + 5, h.r, 0)),
        Err(Error::Verification)
    );
    assert_eq!(chip.status().pending_generation, Some(0));
    assert_eq!(
        chip.status().node_time,
        ISSUED,
        "a refused receipt moves no time"
    );
    // An authentic refusal is reported and leaves the ENROLL pending.
    assert_eq!(
        chip.accept_receipt(&receipt(&seed, 0, ISSUED + 5, h.r, 7)),
        Err(Error::CenterRefused(7))
    );
    assert_eq!(chip.status().pending_generation, Some(0));
}

#[test]
fn rejects_receipt_for_message_not_pending() {
    let (mut chip, seed) = enrolled(Suite::CMAC64);
    let gw = chip.add_audience("gw").unwrap();
    let mut buf = [0u8; 64];
    // A relying party's AUTH and a SIGNATURE wait for no RECEIPT.
    let n = chip.auth(0, &gw, &mut buf).unwrap();
    let r = Auth::decode(&buf[..n]).unwrap().header.r;
    assert_eq!(
        chip.accept_receipt(&receipt(&seed, 0, ISSUED, r, 0)),
        Err(Error::NotPending)
    );
    let n = chip.sign(0, DataDigest::new(), &mut buf).unwrap();
    let r = Signature::decode(&buf[..n]).unwrap().header.r;
    assert_eq!(
        chip.accept_receipt(&receipt(&seed, 0, ISSUED, r, 0)),
        Err(Error::NotPending)
    );
    // An older AUTH to the center is superseded by the newer one.
    let n = chip.auth(0, &Audience::CENTER, &mut buf).unwrap();
    let old_r = Auth::decode(&buf[..n]).unwrap().header.r;
    let n = chip.auth(0, &Audience::CENTER, &mut buf).unwrap();
    let new_r = Auth::decode(&buf[..n]).unwrap().header.r;
    assert_eq!(
        chip.accept_receipt(&receipt(&seed, 0, ISSUED, old_r, 0)),
        Err(Error::NotPending)
    );
    assert!(
        chip.accept_receipt(&receipt(&seed, 0, ISSUED, new_r, 0))
            .is_ok()
    );
    assert_eq!(chip.retransmit(&mut buf), Err(Error::NothingToRetransmit));
}

#[test]
fn audiences_are_bounded_and_sealed_needs_one() {
    let (mut chip, _) = enrolled(Suite::CMAC64);
    for i in 0..MAX_AUDIENCES {
        chip.add_audience(&format!("rp-{i}")).unwrap();
    }
    assert!(chip.add_audience("rp-0").is_ok(), "adding again is a no-op");
    assert_eq!(
        chip.add_audience("one-too-many"),
        Err(Error::AudienceTableFull)
    );
    let gw = Audience::relying_party("rp-1");
    let mut buf = [0u8; 1100];
    assert_eq!(
        chip.seal(0, &Audience::CENTER, &mut buf, 4),
        Err(Error::CenterAudience)
    );
    let nobody = Audience::relying_party("nobody");
    assert_eq!(
        chip.seal(0, &nobody, &mut buf, 4),
        Err(Error::UnknownAudience)
    );
    assert_eq!(
        chip.seal(0, &gw, &mut buf, CLASS1_MAX_SEALED + 1),
        Err(Error::PlaintextTooLong)
    );
    assert_eq!(
        chip.seal(0, &gw, &mut buf[..40], 20),
        Err(Error::BufferTooSmall)
    );
    assert!(chip.seal(0, &gw, &mut [0; 1100], 1000).is_ok());
}

#[test]
fn entropy_failure_is_an_error() {
    let mut chip = SoftChip::new(Broken);
    chip.personalize(&line(0, Suite::CMAC64)).unwrap();
    assert_eq!(chip.enroll(0, &mut [0; 1100]), Err(Error::Entropy));
    assert_eq!(chip.status().pending_generation, None);
}

#[test]
fn debug_prints_no_key_bytes() {
    let (chip, seed) = enrolled(Suite::CMAC64);
    let text = format!("{chip:?} {:#?} {:?}", chip.status(), line(0, Suite::CMAC64));
    assert!(text.contains("<redacted>"));
    for key in [
        &ktr(0).expose()[..],
        &seed.expose()[..16],
        &seed.expose()[960..],
    ] {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let dec = format!("{:?}", &key[..4]);
        let dec = &dec[1..dec.len() - 1];
        assert!(!text.contains(&hex[..8]), "{text}");
        assert!(!text.contains(dec), "{text}");
    }
    let err = format!("{} {:?}", Error::Verification, Error::Verification);
    assert_eq!(err, "verification failed Verification");
}

/// A Class 1 build (no `forward-secret` feature) refuses a forward-secret
/// UPDATE_SEED_FS (v1.2) as an unknown opcode, before taking its counter:
/// it carries no P-256 code to answer it.
#[cfg(not(feature = "forward-secret"))]
#[test]
fn a_class_1_build_refuses_update_seed_fs() {
    let (mut chip, seed) = enrolled(Suite::CMAC64);
    let header = microcert_core::Header {
        suite: Suite::CMAC64,
        device: DEVICE,
        generation: 0,
        t: ISSUED + 60,
        r: 0xcccc_0000_0000_0001,
    };
    let mut cmd = [0u8; 128];
    let n = microcert_core::make_command_fs(&seed, &header, 1, &[2; 33], &mut cmd).unwrap();
    let mut reply = [0u8; 1100];
    assert_eq!(
        chip.handle_command(0, &cmd[..n], &mut reply),
        Err(Error::Malformed(microcert_core::Error::UnknownOpcode(3)))
    );
    assert_eq!(chip.status().highest_counter, 0);
    assert_eq!(chip.status().pending_generation, None);
}
