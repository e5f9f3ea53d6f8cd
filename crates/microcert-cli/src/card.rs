//! `microcert card`: the software encryption card of a data directory.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Subcommand;
use microcert_center::card::{KdfParams, SoftwareCard};
use microcert_center::db::NewAudit;

use crate::binding::Access;
use crate::config::{ConfigArgs, Open, Resolved};

/// Card commands (local: they work on the data directory, not over HTTP).
#[derive(Debug, Subcommand)]
pub enum CardCommand {
    /// Make the card's keys from the OS random generator and seal them in
    /// the data directory under the passphrase (Argon2id); or, with
    /// `--from` / `--from-shares`, import the keys another center's card
    /// exported with `card clone`.
    Init {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Make the keys inside a PKCS#11 token instead: the `serve`
        /// configuration file whose `[pkcs11]` section names the module,
        /// token and PIN source (the same as --config with such a file).
        /// Keys are sensitive and not extractable.
        #[arg(long, value_name = "CONFIG", conflicts_with_all = ["from", "from_shares"])]
        pkcs11: Option<PathBuf>,
        /// Import a `card clone` export sealed under an export passphrase
        /// (MICROCERT_EXPORT_PASSPHRASE or --export-passphrase-file).
        #[arg(long, value_name = "FILE", conflicts_with = "from_shares")]
        from: Option<PathBuf>,
        /// Import from `card clone --shares` shares: a file with at least
        /// the threshold of them, one per line.
        #[arg(long, value_name = "FILE")]
        from_shares: Option<PathBuf>,
        /// A file whose first line is the export passphrase.
        #[arg(long, value_name = "FILE")]
        export_passphrase_file: Option<PathBuf>,
    },
    /// Export the card's keys for another center of the same deployment:
    /// sealed under an export passphrase (Argon2id, AES-256-GCM) into
    /// FILE, or as M-of-N Shamir shares, one file per custodian, in DIR.
    /// The other center imports them with `card init --from` (or
    /// `--from-shares`).
    Clone {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// The export file (passphrase mode) or directory (share mode); it
        /// must not exist.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
        /// Export as this many Shamir shares (N) instead of a passphrase-
        /// sealed file.
        #[arg(long, value_name = "N")]
        shares: Option<u8>,
        /// How many shares recover the keys (M).
        #[arg(long, value_name = "M", default_value_t = 3)]
        threshold: u8,
        /// A file whose first line is the export passphrase (else
        /// MICROCERT_EXPORT_PASSPHRASE).
        #[arg(long, value_name = "FILE")]
        export_passphrase_file: Option<PathBuf>,
        /// Act even when the key database cannot be opened to record this
        /// in its audit log (the entry is then missing: say why in your
        /// own records). Without it the command refuses.
        #[arg(long)]
        unaudited: bool,
    },
    /// Print the card's keys as M-of-N Shamir shares, one per line, for
    /// N custodians; any M of them recover the card.
    Split {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// How many shares to make (N).
        #[arg(long, default_value_t = 5)]
        shares: u8,
        /// How many shares recover the card (M).
        #[arg(long, default_value_t = 3)]
        threshold: u8,
        /// Act even when the key database cannot be opened to record this
        /// in its audit log (the entry is then missing: say why in your
        /// own records). Without it the command refuses.
        #[arg(long)]
        unaudited: bool,
    },
    /// Record that the configured key database is this card's database
    /// (both in the database and in the data directory): after moving the
    /// card to another database on purpose. Commands that change or
    /// destroy records refuse a database the card was not last used with.
    Bind {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Rebuild the card file from shares (one per line, from FILE or
    /// standard input), sealed under the passphrase.
    Recover {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// A file with the shares, one per line; standard input if absent.
        #[arg(long, value_name = "FILE")]
        shares_file: Option<PathBuf>,
        /// Act even when the key database cannot be opened to record this
        /// in its audit log (the entry is then missing: say why in your
        /// own records). Without it the command refuses.
        #[arg(long)]
        unaudited: bool,
    },
    /// Make the keyring root key `microcert-kroot` on a PKCS#11 token
    /// initialised before the keyring (issue 14; `card init` makes it).
    /// Run it on ONE token, then clone that token to the other centers'
    /// HSMs with the vendor's procedure: roots made on each token apart
    /// differ, and a center whose root does not open the keyring refuses
    /// it (docs/hsm.md).
    KeyringRoot {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

/// Runs a card command.
pub fn run(cmd: CardCommand) -> anyhow::Result<()> {
    match cmd {
        CardCommand::Init {
            mut cfg,
            pkcs11: Some(config),
            ..
        } => {
            cfg.config = Some(config);
            init_pkcs11(&cfg.resolve()?)?;
        }
        CardCommand::Init {
            cfg,
            from: None,
            from_shares: None,
            ..
        } if cfg.resolve().is_ok_and(|r| r.pkcs11().is_some()) => {
            init_pkcs11(&cfg.resolve()?)?;
        }
        CardCommand::Bind { cfg } => bind(&cfg)?,
        CardCommand::Init {
            cfg,
            pkcs11: None,
            from: Some(export),
            export_passphrase_file,
            ..
        } => {
            let data = cfg.resolve()?;
            let pass = data.passphrase()?;
            refuse_existing_card(&data)?;
            let export_pass = export_passphrase(export_passphrase_file.as_deref())?;
            let card = SoftwareCard::open(&export, &export_pass)
                .with_context(|| format!("cannot open the export {}", export.display()))?;
            install(&data, &pass, &card, "imported")?;
        }
        CardCommand::Init {
            cfg,
            pkcs11: None,
            from_shares: Some(file),
            ..
        } => {
            let data = cfg.resolve()?;
            let pass = data.passphrase()?;
            refuse_existing_card(&data)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let text = zeroize::Zeroizing::new(text);
            let card = recover(&text)?;
            install(&data, &pass, &card, "imported")?;
        }
        CardCommand::Clone {
            cfg,
            out,
            shares,
            threshold,
            export_passphrase_file,
            unaudited,
        } => {
            let data = cfg.resolve()?;
            data.require_software_card("card clone")?;
            let pass = data.passphrase()?;
            let card = Arc::new(
                SoftwareCard::open(&data.card_file(), &pass).context("cannot open the card")?,
            );
            if out.exists() {
                bail!("{} exists: the export goes to a new path", out.display());
            }
            if let Some(n) = shares {
                check_threshold(n, threshold)?;
            }
            let how = match shares {
                Some(n) => format!("as {threshold}-of-{n} Shamir shares"),
                None => "sealed under an export passphrase".to_owned(),
            };
            audit_card_op(
                &data,
                &card,
                CardOp {
                    what: "card clone",
                    action: "card-clone",
                    reason: format!(
                        "card {} exported {how} to {}",
                        card.card_id(),
                        out.display()
                    ),
                    create_db: true,
                    unaudited,
                },
            )?;
            match shares {
                Some(n) => {
                    let lines = card.split(n, threshold)?;
                    crate::datadir::create_private_dir(&out)?;
                    for (i, line) in lines.iter().enumerate() {
                        let path = out.join(format!("share-{}-of-{n}.txt", i + 1));
                        crate::cert::write_secret_file(&path, format!("{line}\n").as_bytes())?;
                    }
                    say!(
                        "card {}: {n} shares in {}, any {threshold} import it; give each file to one custodian",
                        card.card_id(),
                        out.display()
                    );
                }
                None => {
                    let export_pass = export_passphrase(export_passphrase_file.as_deref())?;
                    if export_pass[..] == pass[..] {
                        bail!("the export passphrase must differ from the card's passphrase");
                    }
                    card.save(&out, &export_pass, KdfParams::default())?;
                    say!(
                        "card {} exported to {} under the export passphrase",
                        card.card_id(),
                        out.display()
                    );
                }
            }
        }
        CardCommand::Init {
            cfg, pkcs11: None, ..
        } => {
            let data = cfg.resolve()?;
            let pass = data.passphrase()?;
            data.create_data_dir()?;
            let card = SoftwareCard::init(&data.card_file(), &pass, KdfParams::default())
                .context("cannot initialise the card")?;
            say!(
                "card {} initialised in {}",
                card.card_id(),
                data.card_file().display()
            );
        }
        CardCommand::Split {
            cfg,
            shares,
            threshold,
            unaudited,
        } => {
            let data = cfg.resolve()?;
            data.require_software_card("card split")?;
            let pass = data.passphrase()?;
            let card = Arc::new(
                SoftwareCard::open(&data.card_file(), &pass).context("cannot open the card")?,
            );
            // Refused parameters make no entry.
            check_threshold(shares, threshold)?;
            audit_card_op(
                &data,
                &card,
                CardOp {
                    what: "card split",
                    action: "card-split",
                    reason: format!(
                        "card {} printed as {threshold}-of-{shares} Shamir shares",
                        card.card_id()
                    ),
                    create_db: true,
                    unaudited,
                },
            )?;
            let lines = card.split(shares, threshold)?;
            eprintln!(
                "{shares} shares of card {}; any {threshold} recover it. Give each to one custodian.",
                card.card_id()
            );
            for line in lines {
                say!("{line}");
            }
        }
        CardCommand::Recover {
            cfg,
            shares_file,
            unaudited,
        } => {
            let data = cfg.resolve()?;
            data.require_software_card("card recover")?;
            let pass = data.passphrase()?;
            if data.card_file().exists() {
                bail!(
                    "{} exists: recover into a data directory without a card",
                    data.card_file().display()
                );
            }
            let text = match &shares_file {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
                None => {
                    let mut s = String::new();
                    for line in std::io::stdin().lock().lines() {
                        s.push_str(&line?);
                        s.push('\n');
                    }
                    s
                }
            };
            let card = Arc::new(recover(&text)?);
            // Recorded in the card's database before the card file is
            // written; not made when missing (a backup restore into it
            // follows a recovery from nothing: pass --unaudited then).
            data.create_data_dir()?;
            audit_card_op(
                &data,
                &card,
                CardOp {
                    what: "card recover",
                    action: "card-recover",
                    reason: format!(
                        "card {} recovered from shares into {}",
                        card.card_id(),
                        data.card_file().display()
                    ),
                    create_db: false,
                    unaudited,
                },
            )?;
            install(&data, &pass, &card, "recovered")?;
        }
        CardCommand::KeyringRoot { cfg } => keyring_root(&cfg.resolve()?)?,
    }
    Ok(())
}

/// `card keyring-root` on the PKCS#11 token the configuration names.
fn keyring_root(r: &Resolved) -> anyhow::Result<()> {
    let Some(cfg) = r.pkcs11() else {
        bail!(
            "card keyring-root is for a PKCS#11 card: the configuration has no [pkcs11] section (a software card has its root already)"
        );
    };
    microcert_pkcs11::Pkcs11Card::add_keyring_root(cfg).with_context(|| {
        format!(
            "cannot make the keyring root key in token {:?}",
            cfg.token_label
        )
    })?;
    say!(
        "keyring root key microcert-kroot made in PKCS#11 token {:?}: clone this token to the other centers' HSMs before they start",
        cfg.token_label
    );
    Ok(())
}

/// Shamir parameters the card accepts (checked before the audit entry,
/// so a refused split makes none).
fn check_threshold(shares: u8, threshold: u8) -> anyhow::Result<()> {
    if threshold < 2 || shares < threshold {
        return Err(microcert_center::Error::ShareThreshold { threshold, shares }.into());
    }
    Ok(())
}

/// A card operation to audit ([`audit_card_op`]).
struct CardOp {
    /// The command, for messages.
    what: &'static str,
    /// The audit action.
    action: &'static str,
    /// The entry's reason.
    reason: String,
    /// Whether a missing SQLite database is made (a card cloned before
    /// the first `serve`: its audit log starts with the export).
    create_db: bool,
    /// `--unaudited`: act even when the entry cannot be written.
    unaudited: bool,
}

/// Records a card operation in the audit log of the configured key
/// database (resolved as for every command), with `card` (the one the
/// operation uses), before the operation. When the database cannot be
/// opened or the entry cannot be written, the operation is refused with
/// a message that says so, unless `--unaudited` (then a warning).
fn audit_card_op(data: &Resolved, card: &Arc<SoftwareCard>, op: CardOp) -> anyhow::Result<()> {
    let recorded = (|| -> anyhow::Result<()> {
        let how = Open {
            create_db: op.create_db,
            ..Open::maintenance(Access::Write)
        };
        let center = data.open_center_with(how, card.clone())?;
        center.record_audit(&[NewAudit::new(
            crate::tokencmd::now(),
            crate::tokencmd::actor(),
            op.action,
        )
        .because(op.reason.clone())])?;
        Ok(())
    })();
    match recorded {
        Ok(()) => Ok(()),
        Err(e) if op.unaudited => {
            eprintln!(
                "warning: --unaudited: `microcert {}` is NOT recorded in any audit log ({e:#})",
                op.what
            );
            Ok(())
        }
        Err(e) => Err(e.context(format!(
            "refused: `microcert {}` is recorded in the audit log of the key database {}, which \
             cannot record it. Give the command the configuration `serve` uses (--config, \
             --database, MICROCERT_DATABASE), or pass --unaudited to act without an audit entry",
            op.what,
            data.database_shown()
        ))),
    }
}

/// The card of the shares in `text`, one a line (blank lines ignored).
fn recover(text: &str) -> anyhow::Result<SoftwareCard> {
    let shares: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    SoftwareCard::recover(&shares).context("cannot recover the card")
}

/// Seals an imported or recovered card into the data directory under its
/// passphrase and says so (`how`: "imported", "recovered").
fn install(data: &Resolved, pass: &[u8], card: &SoftwareCard, how: &str) -> anyhow::Result<()> {
    data.create_data_dir()?;
    card.save(&data.card_file(), pass, KdfParams::default())?;
    say!(
        "card {} {how} into {}",
        card.card_id(),
        data.card_file().display()
    );
    Ok(())
}

/// `card init` on the PKCS#11 token the configuration names.
fn init_pkcs11(r: &Resolved) -> anyhow::Result<()> {
    let Some(cfg) = r.pkcs11() else {
        bail!(
            "{} has no [pkcs11] section",
            r.config_file
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    };
    let card = microcert_pkcs11::Pkcs11Card::init(cfg)
        .with_context(|| format!("cannot make the card's keys in token {:?}", cfg.token_label))?;
    say!("card keys made in PKCS#11 token {:?}", card.token_label());
    Ok(())
}

/// `card bind`.
fn bind(cfg: &ConfigArgs) -> anyhow::Result<()> {
    let r = cfg.resolve()?;
    let center = r.open_center(Open::maintenance(Access::Bind))?;
    let before = crate::binding::record(&center, &r)?;
    let id = crate::binding::database_id_of(&center)?.unwrap_or_default();
    match before {
        Some(b) => say!(
            "the card's database is now {} (id {id}); it was {b}",
            r.database_shown()
        ),
        None => say!("the card's database is {} (id {id})", r.database_shown()),
    }
    Ok(())
}

fn refuse_existing_card(data: &Resolved) -> anyhow::Result<()> {
    data.require_software_card("card init --from/--from-shares")?;
    if data.card_file().exists() {
        bail!(
            "{} exists: import into a data directory without a card",
            data.card_file().display()
        );
    }
    Ok(())
}

/// The export passphrase of `card clone` / `card init --from`: from a
/// file's first line or MICROCERT_EXPORT_PASSPHRASE.
fn export_passphrase(
    file: Option<&std::path::Path>,
) -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>> {
    if let Some(path) = file {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        );
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            bail!("export passphrase file {} is empty", path.display());
        }
        return Ok(zeroize::Zeroizing::new(line.as_bytes().to_vec()));
    }
    match std::env::var("MICROCERT_EXPORT_PASSPHRASE") {
        Ok(p) if !p.is_empty() => Ok(zeroize::Zeroizing::new(p.into_bytes())),
        _ => bail!(
            "the export passphrase is needed: set MICROCERT_EXPORT_PASSPHRASE or pass --export-passphrase-file FILE"
        ),
    }
}
