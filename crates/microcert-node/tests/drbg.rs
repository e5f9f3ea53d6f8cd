//! The node's random numbers come from the SP 800-90A HMAC_DRBG of
//! microcert-core, instantiated from the chip's entropy source.
//!
//! Attack: an attacker who can read the TRNG's output while the chip makes
//! a seed update (a probe on the entropy source's bus, a debug trace of the
//! entropy driver) but not at power-up rebuilds the new seed from what
//! the TRNG delivered. With the TRNG output used directly as the seed
//! generator input, any 32-byte window of what it delivered during the
//! update is the input. With the DRBG, the output also depends on the state
//! instantiated at power-up, which the attacker did not see.

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use common::*;
use microcert_core::{EnrollKey, KeySeed, Opcode, SEED_LEN, Suite, kdf_ctr_cmac};
use microcert_node::{Entropy, EntropyFailure, Error, SecureChip, SoftChip};

/// A deterministic TRNG whose output is copied to `tap` while `on`.
#[derive(Debug, Clone)]
struct Tapped {
    inner: Rc<RefCell<Det>>,
    on: Rc<RefCell<bool>>,
    tap: Rc<RefCell<Vec<u8>>>,
    calls: Rc<RefCell<usize>>,
}

impl Entropy for Tapped {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyFailure> {
        self.inner.borrow_mut().fill(buf)?;
        *self.calls.borrow_mut() += 1;
        if *self.on.borrow() {
            self.tap.borrow_mut().extend_from_slice(buf);
        }
        Ok(())
    }
}

fn tapped() -> Tapped {
    Tapped {
        inner: Rc::new(RefCell::new(Det(0x9e37_79b9_7f4a_7c15))),
        on: Rc::new(RefCell::new(false)),
        tap: Rc::new(RefCell::new(Vec::new())),
        calls: Rc::new(RefCell::new(0)),
    }
}

/// The seed generator expansion of `seedgen.rs` (SP 800-108 counter KDF
/// over AES-128-CMAC keyed by the first half of the generator input), as an
/// attacker who read the firmware would run it.
fn expand(input: &[u8]) -> [u8; SEED_LEN] {
    let mut fixed = Vec::new();
    fixed.extend_from_slice(b"MC-NODE-SEED");
    fixed.push(0);
    fixed.extend_from_slice(&input[16..32]);
    fixed.extend_from_slice(&((SEED_LEN as u32) * 8).to_be_bytes());
    let mut out = [0u8; SEED_LEN];
    kdf_ctr_cmac(input[..16].try_into().unwrap(), &fixed, &mut out).unwrap();
    out
}

/// Enrolls generation 0 with the tap off, then answers UPDATE_SEED with
/// the tap on. Returns the new seed (as the center opens it) and the tap.
fn update_under_tap() -> (KeySeed, Vec<u8>) {
    let trng = tapped();
    let mut chip = SoftChip::new(trng.clone());
    chip.personalize(&line(0, Suite::CMAC64)).unwrap();
    let mut buf = [0u8; 1100];
    let n = chip.enroll(0, &mut buf).unwrap();
    let (h, seed0) = open(&buf[..n], EnrollKey::Transport(&ktr(0)));
    let rc = receipt(&seed0, 0, h.t + 5, h.r, 0);
    chip.accept_receipt(&rc).unwrap();

    *trng.on.borrow_mut() = true;
    let cmd = command(&seed0, 0, ISSUED + 120, 1, Opcode::UPDATE_SEED);
    let n = chip.handle_command(0, &cmd, &mut buf).unwrap();
    let (_, seed1) = open(&buf[..n], EnrollKey::Update(&seed0));
    let tap = trng.tap.borrow().clone();
    (seed1, tap)
}

