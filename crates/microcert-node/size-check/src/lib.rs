//! A firmware's view of the node: C entry points over a `SoftChip` whose
//! image lives in the device's flash. Only for measuring code size and
//! stack (see docs/benchmarks.md); not part of the library.
//!
//! `#[unsafe(no_mangle)]` and the raw-pointer arguments of a C interface
//! need `unsafe`, which `microcert-node` forbids; this crate is outside it.
#![no_std]

use core::slice;

use microcert_core::{Audience, CHALLENGE_LEN, DataDigest, DeviceId, Key128, Suite};
use microcert_node::{Entropy, EntropyFailure, IMAGE_LEN, Personalization, SecureChip, SoftChip};

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

unsafe extern "C" {
    /// The platform's TRNG: fills `len` bytes, returns 0 on success.
    fn platform_random(buf: *mut u8, len: usize) -> i32;
}

/// The device's TRNG behind the node's `Entropy` trait.
pub struct Trng;

impl Entropy for Trng {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyFailure> {
        // SAFETY: `buf` is a valid, writable slice of `buf.len()` bytes.
        match unsafe { platform_random(buf.as_mut_ptr(), buf.len()) } {
            0 => Ok(()),
            _ => Err(EntropyFailure),
        }
    }
}

/// The chip type a firmware would keep in RAM.
pub type Chip = SoftChip<Trng>;

fn code(r: Result<usize, microcert_node::Error>) -> i32 {
    match r {
        Ok(n) => i32::try_from(n).unwrap_or(i32::MAX),
        Err(_) => -1,
    }
}

/// Loads the chip from its flash image.
///
/// # Safety
/// `image` points to `IMAGE_LEN` readable bytes, `chip` to writable memory
/// for a `Chip`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_load(image: *const u8, chip: *mut Chip) -> i32 {
    let image = unsafe { slice::from_raw_parts(image, IMAGE_LEN) };
    match SoftChip::from_image(image, Trng) {
        Ok(c) => {
            unsafe { chip.write(c) };
            0
        }
        Err(_) => -1,
    }
}

/// Writes the chip's image for flash.
///
/// # Safety
/// `chip` is a loaded chip, `image` points to `IMAGE_LEN` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_save(chip: *mut Chip, image: *mut [u8; IMAGE_LEN]) {
    let chip = unsafe { &mut *chip };
    chip.to_image(unsafe { &mut *image });
    chip.mark_persisted();
}

/// Personalizes from the fields of a factory line.
///
/// # Safety
/// `chip` is a loaded chip, `device` 8 and `ktr` 16 readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_personalize(
    chip: *mut Chip,
    device: *const [u8; 8],
    epoch: u8,
    suite: u8,
    ktr: *const [u8; 16],
    class: u8,
    issued: u32,
) -> i32 {
    let Ok(suite) = Suite::new(suite) else {
        return -1;
    };
    let p = Personalization {
        device: DeviceId(unsafe { *device }),
        epoch,
        suite,
        transport_key: Key128::from_bytes(unsafe { *ktr }),
        class,
        issued,
    };
    code(unsafe { &mut *chip }.personalize(&p).map(|()| 0))
}

/// # Safety
/// `chip` is a loaded chip, `out` points to `out_len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_enroll(chip: *mut Chip, now: u32, out: *mut u8, out_len: usize) -> i32 {
    let out = unsafe { slice::from_raw_parts_mut(out, out_len) };
    code(unsafe { &mut *chip }.enroll(now, out))
}

/// AUTH for the center (`aud` null) or a relying party's 8-byte audience.
///
/// # Safety
/// `chip` is a loaded chip, `aud` null or 8 readable bytes, `out` 64
/// writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_auth(
    chip: *mut Chip,
    now: u32,
    aud: *const [u8; 8],
    out: *mut [u8; 64],
) -> i32 {
    let aud = if aud.is_null() {
        Audience::CENTER
    } else {
        Audience(unsafe { *aud })
    };
    code(unsafe { &mut *chip }.auth(now, &aud, unsafe { &mut *out }))
}

