//! A `#![no_std]` staticlib that links microcert-core and microcert-node
//! and calls into both, so that their whole dependency tree is compiled
//! and linked without std or an allocator (see Cargo.toml).

#![no_std]

use core::panic::PanicInfo;

use microcert_core::{
    Audience, Auth, DataDigest, DeviceId, Header, KeySeed, SEED_LEN, Suite, make_auth, verify_auth,
};
use microcert_node::{EntropyFailure, SecureChip, SoftChip};

// A second `panic_impl` lang item: std brings its own, so this conflicts
// with std anywhere in the tree.
#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    loop {}
}

/// Makes and verifies an AUTH under a seed of `fill` bytes; returns its
/// length, or 0 when anything failed.
#[unsafe(no_mangle)]
pub extern "C" fn microcert_nostd_auth(fill: u8, t: u32, r: u64) -> usize {
    let seed = KeySeed::from_bytes(&[fill; SEED_LEN], 2026);
    let header = Header {
        suite: Suite::CMAC64,
        device: DeviceId([1, 2, 3, 4, 5, 6, 7, 8]),
        generation: 0,
        t,
        r,
    };
    let mut buf = [0u8; 64];
    let Ok(n) = make_auth(&seed, &header, &Audience::CENTER, &mut buf) else {
        return 0;
    };
    match Auth::decode(&buf[..n]).and_then(|m| verify_auth(&seed, &m, &Audience::CENTER)) {
        Ok(()) => n,
        Err(_) => 0,
    }
}

/// SHA-256 of signed data through the core's incremental digest.
#[unsafe(no_mangle)]
pub extern "C" fn microcert_nostd_digest_first_byte(byte: u8) -> u8 {
    DataDigest::of(&[byte; 100])[0]
}

/// The node's software chip: asks an unpersonalized chip for an AUTH,
/// which it must refuse; returns 1 when it did.
#[unsafe(no_mangle)]
pub extern "C" fn microcert_nostd_node_refuses(now: u32) -> u8 {
    let mut chip = SoftChip::new(|buf: &mut [u8]| -> Result<(), EntropyFailure> {
        buf.fill(0x5a);
        Ok(())
    });
    let mut out = [0u8; 64];
    u8::from(chip.auth(now, &Audience::CENTER, &mut out).is_err())
}
