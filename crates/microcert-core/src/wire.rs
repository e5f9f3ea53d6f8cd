//! Identifiers and the 23-byte header common to every message
//! (PROTOCOL.md sections 1 and 4).

use core::fmt;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Length of the common header.
pub const HEADER_LEN: usize = 23;
/// Protocol version carried in the high nibble of the first byte.
pub const VERSION: u8 = 1;

/// A device's EUI-64.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DeviceId(pub [u8; 8]);

impl DeviceId {
    /// The id as a big-endian integer.
    pub const fn to_u64(self) -> u64 {
        u64::from_be_bytes(self.0)
    }

    /// The id of a big-endian integer.
    pub const fn from_u64(v: u64) -> Self {
        DeviceId(v.to_be_bytes())
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.to_u64())
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

/// Who a message is meant for: 0^8 is the center itself, otherwise
/// SHA-256("MC-AUD" || relying party name)[0..8].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Audience(pub [u8; 8]);

impl Audience {
    /// The center itself.
    pub const CENTER: Audience = Audience([0; 8]);

    /// The audience of a relying party, from its exact UTF-8 name.
    pub fn relying_party(name: &str) -> Self {
        let digest = Sha256::new()
            .chain_update(b"MC-AUD")
            .chain_update(name.as_bytes())
            .finalize();
        let mut aud = [0u8; 8];
        aud.copy_from_slice(&digest[..8]);
        Audience(aud)
    }

    /// True for the center's audience 0^8.
    pub fn is_center(&self) -> bool {
        self.0 == [0; 8]
    }
}

impl fmt::Debug for Audience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Audience({:016x})", u64::from_be_bytes(self.0))
    }
}

/// A message type (low nibble of the first header byte).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsgType(u8);

impl MsgType {
    /// AUTH: node to center or relying party.
    pub const AUTH: MsgType = MsgType(1);
    /// AUTH_RESPONSE: node to center, answering a challenge.
    pub const AUTH_RESPONSE: MsgType = MsgType(2);
    /// SIGNATURE: node to anyone, over data sent beside it.
    pub const SIGNATURE: MsgType = MsgType(3);
    /// SEALED: AES-CCM encrypted data for a relying party.
    pub const SEALED: MsgType = MsgType(4);
    /// ENROLL: a new seed for the center.
    pub const ENROLL: MsgType = MsgType(5);
    /// COMMAND: center to node.
    pub const COMMAND: MsgType = MsgType(6);
    /// RECEIPT: either way, answering a message.
    pub const RECEIPT: MsgType = MsgType(7);

    /// The type of a nibble value, if one is defined.
    pub const fn new(v: u8) -> Result<Self> {
        match v {
            1..=7 => Ok(MsgType(v)),
            _ => Err(Error::UnknownType(v)),
        }
    }

    /// The nibble value.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The protocol name of the type.
    pub const fn name(self) -> &'static str {
        match self.0 {
            1 => "AUTH",
            2 => "AUTH_RESPONSE",
            3 => "SIGNATURE",
            4 => "SEALED",
            5 => "ENROLL",
            6 => "COMMAND",
            7 => "RECEIPT",
            _ => "UNKNOWN",
        }
    }
}

impl fmt::Debug for MsgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({:#x})", self.name(), self.0)
    }
}

/// A crypto suite. Only the suites defined in PROTOCOL.md section 4 can be
/// constructed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Suite(u8);

impl Suite {
    /// 0x01: AES-128-CMAC truncated to 8 bytes, AES-128-CCM with an 8-byte tag.
    pub const CMAC64: Suite = Suite(0x01);
    /// 0x02: AES-128-CMAC with 16-byte tags, AES-128-CCM with a 16-byte tag.
    pub const CMAC128: Suite = Suite(0x02);

    /// The suite of an id byte, if it is supported.
    pub const fn new(id: u8) -> Result<Self> {
        match id {
            0x01 | 0x02 => Ok(Suite(id)),
            _ => Err(Error::UnknownSuite(id)),
        }
    }

    /// The id byte.
    pub const fn id(self) -> u8 {
        self.0
    }

    /// Length of a MAC tag and of a CCM tag in this suite.
    pub const fn tag_len(self) -> usize {
        match self.0 {
            0x01 => 8,
            _ => 16,
        }
    }
}

