//! The assembled server: one [`App`] per center process, built from an open
//! [`Center`], its token store and [`Settings`], serving the device routes
//! (HTTP and CoAP, one budget of [`Limits`]), the operator routes and
//! `/metrics`, over TLS when configured, with the periodic work (the
//! [`Scheduler`]: housekeeping, automatic backups, integrity checks)
//! running beside it until shutdown.
//!
//! A front end resolves its configuration into [`Settings`], binds the
//! [`Listeners`] (so it can print the addresses) and calls [`App::run`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::StatusCode;
use axum::response::Response;
use microcert_center::{AutoBackup, Center};
use tokio::sync::watch;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower_http::timeout::TimeoutLayer;

use crate::api::DeviceService;
use crate::http::{HttpState, device_only_routes, relying_party_routes};
use crate::limits::{Limits, LimitsConfig};
use crate::observe::Probes;
use crate::operator::{self, Health, MaintenancePaths, OperatorState};
use crate::run::{CoapSetup, Listeners, serve_split};
use crate::service::{CenterService, now};
use crate::tokens::TokenStore;

/// Everything about serving that is not the center itself.
#[derive(Debug, Clone)]
pub struct Settings {
    /// CoAP worker tasks.
    pub coap_workers: usize,
    /// Rate limits and CoAP bounds (shared by HTTP and CoAP).
    pub limits: LimitsConfig,
    /// PEM certificate chain and private key: HTTP over TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The periodic work.
    pub schedule: Schedule,
    /// One `microcert::access` log line per HTTP request (method, route,
    /// status, milliseconds).
    pub access_log: bool,
}

/// The periodic work's settings.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Between housekeeping runs (prune replay records, deactivate
    /// expired seeds).
    pub housekeeping: Duration,
    /// Between integrity checks.
    pub integrity: Duration,
    /// Seconds between automatic backups after a change.
    pub backup_interval_secs: u64,
    /// Backups kept (older ones are deleted).
    pub backup_keep: usize,
    /// Where backups go.
    pub backup_dir: PathBuf,
    /// The card's anchor file.
    pub anchor: PathBuf,
    /// The leader lease's period (issue 14): of the centers sharing one
    /// database, only the lease holder runs housekeeping, backups and the
    /// integrity check; it renews every third of this, and another center
    /// takes over this long after it stopped renewing.
    pub lease: Duration,
}

impl Schedule {
    /// The defaults for a data directory: housekeeping every minute,
    /// integrity every 10 minutes, backups into DATA/backups at most every
    /// 5 minutes after a change, the newest 10 kept, anchor
    /// DATA/center.anchor.
    pub fn for_data_dir(dir: &std::path::Path) -> Schedule {
        Schedule {
            housekeeping: Duration::from_secs(60),
            integrity: Duration::from_secs(600),
            backup_interval_secs: 300,
            backup_keep: 10,
            backup_dir: dir.join("backups"),
            anchor: dir.join("center.anchor"),
            lease: Duration::from_secs(15),
        }
    }
}

/// The name of the periodic jobs' lease in the key database.
pub const LEASE_NAME: &str = "periodic-jobs";

