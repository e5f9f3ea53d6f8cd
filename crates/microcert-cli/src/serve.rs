//! `microcert serve`: one center process over a data directory, serving
//! devices over CoAP and HTTP and operators over HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use microcert_center::CenterConfig;
use microcert_server::app::{App, Schedule, Settings};
use microcert_server::run::{Listeners, shutdown_on_signals};
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
    /// A separate HTTP listener for operators, relying parties and
    /// /metrics; `--http` then serves the device resources only. Without
    /// it, one listener serves everything (as before).
    #[arg(long, env = "MICROCERT_OPERATOR_HTTP", value_name = "ADDR")]
    pub operator_http: Option<SocketAddr>,
    /// Log one line per HTTP request (target microcert::access: method,
    /// route, status, milliseconds, request id).
    #[arg(long, env = "MICROCERT_ACCESS_LOG")]
    pub access_log: bool,
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

/// Sets up structured logs: `RUST_LOG` filters, `MICROCERT_LOG=json` for
/// JSON; colours only when stderr is a terminal (and `NO_COLOR` is unset).
pub fn init_logs() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
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
    let operator_http = args.operator_http.or(file.operator_http);
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
    let mut settings = settings(&r)?;
    settings.access_log = args.access_log || file.access_log.unwrap_or(false);
    let app = App::new(center, tokens, settings)?;
    let tls_on = app.is_tls();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listeners = Listeners::bind_all(http, coap, operator_http).await?;
        let (h, c) = listeners.addrs()?;
        let op = listeners.operator_addr()?;
        let shutdown = shutdown_on_signals();
        let (what, op_what) = match op {
            Some(_) => ("device HTTP", Some("operator HTTP")),
            None => ("HTTP (devices, relying parties, operators)", None),
        };
        for (name, addr) in [(Some(what), Some(h)), (op_what, op)] {
            if let (Some(name), Some(addr)) = (name, addr)
                && let Some(w) = microcert_server::run::plain_http_warning(name, addr, tls_on)
            {
                tracing::warn!("{w}");
                eprintln!("{w}");
            }
        }
        tracing::info!(http = %h, coap = %c, operator_http = ?op, data = %r.data_dir.display(), database = %r.database.shown(), "microcert center serving");
        let scheme = if tls_on { "https" } else { "http" };
        match op {
            Some(o) => say!("microcert serving {scheme}={h} coap={c} operator={o}"),
            None => say!("microcert serving {scheme}={h} coap={c}"),
        }
        // systemd's Type=notify: the card is open, the database checked,
        // every listener bound.
        microcert_server::run::sd_notify("READY=1");
        app.run(listeners, shutdown).await?;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

/// The server's settings from the configuration file (defaults: see
/// `microcert_server::app::Schedule::for_data_dir`).
fn settings(r: &Resolved) -> anyhow::Result<Settings> {
    let file = &r.file;
    let mut schedule = Schedule::for_data_dir(&r.data_dir);
    if let Some(s) = file.housekeeping_secs {
        schedule.housekeeping = Duration::from_secs(s);
    }
    if let Some(s) = file.integrity_secs {
        schedule.integrity = Duration::from_secs(s);
    }
    if let Some(s) = file.backup_interval_secs {
        schedule.backup_interval_secs = s;
    }
    if let Some(k) = file.backup_keep {
        schedule.backup_keep = k.max(1);
    }
    let tls = match (&file.tls_cert, &file.tls_key) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        (None, None) => None,
        _ => bail!("TLS needs both tls_cert and tls_key in the configuration"),
    };
    Ok(Settings {
        coap_workers: file
            .coap_workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() * 2)),
        limits: file.limits.clone(),
        tls,
        schedule,
        access_log: false,
    })
}
