//! A whole node life, checked at every step with the core's functions as the
//! center would: personalize, enroll, AUTH, challenge and AUTH_RESPONSE,
//! SIGNATURE, SEALED, UPDATE_SEED, REVOKE.

mod common;

use common::*;
use microcert_core::{
    Audience, Auth, AuthResponse, CHALLENGE_LEN, DataDigest, EnrollKey, HEADER_LEN, Key128, Opcode,
    Receipt, Sender, Signature, Suite, check_challenge, make_challenge, open_in_place, verify_auth,
    verify_auth_response, verify_receipt, verify_signature,
};
use microcert_node::{Answered, Error, IMAGE_LEN, Life, SecureChip, SoftChip};

#[test]
fn whole_life() {
    // Personalize from a factory line.
    let mut chip = personalized(Suite::CMAC64);
    let st = chip.status();
    assert_eq!(st.life, Life::Personalized);
    assert_eq!(st.device, DEVICE);
    assert_eq!(st.node_time, ISSUED);
    assert_eq!(st.generation, None);
    assert_eq!(
        chip.auth(0, &Audience::CENTER, &mut [0; 64]),
        Err(Error::NotEnrolled)
    );

    // Enroll: a fresh seed under Ktr(device, 0), generation 0, base year 2026.
    let mut enroll = [0u8; 1100];
    let n = chip.enroll(0, &mut enroll).unwrap();
    assert_eq!(n, 23 + 978 + 8);
    let enroll = enroll[..n].to_vec();
    let (h, seed0) = open(&enroll, EnrollKey::Transport(&ktr(0)));
    assert_eq!((h.device, h.generation, h.t), (DEVICE, 0, ISSUED));
    assert_eq!(seed0.base_year(), 2026);
    assert_ne!(seed0.expose(), &[0u8; 976]);
    // Another epoch's Ktr does not open it.
    let msg = microcert_core::Enroll::decode(&enroll).unwrap();
    assert!(microcert_core::open_enroll(EnrollKey::Transport(&ktr(1)), &msg).is_err());
    // Not usable before the center's RECEIPT; enroll() again retransmits.
    assert_eq!(chip.status().pending_generation, Some(0));
    assert_eq!(
        chip.auth(0, &Audience::CENTER, &mut [0; 64]),
        Err(Error::NotEnrolled)
    );
    let mut again = [0u8; 1100];
    let m = chip.enroll(ISSUED + 100, &mut again).unwrap();
    assert_eq!(&again[..m], &enroll[..]);
    let rc = receipt(&seed0, 0, ISSUED + 10, h.r, 0);
    assert_eq!(
        chip.accept_receipt(&rc),
        Ok(Answered::Enrollment { generation: 0 })
    );
    assert_eq!(chip.accept_receipt(&rc), Err(Error::NotPending));
    assert_eq!(chip.status().generation, Some(0));
    assert_eq!(chip.status().node_time, ISSUED + 100);
    assert_eq!(chip.enroll(0, &mut again), Err(Error::AlreadyEnrolled));
    assert_eq!(chip.days_left(0), Ok(1562));

    // AUTH for the center: 31 bytes, verifies, mutual authentication by RECEIPT.
    let mut buf = [0u8; 64];
    let n = chip.auth(0, &Audience::CENTER, &mut buf).unwrap();
    assert_eq!(n, 31);
    let auth = Auth::decode(&buf[..n]).unwrap();
    assert_eq!(auth.header.t, ISSUED + 100, "no clock: the node time");
    verify_auth(&seed0, &auth, &Audience::CENTER).unwrap();
    let mut re = [0u8; 64];
    assert_eq!(chip.retransmit(&mut re), Ok(31));
    assert_eq!(re[..31], buf[..31]);
    let rc = receipt(&seed0, 0, ISSUED + 200, auth.header.r, 0);
    assert_eq!(chip.accept_receipt(&rc), Ok(Answered::Authentication));
    assert_eq!(chip.accept_receipt(&rc), Err(Error::NotPending));
    assert_eq!(chip.status().node_time, ISSUED + 200);

    // AUTH for a configured relying party; an unconfigured one is refused.
    let gw = chip.add_audience("acme-gateway").unwrap();
    assert_eq!(gw, Audience::relying_party("acme-gateway"));
    let n = chip.auth(ISSUED + 300, &gw, &mut buf).unwrap();
    let auth = Auth::decode(&buf[..n]).unwrap();
    assert_eq!(
        auth.header.t,
        ISSUED + 300,
        "a real-time clock moves time on"
    );
    verify_auth(&seed0, &auth, &gw).unwrap();
    assert!(verify_auth(&seed0, &auth, &Audience::CENTER).is_err());
    let other = Audience::relying_party("someone-else");
    assert_eq!(chip.auth(0, &other, &mut buf), Err(Error::UnknownAudience));

    // Challenge and AUTH_RESPONSE.
    let kchal = Key128::from_bytes([0x33; 16]);
    let challenge = make_challenge(&kchal, DEVICE, [5; 8], ISSUED + 300);
    let n = chip.auth_response(0, &challenge, &mut buf).unwrap();
    assert_eq!(n, 47);
    let resp = AuthResponse::decode(&buf[..n]).unwrap();
    check_challenge(&kchal, DEVICE, resp.challenge, ISSUED + 330).unwrap();
    verify_auth_response(&seed0, &resp, &Audience::CENTER).unwrap();
    let rc = receipt(&seed0, 0, ISSUED + 310, resp.header.r, 0);
    assert_eq!(chip.accept_receipt(&rc), Ok(Answered::Authentication));

    // SIGNATURE over data given in pieces.
    let mut digest = DataDigest::new();
    for piece in [&b"temperature="[..], b"21.5", b";humidity=40"] {
        digest.update(piece);
    }
    let n = chip.sign(0, digest, &mut buf).unwrap();
    assert_eq!(n, 31);
    let sig = Signature::decode(&buf[..n]).unwrap();
    let whole = DataDigest::of(b"temperature=21.5;humidity=40");
    verify_signature(&seed0, &sig, &whole).unwrap();
    assert!(verify_signature(&seed0, &sig, &DataDigest::of(b"temperature=99")).is_err());

    // SEALED in place for the relying party.
    let plaintext = b"reading 42";
    let mut sealed = [0u8; 64];
    sealed[HEADER_LEN..HEADER_LEN + plaintext.len()].copy_from_slice(plaintext);
    let n = chip.seal(0, &gw, &mut sealed, plaintext.len()).unwrap();
    assert_eq!(n, HEADER_LEN + plaintext.len() + 8);
    assert_ne!(&sealed[HEADER_LEN..HEADER_LEN + plaintext.len()], plaintext);
    let (_, opened) = open_in_place(&seed0, &mut sealed[..n], &gw).unwrap();
    assert_eq!(opened, plaintext);

    // Survives a restart through its image.
    let mut image = [0u8; IMAGE_LEN];
    chip.to_image(&mut image);
    let mut chip = SoftChip::from_image(&image, Det(77)).unwrap();
    assert_eq!(chip.status().generation, Some(0));

    // UPDATE_SEED: ENROLL of generation 1 under Kupd of seed 0.
    let cmd = command(&seed0, 0, ISSUED + 400, 1, Opcode::UPDATE_SEED);
    let mut reply = [0u8; 1100];
    let n = chip.handle_command(0, &cmd, &mut reply).unwrap();
    let update = reply[..n].to_vec();
    assert!(
        microcert_core::open_enroll(
            EnrollKey::Transport(&ktr(0)),
            &microcert_core::Enroll::decode(&update).unwrap()
        )
        .is_err(),
        "an update is not under Ktr"
    );
    let (h1, seed1) = open(&update, EnrollKey::Update(&seed0));
    assert_eq!((h1.generation, h1.t), (1, ISSUED + 400));
    assert_eq!(seed1.base_year(), 2026);
    assert!(seed1 != seed0, "a fresh seed");
    assert_eq!(chip.status().highest_counter, 1);
    assert_eq!(chip.status().pending_generation, Some(1));

    // The old seed stays in use until the RECEIPT for generation 1.
    let n = chip.auth(0, &Audience::CENTER, &mut buf).unwrap();
    let auth = Auth::decode(&buf[..n]).unwrap();
    assert_eq!(auth.header.generation, 0);
    verify_auth(&seed0, &auth, &Audience::CENTER).unwrap();

    // The RECEIPT got lost: the same bytes again, by retransmission, by a
    // restart from the image, and for a newer UPDATE_SEED.
    let mut again = [0u8; 1100];
    let m = chip.retransmit(&mut again).unwrap();
    assert_eq!(&again[..m], &update[..]);
    chip.to_image(&mut image);
    let mut chip = SoftChip::from_image(&image, Det(78)).unwrap();
    let m = chip.retransmit(&mut again).unwrap();
    assert_eq!(&again[..m], &update[..]);
    let cmd2 = command(&seed0, 0, ISSUED + 500, 2, Opcode::UPDATE_SEED);
    let m = chip.handle_command(0, &cmd2, &mut again).unwrap();
    assert_eq!(&again[..m], &update[..]);
    assert_eq!(
        chip.handle_command(0, &cmd2, &mut again),
        Err(Error::Replay)
    );

    // The RECEIPT for generation 1, keyed by the new seed: seed 0 is wiped.
    let rc_old_key = receipt(&seed0, 1, ISSUED + 600, h1.r, 0);
    assert_eq!(chip.accept_receipt(&rc_old_key), Err(Error::Verification));
    let rc = receipt(&seed1, 1, ISSUED + 600, h1.r, 0);
    assert_eq!(
        chip.accept_receipt(&rc),
        Ok(Answered::Enrollment { generation: 1 })
    );
    assert_eq!(chip.status().generation, Some(1));
    assert_eq!(chip.status().pending_generation, None);
    let n = chip.auth(0, &Audience::CENTER, &mut buf).unwrap();
    let auth = Auth::decode(&buf[..n]).unwrap();
    assert_eq!(auth.header.generation, 1);
    verify_auth(&seed1, &auth, &Audience::CENTER).unwrap();
    chip.to_image(&mut image);
    assert!(
        !image.windows(16).any(|w| w == &seed0.expose()[..16]),
        "seed 0 is gone from the chip state"
    );

    // REVOKE: a RECEIPT (node key, ref = the COMMAND's r), then nothing.
    let cmd = command(&seed1, 1, ISSUED + 700, 3, Opcode::REVOKE);
    let n = chip.handle_command(0, &cmd, &mut reply).unwrap();
    let rc = Receipt::decode(&reply[..n]).unwrap();
    assert_eq!(rc.reference, 0xcccc_0000_0000_0003, "ref = the COMMAND's r");
    assert_eq!(rc.status, 0);
    assert_eq!(rc.header.generation, 1);
    verify_receipt(&seed1, &rc, Sender::Node).unwrap();
    assert!(verify_receipt(&seed1, &rc, Sender::Center).is_err());
    assert_eq!(chip.status().life, Life::Revoked);
    assert_eq!(chip.status().generation, None);
    assert_eq!(
        chip.auth(0, &Audience::CENTER, &mut buf),
        Err(Error::Revoked)
    );
    assert_eq!(
        chip.sign(0, DataDigest::new(), &mut buf),
        Err(Error::Revoked)
    );
    assert_eq!(chip.enroll(0, &mut reply), Err(Error::Revoked));
    assert_eq!(
        chip.handle_command(0, &cmd, &mut reply),
        Err(Error::Revoked)
    );
    assert_eq!(chip.accept_receipt(&rc_old_key), Err(Error::Revoked));
    assert_eq!(chip.retransmit(&mut reply), Err(Error::Revoked));
    chip.to_image(&mut image);
    assert!(!image.windows(16).any(|w| w == &seed1.expose()[..16]));
    assert!(!image.windows(16).any(|w| w == ktr(0).expose()));

    // Re-personalization needs the next epoch; then a new seed under the
    // new Ktr, with the next generation (generations are never reused).
    assert_eq!(
        chip.personalize(&line(0, Suite::CMAC64)),
        Err(Error::AlreadyPersonalized)
    );
    assert_eq!(
        chip.personalize(&line(2, Suite::CMAC64)),
        Err(Error::AlreadyPersonalized)
    );
    chip.personalize(&line(1, Suite::CMAC64)).unwrap();
    assert_eq!(chip.status().epoch, 1);
    let n = chip.enroll(0, &mut reply).unwrap();
    let (h2, _) = open(&reply[..n], EnrollKey::Transport(&ktr(1)));
    assert_eq!(h2.generation, 2);
    assert_eq!(
        chip.status().highest_counter,
        3,
        "the counter is never reset"
    );
}

