//! The one error type of the center.
//!
//! Refusals (a message or request the protocol says no to) and operational
//! failures (database, card, files) are separate variants, so a transport
//! maps each to its status code in one exhaustive `match`. No variant
//! carries key material, and a failed MAC or AEAD is always the one opaque
//! [`Error::Verification`].

use std::fmt;
use std::path::PathBuf;

use microcert_core::{DeviceId, Event, KeyState};

/// Everything the center can refuse or fail at.
///
/// Deliberately not `#[non_exhaustive]`: the transports map every variant
/// to a status in one exhaustive `match`, so a new variant must be placed
/// there consciously.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No device with this id is registered.
    #[error("unknown device")]
    UnknownDevice,
    /// The device's seed is revoked (Compromised).
    #[error("device revoked")]
    Revoked,
    /// The device's seed is suspended by an operator.
    #[error("device suspended")]
    Suspended,
    /// The seed the message is under is not active (pre-activation where
    /// activity is needed, deactivated, destroyed, or a superseded
    /// generation outside its grace period).
    #[error("seed not active")]
    NotActive,
    /// The seed does not cover the date in question.
    #[error("seed expired or not yet valid")]
    Expired,
    /// The message (or challenge) was already accepted once.
    #[error("replayed message")]
    Replay,
    /// The message's time is outside the clock-skew window.
    #[error("message time outside the accepted window")]
    Stale,
    /// The bytes are not a well-formed message of the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message, challenge or receipt is not authentic. Deliberately
    /// opaque: it never says which check failed.
    #[error("verification failed")]
    Verification,
    /// The message is in another suite than the device's.
    #[error("wrong suite for this device")]
    WrongSuite,
    /// An ENROLL or message under a generation the rules do not allow.
    #[error("wrong seed generation")]
    WrongGeneration,
    /// A device id that is already registered (registration, provisioning).
    #[error("device {device} is already registered")]
    AlreadyRegistered {
        /// The id.
        device: DeviceId,
    },
    /// No class profile configures this device class.
    #[error("no profile for device class {class}")]
    NoProfile {
        /// The class asked for.
        class: u8,
    },
    /// The device has no seed yet (an operation that needs one).
    #[error("device {device} has no seed")]
    NoSeed {
        /// The device.
        device: DeviceId,
    },
    /// A REVOKE is queued for the device: no other command replaces it.
    #[error("a REVOKE is pending for this device")]
    RevokePending {
        /// The device.
        device: DeviceId,
    },
    /// Transport enrollment is already open (the device has no seed).
    #[error("device has no seed: transport enrollment is open")]
    TransportOpen,
    /// The device's current seed is neither expired nor revoked: transport
    /// enrollment stays closed.
    #[error("the current seed is neither expired nor revoked")]
    SeedStillValid,
    /// Epoch 255 was used: the chip cannot be re-personalized.
    #[error("epoch 255 is final: the chip cannot be re-personalized")]
    EpochExhausted,
    /// Transport enrollment reopens only with this epoch (the next one
    /// after a revocation, the same one after expiry).
    #[error("transport enrollment reopens only with epoch {expected}")]
    WrongEpoch {
        /// The epoch the rules allow.
        expected: u8,
    },
    /// A step of the wall clock is not yet confirmed by an operator:
    /// housekeeping changes nothing until it is (see [`crate::clock`]).
    #[error("{why}: housekeeping suspended until an operator confirms the clock")]
    ClockUnconfirmed {
        /// What the clock watch saw.
        why: String,
    },
    /// A time that does not fit the protocol's 32-bit seconds.
    #[error("time beyond 2106")]
    TimeOutOfRange,
    /// A device a restore needs is neither in the database nor the backup.
    #[error("device {device} is missing and not in the backup")]
    NotInBackup {
        /// The device.
        device: DeviceId,
    },
    /// A feature this center (or server) was not configured with.
    #[error("not configured: {what}")]
    NotConfigured {
        /// What is missing.
        what: &'static str,
    },
    /// Shamir split parameters outside `2 <= threshold <= shares`.
    #[error("need 2 <= threshold <= shares, got threshold {threshold} of {shares}")]
    ShareThreshold {
        /// The threshold asked for.
        threshold: u8,
        /// The number of shares asked for.
        shares: u8,
    },
    /// This encryption card does not do the operation (for example a card
    /// without storage-key rotation).
    #[error("this encryption card cannot {operation}")]
    CardUnsupported {
        /// What was asked.
        operation: &'static str,
    },
    /// `card init` never overwrites an existing card file.
    #[error("card file {} already exists", path.display())]
    CardFileExists {
        /// The file.
        path: PathBuf,
    },
    /// The card holds 255 storage-key versions: no rotation is left.
    #[error("no storage-key version left")]
    StorageKeysExhausted,
    /// The current storage key cannot be destroyed.
    #[error("the current storage key (version {version}) cannot be destroyed")]
    CurrentStorageKey {
        /// Its version.
        version: u32,
    },
    /// The card has no storage key of this version.
    #[error("no storage key of version {version}")]
    NoStorageKey {
        /// The version asked for.
        version: u32,
    },
    /// An import line for a device already registered with another class
    /// or epoch.
    #[error("device {device} is registered with class {class} epoch {epoch}")]
    RegisteredDifferently {
        /// The device.
        device: DeviceId,
        /// Its registered class.
        class: u8,
        /// Its registered epoch.
        epoch: u8,
    },
    /// The replay guard's state file is locked by another process: several
    /// processes on one database need replay mode "database".
    #[error(
        "another process verifies with the in-memory replay guard of this database \
         ({} is locked); several processes sharing a database need replay mode \
         \"database\"",
        path.display()
    )]
    ReplayGuardLocked {
        /// The state file.
        path: PathBuf,
        /// SQLite's busy or locked error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database changed under every attempt of a backup to read it.
    #[error("the database kept changing while the backup read it; try again")]
    BackupUnstable,
    /// A backup is restored only into an empty key database.
    #[error("a backup is restored only into an empty key database")]
    RestoreTargetNotEmpty,
    /// A token name that is empty, too long or has control characters.
    #[error("a token name is 1 to {max} bytes, no control characters")]
    BadTokenName {
        /// The longest name allowed.
        max: usize,
    },
    /// A token role that does not exist.
    #[error("unknown token role {role:?} (one of {})", crate::tokens::ROLES.join(", "))]
    UnknownRole {
        /// The role asked for.
        role: String,
    },
    /// A token time to live of 0 s.
    #[error("a token's time to live is at least 1 s")]
    TokenTtlZero,
    /// A verifier name whose audience is the center's (0^8).
    #[error("{name:?} hashes to the center's audience 0^8; choose another name")]
    CenterAudience {
        /// The name.
        name: String,
    },
    /// The token table is full.
    #[error("the database keeps at most {max} tokens")]
    TooManyTokens {
        /// The bound.
        max: usize,
    },
    /// A valid token of the same name and role exists.
    #[error("a valid {role} token named {name:?} already exists (revoke it first)")]
    TokenNameTaken {
        /// The name.
        name: String,
        /// The role.
        role: String,
    },
    /// A verifier whose audience is another valid verifier's.
    #[error("{name:?} has the same audience as relying party {other:?}")]
    AudienceTaken {
        /// The new name.
        name: String,
        /// The relying party that has the audience.
        other: String,
    },
    /// A token row fails its card tag (edited outside the center).
    #[error(
        "the {role} token {name:?} ({hash_prefix}) fails its card tag: its row was edited \
         outside the center"
    )]
    TokenIntegrity {
        /// Its role.
        role: String,
        /// Its name.
        name: String,
        /// The first 8 hex digits of its hash.
        hash_prefix: String,
    },
    /// A legacy token whose sha256 is not 64 lowercase hex digits.
    #[error("legacy token {name:?}: its sha256 is not 64 lowercase hex digits")]
    BadLegacyToken {
        /// Its name.
        name: String,
    },
    /// A life-cycle transition not allowed by the state table.
    #[error("illegal life-cycle transition: {event} in state {from}")]
    IllegalTransition {
        /// The state the seed was in.
        from: KeyState,
        /// The refused event.
        event: Event,
    },
    /// A stored record's integrity tag does not match (tampered database);
    /// the device is refused until the record is repaired.
    #[error("integrity check failed for device {0}")]
    Integrity(String),
    /// The card file does not open with this passphrase (or was altered).
    #[error("wrong passphrase, or the card file was altered")]
    WrongPassphrase,
    /// The card file or a backup share is not in a format this version reads.
    #[error("bad card data: {0}")]
    CardFormat(String),
    /// Shamir backup shares that do not recover a card.
    #[error("shares do not recover a card: {0}")]
    Shares(String),
    /// The encryption card failed (RNG, token, ...).
    #[error("encryption card failure: {0}")]
    Card(String),
    /// The keyring in the key database (storage-key versions wrapped under
    /// the card's root key, [`crate::keyring`]) fails its card tags, was
    /// rolled back, or lacks a version that records need (issue 14).
    #[error("keyring: {0}")]
    Keyring(String),
    /// A configured audit sink (`[audit] file` / `syslog`,
    /// [`crate::audit::AuditSink`]) could not record an entry: the change
    /// it was for is refused and rolled back.
    #[error("the audit sink cannot record the entry, so the change is refused: {0}")]
    AuditSink(String),
    /// The key database failed: what kind of failure ([`DbFailure`]) and
    /// what the backend said.
    #[error("database error: {0}")]
    Database(DbError),
    /// The SQLite database (or the replay guard's state file) failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A file could not be read or written.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Whether a SQLite error may go away by itself (busy, locked).
