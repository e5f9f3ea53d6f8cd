//! The chip image: round trip, and every way a damaged image fails to load.

mod common;

use common::*;
use microcert_core::{Audience, Auth, DataDigest, Suite, verify_auth};
use microcert_node::{Error, IMAGE_LEN, IMAGE_VERSION, SecureChip, SoftChip};

fn image_of(chip: &SoftChip<Det>) -> [u8; IMAGE_LEN] {
    let mut image = [0u8; IMAGE_LEN];
    chip.to_image(&mut image);
    image
}

/// Recomputes the checksum after a deliberate edit (layout in src/image.rs:
/// SHA-256 of everything before the last 16 bytes, first 16 bytes of it).
fn reseal(image: &mut [u8; IMAGE_LEN]) {
    let body = IMAGE_LEN - 16;
    let sum = DataDigest::of(&image[..body]);
    image[body..].copy_from_slice(&sum[..16]);
}

#[test]
fn image_length_is_fixed_and_under_target() {
    // Version 2 (v1.2): 1,177 bytes of version 1 and the forward-secret
    // section (Qn, Kfs), in every build.
    assert_eq!(IMAGE_LEN, 1177 + 33 + 16);
    // Chip state target: under 1.2 KiB (1,228.8 bytes).
    const { assert!(IMAGE_LEN < 1229) };
}

#[test]
fn round_trip_keeps_the_seed_and_everything_else() {
    let (mut chip, seed) = enrolled(Suite::CMAC64);
    chip.add_audience("gw").unwrap();
    let image = image_of(&chip);
    let mut loaded = SoftChip::from_image(&image, Det(5)).unwrap();
    assert_eq!(loaded.status(), chip.status());
    assert!(!loaded.is_dirty(), "just loaded: nothing to save");
    assert_eq!(image_of(&loaded), image, "load then save is the identity");
    let mut buf = [0u8; 64];
    let n = loaded
        .auth(0, &Audience::relying_party("gw"), &mut buf)
        .unwrap();
    verify_auth(
        &seed,
        &Auth::decode(&buf[..n]).unwrap(),
        &Audience::relying_party("gw"),
    )
    .unwrap();
}

#[test]
fn blank_chip_round_trips() {
    let chip = SoftChip::new(Det(1));
    let image = image_of(&chip);
    let loaded = SoftChip::from_image(&image, Det(1)).unwrap();
    assert_eq!(loaded.status(), chip.status());
}

#[test]
fn rejects_truncated_image() {
    let (chip, _) = enrolled(Suite::CMAC64);
    let image = image_of(&chip);
    for len in [0, 3, 5, 100, IMAGE_LEN - 1] {
        assert_eq!(
            SoftChip::from_image(&image[..len], Det(1)).err(),
            Some(Error::ImageLength),
            "{len} bytes"
        );
    }
    let mut long = image.to_vec();
    long.push(0);
    assert_eq!(
        SoftChip::from_image(&long, Det(1)).err(),
        Some(Error::ImageLength)
    );
}

#[test]
fn rejects_flipped_bit_anywhere() {
    let (chip, _) = enrolled(Suite::CMAC64);
    let image = image_of(&chip);
    for i in 5..IMAGE_LEN {
        for bit in [0x01, 0x80] {
            let mut bad = image;
            bad[i] ^= bit;
            assert_eq!(
                SoftChip::from_image(&bad, Det(1)).err(),
                Some(Error::ImageChecksum),
                "byte {i} bit {bit:#x}"
            );
        }
    }
}

#[test]
fn rejects_wrong_version_and_magic() {
    let (chip, _) = enrolled(Suite::CMAC64);
    let mut image = image_of(&chip);
    assert_eq!(image[4], IMAGE_VERSION);
    image[4] = IMAGE_VERSION + 1;
    reseal(&mut image);
    assert_eq!(
        SoftChip::from_image(&image, Det(1)).err(),
        Some(Error::ImageVersion(IMAGE_VERSION + 1))
    );
    let mut image = image_of(&chip);
    image[0] = b'X';
    assert_eq!(
        SoftChip::from_image(&image, Det(1)).err(),
        Some(Error::ImageMagic)
    );
}

#[test]
fn rejects_inconsistent_image_with_valid_checksum() {
    let (chip, _) = enrolled(Suite::CMAC64);
    let image = image_of(&chip);
    // Offsets from the layout table in src/image.rs.
    let edits: [(usize, u8); 5] = [
        (5, 9),    // life byte out of range
        (5, 2),    // revoked, yet a seed flag is set
        (6, 0xff), // unknown flag bits
        (16, 3),   // suite 0x03 (reserved, unsupported)
        (1128, 5), // five audiences in a table of four
    ];
    for (offset, value) in edits {
        let mut bad = image;
        bad[offset] = value;
        reseal(&mut bad);
        assert_eq!(
            SoftChip::from_image(&bad, Det(1)).err(),
            Some(Error::ImageInvalid),
            "offset {offset} = {value}"
        );
    }
}
