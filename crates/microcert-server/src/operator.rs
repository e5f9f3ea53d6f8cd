//! The operator API: HTTP/JSON under `/v1`, bearer tokens with roles, every
//! action audited with the token's name (the center writes the audit entry
//! with the actor it is given).

// The helpers return an axum `Response` as their error so a handler can
// return it as it is; it is large, but these are not hot paths.
#![allow(clippy::result_large_err)]

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use microcert_center::db::{SeedRow, SeedTimes};
use microcert_center::{Center, DeviceQuery, DeviceView, Error, ErrorClass, MessageRefusal};
use microcert_core::{DeviceId, Event, KeyState};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::http::authorize;
use crate::service::{now, refusal};
use crate::tokens::{Role, TokenStore};

/// What the operator handlers share.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // holds the metrics handle
pub struct OperatorState {
    /// The center.
    pub center: Arc<Center>,
    /// Bearer tokens.
    pub tokens: Arc<TokenStore>,
    /// Renders `/metrics`.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Where backups and the card's anchor are; None: backups not served.
    pub maintenance: Option<MaintenancePaths>,
    /// Readiness probes and the device limits (shedding) for `/readyz`
    /// and the gauges of `/metrics`; None: `/readyz` answers 503.
    pub health: Option<Health>,
}

/// What `/readyz` and `/metrics` read.
#[derive(Debug, Clone)]
pub struct Health {
    /// The card and database probes.
    pub probes: Arc<crate::observe::Probes>,
    /// The device resources' limits (their load shedder).
    pub limits: Arc<crate::limits::Limits>,
}

const READ: &[Role] = &[Role::Admin, Role::Operator, Role::Auditor];
const WRITE: &[Role] = &[Role::Admin, Role::Operator];
const AUDIT: &[Role] = &[Role::Admin, Role::Auditor];

/// The operator routes.
pub fn routes(state: OperatorState) -> Router {
    let (bounded, streamed) = route_parts(state);
    bounded.merge(streamed)
}

/// Largest body of an operator request (JSON), the import excepted.
pub const MAX_OPERATOR_BODY: usize = 64 * 1024;

/// The operator routes in two parts: those whose requests are bounded
/// (bodies of at most [`MAX_OPERATOR_BODY`] bytes; the server puts its
/// request timeout on them) and the streamed import (`/v1/import`: its
/// body is a whole batch file, read line by line, and it takes as long as
/// the batch takes).
pub fn route_parts(state: OperatorState) -> (Router, Router) {
    let tokens = state.tokens.clone();
    let audited = move |r: Router| {
        r.layer(axum::middleware::from_fn_with_state(
            tokens.clone(),
            crate::http::audit_denials,
        ))
    };
    let streamed = Router::new()
        .route("/v1/import", post(import))
        .with_state(state.clone());
    (audited(bounded_routes(state)), audited(streamed))
}

fn bounded_routes(state: OperatorState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/bulk", post(bulk))
        .route("/v1/devices/{device}", get(show_device))
        .route("/v1/devices/{device}/{action}", post(device_action))
        .route("/v1/updates/due", post(update_due))
        .route("/v1/integrity", get(integrity))
        .route("/v1/backups", get(list_backups).post(create_backup))
        .route("/v1/audit", get(audit))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/clock", get(clock_status))
        .route("/v1/clock/confirm", post(clock_confirm))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_OPERATOR_BODY))
        .with_state(state)
}

/// The HTTP status of a center error on the operator API: the one place
/// where this is decided, every variant named (no catch-all). The body's
/// `error` is [`Error::kind`], the same vocabulary as the device resources'
/// (documented in the OpenAPI document, [`crate::openapi::ERROR_KINDS`]).
pub fn operator_status(e: &Error) -> StatusCode {
    match e.class() {
        ErrorClass::Message(MessageRefusal::UnknownDevice) => StatusCode::NOT_FOUND,
        ErrorClass::Message(MessageRefusal::Malformed) => StatusCode::BAD_REQUEST,
        // A request the current state (or configuration) does not allow.
        ErrorClass::Conflict => StatusCode::CONFLICT,
        // As on the device resources.
        ErrorClass::Message(_)
        | ErrorClass::Integrity
        | ErrorClass::Unavailable
        | ErrorClass::Internal => refusal(e).http_status(),
    }
}

