//! Local maintenance commands on a data directory: backups, the integrity
//! check and repair, storage-key rotation, and the audit log checked
//! locally (with the card, so a log cut short is found too). They open the
//! card and the database themselves, so `backup restore` and the
//! whole-database part of `integrity repair` need the center stopped; the
//! others may run beside a serving center (SQLite allows it), but a
//! storage-key rotation is best run while the center is stopped or through
//! the serving process, whose card must learn the new version.
//!
//! Each command is one library call (`Center`, `microcert_center::site`)
//! and the printing of its report.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use microcert_center::backup;
use microcert_center::site::WholeRestore;
use microcert_server::service::now;

use crate::binding::Access;
use crate::config::{ConfigArgs, Open};

const ACTOR: &str = "operator:cli";

/// Backup commands.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Write a backup of every record (ciphertexts stay under Kstore), the
    /// card's digest and a MAC over the file; keep the newest --keep.
    Create {
        #[command(flatten)]
        local: ConfigArgs,
        /// Where backups go (default DATA/backups).
        #[arg(long, value_name = "DIR")]
        backup_dir: Option<PathBuf>,
        /// How many backups to keep (older ones are deleted).
        #[arg(long, default_value_t = 10)]
        keep: usize,
    },
    /// Check a backup's MAC and every record in it against the card.
    Verify {
        #[command(flatten)]
        local: ConfigArgs,
        /// The backup file.
        file: PathBuf,
    },
    /// Restore a backup into an empty key database (the configured one;
    /// an SQLite file must not exist yet); stop the center first.
    Restore {
        #[command(flatten)]
        local: ConfigArgs,
        /// The backup file.
        file: PathBuf,
        /// Restore into a database at another location than the one the
        /// card was last used with (the card's database moves there).
        #[arg(long)]
        rebind: bool,
    },
    /// List the backups, newest first.
    List {
        #[command(flatten)]
        local: ConfigArgs,
        /// The backup directory (default DATA/backups).
        #[arg(long, value_name = "DIR")]
        backup_dir: Option<PathBuf>,
    },
}

/// Runs a backup command.
pub fn backup(cmd: BackupCommand) -> anyhow::Result<()> {
    match cmd {
        BackupCommand::Create {
            local,
            backup_dir: dir,
            keep,
        } => {
            let r = local.resolve()?;
            let center = r.open_center(Open::maintenance(Access::Write))?;
            let dir = dir.unwrap_or_else(|| r.backup_dir());
            let s = center
                .create_backup(&dir, keep, Some(&r.anchor_file()), ACTOR, now())
                .context("cannot make the backup")?;
            say!(
                "backup {}: {} devices, {} seeds, {} audit entries, storage key versions {:?}",
                s.path.display(),
                s.devices,
                s.seeds,
                s.audit,
                s.kstore_versions
            );
        }
        BackupCommand::Verify { local, file } => {
            let center = local
                .resolve()?
                .open_center(Open::maintenance(Access::ReadOnly))?;
            let b = backup::read(&file, center.card())
                .with_context(|| format!("backup {} does not verify", file.display()))?;
            say!(
                "backup {} verifies: made {}, {} devices, {} seeds, {} audit entries, storage key versions {:?}",
                file.display(),
                b.created,
                b.devices.len(),
                b.seeds.len(),
                b.audit.len(),
                b.kstore_versions()
            );
        }
        BackupCommand::Restore {
            local,
            file,
            rebind,
        } => {
            let r = local.resolve()?;
            let rep =
                r.site
                    .restore_backup(&file, rebind, || r.open_card(false, false), ACTOR, now())?;
            if let Some(before) = &rep.binding_before {
                eprintln!(
                    "the card's database was {before}; it is now {}",
                    r.database_shown()
                );
            }
            say!(
                "restored {} devices and {} seeds from {} into {}; {} pending commands rebuilt",
                rep.devices,
                rep.seeds,
                file.display(),
                r.database.shown(),
                rep.rebuilt
            );
        }
        BackupCommand::List {
            local,
            backup_dir: dir,
        } => {
            let dir = match dir {
                Some(d) => d,
                None => local.resolve()?.backup_dir(),
            };
            for p in backup::list(&dir)? {
                say!("{}", p.display());
            }
        }
    }
    Ok(())
}

