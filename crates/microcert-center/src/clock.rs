//! Clock steps (issue 12): a center's wall clock that jumps forward (a bad
//! NTP answer, an operator's typo, a year rolled too early) must not
//! deactivate seeds en masse or end grace periods early, and one that jumps
//! backwards must not reopen the replay window.
//!
//! The center's services take `now` from their caller. [`ClockWatch`]
//! compares the `now` of each housekeeping run with a monotonic clock (the
//! wall time that has passed since the previous run must match the
//! monotonic time within [`STEP_TOLERANCE`]) and with the highest wall time
//! any center on the database has seen (a durable, card-tagged high-water,
//! `MARK_CLOCK`). A step raises an alarm: an error in the log, the gauge
//! `microcert_clock_step_alarm` at 1, the counter
//! `microcert_clock_steps_total`, and a durable flag in the database that
//! stops the irreversible housekeeping (pruning, deactivation of expired
//! seeds, end of grace periods) on every center of the database until an
//! operator confirms the time with [`crate::Center::confirm_clock_step`]
//! (audited).
//!
//! The replay window does not depend on this alarm: replay records are
//! refused at insertion when they would have expired before the highest
//! time any center pruned by (see [`crate::db::MARK_PRUNED`]), and the
//! in-memory guard refuses the same way.
//!
//! Across a restart of the center (a crash, a kill, a clean stop) on the
//! same boot of the machine, the reference is the boot clock: each run
//! records, per host, the boot's identity and the wall time the boot
//! started at by its wall clock (wall time minus the time since boot,
//! [`Boot`]), card-tagged in the database. Without a step that origin
//! does not move (NTP slews both clocks alike), so a restarted center
//! that finds it moved by more than [`STEP_TOLERANCE`] found a step made
//! while it was down, or one made before a kill that came before the next
//! housekeeping (gap 4 of issue 12's review).
//!
//! Across a reboot the boot clock starts again and the time that passed
//! is unknown: a wall clock more than [`ABSENCE_LIMIT`] past the highest
//! time any center saw raises the alarm too (a center down for longer
//! than that is confirmed by an operator once), and a step backwards below
//! the durable high-water is detected as before. A forward step of less
//! than [`ABSENCE_LIMIT`] across a reboot is not detected. A suspended
//! virtual machine's monotonic clock may stop while its wall clock runs:
//! that looks like a forward step, and an operator confirms it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The largest difference between the wall time and the monotonic time
/// that passed between two housekeeping runs that is not a step, in
/// seconds (NTP slews at most 500 ppm: 0.03 s a minute).
pub const STEP_TOLERANCE: u64 = 120;

/// How long a center may see no time at all (no center on the database
/// ran housekeeping) before a wall clock that far past the last time
/// seen, after a reboot, is taken for a possible step: 7 days.
pub const ABSENCE_LIMIT: u64 = 7 * 86_400;

/// The machine's boot as a [`Clock`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boot {
    /// Which host (a digest of its machine id): each host keeps its own
    /// reference in a database shared by several centers.
    pub host: u64,
    /// Which boot of that host (a digest of the kernel's boot id).
    pub id: u32,
    /// Time since that boot (Linux: the boot clock, which includes time
    /// suspended and is slewed by NTP like the wall clock).
    pub since: Duration,
}

/// A time source: the wall clock and a monotonic clock.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Wall-clock time, Unix seconds.
    fn wall(&self) -> u64;
    /// Time since an arbitrary fixed origin; never goes backwards.
    fn monotonic(&self) -> Duration;
    /// The boot of the machine and the time since it, when known: lets a
    /// restarted process find a step made before it started.
    fn boot(&self) -> Option<Boot> {
        None
    }
}

/// The first 8 bytes of SHA-256 of `v`.
fn digest64(v: &[u8]) -> u64 {
    use sha2::Digest;
    let h = sha2::Sha256::digest(v);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    u64::from_be_bytes(b)
}