/// An error reply of the operator API.
fn error(e: &Error) -> Response {
    let status = operator_status(e);
    if status.is_server_error() {
        tracing::error!(error = %e, "operator request failed");
    }
    (
        status,
        axum::Json(json!({ "error": e.kind(), "message": e.to_string() })),
    )
        .into_response()
}

fn bad_request(message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": "bad-request", "message": message.into() })),
    )
        .into_response()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> microcert_center::Result<T> + Send + 'static,
) -> Result<T, Response> {
    let span = tracing::Span::current();
    match tokio::task::spawn_blocking(move || span.in_scope(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error(&e)),
        Err(_) => Err(error(&Error::db(
            microcert_center::DbFailure::Internal,
            "worker thread failed",
        ))),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: 200 when the card and the database answer, the last
/// integrity check did not fail and no load is shed; 503 (with what
/// failed) otherwise. The process keeps running either way.
async fn readyz(State(s): State<OperatorState>) -> Response {
    let Some(h) = &s.health else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "ready": false, "error": "not-configured" })),
        )
            .into_response();
    };
    let r = h.probes.readiness(&h.limits).await;
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(r)).into_response()
}

async fn metrics(State(s): State<OperatorState>) -> Response {
    if let Some(h) = &s.health {
        h.probes.refresh(&h.limits).await;
    }
    match &s.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no metrics recorder installed\n",
        )
            .into_response(),
    }
}

async fn openapi() -> Response {
    axum::Json(crate::openapi::document()).into_response()
}

/// A seed as operators see it: no ciphertext, no tag.
#[derive(Debug, Serialize)]
pub struct SeedJson {
    generation: u8,
    state: &'static str,
    base_year: u16,
    last_year: u16,
    suite: u8,
    kstore_version: u32,
    via: &'static str,
    #[serde(flatten)]
    times: SeedTimes,
}

impl From<&SeedRow> for SeedJson {
    fn from(s: &SeedRow) -> Self {
        SeedJson {
            generation: s.generation,
            state: s.state.name(),
            base_year: s.base_year,
            last_year: s.base_year.saturating_add(microcert_core::SEED_YEARS - 1),
            suite: s.suite.id(),
            kstore_version: s.kstore_version,
            via: s.via.name(),
            times: SeedTimes::of(s),
        }
    }
}

/// A device as operators see it.
#[derive(Debug, Serialize)]
pub struct DeviceJson {
    device: String,
    class: u8,
    suite: u8,
    epoch: u8,
    transport_open: bool,
    created: u64,
    command_counter: u32,
    state: Option<&'static str>,
    seeds: Vec<SeedJson>,
}

impl From<&DeviceView> for DeviceJson {
    fn from(v: &DeviceView) -> Self {
        DeviceJson {
            device: v.device.id.to_string(),
            class: v.device.class,
            suite: v.device.suite.id(),
            epoch: v.device.epoch,
            transport_open: v.device.transport_open,
            created: v.device.created,
            command_counter: v.device.command_counter,
            state: v.current().map(|s| s.state.name()),
            seeds: v.seeds.iter().map(SeedJson::from).collect(),
        }
    }
}

/// Filters of the device list and of bulk actions.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Filter {
    /// Current seed state (e.g. "active").
    pub state: Option<String>,
    /// Device class, 1..=3.
    pub class: Option<u8>,
    /// Only seeds whose last year is at most this year.
    pub expires_by: Option<u16>,
}

impl Filter {
    fn query(&self) -> Result<DeviceQuery, Response> {
        let state = match &self.state {
            Some(s) => Some(
                KeyState::from_name(s)
                    .ok_or_else(|| bad_request(format!("unknown state {s:?}")))?,
            ),
            None => None,
        };
        Ok(DeviceQuery {
            state,
            class: self.class,
            last_year_at_most: self.expires_by,
            after: None,
            limit: 0,
        })
    }
}

#[derive(Debug, Deserialize)]
struct ListParams {
    #[serde(flatten)]
    filter: Filter,
    after: Option<String>,
    limit: Option<usize>,
}

fn device_id(hex: &str) -> Result<DeviceId, Response> {
    crate::api::parse_device(hex).map_err(|_| bad_request("a device id is 16 hex digits"))
}

