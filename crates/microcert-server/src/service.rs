//! The center behind the network resources: [`CenterService`] implements
//! [`DeviceService`] over a [`Center`], with the wall clock and metrics.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use microcert_center::{Center, Error, VerifyOutcome};
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
    match e {
        Error::UnknownDevice => Refusal::UnknownDevice,
        Error::Revoked => Refusal::Revoked,
        Error::Suspended => Refusal::Suspended,
        Error::NotActive | Error::WrongGeneration => Refusal::NotActive,
        Error::Expired => Refusal::Expired,
        Error::Replay => Refusal::Replay,
        Error::Stale => Refusal::Stale,
        Error::Malformed(_) => Refusal::Malformed,
        Error::Verification => Refusal::NotVerified,
        Error::WrongSuite => Refusal::WrongSuite,
        Error::Refused(_) | Error::IllegalTransition { .. } => Refusal::NotActive,
        Error::Integrity(_) => Refusal::Quarantined,
        Error::WrongPassphrase
        | Error::CardFormat(_)
        | Error::Shares(_)
        | Error::Card(_)
        | Error::Database(_)
        | Error::Io(_) => Refusal::Internal,
    }
}

/// Logs an error that is the center's fault (refusals are the client's
/// and are only counted), then maps it.
fn refused(what: &'static str, e: Error) -> Refusal {
    let r = refusal(&e);
    if r == Refusal::Internal {
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
        let aud = Audience::relying_party(name);
        let r = self.center.open_sealed(body, &aud, now());
        self.run("open", r.map(|o| o.plaintext.to_vec()))
    }
}
