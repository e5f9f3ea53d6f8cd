//! The shared, card-tagged high-water marks of issue 12 and the clock-step
//! gate of housekeeping (see [`crate::clock`]).

use std::sync::Arc;

use super::Center;
use crate::card::EncryptionCard;
use crate::clock::{ABSENCE_LIMIT, Clock, ClockStep, ClockWatch, STEP_TOLERANCE, alarm_metric};
use crate::db::{KeyDatabase, MARK_CLOCK, MARK_PRUNED, Tx, with_tx};
use crate::{Error, Result};

/// The durable flag of an unconfirmed clock step (its value: the time
/// seen when it was found; 0 when none). Since gap 4 of issue 12's review
/// the alarm is also held by the clock high-water's own row
/// ([`MARK_CLOCK`]: `alarm << 32 | high-water`), so that deleting this
/// row, or that one, clears nothing.
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

/// The in-memory replay guard's record in the key database (gap 1 of
/// issue 12's review): the guard's start counter (epoch) and its replay
/// mark, `epoch << 32 | mark`, card-tagged like every mark. The guard
/// writes it before its state file at every start and before the file at
/// every raise of the mark, so it is never behind the file: a state file
/// of another epoch is an older copy (or a crash between the two writes)
/// and is read as an unclean stop with at least this mark as the floor.
/// The value 1 is the marker of the version before the counter (the state
/// file exists).
const MARK_GUARD: &str = "memory_guard";

fn unpack_guard(value: u64) -> crate::replay::DbRecord {
    use crate::replay::DbRecord;
    match (value >> 32, value & 0xffff_ffff) {
        (0, 1) => DbRecord::Legacy,
        (0, _) => DbRecord::Bad,
        (epoch, mark) => DbRecord::Good { epoch, mark },
    }
}

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

/// The guard's record in the key database, through the sealing layer.
struct GuardRecord {
    db: Arc<dyn KeyDatabase>,
    card: Arc<dyn EncryptionCard>,
}

impl crate::replay::GuardStore for GuardRecord {
    fn read(&self) -> Result<crate::replay::DbRecord> {
        use crate::replay::DbRecord;
        with_tx(&*self.db, |tx| {
            Ok(match read_mark(&*self.card, tx, MARK_GUARD)? {
                Read::Missing => DbRecord::Missing,
                Read::Good(v) => unpack_guard(v),
                Read::Bad(_) => DbRecord::Bad,
            })
        })
    }

    fn write(&self, epoch: u64, mark: u64) -> Result<()> {
        let value = ((epoch & 0xffff_ffff) << 32) | mark.min(0xffff_ffff);
        with_tx(&*self.db, |tx| {
            write_mark(&*self.card, tx, MARK_GUARD, value)
        })
    }

    fn in_use(&self) -> Result<bool> {
        // With `now` and the year at their maxima, the seeds "to expire"
        // are every Active seed (of any generation): one indexed lookup.
        // (`now` stays within the backends' signed 64-bit column.)
        if !self
            .db
            .devices_to_expire(i64::MAX as u64, u16::MAX, 1)?
            .is_empty()
        {
            return Ok(true);
        }
        let suspended = crate::db::DeviceQuery {
            state: Some(microcert_core::KeyState::Suspended),
            limit: 1,
            ..crate::db::DeviceQuery::default()
        };
        Ok(!self.db.list_devices(&suspended)?.is_empty())
    }
}

/// The guard's record in the key database (its start counter and mark),
/// read and written through the center's sealing layer.
pub(crate) fn guard_started_hook(
    db: Arc<dyn KeyDatabase>,
    card: Arc<dyn EncryptionCard>,
) -> crate::replay::StartedHook {
    let db: Arc<dyn KeyDatabase> = crate::integrity::Sealed::wrap(db, card.clone());
    Box::new(GuardRecord { db, card })
}

/// The low 32 bits of a packed mark.
const LOW: u64 = 0xffff_ffff;

