//! The OpenAPI 3.1 document served at `/v1/openapi.json`, built from one
//! table of the routes so it cannot list a path the server does not serve
//! (a test requests every path in the table).

use serde_json::{Map, Value, json};

/// One route of the API: method, path, roles allowed (empty = none needed
/// or authenticated by the message itself), summary, request and reply
/// content types.
#[derive(Debug, Clone, Copy)]
pub struct RouteDoc {
    /// HTTP method, lower case.
    pub method: &'static str,
    /// Path with `{param}` placeholders.
    pub path: &'static str,
    /// Roles whose bearer token is accepted.
    pub roles: &'static [&'static str],
    /// What it does.
    pub summary: &'static str,
    /// Request body content type, if any.
    pub request: Option<&'static str>,
    /// Success reply content type.
    pub reply: &'static str,
}

const OCTETS: &str = "application/octet-stream";
const JSON: &str = "application/json";
const READ: &[&str] = &["admin", "operator", "auditor"];
const WRITE: &[&str] = &["admin", "operator"];
const AUDIT: &[&str] = &["admin", "auditor"];

/// Every route the HTTP server serves.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc {
        method: "post",
        path: "/v1/device/enroll",
        roles: &[],
        summary: "An ENROLL; replies the RECEIPT keyed by the new seed",
        request: Some(OCTETS),
        reply: OCTETS,
    },
    RouteDoc {
        method: "post",
        path: "/v1/device/auth",
        roles: &[],
        summary: "An AUTH for the center; replies the center's RECEIPT (mutual authentication)",
        request: Some(OCTETS),
        reply: OCTETS,
    },
    RouteDoc {
        method: "post",
        path: "/v1/device/challenge",
        roles: &[],
        summary: "A device id (8 bytes); replies a stateless 16-byte challenge",
        request: Some(OCTETS),
        reply: OCTETS,
    },
    RouteDoc {
        method: "post",
        path: "/v1/device/auth-response",
        roles: &[],
        summary: "An AUTH_RESPONSE; replies the center's RECEIPT",
        request: Some(OCTETS),
        reply: OCTETS,
    },
    RouteDoc {
        method: "get",
        path: "/v1/device/{device}/command",
        roles: &[],
        summary: "The pending COMMAND, or 204",
        request: None,
        reply: OCTETS,
    },
    RouteDoc {
        method: "post",
        path: "/v1/device/receipt",
        roles: &[],
        summary: "A node's RECEIPT; 204",
        request: Some(OCTETS),
        reply: OCTETS,
    },
    RouteDoc {
        method: "post",
        path: "/v1/verify",
        roles: &["verifier"],
        summary: "An AUTH for this relying party, or a SIGNATURE followed by its data",
        request: Some(OCTETS),
        reply: JSON,
    },
    RouteDoc {
        method: "post",
        path: "/v1/open",
        roles: &["verifier"],
        summary: "A SEALED for this relying party; replies the plaintext",
        request: Some(OCTETS),
        reply: OCTETS,
    },
    RouteDoc {
        method: "get",
        path: "/v1/devices",
        roles: READ,
        summary: "Devices, filtered by state, class and seed expiry (expires_by = last year), paged by `after` and `limit`",
        request: None,
        reply: JSON,
    },
    RouteDoc {
        method: "get",
        path: "/v1/devices/{device}",
        roles: READ,
        summary: "One device with all its seeds (never a ciphertext)",
        request: None,
        reply: JSON,
    },
    RouteDoc {
        method: "post",
        path: "/v1/devices/{device}/{action}",
        roles: WRITE,
        summary: "activate, suspend, resume, deactivate, revoke, destroy, update or reopen; body {\"reason\": ..., \"epoch\": n}",
        request: Some(JSON),
        reply: JSON,
    },
    RouteDoc {
        method: "post",
        path: "/v1/devices/bulk",
        roles: WRITE,
        summary: "One action on every device matching a filter; body {\"action\", \"filter\", \"reason\"}",
        request: Some(JSON),
        reply: JSON,
    },
    RouteDoc {
        method: "post",
        path: "/v1/updates/due",
        roles: WRITE,
        summary: "Queue UPDATE_SEED for every device whose seed is in its last year",
        request: None,
        reply: JSON,
    },
    RouteDoc {
        method: "post",
        path: "/v1/import",
        roles: WRITE,
        summary: "Import a factory batch of any size (JSON Lines of ENROLLs, streamed; each line at most 64 KiB); resumable by X-Batch-Sha256 and idempotent. The reply is NDJSON: a progress line per committed chunk (with its rejected entries), then one done line (the summary, refused entries by kind) or error line",
        request: Some("application/jsonl"),
        reply: "application/x-ndjson",
    },
    RouteDoc {
        method: "get",
        path: "/v1/integrity",
        roles: READ,
        summary: "The integrity check: record and device tags, the digest, records the audit log says exist, the audit log's card-tagged head, the card's anchor (an older copy of the database); names what does not match and the quarantined devices",
        request: None,
        reply: JSON,
    },
    RouteDoc {
        method: "get",
        path: "/v1/backups",
        roles: READ,
        summary: "The backups kept, newest first",
        request: None,
        reply: JSON,
    },
    RouteDoc {
        method: "post",
        path: "/v1/backups",
        roles: WRITE,
        summary: "Make a backup now (audited; older backups rotate out)",
        request: None,
        reply: JSON,
    },
    RouteDoc {
        method: "get",
        path: "/v1/audit",
        roles: AUDIT,
        summary: "Audit entries after `after`, at most `limit`",
        request: None,
        reply: JSON,
    },
    RouteDoc {
        method: "get",
        path: "/v1/audit/verify",
        roles: AUDIT,
        summary: "Walk the audit hash chain and check its card-tagged head (a log cut short is found too)",
        request: None,
        reply: JSON,
    },
    RouteDoc {
        method: "get",
        path: "/v1/clock",
        roles: READ,
        summary: "The server's time and the unconfirmed clock step, if any (housekeeping waits while one is)",
        request: None,
        reply: JSON,
    },
    RouteDoc {
        method: "post",
        path: "/v1/clock/confirm",
        roles: WRITE,
        summary: "Confirm that the server's clock is right now: the clock-step alarm ends, housekeeping resumes (audited)",
        request: None,
        reply: JSON,
    },
    RouteDoc {
        method: "get",
        path: "/v1/openapi.json",
        roles: &[],
        summary: "This document",
        request: None,
        reply: JSON,
    },
    RouteDoc {
        method: "get",
        path: "/metrics",
        roles: &[],
        summary: "Prometheus metrics",
        request: None,
        reply: "text/plain",
    },
    RouteDoc {
        method: "get",
        path: "/healthz",
        roles: &[],
        summary: "Liveness",
        request: None,
        reply: "text/plain",
    },
    RouteDoc {
        method: "get",
        path: "/readyz",
        roles: &[],
        summary: "Readiness: the card and the database answer, the integrity check has not failed, no load is shed (503 otherwise)",
        request: None,
        reply: "application/json",
    },
];

