//! The byte image of a [`NodeRecord`]: what a node stores in its
//! non-volatile memory, fixed size, versioned and checksummed.
//!
//! Layout (version 1, all integers big-endian):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic "MCNI" |
//! | 4 | 1 | image version (1) |
//! | 5 | 1 | life: 0 blank, 1 personalized, 2 revoked, 3 tampered |
//! | 6 | 1 | flags: 0x01 seed, 0x02 enrolled before, 0x04 pending ENROLL, 0x08 pending under Kupd, 0x10 awaiting RECEIPT |
//! | 7 | 8 | device id |
//! | 15 | 1 | epoch |
//! | 16 | 1 | suite |
//! | 17 | 1 | class |
//! | 18 | 4 | node time |
//! | 22 | 4 | highest command counter |
//! | 26 | 4 | r counter |
//! | 30 | 16 | Ktr (zero once wiped) |
//! | 46 | 1 | generation |
//! | 47 | 2 | base year |
//! | 49 | 976 | seed (zero when none) |
//! | 1025 | 1 | pending: generation |
//! | 1026 | 4 | pending: t |
//! | 1030 | 8 | pending: r |
//! | 1038 | 2 | pending: base year |
//! | 1040 | 32 | pending: seed generator input |
//! | 1072 | 1 | awaiting: length |
//! | 1073 | 55 | awaiting: message bytes |
//! | 1128 | 1 | audience count |
//! | 1129 | 32 | audiences, 4 x 8 |
//! | 1161 | 16 | checksum: SHA-256 of bytes 0..1161, first 16 bytes |
//!
//! Version 2 (protocol v1.2, every build) adds flag 0x20 (the pending
//! ENROLL is a forward-secret update) and, before the checksum, 1161: the
//! node's ephemeral public key Qn (33) and 1194: Kfs (16), zero unless the
//! flag is set; the checksum moves to 1210 (image 1,226 bytes). One layout
//! for every build, so that the size does not depend on a cargo feature
//! (the C library's `MC_NODE_IMAGE_LEN`); a build without the
//! `forward-secret` feature (Class 1) never sets the flag and refuses an
//! image that has it. Version 1 images (1,177 bytes) are still read.
//!
//! The checksum detects corruption (a torn write, a flipped bit), not a
//! deliberate edit: the image holds the keys in the clear, so whoever can
//! write it can read them anyway. A real chip keeps it in protected memory.

use microcert_core::{Audience, DataDigest, DeviceId, Key128, KeySeed, SEED_LEN, Suite};
use subtle::ConstantTimeEq;

use crate::chip::Life;
use crate::scrub::scrub_stack;
use crate::seedgen::{SEED_INPUT_LEN, SeedInput};
use crate::storage::{AWAIT_MAX, Awaiting, MAX_AUDIENCES, NodeRecord, Pending};
use crate::{Error, Result};

/// The image's first four bytes.
pub const IMAGE_MAGIC: [u8; 4] = *b"MCNI";
/// The image format this build writes (it also reads version 1).
pub const IMAGE_VERSION: u8 = 2;
const CHECKSUM_LEN: usize = 16;
/// The forward-secret section of a version 2 image: Qn and Kfs.
const FS_SECTION: usize = microcert_core::FS_PUBLIC_LEN + 16;
const BODY_LEN: usize = BODY_LEN_V1 + FS_SECTION;
const BODY_LEN_V1: usize = 4
    + 1
    + 1
    + 1
    + 8
    + 1
    + 1
    + 1
    + 4
    + 4
    + 4
    + 16
    + 1
    + 2
    + SEED_LEN
    + (1 + 4 + 8 + 2 + SEED_INPUT_LEN)
    + (1 + AWAIT_MAX)
    + (1 + 8 * MAX_AUDIENCES);
/// Length of a chip image in bytes.
pub const IMAGE_LEN: usize = BODY_LEN + CHECKSUM_LEN;

