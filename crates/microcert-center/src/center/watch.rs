//! The shared, card-tagged high-water marks of issue 12 and the clock-step
//! gate of housekeeping (see [`crate::clock`]).

use std::sync::Arc;

use super::Center;
use crate::card::EncryptionCard;
use crate::clock::{Clock, ClockWatch, alarm_metric};
use crate::db::{KeyDatabase, MARK_CLOCK, MARK_PRUNED, Tx, with_tx};
use crate::{Error, Result};

/// The durable flag of an unconfirmed clock step (its value: the time
/// seen when it was found; 0 when none).
pub(crate) const MARK_ALARM: &str = "clock_alarm";

/// Domain bytes of a high-water mark's card tag.
const MARK_DOMAIN: &[u8] = b"MC-MARK\x01";

pub(crate) fn mark_bytes(name: &str, value: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(MARK_DOMAIN.len() + name.len() + 9);
    b.extend_from_slice(MARK_DOMAIN);
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b.extend_from_slice(&value.to_be_bytes());
    b
}

/// A mark as read: its value if its tag verifies.
enum Read {
    Missing,
    Good(u64),
    Bad(u64),
}

fn read_mark(card: &dyn EncryptionCard, tx: &mut dyn Tx, name: &str) -> Result<Read> {
    let Some((value, tag)) = tx.high_water(name)? else {
        return Ok(Read::Missing);
    };
    let want = card.record_tag(&mark_bytes(name, value))?;
    if subtle::ConstantTimeEq::ct_eq(&want[..], &tag[..]).into() {
        Ok(Read::Good(value))
    } else {
        tracing::error!(
            mark = name,
            value,
            "a high-water mark in the key database fails its card tag (edited from outside)"
        );
        metrics::counter!("microcert_mark_tamper_total", "mark" => name.to_string()).increment(1);
        Ok(Read::Bad(value))
    }
}

fn write_mark(card: &dyn EncryptionCard, tx: &mut dyn Tx, name: &str, value: u64) -> Result<()> {
    let tag = card.record_tag(&mark_bytes(name, value))?;
    tx.set_high_water(name, value, &tag)
}

/// The marker in the key database that says the in-memory replay guard
/// has started on it: a state file missing after that was removed.
const MARK_GUARD: &str = "memory_guard";

/// Whether the in-memory guard's state file must exist (the guard started
/// on this database before). A marker failing its tag counts as present.
pub(crate) fn guard_state_expected(
    db: &dyn KeyDatabase,
    card: &dyn EncryptionCard,
) -> Result<bool> {
    with_tx(db, |tx| {
        Ok(!matches!(read_mark(card, tx, MARK_GUARD)?, Read::Missing))
    })
}

/// What the guard calls once its state file is written at start-up:
/// records in the key database that the state file exists.
pub(crate) fn guard_started_hook(
    db: Arc<dyn KeyDatabase>,
    card: Arc<dyn EncryptionCard>,
) -> crate::replay::StartedHook {
    Box::new(move || {
        with_tx(&*db, |tx| match read_mark(&*card, tx, MARK_GUARD)? {
            Read::Good(1) => Ok(()),
            _ => write_mark(&*card, tx, MARK_GUARD, 1),
        })
    })
}

