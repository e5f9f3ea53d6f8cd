//! A center with an enrolled fleet, built through the center's public API
//! only: a software card, an SQLite database in a temporary directory, and
//! a factory batch file imported with `Center::import_batch`.
//!
//! The directory is under `MICROCERT_BENCH_DIR` when set, else the system
//! temporary directory; it must be on the disk a real center would use,
//! because SQLite's commits (WAL, synchronous=FULL) cost an fsync each.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use microcert_center::{Center, CenterConfig, EncryptionCard, SoftwareCard};
use microcert_core::{
    Audience, DeviceId, EnrollKey, HEADER_LEN, Header, KeySeed, Suite, make_auth, make_enroll,
};
use tempfile::TempDir;

use crate::fixtures::{self, T};

/// Boxed error of the fixtures: setup either works or the bench stops.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The RFC 7228 class of the fleet's devices (suite 0x01 by profile).
pub const CLASS: u8 = 1;
/// The suite of the fleet.
pub const SUITE: Suite = Suite::CMAC64;
/// Length of an ENROLL with suite 0x01.
const ENROLL_LEN: usize = HEADER_LEN + microcert_core::ENROLL_PLAINTEXT_LEN + 8;

/// The time the center is told it is: the fixtures' t.
pub const NOW: u64 = T as u64;

/// Device number `n` of the fleet.
pub fn device(n: u64) -> DeviceId {
    DeviceId::from_u64(0x0200_5eff_fe00_0000 | n)
}

/// A fresh temporary directory for a database.
pub fn temp_dir() -> Result<TempDir, BoxError> {
    let base = std::env::var_os("MICROCERT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    Ok(tempfile::Builder::new()
        .prefix("microcert-bench-")
        .tempdir_in(base)?)
}

/// Writes a factory batch file of devices `0..n`: each line is the ENROLL
/// of the device's first seed under its Ktr(device, 0) from `card`.
pub fn write_batch(card: &dyn EncryptionCard, n: u64, path: &Path) -> Result<(), BoxError> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut out = [0u8; ENROLL_LEN];
    for i in 0..n {
        let id = device(i);
        let ktr = card.transport_key(id, 0)?;
        let h = Header {
            suite: SUITE,
            device: id,
            generation: 0,
            t: T,
            r: 0x5eed_0000_0000_0000 | i,
        };
        let len = make_enroll(
            EnrollKey::Transport(&ktr),
            &fixtures::seed_n(i),
            &h,
            &mut out,
        )?;
        writeln!(
            f,
            r#"{{"device_id": "{}", "class": {CLASS}, "epoch": 0, "enroll": "{}"}}"#,
            hex::encode(id.0),
            hex::encode(&out[..len])
        )?;
    }
    f.flush()?;
    Ok(())
}

/// A center over a fresh database with its fleet imported.
pub struct Fleet {
    /// The center.
    pub center: Center,
    /// Its card (shared with the center).
    pub card: Arc<SoftwareCard>,
    /// Number of devices, numbered 0..n.
    pub devices: u64,
    /// Where the database lives; removed on drop.
    pub dir: TempDir,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("devices", &self.devices)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// Creates a card, a database and imports `n` devices.
    pub fn new(n: u64, config: CenterConfig) -> Result<Self, BoxError> {
        Self::new_timed(n, config).map(|(fleet, _)| fleet)
    }

    /// [`Fleet::new`], also returning how long the import itself took (the
    /// batch file is written before the clock starts).
    pub fn new_timed(n: u64, config: CenterConfig) -> Result<(Self, Duration), BoxError> {
        let card = Arc::new(SoftwareCard::ephemeral()?);
        let dir = temp_dir()?;
        let batch = dir.path().join("batch.jsonl");
        write_batch(&*card, n, &batch)?;
        let center = Center::open_sqlite(&dir.path().join("keys.db"), card.clone(), config)?;
        let start = Instant::now();
        let report = center.import_batch(&batch, "bench", NOW, &mut |_| {})?;
        let took = start.elapsed();
        if report.enrolled != n || !report.rejected.is_empty() {
            return Err(format!(
                "import: {} of {n} enrolled, {} rejected",
                report.enrolled,
                report.rejected.len()
            )
            .into());
        }
        Ok((
            Fleet {
                center,
                card,
                devices: n,
                dir,
            },
            took,
        ))
    }

