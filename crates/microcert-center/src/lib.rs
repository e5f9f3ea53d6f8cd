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

/// Memory model of the two per-device structures that grow with the
/// fleet, from their struct sizes (for the benchmarks' report; the
/// allocator's overhead is measured there).
#[doc(hidden)]
pub mod memory_model {
    /// Heap bytes of one cached device with `seeds` seed records.
    pub fn cache_bytes_per_device(seeds: usize) -> usize {
        crate::cache::bytes_per_device(seeds)
    }

    /// Heap bytes of one accepted message held by the in-memory replay
    /// guard until its freshness window closes.
    pub fn replay_bytes_per_message() -> usize {
        crate::replay::bytes_per_key()
    }
}

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
