#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

pub mod anchor;
pub mod audit;
pub mod audit_archive;
pub mod backup;
mod cache;
pub mod card;
mod center;
pub mod clock;
pub mod db;
mod error;
pub mod integrity;
pub mod keyring;
pub mod lines;
pub mod policy;
pub mod profile;
pub mod repair;
mod replay;
pub mod site;
pub mod tokens;
#[doc(hidden)]
pub use replay::FaultPoint;

pub use card::{EncryptionCard, KdfParams, SoftwareCard};
pub use center::{
    AuthOutcome, AutoBackup, CENTER_ACTOR, Center, HousekeepingReport, IMPORT_LINE_MAX,
    ImportProgress, ImportReject, ImportReport, ImportSource, OpenedSealed, REJECTS_KEPT,
    RotationReport, SignatureOutcome, VerifyOutcome,
};
pub use db::{DeviceQuery, DeviceView, KeyDatabase};
#[cfg(feature = "postgres")]
pub use db::{PostgresDatabase, PostgresOptions};
#[cfg(feature = "sqlite")]
pub use db::{SqliteDatabase, SqliteOptions};
pub use error::{DbError, DbFailure, Error, ErrorClass, MessageRefusal, Result};
pub use integrity::IntegrityReport;
pub use profile::{CenterConfig, ClassProfile, ReplayMode};

// The center is shared between threads (an async server calls it from
// spawn_blocking): keep it Send + Sync.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Center>();
};
