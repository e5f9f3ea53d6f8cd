//! The life-cycle policy: every rule that decides what happens to a
//! device's seeds, as one pure function.
//!
//! [`decide`] sees a [`DeviceSnapshot`] (the states, years and grace
//! periods of a device's seeds, no key material), one [`Input`] (a message
//! to verify, an operator's event, a housekeeping pass, an ENROLL, ...) and
//! the time; it returns a [`Decision`] (the effects: life-cycle
//! transitions, the transport-enrollment flag, a command to queue, audit
//! entries, how a message's seed may be used) or the refusal. It does no
//! I/O, reads no clock and touches no card, in the spirit of rustls's
//! sans-I/O state machines: [`crate::Center`] loads the snapshot, calls
//! `decide`, and applies the effects in one transaction. Every transition
//! it lists is legal by the core's state table ([`microcert_core::transition`]),
//! in the order listed.
//!
//! The whole rule set is tested as one table (every state x every input x
//! the clock cases), printed in docs/architecture.md.

use microcert_core::{DeviceId, Event, KeyState, SEED_YEARS, time, transition};

use crate::card::EnrollVia;
use crate::db::{DeviceRow, SeedRow};
use crate::{Error, Result};

/// What the policy sees of one seed (no key material).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedSnapshot {
    /// The generation.
    pub generation: u8,
    /// Its life-cycle state.
    pub state: KeyState,
    /// The first of its five calendar years.
    pub base_year: u16,
    /// End of its grace period after a seed update, if one was given.
    pub grace_until: Option<u64>,
    /// When it was revoked, if it was.
    pub compromised_at: Option<u64>,
    /// Whether its ciphertext still exists (not destroyed).
    pub has_ciphertext: bool,
}

impl SeedSnapshot {
    /// The snapshot of a stored seed record.
    pub fn of(row: &SeedRow) -> Self {
        SeedSnapshot {
            generation: row.generation,
            state: row.state,
            base_year: row.base_year,
            grace_until: row.grace_until,
            compromised_at: row.compromised_at,
            has_ciphertext: row.ciphertext.is_some(),
        }
    }
}

/// What the policy sees of a device: its seeds in generation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSnapshot {
    /// The device.
    pub id: DeviceId,
    /// Personalization count of the chip.
    pub epoch: u8,
    /// Whether an ENROLL under Ktr(device, epoch) is accepted now.
    pub transport_open: bool,
    /// Highest generation ever enrolled, None before the first.
    pub highest_generation: Option<u8>,
    /// The seeds, oldest first.
    pub seeds: Vec<SeedSnapshot>,
}

impl DeviceSnapshot {
    /// The snapshot of a stored device and its seeds (oldest first).
    pub fn of<'a>(dev: &DeviceRow, seeds: impl IntoIterator<Item = &'a SeedRow>) -> Self {
        DeviceSnapshot {
            id: dev.id,
            epoch: dev.epoch,
            transport_open: dev.transport_open,
            highest_generation: dev.highest_generation,
            seeds: seeds.into_iter().map(SeedSnapshot::of).collect(),
        }
    }

    /// The snapshot of a device's seeds alone, for the rules that look at
    /// nothing else (housekeeping).
    pub fn of_seeds<'a>(id: DeviceId, seeds: impl IntoIterator<Item = &'a SeedRow>) -> Self {
        let seeds: Vec<SeedSnapshot> = seeds.into_iter().map(SeedSnapshot::of).collect();
        DeviceSnapshot {
            id,
            epoch: 0,
            transport_open: false,
            highest_generation: seeds.last().map(|s| s.generation),
            seeds,
        }
    }

    fn seed(&self, generation: u8) -> Option<&SeedSnapshot> {
        self.seeds.iter().find(|s| s.generation == generation)
    }

    fn position(&self, generation: u8) -> Option<usize> {
        self.seeds.iter().position(|s| s.generation == generation)
    }
}