/// The one vocabulary of refusal and error kinds: the `error` of every
/// JSON error body (operator API, `/v1/verify`) and the body of a device
/// resource's refusal (HTTP and CoAP). A device sees the coarser kind where
/// a finer one would reveal more than it should (e.g. `wrong-generation`
/// is `not-active` to a device; an operator-only refusal never reaches a
/// device).
pub const ERROR_KINDS: &[(&str, &str)] = &[
    ("malformed", "the bytes or the request do not parse (400)"),
    (
        "verification-failed",
        "the message, challenge or receipt does not verify; opaque (401)",
    ),
    (
        "stale",
        "the message's time is outside the accepted clock skew (401)",
    ),
    (
        "unknown-device",
        "no device with this id is registered (404)",
    ),
    ("revoked", "the device is revoked (403)"),
    ("suspended", "the device is suspended by an operator (403)"),
    (
        "not-active",
        "the seed is not active, or not yet valid (403)",
    ),
    ("expired", "the seed does not cover the date (403)"),
    (
        "wrong-suite",
        "the message's suite is not the device's (403)",
    ),
    (
        "wrong-generation",
        "a generation the rules do not allow; `not-active` to a device (403)",
    ),
    (
        "integrity",
        "the device's records fail their card tags: quarantined until repaired (403)",
    ),
    ("replay", "already accepted once (409; CoAP 4.03)"),
    (
        "audit-sink",
        "the configured audit sink cannot record the entry: the change is refused, nothing changed (503)",
    ),
    (
        "too-large",
        "the body is larger than the resource accepts (413)",
    ),
    (
        "illegal-transition",
        "a life-cycle event the state table does not allow (409)",
    ),
    (
        "already-registered",
        "the device id is already registered (409)",
    ),
    ("no-profile", "no class profile for this device class (409)"),
    ("no-seed", "the device has no seed yet (409)"),
    ("revoke-pending", "a REVOKE is queued for the device (409)"),
    (
        "transport-open",
        "transport enrollment is already open (409)",
    ),
    (
        "seed-still-valid",
        "the current seed is neither expired nor revoked (409)",
    ),
    ("epoch-exhausted", "epoch 255 is final (409)"),
    (
        "wrong-epoch",
        "transport enrollment reopens only with another epoch (409)",
    ),
    (
        "clock-unconfirmed",
        "a clock step awaits an operator's confirmation (409)",
    ),
    ("time-out-of-range", "a time beyond 2106 (409)"),
    (
        "not-in-backup",
        "a device the restore needs is not in the backup (409)",
    ),
    (
        "not-configured",
        "a feature this server is not configured with (409)",
    ),
    (
        "share-threshold",
        "backup shares asked for outside 2 <= threshold <= shares (409)",
    ),
    (
        "card-unsupported",
        "the encryption card does not do this operation (409)",
    ),
    (
        "card-file-exists",
        "a card file already exists where a new one was to be made (409)",
    ),
    (
        "storage-keys-exhausted",
        "no storage-key version is left to rotate to (409)",
    ),
    (
        "current-storage-key",
        "the current storage key cannot be destroyed (409)",
    ),
    (
        "no-storage-key",
        "the card has no storage key of this version (409)",
    ),
    (
        "registered-differently",
        "an import line for a device registered with another class or epoch (409)",
    ),
    (
        "replay-guard-locked",
        "another process holds the in-memory replay guard of this database (409)",
    ),
    (
        "backup-unstable",
        "the database kept changing while a backup read it; try again (409)",
    ),
    (
        "restore-target-not-empty",
        "a backup is restored only into an empty key database (409)",
    ),
    (
        "bad-token-name",
        "a token name is empty, too long or has control characters (409)",
    ),
    ("unknown-role", "a token role that does not exist (409)"),
    (
        "token-ttl-zero",
        "a token's time to live is at least 1 s (409)",
    ),
    (
        "center-audience",
        "a verifier name that hashes to the center's audience (409)",
    ),
    ("too-many-tokens", "the token table is full (409)"),
    (
        "token-name-taken",
        "a valid token of this name and role exists (409)",
    ),
    (
        "audience-taken",
        "a verifier with the same audience exists (409)",
    ),
    ("token-integrity", "a token row fails its card tag (409)"),
    (
        "bad-legacy-token",
        "a legacy token's hash is not 64 lowercase hex digits (409)",
    ),
    ("wrong-passphrase", "the card does not open (500)"),
    ("card-format", "card data in an unknown format (500)"),
    ("shares", "backup shares that do not recover a card (500)"),
    ("card", "the encryption card failed (503: try again later)"),
    (
        "keyring",
        "the keyring in the key database fails its card tags, was rolled back or lacks a version (500)",
    ),
    ("database", "the key database failed (503: try again later)"),
    ("io", "a file could not be read or written (500)"),
    (
        "internal",
        "the center could not do its part; logged there (500)",
    ),
    (
        "unavailable",
        "the database or the card is stalled or unreachable, or the server sheds load; nothing changed, try again after Retry-After / Max-Age (503, CoAP 5.03)",
    ),
    (
        "bad-request",
        "an operator request with a bad parameter (400)",
    ),
];

