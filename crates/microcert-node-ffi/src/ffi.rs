//! The `extern "C"` entry points. The only module of the crate with
//! `unsafe`: each block turns a pointer the C caller passed into a slice or
//! a reference, after a null check, under the contract written in the
//! function's `# Safety` section (and in the header).
//!
//! Every function returns `MC_ERROR_OK` (0) or a negative [`McError`] code, and
//! never unwinds into C. `image` always points to `MC_NODE_IMAGE_LEN`
//! bytes: the node's persistent image, updated in place; write it to
//! non-volatile memory before transmitting what a call produced.
#![allow(unsafe_code)]

use core::ffi::c_void;
use core::slice;

use microcert_node::{Entropy, EntropyFailure, Error, IMAGE_LEN, Life};

use crate::ops::{self, Line};

/// Length of the node's persistent image in bytes.
pub const MC_NODE_IMAGE_LEN: usize = 1226;
/// Length of an audience (the 8-byte hash of a relying party's name).
pub const MC_AUDIENCE_LEN: usize = 8;
/// Longest ENROLL (suite CMAC128); an `out` buffer of this size fits any
/// reply to a COMMAND too.
pub const MC_ENROLL_MAX_LEN: usize = 1017;
/// Length of an AUTH in suite CMAC64 (header 23, audience implicit, tag 8).
pub const MC_AUTH_CMAC64_LEN: usize = 31;

const _: () = assert!(MC_NODE_IMAGE_LEN == IMAGE_LEN);
const _: () = assert!(
    MC_ENROLL_MAX_LEN == microcert_core::HEADER_LEN + microcert_core::ENROLL_PLAINTEXT_LEN + 16
);

/// Result codes: `MC_ERROR_OK` or a reason for refusing. A refusal changes
/// nothing in the image unless documented on the function.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McError {
    /// Success.
    Ok = 0,
    /// A required pointer was NULL.
    Null = -1,
    /// The output buffer is too small.
    BufferTooSmall = -2,
    /// The image is not a node image, has the wrong version, or is corrupted.
    Image = -3,
    /// The node is not personalized.
    NotPersonalized = -4,
    /// Personalization refused (already personalized, final epoch, other device).
    Personalization = -5,
    /// The node holds no usable seed (enroll and wait for the RECEIPT).
    NotEnrolled = -6,
    /// The node holds a seed that still serves: updates come by COMMAND.
    AlreadyEnrolled = -7,
    /// The node was revoked.
    Revoked = -8,
    /// The node was tampered with.
    Tampered = -9,
    /// The message is not authentic (deliberately opaque).
    Verification = -10,
    /// The message could not be decoded, or is for another device or suite.
    Malformed = -11,
    /// A COMMAND's counter is not above the highest accepted one.
    Replay = -12,
    /// The message is keyed by a seed generation the node cannot check.
    WrongGeneration = -13,
    /// A RECEIPT answers no message the node is waiting on.
    NotPending = -14,
    /// The center's authentic RECEIPT reports a refusal.
    CenterRefused = -15,
    /// The random source failed.
    Entropy = -16,
    /// The seed does not serve the node's time (expired or not yet valid).
    SeedTime = -17,
    /// The audience is not configured, or the table is full.
    Audience = -18,
    /// A counter or the generations are exhausted.
    Exhausted = -19,
    /// Nothing waits for a RECEIPT.
    NothingToRetransmit = -20,
    /// Two buffers of one call overlap (the image and `out`, say).
    Overlap = -21,
    /// Any other failure.
    Other = -99,
}

fn code(e: Error) -> i32 {
    let c = match e {
        Error::BufferTooSmall => McError::BufferTooSmall,
        Error::ImageLength
        | Error::ImageMagic
        | Error::ImageVersion(_)
        | Error::ImageChecksum
        | Error::ImageInvalid => McError::Image,
        Error::NotPersonalized => McError::NotPersonalized,
        Error::AlreadyPersonalized | Error::FinalEpoch => McError::Personalization,
        Error::NotEnrolled => McError::NotEnrolled,
        Error::AlreadyEnrolled => McError::AlreadyEnrolled,
        Error::Revoked => McError::Revoked,
        Error::Tampered => McError::Tampered,
        Error::Verification => McError::Verification,
        Error::Malformed(_) | Error::WrongDevice | Error::WrongSuite => McError::Malformed,
        Error::Replay => McError::Replay,
        Error::WrongGeneration => McError::WrongGeneration,
        Error::NotPending => McError::NotPending,
        Error::CenterRefused(_) => McError::CenterRefused,
        Error::Entropy => McError::Entropy,
        Error::SeedExpired | Error::SeedNotYetValid => McError::SeedTime,
        Error::UnknownAudience | Error::AudienceTableFull | Error::CenterAudience => {
            McError::Audience
        }
        Error::GenerationsExhausted | Error::CounterExhausted => McError::Exhausted,
        Error::NothingToRetransmit => McError::NothingToRetransmit,
        _ => McError::Other,
    };
    c as i32
}

