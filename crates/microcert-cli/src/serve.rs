//! `microcert serve`: one center process over a data directory, serving
//! devices over CoAP and HTTP and operators over HTTP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use microcert_center::{Center, CenterConfig, EncryptionCard, KdfParams, SoftwareCard};
use microcert_pkcs11::{Pkcs11Card, Pkcs11Config};
use microcert_server::api::DeviceService;
use microcert_server::http::{HttpState, device_routes};
use microcert_server::operator::{self, OperatorState};
use microcert_server::run::{Listeners, serve_limited, shutdown_on_signals};
use microcert_server::service::{CenterService, now};
use microcert_server::tokens::TokenStore;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::datadir::DataArgs;

/// Arguments of `serve`; each may also come from the configuration file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// A TOML configuration file (keys: http, coap, coap_workers,
    /// housekeeping_secs, integrity_secs, backup_interval_secs, backup_keep,
    /// grace_period_secs, cache_capacity,
    /// cache_ttl_secs, database, and a [limits] table). Flags override it.
    #[arg(long, env = "MICROCERT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
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
    /// The key database: `postgres://user@host:port/db` for PostgreSQL
    /// (several centers may share it), or the path of an SQLite file.
    /// Default: center.db in the data directory.
    #[arg(long, env = "MICROCERT_DATABASE", value_name = "URL")]
    pub database: Option<String>,
}

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// A PKCS#11 token as the encryption card instead of the software card.
    pub pkcs11: Option<Pkcs11Config>,
    http: Option<SocketAddr>,
    coap: Option<SocketAddr>,
    coap_workers: Option<usize>,
    housekeeping_secs: Option<u64>,
    integrity_secs: Option<u64>,
    /// Seconds between automatic backups after a change (default 300).
    backup_interval_secs: Option<u64>,
    /// Backups kept in DATA/backups (default 10).
    backup_keep: Option<usize>,
    grace_period_secs: Option<u64>,
    cache_capacity: Option<usize>,
    cache_ttl_secs: Option<u64>,
    /// The key database (see `--database`).
    database: Option<String>,
    /// PEM certificate chain: serve HTTP over TLS (with `tls_key`).
    tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    tls_key: Option<PathBuf>,
    /// `[limits]`: rate limits and CoAP bounds (microcert_server::limits).
    #[serde(default)]
    limits: microcert_server::limits::LimitsConfig,
}

/// Reads the configuration file, if one is given.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<FileConfig> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read configuration {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid configuration {}", path.display()))
}

const DEV_PASSPHRASE: &str = "dev-passphrase";

/// The passphrase: from the usual places, or for `--dev` a throw-away one
/// made once and kept beside the card.
fn passphrase(data: &DataArgs, dev: bool) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    if !dev {
        return data.passphrase();
    }
    let file = data.dir.join(DEV_PASSPHRASE);
    if !file.exists() {
        if data.card_file().exists() {
            bail!(
                "--dev: {} has a card that was not made by --dev; unlock it with its passphrase",
                data.dir.display()
            );
        }
        let mut raw = Zeroizing::new([0u8; 24]);
        getrandom::fill(&mut raw[..]).map_err(|e| anyhow::anyhow!("OS random generator: {e}"))?;
        crate::cert::write_secret_file(&file, hex::encode(&raw[..]).as_bytes())?;
    }
    eprintln!(
        "\n  *** DEVELOPMENT MODE: the card's passphrase is a throw-away kept in {} ***\n  *** anyone who can read the data directory has every key. Never use --dev for real devices. ***\n",
        file.display()
    );
    let text = Zeroizing::new(std::fs::read(&file)?);
    Ok(Zeroizing::new(text.trim_ascii().to_vec()))
}

/// Opens (or on first start creates) the card and the center. With a
/// PKCS#11 configuration the card is the token, whose keys `card init
/// --pkcs11` made; otherwise the data directory's software card.
pub fn open_center(
    data: &DataArgs,
    dev: bool,
    pkcs11: Option<&Pkcs11Config>,
    config: CenterConfig,
) -> anyhow::Result<Arc<Center>> {
    let database = std::env::var("MICROCERT_DATABASE")
        .ok()
        .filter(|d| !d.is_empty());
    open_center_at(data, dev, pkcs11, config, database.as_deref())
}

/// Like [`open_center`], over the key database `database` (a PostgreSQL
/// URL or an SQLite path; None: the data directory's SQLite file).
pub fn open_center_at(
    data: &DataArgs,
    dev: bool,
    pkcs11: Option<&Pkcs11Config>,
    config: CenterConfig,
    database: Option<&str>,
) -> anyhow::Result<Arc<Center>> {
    data.create()?;
    let card: Arc<dyn EncryptionCard> = match pkcs11 {
        Some(cfg) => Arc::new(Pkcs11Card::open(cfg).with_context(|| {
            format!(
                "cannot open the PKCS#11 card on token {:?}",
                cfg.token_label
            )
        })?),
        None => {
            let pass = passphrase(data, dev)?;
            Arc::new(if data.card_file().exists() {
                SoftwareCard::open(&data.card_file(), &pass).context("cannot open the card")?
            } else {
                tracing::info!(path = %data.card_file().display(), "first start: making the card");
                SoftwareCard::init(&data.card_file(), &pass, KdfParams::default())
                    .context("cannot make the card")?
            })
        }
    };
    let center = match database {
        Some(location) => Center::open_url(location, card, config),
        None => Center::open_sqlite(&data.database(), card, config),
    }
    .context("cannot open the key database")?;
    // The card's anchor follows every committed change (issue 12).
    center.keep_anchor(&crate::maint::anchor_file(&data.dir))?;
    Ok(Arc::new(center))
}

/// Holds the data directory's `serve.lock` for the life of the process,
/// so a second `serve` cannot open the same SQLite database (its replay
/// records and caches assume one process per file). Centers sharing a
/// PostgreSQL database need no such lock.
fn lock_data_dir(data: &DataArgs) -> anyhow::Result<std::fs::File> {
    data.create()?;
    let path = data.dir.join("serve.lock");
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
            data.dir.display(),
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
    let file = load_config(args.config.as_deref())?;
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
    let database = args
        .database
        .clone()
        .filter(|d| !d.is_empty())
        .or(file.database.clone());
    let postgres = database
        .as_deref()
        .is_some_and(microcert_center::db::is_postgres_url);
    // Kept until the process ends: the lock goes with the file handle.
    let _lock = if postgres {
        None
    } else {
        Some(lock_data_dir(&args.data)?)
    };
    let center = open_center_at(
        &args.data,
        args.dev,
        file.pkcs11.as_ref(),
        config,
        database.as_deref(),
    )?;
    if let Some(f) = center.rolled_back() {
        bail!("refusing to serve: {f}");
    }
    let tokens = Arc::new(TokenStore::open(&args.data.dir)?);
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
        &args.data.dir,
        file.backup_interval_secs.unwrap_or(300),
        backup_keep,
    ));
    let maintenance = Some(operator::MaintenancePaths {
        backups: crate::maint::backup_dir(&args.data.dir),
        keep: backup_keep,
        anchor: crate::maint::anchor_file(&args.data.dir),
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
        let limits = Arc::new(microcert_server::limits::Limits::new(file.limits));
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
        tracing::info!(http = %h, coap = %c, data = %args.data.dir.display(), "microcert center serving");
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
