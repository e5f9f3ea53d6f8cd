//! The device and relying-party resources over HTTP (PROTOCOL.md section 8),
//! beside the operator API of `operator.rs`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::api::{self, DeviceResource, DeviceService, MAX_BODY, MAX_DEVICE_BODY, Refusal};
use crate::limits::{Limits, proven, retry_secs};
use crate::tokens::{Role, TokenRecord, TokenStore};

/// What the HTTP handlers share.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // holds a trait object
pub struct HttpState {
    /// The device and relying-party resources.
    pub svc: Arc<dyn DeviceService>,
    /// Bearer tokens.
    pub tokens: Arc<TokenStore>,
    /// Rate limits of the device resources (shared with CoAP).
    pub limits: Arc<Limits>,
}

/// The client's address, from the connection (`ConnectInfo`, which the
/// plain and the TLS listeners both provide); `None` if the server was
/// built without it, and then only the per-device limits apply.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

/// The device and relying-party routes (one listener for both).
pub fn device_routes(state: HttpState) -> Router {
    device_only_routes(state.clone()).merge(relying_party_routes(state))
}

/// The device routes only (`/v1/device/...`), bodies of at most
/// [`MAX_DEVICE_BODY`] bytes: what the device listener serves when the
/// operator API has its own listener.
pub fn device_only_routes(state: HttpState) -> Router {
    Router::new()
        .route("/v1/device/enroll", post(enroll))
        .route("/v1/device/auth", post(auth))
        .route("/v1/device/challenge", post(challenge))
        .route("/v1/device/auth-response", post(auth_response))
        .route("/v1/device/receipt", post(receipt))
        .route("/v1/device/{device}/command", get(command))
        .layer(DefaultBodyLimit::max(MAX_DEVICE_BODY))
        .with_state(state)
}

/// The relying-party routes (`/v1/verify`, `/v1/open`), bodies of at most
/// [`MAX_BODY`] bytes.
pub fn relying_party_routes(state: HttpState) -> Router {
    let tokens = state.tokens.clone();
    Router::new()
        .route("/v1/verify", post(verify))
        .route("/v1/open", post(open))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(tokens, audit_denials))
}

/// A layer over every route that takes a bearer token: a request whose
/// token was refused ([`Denied`], found in the response's extensions) is
/// counted and aggregated per source address and window
/// ([`TokenStore::note_denied`]); the aggregate of a window is written to
/// the audit log when the next window starts or its end passes, whichever
/// comes first.
pub async fn audit_denials(
    State(tokens): State<Arc<TokenStore>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let resp = next.run(req).await;
    let Some(denied) = resp.extensions().get::<Denied>().copied() else {
        return resp;
    };
    let kind = match denied {
        Denied::Unauthenticated => crate::tokens::DenialKind::Unauthenticated,
        Denied::Forbidden => crate::tokens::DenialKind::Forbidden,
    };
    let now = crate::service::now();
    let (closed, arm) = tokens.note_denied(source, kind, now);
    if !closed.is_empty() {
        let t = tokens.clone();
        tokio::task::spawn_blocking(move || t.write_failures(&closed));
    }
    if arm {
        let window_end =
            now - now % crate::tokens::AUTH_FAILURE_WINDOW + crate::tokens::AUTH_FAILURE_WINDOW;
        let wait = std::time::Duration::from_secs(window_end - now + 1);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = tokio::task::spawn_blocking(move || {
                let closed = tokens.closed_failures(Some(crate::service::now()));
                tokens.write_failures(&closed);
            })
            .await;
        });
    }
    resp
}

/// 503 Service Unavailable with Retry-After: the database or the card
/// stalls, or the server sheds load. Nothing was changed.
pub fn unavailable(retry_secs: u32) -> Response {
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({ "error": Refusal::Unavailable.kind() })),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_secs.max(1)));
    r
}

/// Runs `f` on a blocking thread inside the current span (so its log
/// lines carry the request id), holding a slot of the load shedder; a shed
/// request is a 503 at once.
async fn in_center<T: Send + 'static>(
    limits: &Limits,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<Result<T, tokio::task::JoinError>, Response> {
    let shed = limits.shedder();
    let permit = match shed.enter() {
        Ok(p) => p,
        Err(_) => return Err(unavailable(shed.retry_secs())),
    };
    let span = tracing::Span::current();
    Ok(tokio::task::spawn_blocking(move || {
        let _permit = permit;
        span.in_scope(f)
    })
    .await)
}

fn octets(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response()
}

/// A refusal as an HTTP reply: its status and a JSON body naming the kind
/// (with Retry-After: 1 when the center is unavailable).
pub fn refusal(r: Refusal) -> Response {
    if r == Refusal::Unavailable {
        return unavailable(1);
    }
    (r.http_status(), axum::Json(json!({ "error": r.kind() }))).into_response()
}

