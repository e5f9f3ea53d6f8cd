//! The microcert authentication center as a library: the encryption card
//! ([`card`]), the key database ([`db`]), and the services on [`Center`]
//! that the network front ends serve (PROTOCOL.md sections 6 to 8).
//!
//! ```text
//! Center ── EncryptionCard (SoftwareCard; PKCS#11 later)
//!        ── KeyDatabase    (SqliteDatabase; PostgreSQL later)
//!        ── seed cache     (bounded, zeroizing, invalidated on change)
//! ```
//!
//! Time is always an argument (`now`, Unix seconds): the library reads no
//! clock, so tests and simulations control it.

pub mod audit;
mod cache;
pub mod card;
mod center;
pub mod db;
mod error;
pub mod integrity;
pub mod profile;

pub use card::{EncryptionCard, KdfParams, SoftwareCard};
pub use center::{
    AuthOutcome, CENTER_ACTOR, Center, HousekeepingReport, ImportProgress, ImportReject,
    ImportReport, OpenedSealed, SignatureOutcome, VerifyOutcome,
};
pub use db::{DeviceQuery, DeviceView, KeyDatabase, SqliteDatabase, SqliteOptions};
pub use error::{Error, Result};
pub use integrity::IntegrityReport;
pub use profile::{CenterConfig, ClassProfile};

// The center is shared between threads (an async server calls it from
// spawn_blocking): keep it Send + Sync.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Center>();
};