/// What happens to a device, for [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// A message (AUTH, AUTH_RESPONSE, SIGNATURE, SEALED) under
    /// `generation` with time `t`, before its MAC is checked: may it be
    /// verified, with which seed, and does its acceptance activate one?
    /// `first_use`: whether this message type may activate a
    /// PreActivation seed (AUTH and AUTH_RESPONSE may; the others not).
    Use {
        /// The message's generation.
        generation: u8,
        /// The message's t.
        t: u32,
        /// Whether a first use activates a PreActivation seed.
        first_use: bool,
    },
    /// A SIGNATURE whose seed is not usable now, found in the notary as
    /// first seen at `first_seen`: is the record still valid?
    Notarized {
        /// The signature's generation.
        generation: u8,
        /// When the notary first saw it.
        first_seen: u64,
    },
    /// An operator's life-cycle event (not Revoke: [`Input::Revoke`]) on
    /// a generation (None: the current one; during a grace period then
    /// both generations).
    Operator {
        /// The generation, None for the current one.
        generation: Option<u8>,
        /// The event.
        event: Event,
    },
    /// Revocation of the device.
    Revoke,
    /// A housekeeping pass over the device (behind the clock gate).
    Housekeeping,
    /// An operator reopens transport enrollment (with this epoch if given).
    ReopenTransport {
        /// The epoch asked for.
        new_epoch: Option<u8>,
    },
    /// An ENROLL under `generation`, before its AEAD is opened: which keys
    /// may open it? `update_asked`: an UPDATE_SEED under the current
    /// generation is pending (the center asked for this update).
    Enroll {
        /// The ENROLL's generation.
        generation: u8,
        /// Whether an UPDATE_SEED under the current seed is pending.
        update_asked: bool,
    },
    /// An ENROLL under `generation` opened with the key `via` (after
    /// [`Input::Enroll`] allowed it): how the device's seeds change around
    /// the new one. `grace_period`: seconds the old seed keeps verifying
    /// after an update.
    Enrolled {
        /// The new seed's generation.
        generation: u8,
        /// The key that opened it.
        via: EnrollVia,
        /// Whether an UPDATE_SEED under the current seed is pending, read
        /// in the transaction that writes the new seed.
        update_asked: bool,
        /// The grace period of a seed update, in seconds.
        grace_period: u64,
    },
    /// A seed update is asked for (an operator's, or the renewal pass's
    /// when `renewal_years` is given: then only a device whose current
    /// seed is within that many years of its end gets one). `pending`: the
    /// opcode of a command still unanswered, if any.
    QueueUpdate {
        /// The opcode of the device's unanswered command, if any.
        pending: Option<u8>,
        /// The class's renewal period, for the renewal pass.
        renewal_years: Option<u16>,
    },
}

/// How an accepted message's seed is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// The current generation, Active.
    Steady,
    /// The current generation, not yet used: this use activates it.
    Activates,
    /// The previous generation during a seed update's grace period.
    Grace,
}

/// Why a transition happens, for its audit entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The reason the operator gave.
    Given,
    /// An operator's event during the grace period of generation `of`:
    /// the new generation is activated first to receive it.
    GraceActivation {
        /// The operator's event.
        event: Event,
        /// The generation in grace.
        of: u8,
    },
    /// The next generation is in use.
    Superseded,
    /// The grace period is over.
    GraceEnded,
    /// The seed's five years are over.
    Expired,
    /// Expired before its update; transport enrollment reopens.
    ExpiredBeforeUpdate,
    /// The first successful AUTH under a new seed.
    FirstUse,
    /// A transport re-enrollment replaces the seed.
    ReplacedByTransport,
}

impl Reason {
    /// The audit text, with the operator's reason `given`.
    pub fn text(self, given: &str) -> String {
        match self {
            Reason::Given => given.to_string(),
            Reason::GraceActivation { event, of } => format!(
                "{} during the grace period of generation {of}: {given}",
                event.name()
            ),
            Reason::Superseded => "superseded: next generation in use".into(),
            Reason::GraceEnded => "grace period ended".into(),
            Reason::Expired => "seed expired".into(),
            Reason::ExpiredBeforeUpdate => "expired before its update".into(),
            Reason::FirstUse => "first successful AUTH".into(),
            Reason::ReplacedByTransport => "replaced by transport re-enrollment".into(),
        }
    }
}

/// One effect of a [`Decision`], applied in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The message may be verified with its generation's seed, this way.
    Use(Use),
    /// A SIGNATURE's notary record is valid.
    NotaryValid,
    /// Which keys may open an ENROLL: Kupd under this generation's seed,
    /// Ktr(device, this epoch).
    EnrollKeys {
        /// The generation whose seed gives Kupd, if allowed.
        update: Option<u8>,
        /// The epoch of Ktr, if transport enrollment is open.
        transport: Option<u8>,
    },
    /// A life-cycle transition of one generation (audited).
    Transition {
        /// The generation.
        generation: u8,
        /// The event.
        event: Event,
        /// Why (the audit entry's reason).
        reason: Reason,
    },
    /// Transport enrollment opens (with this epoch) or closes.
    Transport {
        /// Open or closed.
        open: bool,
        /// The device's epoch from now on.
        epoch: u8,
    },
    /// A REVOKE command under this generation replaces any pending command
    /// (audited as "queue-revoke").
    QueueRevoke {
        /// The generation it is made under.
        generation: u8,
    },
    /// The old generation keeps verifying until `until` (a seed update's
    /// grace period; covered by the record's tag).
    Grace {
        /// The generation in grace.
        generation: u8,
        /// End of the grace period, Unix seconds.
        until: u64,
    },
    /// The pending UPDATE_SEED is answered (status 0).
    AnswerUpdate,
    /// The new seed is stored, PreActivation, under this generation.
    NewSeed {
        /// Its generation.
        generation: u8,
    },
    /// An UPDATE_SEED command under this generation is queued (audited as
    /// "queue-update").
    QueueUpdate {
        /// The generation it is made under.
        generation: u8,
    },
    /// An audit entry of the device (the transitions have their own).
    Audit {
        /// The action.
        action: &'static str,
    },
}