/// A center process's server.
pub struct App {
    center: Arc<Center>,
    tokens: Arc<TokenStore>,
    settings: Settings,
    tls: Option<tokio_rustls::TlsAcceptor>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("settings", &self.settings)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl App {
    /// Loads the TLS files (if any) and installs the process's metrics
    /// recorder (once per process; later Apps share it).
    pub fn new(
        center: Arc<Center>,
        tokens: Arc<TokenStore>,
        settings: Settings,
    ) -> std::io::Result<App> {
        let tls = match &settings.tls {
            Some((cert, key)) => Some(crate::tls::acceptor(cert, key)?),
            None => None,
        };
        let metrics = crate::observe::install();
        Ok(App {
            center,
            tokens,
            settings,
            tls,
            metrics,
        })
    }

    /// Whether HTTP is served over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The HTTP routers and the device service and limits CoAP shares
    /// with them: with `split`, one for the device listener (the device
    /// routes) and one for the operator listener (relying parties,
    /// operators, `/metrics`, `/healthz`, `/readyz`); without, one router
    /// with everything. The device and relying-party routes have the
    /// request timeout (408), the operator routes a timeout on reading
    /// their bodies (the streamed import none); each router has the
    /// concurrency limit (503 with Retry-After
    /// beyond), request ids, latency histograms and the optional access log.
    fn assemble(
        &self,
        split: bool,
    ) -> (Router, Option<Router>, Arc<dyn DeviceService>, Arc<Limits>) {
        let svc: Arc<dyn DeviceService> = Arc::new(CenterService::new(self.center.clone()));
        let limits = Arc::new(Limits::new(self.settings.limits.clone()));
        let s = &self.settings.schedule;
        let http_state = HttpState {
            svc: svc.clone(),
            tokens: self.tokens.clone(),
            limits: limits.clone(),
        };
        let probes = Arc::new(Probes::new(self.center.clone(), PROBE_TIMEOUT));
        let (operator_bounded, import) = operator::route_parts(OperatorState {
            center: self.center.clone(),
            tokens: self.tokens.clone(),
            metrics: self.metrics.clone(),
            maintenance: Some(MaintenancePaths {
                backups: s.backup_dir.clone(),
                keep: s.backup_keep,
                anchor: s.anchor.clone(),
            }),
            health: Some(Health {
                probes,
                limits: limits.clone(),
            }),
        });
        let cfg = &self.settings.limits;
        let timeout = TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(cfg.http_request_timeout_secs.max(1)),
        );
        // Operator requests may run long (an integrity check or a backup
        // of a large fleet): only the reading of their bodies is bounded
        // in time.
        let operator_bounded = operator_bounded.layer(axum::middleware::from_fn_with_state(
            Duration::from_secs(cfg.http_request_timeout_secs.max(1)),
            body_timeout,
        ));
        let devices = device_only_routes(http_state.clone()).layer(timeout);
        let others = relying_party_routes(http_state)
            .layer(timeout)
            .merge(operator_bounded)
            .merge(import);
        let finish = |r: Router| {
            r.layer(
                ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(overloaded))
                    .layer(LoadShedLayer::new())
                    .layer(GlobalConcurrencyLimitLayer::new(
                        cfg.http_max_in_flight.max(1),
                    )),
            )
            .layer(axum::middleware::from_fn_with_state(
                self.settings.access_log,
                crate::observe::http_middleware,
            ))
        };
        if split {
            (finish(devices), Some(finish(others)), svc, limits)
        } else {
            (finish(devices.merge(others)), None, svc, limits)
        }
    }

    /// Serves on `listeners` and runs the [`Scheduler`] until `shutdown`
    /// turns true, finishing the requests in flight. Call inside a tokio
    /// runtime.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let (device_router, operator_router, svc, limits) =
            self.assemble(listeners.operator.is_some());
        crate::observe::status().scan_backups(&self.settings.schedule.backup_dir);
        Scheduler::new(self.center.clone(), &self.settings.schedule).spawn(shutdown.clone());
        let tokens = self.tokens.clone();
        let coap = CoapSetup {
            svc,
            limits,
            workers: self.settings.coap_workers,
        };
        let served = serve_split(
            listeners,
            (device_router, operator_router),
            coap,
            self.tls,
            shutdown,
        )
        .await;
        // The failed authentications of the last window are audited
        // before the process ends.
        let _ = tokio::task::spawn_blocking(move || {
            let last = tokens.closed_failures(None);
            tokens.write_failures(&last);
        })
        .await;
        served
    }
}

/// Reads an operator request's body (at most
/// [`operator::MAX_OPERATOR_BODY`] bytes) within `d`, before the handler
/// runs: a client that trickles a body is answered 408 when `d` is up,
/// however steadily it trickles; a larger body is 413.
async fn body_timeout(
    axum::extract::State(d): axum::extract::State<Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::response::IntoResponse;
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, operator::MAX_OPERATOR_BODY);
    let bytes = match tokio::time::timeout(d, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => return StatusCode::PAYLOAD_TOO_LARGE.into_response(),
        Err(_) => return StatusCode::REQUEST_TIMEOUT.into_response(),
    };
    let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
    next.run(req).await
}

/// How long a readiness probe of the card or the database may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The answer to a request beyond the HTTP concurrency limit.
async fn overloaded(_: tower::BoxError) -> Response {
    metrics::counter!("microcert_shed_total", "reason" => "http-concurrency").increment(1);
    crate::http::unavailable(1)
}

/// One periodic job of the [`Scheduler`].
type Job = fn(&Scheduler);

/// The periodic work of a serving center: housekeeping, the automatic
/// backup when one is due (checked every minute, debounced by the backup
/// interval) and the integrity check with the card's anchor, each from
/// `spawn_blocking`, every outcome logged. Of several centers on one
/// database only the holder of the leader lease runs the backup and the
/// integrity check (issue 14: N centers do not run N full scans); the
/// others take the lease when it lapses. Housekeeping runs on every
/// center (its clock watch is per host).
#[derive(Debug)]
pub struct Scheduler {
    center: Arc<Center>,
    housekeeping: Duration,
    integrity: Duration,
    anchor: PathBuf,
    auto: AutoBackup,
    lease: Duration,
    /// None when the lease cannot be made (then every job runs here).
    leader: Option<microcert_center::keyring::Leader>,
}

