//! Fixtures, the ECDSA P-256 baseline and a small timing loop shared by the
//! microcert benchmarks (`cargo bench -p microcert-bench`) and the quick
//! `verify_rate` example.
//!
//! The criterion benches measure each operation on its own. The ratio
//! against ECDSA is measured again here, by [`compare`], in the same
//! process with interleaved batches: the two figures then share whatever
//! else the machine is doing at the time, which matters on a shared
//! 2-core box, and the ratio never depends on which criterion reports
//! happen to exist on disk.

pub mod ecdsa;
pub mod fixtures;
pub mod fleet;
pub mod timing;

/// Sizes of the certificate a device would present instead, from
/// draft-ietf-cose-cbor-encoded-cert (C509), Appendix A.1 "Example: RFC 7925
/// profiled X.509 Certificate" and its A.1.1 "Example: C509 Certificate
/// Encoding". Not computed here: quoted from the draft.
pub mod sizes {
    /// DER encoding of the draft's RFC 7925 profiled X.509 certificate.
    pub const X509_RFC7925_DER: usize = 316;
    /// The same certificate re-encoded as C509 (unwrapped CBOR sequence).
    pub const C509_RFC7925: usize = 140;
    /// Length of an ECDSA P-256 signature in the fixed r || s form.
    pub const ECDSA_P256_FIXED_SIG: usize = 64;
}

pub mod ratio;
pub mod targets;