fn done(r: Result<(), Error>) -> i32 {
    match r {
        Ok(()) => McError::Ok as i32,
        Err(e) => code(e),
    }
}

/// The platform's random source: fills `len` bytes at `buf`, returns 0 on
/// success. `ctx` is passed through unchanged.
pub type McFillFn = Option<unsafe extern "C" fn(ctx: *mut c_void, buf: *mut u8, len: usize) -> i32>;

/// A random source (the device's TRNG) for the calls that make messages.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct McRng {
    /// The fill function; NULL makes every draw fail (`MC_ERROR_ENTROPY`).
    pub fill: McFillFn,
    /// Passed to `fill`.
    pub ctx: *mut c_void,
}

/// A factory personalization line (PROTOCOL.md section 9), parsed by the
/// firmware.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct McPersonalization {
    /// The device's EUI-64.
    pub device: [u8; 8],
    /// Personalization epoch: 0 at manufacture.
    pub epoch: u8,
    /// Suite id: 1 = CMAC64, 2 = CMAC128.
    pub suite: u8,
    /// Device class (RFC 7228).
    pub device_class: u8,
    /// Ktr(device, epoch).
    pub transport_key: [u8; 16],
    /// Provisioning time (Unix seconds): the node's time starts here.
    pub issued: u32,
}

/// What the node shows about itself; never key material.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct McNodeStatus {
    /// 0 blank, 1 personalized, 2 revoked, 3 tampered.
    pub life: u8,
    /// The device id.
    pub device: [u8; 8],
    /// The personalization epoch.
    pub epoch: u8,
    /// The suite id.
    pub suite: u8,
    /// 1 when the node holds a seed; `generation` is then its generation.
    pub has_seed: u8,
    /// Generation of the seed in use.
    pub generation: u8,
    /// 1 when an ENROLL waits for its RECEIPT; `pending_generation` is its
    /// generation.
    pub has_pending: u8,
    /// Generation of the pending ENROLL.
    pub pending_generation: u8,
    /// The node's time (moves forward only).
    pub node_time: u32,
    /// Highest COMMAND counter accepted.
    pub highest_counter: u32,
}

/// [`McRng`] behind the node's `Entropy` trait.
struct CRng(Option<McRng>);

impl Entropy for CRng {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyFailure> {
        let Some(McRng {
            fill: Some(fill),
            ctx,
        }) = self.0
        else {
            return Err(EntropyFailure);
        };
        // SAFETY: `buf` is a valid writable slice of `buf.len()` bytes; the
        // C side promised (mc_node_* contract) that `fill` writes at most
        // `len` bytes at `buf` and that `ctx` is what `fill` expects.
        match unsafe { fill(ctx, buf.as_mut_ptr(), buf.len()) } {
            0 => Ok(()),
            _ => Err(EntropyFailure),
        }
    }
}

/// True when no two of the byte ranges `(start, len)` overlap. Rust may not
/// hold a `&mut` slice that overlaps another slice, so a call whose
/// buffers overlap is refused before any slice is made.
fn disjoint(ranges: &[(*const u8, usize)]) -> bool {
    ranges.iter().enumerate().all(|(i, &(a, alen))| {
        ranges.iter().skip(i + 1).all(|&(b, blen)| {
            let (a, b) = (a as usize, b as usize);
            alen == 0 || blen == 0 || a.saturating_add(alen) <= b || b.saturating_add(blen) <= a
        })
    })
}

/// Reads the optional random source.
///
/// # Safety
/// `rng` is NULL or points to a readable `McRng`.
unsafe fn rng_of(rng: *const McRng) -> CRng {
    // SAFETY: the caller guarantees `rng` is NULL or valid for reads;
    // `as_ref` handles NULL; `McRng` is `Copy`.
    CRng(unsafe { rng.as_ref() }.copied())
}