impl Scheduler {
    /// For `center` with `schedule` (intervals of zero count as one second).
    pub fn new(center: Arc<Center>, schedule: &Schedule) -> Scheduler {
        let lease = schedule.lease.max(Duration::from_secs(1));
        let leader = match center.leader(LEASE_NAME, lease) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "no leader lease: this center runs every periodic job");
                None
            }
        };
        Scheduler {
            lease,
            leader,
            center,
            housekeeping: schedule.housekeeping.max(Duration::from_secs(1)),
            integrity: schedule.integrity.max(Duration::from_secs(1)),
            anchor: schedule.anchor.clone(),
            auto: AutoBackup::new(
                schedule.backup_dir.clone(),
                schedule.backup_interval_secs,
                schedule.backup_keep.max(1),
                Some(schedule.anchor.clone()),
            ),
        }
    }

    /// One housekeeping run.
    pub fn housekeeping(&self) {
        match self.center.housekeeping(now()) {
            Ok(r) if r.pruned + r.deactivated > 0 => {
                tracing::info!(
                    pruned = r.pruned,
                    deactivated = r.deactivated,
                    "housekeeping"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "housekeeping failed"),
        }
    }

    /// The integrity check (with the anchor); logs every finding.
    pub fn integrity(&self) {
        let r = self.center.integrity_check(Some(&self.anchor), now());
        if let Ok(r) = &r {
            crate::observe::status().integrity_done(now(), r.is_clean());
        }
        match r {
            Ok(r) if r.is_clean() => {
                tracing::info!(records = r.records, "integrity check clean")
            }
            Ok(r) => tracing::error!(
                records = r.records,
                quarantined = ?r.tampered_devices(),
                findings = ?r.findings(),
                "INTEGRITY CHECK FAILED: the key database was changed outside the center; run `microcert integrity repair`"
            ),
            Err(e) => tracing::error!(error = %e, "integrity check could not run"),
        }
    }

    /// An automatic backup when one is due (debounced).
    pub fn backup(&self) {
        match self.auto.tick(&self.center, now()) {
            Ok(Some(s)) => {
                let size = std::fs::metadata(&s.path).map_or(0, |m| m.len());
                crate::observe::status().backup_done(s.created, size);
                tracing::info!(path = %s.path.display(), seeds = s.seeds, "automatic backup")
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "automatic backup failed"),
        }
    }

    /// Takes or renews the leader lease; whether this center runs the
    /// periodic jobs now. A database that cannot be reached: not the
    /// leader (another center may be).
    pub fn poll_leader(&self) -> bool {
        let Some(l) = &self.leader else { return true };
        match l.poll(microcert_center::keyring::now_ms()) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "leader lease not renewed: periodic jobs paused here");
                false
            }
        }
    }

    /// Whether this center held the lease at its last renewal.
    pub fn is_leader(&self) -> bool {
        self.leader.as_ref().is_none_or(|l| l.is_leader())
    }

    /// Runs the periodic work on the current tokio runtime until `stop`
    /// changes; the backup and the integrity check only while this center
    /// holds the leader lease
    /// (renewed every third of its period), which it gives up at the end.
    pub fn spawn(self, mut stop: watch::Receiver<bool>) {
        let this = Arc::new(self);
        tokio::spawn(async move {
            let mut hk = tokio::time::interval(this.housekeeping);
            let mut ic = tokio::time::interval(this.integrity);
            let mut bk = tokio::time::interval(Duration::from_secs(60));
            let mut ld = tokio::time::interval(this.lease / 3);
            loop {
                // (job, whether only the leader runs it). Housekeeping runs
                // on every center: its clock watch is per host (a step on
                // any center must be seen), its replay pruning covers this
                // process's in-memory guard, and its changes are decided
                // by the policy in one transaction each, so two centers
                // running it at once change nothing twice. The backup and
                // the integrity scan, which read the whole database, run
                // on the leader alone.
                let job: Option<(Job, bool)> = tokio::select! {
                    biased;
                    _ = stop.changed() => break,
                    _ = ld.tick() => None,
                    _ = hk.tick() => Some((Scheduler::housekeeping, false)),
                    _ = bk.tick() => Some((Scheduler::backup, true)),
                    _ = ic.tick() => Some((Scheduler::integrity, true)),
                };
                let s = this.clone();
                let run = move || {
                    // The lease is renewed on its tick and checked again
                    // right before a job (this center may have stalled
                    // past its expiry).
                    let leads = s.poll_leader();
                    if let Some((job, leader_only)) = job
                        && (leads || !leader_only)
                    {
                        job(&s);
                    }
                };
                if let Err(e) = tokio::task::spawn_blocking(run).await {
                    tracing::error!(error = %e, "periodic task failed");
                }
            }
            let s = this.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(l) = &s.leader
                    && let Err(e) = l.release()
                {
                    tracing::warn!(error = %e, "leader lease not released");
                }
            })
            .await;
        });
    }
}
