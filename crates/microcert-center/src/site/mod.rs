//! A center's site: its data directory, its key database and its card,
//! and what every front end (the `microcert` command, a test, an embedding
//! program) does with them beyond parsing its own arguments:
//!
//! - [`Location`]: which key database (an SQLite file or a PostgreSQL URL),
//!   shown without its password;
//! - [`Site::open`]: open the database and the center over a card the
//!   caller opens (a software card or a PKCS#11 token), check (and on
//!   first use record) that the database is the one the card was last used
//!   with ([`binding`]), and keep the card's anchor;
//! - [`Site::restore_backup`]: a whole backup restore in one call (read and
//!   verify, restore, record the binding, rebuild the pending commands,
//!   reset the anchor);
//! - [`Site::integrity_repair`]: repair from the backups, including putting
//!   back an SQLite file that is an older copy of itself.
//!
//! The caller resolves *where* things are (flags, environment, files);
//! this module decides *what* happens to them.

pub mod binding;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Center, CenterConfig, EncryptionCard};

pub use binding::Access;

/// A boxed error from the caller (opening the card).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What can go wrong on a site. Display strings are complete sentences for
/// an operator; sources are kept.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// No card file in the data directory, and not asked to make one.
    #[error(
        "no card in the data directory {} ({from}): there is no {}{hint}",
        data_dir.display(),
        path.display()
    )]
    NoCard {
        /// The data directory.
        data_dir: PathBuf,
        /// Where its setting came from.
        from: Source,
        /// The card file looked for.
        path: PathBuf,
        /// How to give another one.
        hint: String,
    },
    /// No key database file, and not asked to make one.
    #[error("no key database at {database}{hint}")]
    NoDatabase {
        /// The configured database, as shown.
        database: String,
        /// How to give another one.
        hint: String,
    },
    /// A restore goes only into a key database that does not exist yet.
    #[error(
        "{database} exists: restore into a key database that does not exist yet (move it aside first)"
    )]
    RestoreTargetExists {
        /// The configured database, as shown.
        database: String,
    },
    /// The key database lost its identity (`database_id` in its meta table).
    #[error("the key database {database} has no identity (its meta table lost `database_id`)")]
    NoDatabaseId {
        /// The configured database, as shown.
        database: String,
    },
    /// The database is not the one the card was last used with.
    #[error(
        "refused: the key database is not the one this card was last used with\n{header}\n{}\n\
         Give this command the configuration `serve` uses (--config, --database, MICROCERT_DATABASE). \
         If the card really moved to this database, record it with `microcert card bind` and the same flags.",
        binding::bullets(problems)
    )]
    OtherDatabase {
        /// The configured database and card, with their ids.
        header: String,
        /// What does not match.
        problems: Vec<String>,
    },
    /// A command that changes what cannot be put back, while the card's
    /// database is not recorded.
    #[error(
        "refused: this command changes what cannot be put back, and which database this card belongs to is not recorded\n{header}\n{}\n\
         Start `microcert serve` with its configuration once, or run `microcert card bind` with the same flags, then run this again.",
        binding::bullets(missing)
    )]
    BindingUnrecorded {
        /// The configured database and card, with their ids.
        header: String,
        /// What is not recorded.
        missing: Vec<String>,
    },
    /// The data directory records another location for the card's database.
    #[error(
        "refused: the data directory {} records that this card's database is {recorded} (id {database_id}), \
         not the configured {configured}. Give the command the configuration `serve` uses, or, to \
         move the card's database to this one, add --rebind",
        data_dir.display()
    )]
    OtherLocation {
        /// The data directory.
        data_dir: PathBuf,
        /// The location it records.
        recorded: String,
        /// The database id it records.
        database_id: String,
        /// The configured location.
        configured: String,
    },
    /// The binding record could not be encoded.
    #[error("cannot encode the binding record: {0}")]
    BindingEncode(#[source] serde_json::Error),
    /// A center call failed; `what` says which step.
    #[error("{what}")]
    Step {
        /// The step.
        what: String,
        /// The center's error.
        #[source]
        source: crate::Error,
    },
    /// The center's error.
    #[error(transparent)]
    Center(#[from] crate::Error),
    /// A file of the data directory.
    #[error("{what}")]
    Io {
        /// Which file and what was done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Opening the card (the caller's error).
    #[error(transparent)]
    Card(BoxError),
}

/// A result of this module.
pub type SiteResult<T> = std::result::Result<T, SiteError>;

fn step(what: impl Into<String>) -> impl FnOnce(crate::Error) -> SiteError {
    let what = what.into();
    move |source| SiteError::Step { what, source }
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
    /// A PostgreSQL URL or key/value string, else an SQLite path.
    pub fn parse(s: &str) -> Location {
        if crate::db::is_postgres_url(s) || looks_like_keyvalue(s) {
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

/// Creates a directory readable by its owner only.
pub fn create_private_dir(dir: &Path) -> SiteResult<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(|source| SiteError::Io {
        what: format!("cannot create directory {}", dir.display()),
        source,
    })
}

/// Replaces `path` atomically with `bytes` (mode 0600): temporary file,
/// fsync, rename.
pub(crate) fn write_private_file_replace(path: &Path, bytes: &[u8]) -> SiteResult<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let io = |what: String| move |source| SiteError::Io { what, source };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(&tmp)
        .map_err(io(format!("cannot create {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(format!("cannot write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("cannot replace {}", path.display())))
}

/// Where a center's things are, as the caller resolved them.
#[derive(Debug, Clone)]
pub struct Site {
    /// The data directory (card file, binding record, anchor, backups).
    pub data_dir: PathBuf,
    /// Where `data_dir` came from.
    pub data_source: Source,
    /// The key database.
    pub database: Location,
    /// Where `database` came from.
    pub database_source: Source,
    /// The card, for messages ("card file ..." or "PKCS#11 token ...").
    pub card_shown: String,
    /// Appended to "not found" messages (e.g. how to name a configuration).
    pub hint: String,
}

/// How a command opens the center.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// What it will do to the database (decides the binding check).
    pub access: Access,
    /// Whether a missing SQLite database is made (serve, factory
    /// provision, backup restore); maintenance commands never make one.
    pub create_db: bool,
    /// The center's configuration.
    pub center: CenterConfig,
}

impl OpenOptions {
    /// A maintenance command: nothing is made, replay records stay in the
    /// database (so nothing competes with a serving process).
    pub fn maintenance(access: Access) -> OpenOptions {
        OpenOptions {
            access,
            create_db: false,
            center: CenterConfig {
                replay: crate::ReplayMode::Database,
                ..CenterConfig::default()
            },
        }
    }
}

/// What [`Site::restore_backup`] did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// Devices restored.
    pub devices: usize,
    /// Seeds restored.
    pub seeds: usize,
    /// Pending commands rebuilt with a fresh counter, t and r.
    pub rebuilt: u64,
    /// What the data directory recorded as the card's database before, when
    /// that changed.
    pub binding_before: Option<String>,
}

/// What [`Site::integrity_repair`] did about a database that is an older
/// copy of itself.
#[derive(Debug, Clone)]
pub enum WholeRestore {
    /// Nothing to do.
    None,
    /// The SQLite file was put back from `from`; the old one kept `aside`.
    Restored {
        /// The backup put back.
        from: PathBuf,
        /// Where the old file went.
        aside: Option<PathBuf>,
    },
    /// Needed but not done in place (PostgreSQL): restore `from` into an
    /// empty database.
    NotInPlace {
        /// The backup to restore.
        from: PathBuf,
    },
}

impl Site {
    /// The software card's file.
    pub fn card_file(&self) -> PathBuf {
        self.data_dir.join("card.mccard")
    }

    /// The data directory's binding record (see [`binding`]).
    pub fn binding_file(&self) -> PathBuf {
        self.data_dir.join("database.binding")
    }

    /// The default backup directory.
    pub fn backup_dir(&self) -> PathBuf {
        self.data_dir.join("backups")
    }

    /// The card's anchor (see [`crate::anchor`]).
    pub fn anchor_file(&self) -> PathBuf {
        self.data_dir.join("center.anchor")
    }

    /// The database and where it was configured, for messages.
    pub fn database_shown(&self) -> String {
        format!("{} ({})", self.database.shown(), self.database_source)
    }

    /// Creates the data directory (mode 0700) if it does not exist.
    pub fn create_data_dir(&self) -> SiteResult<()> {
        create_private_dir(&self.data_dir)
    }

    /// Opens the data directory's software card with the passphrase
    /// `passphrase()` gives (asked for only when needed), or makes it when
    /// it does not exist and `create` (the data directory too).
    pub fn software_card<E: Into<BoxError>>(
        &self,
        create: bool,
        passphrase: impl FnOnce() -> Result<zeroize::Zeroizing<Vec<u8>>, E>,
    ) -> SiteResult<Arc<dyn EncryptionCard>> {
        let path = self.card_file();
        let exists = path.exists();
        if !exists && !create {
            return Err(SiteError::NoCard {
                data_dir: self.data_dir.clone(),
                from: self.data_source.clone(),
                path,
                hint: self.hint.clone(),
            });
        }
        let pass = passphrase().map_err(|e| SiteError::Card(e.into()))?;
        if exists {
            return Ok(Arc::new(crate::SoftwareCard::open(&path, &pass).map_err(
                step(format!("cannot open the card {}", path.display())),
            )?));
        }
        self.create_data_dir()?;
        tracing::info!(path = %path.display(), "first start: making the card");
        Ok(Arc::new(
            crate::SoftwareCard::init(&path, &pass, crate::KdfParams::default())
                .map_err(step("cannot make the card"))?,
        ))
    }

    /// Opens the card (`card()`, the caller's) and the center
    /// over the database, checks (and on first use by a writer records)
    /// that the database is the one the card was last used with, and keeps
    /// the card's anchor following every committed change. What the
    /// binding check only warns about (a read-only command reading a
    /// database that is not the card's, for forensics) goes to `warn`, at
    /// once, so it is said even when opening fails afterwards.
    pub fn open<E: Into<BoxError>>(
        &self,
        how: OpenOptions,
        card: impl FnOnce() -> Result<Arc<dyn EncryptionCard>, E>,
        warn: &mut dyn FnMut(String),
    ) -> SiteResult<Arc<Center>> {
        if !how.create_db
            && let Location::Sqlite(p) = &self.database
            && !p.exists()
        {
            return Err(SiteError::NoDatabase {
                database: self.database_shown(),
                hint: self.hint.clone(),
            });
        }
        if how.create_db {
            self.create_data_dir()?;
        }
        let card = card().map_err(|e| SiteError::Card(e.into()))?;
        self.open_with(how, card, warn)
    }

    fn open_with(
        &self,
        how: OpenOptions,
        card: Arc<dyn EncryptionCard>,
        warn: &mut dyn FnMut(String),
    ) -> SiteResult<Arc<Center>> {
        let center = match &self.database {
            Location::Sqlite(p) => Center::open_sqlite(p, card, how.center),
            // Built without the `postgres` feature: a clear NotConfigured.
            Location::Postgres(u) => Center::open_url(u, card, how.center),
        }
        .map_err(step(format!(
            "cannot open the key database {}",
            self.database_shown()
        )))?;
        for w in binding::check(&center, self, how.access)? {
            warn(w);
        }
        // The keyring (issue 14): read and checked at open, and on the
        // first open the card's own storage keys move into it. Not before
        // a restore (the backup brings its keyring), nor for a read-only
        // command (it writes nothing; the keyring is read when needed).
        if matches!(how.access, Access::Write | Access::Destructive) {
            center
                .sync_keyring()
                .map_err(step("the keyring in the key database cannot be used"))?;
        }
        // The card's anchor follows every committed change (issue 12).
        center.keep_anchor(&self.anchor_file())?;
        Ok(Arc::new(center))
    }

    /// Restores the backup `file` into an empty key database (an SQLite
    /// file must not exist yet), in one call: refuse another location than
    /// the data directory records (unless `rebind`), open the card
    /// (`card()`), verify the backup, restore it, record the binding on
    /// both sides, rebuild the pending commands with a fresh counter, t and
    /// r (PROTOCOL.md 6), and reset the card's anchor to the result.
    pub fn restore_backup<E: Into<BoxError>>(
        &self,
        file: &Path,
        rebind: bool,
        card: impl FnOnce() -> Result<Arc<dyn EncryptionCard>, E>,
        actor: &str,
        now: u64,
    ) -> SiteResult<RestoreReport> {
        if !rebind {
            binding::refuse_other_location(self)?;
        }
        if let Location::Sqlite(db) = &self.database
            && db.exists()
        {
            return Err(SiteError::RestoreTargetExists {
                database: self.database_shown(),
            });
        }
        let access = if rebind {
            Access::Bind
        } else {
            Access::Restore
        };
        // Restore and Bind access never warn.
        let center = self.open(
            OpenOptions {
                create_db: true,
                ..OpenOptions::maintenance(access)
            },
            card,
            &mut |_| {},
        )?;
        let b = crate::backup::read(file, center.card())
            .map_err(step(format!("backup {} does not verify", file.display())))?;
        crate::backup::restore_into(center.database(), center.card(), &b, actor, now)
            .map_err(step("restore failed"))?;
        // The keyring the backup brought, in place of one made at open.
        center
            .sync_keyring()
            .map_err(step("the restored keyring cannot be used"))?;
        // The card's database is now this one (both sides record it).
        let binding_before = binding::record(&center, self)?;
        let rebuilt = center
            .rebuild_pending_commands(actor, now)
            .map_err(step("cannot rebuild the pending commands"))?;
        let mark = crate::anchor::Anchor::of(center.database(), center.card(), now)?;
        crate::anchor::reset(&self.anchor_file(), center.card(), &mark)?;
        Ok(RestoreReport {
            devices: b.devices.len(),
            seeds: b.seeds.len(),
            rebuilt,
            binding_before,
        })
    }

    /// Repairs tampered, deleted or forged records from the backups in
    /// `backups` (see [`Center::repair`]); when the database is an older
    /// copy of itself and an SQLite file, puts the file back from the
    /// newest good backup (it keeps its identity, so the card's record of
    /// it stays true) and reopens it once to refresh the anchor.
    pub fn integrity_repair<E: Into<BoxError>>(
        &self,
        backups: &Path,
        card: impl FnOnce() -> Result<Arc<dyn EncryptionCard>, E>,
        actor: &str,
        now: u64,
    ) -> SiteResult<(crate::repair::RepairReport, WholeRestore)> {
        let anchor = self.anchor_file();
        // Destructive and Write access never warn.
        let center = self.open(
            OpenOptions::maintenance(Access::Destructive),
            card,
            &mut |_| {},
        )?;
        let database_id = binding::database_id_of(&center)?;
        let r = center.repair(backups, Some(&anchor), actor, now)?;
        let Some(whole) = r.whole_restore.clone() else {
            return Ok((r, WholeRestore::None));
        };
        let Location::Sqlite(db_path) = &self.database else {
            return Ok((r, WholeRestore::NotInPlace { from: whole }));
        };
        let card = center.card_arc();
        drop(center);
        let aside =
            crate::repair::restore_sqlite_file(db_path, &whole, &card, Some(&anchor), actor, now)?;
        // The same database, put back: it keeps its identity.
        let db = crate::SqliteDatabase::open(db_path)?;
        if let Some(id) = &database_id {
            crate::KeyDatabase::set_meta(&db, "database_id", id)?;
        }
        drop(db);
        drop(self.open_with(OpenOptions::maintenance(Access::Write), card, &mut |_| {})?);
        Ok((r, WholeRestore::Restored { from: whole, aside }))
    }
}