fn sqlite_transient(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// What failed in the key database ([`Error::Database`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbFailure {
    /// The server cannot be reached or closed the connection.
    Unreachable,
    /// A statement or a connection checkout took longer than allowed.
    Timeout,
    /// The server accepts no writes (a primary that failed over).
    ReadOnly,
    /// The server refused for now (a serialization failure, a deadlock,
    /// too many connections, a shutdown in progress): try again.
    Busy,
    /// The configuration is wrong: the connection string, TLS, the
    /// password file.
    Config,
    /// The database's schema is newer than this program.
    Schema,
    /// A stored row is not what the program wrote (a value out of range,
    /// a row that vanished, a rewrite that found no row).
    Corrupt,
    /// This backend does not keep what was asked for.
    Unsupported,
    /// A fault of this process (a poisoned lock, a stopped worker).
    Internal,
}

impl DbFailure {
    /// Whether trying again later may succeed (answered 503 / 5.03).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            DbFailure::Unreachable | DbFailure::Timeout | DbFailure::ReadOnly | DbFailure::Busy
        )
    }
}

/// A key database failure: its kind and what the backend said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbError {
    /// What kind of failure.
    pub kind: DbFailure,
    /// The backend's words.
    pub message: String,
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The classes of [`Error`] ([`Error::class`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// A device message refused (the device's doing), and how.
    Message(MessageRefusal),
    /// A request the current state or configuration does not allow (an
    /// operator's or a command's); never the answer to a device message.
    Conflict,
    /// The records involved fail their integrity check: quarantined.
    Integrity,
    /// The database or the card stalled or went away: transient, retry.
    Unavailable,
    /// The center cannot do its part (its card file, its passphrase, its
    /// files): an operator must look.
    Internal,
}

/// How a device message is refused (the refusal kinds of docs/protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageRefusal {
    /// The device is not known.
    UnknownDevice,
    /// The device is revoked.
    Revoked,
    /// The device is suspended.
    Suspended,
    /// The seed is not active, or not the current generation.
    NotActive,
    /// The seed does not cover the date.
    Expired,
    /// Already accepted once.
    Replay,
    /// Outside the accepted clock skew.
    Stale,
    /// Does not parse.
    Malformed,
    /// Does not verify (opaque).
    NotVerified,
    /// Not the device's suite.
    WrongSuite,
}