async fn list_devices(
    State(s): State<OperatorState>,
    headers: HeaderMap,
    Query(p): Query<ListParams>,
) -> Response {
    if let Err(d) = authorize(&s.tokens, &headers, READ) {
        return d.into_response();
    }
    let mut q = match p.filter.query() {
        Ok(q) => q,
        Err(r) => return r,
    };
    q.limit = p.limit.unwrap_or(100).clamp(1, 1000);
    if let Some(after) = &p.after {
        match device_id(after) {
            Ok(id) => q.after = Some(id),
            Err(r) => return r,
        }
    }
    let limit = q.limit;
    let center = s.center.clone();
    match blocking(move || center.list_devices(&q)).await {
        Ok(views) => {
            let next = (views.len() == limit)
                .then(|| views.last().map(|v| v.device.id.to_string()))
                .flatten();
            let devices: Vec<DeviceJson> = views.iter().map(DeviceJson::from).collect();
            axum::Json(json!({ "devices": devices, "next": next })).into_response()
        }
        Err(r) => r,
    }
}

async fn show_device(
    State(s): State<OperatorState>,
    headers: HeaderMap,
    Path(hex): Path<String>,
) -> Response {
    if let Err(d) = authorize(&s.tokens, &headers, READ) {
        return d.into_response();
    }
    let id = match device_id(&hex) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let center = s.center.clone();
    match blocking(move || center.device(id)).await {
        Ok(Some(v)) => axum::Json(DeviceJson::from(&v)).into_response(),
        Ok(None) => error(&Error::UnknownDevice),
        Err(r) => r,
    }
}

/// The body of an action: why, and for `reopen`, the chip's new epoch.
#[derive(Debug, Default, Deserialize)]
struct ActionBody {
    reason: Option<String>,
    epoch: Option<u8>,
}

/// The life-cycle and update actions an operator can take on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Activate a pre-activation seed.
    Activate,
    /// Suspend the current seed.
    Suspend,
    /// Resume a suspended seed.
    Resume,
    /// Deactivate the current seed.
    Deactivate,
    /// Revoke: Compromised at once, REVOKE queued.
    Revoke,
    /// Destroy a deactivated or compromised seed's ciphertext.
    Destroy,
    /// Queue an UPDATE_SEED.
    Update,
    /// Reopen transport-key enrollment (with `epoch` after a revocation).
    Reopen,
}

impl Action {
    fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }

    fn apply(
        self,
        center: &Center,
        id: DeviceId,
        actor: &str,
        reason: &str,
        epoch: Option<u8>,
    ) -> microcert_center::Result<()> {
        let t = now();
        let event = match self {
            Action::Activate => Event::Activate,
            Action::Suspend => Event::Suspend,
            Action::Resume => Event::Resume,
            Action::Deactivate => Event::Deactivate,
            Action::Destroy => Event::Destroy,
            Action::Revoke => return center.revoke(id, actor, reason, t),
            Action::Update => return center.queue_update(id, actor, reason, t),
            Action::Reopen => {
                return center
                    .reopen_transport(id, epoch, actor, reason, t)
                    .map(|_| ());
            }
        };
        center
            .lifecycle(id, None, event, actor, reason, t)
            .map(|_| ())
    }
}

