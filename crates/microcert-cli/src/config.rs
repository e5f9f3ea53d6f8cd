//! One configuration for every command (issue 14): where the data
//! directory, the key database and the card are, and how the card is
//! unlocked, resolved the same way for `serve` and for every local command
//! (factory, backup, integrity, audit, card, token), so they all see the
//! database `serve` sees.
//!
//! Precedence, for each setting: a flag, then the environment
//! (`MICROCERT_*`), then the configuration file (`--config FILE` or
//! `MICROCERT_CONFIG`), then the default.
//!
//! | setting | flag | environment | file key | default |
//! |---|---|---|---|---|
//! | configuration file | `--config` | `MICROCERT_CONFIG` | | none |
//! | data directory | `--data` | `MICROCERT_DATA` | `data` | `./microcert-data` |
//! | key database | `--database` | `MICROCERT_DATABASE` | `database` | `DATA/center.db` |
//! | card | | | `[pkcs11]` | the software card `DATA/card.mccard` |
//! | passphrase | `--passphrase-file` | `MICROCERT_PASSPHRASE` | `passphrase_file` | none |
//!
//! Opening the center also checks that the database is the one the card
//! was last used with ([`crate::binding`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use microcert_center::{Center, CenterConfig, EncryptionCard, KdfParams, SoftwareCard};
use microcert_pkcs11::{Pkcs11Card, Pkcs11Config};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::binding::{self, Access};

/// The default data directory.
pub const DEFAULT_DATA: &str = "./microcert-data";

/// Where the configuration comes from: the same flags on every command
/// that touches the data directory, the key database or the card.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// The TOML configuration file `serve` uses (keys: data, database,
    /// passphrase_file, [pkcs11], and serve's own). Environment:
    /// MICROCERT_CONFIG.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The data directory. Environment: MICROCERT_DATA; file: `data`;
    /// default ./microcert-data.
    #[arg(long = "data", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// The key database: `postgres://user@host:port/db` for PostgreSQL
    /// (several centers may share it), or the path of an SQLite file.
    /// Environment: MICROCERT_DATABASE; file: `database`; default
    /// center.db in the data directory.
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
    /// A file whose first line is the card's passphrase. Environment:
    /// MICROCERT_PASSPHRASE (the passphrase itself); file:
    /// `passphrase_file`.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The data directory (see `--data`).
    pub data: Option<PathBuf>,
    /// The key database (see `--database`).
    pub database: Option<String>,
    /// A file whose first line is the software card's passphrase.
    pub passphrase_file: Option<PathBuf>,
    /// A PKCS#11 token as the encryption card instead of the software card.
    pub pkcs11: Option<Pkcs11Config>,
    /// serve: HTTP listen address.
    pub http: Option<SocketAddr>,
    /// serve: CoAP listen address.
    pub coap: Option<SocketAddr>,
    /// serve: CoAP worker tasks.
    pub coap_workers: Option<usize>,
    /// serve: seconds between housekeeping runs.
    pub housekeeping_secs: Option<u64>,
    /// serve: seconds between integrity checks.
    pub integrity_secs: Option<u64>,
    /// Seconds between automatic backups after a change (default 300).
    pub backup_interval_secs: Option<u64>,
    /// Backups kept in DATA/backups (default 10).
    pub backup_keep: Option<usize>,
    /// serve: grace period of a replaced seed.
    pub grace_period_secs: Option<u64>,
    /// serve: seed cache capacity.
    pub cache_capacity: Option<usize>,
    /// serve: seed cache TTL.
    pub cache_ttl_secs: Option<u64>,
    /// PEM certificate chain: serve HTTP over TLS (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// serve: `[limits]`, rate limits and CoAP bounds
    /// (`microcert_server::limits`).
    #[serde(default)]
    pub limits: microcert_server::limits::LimitsConfig,
}

/// Reads a configuration file.
pub fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read configuration {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid configuration {}", path.display()))
}

