//! One AES-128-CMAC, key expansion included, with aes 0.8 / cmac 0.7 and
//! aes 0.9 / cmac 0.8 side by side, interleaved batches in one process.
//!
//! ```text
//! cd crates/microcert-bench/cmac-compare && cargo run --release
//! ```
//!
//! Prints, for 16, 40 and 64-byte messages (the lengths of the core's K0
//! extraction, working-key derivation and tag inputs), the median over
//! rounds of ns per CMAC for each pair, after checking both against the
//! RFC 4493 example 2 (16-byte message).

use std::hint::black_box;
use std::time::Instant;

const KEY: [u8; 16] = [
    0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf, 0x4f, 0x3c,
];
const MSG16: [u8; 16] = [
    0x6b, 0xc1, 0xbe, 0xe2, 0x2e, 0x40, 0x9f, 0x96, 0xe9, 0x3d, 0x7e, 0x11, 0x73, 0x93, 0x17, 0x2a,
];
const TAG16: [u8; 16] = [
    0x07, 0x0a, 0x16, 0xb4, 0x6b, 0x4d, 0x41, 0x44, 0xf7, 0x9b, 0xdd, 0x9d, 0xd0, 0x4a, 0x28, 0x7c,
];

fn old(key: &[u8; 16], msg: &[u8]) -> [u8; 16] {
    use cmac07::Mac;
    let mut m = <cmac07::Cmac<aes08::Aes128Enc> as cmac07::Mac>::new_from_slice(key).unwrap();
    m.update(msg);
    m.finalize().into_bytes().into()
}

fn new(key: &[u8; 16], msg: &[u8]) -> [u8; 16] {
    use cmac08::{KeyInit, Mac};
    let mut m = <cmac08::Cmac<aes09::Aes128Enc> as KeyInit>::new(key.into());
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// The same MAC with its key schedule and subkeys made once (a cloned
/// keyed state per message): what a cached working key would cost.
fn old_keyed(mac: &cmac07::Cmac<aes08::Aes128Enc>, msg: &[u8]) -> [u8; 16] {
    use cmac07::Mac;
    let mut m = mac.clone();
    m.update(msg);
    m.finalize().into_bytes().into()
}

fn new_keyed(mac: &cmac08::Cmac<aes09::Aes128Enc>, msg: &[u8]) -> [u8; 16] {
    use cmac08::Mac;
    let mut m = mac.clone();
    m.update(msg);
    m.finalize().into_bytes().into()
}

fn batch_keyed<M>(mac: &M, f: fn(&M, &[u8]) -> [u8; 16], msg: &[u8], n: u32) -> f64 {
    let mut acc = 0u8;
    let start = Instant::now();
    for _ in 0..n {
        acc ^= f(black_box(mac), black_box(msg))[0];
    }
    black_box(acc);
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

fn batch(f: fn(&[u8; 16], &[u8]) -> [u8; 16], msg: &[u8], n: u32) -> f64 {
    let mut key = KEY;
    let start = Instant::now();
    for _ in 0..n {
        let t = f(black_box(&key), black_box(msg));
        key[0] ^= t[0];
    }
    black_box(key);
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    assert_eq!(
        old(&KEY, &MSG16),
        TAG16,
        "aes 0.8 / cmac 0.7 fails RFC 4493"
    );
    assert_eq!(
        new(&KEY, &MSG16),
        TAG16,
        "aes 0.9 / cmac 0.8 fails RFC 4493"
    );
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(31);
    println!(
        "one AES-128-CMAC incl. key expansion, ns (median of {rounds} interleaved batches of 20,000)"
    );
    println!("| message | aes 0.8 / cmac 0.7 | aes 0.9.4 / cmac 0.8 | new / old |");
    println!("| --- | --- | --- | --- |");
    let long = [0x5au8; 64];
    for len in [16usize, 40, 64] {
        let msg = &long[..len];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            a.push(batch(old, msg, 20_000));
            b.push(batch(new, msg, 20_000));
        }
        let (a, b) = (median(&mut a), median(&mut b));
        println!("| {len} B | {a:.0} | {b:.0} | {:.2}x |", b / a);
    }
    let k_old = <cmac07::Cmac<aes08::Aes128Enc> as cmac07::Mac>::new_from_slice(&KEY).unwrap();
    let k_new = <cmac08::Cmac<aes09::Aes128Enc> as cmac08::KeyInit>::new((&KEY).into());
    println!("| key schedule and subkeys made once (clone per message) | | | |");
    for len in [16usize, 40, 64] {
        let msg = &long[..len];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            a.push(batch_keyed(&k_old, old_keyed, msg, 20_000));
            b.push(batch_keyed(&k_new, new_keyed, msg, 20_000));
        }
        let (a, b) = (median(&mut a), median(&mut b));
        println!("| {len} B, keyed | {a:.0} | {b:.0} | {:.2}x |", b / a);
    }
}
