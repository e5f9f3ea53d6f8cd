//! The seam between the network front ends and the center: the device and
//! relying-party resources of PROTOCOL.md section 8 as one trait, and the
//! one place where a refusal becomes an HTTP or CoAP status.

use axum::http::StatusCode;
use coap_lite::ResponseType;
use microcert_core::DeviceId;

/// Why a request was refused, as far as the network may know. The kinds
/// never say which byte or which check of a MAC failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The message does not parse, or has the wrong length for its type.
    Malformed,
    /// The message does not verify (tag, AEAD, challenge). Opaque.
    NotVerified,
    /// The message's time is outside the accepted clock skew.
    Stale,
    /// The device is not known to the center.
    UnknownDevice,
    /// The device is revoked (its seed is Compromised).
    Revoked,
    /// The device is suspended by an operator.
    Suspended,
    /// The seed is not active (pending, deactivated, destroyed) or the
    /// generation is not the current one.
    NotActive,
    /// The seed does not cover the current date.
    Expired,
    /// The message's suite is not the device's.
    WrongSuite,
    /// The device's records failed the integrity check and are quarantined.
    Quarantined,
    /// The message (or challenge) was already accepted once.
    Replay,
    /// The request body is larger than the resource accepts.
    TooLarge,
    /// The center could not do its part (database, card). Logged there.
    Internal,
    /// The database or the card is stalled or unreachable, or the server
    /// is shedding load: try again later (HTTP 503 with Retry-After, CoAP
    /// 5.03 with Max-Age). Nothing was changed.
    Unavailable,
}

impl Refusal {
    /// The stable name of the refusal, as sent in reply bodies.
    pub const fn kind(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::NotVerified => "verification-failed",
            Refusal::Stale => "stale",
            Refusal::UnknownDevice => "unknown-device",
            Refusal::Revoked => "revoked",
            Refusal::Suspended => "suspended",
            Refusal::NotActive => "not-active",
            Refusal::Expired => "expired",
            Refusal::WrongSuite => "wrong-suite",
            // The same word as the operator API's (one vocabulary).
            Refusal::Quarantined => "integrity",
            Refusal::Replay => "replay",
            Refusal::TooLarge => "too-large",
            Refusal::Internal => "internal",
            Refusal::Unavailable => "unavailable",
        }
    }

    /// HTTP status of PROTOCOL.md section 8.
    pub const fn http_status(self) -> StatusCode {
        match self {
            Refusal::Malformed => StatusCode::BAD_REQUEST,
            Refusal::NotVerified | Refusal::Stale => StatusCode::UNAUTHORIZED,
            Refusal::UnknownDevice => StatusCode::NOT_FOUND,
            Refusal::Revoked
            | Refusal::Suspended
            | Refusal::NotActive
            | Refusal::Expired
            | Refusal::WrongSuite
            | Refusal::Quarantined => StatusCode::FORBIDDEN,
            Refusal::Replay => StatusCode::CONFLICT,
            Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Refusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// CoAP status of PROTOCOL.md section 8 (CoAP has no 4.09: a replay is 4.03).
    pub const fn coap_status(self) -> ResponseType {
        match self {
            Refusal::Malformed => ResponseType::BadRequest,
            Refusal::NotVerified | Refusal::Stale => ResponseType::Unauthorized,
            Refusal::UnknownDevice => ResponseType::NotFound,
            Refusal::Revoked
            | Refusal::Suspended
            | Refusal::NotActive
            | Refusal::Expired
            | Refusal::WrongSuite
            | Refusal::Quarantined
            | Refusal::Replay => ResponseType::Forbidden,
            Refusal::TooLarge => ResponseType::RequestEntityTooLarge,
            Refusal::Internal => ResponseType::InternalServerError,
            Refusal::Unavailable => ResponseType::ServiceUnavailable,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

/// What `/v1/verify` reports for a valid message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verified {
    /// Always true; refusals are errors.
    pub valid: bool,
    /// The device, 16 hex digits.
    pub device: String,
    /// The seed generation.
    pub generation: u8,
    /// The message's t.
    pub time: u32,
    /// For a SIGNATURE: when the center first saw it (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<u64>,
}

/// The device and relying-party resources. Implementations read the clock
/// themselves and are called from blocking threads.
pub trait DeviceService: Send + Sync + 'static {
    /// POST /v1/device/enroll: an ENROLL; the RECEIPT keyed by the new seed.
    fn enroll(&self, msg: &[u8]) -> Result<Vec<u8>, Refusal>;
    /// POST /v1/device/auth: an AUTH for the center; the center's RECEIPT.
    fn auth(&self, msg: &[u8]) -> Result<Vec<u8>, Refusal>;
    /// POST /v1/device/challenge: a fresh stateless challenge for any device id.
    fn challenge(&self, device: DeviceId) -> Result<[u8; 16], Refusal>;
    /// POST /v1/device/auth-response: an AUTH_RESPONSE; the center's RECEIPT.
    fn auth_response(&self, msg: &[u8]) -> Result<Vec<u8>, Refusal>;
    /// GET /v1/device/{id}/command: the pending COMMAND, if any.
    fn command(&self, device: DeviceId) -> Result<Option<Vec<u8>>, Refusal>;
    /// POST /v1/device/receipt: a node's RECEIPT.
    fn receipt(&self, msg: &[u8]) -> Result<(), Refusal>;
    /// POST /v1/verify for the relying party `name`: an AUTH, or a
    /// SIGNATURE followed by its data.
    fn verify(&self, name: &str, body: &[u8]) -> Result<Verified, Refusal>;
    /// POST /v1/open for the relying party `name`: a SEALED; its plaintext.
    fn open(&self, name: &str, body: &[u8]) -> Result<Vec<u8>, Refusal>;
}

impl DeviceResource {
    /// The resource's name in metrics and logs (bounded: no device id).
    pub const fn name(self) -> &'static str {
        match self {
            DeviceResource::Enroll => "enroll",
            DeviceResource::Auth => "auth",
            DeviceResource::Challenge => "challenge",
            DeviceResource::AuthResponse => "auth-response",
            DeviceResource::Command(_) => "command",
            DeviceResource::Receipt => "receipt",
        }
    }
}

/// A device resource, parsed from a method and a path, shared by the HTTP
/// and CoAP bindings so both serve exactly the same paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceResource {
    /// POST /v1/device/enroll
    Enroll,
    /// POST /v1/device/auth
    Auth,
    /// POST /v1/device/challenge
    Challenge,
    /// POST /v1/device/auth-response
    AuthResponse,
    /// GET /v1/device/{id}/command
    Command(DeviceId),
    /// POST /v1/device/receipt
    Receipt,
}