/// Where a resolved setting came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag.
    Flag(&'static str),
    /// An environment variable.
    Env(&'static str),
    /// A key of the configuration file.
    File(&'static str, PathBuf),
    /// The default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(n) => write!(f, "from {n}"),
            Source::Env(n) => write!(f, "from {n}"),
            Source::File(k, p) => write!(f, "from `{k}` in {}", p.display()),
            Source::Default => write!(f, "the default"),
        }
    }
}

/// The key database's location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL or key/value connection string.
    Postgres(String),
}

impl Location {
    fn parse(s: &str) -> Location {
        if microcert_center::db::is_postgres_url(s) || looks_like_keyvalue(s) {
            Location::Postgres(s.to_owned())
        } else {
            Location::Sqlite(PathBuf::from(s))
        }
    }

    /// Whether several processes may share it.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Location::Postgres(_))
    }

    /// The location for messages and records: an absolute SQLite path, or
    /// the URL without its password.
    pub fn shown(&self) -> String {
        match self {
            Location::Sqlite(p) => normalize(p).display().to_string(),
            Location::Postgres(u) => redact_url(u),
        }
    }
}

/// An absolute path, its directory's symbolic links and `..` resolved
/// when it exists, so two spellings of one file compare equal.
fn normalize(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => dir
            .canonicalize()
            .map(|d| d.join(name))
            .unwrap_or(abs.clone()),
        _ => abs,
    }
}

/// A `host=... dbname=...` connection string (PostgreSQL's key/value form).
fn looks_like_keyvalue(s: &str) -> bool {
    let s = s.trim_start();
    ["host=", "hostaddr=", "dbname=", "user=", "port="]
        .iter()
        .any(|k| s.starts_with(k))
        && s.contains(' ')
}