fn parse_body(body: &Bytes) -> Result<ActionBody, Response> {
    if body.is_empty() {
        return Ok(ActionBody::default());
    }
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

async fn device_action(
    State(s): State<OperatorState>,
    headers: HeaderMap,
    Path((hex, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let who = match authorize(&s.tokens, &headers, WRITE) {
        Ok(w) => w,
        Err(d) => return d.into_response(),
    };
    let Some(action) = Action::parse(&action) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": "unknown-action"})),
        )
            .into_response();
    };
    let (id, body) = match (device_id(&hex), parse_body(&body)) {
        (Ok(id), Ok(b)) => (id, b),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let reason = body.reason.unwrap_or_else(|| "operator request".into());
    let center = s.center.clone();
    let result = blocking(move || {
        action.apply(&center, id, &who.name, &reason, body.epoch)?;
        center.device(id)
    })
    .await;
    match result {
        Ok(Some(v)) => axum::Json(DeviceJson::from(&v)).into_response(),
        Ok(None) => error(&Error::UnknownDevice),
        Err(r) => r,
    }
}

#[derive(Debug, Deserialize)]
struct BulkBody {
    action: Action,
    #[serde(default)]
    filter: Filter,
    reason: Option<String>,
}

async fn bulk(State(s): State<OperatorState>, headers: HeaderMap, body: Bytes) -> Response {
    let who = match authorize(&s.tokens, &headers, WRITE) {
        Ok(w) => w,
        Err(d) => return d.into_response(),
    };
    let body: BulkBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return bad_request(format!("invalid JSON body: {e}")),
    };
    let mut q = match body.filter.query() {
        Ok(q) => q,
        Err(r) => return r,
    };
    let reason = body
        .reason
        .unwrap_or_else(|| "operator bulk request".into());
    let center = s.center.clone();
    let result = blocking(move || {
        q.limit = 500;
        let (mut applied, mut failed) = (0u64, Vec::new());
        loop {
            let page = center.list_devices(&q)?;
            let Some(last) = page.last() else { break };
            q.after = Some(last.device.id);
            for v in &page {
                match body
                    .action
                    .apply(&center, v.device.id, &who.name, &reason, None)
                {
                    Ok(()) => applied += 1,
                    Err(e) if e.is_refusal() => failed.push(json!({
                        "device": v.device.id.to_string(), "error": e.kind()
                    })),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(json!({ "applied": applied, "failed": failed }))
    })
    .await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(r) => r,
    }
}

async fn update_due(State(s): State<OperatorState>, headers: HeaderMap) -> Response {
    let who = match authorize(&s.tokens, &headers, WRITE) {
        Ok(w) => w,
        Err(d) => return d.into_response(),
    };
    let center = s.center.clone();
    match blocking(move || center.update_due(&who.name, now())).await {
        Ok(n) => axum::Json(json!({ "queued": n })).into_response(),
        Err(r) => r,
    }
}

/// Body frames of `/v1/import` held between the connection and the
/// importer (with the importer's chunk, the bound on lines in flight).
const IMPORT_FRAMES: usize = 16;
/// Progress lines held for a client that does not read them (the import
/// waits when they are not read).
const IMPORT_EVENTS: usize = 16;

/// `POST /v1/import`: a factory batch of any size, streamed. The body is
/// read frame by frame into the center's line reader (no body limit: each
/// line is bounded instead, and a chunk at a time is held); the reply is
/// NDJSON, a `progress` line after each committed chunk and one final
/// `done` (the summary) or `error` line. `X-Batch-Sha256` (the batch's
/// digest, checked at the end) makes the import resumable;
/// `X-Batch-Lines` gives the progress lines a total.
async fn import(
    State(s): State<OperatorState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    use microcert_center::lines::{ImportEvent, ImportSummary, RejectedLine};
    let who = match authorize(&s.tokens, &headers, WRITE) {
        Ok(w) => w,
        Err(d) => return d.into_response(),
    };
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("?").trim());
    let sha256 = match header("x-batch-sha256") {
        None => None,
        Some(t) => {
            let mut d = [0u8; 32];
            if hex::decode_to_slice(t, &mut d).is_err() {
                return bad_request("X-Batch-Sha256 is not 64 hex digits");
            }
            Some(d)
        }
    };
    let lines = match header("x-batch-lines").map(str::parse::<u64>) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return bad_request("X-Batch-Lines is not a number"),
    };
    let (frames_tx, frames_rx) = tokio::sync::mpsc::channel(IMPORT_FRAMES);
    tokio::spawn(async move {
        let mut body = body;
        loop {
            let frame = std::future::poll_fn(|cx| {
                hyper::body::Body::poll_frame(std::pin::Pin::new(&mut body), cx)
            })
            .await;
            let item = match frame {
                None => break,
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => Ok(d),
                    Err(_) => continue, // trailers
                },
                Some(Err(e)) => Err(std::io::Error::other(e.to_string())),
            };
            let stop = item.is_err();
            if frames_tx.send(item).await.is_err() || stop {
                break;
            }
        }
    });
    let (events_tx, events_rx) = tokio::sync::mpsc::channel::<Bytes>(IMPORT_EVENTS);
    let center = s.center.clone();
    tokio::task::spawn_blocking(move || {
        let send = |e: &ImportEvent| {
            let mut v = serde_json::to_vec(e).unwrap_or_default();
            v.push(b'\n');
            // A client that went away stops reading, not the import.
            let _ = events_tx.blocking_send(Bytes::from(v));
        };
        let mut reader = std::io::BufReader::with_capacity(
            1 << 16,
            FrameReader {
                rx: frames_rx,
                cur: Bytes::new(),
            },
        );
        let name = format!("upload by {}", who.name);
        let source = microcert_center::ImportSource {
            sha256,
            lines,
            name: &name,
        };
        let r = center.import_stream(&mut reader, &source, &who.name, now(), &mut |p| {
            send(&ImportEvent::Progress {
                lines_done: p.lines_done,
                lines_total: p.lines_total,
                enrolled: p.enrolled,
                rejected: p
                    .rejected
                    .iter()
                    .map(|x| RejectedLine {
                        line: x.line,
                        error: x.kind.to_owned(),
                        message: x.message.clone(),
                    })
                    .collect(),
            })
        });
        send(&match r {
            Ok(r) => ImportEvent::Done(ImportSummary {
                lines: r.lines,
                resumed_after: r.resumed_after,
                enrolled: r.enrolled,
                already: r.already,
                refused: r
                    .refused
                    .iter()
                    .map(|(k, n)| ((*k).to_owned(), *n))
                    .collect(),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "import stopped");
                ImportEvent::Error {
                    error: e.kind().to_owned(),
                    message: e.to_string(),
                }
            }
        });
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::new(EventsBody(events_rx)),
    )
        .into_response()
}

/// The request body of `/v1/import` as a blocking reader, for the
/// importer's thread.
struct FrameReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    cur: Bytes,
}