/// The image as an array.
///
/// # Safety
/// `image` is NULL or points to `MC_NODE_IMAGE_LEN` writable bytes not
/// aliased for the duration of the call.
unsafe fn image_mut<'a>(image: *mut u8) -> Option<&'a mut [u8; IMAGE_LEN]> {
    // SAFETY: per the contract above; `[u8; N]` has alignment 1, so any
    // non-NULL pointer is aligned; `as_mut` handles NULL.
    unsafe { image.cast::<[u8; IMAGE_LEN]>().as_mut() }
}

/// A read-only input buffer; `len == 0` needs no valid pointer.
///
/// # Safety
/// `ptr` is NULL or points to `len` readable bytes.
unsafe fn input<'a>(ptr: *const u8, len: usize) -> Option<&'a [u8]> {
    if len == 0 {
        return Some(&[]);
    }
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-NULL and, per the caller, valid for `len` bytes of reads
    // for the duration of the call.
    Some(unsafe { slice::from_raw_parts(ptr, len) })
}

/// An output buffer.
///
/// # Safety
/// `ptr` is NULL or points to `cap` writable bytes, not overlapping any
/// other argument.
unsafe fn output<'a>(ptr: *mut u8, cap: usize) -> Option<&'a mut [u8]> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-NULL and, per the caller, valid for `cap` bytes of
    // writes and unaliased for the duration of the call.
    Some(unsafe { slice::from_raw_parts_mut(ptr, cap) })
}

/// Stores a length through `out_len`.
///
/// # Safety
/// `out_len` is NULL or points to a writable `size_t`.
unsafe fn put_len(out_len: *mut usize, n: usize) {
    // SAFETY: per the caller; `as_mut` handles NULL.
    if let Some(l) = unsafe { out_len.as_mut() } {
        *l = n;
    }
}

/// The image and the output buffer of a call that makes a message: the
/// status code `Overlap` or `Null` when they cannot be used.
///
/// # Safety
/// As for [`image_mut`] and [`output`].
unsafe fn image_and_output<'a>(
    image: *mut u8,
    out: *mut u8,
    out_cap: usize,
) -> Result<(&'a mut [u8; IMAGE_LEN], &'a mut [u8]), i32> {
    if !disjoint(&[(image, MC_NODE_IMAGE_LEN), (out, out_cap)]) {
        return Err(McError::Overlap as i32);
    }
    // SAFETY: forwarded contract; the two ranges do not overlap.
    match (unsafe { image_mut(image) }, unsafe { output(out, out_cap) }) {
        (Some(image), Some(out)) => Ok((image, out)),
        _ => Err(McError::Null as i32),
    }
}

/// The image and an input buffer, checked not to overlap each other nor
/// `extra` (an output region of the call, `(NULL, 0)` when none): the
/// status code `Overlap` or `Null` when they cannot be used.
///
/// # Safety
/// As for [`image_mut`] and [`input`].
unsafe fn image_and_input<'a>(
    image: *mut u8,
    (data, len): (*const u8, usize),
    extra: (*const u8, usize),
) -> Result<(&'a mut [u8; IMAGE_LEN], &'a [u8]), i32> {
    if !disjoint(&[(image, MC_NODE_IMAGE_LEN), (data, len), extra]) {
        return Err(McError::Overlap as i32);
    }
    // SAFETY: forwarded contract; the ranges do not overlap.
    match (unsafe { image_mut(image) }, unsafe { input(data, len) }) {
        (Some(image), Some(data)) => Ok((image, data)),
        _ => Err(McError::Null as i32),
    }
}

/// The status code of a call that made a message of `n` bytes, whose
/// length is stored through `out_len`.
///
/// # Safety
/// As for [`put_len`].
unsafe fn made(r: Result<usize, Error>, out_len: *mut usize) -> i32 {
    match r {
        Ok(n) => {
            // SAFETY: forwarded contract.
            unsafe { put_len(out_len, n) };
            McError::Ok as i32
        }
        Err(e) => code(e),
    }
}

/// [`made`] of `op` run with the caller's random source.
///
/// # Safety
/// As [`rng_of`] and [`made`].
unsafe fn made_with(
    rng: *const McRng,
    out_len: *mut usize,
    op: impl FnOnce(CRng) -> Result<usize, Error>,
) -> i32 {
    // SAFETY: forwarded contract.
    let rng = unsafe { rng_of(rng) };
    // SAFETY: forwarded contract.
    unsafe { made(op(rng), out_len) }
}