#[test]
fn suite_two_messages_have_16_byte_tags() {
    let (mut chip, seed) = enrolled(Suite::CMAC128);
    let mut buf = [0u8; 64];
    let n = chip.auth(0, &Audience::CENTER, &mut buf).unwrap();
    assert_eq!(n, 39);
    verify_auth(&seed, &Auth::decode(&buf[..n]).unwrap(), &Audience::CENTER).unwrap();
    let n = chip
        .auth_response(0, &[7; CHALLENGE_LEN], &mut buf)
        .unwrap();
    assert_eq!(n, 55, "the longest message kept for retransmission");
    let mut re = [0u8; 64];
    assert_eq!(chip.retransmit(&mut re), Ok(55));
    assert_eq!(re[..55], buf[..55]);
}

#[test]
fn every_r_carries_a_rising_persisted_counter() {
    let (mut chip, _) = enrolled(Suite::CMAC64);
    let mut image = [0u8; IMAGE_LEN];
    let mut buf = [0u8; 64];
    let mut last = 0u64;
    for i in 0..5 {
        chip.mark_persisted();
        let n = chip.auth(0, &Audience::CENTER, &mut buf).unwrap();
        assert!(
            chip.is_dirty(),
            "a message went out: the image must be saved"
        );
        chip.to_image(&mut image);
        // Restart with the same entropy every time: the counter still rises.
        chip = SoftChip::from_image(&image, Det(1)).unwrap();
        let r = Auth::decode(&buf[..n]).unwrap().header.r;
        assert!(r >> 32 > last >> 32, "step {i}");
        last = r;
    }
}

