//! The center behind the network resources: [`CenterService`] implements
//! [`DeviceService`] over a [`Center`], with the wall clock and metrics.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use microcert_center::{Center, Error, ErrorClass, MessageRefusal, VerifyOutcome};
use microcert_core::{Audience, DeviceId};

use crate::api::{DeviceService, Refusal, Verified};

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The refusal a center error becomes on the network: the one place where
/// this is decided, with every variant named.
pub fn refusal(e: &Error) -> Refusal {
    match e.class() {
        ErrorClass::Message(m) => match m {
            MessageRefusal::UnknownDevice => Refusal::UnknownDevice,
            MessageRefusal::Revoked => Refusal::Revoked,
            MessageRefusal::Suspended => Refusal::Suspended,
            MessageRefusal::NotActive => Refusal::NotActive,
            MessageRefusal::Expired => Refusal::Expired,
            MessageRefusal::Replay => Refusal::Replay,
            MessageRefusal::Stale => Refusal::Stale,
            MessageRefusal::Malformed => Refusal::Malformed,
            MessageRefusal::NotVerified => Refusal::NotVerified,
            MessageRefusal::WrongSuite => Refusal::WrongSuite,
        },
        // Operator-side refusals never answer a device message; should one
        // reach a device it is "not-active", as before they were typed.
        ErrorClass::Conflict => Refusal::NotActive,
        ErrorClass::Integrity => Refusal::Quarantined,
        // A stalled or unreachable database or card (a busy SQLite file,
        // a PostgreSQL restart, an HSM that stopped answering) is
        // transient: 503 / 5.03 with Retry-After / Max-Age, nothing changed.
        ErrorClass::Unavailable => Refusal::Unavailable,
        ErrorClass::Internal => Refusal::Internal,
    }
}

/// Logs an error that is the center's fault (refusals are the client's
/// and are only counted), then maps it.
fn refused(what: &'static str, e: Error) -> Refusal {
    let r = refusal(&e);
    if matches!(r, Refusal::Internal | Refusal::Unavailable) {
        tracing::error!(resource = what, error = %e, "request failed");
    } else {
        tracing::debug!(resource = what, kind = r.kind(), "request refused");
    }
    metrics::counter!("microcert_refusals_total", "resource" => what, "kind" => r.kind())
        .increment(1);
    r
}

fn accepted(what: &'static str) {
    metrics::counter!("microcert_accepted_total", "resource" => what).increment(1);
}

/// The device and relying-party resources served by a center.
#[derive(Debug, Clone)]
pub struct CenterService {
    center: Arc<Center>,
}

impl CenterService {
    /// Serves `center`.
    pub fn new(center: Arc<Center>) -> Self {
        CenterService { center }
    }

    fn run<T>(&self, what: &'static str, r: microcert_center::Result<T>) -> Result<T, Refusal> {
        match r {
            Ok(v) => {
                accepted(what);
                Ok(v)
            }
            Err(e) => Err(refused(what, e)),
        }
    }
}

impl DeviceService for CenterService {
    fn enroll(&self, msg: &[u8]) -> Result<Vec<u8>, Refusal> {
        // A seed-state refusal of an ENROLL is decided before the AEAD
        // and only when no key could open it (docs/protocol.md, "What a
        // refusal reveals"): to the network it is a failed verification.
        let r = self.center.enroll(msg, now()).map_err(|e| match e {
            Error::Revoked | Error::Suspended | Error::NotActive => Error::Verification,
            other => other,
        });
        self.run("enroll", r)
    }

    fn auth(&self, msg: &[u8]) -> Result<Vec<u8>, Refusal> {
        let r = self.center.verify_auth(msg, &Audience::CENTER, now());
        self.run("auth", r.map(|o| o.receipt))
    }

    fn challenge(&self, device: DeviceId) -> Result<[u8; 16], Refusal> {
        self.run("challenge", self.center.issue_challenge(device, now()))
    }

    fn auth_response(&self, msg: &[u8]) -> Result<Vec<u8>, Refusal> {
        let r = self
            .center
            .verify_auth_response(msg, &Audience::CENTER, now());
        self.run("auth-response", r.map(|o| o.receipt))
    }

