//! The PKCS#11 card on SoftHSM2 beside the software card: unsealing a seed
//! (the cold-cache verification path) and opening an ENROLL.
//!
//! `cargo bench -p microcert-pkcs11 --bench card`; skipped with a message
//! when softhsm2 is not installed.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Instant;

use criterion::Criterion;
use microcert_center::card::{EncryptionCard, SoftwareCard};
use microcert_core::{DeviceId, Enroll, EnrollKey, Header, KeySeed, Suite, make_enroll};
use microcert_pkcs11::Pkcs11Card;

fn enroll(key: EnrollKey<'_>, seed: &KeySeed, dev: DeviceId, generation: u8) -> Vec<u8> {
    let header = Header {
        suite: Suite::CMAC64,
        device: dev,
        generation,
        t: 1_780_000_000,
        r: 0x0102_0304_0506_0708,
    };
    let mut out = vec![0u8; 2048];
    let n = make_enroll(key, seed, &header, &mut out).expect("enroll");
    out.truncate(n);
    out
}

fn bench_card(c: &mut Criterion, name: &str, card: &(dyn EncryptionCard + Sync)) {
    let dev = DeviceId::from_u64(0x0102_0304_0506_0708);
    let seed = KeySeed::generate(2026, |b| b.fill(0x17));
    let sealed = card.seal_seed(dev, 0, &seed).expect("seal");
    c.bench_function(&format!("unseal_seed/{name}"), |b| {
        b.iter(|| {
            card.unseal_seed(dev, 0, sealed.kstore_version, black_box(&sealed.ciphertext))
                .expect("unseal")
        })
    });
    // Per-unseal time with 8 threads sharing the card: shows whether the
    // session pool lets requests overlap (the machine's cores bound it).
    c.bench_function(&format!("unseal_seed_8_threads/{name}"), |b| {
        b.iter_custom(|iters| {
            let per_thread = iters.div_ceil(8);
            let start = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..8 {
                    scope.spawn(|| {
                        for _ in 0..per_thread {
                            card.unseal_seed(dev, 0, sealed.kstore_version, &sealed.ciphertext)
                                .expect("unseal");
                        }
                    });
                }
            });
            start.elapsed() * iters as u32 / (per_thread * 8) as u32
        })
    });
    c.bench_function(&format!("seal_seed/{name}"), |b| {
        b.iter(|| card.seal_seed(dev, 0, black_box(&seed)).expect("seal"))
    });

    let ktr = card.transport_key(dev, 0).expect("ktr");
    let first = enroll(EnrollKey::Transport(&ktr), &seed, dev, 0);
    let first = Enroll::decode(&first).expect("decode");
    c.bench_function(&format!("open_enroll_transport/{name}"), |b| {
        b.iter(|| {
            card.open_enroll(black_box(&first), None, Some(0))
                .expect("open")
        })
    });
    let next_seed = KeySeed::generate(2026, |b| b.fill(0x18));
    let update = enroll(EnrollKey::Update(&seed), &next_seed, dev, 1);
    let update = Enroll::decode(&update).expect("decode");
    c.bench_function(&format!("open_enroll_update/{name}"), |b| {
        b.iter(|| {
            card.open_enroll(black_box(&update), Some(&seed), Some(0))
                .expect("open")
        })
    });

    let now = 1_800_000_000;
    let ch = card.make_challenge(dev, now).expect("challenge");
    c.bench_function(&format!("check_challenge/{name}"), |b| {
        b.iter(|| {
            card.check_challenge(dev, black_box(&ch), now)
                .expect("check")
        })
    });
    c.bench_function(&format!("record_tag/{name}"), |b| {
        b.iter(|| card.record_tag(black_box(&[7u8; 64])).expect("tag"))
    });
}

fn main() {
    let Some(_) = common::hsm() else { return };
    let mut c = Criterion::default().configure_from_args();
    let soft = SoftwareCard::ephemeral().expect("software card");
    bench_card(&mut c, "software", &soft);
    let token = Pkcs11Card::init(&common::config("mc-bench")).expect("PKCS#11 card");
    bench_card(&mut c, "pkcs11-softhsm2", &token);
    c.final_summary();
}
