//! The one error type of the PKCS#11 card's own calls (init, open,
//! rotation, cloning). Operations of the [`EncryptionCard`] trait return
//! the center's error instead; [`Pkcs11Error`] converts into it.
//!
//! No variant carries a PIN or key byte: PKCS#11 return values name a
//! function and a code, never an argument.
//!
//! [`EncryptionCard`]: microcert_center::card::EncryptionCard

use std::path::PathBuf;

use cryptoki::error::{Error as CkError, RvError};

/// What can go wrong when starting or managing a PKCS#11 card.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Pkcs11Error {
    /// The PKCS#11 module (shared library) could not be loaded or
    /// initialised.
    #[error("PKCS#11 module {path}: {reason}")]
    Module {
        /// The configured module path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// No slot holds a token with this label.
    #[error("no PKCS#11 token labelled {label:?}")]
    TokenNotFound {
        /// The configured token label.
        label: String,
    },
    /// More than one slot holds a token with this label; refusing to guess.
    #[error("{count} PKCS#11 tokens are labelled {label:?}")]
    TokenAmbiguous {
        /// The configured token label.
        label: String,
        /// How many tokens carry it.
        count: usize,
    },
    /// The token refused the user PIN.
    #[error("the token refused the PIN")]
    WrongPin,
    /// The token's user PIN is locked after too many wrong attempts.
    #[error("the token's user PIN is locked")]
    PinLocked,
    /// No PIN could be read from the configured source, or it is empty.
    #[error("PIN source: {0}")]
    PinSource(String),
    /// A key the card needs is not on the token (wrong token, or the card
    /// was never initialised on it).
    #[error("key {label:?} is not on the token")]
    KeyMissing {
        /// The key's object label.
        label: String,
    },
    /// `init` found card keys already on the token; it never overwrites.
    #[error("the token already holds card key {label:?}; refusing to initialise it again")]
    KeysExist {
        /// The first card key found.
        label: String,
    },
    /// A key on the token has attributes the card does not accept (for
    /// example an extractable Kstore).
    #[error("key {label:?} on the token: {reason}")]
    KeyAttributes {
        /// The key's object label.
        label: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The security officer cannot log in while the user is (a card is
    /// open on this token in this process).
    #[error("refused: the user is logged in to this token: close the card first")]
    UserLoggedIn,
    /// Cloning asked of a card whose keys are non-extractable.
    #[error(
        "refused: this card's keys are non-extractable: clone the token with the HSM \
         vendor's own procedure (docs/hsm.md)"
    )]
    KeysNotExtractable,
    /// Export for a clone target the token's SO has not trusted.
    #[error("refused: the token's SO has not trusted this clone target")]
    CloneTargetNotTrusted,
    /// No Kstore version is left to rotate to.
    #[error("refused: no Kstore version left")]
    StorageKeysExhausted,
    /// The current Kstore version cannot be destroyed.
    #[error("refused: the current storage key (version {version}) cannot be destroyed")]
    CurrentStorageKey {
        /// Its version.
        version: u32,
    },
    /// Key material handed to an import is malformed.
    #[error("bad key data: {0}")]
    Format(String),
    /// Any other failure of the token or the module.
    #[error("PKCS#11: {0}")]
    Token(String),
}

impl From<CkError> for Pkcs11Error {
    fn from(e: CkError) -> Self {
        match e {
            CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _) => {
                Pkcs11Error::WrongPin
            }
            CkError::Pkcs11(RvError::PinLocked, _) => Pkcs11Error::PinLocked,
            other => Pkcs11Error::Token(other.to_string()),
        }
    }
}

impl From<Pkcs11Error> for microcert_center::Error {
    fn from(e: Pkcs11Error) -> Self {
        use microcert_center::Error as E;
        match e {
            // The card's refusals that the center names itself.
            Pkcs11Error::StorageKeysExhausted => E::StorageKeysExhausted,
            Pkcs11Error::CurrentStorageKey { version } => E::CurrentStorageKey { version },
            other => E::Card(other.to_string()),
        }
    }
}

/// Result with [`Pkcs11Error`].
pub type Result<T> = std::result::Result<T, Pkcs11Error>;
