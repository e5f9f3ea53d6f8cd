//! The one error type of the node.

use core::fmt;

/// Everything a chip can refuse or fail at.
///
/// A message that does not verify is always [`Error::Verification`]: the
/// caller learns that it is not authentic, never which byte or which check
/// failed. No variant carries key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The chip has not been personalized yet: it holds no device id or Ktr.
    NotPersonalized,
    /// The chip is already personalized for this epoch (or a later one), or
    /// it still holds keys of its current epoch: re-personalization needs
    /// the next epoch and a revoked chip, or one that holds no seed.
    AlreadyPersonalized,
    /// The chip was personalized at epoch 255 and can never be
    /// re-personalized.
    FinalEpoch,
    /// A personalization, COMMAND or RECEIPT names another device id.
    WrongDevice,
    /// A message arrived in another suite than the chip's own.
    WrongSuite,
    /// A COMMAND or RECEIPT is keyed by a generation the chip cannot check.
    WrongGeneration,
    /// The chip holds no usable seed yet: enroll first (and wait for the
    /// center's RECEIPT).
    NotEnrolled,
    /// `enroll` was called while the chip holds a seed that still serves
    /// the current date; updates go through an UPDATE_SEED command.
    AlreadyEnrolled,
    /// The chip was revoked: its keys are gone and it refuses everything
    /// but a re-personalization with the next epoch.
    Revoked,
    /// The tamper flag is set: the keys are gone and the chip refuses
    /// everything, for good.
    Tampered,
    /// The node's time is after the seed's fifth year.
    SeedExpired,
    /// The node's time is before the seed's first year.
    SeedNotYetValid,
    /// The seed generation is 255: no further generation exists.
    GenerationsExhausted,
    /// The persisted 32-bit message counter that forms the high half of
    /// every r has reached its end; the chip can issue no further message.
    CounterExhausted,
    /// The entropy source failed to deliver random bytes.
    Entropy,
    /// The random generator's known-answer self-test (SP 800-90A 11.3)
    /// failed: the chip generates nothing.
    SelfTest,
    /// The audience is neither the center nor a configured relying party.
    UnknownAudience,
    /// The audience table is full (see [`crate::MAX_AUDIENCES`]).
    AudienceTableFull,
    /// A SEALED message must go to a relying party, never the center.
    CenterAudience,
    /// A SEALED plaintext is longer than the device class allows.
    PlaintextTooLong,
    /// The output buffer is too small for the message.
    BufferTooSmall,
    /// A COMMAND's counter is not above the highest one accepted: a replay.
    Replay,
    /// A RECEIPT answers no message the chip is waiting on (wrong ref, or
    /// already accepted).
    NotPending,
    /// There is no unanswered message to retransmit.
    NothingToRetransmit,
    /// The center's RECEIPT is authentic but reports an error status (the
    /// value found).
    CenterRefused(u8),
    /// The message is not authentic. Deliberately opaque.
    Verification,
    /// The message could not be decoded (the core's reason).
    Malformed(microcert_core::Error),
    /// An image is not exactly [`crate::IMAGE_LEN`] bytes long.
    ImageLength,
    /// An image does not start with the node image magic bytes.
    ImageMagic,
    /// An image has a format version this build cannot read (the value found).
    ImageVersion(u8),
    /// An image's checksum does not match: it was corrupted.
    ImageChecksum,
    /// An image has a valid checksum but contradictory contents.
    ImageInvalid,
    /// An unexpected failure inside the protocol core (its reason).
    Core(microcert_core::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotPersonalized => f.write_str("chip is not personalized"),
            Error::AlreadyPersonalized => {
                f.write_str("chip is already personalized for this epoch")
            }
            Error::FinalEpoch => f.write_str("chip is at the final epoch 255"),
            Error::WrongDevice => f.write_str("message or personalization for another device"),
            Error::WrongSuite => f.write_str("message in another suite than the chip's"),
            Error::WrongGeneration => f.write_str("message keyed by an unexpected seed generation"),
            Error::NotEnrolled => f.write_str("chip holds no usable seed"),
            Error::AlreadyEnrolled => f.write_str("chip already holds a usable seed"),
            Error::Revoked => f.write_str("chip is revoked"),
            Error::Tampered => f.write_str("chip is tampered"),
            Error::SeedExpired => f.write_str("node time is after the seed's last year"),
            Error::SeedNotYetValid => f.write_str("node time is before the seed's first year"),
            Error::GenerationsExhausted => f.write_str("no seed generation after 255"),
            Error::CounterExhausted => f.write_str("message counter exhausted"),
            Error::Entropy => f.write_str("entropy source failed"),
            Error::SelfTest => f.write_str("random generator self-test failed"),
            Error::UnknownAudience => f.write_str("audience is not configured"),
            Error::AudienceTableFull => f.write_str("audience table is full"),
            Error::CenterAudience => f.write_str("a sealed message needs a relying party audience"),
            Error::PlaintextTooLong => f.write_str("plaintext too long for the device class"),
            Error::BufferTooSmall => f.write_str("output buffer too small"),
            Error::Replay => f.write_str("command counter not above the highest accepted"),
            Error::NotPending => f.write_str("receipt answers no pending message"),
            Error::NothingToRetransmit => f.write_str("no unanswered message"),
            Error::CenterRefused(s) => write!(f, "center refused the message (status {s})"),
            Error::Verification => f.write_str("verification failed"),
            Error::Malformed(e) => write!(f, "malformed message: {e}"),
            Error::ImageLength => f.write_str("chip image has the wrong length"),
            Error::ImageMagic => f.write_str("not a chip image (bad magic)"),
            Error::ImageVersion(v) => write!(f, "unsupported chip image version {v}"),
            Error::ImageChecksum => f.write_str("chip image checksum mismatch (corrupted)"),
            Error::ImageInvalid => f.write_str("chip image contents are inconsistent"),
            Error::Core(e) => write!(f, "protocol core: {e}"),
        }
    }
}

impl core::error::Error for Error {}

/// Result with the node's [`Error`].
pub type Result<T> = core::result::Result<T, Error>;

/// Maps a core error from making a message: the seed-year errors keep their
/// meaning, the rest are unexpected.
pub(crate) fn from_make(e: microcert_core::Error) -> Error {
    use microcert_core::Error as C;
    match e {
        C::SeedExpired => Error::SeedExpired,
        C::SeedNotYetValid => Error::SeedNotYetValid,
        C::BufferTooSmall => Error::BufferTooSmall,
        C::PlaintextTooLong => Error::PlaintextTooLong,
        C::CenterAudience => Error::CenterAudience,
        other => Error::Core(other),
    }
}

/// Maps a core error from checking a received message: every failure to
/// verify (including a t outside the seed's years) is opaque.
pub(crate) fn from_verify(_: microcert_core::Error) -> Error {
    Error::Verification
}
