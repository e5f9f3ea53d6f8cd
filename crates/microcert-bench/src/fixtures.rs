//! Fixed inputs: one seed, one header per suite, ready-made messages.
//!
//! The seed bytes are a fixed pattern, not random: a benchmark must do the
//! same work on every run, and no real key is ever involved.

use microcert_core::{
    Audience, DataDigest, DeviceId, HEADER_LEN, Header, KeySeed, Result, SEED_LEN, Suite,
    make_auth, make_signature, seal,
};

/// Calendar year of the fixture seed's first year row.
pub const BASE_YEAR: u16 = 2026;
/// 2026-09-21T21:20:00Z: inside the seed's first year.
pub const T: u32 = 1_790_025_600;
/// The fixture device.
pub const DEVICE: DeviceId = DeviceId([0x02, 0x00, 0x5e, 0xff, 0xfe, 0x10, 0x20, 0x30]);
/// Length of the SEALED plaintext the benches use.
pub const SEALED_PLAINTEXT: usize = 64;
/// Length of the data a SIGNATURE covers in the benches.
pub const SIGNED_DATA: usize = 1024;
/// Longest message the fixtures build (a SEALED of 64 bytes, 16-byte tag).
pub const MAX_MSG: usize = HEADER_LEN + SEALED_PLAINTEXT + 16;

/// Byte i of a fixed pattern: (mul * i + add) mod 256.
pub fn pattern<const N: usize>(mul: usize, add: usize) -> [u8; N] {
    core::array::from_fn(|i| ((i * mul + add) % 256) as u8)
}

/// The fixture seed.
pub fn seed() -> KeySeed {
    KeySeed::from_bytes(&pattern::<SEED_LEN>(37, 11), BASE_YEAR)
}

/// A seed that differs per `n`, for many devices.
pub fn seed_n(n: u64) -> KeySeed {
    KeySeed::generate(BASE_YEAR, |b| {
        let k = n.to_be_bytes();
        for (i, x) in b.iter_mut().enumerate() {
            *x = ((i * 37 + 11) as u8) ^ k[i % 8];
        }
    })
}

/// A header of `suite` for the fixture device at time [`T`] with random
/// number `r`.
pub fn header(suite: Suite, r: u64) -> Header {
    Header {
        suite,
        device: DEVICE,
        generation: 0,
        t: T,
        r,
    }
}

/// The relying party SEALED messages are addressed to.
pub fn relying_party() -> Audience {
    Audience::relying_party("bench.example")
}

/// A message in a fixed buffer, with its length.
#[derive(Debug, Clone, Copy)]
pub struct Msg {
    buf: [u8; MAX_MSG],
    len: usize,
}

impl Msg {
    /// The message bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty message (never, for the fixtures).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn build(f: impl FnOnce(&mut [u8]) -> Result<usize>) -> Result<Msg> {
    let mut buf = [0u8; MAX_MSG];
    let len = f(&mut buf)?;
    Ok(Msg { buf, len })
}

/// An AUTH of the fixture seed for the center.
pub fn auth(suite: Suite) -> Result<Msg> {
    build(|out| {
        make_auth(
            &seed(),
            &header(suite, 0x0123_4567_89ab_cdef),
            &Audience::CENTER,
            out,
        )
    })
}

/// A SEALED of 64 fixed bytes for [`relying_party`].
pub fn sealed(suite: Suite) -> Result<Msg> {
    let pt = pattern::<SEALED_PLAINTEXT>(3, 1);
    build(|out| {
        seal(
            &seed(),
            &header(suite, 0x1122_3344_5566_7788),
            &relying_party(),
            &pt,
            out,
        )
    })
}

/// The 1 KiB of data the SIGNATURE benches cover.
pub fn signed_data() -> [u8; SIGNED_DATA] {
    pattern::<SIGNED_DATA>(7, 5)
}

/// A SIGNATURE of the fixture seed over [`signed_data`].
pub fn signature(suite: Suite) -> Result<Msg> {
    let digest = DataDigest::of(&signed_data());
    build(|out| make_signature(&seed(), &header(suite, 0x8899_aabb_ccdd_eeff), &digest, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use microcert_core::{Auth, verify_auth};

    #[test]
    fn auth_suite_01_is_31_bytes() {
        // ARCHITECTURE.md: "AUTH micro-certificate size, suite 0x01 | 31 bytes".
        assert_eq!(auth(Suite::CMAC64).unwrap().len(), 31);
        assert_eq!(auth(Suite::CMAC128).unwrap().len(), 39);
    }

    #[test]
    fn t_is_in_the_first_seed_year() {
        // 2026-09-21T21:20:00Z, checked by hand: 20,717 days after
        // 1970-01-01 plus 76,800 s.
        assert_eq!(T, 20_717 * 86_400 + 76_800);
    }

    #[test]
    fn fixture_auth_fails_under_another_seed() {
        let m = auth(Suite::CMAC64).unwrap();
        let msg = Auth::decode(m.bytes()).unwrap();
        assert!(verify_auth(&seed(), &msg, &Audience::CENTER).is_ok());
        assert!(verify_auth(&seed_n(1), &msg, &Audience::CENTER).is_err());
    }
}