/// The outcome of [`decide`]: what to do, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// The effects, in the order they are applied.
    pub effects: Vec<Effect>,
}

impl Decision {
    /// How the message's seed is used, for [`Input::Use`].
    pub fn use_(&self) -> Option<Use> {
        self.effects.iter().find_map(|e| match e {
            Effect::Use(u) => Some(*u),
            _ => None,
        })
    }

    /// The transitions, in order.
    pub fn transitions(&self) -> impl Iterator<Item = (u8, Event, Reason)> + '_ {
        self.effects.iter().filter_map(|e| match e {
            Effect::Transition {
                generation,
                event,
                reason,
            } => Some((*generation, *event, *reason)),
            _ => None,
        })
    }
}

/// The calendar year of Unix time `now` (saturating).
pub fn year_of(now: u64) -> u16 {
    let y = time::date_of(now as i64).year;
    u16::try_from(y).unwrap_or(u16::MAX)
}

/// The last calendar year of a seed whose first is `base_year`.
pub fn last_year(base_year: u16) -> u16 {
    base_year.saturating_add(SEED_YEARS - 1)
}

/// Whether a seed's five years cover the calendar date of `now`.
pub fn covers(base_year: u16, now: u64) -> bool {
    let y = year_of(now);
    base_year <= y && y <= last_year(base_year)
}

/// The refusal for a message under a seed in `state`.
pub fn refusal_for(state: KeyState) -> Error {
    match state {
        KeyState::Compromised => Error::Revoked,
        KeyState::Suspended => Error::Suspended,
        KeyState::PreActivation
        | KeyState::Active
        | KeyState::Deactivated
        | KeyState::Destroyed => Error::NotActive,
    }
}

/// Applies `event` to a seed record's state and timestamps (the core's
/// transition; a destroyed seed's ciphertext is zeroed and dropped).
/// Returns the new state; the record is unchanged when refused.
pub fn apply_transition(row: &mut SeedRow, event: Event, now: u64) -> Result<KeyState> {
    let to = transition(row.state, event).map_err(Error::from_core)?;
    row.state = to;
    match event {
        Event::Activate => row.activated_at = Some(now),
        Event::Suspend => row.suspended_at = Some(now),
        Event::Resume => {}
        Event::Deactivate => {
            row.deactivated_at = Some(now);
            row.grace_until = None;
        }
        Event::Revoke => {
            row.compromised_at = Some(now);
            row.grace_until = None;
        }
        Event::Destroy => {
            row.destroyed_at = Some(now);
            // The ciphertext is overwritten with zeros and set NULL in
            // the same statement; secure_delete zeroes the freed cell.
            if let Some(ct) = row.ciphertext.as_mut() {
                ct.0.fill(0);
            }
            row.ciphertext = None;
        }
    }
    Ok(to)
}

/// Collects transitions, checking each against the core's state table on
/// the states as they are after the ones before it.
struct Plan {
    states: Vec<KeyState>,
    effects: Vec<Effect>,
}

impl Plan {
    fn new(dev: &DeviceSnapshot) -> Self {
        Plan {
            states: dev.seeds.iter().map(|s| s.state).collect(),
            effects: Vec::new(),
        }
    }

    fn state(&self, pos: usize) -> KeyState {
        self.states[pos]
    }

    fn go(&mut self, dev: &DeviceSnapshot, pos: usize, event: Event, reason: Reason) -> Result<()> {
        self.states[pos] = transition(self.states[pos], event).map_err(Error::from_core)?;
        self.effects.push(Effect::Transition {
            generation: dev.seeds[pos].generation,
            event,
            reason,
        });
        Ok(())
    }

    fn done(self) -> Decision {
        Decision {
            effects: self.effects,
        }
    }
}

/// Whether `seeds[pos]` (the current generation) and the one before it
/// are in a seed update's grace period: the new one never used by the
/// node (PreActivation, or Suspended with its predecessor), the old one
/// with a grace period and still Active or Suspended.
fn operator_grace(dev: &DeviceSnapshot, pos: usize) -> bool {
    let Some(prev) = pos.checked_sub(1).and_then(|p| dev.seeds.get(p)) else {
        return false;
    };
    let Some(cur) = dev.seeds.get(pos) else {
        return false;
    };
    prev.generation.checked_add(1) == Some(cur.generation)
        && prev.grace_until.is_some()
        && matches!(
            (prev.state, cur.state),
            (
                KeyState::Active | KeyState::Suspended,
                KeyState::PreActivation
            ) | (KeyState::Suspended, KeyState::Suspended)
        )
}