/// Runs the local integrity check; false when anything was found.
pub fn integrity_check(local: &ConfigArgs) -> anyhow::Result<bool> {
    let cfg = local.resolve()?;
    // Write: a clean check refreshes the card's anchor.
    let center = cfg.open_center(Open::maintenance(Access::Write))?;
    let r = center.integrity_check(Some(&cfg.anchor_file()), now())?;
    if r.is_clean() {
        say!("clean: {} records checked", r.records);
        return Ok(true);
    }
    say!("TAMPERED: {} records checked", r.records);
    for f in r.findings() {
        say!("  {f}");
    }
    say!("repair from backups with `microcert integrity repair`");
    Ok(false)
}

/// Repairs from the backups; false when something was refused.
pub fn integrity_repair(local: &ConfigArgs, dir: Option<PathBuf>) -> anyhow::Result<bool> {
    let cfg = local.resolve()?;
    let dir = dir.unwrap_or_else(|| cfg.backup_dir());
    let (r, whole) =
        cfg.site
            .integrity_repair(&dir, || cfg.open_card(false, false), ACTOR, now())?;
    for (d, g) in &r.restored {
        say!("restored record {d} generation {g}");
    }
    for (d, g) in &r.removed {
        say!("removed record {d} generation {g} (inserted outside the center)");
    }
    for d in &r.devices {
        say!("restored device row {d}");
    }
    if r.token_shards > 0 {
        say!(
            "{} token digest shard(s) did not match their tokens: every token in them is revoked; issue new ones with `microcert token create`",
            r.token_shards
        );
    }
    if r.marks {
        say!(
            "the shared marks did not match their digest shard: set to their safe values; confirm the time with `microcert clock confirm`"
        );
    }
    match whole {
        WholeRestore::None => {}
        WholeRestore::NotInPlace { from } => bail!(
            "the database {} is an older copy of itself; put back {} with `microcert backup restore` into an empty database (this is not done in place on PostgreSQL)",
            cfg.database_shown(),
            from.display()
        ),
        WholeRestore::Restored { from, aside } => say!(
            "the database was an older copy of itself: restored {} (the old file is kept as {})",
            from.display(),
            aside.map(|p| p.display().to_string()).unwrap_or_default()
        ),
    }
    for why in &r.refused {
        say!("REFUSED: {why}");
    }
    Ok(r.refused.is_empty())
}

/// `card rotate-storage-key`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub local: ConfigArgs,
    /// Devices re-sealed per transaction.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
}

/// Makes a new Kstore version (or resumes an interrupted rotation) and
/// re-seals every seed under it.
pub fn rotate_storage_key(args: RotateArgs) -> anyhow::Result<()> {
    let cfg = args.local.resolve()?;
    let center = cfg.open_center(Open::maintenance(Access::Destructive))?;
    let dir = cfg.backup_dir();
    let r = center.rotate_storage_key(args.batch, Some(&dir), ACTOR, now(), &mut |n| {
        eprintln!("  {n} seeds re-sealed");
    })?;
    say!(
        "storage key version {}{}: {} seeds re-sealed",
        r.version,
        if r.resumed { " (resumed)" } else { "" },
        r.resealed
    );
    for v in &r.destroyed {
        say!("destroyed storage key version {v}");
    }
    for (v, why) in &r.kept {
        say!("kept storage key version {v}: {why}");
    }
    for d in &r.skipped {
        say!("SKIPPED device {d}: its records fail the integrity check (repair, then run again)");
    }
    Ok(())
}

/// Local audit commands (with the card: a log cut short is found too).
#[derive(Debug, Subcommand)]
pub enum LocalAuditCommand {
    /// Walk the hash chain and check its card-tagged head, on the data
    /// directory; exit 1 if anything is wrong.
    VerifyLocal {
        #[command(flatten)]
        local: ConfigArgs,
    },
    /// Write every entry as JSON Lines, from the data directory.
    ExportLocal {
        #[command(flatten)]
        local: ConfigArgs,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Move the entries older than a date out of the table into a new
    /// archive file that stays verifiable (`audit verify-archive`); the
    /// table's chain goes on from a card-tagged checkpoint. Safe to
    /// interrupt: the entries are in the table or in a complete archive.
    Archive {
        #[command(flatten)]
        local: ConfigArgs,
        /// Entries before this date move: YYYY-MM-DD (UTC midnight) or
        /// Unix seconds.
        #[arg(long, value_parser = parse_date)]
        before: u64,
        /// The archive file; it must not exist.
        #[arg(long)]
        out: PathBuf,
        /// Which table: the audit log, or the notary records first seen
        /// before the date (each archived with its card seal).
        #[arg(long, value_enum, default_value = "audit")]
        table: ArchiveTable,
    },
    /// Check an archive file: the card's MAC, the hash chain of its
    /// entries, and that it ends at the table's checkpoint (or is older,
    /// or its entries are still in the table); exit 1 if not.
    VerifyArchive {
        #[command(flatten)]
        local: ConfigArgs,
        /// The archive file.
        file: PathBuf,
    },
}

/// The table `audit archive` moves rows out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchiveTable {
    /// The audit log (hash chain; the table keeps a card-tagged checkpoint).
    Audit,
    /// The notary records of verified signatures.
    Notary,
}

