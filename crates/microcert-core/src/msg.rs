//! The seven message types (PROTOCOL.md section 5): decoders that borrow
//! from the input and encoders that write into a caller's buffer.
//!
//! Every message is `H || body || tag`. The [`Codec`] trait holds what all
//! seven share (header, type, suite and exact-length checks, length,
//! encoding); each type only says how its body is read and written.
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
//! | 5 | [`EnrollFs`] (v1.2) | public key(33), ciphertext(978), CCM tag, tag | 1,050 | 1,066 |
//! | 6 | [`Command`] | counter(4), opcode(1), tag | 36 | 44 |
//! | 6 | [`Command`] UPDATE_SEED_FS (v1.2) | counter(4), opcode(1), public key(33), tag | 69 | 77 |
//! | 7 | [`Receipt`] | ref(8), status(1), tag | 40 | 48 |

use core::fmt;

use crate::wire::{HEADER_LEN, Header, MsgType};
pub use crate::wire::{Reader, Writer};
use crate::{Error, Result};

/// Length of a challenge: 8 random bytes and an 8-byte MAC.
pub const CHALLENGE_LEN: usize = 16;
/// Length of an ENROLL plaintext: the seed and its base year.
pub const ENROLL_PLAINTEXT_LEN: usize = crate::secret::SEED_LEN + 2;
/// Longest SEALED plaintext (CCM with a 13-byte nonce).
pub const MAX_SEALED_PLAINTEXT: usize = 65_535;
/// Length of an ephemeral P-256 public key on the wire (SEC1 compressed)
/// in a forward-secret update (v1.2).
pub const FS_PUBLIC_LEN: usize = 33;

/// A COMMAND opcode.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Opcode(u8);

impl Opcode {
    /// Make a fresh seed and answer with an ENROLL of generation + 1.
    pub const UPDATE_SEED: Opcode = Opcode(1);
    /// Answer with a RECEIPT, then zeroize every key.
    pub const REVOKE: Opcode = Opcode(2);
    /// v1.2: a forward-secret seed update. The COMMAND carries the
    /// center's ephemeral P-256 public key; the node answers with an
    /// [`EnrollFs`] of generation + 1.
    pub const UPDATE_SEED_FS: Opcode = Opcode(3);