/// The one decision function of the life-cycle policy (see the module
/// docs). `now` is Unix seconds.
pub fn decide(dev: &DeviceSnapshot, input: Input, now: u64) -> Result<Decision> {
    match input {
        Input::Use {
            generation,
            t,
            first_use,
        } => decide_use(dev, generation, t, now, first_use),
        Input::Notarized {
            generation,
            first_seen,
        } => {
            let s = dev.seed(generation).ok_or(Error::WrongGeneration)?;
            // Valid as recorded while the seed was usable; for a
            // Compromised seed only if seen before the compromise.
            if s.compromised_at.is_none_or(|c| first_seen < c) {
                Ok(Decision {
                    effects: vec![Effect::NotaryValid],
                })
            } else {
                Err(Error::Revoked)
            }
        }
        Input::Operator { generation, event } => decide_operator(dev, generation, event),
        Input::Revoke => {
            let mut plan = Plan::new(dev);
            let mut any = false;
            for pos in 0..dev.seeds.len() {
                if matches!(plan.state(pos), KeyState::Compromised | KeyState::Destroyed) {
                    continue;
                }
                plan.go(dev, pos, Event::Revoke, Reason::Given)?;
                any = true;
            }
            if !any && let Some(c) = dev.seeds.last() {
                return Err(Error::IllegalTransition {
                    from: c.state,
                    event: Event::Revoke,
                });
            }
            plan.effects.push(Effect::Transport {
                open: false,
                epoch: dev.epoch,
            });
            match dev.seeds.last().filter(|s| s.has_ciphertext) {
                Some(cur) => plan.effects.push(Effect::QueueRevoke {
                    generation: cur.generation,
                }),
                None => plan.effects.push(Effect::Audit { action: "revoke" }),
            }
            Ok(plan.done())
        }
        Input::Housekeeping => {
            let mut plan = Plan::new(dev);
            let year = year_of(now);
            for (pos, s) in dev.seeds.iter().enumerate() {
                if s.state != KeyState::Active {
                    continue;
                }
                let over_grace = s.grace_until.is_some_and(|g| g < now);
                let expired = last_year(s.base_year) < year;
                if over_grace {
                    plan.go(dev, pos, Event::Deactivate, Reason::GraceEnded)?;
                } else if expired {
                    plan.go(dev, pos, Event::Deactivate, Reason::Expired)?;
                }
            }
            Ok(plan.done())
        }
        Input::ReopenTransport { new_epoch } => {
            let mut plan = Plan::new(dev);
            let Some(pos) = dev.seeds.len().checked_sub(1) else {
                return Err(Error::TransportOpen);
            };
            let cur = dev.seeds[pos];
            let expired = year_of(now) > last_year(cur.base_year);
            let epoch = match cur.state {
                KeyState::Compromised | KeyState::Destroyed if cur.compromised_at.is_some() => {
                    let next = dev.epoch.checked_add(1).ok_or(Error::EpochExhausted)?;
                    if new_epoch != Some(next) {
                        return Err(Error::WrongEpoch { expected: next });
                    }
                    next
                }
                _ if expired => {
                    if new_epoch.is_some_and(|e| e != dev.epoch) {
                        return Err(Error::WrongEpoch {
                            expected: dev.epoch,
                        });
                    }
                    if cur.state == KeyState::Active {
                        plan.go(dev, pos, Event::Deactivate, Reason::ExpiredBeforeUpdate)?;
                    }
                    dev.epoch
                }
                _ => return Err(Error::SeedStillValid),
            };
            plan.effects.push(Effect::Transport { open: true, epoch });
            plan.effects.push(Effect::Audit {
                action: "reopen-transport",
            });
            Ok(plan.done())
        }
        Input::Enroll {
            generation,
            update_asked,
        } => {
            let expected = match dev.highest_generation {
                None => Some(0),
                Some(g) => g.checked_add(1),
            };
            if Some(generation) != expected {
                return Err(Error::WrongGeneration);
            }
            // Kupd only while the current seed is Active, covers today,
            // and an UPDATE_SEED under it is pending (v1.1: an update is
            // always asked for by the center, so a stolen seed alone
            // cannot move the device to a seed of the thief's).
            let current = dev.seeds.last();
            let usable_now =
                |c: &SeedSnapshot| c.state == KeyState::Active && covers(c.base_year, now);
            let update = current
                .filter(|c| usable_now(c) && update_asked)
                .map(|c| c.generation);
            let transport = dev.transport_open.then_some(dev.epoch);
            if update.is_none() && transport.is_none() {
                return Err(match current {
                    // Not asked for: as opaque as a MAC that does not verify.
                    Some(c) if usable_now(c) => Error::Verification,
                    Some(c) if c.state == KeyState::Active => Error::Expired,
                    Some(c) => refusal_for(c.state),
                    None => Error::NotActive,
                });
            }
            Ok(Decision {
                effects: vec![Effect::EnrollKeys { update, transport }],
            })
        }
        Input::Enrolled {
            generation,
            via,
            update_asked,
            grace_period,
        } => {
            // Only with a key the ENROLL rules allow now (the same rules
            // as [`Input::Enroll`], asked again: a decision never rests on
            // a check made outside it).
            let keys = decide(
                dev,
                Input::Enroll {
                    generation,
                    update_asked,
                },
                now,
            )?;
            let allowed = keys.effects.iter().any(|e| {
                matches!(
                    (*e, via),
                    (
                        Effect::EnrollKeys {
                            update: Some(_),
                            ..
                        },
                        EnrollVia::Update
                    ) | (
                        Effect::EnrollKeys {
                            transport: Some(_),
                            ..
                        },
                        EnrollVia::Transport
                    )
                )
            });
            if !allowed {
                return Err(Error::Verification);
            }
            let mut plan = Plan::new(dev);
            match via {
                // The old seed keeps verifying for the grace period, or
                // until the new one is first used; the asked-for update
                // is answered.
                EnrollVia::Update => {
                    if let Some(cur) = dev.seeds.last() {
                        plan.effects.push(Effect::Grace {
                            generation: cur.generation,
                            until: now.saturating_add(grace_period),
                        });
                    }
                    plan.effects.push(Effect::AnswerUpdate);
                }
                // A re-enrollment under Ktr closes transport enrollment
                // and replaces an Active (expired) seed.
                EnrollVia::Transport => {
                    plan.effects.push(Effect::Transport {
                        open: false,
                        epoch: dev.epoch,
                    });
                    for pos in 0..dev.seeds.len() {
                        if plan.state(pos) == KeyState::Active {
                            plan.go(dev, pos, Event::Deactivate, Reason::ReplacedByTransport)?;
                        }
                    }
                }
            }
            plan.effects.push(Effect::NewSeed { generation });
            plan.effects.push(Effect::Audit { action: "enroll" });
            Ok(plan.done())
        }
        Input::QueueUpdate {
            pending,
            renewal_years,
        } => {
            let cur = dev.seeds.last().ok_or(Error::NoSeed { device: dev.id })?;
            if cur.state != KeyState::Active {
                return Err(refusal_for(cur.state));
            }
            // The renewal pass: only within the class's renewal period.
            if let Some(renew) = renewal_years
                && u32::from(year_of(now)) + u32::from(renew) <= u32::from(last_year(cur.base_year))
            {
                return Ok(Decision::default());
            }
            match pending {
                Some(op) if op == microcert_core::Opcode::REVOKE.get() => {
                    Err(Error::RevokePending { device: dev.id })
                }
                // One command at a time: the pending one goes first.
                Some(_) => Ok(Decision::default()),
                None => Ok(Decision {
                    effects: vec![Effect::QueueUpdate {
                        generation: cur.generation,
                    }],
                }),
            }
        }
    }
}