impl Error {
    /// A key database failure of `kind`.
    pub fn db(kind: DbFailure, message: impl Into<String>) -> Self {
        Error::Database(DbError {
            kind,
            message: message.into(),
        })
    }

    /// A short stable name of the refusal kind, for the network layer and
    /// logs (PROTOCOL.md section 8: the body of a refusal names its kind).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::UnknownDevice => "unknown-device",
            Error::Revoked => "revoked",
            Error::Suspended => "suspended",
            Error::NotActive => "not-active",
            Error::Expired => "expired",
            Error::Replay => "replay",
            Error::Stale => "stale",
            Error::Malformed(_) => "malformed",
            Error::Verification => "verification-failed",
            Error::WrongSuite => "wrong-suite",
            Error::WrongGeneration => "wrong-generation",
            Error::AlreadyRegistered { .. } => "already-registered",
            Error::NoProfile { .. } => "no-profile",
            Error::NoSeed { .. } => "no-seed",
            Error::RevokePending { .. } => "revoke-pending",
            Error::TransportOpen => "transport-open",
            Error::SeedStillValid => "seed-still-valid",
            Error::EpochExhausted => "epoch-exhausted",
            Error::WrongEpoch { .. } => "wrong-epoch",
            Error::ClockUnconfirmed { .. } => "clock-unconfirmed",
            Error::TimeOutOfRange => "time-out-of-range",
            Error::NotInBackup { .. } => "not-in-backup",
            Error::NotConfigured { .. } => "not-configured",
            Error::ShareThreshold { .. } => "share-threshold",
            Error::CardUnsupported { .. } => "card-unsupported",
            Error::CardFileExists { .. } => "card-file-exists",
            Error::StorageKeysExhausted => "storage-keys-exhausted",
            Error::CurrentStorageKey { .. } => "current-storage-key",
            Error::NoStorageKey { .. } => "no-storage-key",
            Error::RegisteredDifferently { .. } => "registered-differently",
            Error::ReplayGuardLocked { .. } => "replay-guard-locked",
            Error::BackupUnstable => "backup-unstable",
            Error::RestoreTargetNotEmpty => "restore-target-not-empty",
            Error::BadTokenName { .. } => "bad-token-name",
            Error::UnknownRole { .. } => "unknown-role",
            Error::TokenTtlZero => "token-ttl-zero",
            Error::CenterAudience { .. } => "center-audience",
            Error::TooManyTokens { .. } => "too-many-tokens",
            Error::TokenNameTaken { .. } => "token-name-taken",
            Error::AudienceTaken { .. } => "audience-taken",
            Error::TokenIntegrity { .. } => "token-integrity",
            Error::BadLegacyToken { .. } => "bad-legacy-token",
            Error::IllegalTransition { .. } => "illegal-transition",
            Error::Integrity(_) => "integrity",
            Error::WrongPassphrase => "wrong-passphrase",
            Error::CardFormat(_) => "card-format",
            Error::Shares(_) => "shares",
            Error::Card(_) => "card",
            Error::Keyring(_) => "keyring",
            Error::AuditSink(_) => "audit-sink",
            Error::Database(_) | Error::Sqlite(_) => "database",
            Error::Io(_) => "io",
        }
    }

    /// What kind of failure this is: the one classification every API's
    /// mapping to the wire starts from (device CoAP/HTTP, operator HTTP),
    /// with every variant named here and nowhere else.
    pub fn class(&self) -> ErrorClass {
        use MessageRefusal as M;
        match self {
            Error::UnknownDevice => ErrorClass::Message(M::UnknownDevice),
            Error::Revoked => ErrorClass::Message(M::Revoked),
            Error::Suspended => ErrorClass::Message(M::Suspended),
            Error::NotActive | Error::WrongGeneration => ErrorClass::Message(M::NotActive),
            Error::Expired => ErrorClass::Message(M::Expired),
            Error::Replay => ErrorClass::Message(M::Replay),
            Error::Stale => ErrorClass::Message(M::Stale),
            Error::Malformed(_) => ErrorClass::Message(M::Malformed),
            Error::Verification => ErrorClass::Message(M::NotVerified),
            Error::WrongSuite => ErrorClass::Message(M::WrongSuite),
            Error::AlreadyRegistered { .. }
            | Error::NoProfile { .. }
            | Error::NoSeed { .. }
            | Error::RevokePending { .. }
            | Error::TransportOpen
            | Error::SeedStillValid
            | Error::EpochExhausted
            | Error::WrongEpoch { .. }
            | Error::ClockUnconfirmed { .. }
            | Error::TimeOutOfRange
            | Error::NotInBackup { .. }
            | Error::NotConfigured { .. }
            | Error::ShareThreshold { .. }
            | Error::CardUnsupported { .. }
            | Error::CardFileExists { .. }
            | Error::StorageKeysExhausted
            | Error::CurrentStorageKey { .. }
            | Error::NoStorageKey { .. }
            | Error::RegisteredDifferently { .. }
            | Error::ReplayGuardLocked { .. }
            | Error::BackupUnstable
            | Error::RestoreTargetNotEmpty
            | Error::BadTokenName { .. }
            | Error::UnknownRole { .. }
            | Error::TokenTtlZero
            | Error::CenterAudience { .. }
            | Error::TooManyTokens { .. }
            | Error::TokenNameTaken { .. }
            | Error::AudienceTaken { .. }
            | Error::TokenIntegrity { .. }
            | Error::BadLegacyToken { .. }
            | Error::IllegalTransition { .. } => ErrorClass::Conflict,
            Error::Integrity(_) => ErrorClass::Integrity,
            Error::Card(_) => ErrorClass::Unavailable,
            // The sink may come back (a full disk, a syslog restarting):
            // 503, nothing changed.
            Error::AuditSink(_) => ErrorClass::Unavailable,
            // A busy or locked SQLite file is transient; anything else it
            // says (a corrupt file, a row that does not convert: edited
            // from outside) is not.
            Error::Sqlite(e) if sqlite_transient(e) => ErrorClass::Unavailable,
            Error::Sqlite(_) => ErrorClass::Internal,
            // A database that went away, timed out, is read-only after a
            // failover or refused for now is transient; a wrong
            // configuration, a newer schema or a corrupt row is not.
            Error::Database(d) if d.kind.is_transient() => ErrorClass::Unavailable,
            Error::Database(_) => ErrorClass::Internal,
            Error::WrongPassphrase
            | Error::CardFormat(_)
            | Error::Shares(_)
            | Error::Keyring(_)
            | Error::Io(_) => ErrorClass::Internal,
        }
    }

    /// True for a refusal of a message or request (the client's doing),
    /// false for an operational failure of the center.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self.class(),
            ErrorClass::Message(_) | ErrorClass::Conflict | ErrorClass::Integrity
        )
    }

    /// Maps a protocol-core error met while checking a received message.
    pub(crate) fn from_core(e: microcert_core::Error) -> Self {
        use microcert_core::Error as C;
        match e {
            C::Verification => Error::Verification,
            C::SeedExpired | C::SeedNotYetValid => Error::Expired,
            C::IllegalTransition { from, event } => Error::IllegalTransition { from, event },
            other => Error::Malformed(other.to_string()),
        }
    }
}

