//! Issues AUTH micro-certificates in a loop, for instruction counting:
//!
//! ```text
//! cargo build --release -p microcert-node --example issue_auths
//! valgrind --tool=callgrind --toggle-collect='*issue_one*' \
//!     target/release/examples/issue_auths 1000
//! ```
//!
//! With `--toggle-collect` callgrind counts only inside `issue_one`, so the
//! total divided by the count is the cost of one AUTH. Also prints the size
//! of the chip state.

mod support;

use std::hint::black_box;

use microcert_core::Audience;
use microcert_node::{IMAGE_LEN, SecureChip, SoftChip};
use support::{Xorshift, enrolled_chip};

#[inline(never)]
fn issue_one(chip: &mut SoftChip<Xorshift>, out: &mut [u8; 64]) -> usize {
    chip.auth(0, &Audience::CENTER, out).expect("auth")
}

fn main() {
    let count: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mut chip = enrolled_chip();
    let mut out = [0u8; 64];
    let mut total = 0usize;
    for _ in 0..count {
        total += issue_one(black_box(&mut chip), &mut out);
    }
    println!("issued {count} AUTHs, {total} bytes");
    println!("IMAGE_LEN = {IMAGE_LEN} bytes");
    println!(
        "size_of::<SoftChip<Xorshift>>() = {} bytes (Xorshift itself: {})",
        size_of::<SoftChip<Xorshift>>(),
        size_of::<Xorshift>()
    );
}
