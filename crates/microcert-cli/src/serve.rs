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
use microcert_server::run::{Listeners, serve, shutdown_on_signals};
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
    /// housekeeping_secs, integrity_secs, grace_period_secs, cache_capacity,
    /// cache_ttl_secs). Flags override it.
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
    grace_period_secs: Option<u64>,
    cache_capacity: Option<usize>,
    cache_ttl_secs: Option<u64>,
    /// PEM certificate chain: serve HTTP over TLS (with `tls_key`).
    tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    tls_key: Option<PathBuf>,
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
    let center = Center::open_sqlite(&data.database(), card, config)
        .context("cannot open the key database")?;
    Ok(Arc::new(center))
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
    let center = open_center(&args.data, args.dev, file.pkcs11.as_ref(), config)?;
    let tokens = Arc::new(TokenStore::open(&args.data.dir)?);
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok();
    let workers = file
        .coap_workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() * 2));
    let housekeeping = Duration::from_secs(file.housekeeping_secs.unwrap_or(60).max(1));
    let integrity = Duration::from_secs(file.integrity_secs.unwrap_or(600).max(1));

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
        let router = device_routes(HttpState {
            svc: svc.clone(),
            tokens: tokens.clone(),
        })
        .merge(operator::routes(OperatorState {
            center: center.clone(),
            tokens,
            metrics,
        }));
        let shutdown = shutdown_on_signals();
        spawn_periodic(center, housekeeping, integrity, shutdown.clone());
        tracing::info!(http = %h, coap = %c, data = %args.data.dir.display(), "microcert center serving");
        let scheme = if tls_on { "https" } else { "http" };
        say!("microcert serving {scheme}={h} coap={c}");
        serve(listeners, router, svc, workers, tls, shutdown).await?;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

/// Housekeeping (prune replay records, deactivate expired seeds) and the
/// periodic integrity check, until shutdown.
fn spawn_periodic(
    center: Arc<Center>,
    housekeeping: Duration,
    integrity: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut hk = tokio::time::interval(housekeeping);
        let mut ic = tokio::time::interval(integrity);
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
                _ = ic.tick() => {
                    let c = center.clone();
                    match tokio::task::spawn_blocking(move || c.integrity_scan()).await {
                        Ok(Ok(r)) if r.is_clean() => tracing::info!(records = r.records, "integrity check clean"),
                        Ok(Ok(r)) => tracing::error!(records = r.records, bad_records = ?r.bad_records, bad_shards = ?r.bad_shards, "INTEGRITY CHECK FAILED: the key database was changed outside the center"),
                        Ok(Err(e)) => tracing::error!(error = %e, "integrity check could not run"),
                        Err(e) => tracing::error!(error = %e, "integrity task failed"),
                    }
                }
                _ = stop.changed() => break,
            }
        }
    });
}
