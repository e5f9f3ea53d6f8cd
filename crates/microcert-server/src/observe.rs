//! Observability: the Prometheus recorder and the metric names, request
//! ids and the access log, the process's last integrity check and backup,
//! and readiness (`/readyz`).
//!
//! Metric names (deploy/grafana-dashboard.json uses these):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `microcert_request_duration_seconds` | histogram | transport (coap, http), resource (a device resource's name, else the HTTP route) |
//! | `microcert_requests_total` | counter | transport, resource, status |
//! | `microcert_refusals_total` | counter | resource, kind |
//! | `microcert_accepted_total` | counter | resource |
//! | `microcert_rate_limited_total` | counter | limit |
//! | `microcert_shed_total` | counter | reason (stalled, full) |
//! | `microcert_http_connections_refused_total` | counter | |
//! | `microcert_center_calls_in_flight` | gauge | |
//! | `microcert_center_call_oldest_seconds` | gauge | |
//! | `microcert_shedding` | gauge (0/1) | |
//! | `microcert_seed_cache_devices` | gauge | |
//! | `microcert_seed_cache_hits_total`, `_misses_total` | counter | |
//! | `microcert_replay_guard_entries` | gauge | |
//! | `microcert_card_probe_seconds` | histogram | |
//! | `microcert_card_errors_total` | counter | |
//! | `microcert_database_probe_seconds` | histogram | |
//! | `microcert_database_errors_total` | counter | |
//! | `microcert_integrity_last_run_timestamp_seconds` | gauge | |
//! | `microcert_integrity_last_clean` | gauge (0/1) | |
//! | `microcert_backup_last_timestamp_seconds` | gauge | |
//! | `microcert_backup_last_age_seconds` | gauge | |
//! | `microcert_backup_last_size_bytes` | gauge | |
//! | `microcert_audit_entries` | gauge | |
//! | `microcert_clock_step_alarm` | gauge (0/1) | |
//! | `microcert_ready` | gauge (0/1) | |

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use microcert_center::Center;
use tracing::Instrument;

use crate::limits::Limits;
use crate::service::now;

/// Latency buckets, seconds: 100 us to 10 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A Prometheus recorder whose `*_seconds` histograms have buckets (not
/// summaries), so latencies aggregate across centers.
pub fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .expect("the bucket list is not empty")
}

static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();

/// The process's recorder, installed at the first call (None if another
/// recorder was installed first, outside this module).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| builder().install_recorder().ok())
        .clone()
}

static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A new request id: a random per-process prefix and a counter, so ids of
/// several centers in one log do not collide (`3fa9c2d1-00000000002a`).
pub fn request_id() -> String {
    let prefix = *PREFIX.get_or_init(|| {
        let mut b = [0u8; 4];
        let _ = getrandom::fill(&mut b);
        u32::from_be_bytes(b)
    });
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("{prefix:08x}-{n:012x}")
}

/// Records one request's latency and outcome.
pub fn record(transport: &'static str, resource: &str, status: u16, elapsed: Duration) {
    let resource = resource.to_owned();
    metrics::histogram!(
        "microcert_request_duration_seconds",
        "transport" => transport,
        "resource" => resource.clone()
    )
    .record(elapsed.as_secs_f64());
    metrics::counter!(
        "microcert_requests_total",
        "transport" => transport,
        "resource" => resource,
        "status" => status.to_string()
    )
    .increment(1);
}

/// The metrics label of an HTTP route: a device resource has the same
/// name as over CoAP (`auth`, `command`, ...), any other route is its
/// pattern (`/v1/devices/{device}`).
pub fn resource_of(route: &str) -> &str {
    match route.strip_prefix("/v1/device/") {
        Some("{device}/command") => "command",
        Some(r) => r,
        None => route,
    }
}