/// Writes the image of a blank (never personalized) node into `image`.
///
/// # Safety
/// `image` points to `MC_NODE_IMAGE_LEN` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_node_blank(image: *mut u8) -> i32 {
    // SAFETY: forwarded contract.
    let Some(image) = (unsafe { image_mut(image) }) else {
        return McError::Null as i32;
    };
    ops::blank(image);
    McError::Ok as i32
}

/// Personalizes the node in `image` with a factory line: a blank node, or
/// a revoked (or seedless) one with the next epoch of the same device.
///
/// # Safety
/// `image` points to `MC_NODE_IMAGE_LEN` writable bytes; `p` to a readable
/// `McPersonalization`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_node_personalize(image: *mut u8, p: *const McPersonalization) -> i32 {
    // SAFETY: forwarded contract; `as_ref` handles NULL.
    let (Some(image), Some(p)) = (unsafe { image_mut(image) }, unsafe { p.as_ref() }) else {
        return McError::Null as i32;
    };
    let line = Line {
        device: p.device,
        epoch: p.epoch,
        suite: p.suite,
        transport_key: &p.transport_key,
        class: p.device_class,
        issued: p.issued,
    };
    done(ops::personalize(image, CRng(None), &line))
}

/// Adds a relying party by its UTF-8 name (`name_len` bytes, no NUL
/// needed); its 8-byte audience goes to `audience_out` (may be NULL).
///
/// # Safety
/// `image` as above; `name` points to `name_len` readable bytes;
/// `audience_out` is NULL or points to `MC_AUDIENCE_LEN` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_node_add_audience(
    image: *mut u8,
    name: *const u8,
    name_len: usize,
    audience_out: *mut u8,
) -> i32 {
    let aud_len = MC_AUDIENCE_LEN * usize::from(!audience_out.is_null());
    // SAFETY: forwarded contract.
    let (image, name) =
        match unsafe { image_and_input(image, (name, name_len), (audience_out, aud_len)) } {
            Ok(v) => v,
            Err(c) => return c,
        };
    match ops::add_audience(image, CRng(None), name) {
        Ok(aud) => {
            // SAFETY: forwarded contract.
            if let Some(out) = unsafe { output(audience_out, MC_AUDIENCE_LEN) } {
                out.copy_from_slice(&aud);
            }
            McError::Ok as i32
        }
        Err(e) => code(e),
    }
}

/// Makes the ENROLL into `out` (`out_cap` bytes; `MC_ENROLL_MAX_LEN` always
/// fits) and stores its length in `*out_len`: the first enrollment, a
/// re-enrollment after the seed expired, or the identical bytes of the
/// ENROLL still waiting for its RECEIPT. (An update ENROLL is the reply to
/// the center's UPDATE_SEED COMMAND: see `mc_node_handle_command`.)
///
/// # Safety
/// `image` as above; `rng` is NULL or a readable `McRng`; `out` points to
/// `out_cap` writable bytes; `out_len` is NULL or a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_node_enroll(
    image: *mut u8,
    rng: *const McRng,
    now: u32,
    out: *mut u8,
    out_cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: forwarded contract.
    let (image, out) = match unsafe { image_and_output(image, out, out_cap) } {
        Ok(v) => v,
        Err(c) => return c,
    };
    // SAFETY: forwarded contract.
    unsafe { made_with(rng, out_len, |rng| ops::enroll(image, rng, now, out)) }
}

/// Makes an AUTH for `audience` (`MC_AUDIENCE_LEN` bytes; NULL = the
/// center) into `out`. An AUTH to the center waits for its RECEIPT.
///
/// # Safety
/// `image`, `rng`, `out`, `out_len` as for `mc_node_enroll`; `audience` is
/// NULL or points to `MC_AUDIENCE_LEN` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_node_auth(
    image: *mut u8,
    rng: *const McRng,
    now: u32,
    audience: *const u8,
    out: *mut u8,
    out_cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: forwarded contract.
    let (image, out) = match unsafe { image_and_output(image, out, out_cap) } {
        Ok(v) => v,
        Err(c) => return c,
    };
    let aud = if audience.is_null() {
        None
    } else {
        // SAFETY: non-NULL, and per the contract `MC_AUDIENCE_LEN` bytes.
        let bytes = unsafe { slice::from_raw_parts(audience, MC_AUDIENCE_LEN) };
        let mut a = [0u8; MC_AUDIENCE_LEN];
        a.copy_from_slice(bytes);
        Some(a)
    };
    // SAFETY: forwarded contract.
    unsafe { made_with(rng, out_len, |rng| ops::auth(image, rng, now, aud, out)) }
}

