//! The SP 800-90A DRBG's limits, error handling and health tests (section
//! 11.3): reseed counter limit, prediction resistance, entropy failure,
//! over-long requests and inputs, uninstantiate, redacted Debug.

use std::cell::Cell;

use microcert_core::drbg::{
    self, DEFAULT_RESEED_INTERVAL, Drbg, DrbgError, EntropySource, HmacDrbgState, MAX_INPUT_LEN,
    MAX_REQUEST_LEN, MAX_RESEED_INTERVAL,
};

/// Counts its calls; fails while `broken` is set. Bytes from a counter.
struct Counting {
    calls: Cell<usize>,
    broken: bool,
    next: u8,
}

impl Counting {
    fn new() -> Self {
        Counting {
            calls: Cell::new(0),
            broken: false,
            next: 1,
        }
    }
}

impl EntropySource for Counting {
    fn fill_entropy(&mut self, buf: &mut [u8]) -> Result<(), DrbgError> {
        self.calls.set(self.calls.get() + 1);
        if self.broken {
            return Err(DrbgError::Entropy);
        }
        for b in buf {
            *b = self.next;
            self.next = self.next.wrapping_mul(31).wrapping_add(7);
        }
        Ok(())
    }
}

#[test]
fn self_test_passes() {
    assert_eq!(drbg::self_test(), Ok(()));
}

#[test]
fn the_reseed_counter_limit_forces_a_reseed_from_the_source() {
    let mut src = Counting::new();
    let mut d = Drbg::instantiate(&mut src, b"", false).unwrap();
    assert_eq!(src.calls.get(), 1);
    d.set_reseed_interval(3).unwrap();
    let mut out = [0u8; 16];
    for _ in 0..3 {
        d.generate(&mut src, &mut out, false, b"").unwrap();
    }
    assert_eq!(src.calls.get(), 1, "no reseed within the interval");
    assert_eq!(d.reseed_counter(), 4);
    d.generate(&mut src, &mut out, false, b"").unwrap();
    assert_eq!(src.calls.get(), 2, "reseeded once the counter passed 3");
    assert_eq!(d.reseed_counter(), 2);

    // With the source broken when the limit is reached, nothing comes out.
    for _ in 0..2 {
        d.generate(&mut src, &mut out, false, b"").unwrap();
    }
    src.broken = true;
    out = [0xaa; 16];
    assert_eq!(
        d.generate(&mut src, &mut out, false, b""),
        Err(DrbgError::Entropy)
    );
    assert_eq!(out, [0; 16], "no output after a failed reseed");
}

#[test]
fn the_mechanism_refuses_to_generate_past_the_interval() {
    let mut s = HmacDrbgState::instantiate(&[1; 32], &[2; 16], b"");
    let mut out = [0u8; 32];
    s.generate(&mut out, b"", 1).unwrap();
    let mut untouched = [0x55u8; 32];
    assert_eq!(
        s.generate(&mut untouched, b"", 1),
        Err(DrbgError::ReseedRequired)
    );
    assert_eq!(untouched, [0x55; 32]);
    s.reseed(&[3; 32], b"");
    s.generate(&mut out, b"", 1).unwrap();
}

#[test]
fn reseed_interval_bounds() {
    let mut src = Counting::new();
    let mut d = Drbg::instantiate(&mut src, b"", false).unwrap();
    assert_eq!(d.set_reseed_interval(0), Err(DrbgError::ReseedInterval));
    assert_eq!(
        d.set_reseed_interval(MAX_RESEED_INTERVAL + 1),
        Err(DrbgError::ReseedInterval)
    );
    d.set_reseed_interval(MAX_RESEED_INTERVAL).unwrap();
    const { assert!(DEFAULT_RESEED_INTERVAL <= MAX_RESEED_INTERVAL) };
}

#[test]
fn prediction_resistance_reseeds_before_every_request() {
    let mut src = Counting::new();
    let mut d = Drbg::instantiate(&mut src, b"", false).unwrap();
    let mut out = [0u8; 32];
    d.generate(&mut src, &mut out, true, b"").unwrap();
    d.generate(&mut src, &mut out, true, b"").unwrap();
    assert_eq!(src.calls.get(), 3);
    let mut src = Counting::new();
    let mut d = Drbg::instantiate(&mut src, b"", true).unwrap();
    for _ in 0..3 {
        d.generate(&mut src, &mut out, false, b"").unwrap();
    }
    assert_eq!(src.calls.get(), 4, "PR at instantiation: every request");
    // A broken source: a prediction-resistant request outputs nothing.
    src.broken = true;
    out = [0x11; 32];
    assert_eq!(
        d.generate(&mut src, &mut out, false, b""),
        Err(DrbgError::Entropy)
    );
    assert_eq!(out, [0; 32]);
}

