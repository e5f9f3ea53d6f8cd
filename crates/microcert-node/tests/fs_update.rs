//! The node's half of the forward-secret seed update (protocol v1.2,
//! feature `forward-secret`): the chip answers UPDATE_SEED_FS with an
//! EnrollFs whose seed only the holder of the center's ephemeral key can
//! open, resends the identical bytes (also after a restart from its image)
//! until the RECEIPT, and keeps no ephemeral material after it.

mod common;

use common::*;
use microcert_core::fs::{EphemeralKey, FsBinding};
use microcert_core::{
    Audience, Auth, Command, EnrollFs, EnrollKey, Header, Key128, Opcode, Sender, Suite,
    make_command_fs, open_enroll, open_enroll_fs, verify_auth, verify_enroll_fs,
};
use microcert_node::{Error, IMAGE_LEN, IMAGE_VERSION, SecureChip, SoftChip};

fn center_key() -> EphemeralKey {
    EphemeralKey::from_candidate(&[0x42; 32]).unwrap()
}

fn command_fs(
    seed: &microcert_core::KeySeed,
    suite: Suite,
    t: u32,
    counter: u32,
    qc: &[u8; 33],
) -> Vec<u8> {
    let header = Header {
        suite,
        device: DEVICE,
        generation: 0,
        t,
        r: 0xcccc_0000_0000_0000 | u64::from(counter),
    };
    let mut out = vec![0u8; 128];
    let n = make_command_fs(seed, &header, counter, qc, &mut out).unwrap();
    out.truncate(n);
    out
}

/// Kfs as the center derives it from its ephemeral key.
fn center_kfs(dc: &EphemeralKey, cmd: &[u8], enroll: &EnrollFs<'_>) -> Key128 {
    let c = Command::decode(cmd).unwrap();
    let binding = FsBinding {
        device: DEVICE,
        new_generation: enroll.header.generation,
        command_r: c.header.r,
        enroll_r: enroll.header.r,
        center_public: dc.public(),
        node_public: enroll.ephemeral,
    };
    dc.transport_key(enroll.ephemeral, &binding).unwrap()
}

#[test]
fn the_chip_answers_update_seed_fs_and_only_the_center_opens_the_new_seed() {
    for suite in [Suite::CMAC64, Suite::CMAC128] {
        let (mut chip, seed0) = enrolled(suite);
        assert_eq!(IMAGE_VERSION, 2);
        let dc = center_key();
        let cmd = command_fs(&seed0, suite, ISSUED + 400, 1, dc.public());
        let mut reply = [0u8; 1100];
        let n = chip.handle_command(0, &cmd, &mut reply).unwrap();
        let update = reply[..n].to_vec();
        assert_eq!(update.len(), 23 + 33 + 978 + 2 * suite.tag_len());
        let msg = EnrollFs::decode(&update).unwrap();
        assert_eq!(msg.header.generation, 1);
        verify_enroll_fs(&seed0, &msg).unwrap();
        let kfs = center_kfs(&dc, &cmd, &msg);
        let seed1 = open_enroll_fs(&kfs, &msg).unwrap();
        assert!(seed1 != seed0);
        // Not a v1.1 ENROLL: Kupd alone does not open it.
        let v11 = microcert_core::Enroll {
            header: msg.header,
            ciphertext: msg.ciphertext,
            tag: msg.ccm_tag,
        };
        assert!(open_enroll(EnrollKey::Update(&seed0), &v11).is_err());
        // Another center key (a thief's guess) gives another Kfs.
        let other = EphemeralKey::from_candidate(&[0x43; 32]).unwrap();
        assert!(open_enroll_fs(&center_kfs(&other, &cmd, &msg), &msg).is_err());

        // Lost RECEIPT: identical bytes by retransmission, after a restart
        // from the image, and for the COMMAND served again later.
        let mut again = [0u8; 1100];
        let m = chip.retransmit(&mut again).unwrap();
        assert_eq!(&again[..m], &update[..]);
        let mut image = [0u8; IMAGE_LEN];
        chip.to_image(&mut image);
        let mut chip = SoftChip::from_image(&image, Det(99)).unwrap();
        let m = chip.retransmit(&mut again).unwrap();
        assert_eq!(&again[..m], &update[..]);
        let cmd2 = command_fs(&seed0, suite, ISSUED + 500, 2, dc.public());
        let m = chip.handle_command(0, &cmd2, &mut again).unwrap();
        assert_eq!(&again[..m], &update[..]);

        // The RECEIPT keyed by the new seed commits it; the image then
        // holds no forward-secret material (Qn and Kfs zero).
        let rc = receipt_as(
            &seed1,
            suite,
            1,
            ISSUED + 600,
            msg.header.r,
            0,
            Sender::Center,
        );
        chip.accept_receipt(&rc).unwrap();
        assert_eq!(chip.status().generation, Some(1));
        chip.to_image(&mut image);
        assert_eq!(image[1161..1210], [0u8; 49]);
        let mut buf = [0u8; 64];
        let n = chip.auth(0, &Audience::CENTER, &mut buf).unwrap();
        verify_auth(&seed1, &Auth::decode(&buf[..n]).unwrap(), &Audience::CENTER).unwrap();
    }
}

#[test]
fn a_bad_center_key_or_tag_is_refused_and_changes_nothing() {
    let (mut chip, seed0) = enrolled(Suite::CMAC64);
    let dc = center_key();
    // A public key not on the curve, under a valid tag (a center bug):
    // refused, nothing pending.
    let mut bad = *dc.public();
    bad[0] = 0x05;
    let cmd = command_fs(&seed0, Suite::CMAC64, ISSUED + 400, 1, &bad);
    let mut reply = [0u8; 1100];
    assert!(chip.handle_command(0, &cmd, &mut reply).is_err());
    assert_eq!(chip.status().pending_generation, None);
    // A key changed in transit breaks the COMMAND's tag.
    let mut cmd = command_fs(&seed0, Suite::CMAC64, ISSUED + 410, 2, dc.public());
    cmd[23 + 5 + 10] ^= 1;
    assert_eq!(
        chip.handle_command(0, &cmd, &mut reply),
        Err(Error::Verification)
    );
    assert_eq!(chip.status().pending_generation, None);
    // Too small a buffer: refused before the counter is taken.
    let cmd = command_fs(&seed0, Suite::CMAC64, ISSUED + 420, 3, dc.public());
    let mut small = [0u8; 1009];
    assert_eq!(
        chip.handle_command(0, &cmd, &mut small),
        Err(Error::BufferTooSmall)
    );
    assert!(chip.handle_command(0, &cmd, &mut reply).is_ok());
    let _ = Opcode::UPDATE_SEED_FS;
}

/// A version 1 image (a chip saved before this build) is still read.
#[test]
fn a_version_1_image_is_read() {
    let (chip, _) = enrolled(Suite::CMAC64);
    let mut image = [0u8; IMAGE_LEN];
    chip.to_image(&mut image);
    // Make the version 1 form: version byte 1, no forward-secret section.
    let mut v1 = image[..1161].to_vec();
    v1[4] = 1;
    let sum = microcert_core::DataDigest::of(&v1);
    v1.extend_from_slice(&sum[..16]);
    let back = SoftChip::from_image(&v1, Det(5)).unwrap();
    assert_eq!(back.status().generation, Some(0));
}