/// Result with the center's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_distinct() {
        let all = [
            Error::UnknownDevice,
            Error::Revoked,
            Error::Suspended,
            Error::NotActive,
            Error::Expired,
            Error::Replay,
            Error::Stale,
            Error::Malformed(String::new()),
            Error::Verification,
            Error::WrongSuite,
            Error::WrongGeneration,
        ];
        let mut kinds: Vec<_> = all.iter().map(Error::kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), all.len());
        assert!(all.iter().all(Error::is_refusal));
        assert!(!Error::db(DbFailure::Internal, "x").is_refusal());
    }

    /// A database that went away, timed out, failed over or refused for
    /// now is transient (503 / 5.03); a wrong configuration, a newer
    /// schema, a corrupt row or a fault of this process is not.
    #[test]
    fn database_failures_are_classed_by_kind() {
        use DbFailure::*;
        for kind in [Unreachable, Timeout, ReadOnly, Busy] {
            assert_eq!(
                Error::db(kind, "x").class(),
                ErrorClass::Unavailable,
                "{kind:?}"
            );
        }
        for kind in [Config, Schema, Corrupt, Unsupported, Internal] {
            assert_eq!(
                Error::db(kind, "x").class(),
                ErrorClass::Internal,
                "{kind:?}"
            );
        }
        assert_eq!(
            Error::db(Timeout, "took 5 s").to_string(),
            "database error: took 5 s"
        );
        let sqlite = |code| {
            Error::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        assert_eq!(
            sqlite(rusqlite::ffi::SQLITE_BUSY).class(),
            ErrorClass::Unavailable
        );
        assert_eq!(
            sqlite(rusqlite::ffi::SQLITE_LOCKED).class(),
            ErrorClass::Unavailable
        );
        // A corrupt file or a row that does not convert was edited from
        // outside: not something to retry.
        assert_eq!(
            sqlite(rusqlite::ffi::SQLITE_CORRUPT).class(),
            ErrorClass::Internal
        );
        assert_eq!(
            Error::Sqlite(rusqlite::Error::InvalidColumnType(
                0,
                "tag".into(),
                rusqlite::types::Type::Null
            ))
            .class(),
            ErrorClass::Internal
        );
    }
}
