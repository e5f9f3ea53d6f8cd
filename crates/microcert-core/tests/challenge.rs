//! Stateless challenges: c || CMAC(Kchal, device || c || w)[0..8] with
//! w = floor(now / 60), valid in the window it was issued in and the next.

use microcert_core::{DeviceId, Error, Key128, challenge_window, check_challenge, make_challenge};

const DEVICE: DeviceId = DeviceId([1, 2, 3, 4, 5, 6, 7, 8]);
const C: [u8; 8] = [0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7];

fn kchal() -> Key128 {
    Key128::from_bytes([0x11; 16])
}

#[test]
fn window_is_the_minute() {
    assert_eq!(challenge_window(0), 0);
    assert_eq!(challenge_window(59), 0);
    assert_eq!(challenge_window(60), 1);
    assert_eq!(challenge_window(1_789_999_990), 29_833_333);
    assert_eq!(challenge_window(u32::MAX), 71_582_788);
}

#[test]
fn the_challenge_starts_with_c() {
    let ch = make_challenge(&kchal(), DEVICE, C, 1_000);
    assert_eq!(ch[..8], C);
}

#[test]
fn accepted_in_its_window_and_the_next_refused_after() {
    // Issued at 119 s (window 1): good until 179 s (window 2), not at 180 s.
    let ch = make_challenge(&kchal(), DEVICE, C, 119);
    for now in [60, 119, 120, 179] {
        assert_eq!(
            check_challenge(&kchal(), DEVICE, &ch, now),
            Ok(()),
            "now = {now}"
        );
    }
    for now in [0, 59, 180, 240, u32::MAX] {
        assert_eq!(
            check_challenge(&kchal(), DEVICE, &ch, now),
            Err(Error::Verification),
            "now = {now}"
        );
    }
}

#[test]
fn window_zero_has_no_previous_window() {
    // A challenge of window 0 is good in windows 0 and 1 only. (The check
    // no longer wraps to window u32::MAX below window 0; no u32 time can
    // issue such a challenge, so that change is not observable here.)
    let ch = make_challenge(&kchal(), DEVICE, C, 30);
    assert_eq!(check_challenge(&kchal(), DEVICE, &ch, 0), Ok(()));
    assert_eq!(check_challenge(&kchal(), DEVICE, &ch, 119), Ok(()));
    assert_eq!(
        check_challenge(&kchal(), DEVICE, &ch, 120),
        Err(Error::Verification)
    );
}

#[test]
fn bound_to_the_device_and_the_key() {
    let ch = make_challenge(&kchal(), DEVICE, C, 1_000);
    assert_eq!(
        check_challenge(&kchal(), DeviceId([1, 2, 3, 4, 5, 6, 7, 9]), &ch, 1_000),
        Err(Error::Verification)
    );
    assert_eq!(
        check_challenge(&Key128::from_bytes([0x12; 16]), DEVICE, &ch, 1_000),
        Err(Error::Verification)
    );
}

#[test]
fn a_different_c_with_the_same_mac_is_refused() {
    let mut ch = make_challenge(&kchal(), DEVICE, C, 1_000);
    ch[..8].copy_from_slice(&[0; 8]);
    assert_eq!(
        check_challenge(&kchal(), DEVICE, &ch, 1_000),
        Err(Error::Verification)
    );
}