/// The HTTP middleware: a request id (`x-request-id` on the answer, and
/// the `id` of the span every log line of the request is in), the
/// latency histogram by route (never by raw path: bounded labels), and,
/// when `access_log` is on, one `microcert::access` line per request
/// (method, route, status, milliseconds; no header, no query, no body).
pub async fn http_middleware(State(access_log): State<bool>, req: Request, next: Next) -> Response {
    let id = request_id();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let resource = resource_of(&route);
    let method = req.method().clone();
    let span = tracing::info_span!("request", id = %id, transport = "http");
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = resp.status().as_u16();
    record("http", resource, status, elapsed);
    if access_log {
        span.in_scope(|| {
            tracing::info!(
                target: "microcert::access",
                method = %method,
                route = %route,
                status,
                ms = elapsed.as_secs_f64() * 1e3,
                "access"
            )
        });
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// The last integrity check and backup of this process (for `/metrics`
/// and `/readyz`).
#[derive(Debug, Default)]
pub struct Status {
    integrity_at: AtomicU64,
    /// 0 unknown, 1 clean, 2 failed.
    integrity: std::sync::atomic::AtomicU8,
    backup_at: AtomicU64,
    backup_size: AtomicU64,
}

static STATUS: Status = Status {
    integrity_at: AtomicU64::new(0),
    integrity: std::sync::atomic::AtomicU8::new(0),
    backup_at: AtomicU64::new(0),
    backup_size: AtomicU64::new(0),
};

/// The process's status.
pub fn status() -> &'static Status {
    &STATUS
}

impl Status {
    /// An integrity check ran at `at`: clean or not.
    pub fn integrity_done(&self, at: u64, clean: bool) {
        self.integrity_at.store(at, Ordering::Relaxed);
        self.integrity
            .store(if clean { 1 } else { 2 }, Ordering::Relaxed);
        metrics::gauge!("microcert_integrity_last_run_timestamp_seconds").set(at as f64);
        metrics::gauge!("microcert_integrity_last_clean").set(if clean { 1.0 } else { 0.0 });
    }

    /// Whether the last integrity check found the database changed.
    pub fn integrity_failed(&self) -> bool {
        self.integrity.load(Ordering::Relaxed) == 2
    }

    /// A backup was written at `at`, `size` bytes.
    pub fn backup_done(&self, at: u64, size: u64) {
        if at >= self.backup_at.load(Ordering::Relaxed) {
            self.backup_at.store(at, Ordering::Relaxed);
            self.backup_size.store(size, Ordering::Relaxed);
        }
    }

    /// The newest backup file in `dir` (at start-up).
    pub fn scan_backups(&self, dir: &std::path::Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if !m.is_file() {
                continue;
            }
            let at = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            self.backup_done(at, m.len());
        }
    }
}

/// Probes of the card and the database, bounded in time; a probe still
/// running from an earlier call counts as "not answering" (a stalled
/// card or database never gathers blocked threads).
#[derive(Debug)]
pub struct Probes {
    center: Arc<Center>,
    card_busy: Arc<AtomicBool>,
    db_busy: Arc<AtomicBool>,
    timeout: Duration,
}

/// What `/readyz` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    /// All of the below.
    pub ready: bool,
    /// The card answered a tag request in time.
    pub card: bool,
    /// The database answered a read in time.
    pub database: bool,
    /// The last integrity check did not fail (or none ran yet).
    pub integrity: bool,
    /// No load is being shed.
    pub not_shedding: bool,
}

/// Runs `f` on a blocking thread unless one from an earlier call still
/// runs; true if it returned Ok within `timeout`. `busy` is held while it
/// runs.
pub async fn probe(
    busy: &Arc<AtomicBool>,
    timeout: Duration,
    f: impl FnOnce() -> bool + Send + 'static,
) -> bool {
    if busy.swap(true, Ordering::AcqRel) {
        return false;
    }
    let flag = busy.clone();
    let task = tokio::task::spawn_blocking(move || {
        let ok = f();
        flag.store(false, Ordering::Release);
        ok
    });
    matches!(tokio::time::timeout(timeout, task).await, Ok(Ok(true)))
}

impl Probes {
    /// Probes of `center`'s card and database, each bounded by `timeout`.
    pub fn new(center: Arc<Center>, timeout: Duration) -> Probes {
        Probes {
            center,
            card_busy: Arc::default(),
            db_busy: Arc::default(),
            timeout,
        }
    }

    /// The card answers: a digest tag of a fixed input.
    pub async fn card(&self) -> bool {
        let c = self.center.clone();
        let ok = probe(&self.card_busy, self.timeout, move || {
            let t = Instant::now();
            let r = c.card().digest_tag(b"microcert readiness probe");
            metrics::histogram!("microcert_card_probe_seconds").record(t.elapsed().as_secs_f64());
            if let Err(e) = &r {
                tracing::warn!(error = %e, "the card does not answer");
            }
            r.is_ok()
        })
        .await;
        if !ok {
            metrics::counter!("microcert_card_errors_total").increment(1);
        }
        ok
    }