#[test]
fn trng_output_seen_during_an_update_does_not_give_the_new_seed() {
    let (seed1, tap) = update_under_tap();
    // The chip did draw fresh entropy for the new seed (prediction
    // resistance: a reseed from the TRNG before the seed is generated).
    assert!(tap.len() >= 32, "no entropy drawn during the update");
    for start in 0..=tap.len() - 32 {
        let guess = expand(&tap[start..start + 32]);
        assert!(
            &guess != seed1.expose(),
            "the new seed is the expansion of TRNG bytes {start}..{}",
            start + 32
        );
    }
}

#[test]
fn the_seed_depends_on_the_entropy_source() {
    // Same TRNG stream, same seeds (the test source is deterministic);
    // another TRNG stream, another seed.
    let (a, _) = update_under_tap();
    let (b, _) = update_under_tap();
    assert!(a == b);
    let mut chip = SoftChip::new(Det(1));
    chip.personalize(&line(0, Suite::CMAC64)).unwrap();
    let mut buf = [0u8; 1100];
    let n = chip.enroll(0, &mut buf).unwrap();
    let (_, other) = open(&buf[..n], EnrollKey::Transport(&ktr(0)));
    assert!(other != a);
}

#[test]
fn the_drbg_is_not_in_the_image_and_is_instantiated_anew_after_a_reload() {
    // A chip reloaded from its image instantiates a new DRBG (48 bytes of
    // entropy input and nonce) at its first draw: no DRBG state comes back
    // from storage, so an old image cannot replay its output. Later draws
    // without prediction resistance take nothing from the TRNG.
    let trng = tapped();
    let mut chip = SoftChip::new(trng.clone());
    chip.personalize(&line(0, Suite::CMAC64)).unwrap();
    let mut buf = [0u8; 1100];
    let n = chip.enroll(0, &mut buf).unwrap();
    let (h, seed0) = open(&buf[..n], EnrollKey::Transport(&ktr(0)));
    chip.accept_receipt(&receipt(&seed0, 0, h.t + 5, h.r, 0))
        .unwrap();
    let mut image = [0u8; microcert_node::IMAGE_LEN];
    chip.to_image(&mut image);

    let mut loaded = SoftChip::from_image(&image, trng.clone()).unwrap();
    *trng.on.borrow_mut() = true;
    let aud = microcert_core::Audience::CENTER;
    let a = loaded.auth(ISSUED + 60, &aud, &mut buf).unwrap();
    let first = buf[..a].to_vec();
    assert_eq!(
        trng.tap.borrow().len(),
        48,
        "one instantiation after reload"
    );
    let b = loaded.auth(ISSUED + 61, &aud, &mut buf).unwrap();
    assert_eq!(trng.tap.borrow().len(), 48, "no entropy drawn for an r");
    assert_ne!(&first[..], &buf[..b]);

    // Reloading the same image again gives a DRBG from new entropy: the r
    // of the same message differs from the first reload's.
    let mut again = SoftChip::from_image(&image, trng.clone()).unwrap();
    let c = again.auth(ISSUED + 60, &aud, &mut buf).unwrap();
    assert_eq!(trng.tap.borrow().len(), 96);
    assert_ne!(&first[..], &buf[..c], "a reloaded image replayed an r");
}

#[test]
fn a_failing_trng_after_power_up_stops_seed_generation() {
    // Entropy source that works for the first `budget` calls, then fails.
    struct Dying(Det, usize);
    impl Entropy for Dying {
        fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyFailure> {
            if self.1 == 0 {
                return Err(EntropyFailure);
            }
            self.1 -= 1;
            self.0.fill(buf)
        }
    }
    // One call is enough to instantiate the DRBG; the seed's prediction
    // resistance reseed must then fail rather than fall back to the state.
    let mut chip = SoftChip::new(Dying(Det(7), 1));
    chip.personalize(&line(0, Suite::CMAC64)).unwrap();
    assert_eq!(chip.enroll(0, &mut [0; 1100]), Err(Error::Entropy));
    assert!(chip.status().pending_generation.is_none());
}
