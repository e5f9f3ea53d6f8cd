//! Peak stack while issuing one AUTH and one SEALED, measured by stack
//! painting:
//!
//! ```text
//! cargo run --release -p microcert-node --example stack_paint
//! ```
//!
//! `walk` paints 64 KiB of stack below the caller with a pattern, through a
//! chain of small frames (1 KiB arrays: a single frame over one page would
//! get stack probes) and records where each array lies. The operation then
//! runs from the same call depth (same stack pointer) and overwrites the
//! painted bytes it uses. `peak` then scans the recorded arrays from the
//! deepest up, without calling anything (so nothing below its own frame is
//! touched meanwhile), for the lowest byte that lost the pattern. The depth
//! is measured from the stack pointer at the call: the top of the first
//! array plus `walk`'s return address slot. The bytes between two arrays
//! (return address and saved registers of `walk`, 8 to 16 bytes) are not
//! inspected, so a figure may be low by that much. A calibration call that
//! uses a known 512-byte buffer checks the method.
//!
//! The same painting then serves a residue check: after the chip made an
//! ENROLL, accepted its RECEIPT, answered an UPDATE_SEED and issued an
//! AUTH, it looks for the seeds' rows, K0 and Kauth in the stack the call
//! used (`SHOW_DEPTH=1` prints where a find lies).
//!
//! Reading stack bytes that no live Rust value owns needs `unsafe`, which
//! the crate forbids; that is why the measurement is this example, outside
//! the library.
#![allow(unsafe_code)]

mod support;

use std::hint::black_box;
use std::mem::MaybeUninit;
use std::ptr;
use std::sync::OnceLock;

use microcert_core::{
    Audience, DeviceId, Enroll, EnrollKey, HEADER_LEN, Header, KeySeed, Opcode, Sender, Suite,
    make_auth, make_command, make_receipt, open_enroll,
};
use microcert_core::{Auth, Purpose, csk::combine, working_key};
use microcert_node::{SecureChip, SoftChip};
use support::{Xorshift, enrolled_chip};

const FRAME: usize = 1024;
const LEVELS: usize = 64;
/// Two runs with different patterns: a byte the operation happens to write
/// with the pattern's value is caught by the other run.
const PATTERNS: [u8; 2] = [0xa5, 0x5a];

/// Paints one 1 KiB array per level and records its address.
#[inline(never)]
fn walk(level: usize, bases: &mut [usize; LEVELS], pattern: u8) {
    let mut area = [MaybeUninit::<u8>::uninit(); FRAME];
    let base = area.as_mut_ptr().cast::<u8>();
    for i in 0..FRAME {
        // SAFETY: `base + i` is inside `area`, a live local array.
        unsafe { ptr::write_volatile(base.add(i), pattern) };
    }
    bases[level] = base as usize;
    if level + 1 < LEVELS {
        walk(level + 1, bases, pattern);
    }
    black_box(&area);
}

#[inline(never)]
fn known_512(_: &mut SoftChip<Xorshift>, _: &mut [u8; 1100]) -> usize {
    let mut a = [0u8; 512];
    black_box(&mut a);
    a.len()
}

static SEED: OnceLock<KeySeed> = OnceLock::new();

/// The core's `make_auth` alone, with no chip around it: the difference to
/// `issue_auth` is what the node adds.
#[inline(never)]
fn core_make_auth(_: &mut SoftChip<Xorshift>, buf: &mut [u8; 1100]) -> usize {
    let seed = SEED.get_or_init(|| KeySeed::from_bytes(&[7; 976], 2026));
    let header = Header {
        suite: Suite::CMAC64,
        device: DeviceId([1; 8]),
        generation: 0,
        t: support::ISSUED,
        r: 0x0123_4567_89ab_cdef,
    };
    make_auth(seed, &header, &Audience::CENTER, buf).expect("make_auth")
}

#[inline(never)]
fn issue_auth(chip: &mut SoftChip<Xorshift>, buf: &mut [u8; 1100]) -> usize {
    chip.auth(0, &Audience::CENTER, buf).expect("auth")
}