const F_SEED: u8 = 0x01;
const F_ENROLLED: u8 = 0x02;
const F_PENDING: u8 = 0x04;
const F_PENDING_UPD: u8 = 0x08;
const F_AWAITING: u8 = 0x10;
#[cfg(feature = "forward-secret")]
const F_PENDING_FS: u8 = 0x20;
#[cfg(feature = "forward-secret")]
const F_ALL: u8 = 0x3f;
#[cfg(not(feature = "forward-secret"))]
const F_ALL: u8 = 0x1f;

/// Writes into a fixed buffer; the layout is fixed, so it never overflows
/// (a unit test checks that it fills the body exactly).
struct Put<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Put<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.pos.saturating_add(bytes.len());
        if let Some(dst) = self.buf.get_mut(self.pos..end) {
            dst.copy_from_slice(bytes);
        }
        self.pos = end;
    }
}

struct Take<'a>(&'a [u8]);

impl<'a> Take<'a> {
    fn arr<const N: usize>(&mut self) -> Result<&'a [u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(Error::ImageLength)?;
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(*self.arr()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(*self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(*self.arr()?))
    }
}

fn checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let d = DataDigest::of(body);
    let mut c = [0u8; CHECKSUM_LEN];
    c.copy_from_slice(d.get(..CHECKSUM_LEN).unwrap_or(&[0; CHECKSUM_LEN]));
    c
}

fn life_byte(life: Life) -> u8 {
    match life {
        Life::Blank => 0,
        Life::Personalized => 1,
        Life::Revoked => 2,
        Life::Tampered => 3,
    }
}

fn write_body(st: &NodeRecord, out: &mut [u8]) -> usize {
    let mut w = Put { buf: out, pos: 0 };
    let mut flags = 0;
    for (set, bit) in [
        (st.has_seed, F_SEED),
        (st.enrolled_before, F_ENROLLED),
        (st.pending.is_some(), F_PENDING),
        (
            st.pending.as_ref().is_some_and(|p| p.under_update),
            F_PENDING_UPD,
        ),
        (st.awaiting.is_some(), F_AWAITING),
        #[cfg(feature = "forward-secret")]
        (
            st.pending.as_ref().is_some_and(|p| p.fs.is_some()),
            F_PENDING_FS,
        ),
    ] {
        if set {
            flags |= bit;
        }
    }
    w.put(&IMAGE_MAGIC);
    w.put(&[IMAGE_VERSION, life_byte(st.life), flags]);
    w.put(&st.device.0);
    w.put(&[st.epoch, st.suite.id(), st.class]);
    w.put(&st.node_time.to_be_bytes());
    w.put(&st.highest_counter.to_be_bytes());
    w.put(&st.r_counter.to_be_bytes());
    w.put(st.ktr.expose());
    w.put(&[st.generation]);
    w.put(&st.seed.base_year().to_be_bytes());
    w.put(st.seed.expose());
    match &st.pending {
        Some(p) => {
            w.put(&[p.generation]);
            w.put(&p.t.to_be_bytes());
            w.put(&p.r.to_be_bytes());
            w.put(&p.base_year.to_be_bytes());
            w.put(&p.input.0);
        }
        None => w.put(&[0; 1 + 4 + 8 + 2 + SEED_INPUT_LEN]),
    }
    match &st.awaiting {
        Some(a) => {
            w.put(&[a.len]);
            w.put(&a.bytes);
        }
        None => w.put(&[0; 1 + AWAIT_MAX]),
    }
    w.put(&[st.audience_count]);
    for aud in &st.audiences {
        w.put(&aud.0);
    }
    #[cfg(feature = "forward-secret")]
    match st.pending.as_ref().and_then(|p| p.fs.as_ref()) {
        Some(fs) => {
            w.put(&fs.public);
            w.put(fs.kfs.expose());
        }
        None => w.put(&[0; FS_SECTION]),
    }
    #[cfg(not(feature = "forward-secret"))]
    w.put(&[0; FS_SECTION]);
    w.pos
}

