//! `Debug` of the secret types shows none of their bytes, in any rendering
//! a derived or careless `Debug` would use (hex either case, decimal list).

use microcert_core::csk::combine;
use microcert_core::{
    DeviceId, EnrollKey, Header, Key128, KeySeed, Purpose, SEED_LEN, Suite, derive_key,
    transport_key, working_key,
};

/// Fails when `shown` contains three consecutive bytes of `secret`, either
/// as one run of hex digits (any case) or as three consecutive numbers
/// separated by anything (decimal, hex with or without `0x`, padded or
/// not, on one line or several): every way `[u8]`'s `Debug` or a careless
/// hand-written one prints bytes.
fn assert_no_bytes(shown: &str, secret: &[u8]) {
    let compact: String = shown
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let compact = compact.to_lowercase();
    let tokens: Vec<&str> = shown
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .collect();
    let is = |token: &str, b: u8| {
        let hex = token.strip_prefix("0x").unwrap_or(token);
        token.parse::<u8>() == Ok(b) || u8::from_str_radix(hex, 16) == Ok(b)
    };
    for w in secret.windows(3) {
        assert!(
            !compact.contains(&hex::encode(w)),
            "{shown:?} shows secret bytes {w:02x?} as hex"
        );
        for t in tokens.windows(3) {
            assert!(
                !(is(t[0], w[0]) && is(t[1], w[1]) && is(t[2], w[2])),
                "{shown:?} shows secret bytes {w:02x?} as {t:?}"
            );
        }
    }
}

fn seed_bytes() -> [u8; SEED_LEN] {
    core::array::from_fn(|i| (i * 37 + 11) as u8)
}

#[test]
fn the_checker_catches_a_leak() {
    // The check above must be able to fail, or the tests below prove nothing.
    let secret = [0x12, 0xab, 0x07, 0x99];
    for leak in [
        format!("{secret:?}"),
        format!("{secret:x?}"),
        format!("{secret:02X?}"),
        format!("{secret:#?}"),
        format!("{secret:#04x?}"),
        format!(
            "Key({:02X}-{:02X}-{:02X}-{:02X})",
            secret[0], secret[1], secret[2], secret[3]
        ),
        hex::encode(secret),
    ] {
        let caught = std::panic::catch_unwind(|| assert_no_bytes(&leak, &secret));
        assert!(caught.is_err(), "{leak} not caught");
    }
}

#[test]
fn key_seed_debug_shows_no_byte() {
    let bytes = seed_bytes();
    let seed = KeySeed::from_bytes(&bytes, 2026);
    for shown in [format!("{seed:?}"), format!("{seed:#?}")] {
        assert_no_bytes(&shown, &bytes);
        assert!(shown.contains("KeySeed"));
    }
}

#[test]
fn key128_debug_shows_no_byte() {
    let bytes = [
        0x3c, 0x91, 0x07, 0xe4, 0x5a, 0xb2, 0x6d, 0x18, 0xf3, 0x29, 0x8e, 0x40, 0xc7, 0x15, 0x9b,
        0x62,
    ];
    let key = Key128::from_bytes(bytes);
    for shown in [format!("{key:?}"), format!("{key:#?}")] {
        assert_no_bytes(&shown, &bytes);
        assert!(shown.contains("Key128"));
    }
}

#[test]
fn derived_keys_debug_shows_no_byte() {
    let seed = KeySeed::from_bytes(&seed_bytes(), 2026);
    let header = Header {
        suite: Suite::CMAC64,
        device: DeviceId([1, 2, 3, 4, 5, 6, 7, 8]),
        generation: 0,
        t: 1_790_000_000,
        r: 0x0123_4567_89ab_cdef,
    };
    let k0 = combine(&seed, header.t, header.r).unwrap();
    let kauth = working_key(&seed, Purpose::Auth, &header).unwrap();
    let ktrans = Key128::from_bytes([0x5e; 16]);
    let ktr = transport_key(&ktrans, header.device, 0);
    let derived = derive_key(&k0, b"MC-SIGN", &header.context());
    for key in [&k0, &kauth, &ktr, &derived] {
        assert_no_bytes(&format!("{key:?}"), key.expose());
    }
    // Structures that hold a secret print it through the secret's Debug.
    assert_no_bytes(&format!("{:?}", EnrollKey::Transport(&ktr)), ktr.expose());
    assert_no_bytes(&format!("{:?}", EnrollKey::Update(&seed)), seed.expose());
}