/// The document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for r in ROUTES {
        let mut op = json!({
            "summary": r.summary,
            "responses": {
                "200": { "description": "success", "content": { r.reply: {} } },
                "400": { "description": "malformed" },
                "401": { "description": "does not verify, or no valid token" },
                "403": { "description": "revoked, suspended, not active, or the token's role may not" },
                "404": { "description": "unknown device" },
                "409": { "description": "replay, or an illegal life-cycle transition" }
            }
        });
        if !r.roles.is_empty() {
            op["security"] = json!([{ "bearer": [] }]);
            op["description"] = json!(format!("Roles: {}.", r.roles.join(", ")));
        }
        if let Some(ct) = r.request {
            op["requestBody"] = json!({ "content": { ct: {} } });
        }
        let params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        let entry = paths
            .entry(r.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[r.method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "microcert center",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Device, relying-party and operator resources of a microcert authentication center. Device bodies are raw protocol bytes (docs/protocol.md)."
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": {
                    "type": "object",
                    "description": "A refusal or error. `error` is one word of one vocabulary, shared by the operator API and the device resources (whose refusal body over HTTP and CoAP is the same word).",
                    "properties": {
                        "error": {
                            "type": "string",
                            "enum": ERROR_KINDS.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
                            "description": ERROR_KINDS.iter().map(|(k, d)| format!("{k}: {d}")).collect::<Vec<_>>().join("; ")
                        },
                        "message": { "type": "string" }
                    },
                    "required": ["error"]
                }
            }
        },
        "paths": paths
    })
}
