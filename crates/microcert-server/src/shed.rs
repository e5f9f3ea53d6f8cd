//! Load shedding: when the database or the card stalls (a SQLite file
//! locked by another process waits out its 10 s busy timeout, a PostgreSQL
//! restart, an HSM that stopped answering), a device request must get
//! "5.03 / 503, try again after Max-Age / Retry-After" at once instead of
//! joining the stalled call and holding a CoAP worker or a blocking thread
//! for seconds.
//!
//! Every call into the center from a device or relying-party resource
//! holds a [`Permit`]: one of `max_in_flight` slots, each holding its start
//! time. A request is shed, before any work and without spending its rate
//! budget, when
//!
//! - a call in flight started more than `shed_after_ms` ago: the center is
//!   stalled, and a new call would wait behind the same lock or the same
//!   card (only the calls that arrived before the stall was seen wait);
//! - every slot is taken: more calls than the database and the card can
//!   serve at once.
//!
//! Shedding ends by itself: as soon as the stalled call returns, the next
//! request goes through (and, if the stall persists, stalls for at most
//! `shed_after_ms` before shedding starts again). The state is a fixed
//! array of atomics: nothing an unauthenticated peer sends can grow it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why a request was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// A call in flight has taken longer than the stall bound.
    Stalled,
    /// Every slot is taken.
    Full,
}

impl Shed {
    /// The label of `microcert_shed_total`.
    pub const fn name(self) -> &'static str {
        match self {
            Shed::Stalled => "stalled",
            Shed::Full => "full",
        }
    }
}

/// The in-flight calls into the center (see the module documentation).
#[derive(Debug)]
pub struct Shedder {
    start: Instant,
    stall_ns: u64,
    retry_secs: u32,
    /// Per slot: 0 when free, else 1 + the call's start (ns since `start`).
    slots: Box<[AtomicU64]>,
    /// 1 + the last time a request was shed (ns since `start`), 0 never.
    last_shed: AtomicU64,
}

/// A call into the center in flight; frees its slot when dropped.
#[derive(Debug)]
#[must_use]
pub struct Permit {
    shed: Arc<Shedder>,
    slot: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.shed.slots[self.slot].store(0, Ordering::Release);
    }
}

impl Shedder {
    /// At most `max_in_flight` calls (at least 1); a call older than
    /// `stall` means the center stalls; shed requests are told to come back
    /// after `retry_secs` (at least 1).
    pub fn new(max_in_flight: usize, stall: Duration, retry_secs: u32) -> Shedder {
        Shedder {
            start: Instant::now(),
            stall_ns: u64::try_from(stall.as_nanos()).unwrap_or(u64::MAX),
            retry_secs: retry_secs.max(1),
            slots: (0..max_in_flight.max(1))
                .map(|_| AtomicU64::new(0))
                .collect(),
            last_shed: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos())
            .unwrap_or(u64::MAX - 1)
            .max(1)
    }

    /// The age of the oldest call in flight.
    pub fn oldest(&self) -> Option<Duration> {
        let now = self.now();
        self.slots
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .filter(|&v| v != 0)
            .map(|v| now.saturating_sub(v - 1))
            .max()
            .map(Duration::from_nanos)
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) != 0)
            .count()
    }

    /// Whether a call in flight is stalled now, or a request was shed
    /// within the last retry interval (for readiness).
    pub fn shedding(&self) -> bool {
        let stalled = self
            .oldest()
            .is_some_and(|age| age.as_nanos() > u128::from(self.stall_ns));
        let last = self.last_shed.load(Ordering::Relaxed);
        let recent = last != 0
            && self.now().saturating_sub(last - 1) < u64::from(self.retry_secs) * 1_000_000_000;
        stalled || recent
    }

    /// Seconds a shed request is told to wait (Max-Age, Retry-After).
    pub fn retry_secs(&self) -> u32 {
        self.retry_secs
    }

    /// A slot for one call, or why the request is shed (counted in
    /// `microcert_shed_total`).
    pub fn enter(self: &Arc<Self>) -> Result<Permit, Shed> {
        let now = self.now();
        let mut free = None;
        for (i, s) in self.slots.iter().enumerate() {
            let v = s.load(Ordering::Acquire);
            if v == 0 {
                free.get_or_insert(i);
            } else if now.saturating_sub(v - 1) > self.stall_ns {
                return Err(self.shed(Shed::Stalled, now));
            }
        }
        // Take the first free slot seen, or any other that freed since.
        let first = free.unwrap_or(0);
        let n = self.slots.len();
        for k in 0..n {
            let i = (first + k) % n;
            if self.slots[i]
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                // Stored as 1 + start; `now` is at least 1 and start = now - 1
                // is close enough (1 ns).
                return Ok(Permit {
                    shed: self.clone(),
                    slot: i,
                });
            }
        }
        Err(self.shed(Shed::Full, now))
    }

    fn shed(&self, why: Shed, now: u64) -> Shed {
        self.last_shed.store(now, Ordering::Relaxed);
        metrics::counter!("microcert_shed_total", "reason" => why.name()).increment(1);
        why
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_call_sheds_new_ones_until_it_returns() {
        let s = Arc::new(Shedder::new(8, Duration::from_millis(50), 1));
        let stalled = s.enter().unwrap();
        // Within the stall bound, calls go through.
        drop(s.enter().unwrap());
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(s.enter().unwrap_err(), Shed::Stalled);
        assert!(s.shedding());
        drop(stalled);
        assert_eq!(s.in_flight(), 0);
        drop(s.enter().unwrap());
    }

    #[test]
    fn slots_are_bounded() {
        let s = Arc::new(Shedder::new(3, Duration::from_secs(60), 2));
        let held: Vec<_> = (0..3).map(|_| s.enter().unwrap()).collect();
        assert_eq!(s.enter().unwrap_err(), Shed::Full);
        assert_eq!(s.in_flight(), 3);
        drop(held);
        assert!(s.enter().is_ok());
        assert_eq!(s.retry_secs(), 2);
    }
}