    /// A second center over the same database and card, with `config`
    /// (e.g. the seed cache turned off).
    pub fn another_center(&self, config: CenterConfig) -> Result<Center, BoxError> {
        Ok(Center::open_sqlite(
            &self.dir.path().join("keys.db"),
            self.card.clone(),
            config,
        )?)
    }
}

/// Makes AUTHs for the center, each with a fresh r so none is a replay.
#[derive(Debug)]
pub struct AuthMaker {
    seeds: Vec<KeySeed>,
    next: u64,
}

impl AuthMaker {
    /// Seeds of devices `0..n` (the fleet's).
    pub fn new(n: u64) -> Self {
        AuthMaker {
            seeds: (0..n).map(fixtures::seed_n).collect(),
            next: 0,
        }
    }

    /// The next AUTH, round robin over the devices, in `out`; its length.
    pub fn next_auth(&mut self, out: &mut [u8; 64]) -> Result<usize, BoxError> {
        let i = self.next % self.seeds.len() as u64;
        let h = Header {
            suite: SUITE,
            device: device(i),
            generation: 0,
            t: T,
            r: 0xa000_0000_0000_0000 | self.next,
        };
        self.next += 1;
        Ok(make_auth(
            &self.seeds[i as usize],
            &h,
            &Audience::CENTER,
            out,
        )?)
    }
}

/// The config with the seed cache turned off: every verification reads the
/// device from SQLite, checks its record tag and unseals the seed.
pub fn cold_config() -> CenterConfig {
    CenterConfig {
        cache_capacity: 0,
        ..CenterConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RECEIPT r values come from several pools (one per device group) so
    /// that threads do not share one lock: every RECEIPT still verifies
    /// under its device's seed, answers its AUTH's r, and no r repeats,
    /// over devices of every pool and two threads at once.
    #[test]
    fn receipts_from_two_threads_verify_and_never_repeat_r() {
        use microcert_core::{Receipt, Sender, verify_receipt};
        const N: u64 = 40;
        let fleet = Fleet::new(N, CenterConfig::default()).unwrap();
        let center = &fleet.center;
        let run = |thread: u64| {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            for round in 0..6u64 {
                for i in 0..N {
                    let h = Header {
                        suite: SUITE,
                        device: device(i),
                        generation: 0,
                        t: T,
                        r: (thread << 32) | (round << 16) | i,
                    };
                    let n =
                        make_auth(&fixtures::seed_n(i), &h, &Audience::CENTER, &mut buf).unwrap();
                    let out = center
                        .verify_auth(&buf[..n], &Audience::CENTER, NOW)
                        .unwrap();
                    let rc = Receipt::decode(&out.receipt).unwrap();
                    verify_receipt(&fixtures::seed_n(i), &rc, Sender::Center).unwrap();
                    assert_eq!((rc.header.device, rc.reference), (h.device, h.r));
                    got.push(rc.header.r);
                }
            }
            got
        };
        // The first AUTH of each device activates it; then two threads.
        let mut all = run(9);
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| run(1));
            let b = s.spawn(|| run(2));
            (a.join().unwrap(), b.join().unwrap())
        });
        all.extend(a);
        all.extend(b);
        let count = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), count, "a RECEIPT r repeated");
        assert_eq!(count, 3 * 6 * N as usize);
    }

    #[test]
    fn fleet_verifies_fresh_auth_and_refuses_replay() {
        let fleet = Fleet::new(3, CenterConfig::default()).unwrap();
        let mut maker = AuthMaker::new(3);
        let mut buf = [0u8; 64];
        for _ in 0..4 {
            let n = maker.next_auth(&mut buf).unwrap();
            assert_eq!(n, 31);
            fleet
                .center
                .verify_auth(&buf[..n], &Audience::CENTER, NOW)
                .unwrap();
        }
        // The last one again is a replay.
        assert!(
            fleet
                .center
                .verify_auth(&buf[..31], &Audience::CENTER, NOW)
                .is_err()
        );
        assert!(fleet.center.cached_devices() >= 1);
        let cold = fleet.another_center(cold_config()).unwrap();
        let n = maker.next_auth(&mut buf).unwrap();
        cold.verify_auth(&buf[..n], &Audience::CENTER, NOW).unwrap();
        assert_eq!(cold.cached_devices(), 0);
    }
}
