//! The seven message types (PROTOCOL.md section 5): decoders that borrow
//! from the input and encoders that write into a caller's buffer.
//!
//! Every decoder checks version, type and suite, then the exact length of
//! the rest: short input and trailing bytes are both [`Error::Length`].
//!
//! | type | message | bytes after the 23-byte header | suite 0x01 | suite 0x02 |
//! | --- | --- | --- | --- | --- |
//! | 1 | [`Auth`] | tag | 31 | 39 |
//! | 2 | [`AuthResponse`] | challenge(16), tag | 47 | 55 |
//! | 3 | [`Signature`] | tag | 31 | 39 |
//! | 4 | [`Sealed`] | ciphertext (0 to 65,535), CCM tag | 31 + n | 39 + n |
//! | 5 | [`Enroll`] | ciphertext(978), CCM tag | 1,009 | 1,017 |
//! | 6 | [`Command`] | counter(4), opcode(1), tag | 36 | 44 |
//! | 7 | [`Receipt`] | ref(8), status(1), tag | 40 | 48 |

use core::fmt;

use crate::wire::{HEADER_LEN, Header, MsgType, Reader, Writer};
use crate::{Error, Result};

/// Length of a challenge: 8 random bytes and an 8-byte MAC.
pub const CHALLENGE_LEN: usize = 16;
/// Length of an ENROLL plaintext: the seed and its base year.
pub const ENROLL_PLAINTEXT_LEN: usize = crate::secret::SEED_LEN + 2;
/// Longest SEALED plaintext (CCM with a 13-byte nonce).
pub const MAX_SEALED_PLAINTEXT: usize = 65_535;

/// A COMMAND opcode.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Opcode(u8);

impl Opcode {
    /// Make a fresh seed and answer with an ENROLL of generation + 1.
    pub const UPDATE_SEED: Opcode = Opcode(1);
    /// Answer with a RECEIPT, then zeroize every key.
    pub const REVOKE: Opcode = Opcode(2);

    /// The opcode of a byte, if it is defined.
    pub const fn new(v: u8) -> Result<Self> {
        match v {
            1 | 2 => Ok(Opcode(v)),
            _ => Err(Error::UnknownOpcode(v)),
        }
    }

    /// The opcode byte.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The protocol name of the opcode.
    pub const fn name(self) -> &'static str {
        match self.0 {
            1 => "UPDATE_SEED",
            _ => "REVOKE",
        }
    }
}

impl fmt::Debug for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

/// Who sends a RECEIPT; each side has its own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// The center (Krcpt-c).
    Center,
    /// A node (Krcpt-n).
    Node,
}

/// Parses the header of `bytes`, checks it is of type `ty`, and returns a
/// reader positioned after it.
fn body(bytes: &[u8], ty: MsgType) -> Result<(Header, Reader<'_>)> {
    let (found, header) = Header::parse(bytes)?;
    if found != ty {
        return Err(Error::WrongType {
            expected: ty.get(),
            found: found.get(),
        });
    }
    let mut rd = Reader::new(bytes);
    rd.take(HEADER_LEN)?;
    Ok((header, rd))
}

fn check_tag_len(header: &Header, tag: &[u8]) -> Result<()> {
    if tag.len() == header.suite.tag_len() {
        Ok(())
    } else {
        Err(Error::Length)
    }
}

/// AUTH: `H || tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Auth<'a> {
    /// The header.
    pub header: Header,
    /// tag(Kauth, H || aud).
    pub tag: &'a [u8],
}

impl<'a> Auth<'a> {
    /// Decodes an AUTH of exactly the right length.
    pub fn decode(bytes: &'a [u8]) -> Result<Self> {
        let (header, mut rd) = body(bytes, MsgType::AUTH)?;
        let tag = rd.take(header.suite.tag_len())?;
        rd.finish()?;
        Ok(Auth { header, tag })
    }

    /// Encoded length.
    pub fn len(&self) -> usize {
        HEADER_LEN + self.header.suite.tag_len()
    }