impl std::io::Read for FrameReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(frame) => self.cur = frame?,
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// The NDJSON reply of `/v1/import`, line by line as the importer sends
/// them.
struct EventsBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for EventsBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// Where this process keeps backups and the card's anchor, for the
/// backup and integrity routes (set once by `serve`; without it the
/// integrity check runs without the anchor and backups are refused).
#[derive(Debug, Clone)]
pub struct MaintenancePaths {
    /// The backup directory.
    pub backups: PathBuf,
    /// Backups kept (older ones are deleted).
    pub keep: usize,
    /// The card's anchor file.
    pub anchor: PathBuf,
}

async fn integrity(State(s): State<OperatorState>, headers: HeaderMap) -> Response {
    if let Err(d) = authorize(&s.tokens, &headers, READ) {
        return d.into_response();
    }
    let center = s.center.clone();
    let anchor = s.maintenance.as_ref().map(|m| m.anchor.clone());
    match blocking(move || center.integrity_check(anchor.as_deref(), now())).await {
        Ok(r) => {
            crate::observe::status().integrity_done(now(), r.is_clean());
            integrity_json(&r)
        }
        Err(r) => r,
    }
}

fn integrity_json(r: &microcert_center::IntegrityReport) -> Response {
    {
        axum::Json(json!({
            "clean": r.is_clean(),
            "records": r.records,
            "bad_records": r.bad_records.iter().map(|(d, g)| json!({
                "device": d.to_string(), "generation": g
            })).collect::<Vec<_>>(),
            "missing_records": r.missing_records.iter().map(|(d, g)| json!({
                "device": d.to_string(), "generation": g
            })).collect::<Vec<_>>(),
            "bad_devices": r.bad_devices.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            "bad_shards": r.bad_shards,
            "rolled_back_shards": r.rolled_back_shards,
            "audit": r.audit,
            "anchor": r.anchor,
            "quarantined": r.tampered_devices().iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            "findings": r.findings(),
        }))
        .into_response()
    }
}

fn maintenance(s: &OperatorState) -> Result<MaintenancePaths, Response> {
    s.maintenance.clone().ok_or_else(|| {
        error(&Error::NotConfigured {
            what: "backups (in this server)",
        })
    })
}