/// The URL with any password replaced (also `password=` in key/value form).
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.rsplit_once('@') {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|w| {
            if w.starts_with("password=") {
                "password=***"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The configuration every command resolved to.
#[derive(Debug)]
pub struct Resolved {
    /// The configuration file, if any.
    pub config_file: Option<PathBuf>,
    /// Its contents (defaults when there is none).
    pub file: FileConfig,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Where `data_dir` came from.
    pub data_source: Source,
    /// The key database.
    pub database: Location,
    /// Where `database` came from.
    pub database_source: Source,
    passphrase_file: Option<PathBuf>,
    passphrase_env: bool,
}

/// How a command opens the center.
#[derive(Debug, Clone)]
pub struct Open {
    /// What it will do to the database (decides the binding check).
    pub access: Access,
    /// Whether a missing SQLite database is made (serve, factory
    /// provision, backup restore); maintenance commands never make one.
    pub create_db: bool,
    /// Whether a missing software card is made (serve, factory provision).
    pub create_card: bool,
    /// serve --dev: a throw-away passphrase kept in the data directory.
    pub dev: bool,
    /// The center's configuration.
    pub center: CenterConfig,
}

impl Open {
    /// A maintenance command: nothing is made, replay records stay in the
    /// database (so nothing competes with a serving process).
    pub fn maintenance(access: Access) -> Open {
        Open {
            access,
            create_db: false,
            create_card: false,
            dev: false,
            center: CenterConfig {
                replay: microcert_center::ReplayMode::Database,
                ..CenterConfig::default()
            },
        }
    }
}

impl ConfigArgs {
    /// Resolves flags, environment, file and defaults (see the module docs).
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        let config_file = self
            .config
            .clone()
            .or_else(|| env_nonempty("MICROCERT_CONFIG").map(PathBuf::from));
        let file = match &config_file {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let from_file = |key| Source::File(key, config_file.clone().unwrap_or_default());
        let (data_dir, data_source) = if let Some(d) = &self.data {
            (d.clone(), Source::Flag("--data"))
        } else if let Some(d) = env_nonempty("MICROCERT_DATA") {
            (PathBuf::from(d), Source::Env("MICROCERT_DATA"))
        } else if let Some(d) = &file.data {
            (d.clone(), from_file("data"))
        } else {
            (PathBuf::from(DEFAULT_DATA), Source::Default)
        };
        let (database, database_source) =
            if let Some(d) = self.database.as_deref().filter(|d| !d.is_empty()) {
                (Location::parse(d), Source::Flag("--database"))
            } else if let Some(d) = env_nonempty("MICROCERT_DATABASE") {
                (Location::parse(&d), Source::Env("MICROCERT_DATABASE"))
            } else if let Some(d) = file.database.as_deref().filter(|d| !d.is_empty()) {
                (Location::parse(d), from_file("database"))
            } else {
                (
                    Location::Sqlite(data_dir.join("center.db")),
                    Source::Default,
                )
            };
        let passphrase_env = env_nonempty("MICROCERT_PASSPHRASE").is_some();
        let passphrase_file = self.passphrase_file.clone().or_else(|| {
            if passphrase_env {
                None
            } else {
                file.passphrase_file.clone()
            }
        });
        Ok(Resolved {
            config_file,
            file,
            data_dir,
            data_source,
            database,
            database_source,
            passphrase_file,
            passphrase_env,
        })
    }
}

const DEV_PASSPHRASE: &str = "dev-passphrase";

impl Resolved {
    /// The software card's file.
    pub fn card_file(&self) -> PathBuf {
        self.data_dir.join("card.mccard")
    }

    /// The PKCS#11 token configured as the card, if any.
    pub fn pkcs11(&self) -> Option<&Pkcs11Config> {
        self.file.pkcs11.as_ref()
    }

    /// The card, for messages.
    pub fn card_shown(&self) -> String {
        match self.pkcs11() {
            Some(p) => format!("PKCS#11 token {:?}", p.token_label),
            None => format!("card file {}", self.card_file().display()),
        }
    }

    /// Refuses when the configured card is a PKCS#11 token: for commands
    /// that work on the software card file only.
    pub fn require_software_card(&self, what: &str) -> anyhow::Result<()> {
        if let Some(p) = self.pkcs11() {
            bail!(
                "{what} works on a software card file, but the configuration {} names the PKCS#11 token {:?} as the card",
                self.config_file
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                p.token_label
            );
        }
        Ok(())
    }

    /// The data directory's binding record (see [`crate::binding`]).
    pub fn binding_file(&self) -> PathBuf {
        self.data_dir.join("database.binding")
    }

    /// The default backup directory.
    pub fn backup_dir(&self) -> PathBuf {
        self.data_dir.join("backups")
    }

    /// The card's anchor (see `microcert_center::anchor`).
    pub fn anchor_file(&self) -> PathBuf {
        self.data_dir.join("center.anchor")
    }

    /// The database and where it was configured, for messages.
    pub fn database_shown(&self) -> String {
        format!("{} ({})", self.database.shown(), self.database_source)
    }

    /// Creates the data directory (mode 0700) if it does not exist.
    pub fn create_data_dir(&self) -> anyhow::Result<()> {
        crate::datadir::create_private_dir(&self.data_dir)
    }

    /// The passphrase: `--passphrase-file`, then MICROCERT_PASSPHRASE,
    /// then the file's `passphrase_file`.
    pub fn passphrase(&self) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        if let Some(path) = &self.passphrase_file {
            return crate::datadir::first_line_secret(path, "passphrase file");
        }
        if self.passphrase_env
            && let Ok(p) = std::env::var("MICROCERT_PASSPHRASE")
        {
            return Ok(Zeroizing::new(p.into_bytes()));
        }
        bail!(
            "the card's passphrase is needed: set MICROCERT_PASSPHRASE, pass --passphrase-file FILE, or set passphrase_file in the configuration"
        )
    }

    /// The passphrase, or for serve `--dev` a throw-away one made once and
    /// kept beside the card.
    fn passphrase_for(&self, dev: bool) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        if !dev {
            return self.passphrase();
        }
        let file = self.data_dir.join(DEV_PASSPHRASE);
        if !file.exists() {
            if self.card_file().exists() {
                bail!(
                    "--dev: {} has a card that was not made by --dev; unlock it with its passphrase",
                    self.data_dir.display()
                );
            }
            let mut raw = Zeroizing::new([0u8; 24]);
            getrandom::fill(&mut raw[..])
                .map_err(|e| anyhow::anyhow!("OS random generator: {e}"))?;
            let mut hexed = Zeroizing::new([0u8; 48]);
            hex::encode_to_slice(&raw[..], &mut hexed[..])?;
            crate::cert::write_secret_file(&file, &hexed[..])?;
        }
        eprintln!(
            "\n  *** DEVELOPMENT MODE: the card's passphrase is a throw-away kept in {} ***\n  *** anyone who can read the data directory has every key. Never use --dev for real devices. ***\n",
            file.display()
        );
        let text = Zeroizing::new(std::fs::read(&file)?);
        Ok(Zeroizing::new(text.trim_ascii().to_vec()))
    }

    /// Opens the configured card: the PKCS#11 token, or the data
    /// directory's software card (made on first use when `create`).
    pub fn open_card(&self, create: bool, dev: bool) -> anyhow::Result<Arc<dyn EncryptionCard>> {
        if let Some(cfg) = self.pkcs11() {
            return Ok(Arc::new(Pkcs11Card::open(cfg).with_context(|| {
                format!(
                    "cannot open the PKCS#11 card on token {:?}",
                    cfg.token_label
                )
            })?));
        }
        let path = self.card_file();
        if path.exists() {
            let pass = self.passphrase_for(dev)?;
            return Ok(Arc::new(SoftwareCard::open(&path, &pass).with_context(
                || format!("cannot open the card {}", path.display()),
            )?));
        }
        if !create {
            bail!(
                "no card in the data directory {} ({}): there is no {}{}",
                self.data_dir.display(),
                self.data_source,
                path.display(),
                self.config_hint()
            );
        }
        let pass = self.passphrase_for(dev)?;
        self.create_data_dir()?;
        tracing::info!(path = %path.display(), "first start: making the card");
        Ok(Arc::new(
            SoftwareCard::init(&path, &pass, KdfParams::default())
                .context("cannot make the card")?,
        ))
    }

    fn config_hint(&self) -> &'static str {
        if self.config_file.is_none() {
            " (no configuration file was given: pass the one `serve` uses with --config or MICROCERT_CONFIG)"
        } else {
            ""
        }
    }

    /// Opens the card and the center over the resolved database, and
    /// checks (and on first use records) that the database is the one the
    /// card was last used with ([`crate::binding::check`]).
    pub fn open_center(&self, how: Open) -> anyhow::Result<Arc<Center>> {
        if !how.create_db
            && let Location::Sqlite(p) = &self.database
            && !p.exists()
        {
            bail!(
                "no key database at {}{}",
                self.database_shown(),
                self.config_hint()
            );
        }
        if how.create_db {
            self.create_data_dir()?;
        }
        let card = self.open_card(how.create_card, how.dev)?;
        let center = match &self.database {
            Location::Sqlite(p) => Center::open_sqlite(p, card, how.center),
            Location::Postgres(u) => microcert_center::db::PostgresDatabase::open(u)
                .map(|db| Center::new(Arc::new(db), card, how.center)),
        }
        .with_context(|| format!("cannot open the key database {}", self.database_shown()))?;
        binding::check(&center, self, how.access)?;
        // The card's anchor follows every committed change (issue 12).
        center.keep_anchor(&self.anchor_file())?;
        Ok(Arc::new(center))
    }
}