    /// Never empty; present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the message into `out`, returning its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
        check_tag_len(&self.header, self.tag)?;
        let mut w = Writer::new(out, self.len())?;
        w.put(&self.header.to_bytes(MsgType::AUTH));
        w.put(self.tag);
        Ok(w.done())
    }
}

/// AUTH_RESPONSE: `H || challenge(16) || tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthResponse<'a> {
    /// The header.
    pub header: Header,
    /// The challenge the center issued.
    pub challenge: &'a [u8; CHALLENGE_LEN],
    /// tag(Kauth, H || challenge || aud).
    pub tag: &'a [u8],
}

impl<'a> AuthResponse<'a> {
    /// Decodes an AUTH_RESPONSE of exactly the right length.
    pub fn decode(bytes: &'a [u8]) -> Result<Self> {
        let (header, mut rd) = body(bytes, MsgType::AUTH_RESPONSE)?;
        let challenge = rd.take_array::<CHALLENGE_LEN>()?;
        let tag = rd.take(header.suite.tag_len())?;
        rd.finish()?;
        Ok(AuthResponse {
            header,
            challenge,
            tag,
        })
    }

    /// Encoded length.
    pub fn len(&self) -> usize {
        HEADER_LEN + CHALLENGE_LEN + self.header.suite.tag_len()
    }

    /// Never empty; present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the message into `out`, returning its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
        check_tag_len(&self.header, self.tag)?;
        let mut w = Writer::new(out, self.len())?;
        w.put(&self.header.to_bytes(MsgType::AUTH_RESPONSE));
        w.put(self.challenge);
        w.put(self.tag);
        Ok(w.done())
    }
}

/// SIGNATURE: `H || tag`; the signed data travels beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature<'a> {
    /// The header.
    pub header: Header,
    /// tag(Ksign, H || SHA-256(data)).
    pub tag: &'a [u8],
}

impl<'a> Signature<'a> {
    /// Decodes a SIGNATURE of exactly the right length.
    pub fn decode(bytes: &'a [u8]) -> Result<Self> {
        let (header, mut rd) = body(bytes, MsgType::SIGNATURE)?;
        let tag = rd.take(header.suite.tag_len())?;
        rd.finish()?;
        Ok(Signature { header, tag })
    }

    /// Decodes a SIGNATURE at the start of `bytes` and returns the bytes
    /// after it (the signed data, in the `/v1/verify` binding).
    pub fn decode_prefix(bytes: &'a [u8]) -> Result<(Self, &'a [u8])> {
        let (header, mut rd) = body(bytes, MsgType::SIGNATURE)?;
        let tag = rd.take(header.suite.tag_len())?;
        Ok((Signature { header, tag }, rd.rest()))
    }

    /// Encoded length.
    pub fn len(&self) -> usize {
        HEADER_LEN + self.header.suite.tag_len()
    }

    /// Never empty; present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the message into `out`, returning its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
        check_tag_len(&self.header, self.tag)?;
        let mut w = Writer::new(out, self.len())?;
        w.put(&self.header.to_bytes(MsgType::SIGNATURE));
        w.put(self.tag);
        Ok(w.done())
    }
}

/// SEALED: `H || ciphertext || tag` (AES-128-CCM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed<'a> {
    /// The header.
    pub header: Header,
    /// The ciphertext, as long as the plaintext (at most 65,535 bytes).
    pub ciphertext: &'a [u8],
    /// The CCM tag.
    pub tag: &'a [u8],
}

impl<'a> Sealed<'a> {
    /// Decodes a SEALED message.
    pub fn decode(bytes: &'a [u8]) -> Result<Self> {
        let (header, mut rd) = body(bytes, MsgType::SEALED)?;
        let rest = rd.rest();
        let tag_len = header.suite.tag_len();
        if rest.len() < tag_len || rest.len() - tag_len > MAX_SEALED_PLAINTEXT {
            return Err(Error::Length);
        }
        let (ciphertext, tag) = rest.split_at(rest.len() - tag_len);
        Ok(Sealed {
            header,
            ciphertext,
            tag,
        })
    }