impl Center {
    /// Uses `clock` for the monotonic side of clock-step detection (tests
    /// use a [`crate::clock::ManualClock`]).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.watch = ClockWatch::new(clock);
        self
    }

    fn read_mark(&self, tx: &mut dyn Tx, name: &str) -> Result<Read> {
        read_mark(&*self.card, tx, name)
    }

    fn write_mark(&self, tx: &mut dyn Tx, name: &str, value: u64) -> Result<()> {
        write_mark(&*self.card, tx, name, value)
    }

    /// Raises the shared pruning high-water to at least `now` (before any
    /// record expiring before `now` is deleted). A mark that fails its tag
    /// is replaced by `now` plus the instance skew: the highest time any
    /// center within the allowed skew can have pruned by.
    pub(crate) fn raise_pruned(&self, now: u64) -> Result<()> {
        with_tx(&*self.db, |tx| {
            let next = match self.read_mark(tx, MARK_PRUNED)? {
                Read::Good(v) if v >= now => return Ok(()),
                Read::Good(_) | Read::Missing => now,
                Read::Bad(_) => now.saturating_add(self.config.instance_skew),
            };
            self.write_mark(tx, MARK_PRUNED, next)
        })
    }

    /// The shared pruning high-water (0 if never set).
    pub fn pruned_high_water(&self) -> Result<u64> {
        with_tx(&*self.db, |tx| {
            Ok(match self.read_mark(tx, MARK_PRUNED)? {
                Read::Good(v) | Read::Bad(v) => v,
                Read::Missing => 0,
            })
        })
    }

    /// Refuses (with the reason) while the clock may have stepped: checks
    /// `now` against the monotonic clock and the shared high-water, raises
    /// the high-water, and records a step found as a durable alarm.
    pub(crate) fn clock_gate(&self, now: u64) -> Result<()> {
        let found = with_tx(&*self.db, |tx| {
            match self.read_mark(tx, MARK_ALARM)? {
                Read::Good(0) | Read::Missing => {}
                Read::Good(at) => return Ok(Some(format!("a clock step found at {at}"))),
                Read::Bad(_) => {
                    return Ok(Some("the clock-step flag fails its card tag".to_string()));
                }
            }
            let high = match self.read_mark(tx, MARK_CLOCK)? {
                Read::Missing => None,
                Read::Good(v) => Some(v),
                Read::Bad(_) => {
                    self.write_mark(tx, MARK_ALARM, now.max(1))?;
                    return Ok(Some("the clock high-water fails its card tag".to_string()));
                }
            };
            if let Some(step) = self.watch.observe(now, high, self.config.instance_skew) {
                self.write_mark(tx, MARK_ALARM, now.max(1))?;
                metrics::counter!("microcert_clock_steps_total").increment(1);
                return Ok(Some(step.to_string()));
            }
            if high.is_none_or(|h| now > h) {
                self.write_mark(tx, MARK_CLOCK, now)?;
            }
            Ok(None)
        })?;
        match found {
            None => {
                alarm_metric(false);
                Ok(())
            }
            Some(why) => {
                alarm_metric(true);
                tracing::error!(
                    now,
                    "{why}: housekeeping (pruning, deactivation of expired seeds, end of grace \
                     periods) is suspended until an operator confirms the time (microcert clock confirm)"
                );
                Err(Error::ClockUnconfirmed {
                    why: why.to_string(),
                })
            }
        }
    }

    /// The shared high-water marks whose card tag fails (their names), for
    /// the integrity check: an edit of them from outside.
    pub fn check_marks(&self) -> Result<Vec<String>> {
        with_tx(&*self.db, |tx| {
            let mut bad = Vec::new();
            for name in [MARK_PRUNED, MARK_CLOCK, MARK_ALARM, MARK_GUARD] {
                if let Read::Bad(_) = self.read_mark(tx, name)? {
                    bad.push(name.to_string());
                }
            }
            Ok(bad)
        })
    }

    /// The time at which an unconfirmed clock step was found, if any.
    pub fn clock_alarm(&self) -> Result<Option<u64>> {
        with_tx(&*self.db, |tx| {
            Ok(match self.read_mark(tx, MARK_ALARM)? {
                Read::Missing | Read::Good(0) => None,
                Read::Good(v) | Read::Bad(v) => Some(v.max(1)),
            })
        })
    }

    /// An operator confirms that `now` is the right time: the clock-step
    /// alarm ends, `now` becomes the clock high-water (even if lower) and
    /// the monotonic reference, and housekeeping resumes. Audited. The
    /// pruning high-water is never lowered: messages whose records may
    /// have been pruned stay refused.
    pub fn confirm_clock_step(&self, actor: &str, now: u64) -> Result<()> {
        with_tx(&*self.db, |tx| {
            let was = match self.read_mark(tx, MARK_ALARM)? {
                Read::Missing | Read::Good(0) => "no alarm".to_string(),
                Read::Good(v) => format!("alarm raised at {v}"),
                Read::Bad(v) => format!("alarm flag failing its tag ({v})"),
            };
            self.write_mark(tx, MARK_ALARM, 0)?;
            self.write_mark(tx, MARK_CLOCK, now)?;
            self.audit(
                tx,
                now,
                actor,
                "confirm-clock",
                (None, None),
                &format!("the clock reads {now}; {was}"),
            )
        })?;
        self.watch.rebase(now);
        alarm_metric(false);
        tracing::warn!(actor, now, "clock confirmed by an operator");
        Ok(())
    }
}
