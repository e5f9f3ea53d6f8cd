//! Device-class profiles (RFC 7228 classes 1 to 3) and the center's
//! configuration.

use microcert_core::{MAX_SEALED_PLAINTEXT, Suite};

pub use crate::replay::ReplayMode;

/// What a class of device is allowed and given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassProfile {
    /// The RFC 7228 class, 1..=3.
    pub class: u8,
    /// The suite recorded for a device of this class at registration when
    /// none is asked for.
    pub default_suite: Suite,
    /// Suites a device of this class may be registered with.
    pub suites: Vec<Suite>,
    /// Accepted |now - t| for AUTH and SEALED, in seconds.
    pub skew: u32,
    /// An UPDATE_SEED is due when the current seed has at most this many
    /// calendar years left (1 = in its last year).
    pub renewal_years: u16,
    /// Longest SEALED plaintext accepted from this class.
    pub max_sealed: usize,
    /// Seed updates of this class are forward-secret (v1.2: UPDATE_SEED_FS,
    /// an ephemeral ECDH on P-256), and a symmetric (v1.1) update ENROLL
    /// under Kupd is refused. Built-in: Class 2 and above.
    pub forward_secret_update: bool,
}

impl ClassProfile {
    /// The built-in profile of a class: Class 1 (about 10 KiB RAM) gets the
    /// short suite and 1 KiB SEALED; Class 3 the 16-byte tags.
    pub fn builtin(class: u8) -> Option<Self> {
        let (default_suite, suites, max_sealed) = match class {
            1 => (Suite::CMAC64, vec![Suite::CMAC64], 1024),
            2 => (
                Suite::CMAC64,
                vec![Suite::CMAC64, Suite::CMAC128],
                16 * 1024,
            ),
            3 => (
                Suite::CMAC128,
                vec![Suite::CMAC64, Suite::CMAC128],
                MAX_SEALED_PLAINTEXT,
            ),
            _ => return None,
        };
        Some(ClassProfile {
            class,
            default_suite,
            suites,
            skew: 300,
            renewal_years: 1,
            max_sealed,
            forward_secret_update: class >= 2,
        })
    }
}

/// The center's tunables.
#[derive(Debug, Clone)]
pub struct CenterConfig {
    /// Profiles by class; a device of a class not listed is refused at
    /// registration.
    pub profiles: Vec<ClassProfile>,
    /// How long the previous generation keeps verifying after a seed
    /// update (unless the new one is used first), in seconds.
    pub grace_period: u64,
    /// Opened seeds kept in memory (devices).
    pub cache_capacity: usize,
    /// How long a cached device is trusted before it is read again, in
    /// seconds: the bound within which a change made by another center on
    /// the same database is seen (this center's own changes invalidate at
    /// once).
    pub cache_ttl_secs: u64,
    /// How long a used challenge is remembered beyond its 120 s of
    /// validity: the clock skew between center instances.
    pub instance_skew: u64,
    /// Batch import entries per transaction.
    pub import_chunk: usize,
    /// How AUTH and SEALED are made to count once: in memory for a center
    /// that alone uses its SQLite file, in the database when several
    /// centers share it. The default picks by how the center is opened.
    pub replay: ReplayMode,
}

impl Default for CenterConfig {
    fn default() -> Self {
        CenterConfig {
            profiles: (1..=3).filter_map(ClassProfile::builtin).collect(),
            grace_period: 7 * 86_400,
            cache_capacity: 100_000,
            cache_ttl_secs: 5,
            instance_skew: 30,
            import_chunk: 1000,
            replay: ReplayMode::Auto,
        }
    }
}

impl CenterConfig {
    /// The profile of a class.
    pub fn profile(&self, class: u8) -> Option<&ClassProfile> {
        self.profiles.iter().find(|p| p.class == class)
    }
}