    /// Encoded length.
    pub fn len(&self) -> usize {
        HEADER_LEN + self.ciphertext.len() + self.header.suite.tag_len()
    }

    /// Never empty; present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the message into `out`, returning its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
        check_tag_len(&self.header, self.tag)?;
        if self.ciphertext.len() > MAX_SEALED_PLAINTEXT {
            return Err(Error::PlaintextTooLong);
        }
        let mut w = Writer::new(out, self.len())?;
        w.put(&self.header.to_bytes(MsgType::SEALED));
        w.put(self.ciphertext);
        w.put(self.tag);
        Ok(w.done())
    }
}

/// ENROLL: `H || CCM(K, nonce, aad = H, seed || base_year)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enroll<'a> {
    /// The header; its generation is the new seed's.
    pub header: Header,
    /// The encrypted seed (976 bytes) and base year (2 bytes).
    pub ciphertext: &'a [u8; ENROLL_PLAINTEXT_LEN],
    /// The CCM tag.
    pub tag: &'a [u8],
}

impl<'a> Enroll<'a> {
    /// Decodes an ENROLL of exactly the right length.
    pub fn decode(bytes: &'a [u8]) -> Result<Self> {
        let (header, mut rd) = body(bytes, MsgType::ENROLL)?;
        let ciphertext = rd.take_array::<ENROLL_PLAINTEXT_LEN>()?;
        let tag = rd.take(header.suite.tag_len())?;
        rd.finish()?;
        Ok(Enroll {
            header,
            ciphertext,
            tag,
        })
    }

    /// Encoded length.
    pub fn len(&self) -> usize {
        HEADER_LEN + ENROLL_PLAINTEXT_LEN + self.header.suite.tag_len()
    }

    /// Never empty; present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the message into `out`, returning its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
        check_tag_len(&self.header, self.tag)?;
        let mut w = Writer::new(out, self.len())?;
        w.put(&self.header.to_bytes(MsgType::ENROLL));
        w.put(self.ciphertext);
        w.put(self.tag);
        Ok(w.done())
    }
}

/// COMMAND: `H || counter(4) || opcode(1) || tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command<'a> {
    /// The header.
    pub header: Header,
    /// The per-device command counter.
    pub counter: u32,
    /// What the node is told to do.
    pub opcode: Opcode,
    /// tag(Kcmd, H || counter || opcode).
    pub tag: &'a [u8],
}

impl<'a> Command<'a> {
    /// Decodes a COMMAND of exactly the right length with a known opcode.
    pub fn decode(bytes: &'a [u8]) -> Result<Self> {
        let (header, mut rd) = body(bytes, MsgType::COMMAND)?;
        let counter = u32::from_be_bytes(*rd.take_array::<4>()?);
        let opcode = rd.take_array::<1>()?[0];
        let tag = rd.take(header.suite.tag_len())?;
        rd.finish()?;
        let opcode = Opcode::new(opcode)?;
        Ok(Command {
            header,
            counter,
            opcode,
            tag,
        })
    }

    /// Encoded length.
    pub fn len(&self) -> usize {
        HEADER_LEN + 5 + self.header.suite.tag_len()
    }

    /// Never empty; present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the message into `out`, returning its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
        check_tag_len(&self.header, self.tag)?;
        let mut w = Writer::new(out, self.len())?;
        w.put(&self.header.to_bytes(MsgType::COMMAND));
        w.put(&self.counter.to_be_bytes());
        w.put(&[self.opcode.get()]);
        w.put(self.tag);
        Ok(w.done())
    }
}

/// RECEIPT: `H || ref(8) || status(1) || tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt<'a> {
    /// The header.
    pub header: Header,
    /// The r of the message this receipt answers.
    pub reference: u64,
    /// 0 = ok, anything else an error code.
    pub status: u8,
    /// tag(Krcpt-c or Krcpt-n, H || ref || status).
    pub tag: &'a [u8],
}