    /// The database answers: a read of the audit head.
    pub async fn database(&self) -> bool {
        let c = self.center.clone();
        let ok = probe(&self.db_busy, self.timeout, move || {
            let t = Instant::now();
            let r = audit_entries(&c);
            metrics::histogram!("microcert_database_probe_seconds")
                .record(t.elapsed().as_secs_f64());
            match r {
                Ok(n) => {
                    metrics::gauge!("microcert_audit_entries").set(n as f64);
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the database does not answer");
                    false
                }
            }
        })
        .await;
        if !ok {
            metrics::counter!("microcert_database_errors_total").increment(1);
        }
        ok
    }

    /// Readiness: card, database, integrity, shedding.
    pub async fn readiness(&self, limits: &Limits) -> Readiness {
        let (card, database) = tokio::join!(self.card(), self.database());
        let integrity = !status().integrity_failed();
        let not_shedding = !limits.shedder().shedding();
        let ready = card && database && integrity && not_shedding;
        metrics::gauge!("microcert_ready").set(if ready { 1.0 } else { 0.0 });
        Readiness {
            ready,
            card,
            database,
            integrity,
            not_shedding,
        }
    }

    /// Sets the gauges read at a scrape (the database ones through a
    /// bounded probe).
    pub async fn refresh(&self, limits: &Limits) {
        let shed = limits.shedder();
        metrics::gauge!("microcert_center_calls_in_flight").set(shed.in_flight() as f64);
        metrics::gauge!("microcert_center_call_oldest_seconds")
            .set(shed.oldest().map_or(0.0, |d| d.as_secs_f64()));
        metrics::gauge!("microcert_shedding").set(if shed.shedding() { 1.0 } else { 0.0 });
        metrics::gauge!("microcert_seed_cache_devices").set(self.center.cached_devices() as f64);
        let (hits, misses) = self.center.seed_cache_stats();
        metrics::counter!("microcert_seed_cache_hits_total").absolute(hits);
        metrics::counter!("microcert_seed_cache_misses_total").absolute(misses);
        metrics::gauge!("microcert_replay_guard_entries").set(self.center.replay_entries() as f64);
        let s = status();
        let at = s.backup_at.load(Ordering::Relaxed);
        if at != 0 {
            metrics::gauge!("microcert_backup_last_timestamp_seconds").set(at as f64);
            metrics::gauge!("microcert_backup_last_age_seconds")
                .set(now().saturating_sub(at) as f64);
            metrics::gauge!("microcert_backup_last_size_bytes")
                .set(s.backup_size.load(Ordering::Relaxed) as f64);
        }
        let c = self.center.clone();
        let _ = probe(&self.db_busy, self.timeout, move || {
            let alarm = c.clock_alarm();
            if let Ok(a) = &alarm {
                metrics::gauge!("microcert_clock_step_alarm").set(if a.is_some() {
                    1.0
                } else {
                    0.0
                });
            }
            alarm.is_ok()
        })
        .await;
        self.readiness(limits).await;
    }
}

/// Entries in the audit chain (its head's count; 0 before the first).
pub fn audit_entries(center: &Center) -> microcert_center::Result<u64> {
    let mut n = 0;
    center.database().read_transaction(&mut |tx| {
        n = tx
            .digest_shard(microcert_center::audit::AUDIT_HEAD_SHARD)?
            .map_or(0, |s| s.count);
        Ok(())
    })?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_probe_that_hangs_fails_in_time_and_is_not_stacked() {
        let busy = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = Instant::now();
        let ok = probe(&busy, Duration::from_millis(100), move || {
            let _ = rx.recv();
            true
        })
        .await;
        assert!(!ok);
        assert!(t.elapsed() < Duration::from_secs(2));
        // The hung probe still runs: a second one fails at once.
        let t = Instant::now();
        assert!(!probe(&busy, Duration::from_secs(5), || true).await);
        assert!(t.elapsed() < Duration::from_millis(500));
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(5);
        while busy.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(probe(&busy, Duration::from_secs(5), || true).await);
    }

    #[test]
    fn request_ids_are_unique() {
        let a = request_id();
        let b = request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 21);
    }
}
