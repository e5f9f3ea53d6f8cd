//! Wiping the stack after a seed was handled.
//!
//! Rust moves a value by copying its bytes and never wipes the source. A
//! seed returned by value (the core's `KeySeed::generate`, the chip's
//! generator) therefore leaves copies in stack frames that are dead but not
//! overwritten; zeroize-on-drop wipes only the copy that is dropped. So the
//! methods that expand, enroll or load a seed run their work in a callee and
//! then overwrite the stack that callee used.

use zeroize::Zeroize;

/// How much stack below the caller is wiped: the deepest seed path with a
/// margin. On a 32-bit microcontroller that path (answering UPDATE_SEED) is
/// at most 4,276 bytes deep (Cortex-M4, static call graph, see
/// docs/benchmarks.md). On a 64-bit host the crypto backends (AES-NI, VAES)
/// use far larger frames: seed rows were found 5.4 KiB deep there, so a
/// simulated node wipes 16 KiB.
#[cfg(not(target_pointer_width = "64"))]
pub(crate) const SCRUB_LEN: usize = 4608;
/// See above: a 64-bit host.
#[cfg(target_pointer_width = "64")]
pub(crate) const SCRUB_LEN: usize = 16 * 1024;

/// Overwrites `SCRUB_LEN` bytes of stack below the caller's frame.
#[inline(never)]
pub(crate) fn scrub_stack() {
    // Words, not bytes: zeroize writes each element with a volatile store.
    let mut area = [0u64; SCRUB_LEN / 8];
    area.zeroize();
    core::hint::black_box(&area);
}