#[inline(never)]
fn issue_sealed(chip: &mut SoftChip<Xorshift>, buf: &mut [u8; 1100]) -> usize {
    let aud = Audience::relying_party("acme-gateway");
    // The plaintext is already in place at buf[HEADER_LEN..HEADER_LEN + 64].
    chip.seal(0, &aud, buf, 64).expect("seal")
}

#[inline(never)]
fn peak_with(
    op: fn(&mut SoftChip<Xorshift>, &mut [u8; 1100]) -> usize,
    chip: &mut SoftChip<Xorshift>,
    buf: &mut [u8; 1100],
    pattern: u8,
) -> usize {
    let mut bases = [0usize; LEVELS];
    walk(0, &mut bases, pattern);
    black_box(op(chip, buf));
    let mut lowest = None;
    'scan: for &base in bases.iter().rev() {
        for i in 0..FRAME {
            // SAFETY: the address lies in the painted region below this
            // frame, which belongs to this thread's stack; no call happens
            // during the scan, so nothing else writes there meanwhile.
            let b = unsafe { ptr::read_volatile((base + i) as *const u8) };
            if b != pattern {
                lowest = Some(base + i);
                break 'scan;
            }
        }
    }
    let call_sp = bases[0] + FRAME + size_of::<usize>();
    lowest.map_or(0, |low| call_sp - low)
}

fn peak(
    op: fn(&mut SoftChip<Xorshift>, &mut [u8; 1100]) -> usize,
    chip: &mut SoftChip<Xorshift>,
    buf: &mut [u8; 1100],
) -> usize {
    PATTERNS
        .iter()
        .map(|&p| peak_with(op, chip, buf, p))
        .max()
        .unwrap_or(0)
}

/// Paints, runs `op` from the same stack pointer, and copies the painted
/// region into `snap` (no call happens between `op` and the copy).
#[inline(never)]
fn snapshot_after(op: &mut dyn FnMut(), snap: &mut [u8]) {
    let mut bases = [0usize; LEVELS];
    walk(0, &mut bases, PATTERNS[0]);
    op();
    for (level, &base) in bases.iter().enumerate() {
        for i in 0..FRAME {
            // SAFETY: as in `peak_with`.
            snap[level * FRAME + i] = unsafe { ptr::read_volatile((base + i) as *const u8) };
        }
    }
}

/// How many of the seed's 61 rows appear anywhere in `snap`.
fn rows_found(snap: &[u8], seed: &KeySeed) -> usize {
    seed.expose()
        .chunks(16)
        .filter(|row| {
            let pos = snap.windows(16).position(|w| w == *row);
            if let (Some(p), Some(_)) = (pos, std::env::var_os("SHOW_DEPTH")) {
                // snap[level * FRAME + i]: level 0 is the top.
                let (level, i) = (p / FRAME, p % FRAME);
                eprintln!(
                    "  row at level {level}, {} bytes below the top",
                    level * FRAME + (FRAME - i)
                );
            }
            pos.is_some()
        })
        .count()
}