/// A date as Unix seconds: YYYY-MM-DD (UTC midnight) or a number.
pub fn parse_date(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let bad = || format!("{s:?} is not YYYY-MM-DD or Unix seconds");
    let mut it = s
        .splitn(3, '-')
        .map(|p| p.parse::<i64>().map_err(|_| bad()));
    let (y, m, d) = match (it.next(), it.next(), it.next()) {
        (Some(y), Some(m), Some(d)) => (y?, m?, d?),
        _ => return Err(bad()),
    };
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400).map_err(|_| bad())
}

/// Runs a local audit command; false when the log is not intact.
pub fn audit(cmd: LocalAuditCommand) -> anyhow::Result<bool> {
    match cmd {
        LocalAuditCommand::VerifyLocal { local } => {
            let center = local
                .resolve()?
                .open_center(Open::maintenance(Access::ReadOnly))?;
            match center.verify_audit()? {
                (n, None) => {
                    say!("audit log intact: {n} entries, head tagged by the card");
                    Ok(true)
                }
                (_, Some(f)) => {
                    say!("audit log BROKEN: {f}");
                    Ok(false)
                }
            }
        }
        LocalAuditCommand::ExportLocal { local, out } => {
            let center = local
                .resolve()?
                .open_center(Open::maintenance(Access::ReadOnly))?;
            let n = match out {
                Some(p) => {
                    let mut f = std::io::BufWriter::new(
                        std::fs::File::create(&p)
                            .with_context(|| format!("cannot write {}", p.display()))?,
                    );
                    center.export_audit(&mut f)?
                }
                None => center.export_audit(&mut std::io::stdout().lock())?,
            };
            eprintln!("{n} entries exported");
            Ok(true)
        }
        LocalAuditCommand::Archive {
            local,
            before,
            out,
            table,
        } => {
            let center = local
                .resolve()?
                .open_center(Open::maintenance(Access::Write))?;
            let actor = crate::tokencmd::actor();
            if table == ArchiveTable::Notary {
                match center.archive_notary(before, &out, &actor, now())? {
                    Some(r) => say!("{} notary records moved to {}", r.entries, r.path.display()),
                    None => say!("no notary record first seen before {before} to archive"),
                }
                return Ok(true);
            }
            match center.archive_audit(before, &out, &actor, now())? {
                Some(r) => say!(
                    "{} audit entries ({} to {}) moved to {}",
                    r.entries,
                    r.first,
                    r.last,
                    r.path.display()
                ),
                None => say!("no audit entry before {before} to archive"),
            }
            Ok(true)
        }
        LocalAuditCommand::VerifyArchive { local, file } => {
            let center = local
                .resolve()?
                .open_center(Open::maintenance(Access::ReadOnly))?;
            if microcert_center::audit_archive::is_notary_archive(&file)? {
                return match center.verify_notary_archive(&file) {
                    Ok(c) => {
                        say!(
                            "notary archive intact: {} records, each with its card seal ({} still in the table)",
                            c.records,
                            c.in_table
                        );
                        Ok(true)
                    }
                    Err(microcert_center::Error::Integrity(why)) => {
                        say!("archive BROKEN: {why}");
                        Ok(false)
                    }
                    Err(e) => Err(e.into()),
                };
            }
            match center.verify_audit_archive(&file) {
                Ok(c) => {
                    use microcert_center::audit_archive::ArchiveLink;
                    let link = match c.link {
                        ArchiveLink::Checkpoint => "the table's chain goes on from its last entry",
                        ArchiveLink::InTable => "its entries are still in the table",
                        ArchiveLink::Older => "an older archive: the next archives link it",
                    };
                    say!(
                        "archive intact: entries {} to {} ({}), {link}",
                        c.first,
                        c.last,
                        c.entries
                    );
                    Ok(true)
                }
                Err(microcert_center::Error::Integrity(why)) => {
                    say!("archive BROKEN: {why}");
                    Ok(false)
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}