fn pack(high: u64, low: u64) -> u64 {
    (high.min(LOW) << 32) | low.min(LOW)
}

/// The name of a host's boot reference ([`crate::clock::Boot`]): its
/// value is `boot id << 32 | the wall time the boot started at`.
fn boot_mark(host: u64) -> String {
    format!("{MARK_BOOT_PREFIX}{host:016x}")
}

/// Prefix of the per-host boot references.
const MARK_BOOT_PREFIX: &str = "clock_boot.";

/// The clock's durable state as read.
struct ClockRead {
    /// The highest time seen, when known and trusted.
    high: Option<u64>,
    /// An unconfirmed alarm: when it was raised (best known) and why.
    alarm: Option<(u64, String)>,
    /// Whether both rows already hold the alarm.
    latched: bool,
}

/// Reads the clock's high-water and alarm. `MARK_CLOCK` holds both
/// (`alarm << 32 | high-water`, one card tag), and `MARK_ALARM` mirrors
/// the alarm (as written by the version before): the alarm is up when
/// either says so or fails its tag, and when the high-water is missing
/// from a database whose replay records have been pruned before (its row
/// was deleted: the alarm it held is unknown).
fn read_clock(card: &dyn EncryptionCard, tx: &mut dyn Tx) -> Result<ClockRead> {
    let mut alarm = None;
    let mut latched = true;
    match read_mark(card, tx, MARK_ALARM)? {
        Read::Good(0) | Read::Missing => latched = false,
        Read::Good(at) => alarm = Some((at, format!("a clock step found at {at}"))),
        Read::Bad(_) => {
            latched = false;
            alarm = Some((0, "the clock-step flag fails its card tag".to_string()));
        }
    }
    let high = match read_mark(card, tx, MARK_CLOCK)? {
        Read::Good(v) => {
            let at = v >> 32;
            if at == 0 {
                latched = false;
            } else if alarm.as_ref().is_none_or(|(a, _)| *a == 0) {
                alarm = Some((at, format!("a clock step found at {at}")));
            }
            Some(v & LOW)
        }
        Read::Bad(_) => {
            latched = false;
            alarm.get_or_insert((0, "the clock high-water fails its card tag".to_string()));
            None
        }
        Read::Missing => {
            latched = false;
            if let Read::Good(p) | Read::Bad(p) = read_mark(card, tx, MARK_PRUNED)? {
                alarm.get_or_insert((
                    p,
                    "the clock high-water is missing from a database kept before (deleted from \
                     outside?): a raised alarm may have gone with it"
                        .to_string(),
                ));
            }
            None
        }
    };
    Ok(ClockRead {
        high,
        alarm,
        latched,
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
    /// `now` against the boot clock recorded by the last run on this boot,
    /// the monotonic clock and the shared high-water, raises the
    /// high-water, and records a step found as a durable alarm.
    pub(crate) fn clock_gate(&self, now: u64) -> Result<()> {
        let boot = self.watch.boot();
        let first = self.watch.first();
        let found = with_tx(&*self.db, |tx| {
            let read = read_clock(&*self.card, tx)?;
            if let Some((at, why)) = read.alarm {
                if !read.latched {
                    // Held by both rows from now on: deleting one of them
                    // clears nothing.
                    let at = if at == 0 { now.max(1) } else { at };
                    self.raise_alarm(tx, at, read.high)?;
                }
                return Ok(Some(why));
            }
            let high = read.high;
            let mut step = None;
            let mut same_boot = false;
            if let Some(b) = boot {
                let origin = now.saturating_sub(b.since.as_secs());
                match self.read_mark(tx, &boot_mark(b.host))? {
                    Read::Good(v) if v >> 32 == u64::from(b.id) => {
                        same_boot = true;
                        let was = v & LOW;
                        if origin.abs_diff(was) > STEP_TOLERANCE {
                            step = Some(
                                ClockStep {
                                    expected: now.saturating_add(was).saturating_sub(origin),
                                    seen: now,
                                }
                                .to_string()
                                    + " since the last run on this boot",
                            );
                        }
                    }
                    Read::Bad(_) => {
                        step = Some("this host's boot reference fails its card tag".to_string())
                    }
                    Read::Good(_) | Read::Missing => {}
                }
            }
            if step.is_none()
                && first
                && !same_boot
                && let Some(h) = high
                && now > h.saturating_add(ABSENCE_LIMIT)
            {
                step = Some(format!(
                    "the clock reads {} days past the last time any center saw ({h}); after a \
                     restart on another boot a step cannot be told from the time the centers \
                     were down",
                    (now - h) / 86_400
                ));
            }
            if step.is_none()
                && let Some(s) = self.watch.observe(now, high, self.config.instance_skew)
            {
                step = Some(s.to_string());
            }
            if let Some(why) = step {
                self.raise_alarm(tx, now.max(1), high)?;
                metrics::counter!("microcert_clock_steps_total").increment(1);
                return Ok(Some(why));
            }
            if high.is_none_or(|h| now > h) {
                self.write_mark(tx, MARK_CLOCK, pack(0, now))?;
            }
            self.write_boot(tx, now, false)?;
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

    /// Records an alarm raised at `at` in both rows that hold it.
    fn raise_alarm(&self, tx: &mut dyn Tx, at: u64, high: Option<u64>) -> Result<()> {
        self.write_mark(tx, MARK_CLOCK, pack(at, high.unwrap_or(0)))?;
        self.write_mark(tx, MARK_ALARM, at)
    }

    /// Writes this host's boot reference for `now` (when the clock knows
    /// its boot), unless it holds the same value already (or `always`).
    fn write_boot(&self, tx: &mut dyn Tx, now: u64, always: bool) -> Result<()> {
        let Some(b) = self.watch.boot() else {
            return Ok(());
        };
        let name = boot_mark(b.host);
        let value = pack(u64::from(b.id), now.saturating_sub(b.since.as_secs()));
        if !always && matches!(self.read_mark(tx, &name)?, Read::Good(v) if v == value) {
            return Ok(());
        }
        self.write_mark(tx, &name, value)
    }

    /// The shared high-water marks whose card tag fails (their names), for
    /// the integrity check: an edit of them from outside.
    pub fn check_marks(&self) -> Result<Vec<String>> {
        with_tx(&*self.db, |tx| {
            let mut bad = Vec::new();
            let mut names: Vec<String> = [MARK_PRUNED, MARK_CLOCK, MARK_ALARM, MARK_GUARD]
                .iter()
                .map(|n| n.to_string())
                .collect();
            if let Some(b) = self.watch.boot() {
                names.push(boot_mark(b.host));
            }
            for name in names {
                if let Read::Bad(_) = self.read_mark(tx, &name)? {
                    bad.push(name);
                }
            }
            Ok(bad)
        })
    }

    /// The time at which an unconfirmed clock step was found, if any (for
    /// an alarm flag that fails its tag or was deleted, the best time
    /// known).
    pub fn clock_alarm(&self) -> Result<Option<u64>> {
        with_tx(&*self.db, |tx| {
            Ok(read_clock(&*self.card, tx)?.alarm.map(|(at, _)| at.max(1)))
        })
    }

    /// An operator confirms that `now` is the right time: the clock-step
    /// alarm ends, `now` becomes the clock high-water (even if lower) and
    /// the monotonic reference, and housekeeping resumes. Audited. The
    /// pruning high-water is never lowered: messages whose records may
    /// have been pruned stay refused.
    pub fn confirm_clock_step(&self, actor: &str, now: u64) -> Result<()> {
        with_tx(&*self.db, |tx| {
            let was = match read_clock(&*self.card, tx)?.alarm {
                None => "no alarm".to_string(),
                Some((_, why)) => why,
            };
            self.write_mark(tx, MARK_ALARM, 0)?;
            self.write_mark(tx, MARK_CLOCK, pack(0, now))?;
            self.write_boot(tx, now, true)?;
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