/// Opens a COMMAND: verifies it (device, suite, generation, tag, counter
/// above the highest accepted) and carries it out; the reply (an ENROLL
/// for UPDATE_SEED, a RECEIPT for REVOKE) goes to `out`. A refused COMMAND
/// changes nothing. A REVOKE wipes the keys even when its reply does not fit.
///
/// # Safety
/// As for `mc_node_enroll`; `command` points to `command_len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_node_handle_command(
    image: *mut u8,
    rng: *const McRng,
    now: u32,
    command: *const u8,
    command_len: usize,
    out: *mut u8,
    out_cap: usize,
    out_len: *mut usize,
) -> i32 {
    if !disjoint(&[
        (image, MC_NODE_IMAGE_LEN),
        (command, command_len),
        (out, out_cap),
    ]) {
        return McError::Overlap as i32;
    }
    // SAFETY: forwarded contract.
    let (Some(image), Some(command), Some(out)) = (
        unsafe { image_mut(image) },
        unsafe { input(command, command_len) },
        unsafe { output(out, out_cap) },
    ) else {
        return McError::Null as i32;
    };
    // SAFETY: forwarded contract.
    unsafe {
        made_with(rng, out_len, |rng| {
            ops::handle_command(image, rng, now, command, out)
        })
    }
}

/// Accepts a RECEIPT of the center. `*generation` (may be NULL) gets the
/// generation now in use when it answered an ENROLL, or -1 when it answered
/// an AUTH to the center.
///
/// # Safety
/// `image` as above; `receipt` points to `receipt_len` readable bytes;
/// `generation` is NULL or a writable `int32_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_node_accept_receipt(
    image: *mut u8,
    receipt: *const u8,
    receipt_len: usize,
    generation: *mut i32,
) -> i32 {
    // SAFETY: forwarded contract.
    let (image, receipt) =
        match unsafe { image_and_input(image, (receipt, receipt_len), (core::ptr::null(), 0)) } {
            Ok(v) => v,
            Err(c) => return c,
        };
    match ops::accept_receipt(image, CRng(None), receipt) {
        Ok(g) => {
            // SAFETY: forwarded contract; `as_mut` handles NULL.
            if let Some(out) = unsafe { generation.as_mut() } {
                *out = g.map_or(-1, i32::from);
            }
            McError::Ok as i32
        }
        Err(e) => code(e),
    }
}

/// The identical bytes of the message still waiting for a RECEIPT.
///
/// # Safety
/// `image`, `out`, `out_len` as for `mc_node_enroll`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_node_retransmit(
    image: *mut u8,
    out: *mut u8,
    out_cap: usize,
    out_len: *mut usize,
) -> i32 {
    // SAFETY: forwarded contract.
    let (image, out) = match unsafe { image_and_output(image, out, out_cap) } {
        Ok(v) => v,
        Err(c) => return c,
    };
    // SAFETY: forwarded contract.
    unsafe { made(ops::retransmit(image, CRng(None), out), out_len) }
}

/// Reads the node's status from its image (the image is not changed).
///
/// # Safety
/// `image` points to `MC_NODE_IMAGE_LEN` readable bytes; `status` to a
/// writable `McNodeStatus`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_node_status(image: *const u8, status: *mut McNodeStatus) -> i32 {
    // SAFETY: forwarded contract; `as_mut` handles NULL.
    let (Some(image), Some(status)) = (unsafe { input(image, MC_NODE_IMAGE_LEN) }, unsafe {
        status.as_mut()
    }) else {
        return McError::Null as i32;
    };
    match ops::status(image, CRng(None)) {
        Ok(s) => {
            *status = McNodeStatus {
                life: match s.life {
                    Life::Blank => 0,
                    Life::Personalized => 1,
                    Life::Revoked => 2,
                    Life::Tampered => 3,
                },
                device: s.device.0,
                epoch: s.epoch,
                suite: s.suite.id(),
                has_seed: u8::from(s.generation.is_some()),
                generation: s.generation.unwrap_or(0),
                has_pending: u8::from(s.pending_generation.is_some()),
                pending_generation: s.pending_generation.unwrap_or(0),
                node_time: s.node_time,
                highest_counter: s.highest_counter,
            };
            McError::Ok as i32
        }
        Err(e) => code(e),
    }
}