    fn command(&self, device: DeviceId) -> Result<Option<Vec<u8>>, Refusal> {
        self.run("command", self.center.command(device))
    }

    fn receipt(&self, msg: &[u8]) -> Result<(), Refusal> {
        self.run("receipt", self.center.accept_receipt(msg, now()))
    }

    fn verify(&self, name: &str, body: &[u8]) -> Result<Verified, Refusal> {
        let aud = Audience::relying_party(name);
        let r = self.center.verify(body, &aud, now());
        self.run("verify", r).map(|o| match o {
            VerifyOutcome::Auth(a) => Verified {
                valid: true,
                device: a.device.to_string(),
                generation: a.generation,
                time: a.time,
                first_seen: None,
            },
            VerifyOutcome::Signature(s) => Verified {
                valid: true,
                device: s.device.to_string(),
                generation: s.generation,
                time: s.time,
                first_seen: Some(s.first_seen),
            },
        })
    }

    fn open(&self, name: &str, body: &[u8]) -> Result<Vec<u8>, Refusal> {
        // Audited (who, which device, how much) before the plaintext is
        // handed out; an entry that cannot be written refuses the opening.
        let r = self.center.open_sealed_audited(body, name, now());
        self.run("open", r.map(|o| o.plaintext.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openapi::ERROR_KINDS;
    use microcert_core::{Event, KeyState};

    /// One error of every variant; the `match` below fails to compile when
    /// a variant is added without being listed here.
    fn every_error() -> Vec<Error> {
        let d = DeviceId::from_u64(1);
        let all = vec![
            Error::UnknownDevice,
            Error::Revoked,
            Error::Suspended,
            Error::NotActive,
            Error::Expired,
            Error::Replay,
            Error::Stale,
            Error::Malformed("x".into()),
            Error::Verification,
            Error::WrongSuite,
            Error::WrongGeneration,
            Error::AlreadyRegistered { device: d },
            Error::NoProfile { class: 4 },
            Error::NoSeed { device: d },
            Error::RevokePending { device: d },
            Error::TransportOpen,
            Error::SeedStillValid,
            Error::EpochExhausted,
            Error::WrongEpoch { expected: 1 },
            Error::ClockUnconfirmed { why: "x".into() },
            Error::TimeOutOfRange,
            Error::NotInBackup { device: d },
            Error::NotConfigured { what: "x" },
            Error::ShareThreshold {
                threshold: 1,
                shares: 1,
            },
            Error::CardUnsupported { operation: "x" },
            Error::CardFileExists { path: "x".into() },
            Error::StorageKeysExhausted,
            Error::CurrentStorageKey { version: 1 },
            Error::NoStorageKey { version: 1 },
            Error::RegisteredDifferently {
                device: d,
                class: 1,
                epoch: 1,
            },
            Error::ReplayGuardLocked {
                path: "x".into(),
                source: rusqlite_error(),
            },
            Error::BackupUnstable,
            Error::RestoreTargetNotEmpty,
            Error::BadTokenName { max: 1 },
            Error::UnknownRole { role: "x".into() },
            Error::TokenTtlZero,
            Error::CenterAudience { name: "x".into() },
            Error::TooManyTokens { max: 1 },
            Error::TokenNameTaken {
                name: "x".into(),
                role: "x".into(),
            },
            Error::AudienceTaken {
                name: "x".into(),
                other: "y".into(),
            },
            Error::TokenIntegrity {
                role: "x".into(),
                name: "x".into(),
                hash_prefix: "x".into(),
            },
            Error::BadLegacyToken { name: "x".into() },
            Error::IllegalTransition {
                from: KeyState::Active,
                event: Event::Activate,
            },
            Error::Integrity("x".into()),
            Error::WrongPassphrase,
            Error::CardFormat("x".into()),
            Error::Shares("x".into()),
            Error::Card("x".into()),
            Error::Keyring("x".into()),
            Error::AuditSink("x".into()),
            Error::db(microcert_center::DbFailure::Internal, "x"),
            Error::Sqlite(rusqlite_error()),
            Error::Io(std::io::Error::other("x")),
        ];
        for e in &all {
            match e {
                Error::UnknownDevice
                | Error::Revoked
                | Error::Suspended
                | Error::NotActive
                | Error::Expired
                | Error::Replay
                | Error::Stale
                | Error::Malformed(_)
                | Error::Verification
                | Error::WrongSuite
                | Error::WrongGeneration
                | Error::AlreadyRegistered { .. }
                | Error::NoProfile { .. }
                | Error::NoSeed { .. }
                | Error::RevokePending { .. }
                | Error::TransportOpen
                | Error::SeedStillValid
                | Error::EpochExhausted
                | Error::WrongEpoch { .. }
                | Error::ClockUnconfirmed { .. }
                | Error::TimeOutOfRange
                | Error::NotInBackup { .. }
                | Error::NotConfigured { .. }
                | Error::ShareThreshold { .. }
                | Error::CardUnsupported { .. }
                | Error::CardFileExists { .. }
                | Error::StorageKeysExhausted
                | Error::CurrentStorageKey { .. }
                | Error::NoStorageKey { .. }
                | Error::RegisteredDifferently { .. }
                | Error::ReplayGuardLocked { .. }
                | Error::BackupUnstable
                | Error::RestoreTargetNotEmpty
                | Error::BadTokenName { .. }
                | Error::UnknownRole { .. }
                | Error::TokenTtlZero
                | Error::CenterAudience { .. }
                | Error::TooManyTokens { .. }
                | Error::TokenNameTaken { .. }
                | Error::AudienceTaken { .. }
                | Error::TokenIntegrity { .. }
                | Error::BadLegacyToken { .. }
                | Error::IllegalTransition { .. }
                | Error::Integrity(_)
                | Error::WrongPassphrase
                | Error::CardFormat(_)
                | Error::Shares(_)
                | Error::Card(_)
                | Error::Keyring(_)
                | Error::AuditSink(_)
                | Error::Database(_)
                | Error::Sqlite(_)
                | Error::Io(_) => {}
            }
        }
        all
    }

    fn rusqlite_error() -> microcert_center::db::SqliteError {
        microcert_center::db::SqliteError::InvalidQuery
    }

    /// One vocabulary: every kind an operator or a device can see is
    /// documented in the OpenAPI document, and a device sees the operator's
    /// word, or a documented coarser one (never a second word for the same
    /// failure, such as "quarantined" beside "integrity").
    #[test]
    fn one_vocabulary_of_refusal_kinds() {
        let known = |k: &str| ERROR_KINDS.iter().any(|(w, _)| *w == k);
        for e in every_error() {
            let op = e.kind();
            let dev = refusal(&e).kind();
            assert!(known(op), "{op} is not documented");
            assert!(known(dev), "{dev} is not documented");
            let coarser = match e {
                Error::WrongGeneration => dev == "not-active",
                _ if !e.is_refusal() => dev == "internal" || dev == "unavailable",
                _ => dev == "not-active" && crate::operator::operator_status(&e).as_u16() == 409,
            };
            assert!(dev == op || coarser, "{op} is {dev} to a device");
        }
        assert_eq!(refusal(&Error::Integrity("x".into())).kind(), "integrity");
    }

    /// Every variant has its own word (only the two database failures
    /// share "database"), and the OpenAPI document lists each word once:
    /// no catch-all such as the old "refused".
    #[test]
    fn every_error_has_its_own_kind() {
        let mut kinds: Vec<_> = every_error()
            .iter()
            .map(Error::kind)
            .filter(|k| *k != "database")
            .collect();
        let n = kinds.len();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), n, "two variants share a kind");
        assert!(!kinds.contains(&"refused"));
        let mut documented: Vec<_> = ERROR_KINDS.iter().map(|(k, _)| *k).collect();
        let m = documented.len();
        documented.sort_unstable();
        documented.dedup();
        assert_eq!(documented.len(), m, "a kind documented twice");
    }
}