fn read_state(body: &[u8]) -> Result<NodeRecord> {
    let mut rd = Take(body);
    let _magic_and_version = rd.arr::<5>()?;
    let life = match rd.u8()? {
        0 => Life::Blank,
        1 => Life::Personalized,
        2 => Life::Revoked,
        3 => Life::Tampered,
        _ => return Err(Error::ImageInvalid),
    };
    let flags = rd.u8()?;
    if flags & !F_ALL != 0 {
        return Err(Error::ImageInvalid);
    }
    let device = DeviceId(*rd.arr()?);
    let epoch = rd.u8()?;
    let suite = Suite::new(rd.u8()?).map_err(|_| Error::ImageInvalid)?;
    let class = rd.u8()?;
    let node_time = rd.u32()?;
    let highest_counter = rd.u32()?;
    let r_counter = rd.u32()?;
    let ktr = Key128::from_bytes(*rd.arr::<16>()?);
    let generation = rd.u8()?;
    let base_year = rd.u16()?;
    let seed = KeySeed::from_bytes(rd.arr::<SEED_LEN>()?, base_year);
    let p_generation = rd.u8()?;
    let p_t = rd.u32()?;
    let p_r = rd.u64()?;
    let p_base_year = rd.u16()?;
    let p_input = SeedInput(*rd.arr::<SEED_INPUT_LEN>()?);
    let a_len = rd.u8()?;
    let a_bytes = *rd.arr::<AWAIT_MAX>()?;
    let audience_count = rd.u8()?;
    let mut audiences = [Audience::CENTER; MAX_AUDIENCES];
    for aud in &mut audiences {
        *aud = Audience(*rd.arr()?);
    }
    // A version 1 image (body of BODY_LEN_V1) has no forward-secret section.
    #[cfg(not(feature = "forward-secret"))]
    let _fs_section = rd.0;
    #[cfg(feature = "forward-secret")]
    let fs = if rd.0.is_empty() {
        None
    } else {
        let public = *rd.arr::<{ microcert_core::FS_PUBLIC_LEN }>()?;
        let kfs = Key128::from_bytes(*rd.arr::<16>()?);
        (flags & F_PENDING_FS != 0).then_some(crate::storage::FsPending { public, kfs })
    };

    let has_seed = flags & F_SEED != 0;
    let has_pending = flags & F_PENDING != 0;
    let under_update = flags & F_PENDING_UPD != 0;
    let has_awaiting = flags & F_AWAITING != 0;
    let holds_keys = has_seed || has_pending || has_awaiting;
    let consistent = (life == Life::Personalized || !holds_keys)
        && (has_pending || !under_update)
        && (has_seed || !under_update)
        && fs_consistent(flags, has_pending && under_update)
        && (!has_awaiting
            || (usize::from(a_len) >= microcert_core::HEADER_LEN
                && usize::from(a_len) <= AWAIT_MAX))
        && usize::from(audience_count) <= MAX_AUDIENCES;
    if !consistent {
        return Err(Error::ImageInvalid);
    }
    Ok(NodeRecord {
        life,
        device,
        epoch,
        suite,
        class,
        node_time,
        highest_counter,
        r_counter,
        ktr,
        seed,
        has_seed,
        generation,
        enrolled_before: flags & F_ENROLLED != 0,
        pending: has_pending.then_some(Pending {
            generation: p_generation,
            t: p_t,
            r: p_r,
            base_year: p_base_year,
            under_update,
            input: p_input,
            #[cfg(feature = "forward-secret")]
            fs,
        }),
        awaiting: has_awaiting.then_some(Awaiting {
            len: a_len,
            bytes: a_bytes,
        }),
        audiences,
        audience_count,
    })
}

/// A forward-secret pending ENROLL is always a pending update.
#[cfg(feature = "forward-secret")]
fn fs_consistent(flags: u8, pending_update: bool) -> bool {
    flags & F_PENDING_FS == 0 || pending_update
}