    /// The opcode of a byte, if it is defined.
    pub const fn new(v: u8) -> Result<Self> {
        match v {
            1..=3 => Ok(Opcode(v)),
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
            2 => "REVOKE",
            _ => "UPDATE_SEED_FS",
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

/// The encoding shared by the seven message types, after rustls'
/// `codec::Codec`: `H || body || tag`, where the body is the type's own
/// fields and the tag is the suite's MAC or CCM tag.
///
/// An implementation says only how its body is read and written; decoding
/// (header, type, suite, exact length), the length and the encoding are
/// the provided methods, the same for every type. The trait is sealed:
/// the seven types of this module are its only implementations. Each type
/// also has inherent `decode`, `len` and `encode` that forward here, so a
/// caller need not import the trait.
pub trait Codec<'a>: Sized + private::Sealed {
    /// The message type written into, and expected in, the header.
    const TYPE: MsgType;
    /// Length of the body of a fixed-length type; `None` for SEALED, whose
    /// body is everything between the header and the tag.
    const BODY_LEN: Option<usize>;

    /// The header.
    fn header(&self) -> &Header;
    /// The MAC or CCM tag.
    fn tag(&self) -> &'a [u8];
    /// Length of the body (the bytes between the header and the tag):
    /// [`Codec::BODY_LEN`] for a fixed-length type.
    fn body_len(&self) -> usize {
        Self::BODY_LEN.unwrap_or(0)
    }
    /// Builds the message from its header, its body and its tag. The body
    /// has the length [`Codec::BODY_LEN`]; [`Codec::decode`] checks that
    /// the reader is used up.
    fn read_body(header: Header, body: &mut Reader<'a>, tag: &'a [u8]) -> Result<Self>;
    /// Writes the body; [`Codec::encode`] checked the room.
    fn write_body(&self, w: &mut Writer<'_>);

    /// Decodes a message of this type, of exactly the right length: short
    /// input and trailing bytes are both [`Error::Length`], checked before
    /// any field of the body.
    fn decode(bytes: &'a [u8]) -> Result<Self> {
        let (header, mut rd) = after_header(bytes, Self::TYPE)?;
        let rest = rd.rest();
        let tag_len = header.suite.tag_len();
        if rest.len() < tag_len || Self::BODY_LEN.is_some_and(|n| rest.len() != n + tag_len) {
            return Err(Error::Length);
        }
        let (body, tag) = rest.split_at(rest.len() - tag_len);
        let mut body = Reader::new(body);
        let msg = Self::read_body(header, &mut body, tag)?;
        body.finish()?;
        Ok(msg)
    }

    /// Encoded length.
    fn len(&self) -> usize {
        HEADER_LEN + self.body_len() + self.header().suite.tag_len()
    }

    /// Never empty; present for clippy's sake.
    fn is_empty(&self) -> bool {
        false
    }

    /// Writes the message into `out`, returning its length. A tag of the
    /// wrong length for the suite is [`Error::Length`], a SEALED body over
    /// 65,535 bytes [`Error::PlaintextTooLong`], a short `out`
    /// [`Error::BufferTooSmall`]; on error nothing is written.
    fn encode(&self, out: &mut [u8]) -> Result<usize> {
        if self.tag().len() != self.header().suite.tag_len() {
            return Err(Error::Length);
        }
        if self.body_len() > MAX_SEALED_PLAINTEXT {
            return Err(Error::PlaintextTooLong);
        }
        let mut w = Writer::new(out, self.len())?;
        w.put(&self.header().to_bytes(Self::TYPE));
        self.write_body(&mut w);
        w.put(self.tag());
        Ok(w.done())
    }
}

mod private {
    pub trait Sealed {}
    impl Sealed for super::Auth<'_> {}
    impl Sealed for super::AuthResponse<'_> {}
    impl Sealed for super::Signature<'_> {}
    impl Sealed for super::Sealed<'_> {}
    impl Sealed for super::Enroll<'_> {}
    impl Sealed for super::EnrollFs<'_> {}
    impl Sealed for super::Command<'_> {}
    impl Sealed for super::Receipt<'_> {}
}

/// Inherent `decode`, `len`, `is_empty` and `encode` forwarding to
/// [`Codec`], so that callers need not import the trait.
macro_rules! inherent_codec {
    ($($ty:ident),*) => {$(
        impl<'a> $ty<'a> {
            /// Decodes a message of this type ([`Codec::decode`]).
            pub fn decode(bytes: &'a [u8]) -> Result<Self> {
                <Self as Codec<'a>>::decode(bytes)
            }

            /// Encoded length ([`Codec::len`]).
            pub fn len(&self) -> usize {
                <Self as Codec<'a>>::len(self)
            }

            /// Never empty; present for clippy's sake.
            pub fn is_empty(&self) -> bool {
                false
            }

            /// Writes the message into `out`, returning its length
            /// ([`Codec::encode`]).
            pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
                <Self as Codec<'a>>::encode(self, out)
            }
        }
    )*};
}

inherent_codec!(
    Auth,
    AuthResponse,
    Signature,
    Sealed,
    Enroll,
    EnrollFs,
    Command,
    Receipt
);

/// The `header` and `tag` accessors of a type whose fields have those names.
macro_rules! header_and_tag {
    () => {
        fn header(&self) -> &Header {
            &self.header
        }

        fn tag(&self) -> &'a [u8] {
            self.tag
        }
    };
}

/// The [`Codec`] of a type whose body is empty (`H || tag`).
macro_rules! tag_only_codec {
    ($ty:ident, $msg:expr) => {
        impl<'a> Codec<'a> for $ty<'a> {
            const TYPE: MsgType = $msg;
            const BODY_LEN: Option<usize> = Some(0);
            header_and_tag!();

            fn read_body(header: Header, _: &mut Reader<'a>, tag: &'a [u8]) -> Result<Self> {
                Ok($ty { header, tag })
            }

            fn write_body(&self, _: &mut Writer<'_>) {}
        }
    };
}

/// The [`Codec`] of a type whose body is one byte array, `field`, of `len`
/// bytes (`H || field || tag`).
macro_rules! array_codec {
    ($ty:ident, $msg:expr, $field:ident, $len:expr) => {
        impl<'a> Codec<'a> for $ty<'a> {
            const TYPE: MsgType = $msg;
            const BODY_LEN: Option<usize> = Some($len);
            header_and_tag!();

            fn read_body(header: Header, body: &mut Reader<'a>, tag: &'a [u8]) -> Result<Self> {
                let $field = body.take_array::<{ $len }>()?;
                Ok($ty {
                    header,
                    $field,
                    tag,
                })
            }

            fn write_body(&self, w: &mut Writer<'_>) {
                w.put(self.$field);
            }
        }
    };
}

