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
//! What is done with the resolved locations (opening the database and the
//! center, the card<->database binding, restore and repair) is
//! `microcert_center::site`; this module parses and maps onto it, and
//! opens the card (the passphrase and the PKCS#11 token are this
//! program's inputs).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
pub use microcert_center::site::{Location, Source};
use microcert_center::site::{OpenOptions, Site};
use microcert_center::{Center, CenterConfig, EncryptionCard};
use microcert_pkcs11::{Pkcs11Card, Pkcs11Config};
use serde::Deserialize;
use zeroize::Zeroizing;

pub use microcert_center::site::Access;

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
    /// serve: a separate HTTP listener for operators, relying parties and
    /// `/metrics` (the `http` listener then serves devices only).
    pub operator_http: Option<SocketAddr>,
    /// serve: one access-log line per HTTP request.
    pub access_log: Option<bool>,
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
    /// `[audit]`: a second audit sink beside the database's audit log.
    #[serde(default)]
    pub audit: AuditConfig,
}

/// `[audit]`: where every audit entry is also recorded (like Vault's
/// audit devices). When a configured sink cannot record an entry, the
/// change is refused (503 on the operator API, an error on the command
/// line) and nothing changes.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// A JSON-lines file (made with mode 0600, appended, fsync'd before
    /// the change commits): one line per entry with its chain hash.
    pub file: Option<PathBuf>,
    /// Also to the local syslog (facility auth), through `syslog_socket`.
    #[serde(default)]
    pub syslog: bool,
    /// The syslog socket (default /dev/log).
    pub syslog_socket: Option<PathBuf>,
}

/// Reads a configuration file.
pub fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read configuration {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid configuration {}", path.display()))
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The configuration every command resolved to: the site (data
/// directory, database; see `microcert_center::site::Site`, reachable
/// through `Deref`) and how the card is unlocked.
#[derive(Debug)]
pub struct Resolved {
    /// The configuration file, if any.
    pub config_file: Option<PathBuf>,
    /// Its contents (defaults when there is none).
    pub file: FileConfig,
    /// Where the data directory and the database are.
    pub site: Site,
    passphrase_file: Option<PathBuf>,
    passphrase_env: bool,
}

impl std::ops::Deref for Resolved {
    type Target = Site;
    fn deref(&self) -> &Site {
        &self.site
    }
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
            center: OpenOptions::maintenance(access).center,
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
        let hint = if config_file.is_none() {
            " (no configuration file was given: pass the one `serve` uses with --config or MICROCERT_CONFIG)"
        } else {
            ""
        };
        let card_shown = match &file.pkcs11 {
            Some(p) => format!("PKCS#11 token {:?}", p.token_label),
            None => format!("card file {}", data_dir.join("card.mccard").display()),
        };
        Ok(Resolved {
            config_file,
            file,
            site: Site {
                data_dir,
                data_source,
                database,
                database_source,
                card_shown,
                hint: hint.to_owned(),
            },
            passphrase_file,
            passphrase_env,
        })
    }
}

const DEV_PASSPHRASE: &str = "dev-passphrase";

impl Resolved {
    /// The PKCS#11 token configured as the card, if any.
    pub fn pkcs11(&self) -> Option<&Pkcs11Config> {
        self.file.pkcs11.as_ref()
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
        Ok(self
            .site
            .software_card(create, || self.passphrase_for(dev))?)
    }

    /// How `how` reads for the site, and the card opener it needs.
    fn site_open(&self, how: &Open) -> OpenOptions {
        OpenOptions {
            access: how.access,
            create_db: how.create_db,
            center: how.center.clone(),
        }
    }

    /// The configured second audit sink (`[audit]`), opened and checked;
    /// None when none is configured.
    pub fn audit_sink(
        &self,
    ) -> anyhow::Result<Option<Arc<dyn microcert_center::audit::AuditSink>>> {
        use microcert_center::audit::{AuditSink, FileSink, Sinks};
        let a = &self.file.audit;
        let mut sinks: Vec<Arc<dyn AuditSink>> = Vec::new();
        if let Some(path) = &a.file {
            sinks.push(Arc::new(FileSink::open(path).with_context(|| {
                format!(
                    "the audit file {} ([audit] file) cannot be written",
                    path.display()
                )
            })?));
        }
        if a.syslog {
            #[cfg(unix)]
            {
                let socket = a
                    .syslog_socket
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/dev/log"));
                sinks.push(Arc::new(
                    microcert_center::audit::SyslogSink::open(&socket).with_context(|| {
                        format!(
                            "the syslog socket {} ([audit] syslog) cannot be reached",
                            socket.display()
                        )
                    })?,
                ));
            }
            #[cfg(not(unix))]
            bail!("[audit] syslog needs a Unix syslog socket");
        }
        Ok(match sinks.len() {
            0 => None,
            1 => sinks.pop(),
            _ => Some(Arc::new(Sinks(sinks))),
        })
    }

    /// Sets the configured audit sink on a center just opened (not for a
    /// read-only command: it appends nothing, and reads on when the sink
    /// is down).
    fn with_sink(&self, center: Arc<Center>, access: Access) -> anyhow::Result<Arc<Center>> {
        if access == Access::ReadOnly {
            return Ok(center);
        }
        if let Some(sink) = self.audit_sink()? {
            center.set_audit_sink(sink)?;
        }
        Ok(center)
    }

    /// Opens the center over the resolved database with a card the caller
    /// already opened (the card commands), as [`Resolved::open_center`].
    pub fn open_center_with(
        &self,
        how: Open,
        card: Arc<dyn EncryptionCard>,
    ) -> anyhow::Result<Arc<Center>> {
        let center = self.site.open(
            self.site_open(&how),
            || Ok::<_, std::io::Error>(card),
            &mut |w| eprintln!("warning: {w}"),
        )?;
        self.with_sink(center, how.access)
    }

    /// Opens the card and the center over the resolved database, and
    /// checks (and on first use records) that the database is the one the
    /// card was last used with (`microcert_center::site::binding`);
    /// prints what that check only warns about.
    pub fn open_center(&self, how: Open) -> anyhow::Result<Arc<Center>> {
        let center = self.site.open(
            self.site_open(&how),
            || self.open_card(how.create_card, how.dev),
            &mut |w| eprintln!("warning: {w}"),
        )?;
        self.with_sink(center, how.access)
    }
}

/// A token's role on the command line (`--role`), mapped onto
/// `microcert_server::tokens::Role` (the server crate knows no clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    /// Everything, including tokens and card operations.
    Admin,
    /// Device life cycle, updates, import, backup, integrity.
    Operator,
    /// Read-only: devices, audit log, integrity status.
    Auditor,
    /// A relying party: `/v1/verify` and `/v1/open` only. Its name is its audience.
    Verifier,
}

impl From<RoleArg> for microcert_server::tokens::Role {
    fn from(r: RoleArg) -> Self {
        use microcert_server::tokens::Role;
        match r {
            RoleArg::Admin => Role::Admin,
            RoleArg::Operator => Role::Operator,
            RoleArg::Auditor => Role::Auditor,
            RoleArg::Verifier => Role::Verifier,
        }
    }
}