impl<'a> Receipt<'a> {
    /// Decodes a RECEIPT of exactly the right length.
    pub fn decode(bytes: &'a [u8]) -> Result<Self> {
        let (header, mut rd) = body(bytes, MsgType::RECEIPT)?;
        let reference = u64::from_be_bytes(*rd.take_array::<8>()?);
        let status = rd.take_array::<1>()?[0];
        let tag = rd.take(header.suite.tag_len())?;
        rd.finish()?;
        Ok(Receipt {
            header,
            reference,
            status,
            tag,
        })
    }

    /// Encoded length.
    pub fn len(&self) -> usize {
        HEADER_LEN + 9 + self.header.suite.tag_len()
    }

    /// Never empty; present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the message into `out`, returning its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
        check_tag_len(&self.header, self.tag)?;
        let mut w = Writer::new(out, self.len())?;
        w.put(&self.header.to_bytes(MsgType::RECEIPT));
        w.put(&self.reference.to_be_bytes());
        w.put(&[self.status]);
        w.put(self.tag);
        Ok(w.done())
    }
}

/// Any message, decoded by its type nibble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// Type 1.
    Auth(Auth<'a>),
    /// Type 2.
    AuthResponse(AuthResponse<'a>),
    /// Type 3.
    Signature(Signature<'a>),
    /// Type 4.
    Sealed(Sealed<'a>),
    /// Type 5.
    Enroll(Enroll<'a>),
    /// Type 6.
    Command(Command<'a>),
    /// Type 7.
    Receipt(Receipt<'a>),
}

impl<'a> Message<'a> {
    /// Decodes any message type.
    pub fn decode(bytes: &'a [u8]) -> Result<Self> {
        let (ty, _) = Header::parse(bytes)?;
        Ok(match ty {
            MsgType::AUTH => Message::Auth(Auth::decode(bytes)?),
            MsgType::AUTH_RESPONSE => Message::AuthResponse(AuthResponse::decode(bytes)?),
            MsgType::SIGNATURE => Message::Signature(Signature::decode(bytes)?),
            MsgType::SEALED => Message::Sealed(Sealed::decode(bytes)?),
            MsgType::ENROLL => Message::Enroll(Enroll::decode(bytes)?),
            MsgType::COMMAND => Message::Command(Command::decode(bytes)?),
            _ => Message::Receipt(Receipt::decode(bytes)?),
        })
    }

    /// The message's type.
    pub fn msg_type(&self) -> MsgType {
        match self {
            Message::Auth(_) => MsgType::AUTH,
            Message::AuthResponse(_) => MsgType::AUTH_RESPONSE,
            Message::Signature(_) => MsgType::SIGNATURE,
            Message::Sealed(_) => MsgType::SEALED,
            Message::Enroll(_) => MsgType::ENROLL,
            Message::Command(_) => MsgType::COMMAND,
            Message::Receipt(_) => MsgType::RECEIPT,
        }
    }

    /// The message's header.
    pub fn header(&self) -> &Header {
        match self {
            Message::Auth(m) => &m.header,
            Message::AuthResponse(m) => &m.header,
            Message::Signature(m) => &m.header,
            Message::Sealed(m) => &m.header,
            Message::Enroll(m) => &m.header,
            Message::Command(m) => &m.header,
            Message::Receipt(m) => &m.header,
        }
    }

    /// Writes the message into `out`, returning its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
        match self {
            Message::Auth(m) => m.encode(out),
            Message::AuthResponse(m) => m.encode(out),
            Message::Signature(m) => m.encode(out),
            Message::Sealed(m) => m.encode(out),
            Message::Enroll(m) => m.encode(out),
            Message::Command(m) => m.encode(out),
            Message::Receipt(m) => m.encode(out),
        }
    }
}
