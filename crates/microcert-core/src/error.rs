//! The one error type of the protocol core.

use core::fmt;

use crate::lifecycle::{Event, KeyState};

/// Everything that can go wrong while encoding, decoding, making or checking
/// a message.
///
/// A failed tag, a failed AEAD and a failed challenge are all the same
/// [`Error::Verification`]: the caller learns that a message is not authentic,
/// never which byte or which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The input is too short or too long for its message type, or has
    /// trailing bytes.
    Length,
    /// The version nibble of the first byte is not 1 (the value found).
    Version(u8),
    /// The type nibble names no message type (the value found).
    UnknownType(u8),
    /// The suite byte names no supported suite (the value found).
    UnknownSuite(u8),
    /// A COMMAND carries an opcode this version does not know (the value found).
    UnknownOpcode(u8),
    /// The message is of another type than the operation expects.
    WrongType {
        /// The type the operation expects.
        expected: u8,
        /// The type found in the header.
        found: u8,
    },
    /// The date of `t` is before the seed's first year.
    SeedNotYetValid,
    /// The date of `t` is after the seed's fifth year.
    SeedExpired,
    /// The output buffer is too small for the message.
    BufferTooSmall,
    /// A SEALED plaintext is longer than 65,535 bytes.
    PlaintextTooLong,
    /// A SEALED message may not be addressed to the center (audience 0^8).
    CenterAudience,
    /// A KDF output length of zero, or too long for a 32-bit counter.
    OutputLength,
    /// The message, challenge or data is not authentic. Deliberately opaque.
    Verification,
    /// A life-cycle event that is not allowed in the current state.
    IllegalTransition {
        /// The state the key was in.
        from: KeyState,
        /// The event that was refused.
        event: Event,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Length => f.write_str("message length does not match its type"),
            Error::Version(v) => write!(f, "unsupported protocol version {v}"),
            Error::UnknownType(t) => write!(f, "unknown message type {t:#x}"),
            Error::UnknownSuite(s) => write!(f, "unknown suite {s:#04x}"),
            Error::UnknownOpcode(o) => write!(f, "unknown command opcode {o:#04x}"),
            Error::WrongType { expected, found } => {
                write!(f, "expected message type {expected}, found {found}")
            }
            Error::SeedNotYetValid => f.write_str("time is before the seed's first year"),
            Error::SeedExpired => f.write_str("time is after the seed's last year"),
            Error::BufferTooSmall => f.write_str("output buffer too small"),
            Error::PlaintextTooLong => f.write_str("plaintext longer than 65535 bytes"),
            Error::CenterAudience => f.write_str("a sealed message needs a relying party audience"),
            Error::OutputLength => f.write_str("invalid KDF output length"),
            Error::Verification => f.write_str("verification failed"),
            Error::IllegalTransition { from, event } => {
                write!(f, "illegal life-cycle transition: {event} in state {from}")
            }
        }
    }
}

impl core::error::Error for Error {}

/// Result with the core's [`Error`].
pub type Result<T> = core::result::Result<T, Error>;