/// This host and boot (Linux: /etc/machine-id or the host name, and
/// /proc/sys/kernel/random/boot_id); None where unknown.
fn system_boot_ids() -> Option<(u64, u32)> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let host = std::fs::read_to_string("/etc/machine-id")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())?;
    Some((
        digest64(host.trim().as_bytes()),
        (digest64(boot.trim().as_bytes()) >> 32) as u32,
    ))
}

/// Time since boot from /proc/uptime (the boot clock of this process's
/// time namespace).
fn system_uptime() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = s.split_whitespace().next()?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// The system's clocks.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
    ids: Option<(u64, u32)>,
}

impl SystemClock {
    /// The system's clocks, monotonic from now.
    pub fn new() -> Self {
        SystemClock {
            origin: Instant::now(),
            ids: system_boot_ids(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn wall(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
    fn boot(&self) -> Option<Boot> {
        let (host, id) = self.ids?;
        Some(Boot {
            host,
            id,
            since: system_uptime()?,
        })
    }
}

/// A clock moved by hand (tests): [`ManualClock::advance`] moves both
/// clocks, [`ManualClock::step`] only the wall clock. Each clock is a boot
/// of its own (its monotonic time is the time since that boot), on one
/// host shared by every manual clock: centers given the same clock run on
/// the same boot, as processes restarted on one machine do.
#[derive(Debug, Default)]
pub struct ManualClock {
    wall: AtomicU64,
    mono: AtomicU64,
    boot: u32,
}

/// The boot ids of manual clocks.
static MANUAL_BOOTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

impl ManualClock {
    /// A clock at wall time `wall`, on a new boot.
    pub fn new(wall: u64) -> Arc<Self> {
        Arc::new(ManualClock {
            wall: AtomicU64::new(wall),
            mono: AtomicU64::new(0),
            boot: MANUAL_BOOTS.fetch_add(1, Ordering::SeqCst),
        })
    }
    /// Time passes: both clocks move by `secs`.
    pub fn advance(&self, secs: u64) {
        self.wall.fetch_add(secs, Ordering::SeqCst);
        self.mono.fetch_add(secs, Ordering::SeqCst);
    }
    /// The wall clock is set to `wall`; the monotonic clock does not move.
    pub fn step(&self, wall: u64) {
        self.wall.store(wall, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn wall(&self) -> u64 {
        self.wall.load(Ordering::SeqCst)
    }
    fn monotonic(&self) -> Duration {
        Duration::from_secs(self.mono.load(Ordering::SeqCst))
    }
    fn boot(&self) -> Option<Boot> {
        Some(Boot {
            host: u64::from_be_bytes(*b"\0\0manual"),
            id: self.boot,
            since: self.monotonic(),
        })
    }
}

/// A detected step of the wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockStep {
    /// The time the center expected (from the monotonic clock, or the
    /// high-water for a step found against it).
    pub expected: u64,
    /// The time the wall clock gave.
    pub seen: u64,
}

impl ClockStep {
    /// Seconds forward (positive) or backward (negative).
    pub fn seconds(&self) -> i64 {
        self.seen as i64 - self.expected as i64
    }
}

impl std::fmt::Display for ClockStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.seconds();
        let dir = if s >= 0 { "forward" } else { "backward" };
        write!(
            f,
            "the clock stepped {dir} by {} s (expected about {}, saw {})",
            s.unsigned_abs(),
            self.expected,
            self.seen
        )
    }
}

/// Compares the `now` of successive housekeeping runs with a monotonic
/// clock and a high-water.
#[derive(Debug)]
pub struct ClockWatch {
    clock: Arc<dyn Clock>,
    /// The wall and monotonic times of the last run that was not a step.
    last: Mutex<Option<(u64, Duration)>>,
}

impl ClockWatch {
    /// A watch over `clock`'s monotonic time.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        ClockWatch {
            clock,
            last: Mutex::new(None),
        }
    }

    /// The clock's wall time.
    pub fn wall(&self) -> u64 {
        self.clock.wall()
    }

    /// The machine's boot and the time since it, when the clock knows it.
    pub fn boot(&self) -> Option<Boot> {
        self.clock.boot()
    }

    /// Whether no run has been taken as a reference yet in this process.
    pub fn first(&self) -> bool {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// Checks `now` against the monotonic time since the last run and
    /// against `high_water` (the highest time seen, `slack` seconds of
    /// allowed difference between centers): the step, or None (and `now`
    /// becomes the new reference).
    pub fn observe(&self, now: u64, high_water: Option<u64>, slack: u64) -> Option<ClockStep> {
        let mono = self.clock.monotonic();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((w, m)) = *last {
            let expected = w.saturating_add(mono.saturating_sub(m).as_secs());
            if now.abs_diff(expected) > STEP_TOLERANCE {
                return Some(ClockStep {
                    expected,
                    seen: now,
                });
            }
        }
        if let Some(high) = high_water
            && now.saturating_add(STEP_TOLERANCE + slack) < high
        {
            return Some(ClockStep {
                expected: high,
                seen: now,
            });
        }
        *last = Some((now, mono));
        None
    }

    /// Takes `now` as the new reference (an operator confirmed it).
    pub fn rebase(&self, now: u64) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, self.clock.monotonic()));
    }
}

