//! The headline comparison: a server checking a device's ECDSA P-256
//! signature against microcert checking an AUTH (suite 0x01) whose seed it
//! already holds in memory (the warm path).

use microcert_core::{Audience, Auth, Suite, verify_auth};

use crate::ecdsa::Baseline;
use crate::{fixtures, sizes, timing};

/// The target of ARCHITECTURE.md: ECDSA at least this many times slower.
pub const TARGET_RATIO: f64 = 40.0;

/// Both timings of one comparison run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// ECDSA P-256 verification (ring), nanoseconds.
    pub ecdsa_ns: f64,
    /// microcert decode + verify of an AUTH, suite 0x01, seed in memory, ns.
    pub auth_ns: f64,
}

impl Comparison {
    /// How many times slower ECDSA is.
    pub fn ratio(&self) -> f64 {
        self.ecdsa_ns / self.auth_ns
    }

    /// The report printed at the end of `cargo bench`.
    pub fn report(&self) -> String {
        let auth_len = fixtures::auth(Suite::CMAC64).map_or(0, |m| m.len());
        format!(
            "ratio: ECDSA P-256 verify / microcert AUTH verify = {:.0}x (target >= {:.0}x): {}\n\
             \x20 ECDSA P-256 verify (ring, 300-byte message): {:.0} ns = {} /s/core\n\
             \x20 microcert AUTH verify (suite 0x01, seed in memory): {:.0} ns = {} /s/core\n\
             sizes: AUTH suite 0x01 {} bytes; RFC 7925 X.509 certificate {} bytes (DER), \
             its C509 form {} bytes (draft-ietf-cose-cbor-encoded-cert, Appendix A.1)",
            self.ratio(),
            TARGET_RATIO,
            if self.ratio() >= TARGET_RATIO {
                "met"
            } else {
                "NOT met"
            },
            self.ecdsa_ns,
            timing::grouped(timing::per_second(self.ecdsa_ns)),
            self.auth_ns,
            timing::grouped(timing::per_second(self.auth_ns)),
            auth_len,
            sizes::X509_RFC7925_DER,
            sizes::C509_RFC7925,
        )
    }
}

/// Times both in one process, batches interleaved, `rounds` batches each
/// (about 10 ms a batch).
pub fn measure(rounds: usize) -> Result<Comparison, Box<dyn std::error::Error>> {
    let baseline = Baseline::new()?;
    let seed = fixtures::seed();
    let auth = fixtures::auth(Suite::CMAC64)?;
    let bytes = auth.bytes();
    let check = || {
        Auth::decode(std::hint::black_box(bytes))
            .and_then(|m| verify_auth(&seed, &m, &Audience::CENTER))
            .is_ok()
    };
    if !check() || !baseline.verify() {
        return Err("a fixture does not verify".into());
    }
    let (ecdsa_ns, auth_ns) = timing::compare(|| baseline.verify(), check, rounds);
    Ok(Comparison { ecdsa_ns, auth_ns })
}