/// The one grace and expiry rule of every message type (PROTOCOL.md v1.1
/// section 6):
///
/// - the current generation: Active (or PreActivation on first use);
/// - the previous generation: only during its grace period (Active, the
///   current one not yet used, and `now` before `grace_until`), whether or
///   not housekeeping has run;
/// - the seed's five years must cover both the center's date and the
///   message's t (an expired seed is refused before housekeeping
///   deactivates it; a seed whose base year is still ahead is not yet
///   valid).
fn decide_use(
    dev: &DeviceSnapshot,
    generation: u8,
    t: u32,
    now: u64,
    first_use: bool,
) -> Result<Decision> {
    let Some(highest) = dev.highest_generation else {
        return Err(Error::NotActive);
    };
    let s = dev.seed(generation).ok_or(Error::WrongGeneration)?;
    let how = if generation == highest {
        match s.state {
            KeyState::Active => Use::Steady,
            KeyState::PreActivation if first_use => Use::Activates,
            other => return Err(refusal_for(other)),
        }
    } else {
        let current = dev.seed(highest).map(|c| c.state);
        let in_grace = generation.checked_add(1) == Some(highest)
            && s.state == KeyState::Active
            && current == Some(KeyState::PreActivation)
            && s.grace_until.is_some_and(|g| now < g);
        if in_grace {
            Use::Grace
        } else if s.state == KeyState::Active {
            // Superseded and out of grace: refused as not active.
            return Err(Error::NotActive);
        } else {
            return Err(refusal_for(s.state));
        }
    };
    let last = last_year(s.base_year);
    for year in [year_of(now), year_of(u64::from(t))] {
        if year > last {
            return Err(Error::Expired);
        }
        if year < s.base_year {
            return Err(Error::NotActive);
        }
    }
    let mut effects = vec![Effect::Use(how)];
    if how == Use::Activates {
        effects.extend(decide_operator(dev, Some(generation), Event::Activate)?.effects);
        for e in &mut effects {
            if let Effect::Transition {
                event: Event::Activate,
                reason,
                ..
            } = e
            {
                *reason = Reason::FirstUse;
            }
        }
    }
    Ok(Decision { effects })
}