#[test]
fn expired_seed_is_refused_and_reenrolled_under_ktr() {
    let (mut chip, _) = enrolled(Suite::CMAC64);
    let mut buf = [0u8; 1100];
    assert_eq!(chip.days_left(YEAR_2031 - 86_400), Ok(1));
    assert!(
        chip.auth(YEAR_2031 - 1, &Audience::CENTER, &mut buf)
            .is_ok()
    );
    assert_eq!(
        chip.auth(YEAR_2031, &Audience::CENTER, &mut buf),
        Err(Error::SeedExpired)
    );
    // Time moved forward and stays there, whatever `now` says later.
    assert_eq!(
        chip.auth(0, &Audience::CENTER, &mut buf),
        Err(Error::SeedExpired)
    );
    assert_eq!(
        chip.sign(0, DataDigest::new(), &mut buf),
        Err(Error::SeedExpired)
    );
    assert_eq!(chip.days_left(0), Ok(0));
    // No usable seed: a fresh one under Ktr, next generation, base year 2031.
    let n = chip.enroll(0, &mut buf).unwrap();
    let (h, seed) = open(&buf[..n], EnrollKey::Transport(&ktr(0)));
    assert_eq!((h.generation, h.t, seed.base_year()), (1, YEAR_2031, 2031));
}