/// Parses the header of `bytes`, checks it is of type `ty`, and returns a
/// reader positioned after it.
fn after_header(bytes: &[u8], ty: MsgType) -> Result<(Header, Reader<'_>)> {
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

/// AUTH: `H || tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Auth<'a> {
    /// The header.
    pub header: Header,
    /// tag(Kauth, H || aud).
    pub tag: &'a [u8],
}

tag_only_codec!(Auth, MsgType::AUTH);

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

array_codec!(
    AuthResponse,
    MsgType::AUTH_RESPONSE,
    challenge,
    CHALLENGE_LEN
);

/// SIGNATURE: `H || tag`; the signed data travels beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature<'a> {
    /// The header.
    pub header: Header,
    /// tag(Ksign, H || SHA-256(data)).
    pub tag: &'a [u8],
}

impl<'a> Signature<'a> {
    /// Decodes a SIGNATURE at the start of `bytes` and returns the bytes
    /// after it (the signed data, in the `/v1/verify` binding).
    pub fn decode_prefix(bytes: &'a [u8]) -> Result<(Self, &'a [u8])> {
        let (header, mut rd) = after_header(bytes, MsgType::SIGNATURE)?;
        let tag = rd.take(header.suite.tag_len())?;
        Ok((Signature { header, tag }, rd.rest()))
    }
}

tag_only_codec!(Signature, MsgType::SIGNATURE);

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

impl<'a> Codec<'a> for Sealed<'a> {
    const TYPE: MsgType = MsgType::SEALED;
    const BODY_LEN: Option<usize> = None;
    header_and_tag!();

    fn body_len(&self) -> usize {
        self.ciphertext.len()
    }

    fn read_body(header: Header, body: &mut Reader<'a>, tag: &'a [u8]) -> Result<Self> {
        let ciphertext = body.rest();
        if ciphertext.len() > MAX_SEALED_PLAINTEXT {
            return Err(Error::Length);
        }
        Ok(Sealed {
            header,
            ciphertext,
            tag,
        })
    }

    fn write_body(&self, w: &mut Writer<'_>) {
        w.put(self.ciphertext);
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

array_codec!(Enroll, MsgType::ENROLL, ciphertext, ENROLL_PLAINTEXT_LEN);

/// ENROLL of a forward-secret update (v1.2), the answer to UPDATE_SEED_FS:
/// `H || Qn(33) || CCM(Kfs, nonce, aad = H || Qn, seed || base_year) ||
/// tag(Kupd, H || Qn || ciphertext || CCM tag)`. Same message type as
/// [`Enroll`]; the two are told apart by their length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnrollFs<'a> {
    /// The header; its generation is the new seed's.
    pub header: Header,
    /// The node's ephemeral public key (SEC1 compressed).
    pub ephemeral: &'a [u8; FS_PUBLIC_LEN],
    /// The encrypted seed (976 bytes) and base year (2 bytes).
    pub ciphertext: &'a [u8; ENROLL_PLAINTEXT_LEN],
    /// The CCM tag (the suite's tag length).
    pub ccm_tag: &'a [u8],
    /// The MAC under Kupd of the current seed.
    pub tag: &'a [u8],
}

impl<'a> Codec<'a> for EnrollFs<'a> {
    const TYPE: MsgType = MsgType::ENROLL;
    const BODY_LEN: Option<usize> = None;
    header_and_tag!();

    fn body_len(&self) -> usize {
        FS_PUBLIC_LEN + ENROLL_PLAINTEXT_LEN + self.ccm_tag.len()
    }

    fn read_body(header: Header, body: &mut Reader<'a>, tag: &'a [u8]) -> Result<Self> {
        let tag_len = header.suite.tag_len();
        if body.remaining() != FS_PUBLIC_LEN + ENROLL_PLAINTEXT_LEN + tag_len {
            return Err(Error::Length);
        }
        let ephemeral = body.take_array::<FS_PUBLIC_LEN>()?;
        let ciphertext = body.take_array::<ENROLL_PLAINTEXT_LEN>()?;
        let ccm_tag = body.take(tag_len)?;
        Ok(EnrollFs {
            header,
            ephemeral,
            ciphertext,
            ccm_tag,
            tag,
        })
    }

    fn write_body(&self, w: &mut Writer<'_>) {
        w.put(self.ephemeral);
        w.put(self.ciphertext);
        w.put(self.ccm_tag);
    }
}

