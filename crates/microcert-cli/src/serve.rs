//! `microcert serve`: one center process over a data directory, serving
//! devices over CoAP and HTTP and operators over HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use microcert_center::{Center, CenterConfig};
use microcert_server::api::DeviceService;
use microcert_server::http::{HttpState, device_routes};
use microcert_server::operator::{self, OperatorState};
use microcert_server::run::{Listeners, serve_limited, shutdown_on_signals};
use microcert_server::service::{CenterService, now};
use microcert_server::tokens::TokenStore;

use crate::binding::Access;
use crate::config::{ConfigArgs, Open, Resolved};

/// Arguments of `serve`; each may also come from the environment or the
/// configuration file (see [`crate::config`]).
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// HTTP listen address (devices, relying parties, operators).
    #[arg(long, env = "MICROCERT_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// CoAP (UDP) listen address (devices).
    #[arg(long, env = "MICROCERT_COAP", value_name = "ADDR")]
    pub coap: Option<SocketAddr>,
    /// A first try: make the card with a throw-away passphrase kept in the
    /// data directory. Never for real keys.
    #[arg(long)]
    pub dev: bool,
}

/// Holds the data directory's `serve.lock` for the life of the process,
/// so a second `serve` cannot open the same SQLite database (its replay
/// records and caches assume one process per file). Centers sharing a
/// PostgreSQL database need no such lock.
fn lock_data_dir(r: &Resolved) -> anyhow::Result<std::fs::File> {
    r.create_data_dir()?;
    let path = r.data_dir.join("serve.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another `microcert serve` is using {} (it holds {}); one process per SQLite \
             database: for several centers use --database postgres://...",
            r.data_dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Sets up structured logs: `RUST_LOG` filters, `MICROCERT_LOG=json` for JSON.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::env::var("MICROCERT_LOG").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logs();
    let r = args.cfg.resolve()?;
    let file = &r.file;
    let http = args
        .http
        .or(file.http)
        .unwrap_or_else(|| "127.0.0.1:8080".parse().expect("literal address"));
    let coap = args
        .coap
        .or(file.coap)
        .unwrap_or_else(|| "127.0.0.1:5683".parse().expect("literal address"));
    let mut config = CenterConfig::default();
    if let Some(g) = file.grace_period_secs {
        config.grace_period = g;
    }
    if let Some(c) = file.cache_capacity {
        config.cache_capacity = c;
    }
    if let Some(t) = file.cache_ttl_secs {
        config.cache_ttl_secs = t;
    }
    // Kept until the process ends: the lock goes with the file handle.
    let _lock = if r.database.is_postgres() {
        None
    } else {
        Some(lock_data_dir(&r)?)
    };
    let center = r.open_center(Open {
        access: Access::Write,
        create_db: true,
        create_card: true,
        dev: args.dev,
        center: config,
    })?;
    if let Some(f) = center.rolled_back() {
        bail!("refusing to serve: {f}");
    }
    // Tokens live in the key database (issue 14); a legacy tokens.json of
    // this data directory moves there at the first start.
    microcert_server::tokens::migrate_file(&center, &r.data_dir)?;
    let tokens = Arc::new(TokenStore::new(center.clone()));
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok();
    let workers = file
        .coap_workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() * 2));
    let housekeeping = Duration::from_secs(file.housekeeping_secs.unwrap_or(60).max(1));
    let integrity = Duration::from_secs(file.integrity_secs.unwrap_or(600).max(1));
    let backup_keep = file.backup_keep.unwrap_or(10).max(1);
    let maint = Arc::new(crate::maint::ServeMaintenance::new(
        &r.data_dir,
        file.backup_interval_secs.unwrap_or(300),
        backup_keep,
    ));
    let maintenance = Some(operator::MaintenancePaths {
        backups: r.backup_dir(),
        keep: backup_keep,
        anchor: r.anchor_file(),
    });

    let tls = match (&file.tls_cert, &file.tls_key) {
        (Some(cert), Some(key)) => Some(microcert_server::tls::acceptor(cert, key)?),
        (None, None) => None,
        _ => bail!("TLS needs both tls_cert and tls_key in the configuration"),
    };
    let tls_on = tls.is_some();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listeners = Listeners::bind(http, coap).await?;
        let (h, c) = listeners.addrs()?;
        let svc: Arc<dyn DeviceService> = Arc::new(CenterService::new(center.clone()));
        let limits = Arc::new(microcert_server::limits::Limits::new(file.limits.clone()));
        let router = device_routes(HttpState {
            svc: svc.clone(),
            tokens: tokens.clone(),
            limits: limits.clone(),
        })
        .merge(operator::routes(OperatorState {
            center: center.clone(),
            tokens,
            metrics,
            maintenance,
        }));
        let shutdown = shutdown_on_signals();
        spawn_periodic(center, maint, housekeeping, integrity, shutdown.clone());
        tracing::info!(http = %h, coap = %c, data = %r.data_dir.display(), database = %r.database.shown(), "microcert center serving");
        let scheme = if tls_on { "https" } else { "http" };
        say!("microcert serving {scheme}={h} coap={c}");
        serve_limited(listeners, router, svc, limits, workers, tls, shutdown).await?;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

/// Housekeeping (prune replay records, deactivate expired seeds), the
/// automatic backup when one is due (checked every minute, debounced by the
/// backup interval), and the periodic integrity check, until shutdown.
fn spawn_periodic(
    center: Arc<Center>,
    maint: Arc<crate::maint::ServeMaintenance>,
    housekeeping: Duration,
    integrity: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut hk = tokio::time::interval(housekeeping);
        let mut ic = tokio::time::interval(integrity);
        let mut bk = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = hk.tick() => {
                    let c = center.clone();
                    match tokio::task::spawn_blocking(move || c.housekeeping(now())).await {
                        Ok(Ok(r)) if r.pruned + r.deactivated > 0 => tracing::info!(pruned = r.pruned, deactivated = r.deactivated, "housekeeping"),
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "housekeeping failed"),
                        Err(e) => tracing::error!(error = %e, "housekeeping task failed"),
                    }
                }
                _ = bk.tick() => {
                    let (c, m) = (center.clone(), maint.clone());
                    if let Err(e) = tokio::task::spawn_blocking(move || m.backup(&c)).await {
                        tracing::error!(error = %e, "backup task failed");
                    }
                }
                _ = ic.tick() => {
                    let (c, m) = (center.clone(), maint.clone());
                    if let Err(e) = tokio::task::spawn_blocking(move || m.integrity(&c)).await {
                        tracing::error!(error = %e, "integrity task failed");
                    }
                }
                _ = stop.changed() => break,
            }
        }
    });
}