#[test]
fn command_under_the_new_seed_stands_in_for_a_lost_receipt() {
    let (mut chip, seed0) = enrolled(Suite::CMAC64);
    let mut out = [0u8; 1100];
    let cmd = command(&seed0, 0, ISSUED + 60, 1, Opcode::UPDATE_SEED);
    let n = chip.handle_command(0, &cmd, &mut out).unwrap();
    let (_, seed1) = open(&out[..n], EnrollKey::Update(&seed0));
    // The center accepted the ENROLL; its RECEIPT was lost; its next
    // COMMAND is keyed by generation 1, which proves it holds the new seed.
    let revoke = command(&seed1, 1, ISSUED + 120, 2, Opcode::REVOKE);
    let n = chip.handle_command(0, &revoke, &mut out).unwrap();
    let rc = Receipt::decode(&out[..n]).unwrap();
    assert_eq!(rc.header.generation, 1);
    verify_receipt(&seed1, &rc, Sender::Node).unwrap();
    assert_eq!(chip.status().life, Life::Revoked);
}

#[test]
fn command_time_moves_node_time_forward_only() {
    let (mut chip, seed) = enrolled(Suite::CMAC64);
    let mut out = [0u8; 1100];
    let cmd = command(&seed, 0, ISSUED + 5_000, 1, Opcode::UPDATE_SEED);
    chip.handle_command(0, &cmd, &mut out).unwrap();
    assert_eq!(chip.status().node_time, ISSUED + 5_000);
    // An older (but authentic, newer-counter) command does not move it back.
    let cmd = command(&seed, 0, ISSUED + 1_000, 2, Opcode::UPDATE_SEED);
    chip.handle_command(0, &cmd, &mut out).unwrap();
    assert_eq!(chip.status().node_time, ISSUED + 5_000);
}

/// PROTOCOL.md v1.1: an update ENROLL under Kupd is only ever the answer to
/// the center's UPDATE_SEED (the center refuses one it did not ask for).
/// `enroll()` never makes one: with a usable seed it refuses, and once the
/// seed no longer serves it enrolls under Ktr; only `handle_command` with
/// an UPDATE_SEED yields an ENROLL under Kupd.
#[test]
fn kupd_enroll_only_in_answer_to_update_seed() {
    let (mut chip, seed0) = enrolled(Suite::CMAC64);
    let mut out = [0u8; 1100];
    for now in [0, ISSUED + 60, YEAR_2031 - 86_400] {
        assert_eq!(chip.enroll(now, &mut out), Err(Error::AlreadyEnrolled));
    }
    let cmd = command(&seed0, 0, ISSUED + 120, 1, Opcode::UPDATE_SEED);
    let n = chip.handle_command(0, &cmd, &mut out).unwrap();
    let msg = microcert_core::Enroll::decode(&out[..n]).unwrap();
    assert!(microcert_core::open_enroll(EnrollKey::Update(&seed0), &msg).is_ok());
    assert!(microcert_core::open_enroll(EnrollKey::Transport(&ktr(0)), &msg).is_err());
    // enroll() now retransmits that same ENROLL, it never makes another.
    let mut again = [0u8; 1100];
    let m = chip.enroll(ISSUED + 180, &mut again).unwrap();
    assert_eq!(&again[..m], &out[..n]);
}