async fn create_backup(State(s): State<OperatorState>, headers: HeaderMap) -> Response {
    let who = match authorize(&s.tokens, &headers, WRITE) {
        Ok(w) => w,
        Err(d) => return d.into_response(),
    };
    let m = match maintenance(&s) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let center = s.center.clone();
    match blocking(move || {
        center.create_backup(&m.backups, m.keep, Some(&m.anchor), &who.name, now())
    })
    .await
    {
        Ok(b) => {
            let size = std::fs::metadata(&b.path).map_or(0, |m| m.len());
            crate::observe::status().backup_done(b.created, size);
            backup_json(&b)
        }
        Err(r) => r,
    }
}

fn backup_json(b: &microcert_center::backup::BackupSummary) -> Response {
    {
        axum::Json(json!({
            "file": b.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "created": b.created,
            "devices": b.devices,
            "seeds": b.seeds,
            "audit": b.audit,
            "kstore_versions": b.kstore_versions,
        }))
        .into_response()
    }
}

async fn list_backups(State(s): State<OperatorState>, headers: HeaderMap) -> Response {
    if let Err(d) = authorize(&s.tokens, &headers, READ) {
        return d.into_response();
    }
    let m = match maintenance(&s) {
        Ok(m) => m,
        Err(r) => return r,
    };
    match blocking(move || microcert_center::backup::list(&m.backups)).await {
        Ok(v) => axum::Json(json!({
            "backups": v.iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
        }))
        .into_response(),
        Err(r) => r,
    }
}

#[derive(Debug, Deserialize)]
struct AuditParams {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn audit(
    State(s): State<OperatorState>,
    headers: HeaderMap,
    Query(p): Query<AuditParams>,
) -> Response {
    if let Err(d) = authorize(&s.tokens, &headers, AUDIT) {
        return d.into_response();
    }
    let center = s.center.clone();
    let (after, limit) = (p.after.unwrap_or(0), p.limit.unwrap_or(100).clamp(1, 1000));
    match blocking(move || center.audit_log(after, limit)).await {
        Ok(entries) => axum::Json(json!({
            "entries": entries.iter().map(audit_json).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(r) => r,
    }
}

/// An audit entry as JSON (also the line format of `audit export`).
pub fn audit_json(a: &microcert_center::db::AuditRecord) -> serde_json::Value {
    json!({
        "seq": a.seq,
        "time": a.entry.time,
        "actor": a.entry.actor,
        "action": a.entry.action,
        "device": a.entry.device.map(|d| d.to_string()),
        "generation": a.entry.generation,
        "reason": a.entry.reason,
        "prev_hash": hex::encode(a.prev_hash),
        "hash": hex::encode(a.hash),
    })
}

async fn audit_verify(State(s): State<OperatorState>, headers: HeaderMap) -> Response {
    if let Err(d) = authorize(&s.tokens, &headers, AUDIT) {
        return d.into_response();
    }
    let center = s.center.clone();
    match blocking(move || center.verify_audit_chain()).await {
        Ok(None) => axum::Json(json!({ "intact": true })).into_response(),
        Ok(Some(seq)) => axum::Json(json!({ "intact": false, "first_bad": seq })).into_response(),
        Err(r) => r,
    }
}

/// `GET /v1/clock`: the server's time and the unconfirmed clock step, if
/// any (issue 12: housekeeping waits while one is).
async fn clock_status(State(s): State<OperatorState>, headers: HeaderMap) -> Response {
    if let Err(d) = authorize(&s.tokens, &headers, READ) {
        return d.into_response();
    }
    let center = s.center.clone();
    match blocking(move || center.clock_alarm()).await {
        Ok(alarm) => axum::Json(json!({ "now": now(), "alarm": alarm })).into_response(),
        Err(r) => r,
    }
}

/// `POST /v1/clock/confirm`: an operator confirms that the server's clock
/// is right now; the alarm ends and housekeeping resumes (audited).
async fn clock_confirm(State(s): State<OperatorState>, headers: HeaderMap) -> Response {
    let who = match authorize(&s.tokens, &headers, WRITE) {
        Ok(w) => w,
        Err(d) => return d.into_response(),
    };
    let center = s.center.clone();
    let at = now();
    match blocking(move || center.confirm_clock_step(&who.name, at)).await {
        Ok(()) => axum::Json(json!({ "confirmed": at })).into_response(),
        Err(r) => r,
    }
}