/// COMMAND: `H || counter(4) || opcode(1) || tag`, or for
/// UPDATE_SEED_FS (v1.2) `H || counter(4) || opcode(1) || public key(33) || tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command<'a> {
    /// The header.
    pub header: Header,
    /// The per-device command counter.
    pub counter: u32,
    /// What the node is told to do.
    pub opcode: Opcode,
    /// The center's ephemeral public key (SEC1 compressed): present
    /// exactly when the opcode is UPDATE_SEED_FS.
    pub ephemeral: Option<&'a [u8; FS_PUBLIC_LEN]>,
    /// tag(Kcmd, H || counter || opcode [|| public key]).
    pub tag: &'a [u8],
}

/// Body length of a COMMAND without and with a public key.
const COMMAND_BODY: usize = 5;
const COMMAND_FS_BODY: usize = COMMAND_BODY + FS_PUBLIC_LEN;

impl<'a> Codec<'a> for Command<'a> {
    const TYPE: MsgType = MsgType::COMMAND;
    const BODY_LEN: Option<usize> = None;
    header_and_tag!();

    fn body_len(&self) -> usize {
        if self.ephemeral.is_some() {
            COMMAND_FS_BODY
        } else {
            COMMAND_BODY
        }
    }

    /// The length is checked first: a COMMAND of neither length is
    /// [`Error::Length`] whatever its opcode byte; then the opcode, then
    /// that the length is the opcode's.
    fn read_body(header: Header, body: &mut Reader<'a>, tag: &'a [u8]) -> Result<Self> {
        let len = body.remaining();
        if len != COMMAND_BODY && len != COMMAND_FS_BODY {
            return Err(Error::Length);
        }
        let counter = u32::from_be_bytes(*body.take_array::<4>()?);
        let opcode = Opcode::new(body.take_array::<1>()?[0])?;
        let fs = opcode == Opcode::UPDATE_SEED_FS;
        if fs != (len == COMMAND_FS_BODY) {
            return Err(Error::Length);
        }
        let ephemeral = if fs {
            Some(body.take_array::<FS_PUBLIC_LEN>()?)
        } else {
            None
        };
        Ok(Command {
            header,
            counter,
            opcode,
            ephemeral,
            tag,
        })
    }

    fn write_body(&self, w: &mut Writer<'_>) {
        w.put(&self.counter.to_be_bytes());
        w.put(&[self.opcode.get()]);
        if let Some(q) = self.ephemeral {
            w.put(q);
        }
    }
}

/// RECEIPT: `H || ref(8) || status(1) || tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt<'a> {
    /// The header.
    pub header: Header,
    /// The r of the message this receipt answers.
    pub reference: u64,
    /// 0 = ok, anything else an error code (docs/protocol.md, "RECEIPT
    /// status codes").
    pub status: u8,
    /// tag(Krcpt-c or Krcpt-n, H || ref || status).
    pub tag: &'a [u8],
}

impl<'a> Codec<'a> for Receipt<'a> {
    const TYPE: MsgType = MsgType::RECEIPT;
    const BODY_LEN: Option<usize> = Some(9);
    header_and_tag!();

    fn read_body(header: Header, body: &mut Reader<'a>, tag: &'a [u8]) -> Result<Self> {
        let reference = u64::from_be_bytes(*body.take_array::<8>()?);
        let status = body.take_array::<1>()?[0];
        Ok(Receipt {
            header,
            reference,
            status,
            tag,
        })
    }

    fn write_body(&self, w: &mut Writer<'_>) {
        w.put(&self.reference.to_be_bytes());
        w.put(&[self.status]);
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

/// Evaluates `$e` with `$m` bound to the message inside any variant.
macro_rules! each_message {
    ($msg:expr, $m:ident => $e:expr) => {
        match $msg {
            Message::Auth($m) => $e,
            Message::AuthResponse($m) => $e,
            Message::Signature($m) => $e,
            Message::Sealed($m) => $e,
            Message::Enroll($m) => $e,
            Message::Command($m) => $e,
            Message::Receipt($m) => $e,
        }
    };
}

/// The message type of a [`Codec`] value.
fn type_of<'a, C: Codec<'a>>(_: &C) -> MsgType {
    C::TYPE
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
        each_message!(self, m => type_of(m))
    }

    /// The message's header.
    pub fn header(&self) -> &Header {
        each_message!(self, m => &m.header)
    }

    /// Writes the message into `out`, returning its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize> {
        each_message!(self, m => m.encode(out))
    }
}