/// An operator's event (and the activation cascade).
fn decide_operator(dev: &DeviceSnapshot, generation: Option<u8>, event: Event) -> Result<Decision> {
    if event == Event::Revoke {
        return decide(dev, Input::Revoke, 0);
    }
    let g = generation
        .or(dev.highest_generation)
        .ok_or(Error::NoSeed { device: dev.id })?;
    let pos = dev.position(g).ok_or(Error::WrongGeneration)?;
    let mut plan = Plan::new(dev);
    let grace = generation.is_none()
        && matches!(event, Event::Suspend | Event::Resume | Event::Deactivate)
        && operator_grace(dev, pos);
    if event == Event::Activate {
        // First use (or an operator's activation) of a PreActivation seed
        // activates it and deactivates the generation it supersedes.
        plan.go(dev, pos, Event::Activate, Reason::Given)?;
        if pos > 0 && plan.state(pos - 1) == KeyState::Active {
            plan.go(dev, pos - 1, Event::Deactivate, Reason::Superseded)?;
        }
    } else if grace {
        // During a seed update's grace period an operator's suspend,
        // resume or deactivate applies to both generations (v1.1,
        // PROTOCOL.md section 6). The new generation, never used yet, has
        // no suspend or deactivate of its own: it is activated first.
        let prev = pos - 1;
        let of = dev.seeds[prev].generation;
        match event {
            Event::Suspend | Event::Deactivate => {
                if !(event == Event::Suspend && plan.state(prev) == KeyState::Suspended) {
                    plan.go(dev, prev, event, Reason::Given)?;
                }
                if plan.state(pos) == KeyState::PreActivation {
                    plan.go(
                        dev,
                        pos,
                        Event::Activate,
                        Reason::GraceActivation { event, of },
                    )?;
                }
                plan.go(dev, pos, event, Reason::Given)?;
            }
            Event::Resume => {
                if plan.state(prev) == KeyState::Suspended {
                    plan.go(dev, prev, Event::Resume, Reason::Given)?;
                }
                if plan.state(pos) == KeyState::Suspended {
                    plan.go(dev, pos, Event::Resume, Reason::Given)?;
                    plan.go(dev, prev, Event::Deactivate, Reason::Superseded)?;
                }
            }
            _ => {
                return Err(Error::IllegalTransition {
                    from: plan.state(pos),
                    event,
                });
            }
        }
    } else {
        plan.go(dev, pos, event, Reason::Given)?;
    }
    Ok(plan.done())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-05-28, a Thursday.
    const NOW: u64 = 1_780_000_000;
    const STATES: [KeyState; 6] = KeyState::ALL;

    /// The clock cases, as the device they make.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Clock {
        /// One seed, its years cover today.
        InWindow,
        /// Generation 0 in the state, its grace period running; generation
        /// 1 enrolled, not yet used.
        Grace,
        /// The same, one second after the grace period.
        AfterGrace,
        /// One seed whose five years ended last year.
        Expired,
        /// One seed whose first year is next year.
        NotYetValid,
    }
    const CLOCKS: [Clock; 5] = [
        Clock::InWindow,
        Clock::Grace,
        Clock::AfterGrace,
        Clock::Expired,
        Clock::NotYetValid,
    ];

    fn seed(generation: u8, state: KeyState, base_year: u16) -> SeedSnapshot {
        SeedSnapshot {
            generation,
            state,
            base_year,
            grace_until: None,
            compromised_at: (state == KeyState::Compromised).then_some(NOW - 5),
            has_ciphertext: state != KeyState::Destroyed,
        }
    }

    fn device(state: KeyState, clock: Clock) -> DeviceSnapshot {
        let year = year_of(NOW);
        let seeds = match clock {
            Clock::InWindow => vec![seed(0, state, year)],
            Clock::Expired => vec![seed(0, state, year - SEED_YEARS)],
            Clock::NotYetValid => vec![seed(0, state, year + 1)],
            Clock::Grace | Clock::AfterGrace => {
                let mut old = seed(0, state, year - 1);
                old.grace_until = Some(if clock == Clock::Grace {
                    NOW + 3600
                } else {
                    NOW - 1
                });
                vec![old, seed(1, KeyState::PreActivation, year)]
            }
        };
        DeviceSnapshot {
            id: DeviceId::from_u64(7),
            epoch: 0,
            transport_open: false,
            highest_generation: seeds.last().map(|s| s.generation),
            seeds,
        }
    }

    /// The inputs of the table, by name. Messages are under generation 0
    /// (in the grace cases: the generation in grace).
    fn inputs() -> Vec<(&'static str, Input, bool)> {
        let ev = |event| Input::Operator {
            generation: None,
            event,
        };
        vec![
            (
                "AUTH",
                Input::Use {
                    generation: 0,
                    t: NOW as u32,
                    first_use: true,
                },
                false,
            ),
            (
                "SIGNATURE, SEALED",
                Input::Use {
                    generation: 0,
                    t: NOW as u32,
                    first_use: false,
                },
                false,
            ),
            (
                "notary record",
                Input::Notarized {
                    generation: 0,
                    first_seen: NOW - 10,
                },
                false,
            ),
            ("activate", ev(Event::Activate), false),
            ("suspend", ev(Event::Suspend), false),
            ("resume", ev(Event::Resume), false),
            ("deactivate", ev(Event::Deactivate), false),
            ("destroy", ev(Event::Destroy), false),
            ("revoke", Input::Revoke, false),
            ("housekeeping", Input::Housekeeping, false),
            (
                "reopen transport",
                Input::ReopenTransport { new_epoch: None },
                false,
            ),
            (
                "ENROLL (update asked)",
                Input::Enroll {
                    generation: u8::MAX,
                    update_asked: true,
                },
                false,
            ),
            (
                "ENROLL (transport open)",
                Input::Enroll {
                    generation: u8::MAX,
                    update_asked: false,
                },
                true,
            ),
            (
                "ENROLL opened (update)",
                Input::Enrolled {
                    generation: u8::MAX,
                    via: EnrollVia::Update,
                    update_asked: true,
                    grace_period: 3600,
                },
                false,
            ),
            (
                "ENROLL opened (transport)",
                Input::Enrolled {
                    generation: u8::MAX,
                    via: EnrollVia::Transport,
                    update_asked: false,
                    grace_period: 3600,
                },
                true,
            ),
            (
                "queue update",
                Input::QueueUpdate {
                    pending: None,
                    renewal_years: None,
                },
                false,
            ),
            (
                "queue update, REVOKE pending",
                Input::QueueUpdate {
                    pending: Some(microcert_core::Opcode::REVOKE.get()),
                    renewal_years: None,
                },
                false,
            ),
            (
                "renewal pass (1 year)",
                Input::QueueUpdate {
                    pending: None,
                    renewal_years: Some(1),
                },
                false,
            ),
        ]
    }

    fn run(state: KeyState, clock: Clock, input: Input, transport: bool) -> Result<Decision> {
        let mut d = device(state, clock);
        d.transport_open = transport;
        let input = match input {
            // The ENROLL of the next generation.
            Input::Enroll { update_asked, .. } => Input::Enroll {
                generation: d.highest_generation.map_or(0, |g| g + 1),
                update_asked,
            },
            Input::Enrolled {
                via,
                update_asked,
                grace_period,
                ..
            } => Input::Enrolled {
                generation: d.highest_generation.map_or(0, |g| g + 1),
                via,
                update_asked,
                grace_period,
            },
            other => other,
        };
        decide(&d, input, NOW)
    }

    fn cell(r: &Result<Decision>) -> String {
        let d = match r {
            Ok(d) => d,
            Err(e) => return format!("no: {}", e.kind()),
        };
        if d.effects.is_empty() {
            return "ok, nothing".into();
        }
        let parts: Vec<String> = d
            .effects
            .iter()
            .map(|e| match *e {
                Effect::Use(Use::Steady) => "use".into(),
                Effect::Use(Use::Activates) => "use".into(),
                Effect::Use(Use::Grace) => "use (grace)".into(),
                Effect::NotaryValid => "valid".into(),
                Effect::EnrollKeys { update, transport } => match (update, transport) {
                    (Some(g), Some(e)) => format!("Kupd g{g} or Ktr e{e}"),
                    (Some(g), None) => format!("Kupd g{g}"),
                    (None, Some(e)) => format!("Ktr e{e}"),
                    (None, None) => "no key".into(),
                },
                Effect::Transition {
                    generation, event, ..
                } => format!("{} g{generation}", event.name()),
                Effect::Transport { open: true, epoch } => format!("transport open e{epoch}"),
                Effect::Transport { open: false, .. } => "transport closed".into(),
                Effect::QueueRevoke { generation } => format!("REVOKE queued g{generation}"),
                Effect::Grace { generation, until } => {
                    format!("grace g{generation} +{}s", until.saturating_sub(NOW))
                }
                Effect::AnswerUpdate => "UPDATE_SEED answered".into(),
                Effect::NewSeed { generation } => format!("new seed g{generation}"),
                Effect::QueueUpdate { generation } => format!("UPDATE_SEED queued g{generation}"),
                Effect::Audit { action } => format!("audit {action}"),
            })
            .collect();
        parts.join(", ")
    }

    /// The whole table as Markdown: one row per state and input, one column
    /// per clock case.
    fn table() -> String {
        let mut out = String::from(
            "| state of g0 | input | in window | grace | after grace | expired | not yet valid |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for state in STATES {
            for (name, input, transport) in inputs() {
                let cells: Vec<String> = CLOCKS
                    .iter()
                    .map(|&c| cell(&run(state, c, input, transport)))
                    .collect();
                out.push_str(&format!(
                    "| {} | {name} | {} |\n",
                    state.name(),
                    cells.join(" | ")
                ));
            }
        }
        out
    }

    const START: &str = "<!-- policy-table:start (generated by `UPDATE_POLICY_TABLE=1 cargo test -p microcert-center --lib policy`) -->\n";
    const END: &str = "<!-- policy-table:end -->";

    /// The table printed in docs/architecture.md is the one the policy
    /// decides (regenerate with UPDATE_POLICY_TABLE=1).
    #[test]
    fn the_documented_table_is_the_policy() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/architecture.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let t = table();
        let (Some(a), Some(b)) = (doc.find(START), doc.find(END)) else {
            panic!("docs/architecture.md lacks the policy table markers");
        };
        let current = &doc[a + START.len()..b];
        if std::env::var_os("UPDATE_POLICY_TABLE").is_some() {
            let new = format!("{}{START}{t}{}", &doc[..a], &doc[b..]);
            std::fs::write(path, new).unwrap();
        } else {
            assert_eq!(current, t, "regenerate with UPDATE_POLICY_TABLE=1");
        }
    }

    /// Every transition a decision lists is legal by the core's state
    /// table, applied in order, for every state, input and clock case.
    #[test]
    fn every_listed_transition_is_legal_in_order() {
        for state in STATES {
            for clock in CLOCKS {
                for (name, input, transport) in inputs() {
                    let d = device(state, clock);
                    let Ok(dec) = run(state, clock, input, transport) else {
                        continue;
                    };
                    let mut states: Vec<KeyState> = d.seeds.iter().map(|s| s.state).collect();
                    for (g, event, _) in dec.transitions() {
                        let pos = d.seeds.iter().position(|s| s.generation == g).unwrap();
                        states[pos] = transition(states[pos], event)
                            .unwrap_or_else(|_| panic!("{state:?} {clock:?} {name}"));
                    }
                }
            }
        }
    }

    /// A message is verified only under an Active seed (or a first use of a
    /// PreActivation one by AUTH) whose years cover the date, and an old
    /// generation only inside its grace period: the attack of a message
    /// under a revoked, suspended, superseded, expired or not-yet-valid
    /// seed is refused in every clock case, with the same rule for AUTH and
    /// SIGNATURE.
    #[test]
    fn a_message_is_used_only_under_a_usable_seed() {
        for state in STATES {
            for clock in CLOCKS {
                for first_use in [true, false] {
                    let input = Input::Use {
                        generation: 0,
                        t: NOW as u32,
                        first_use,
                    };
                    let r = run(state, clock, input, false);
                    let expect = match (state, clock) {
                        (KeyState::Compromised, _) => Err("revoked"),
                        (KeyState::Suspended, _) => Err("suspended"),
                        (KeyState::Active, Clock::InWindow) => Ok(Use::Steady),
                        (KeyState::Active, Clock::Grace) => Ok(Use::Grace),
                        (KeyState::Active, Clock::Expired) => Err("expired"),
                        (KeyState::PreActivation, Clock::InWindow) if first_use => {
                            Ok(Use::Activates)
                        }
                        (KeyState::PreActivation, Clock::Expired) if first_use => Err("expired"),
                        _ => Err("not-active"),
                    };
                    let got = r.as_ref().map(|d| d.use_().unwrap()).map_err(|e| e.kind());
                    assert_eq!(got, expect, "{state:?} {clock:?} first_use={first_use}");
                }
            }
        }
    }

    /// Housekeeping deactivates an Active seed after its grace period or
    /// its five years, and nothing else.
    #[test]
    fn housekeeping_deactivates_only_what_is_over() {
        for state in STATES {
            for clock in CLOCKS {
                let d = run(state, clock, Input::Housekeeping, false).unwrap();
                let t: Vec<_> = d.transitions().collect();
                let over = state == KeyState::Active
                    && matches!(clock, Clock::AfterGrace | Clock::Expired);
                if over {
                    let why = if clock == Clock::Expired {
                        Reason::Expired
                    } else {
                        Reason::GraceEnded
                    };
                    assert_eq!(t, [(0, Event::Deactivate, why)], "{state:?} {clock:?}");
                } else {
                    assert!(t.is_empty(), "{state:?} {clock:?}: {t:?}");
                }
            }
        }
    }

    /// An ENROLL under Kupd needs an asked-for update of an Active seed
    /// that covers today; a stolen seed alone is refused as opaquely as a
    /// bad MAC.
    #[test]
    fn kupd_only_when_asked_for_an_active_current_seed() {
        let d = device(KeyState::Active, Clock::InWindow);
        let e = |asked| {
            decide(
                &d,
                Input::Enroll {
                    generation: 1,
                    update_asked: asked,
                },
                NOW,
            )
        };
        assert_eq!(e(false).unwrap_err().kind(), "verification-failed");
        assert_eq!(
            e(true).unwrap().effects,
            [Effect::EnrollKeys {
                update: Some(0),
                transport: None
            }]
        );
        let wrong = decide(
            &d,
            Input::Enroll {
                generation: 2,
                update_asked: true,
            },
            NOW,
        );
        assert_eq!(wrong.unwrap_err().kind(), "wrong-generation");
    }

    /// The writes of an ENROLL opened under Kupd are decided again on the
    /// state read in the transaction that makes them: an update answered
    /// or cancelled in between (another center, an operator) refuses it.
    #[test]
    fn an_update_no_longer_asked_writes_nothing() {
        let d = device(KeyState::Active, Clock::InWindow);
        let e = |asked| {
            decide(
                &d,
                Input::Enrolled {
                    generation: 1,
                    via: EnrollVia::Update,
                    update_asked: asked,
                    grace_period: 60,
                },
                NOW,
            )
        };
        assert_eq!(e(false).unwrap_err().kind(), "verification-failed");
        assert!(e(true).unwrap().effects.contains(&Effect::AnswerUpdate));
    }
}
