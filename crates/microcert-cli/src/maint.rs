//! Local maintenance commands on a data directory: backups, integrity
//! repair, storage-key rotation, and the audit log checked locally.

use clap::Subcommand;

/// Maintenance commands (issue 5).
#[derive(Debug, Subcommand)]
pub enum BackupCommand {}

/// Runs a backup command.
pub fn backup(cmd: BackupCommand) -> anyhow::Result<()> {
    match cmd {}
}