/// After the chip made an ENROLL, accepted its RECEIPT and answered an
/// UPDATE_SEED, is any row of either seed left in the stack it used?
fn residue_check() {
    let mut snap = vec![0u8; LEVELS * FRAME];
    let mut chip = support::personalized_chip();
    let mut out = [0u8; 1100];
    let mut n = 0;
    snapshot_after(
        &mut || n = chip.enroll(0, &mut out).expect("enroll"),
        &mut snap,
    );
    let msg = Enroll::decode(&out[..n]).expect("decode");
    let seed0 = open_enroll(EnrollKey::Transport(&support::ktr()), &msg).expect("open");
    println!(
        "seed rows left on the stack after enroll: {}",
        rows_found(&snap, &seed0)
    );

    let header = |generation, r| Header {
        suite: Suite::CMAC64,
        device: support::DEVICE,
        generation,
        t: support::ISSUED + 10,
        r,
    };
    let mut rc = [0u8; 64];
    let m = make_receipt(
        &seed0,
        &header(0, 1),
        Sender::Center,
        msg.header.r,
        0,
        &mut rc,
    )
    .expect("receipt");
    snapshot_after(
        &mut || {
            chip.accept_receipt(&rc[..m]).expect("accept");
        },
        &mut snap,
    );
    println!(
        "seed rows left on the stack after its receipt: {}",
        rows_found(&snap, &seed0)
    );

    let mut cmd = [0u8; 64];
    let c = make_command(&seed0, &header(0, 2), 1, Opcode::UPDATE_SEED, &mut cmd).expect("cmd");
    snapshot_after(
        &mut || n = chip.handle_command(0, &cmd[..c], &mut out).expect("update"),
        &mut snap,
    );
    let msg = Enroll::decode(&out[..n]).expect("decode");
    let seed1 = open_enroll(EnrollKey::Update(&seed0), &msg).expect("open");
    println!(
        "seed rows left on the stack after UPDATE_SEED: old {}, new {}",
        rows_found(&snap, &seed0),
        rows_found(&snap, &seed1)
    );
}

/// After an AUTH: are K0, Kauth or the rows it combined left on the stack?
fn auth_residue_check() {
    let mut snap = vec![0u8; LEVELS * FRAME];
    let mut chip = support::personalized_chip();
    let mut out = [0u8; 1100];
    let n = chip.enroll(0, &mut out).expect("enroll");
    let msg = Enroll::decode(&out[..n]).expect("decode");
    let seed = open_enroll(EnrollKey::Transport(&support::ktr()), &msg).expect("open");
    let header = Header {
        suite: Suite::CMAC64,
        device: support::DEVICE,
        generation: 0,
        t: support::ISSUED + 10,
        r: 1,
    };
    let mut rc = [0u8; 64];
    let m =
        make_receipt(&seed, &header, Sender::Center, msg.header.r, 0, &mut rc).expect("receipt");
    chip.accept_receipt(&rc[..m]).expect("accept");
    let mut a = 0;
    snapshot_after(
        &mut || a = chip.auth(0, &Audience::CENTER, &mut out).expect("auth"),
        &mut snap,
    );
    let auth = Auth::decode(&out[..a]).expect("decode");
    let k0 = combine(&seed, auth.header.t, auth.header.r).expect("k0");
    let kauth = working_key(&seed, Purpose::Auth, &auth.header).expect("kauth");
    let has = |k: &[u8]| {
        let found: Vec<usize> = snap
            .windows(16)
            .enumerate()
            .filter(|(_, w)| *w == k)
            .map(|(p, _)| (p / FRAME) * FRAME + (FRAME - p % FRAME))
            .collect();
        if std::env::var_os("SHOW_DEPTH").is_some() && !found.is_empty() {
            eprintln!("  found at depths {found:?}");
        }
        !found.is_empty()
    };
    println!(
        "after AUTH: K0 on the stack: {}, Kauth on the stack: {}, seed rows on the stack: {}",
        has(k0.expose()),
        has(kauth.expose()),
        rows_found(&snap, &seed)
    );
}

fn main() {
    residue_check();
    auth_residue_check();
    let mut chip = enrolled_chip();
    let mut buf = [0x42u8; 1100];
    buf[..HEADER_LEN].fill(0);
    let known = peak(known_512, &mut chip, &mut buf);
    let core_auth = peak(core_make_auth, &mut chip, &mut buf);
    let auth = peak(issue_auth, &mut chip, &mut buf);
    let sealed = peak(issue_sealed, &mut chip, &mut buf);
    println!("calibration, a 512-byte local: {known} bytes");
    println!("peak stack, core make_auth alone: {core_auth} bytes");
    println!("peak stack, AUTH:   {auth} bytes");
    println!("peak stack, SEALED (64-byte plaintext): {sealed} bytes");
}