/// Sets the alarm gauge (1 while a step is unconfirmed).
pub(crate) fn alarm_metric(on: bool) {
    metrics::gauge!("microcert_clock_step_alarm").set(if on { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_found_against_the_monotonic_clock_and_the_high_water() {
        let clock = ManualClock::new(1_000_000);
        let w = ClockWatch::new(clock.clone());
        assert_eq!(w.observe(clock.wall(), None, 30), None);
        clock.advance(600);
        assert_eq!(w.observe(clock.wall(), None, 30), None);
        // A year forward in one step.
        clock.step(clock.wall() + 365 * 86_400);
        let s = w.observe(clock.wall(), None, 30).unwrap();
        assert!(s.seconds() > 0 && s.to_string().contains("forward"));
        // Backwards below another center's high-water.
        let w2 = ClockWatch::new(clock.clone());
        assert_eq!(w2.observe(1_000_000, Some(1_000_100), 30), None);
        let s = w2.observe(1_000_000, Some(1_000_000 + 151), 30).unwrap();
        assert!(s.seconds() < 0 && s.to_string().contains("backward"));
    }

    /// Gap 4: the boot reference. On Linux the system clock knows its host
    /// and boot, and the boot's start by the wall clock stays put while
    /// time passes; manual clocks are boots of their own on one host.
    #[test]
    fn the_boot_reference_is_stable_without_a_step() {
        if cfg!(target_os = "linux") {
            let c = SystemClock::new();
            let a = c.boot().expect("a boot id and /proc/uptime");
            let wa = c.wall();
            std::thread::sleep(Duration::from_millis(1100));
            let b = c.boot().unwrap();
            let wb = c.wall();
            assert_eq!((a.host, a.id), (b.host, b.id));
            assert!(b.since > a.since);
            let origin = |w: u64, s: Duration| w.saturating_sub(s.as_secs());
            assert!(origin(wa, a.since).abs_diff(origin(wb, b.since)) <= 2);
        }
        let m1 = ManualClock::new(1_000);
        let m2 = ManualClock::new(1_000);
        let (b1, b2) = (m1.boot().unwrap(), m2.boot().unwrap());
        assert_eq!(b1.host, b2.host);
        assert_ne!(b1.id, b2.id);
        m1.advance(50);
        assert_eq!(m1.boot().unwrap().since, Duration::from_secs(50));
        m1.step(5_000);
        assert_eq!(m1.boot().unwrap().since, Duration::from_secs(50));
    }
}
