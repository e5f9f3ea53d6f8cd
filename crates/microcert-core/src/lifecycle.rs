//! Key life-cycle states (NIST SP 800-57, ISO/IEC 11770-1) and the one pure
//! transition function every life-cycle change goes through.

use core::fmt;

use crate::{Error, Result};

/// The state of one seed (device and generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// Enrolled, not yet used [ISO: Pending Active].
    PreActivation,
    /// In use [ISO: Active].
    Active,
    /// Temporarily refused by an operator.
    Suspended,
    /// Superseded by the next generation or expired [ISO: Post Active].
    Deactivated,
    /// Revoked or known compromised.
    Compromised,
    /// Ciphertext erased; attributes kept for the record.
    Destroyed,
}

/// A life-cycle event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// First successful use after enrollment, or an operator's activation.
    Activate,
    /// An operator suspends the key.
    Suspend,
    /// An operator resumes a suspended key.
    Resume,
    /// Superseded by the next generation, or expired.
    Deactivate,
    /// Revocation or compromise.
    Revoke,
    /// Erase the ciphertext.
    Destroy,
}

impl KeyState {
    /// Every state, in life-cycle order.
    pub const ALL: [KeyState; 6] = [
        KeyState::PreActivation,
        KeyState::Active,
        KeyState::Suspended,
        KeyState::Deactivated,
        KeyState::Compromised,
        KeyState::Destroyed,
    ];

    /// The stable name stored in databases and shown to operators.
    pub const fn name(self) -> &'static str {
        match self {
            KeyState::PreActivation => "pre-activation",
            KeyState::Active => "active",
            KeyState::Suspended => "suspended",
            KeyState::Deactivated => "deactivated",
            KeyState::Compromised => "compromised",
            KeyState::Destroyed => "destroyed",
        }
    }

    /// The state of a stored name.
    pub fn from_name(name: &str) -> Option<KeyState> {
        KeyState::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl Event {
    /// Every event.
    pub const ALL: [Event; 6] = [
        Event::Activate,
        Event::Suspend,
        Event::Resume,
        Event::Deactivate,
        Event::Revoke,
        Event::Destroy,
    ];

    /// The event's name in logs and the audit trail.
    pub const fn name(self) -> &'static str {
        match self {
            Event::Activate => "activate",
            Event::Suspend => "suspend",
            Event::Resume => "resume",
            Event::Deactivate => "deactivate",
            Event::Revoke => "revoke",
            Event::Destroy => "destroy",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The state after `event` in state `from`, or
/// [`Error::IllegalTransition`]. No event is a silent no-op.
pub const fn transition(from: KeyState, event: Event) -> Result<KeyState> {
    use Event as E;
    use KeyState as S;
    match (from, event) {
        (S::PreActivation, E::Activate) => Ok(S::Active),
        (S::Active, E::Suspend) => Ok(S::Suspended),
        (S::Suspended, E::Resume) => Ok(S::Active),
        (S::Active, E::Deactivate) => Ok(S::Deactivated),
        (S::PreActivation | S::Active | S::Suspended | S::Deactivated, E::Revoke) => {
            Ok(S::Compromised)
        }
        (S::Deactivated | S::Compromised, E::Destroy) => Ok(S::Destroyed),
        _ => Err(Error::IllegalTransition { from, event }),
    }
}