#[test]
fn a_failed_reseed_is_an_error_state_until_a_reseed_succeeds() {
    let mut src = Counting::new();
    let mut d = Drbg::instantiate(&mut src, b"", false).unwrap();
    src.broken = true;
    assert_eq!(d.reseed(&mut src, b""), Err(DrbgError::Entropy));
    let mut out = [0x77u8; 8];
    // Even without prediction resistance: the failed reseed must be
    // repaired first, so a broken source means no output.
    assert_eq!(
        d.generate(&mut src, &mut out, false, b""),
        Err(DrbgError::Entropy)
    );
    assert_eq!(out, [0; 8]);
    src.broken = false;
    let calls = src.calls.get();
    d.generate(&mut src, &mut out, false, b"").unwrap();
    assert_eq!(src.calls.get(), calls + 1, "the repair reseed");
    d.generate(&mut src, &mut out, false, b"").unwrap();
    assert_eq!(src.calls.get(), calls + 1, "and back to normal");
}

#[test]
fn instantiation_fails_without_entropy() {
    let mut src = Counting::new();
    src.broken = true;
    assert_eq!(
        Drbg::instantiate(&mut src, b"", false).err(),
        Some(DrbgError::Entropy)
    );
}

#[test]
fn over_long_requests_and_inputs_change_nothing() {
    let mut a_src = Counting::new();
    let mut b_src = Counting::new();
    let mut a = Drbg::instantiate(&mut a_src, b"p", false).unwrap();
    let mut b = Drbg::instantiate(&mut b_src, b"p", false).unwrap();
    let mut big = vec![0u8; MAX_REQUEST_LEN + 1];
    assert_eq!(
        a.generate(&mut a_src, &mut big, false, b""),
        Err(DrbgError::RequestTooLong)
    );
    let long = vec![0u8; MAX_INPUT_LEN + 1];
    let mut out = [0u8; 32];
    assert_eq!(
        a.generate(&mut a_src, &mut out, false, &long),
        Err(DrbgError::InputTooLong)
    );
    assert_eq!(a.reseed(&mut a_src, &long), Err(DrbgError::InputTooLong));
    assert_eq!(
        Drbg::instantiate(&mut Counting::new(), &long, false).err(),
        Some(DrbgError::InputTooLong)
    );
    // a saw three refused requests, b none: same next output.
    let mut oa = [0u8; 64];
    let mut ob = [0u8; 64];
    a.generate(&mut a_src, &mut oa, false, b"x").unwrap();
    b.generate(&mut b_src, &mut ob, false, b"x").unwrap();
    assert_eq!(oa, ob);
    assert_eq!(a_src.calls.get(), b_src.calls.get());
    // The longest request is served.
    let mut max = vec![0u8; MAX_REQUEST_LEN];
    a.generate(&mut a_src, &mut max, false, b"").unwrap();
    assert!(max.iter().any(|b| *b != 0));
}

#[test]
fn personalization_and_additional_input_change_the_output() {
    let mut o = [[0u8; 32]; 3];
    let mut s = Counting::new();
    Drbg::instantiate(&mut s, b"a", false)
        .unwrap()
        .generate(&mut s, &mut o[0], false, b"")
        .unwrap();
    let mut s = Counting::new();
    Drbg::instantiate(&mut s, b"b", false)
        .unwrap()
        .generate(&mut s, &mut o[1], false, b"")
        .unwrap();
    let mut s = Counting::new();
    Drbg::instantiate(&mut s, b"a", false)
        .unwrap()
        .generate(&mut s, &mut o[2], false, b"z")
        .unwrap();
    assert_ne!(o[0], o[1]);
    assert_ne!(o[0], o[2]);
}

#[test]
fn uninstantiate_zeroizes_and_debug_is_redacted() {
    let mut s = HmacDrbgState::instantiate(&[9; 32], &[8; 16], b"");
    assert!(!s.is_zeroized());
    let shown = format!("{s:?}");
    assert!(shown.contains("<redacted>"));
    assert!(
        !shown.chars().any(|c| c.is_ascii_digit() && c != '1'),
        "only the reseed counter (1) may show: {shown}"
    );
    s.uninstantiate();
    assert!(s.is_zeroized());
    assert_eq!(s.reseed_counter(), 0);

    let mut src = Counting::new();
    let d = Drbg::instantiate(&mut src, b"", false).unwrap();
    let shown = format!("{d:?}");
    assert!(shown.contains("<redacted>"), "{shown}");
    assert!(!shown.contains('['), "no byte array printed: {shown}");
}