#[cfg(not(feature = "forward-secret"))]
fn fs_consistent(_: u8, _: bool) -> bool {
    true
}

impl NodeRecord {
    /// Writes the record into `out`. Store it before transmitting any
    /// message the node made since the last save.
    pub fn to_image(&self, out: &mut [u8; IMAGE_LEN]) {
        let (body, sum) = out.split_at_mut(BODY_LEN);
        write_body(self, body);
        sum.copy_from_slice(&checksum(body));
    }

    /// Reads a record from an image made by [`NodeRecord::to_image`]. Fails
    /// with [`Error::ImageMagic`], [`Error::ImageVersion`],
    /// [`Error::ImageLength`], [`Error::ImageChecksum`] or
    /// [`Error::ImageInvalid`], in that order of checking.
    pub fn from_image(image: &[u8]) -> Result<Self> {
        let record = Self::decode_image(image);
        // Parsing moved the seed through a few frames: wipe them.
        scrub_stack();
        record
    }

    /// [`NodeRecord::from_image`] without the stack wipe (the caller wipes).
    #[inline(never)]
    pub(crate) fn decode_image(image: &[u8]) -> Result<Self> {
        match image.split_first_chunk::<5>() {
            Some((head, _)) if head[..4] != IMAGE_MAGIC => return Err(Error::ImageMagic),
            Some((head, _)) if head[4] != IMAGE_VERSION && head[4] != 1 => {
                return Err(Error::ImageVersion(head[4]));
            }
            Some(_) => {}
            None => return Err(Error::ImageLength),
        }
        let body_len = if image.get(4) == Some(&1) {
            BODY_LEN_V1
        } else {
            BODY_LEN
        };
        if image.len() != body_len + CHECKSUM_LEN {
            return Err(Error::ImageLength);
        }
        let (body, sum) = image.split_at(body_len);
        if !bool::from(checksum(body).ct_eq(sum)) {
            return Err(Error::ImageChecksum);
        }
        read_state(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_fills_the_body_exactly() {
        let mut body = [0xeeu8; BODY_LEN + 8];
        assert_eq!(write_body(&NodeRecord::blank(), &mut body), BODY_LEN);
        assert_eq!(body[BODY_LEN..], [0xee; 8]);
    }

    #[test]
    fn layout_offsets_match_the_table() {
        assert_eq!(BODY_LEN_V1, 1161);
        assert_eq!(IMAGE_LEN, 1226);
        let mut st = NodeRecord::blank();
        st.device = DeviceId([0xd0; 8]);
        st.epoch = 0xe1;
        st.node_time = 0x0a0b_0c0d;
        st.seed = KeySeed::from_bytes(&[0x5e; SEED_LEN], 0x07ea);
        st.pending = Some(Pending {
            generation: 0x99,
            t: 1,
            r: 2,
            base_year: 3,
            under_update: false,
            input: SeedInput([0x1b; SEED_INPUT_LEN]),
            #[cfg(feature = "forward-secret")]
            fs: None,
        });
        st.audience_count = 1;
        st.audiences[0] = Audience([0xa0; 8]);
        let mut out = [0u8; IMAGE_LEN];
        write_body(&st, &mut out);
        assert_eq!(out[0..4], *b"MCNI");
        assert_eq!(out[6], F_PENDING);
        assert_eq!(out[7..15], [0xd0; 8]);
        assert_eq!(out[15], 0xe1);
        assert_eq!(out[18..22], [0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(out[47..49], [0x07, 0xea]);
        assert_eq!(out[49..1025], [0x5e; SEED_LEN]);
        assert_eq!(out[1025], 0x99);
        assert_eq!(out[1040..1072], [0x1b; 32]);
        assert_eq!(out[1128], 1);
        assert_eq!(out[1129..1137], [0xa0; 8]);
    }
}