/// What the routing of a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A device resource with the right method.
    Device(DeviceResource),
    /// A known path with the wrong method.
    WrongMethod,
    /// No such path.
    NotFound,
}

/// Routes a device request; `post` is true for POST, false for GET.
pub fn route(post: bool, path: &str) -> Route {
    let path = path.trim_start_matches('/');
    let Some(rest) = path.strip_prefix("v1/device/") else {
        return Route::NotFound;
    };
    let want_post = |r| {
        if post {
            Route::Device(r)
        } else {
            Route::WrongMethod
        }
    };
    match rest {
        "enroll" => want_post(DeviceResource::Enroll),
        "auth" => want_post(DeviceResource::Auth),
        "challenge" => want_post(DeviceResource::Challenge),
        "auth-response" => want_post(DeviceResource::AuthResponse),
        "receipt" => want_post(DeviceResource::Receipt),
        _ => match rest
            .strip_suffix("/command")
            .and_then(|hex| parse_device(hex).ok())
        {
            Some(id) if !post => Route::Device(DeviceResource::Command(id)),
            Some(_) => Route::WrongMethod,
            None => Route::NotFound,
        },
    }
}

/// A device id from 16 hex digits.
pub fn parse_device(hex: &str) -> Result<DeviceId, Refusal> {
    let bytes = hex::decode(hex).map_err(|_| Refusal::Malformed)?;
    let id: [u8; 8] = bytes.try_into().map_err(|_| Refusal::Malformed)?;
    Ok(DeviceId(id))
}

/// Largest request body any resource accepts: a SIGNATURE's data or a
/// SEALED message of the largest plaintext.
pub const MAX_BODY: usize = 64 * 1024 + 1024;

/// Largest request body of a device resource (enroll, auth, challenge,
/// auth-response, receipt): an ENROLL of suite 0x02 is 1,017 bytes.
pub const MAX_DEVICE_BODY: usize = 2 * 1024;

/// Serves a device resource. `Ok(None)` is "no content".
pub fn serve_device(
    svc: &dyn DeviceService,
    res: DeviceResource,
    body: &[u8],
) -> Result<Option<Vec<u8>>, Refusal> {
    match res {
        DeviceResource::Enroll => svc.enroll(body).map(Some),
        DeviceResource::Auth => svc.auth(body).map(Some),
        DeviceResource::Challenge => {
            let id: [u8; 8] = body.try_into().map_err(|_| Refusal::Malformed)?;
            svc.challenge(DeviceId(id)).map(|c| Some(c.to_vec()))
        }
        DeviceResource::AuthResponse => svc.auth_response(body).map(Some),
        DeviceResource::Command(id) => svc.command(id),
        DeviceResource::Receipt => svc.receipt(body).map(|()| None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route(true, "/v1/device/auth"),
            Route::Device(DeviceResource::Auth)
        );
        assert_eq!(route(false, "/v1/device/auth"), Route::WrongMethod);
        assert_eq!(
            route(false, "v1/device/0102030405060708/command"),
            Route::Device(DeviceResource::Command(DeviceId([1, 2, 3, 4, 5, 6, 7, 8])))
        );
        assert_eq!(
            route(true, "/v1/device/0102030405060708/command"),
            Route::WrongMethod
        );
        assert_eq!(route(false, "/v1/device/xyz/command"), Route::NotFound);
        assert_eq!(route(true, "/v2/device/auth"), Route::NotFound);
    }

    #[test]
    fn replay_is_409_over_http_and_403_over_coap() {
        assert_eq!(Refusal::Replay.http_status(), StatusCode::CONFLICT);
        assert_eq!(Refusal::Replay.coap_status(), ResponseType::Forbidden);
    }
}
