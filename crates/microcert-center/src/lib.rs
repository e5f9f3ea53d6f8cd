#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

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
