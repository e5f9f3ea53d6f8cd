//! Arbitrary input never panics the chip: every parser path returns an error.

mod common;

use common::*;
use microcert_core::Suite;
use microcert_node::{IMAGE_LEN, SecureChip, SoftChip};
use proptest::prelude::*;

proptest! {
    #[test]
    fn arbitrary_receipts_and_commands(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        let (mut chip, _) = enrolled(Suite::CMAC64);
        let before = chip.status();
        prop_assert!(chip.accept_receipt(&bytes).is_err());
        prop_assert!(chip.handle_command(0, &bytes, &mut [0; 1100]).is_err());
        prop_assert_eq!(chip.status(), before);
    }

    #[test]
    fn well_formed_headers_with_random_tags(tail in proptest::collection::vec(any::<u8>(), 17..=17), ty in 6u8..=7) {
        // A valid header for this device and generation, then random bytes.
        let (mut chip, _) = enrolled(Suite::CMAC64);
        let mut msg = vec![0x10 | ty, 0x01];
        msg.extend_from_slice(&DEVICE.0);
        msg.push(0);
        msg.extend_from_slice(&(ISSUED + 9).to_be_bytes());
        msg.extend_from_slice(&[0; 8]);
        msg.extend_from_slice(&tail[..if ty == 6 { 13 } else { 17 }]);
        prop_assert!(chip.accept_receipt(&msg).is_err());
        prop_assert!(chip.handle_command(0, &msg, &mut [0; 1100]).is_err());
    }

    #[test]
    fn arbitrary_images(bytes in proptest::collection::vec(any::<u8>(), IMAGE_LEN..=IMAGE_LEN), head in any::<bool>()) {
        let mut bytes = bytes;
        if head {
            bytes[..5].copy_from_slice(b"MCNI\x01");
        }
        prop_assert!(SoftChip::from_image(&bytes, Det(1)).is_err());
    }
}
