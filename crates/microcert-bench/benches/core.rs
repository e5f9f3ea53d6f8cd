//! Protocol core against the ECDSA P-256 baseline, in one run:
//!
//! ```text
//! cargo bench -p microcert-bench --bench core -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! After criterion's reports it times ECDSA verification and AUTH
//! verification once more, interleaved in this process, and prints
//! "ratio: ECDSA P-256 verify / microcert AUTH verify = NNx (target >= 40x)".

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use microcert_bench::ecdsa::Baseline;
use microcert_bench::fixtures::{self, SEALED_PLAINTEXT};
use microcert_bench::ratio;
use microcert_core::csk::combine;
use microcert_core::{
    Audience, Auth, DataDigest, HEADER_LEN, Purpose, Signature, Suite, derive_key, make_auth,
    make_signature, open_in_place, seal, verify_auth, verify_signature,
};

const SUITES: [(Suite, &str); 2] = [(Suite::CMAC64, "0x01"), (Suite::CMAC128, "0x02")];

fn key_schedule(c: &mut Criterion) {
    let seed = fixtures::seed();
    let h = fixtures::header(Suite::CMAC64, 0x0123_4567_89ab_cdef);
    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Elements(1));
    g.bench_function("csk_combine", |b| {
        b.iter(|| combine(black_box(&seed), black_box(h.t), black_box(h.r)).expect("combine"))
    });
    let k0 = combine(&seed, h.t, h.r).expect("combine");
    let context = h.context();
    g.bench_function("kdf_derive_key", |b| {
        b.iter(|| derive_key(black_box(&k0), Purpose::Auth.label(), black_box(&context)))
    });
    g.finish();
}

fn auth(c: &mut Criterion) {
    let seed = fixtures::seed();
    let mut g = c.benchmark_group("core/auth");
    g.throughput(Throughput::Elements(1));
    for (suite, name) in SUITES {
        let h = fixtures::header(suite, 0x0123_4567_89ab_cdef);
        let mut out = [0u8; 64];
        g.bench_with_input(BenchmarkId::new("make", name), &h, |b, h| {
            b.iter(|| make_auth(&seed, black_box(h), &Audience::CENTER, &mut out).expect("make"))
        });
        let msg = fixtures::auth(suite).expect("fixture AUTH");
        let bytes = msg.bytes();
        // Decode included: the center gets bytes, not a parsed message.
        g.bench_with_input(BenchmarkId::new("verify", name), &bytes, |b, bytes| {
            b.iter(|| {
                let m = Auth::decode(black_box(bytes)).expect("decode");
                verify_auth(&seed, &m, &Audience::CENTER).expect("verify")
            })
        });
    }
    g.finish();
}

fn sealed(c: &mut Criterion) {
    let seed = fixtures::seed();
    let aud = fixtures::relying_party();
    let pt = fixtures::pattern::<SEALED_PLAINTEXT>(3, 1);
    let mut g = c.benchmark_group("core/sealed_64B");
    g.throughput(Throughput::Elements(1));
    for (suite, name) in SUITES {
        let h = fixtures::header(suite, 0x1122_3344_5566_7788);
        let mut out = [0u8; fixtures::MAX_MSG];
        g.bench_with_input(BenchmarkId::new("seal", name), &h, |b, h| {
            b.iter(|| seal(&seed, black_box(h), &aud, black_box(&pt), &mut out).expect("seal"))
        });
        let msg = fixtures::sealed(suite).expect("fixture SEALED");
        let mut buf = [0u8; fixtures::MAX_MSG];
        let len = msg.len();
        g.bench_with_input(BenchmarkId::new("open", name), &msg, |b, msg| {
            b.iter(|| {
                // Opening decrypts in place: copy the message in first (a
                // 100-byte copy, noise beside the CCM pass).
                buf[..len].copy_from_slice(msg.bytes());
                let (_, p) = open_in_place(&seed, black_box(&mut buf[..len]), &aud).expect("open");
                p.len()
            })
        });
    }
    g.finish();
    assert_eq!(
        HEADER_LEN + SEALED_PLAINTEXT + 8,
        fixtures::sealed(Suite::CMAC64).map_or(0, |m| m.len())
    );
}

fn signature(c: &mut Criterion) {
    let seed = fixtures::seed();
    let data = fixtures::signed_data();
    let mut g = c.benchmark_group("core/signature_1KiB");
    g.throughput(Throughput::Elements(1));
    for (suite, name) in SUITES {
        let h = fixtures::header(suite, 0x8899_aabb_ccdd_eeff);
        let mut out = [0u8; 64];
        g.bench_with_input(BenchmarkId::new("digest_make", name), &h, |b, h| {
            b.iter(|| {
                let d = DataDigest::of(black_box(&data));
                make_signature(&seed, black_box(h), &d, &mut out).expect("make")
            })
        });
        let msg = fixtures::signature(suite).expect("fixture SIGNATURE");
        let bytes = msg.bytes();
        g.bench_with_input(
            BenchmarkId::new("digest_verify", name),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    let d = DataDigest::of(black_box(&data));
                    let m = Signature::decode(black_box(bytes)).expect("decode");
                    verify_signature(&seed, &m, &d).expect("verify")
                })
            },
        );
    }
    g.finish();
}

fn baseline(c: &mut Criterion) {
    let base = Baseline::new().expect("ECDSA baseline");
    assert!(base.verify(), "the baseline signature must verify");
    let mut g = c.benchmark_group("baseline");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ecdsa_p256_verify_300B_ring", |b| {
        b.iter(|| black_box(&base).verify())
    });
    g.finish();
}

/// True when cargo runs the target as a benchmark (`cargo bench`), not as a
/// test (`cargo test --benches`, one pass per bench) or to list it.
fn measuring() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list")
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    key_schedule(&mut c);
    auth(&mut c);
    sealed(&mut c);
    signature(&mut c);
    baseline(&mut c);
    c.final_summary();
    if measuring() {
        match ratio::measure(41) {
            Ok(cmp) => println!("\n{}", cmp.report()),
            Err(e) => {
                eprintln!("ratio: not measured: {e}");
                std::process::exit(1);
            }
        }
    }
}