impl fmt::Debug for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Suite({:#04x})", self.0)
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#04x}", self.0)
    }
}

/// The fields of the common header other than version and type, which the
/// message type itself fixes.
///
/// | offset | bytes | field |
/// | --- | --- | --- |
/// | 0 | 1 | version (high nibble, 1) and type (low nibble) |
/// | 1 | 1 | suite |
/// | 2 | 8 | device id |
/// | 10 | 1 | generation |
/// | 11 | 4 | t, Unix seconds |
/// | 15 | 8 | r |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// The crypto suite.
    pub suite: Suite,
    /// The node's EUI-64.
    pub device: DeviceId,
    /// The seed generation that keys the message.
    pub generation: u8,
    /// Seconds since 1970-01-01T00:00:00Z.
    pub t: u32,
    /// A 64-bit random number drawn for this one use.
    pub r: u64,
}

impl Header {
    /// The 23 header bytes of a message of type `ty`.
    pub fn to_bytes(&self, ty: MsgType) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = (VERSION << 4) | ty.get();
        b[1] = self.suite.id();
        b[2..10].copy_from_slice(&self.device.0);
        b[10] = self.generation;
        b[11..15].copy_from_slice(&self.t.to_be_bytes());
        b[15..23].copy_from_slice(&self.r.to_be_bytes());
        b
    }

    /// Parses the header at the start of `bytes`: version, type and suite
    /// are checked, the length of the rest is not.
    pub fn parse(bytes: &[u8]) -> Result<(MsgType, Header)> {
        let mut rd = Reader::new(bytes);
        let b0 = rd.take_array::<1>()?[0];
        if b0 >> 4 != VERSION {
            return Err(Error::Version(b0 >> 4));
        }
        let ty = MsgType::new(b0 & 0x0f)?;
        let suite = Suite::new(rd.take_array::<1>()?[0])?;
        let device = DeviceId(*rd.take_array::<8>()?);
        let generation = rd.take_array::<1>()?[0];
        let t = u32::from_be_bytes(*rd.take_array::<4>()?);
        let r = u64::from_be_bytes(*rd.take_array::<8>()?);
        Ok((
            ty,
            Header {
                suite,
                device,
                generation,
                t,
                r,
            },
        ))
    }

    /// The KDF Context: device id || generation || t || r (21 bytes).
    pub fn context(&self) -> [u8; 21] {
        let mut c = [0u8; 21];
        c[..8].copy_from_slice(&self.device.0);
        c[8] = self.generation;
        c[9..13].copy_from_slice(&self.t.to_be_bytes());
        c[13..].copy_from_slice(&self.r.to_be_bytes());
        c
    }

    /// The CCM nonce: t || r || 0x00 (13 bytes).
    pub fn nonce(&self) -> [u8; 13] {
        let mut n = [0u8; 13];
        n[..4].copy_from_slice(&self.t.to_be_bytes());
        n[4..12].copy_from_slice(&self.r.to_be_bytes());
        n
    }
}

/// A cursor over a borrowed byte slice, after rustls' `codec::Reader`.
/// Reading never panics: asking for more than is left is [`Error::Length`].
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::Length);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The next `N` bytes as an array.
    pub fn take_array<const N: usize>(&mut self) -> Result<&'a [u8; N]> {
        let (head, rest) = self.buf.split_first_chunk::<N>().ok_or(Error::Length)?;
        self.buf = rest;
        Ok(head)
    }

    /// How many bytes are left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.buf)
    }

    /// Fails when bytes are left over.
    pub fn finish(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::Length)
        }
    }
}

/// A cursor writing into a caller's buffer whose room was checked once,
/// for the whole message, when it was made (only this crate makes one).
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(buf: &'a mut [u8], len: usize) -> Result<Self> {
        if buf.len() < len {
            return Err(Error::BufferTooSmall);
        }
        Ok(Writer { buf, pos: 0 })
    }

    /// Writes `bytes`; the length was checked by the constructor.
    pub(crate) fn put(&mut self, bytes: &[u8]) {
        self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }

    pub(crate) fn done(self) -> usize {
        self.pos
    }
}