/// # Safety
/// `chip` is a loaded chip, `challenge` 16 readable bytes, `out` 64
/// writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_auth_response(
    chip: *mut Chip,
    now: u32,
    challenge: *const [u8; CHALLENGE_LEN],
    out: *mut [u8; 64],
) -> i32 {
    code(unsafe { &mut *chip }.auth_response(now, unsafe { &*challenge }, unsafe { &mut *out }))
}

/// SIGNATURE over `len` bytes of data (a firmware would feed pieces).
///
/// # Safety
/// `chip` is a loaded chip, `data` `len` readable bytes, `out` 64 writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_sign(
    chip: *mut Chip,
    now: u32,
    data: *const u8,
    len: usize,
    out: *mut [u8; 64],
) -> i32 {
    let mut digest = DataDigest::new();
    digest.update(unsafe { slice::from_raw_parts(data, len) });
    code(unsafe { &mut *chip }.sign(now, digest, unsafe { &mut *out }))
}

/// SEALED in place: plaintext at `buf[23..23 + pt_len]`.
///
/// # Safety
/// `chip` is a loaded chip, `aud` 8 readable bytes, `buf` `buf_len`
/// writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_seal(
    chip: *mut Chip,
    now: u32,
    aud: *const [u8; 8],
    buf: *mut u8,
    buf_len: usize,
    pt_len: usize,
) -> i32 {
    let aud = Audience(unsafe { *aud });
    let buf = unsafe { slice::from_raw_parts_mut(buf, buf_len) };
    code(unsafe { &mut *chip }.seal(now, &aud, buf, pt_len))
}

/// # Safety
/// `chip` is a loaded chip, `msg` `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_receipt(chip: *mut Chip, msg: *const u8, len: usize) -> i32 {
    let msg = unsafe { slice::from_raw_parts(msg, len) };
    code(unsafe { &mut *chip }.accept_receipt(msg).map(|_| 0))
}

/// # Safety
/// `chip` is a loaded chip, `msg` `len` readable bytes, `out` `out_len`
/// writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_command(
    chip: *mut Chip,
    now: u32,
    msg: *const u8,
    len: usize,
    out: *mut u8,
    out_len: usize,
) -> i32 {
    let msg = unsafe { slice::from_raw_parts(msg, len) };
    let out = unsafe { slice::from_raw_parts_mut(out, out_len) };
    code(unsafe { &mut *chip }.handle_command(now, msg, out))
}

/// # Safety
/// `chip` is a loaded chip, `out` `out_len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_retransmit(chip: *mut Chip, out: *mut u8, out_len: usize) -> i32 {
    let out = unsafe { slice::from_raw_parts_mut(out, out_len) };
    code(unsafe { &*chip }.retransmit(out))
}

/// # Safety
/// `chip` is a loaded chip.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_days_left(chip: *mut Chip, now: u32) -> i32 {
    code(unsafe { &*chip }.days_left(now).map(|d| d as usize))
}

/// # Safety
/// `chip` is a loaded chip.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_tamper(chip: *mut Chip) {
    unsafe { &mut *chip }.tamper();
}

/// # Safety
/// `chip` is a loaded chip; `name` `len` readable bytes of UTF-8.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_add_audience(
    chip: *mut Chip,
    name: *const u8,
    len: usize,
    aud_out: *mut [u8; 8],
) -> i32 {
    let Ok(name) = core::str::from_utf8(unsafe { slice::from_raw_parts(name, len) }) else {
        return -1;
    };
    match unsafe { &mut *chip }.add_audience(name) {
        Ok(a) => {
            unsafe { *aud_out = a.0 };
            0
        }
        Err(_) => -1,
    }
}

/// The size of the chip state in RAM, for the firmware's allocation.
#[unsafe(no_mangle)]
pub extern "C" fn mc_chip_size() -> usize {
    size_of::<Chip>()
}
