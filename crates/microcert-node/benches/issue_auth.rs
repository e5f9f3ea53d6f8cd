//! Time to issue one AUTH (suite 0x01, for the center) on a software chip:
//!
//! ```text
//! cargo bench -p microcert-node --bench issue_auth
//! ```

#[path = "../examples/support/mod.rs"]
mod support;

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use microcert_core::Audience;
use microcert_node::SecureChip;

fn issue_auth(c: &mut Criterion) {
    let mut chip = support::enrolled_chip();
    let mut out = [0u8; 64];
    c.bench_function("node: issue one AUTH (suite 0x01)", |b| {
        b.iter(|| {
            chip.auth(0, black_box(&Audience::CENTER), &mut out)
                .expect("auth")
        })
    });
    let aud = Audience::relying_party("acme-gateway");
    let mut sealed = [0u8; 128];
    c.bench_function("node: issue one SEALED, 64-byte plaintext", |b| {
        b.iter(|| {
            chip.seal(0, black_box(&aud), &mut sealed, 64)
                .expect("seal")
        })
    });
}

criterion_group!(benches, issue_auth);
criterion_main!(benches);