/// 429 Too Many Requests with Retry-After in whole seconds.
pub fn too_many(wait: std::time::Duration) -> Response {
    let mut r = (
        StatusCode::TOO_MANY_REQUESTS,
        axum::Json(json!({ "error": "too-many-requests" })),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_secs(wait)));
    r
}

async fn device(state: HttpState, peer: Peer, res: DeviceResource, body: Bytes) -> Response {
    let admitted = match state.limits.admit(peer.0, res, &body) {
        Ok(a) => a,
        Err(wait) => return too_many(wait),
    };
    let svc = state.svc.clone();
    let outcome = match in_center(&state.limits, move || {
        api::serve_device(svc.as_ref(), res, &body)
    })
    .await
    {
        Ok(o) => o,
        // Shed: not settled, so it spends no rate budget.
        Err(shed) => return shed,
    };
    let accepted = matches!(outcome, Ok(Ok(_)));
    state.limits.settle(admitted, proven(res, accepted));
    match outcome {
        Ok(Ok(Some(bytes))) => octets(StatusCode::OK, bytes),
        Ok(Ok(None)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(r)) => refusal(r),
        Err(_) => refusal(Refusal::Internal),
    }
}

async fn enroll(State(s): State<HttpState>, peer: Peer, body: Bytes) -> Response {
    device(s, peer, DeviceResource::Enroll, body).await
}

async fn auth(State(s): State<HttpState>, peer: Peer, body: Bytes) -> Response {
    device(s, peer, DeviceResource::Auth, body).await
}

async fn challenge(State(s): State<HttpState>, peer: Peer, body: Bytes) -> Response {
    device(s, peer, DeviceResource::Challenge, body).await
}

async fn auth_response(State(s): State<HttpState>, peer: Peer, body: Bytes) -> Response {
    device(s, peer, DeviceResource::AuthResponse, body).await
}

async fn receipt(State(s): State<HttpState>, peer: Peer, body: Bytes) -> Response {
    device(s, peer, DeviceResource::Receipt, body).await
}

async fn command(State(s): State<HttpState>, peer: Peer, Path(hex): Path<String>) -> Response {
    match api::parse_device(&hex) {
        Ok(id) => device(s, peer, DeviceResource::Command(id), Bytes::new()).await,
        Err(r) => refusal(r),
    }
}

/// Why a bearer token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No token, or an unknown one: 401.
    Unauthenticated,
    /// A known token without the role: 403.
    Forbidden,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        // Marked for the audit layer ([`audit_denials`]).
        let mut r = match self {
            Denied::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(json!({ "error": "unauthenticated" })),
            )
                .into_response(),
            Denied::Forbidden => (
                StatusCode::FORBIDDEN,
                axum::Json(json!({ "error": "forbidden" })),
            )
                .into_response(),
        };
        r.extensions_mut().insert(self);
        r
    }
}

/// The token of a request if it has one of `roles` (admin always does,
/// except for the relying-party resources, which need a verifier's name).
pub fn authorize(
    tokens: &TokenStore,
    headers: &HeaderMap,
    roles: &[Role],
) -> Result<TokenRecord, Denied> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(Denied::Unauthenticated)?;
    let record = tokens.check(token.trim()).ok_or(Denied::Unauthenticated)?;
    if roles.contains(&record.role) {
        Ok(record)
    } else {
        Err(Denied::Forbidden)
    }
}

async fn verify(State(s): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    let who = match authorize(&s.tokens, &headers, &[Role::Verifier]) {
        Ok(r) => r,
        Err(d) => return d.into_response(),
    };
    let svc = s.svc.clone();
    let outcome = match in_center(&s.limits, move || svc.verify(&who.name, &body)).await {
        Ok(o) => o,
        Err(shed) => return shed,
    };
    match outcome {
        Ok(Err(Refusal::Unavailable)) => refusal(Refusal::Unavailable),
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(r)) => (
            r.http_status(),
            axum::Json(json!({ "valid": false, "error": r.kind() })),
        )
            .into_response(),
        Err(_) => refusal(Refusal::Internal),
    }
}

async fn open(State(s): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    let who = match authorize(&s.tokens, &headers, &[Role::Verifier]) {
        Ok(r) => r,
        Err(d) => return d.into_response(),
    };
    let svc = s.svc.clone();
    let outcome = match in_center(&s.limits, move || svc.open(&who.name, &body)).await {
        Ok(o) => o,
        Err(shed) => return shed,
    };
    match outcome {
        Ok(Ok(plaintext)) => octets(StatusCode::OK, plaintext),
        Ok(Err(r)) => refusal(r),
        Err(_) => refusal(Refusal::Internal),
    }
}
