//! The data directory: where a center keeps its card file, key database,
//! tokens and backups, and how the card's passphrase is obtained.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use zeroize::Zeroizing;

/// Where the data directory is and how to unlock its card.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// The data directory.
    #[arg(
        long = "data",
        env = "MICROCERT_DATA",
        default_value = "./microcert-data"
    )]
    pub dir: PathBuf,
    /// A file whose first line is the card's passphrase (instead of the
    /// MICROCERT_PASSPHRASE environment variable).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

impl DataArgs {
    /// The software card's file.
    pub fn card_file(&self) -> PathBuf {
        self.dir.join("card.mccard")
    }

    /// The SQLite key database.
    pub fn database(&self) -> PathBuf {
        self.dir.join("center.db")
    }

    /// The passphrase, from `--passphrase-file` or `MICROCERT_PASSPHRASE`.
    pub fn passphrase(&self) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        if let Some(path) = &self.passphrase_file {
            let text = Zeroizing::new(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read passphrase file {}", path.display()))?,
            );
            let line = text.lines().next().unwrap_or("");
            if line.is_empty() {
                bail!("passphrase file {} is empty", path.display());
            }
            return Ok(Zeroizing::new(line.as_bytes().to_vec()));
        }
        match std::env::var("MICROCERT_PASSPHRASE") {
            Ok(p) if !p.is_empty() => Ok(Zeroizing::new(p.into_bytes())),
            _ => bail!(
                "the card's passphrase is needed: set MICROCERT_PASSPHRASE or pass --passphrase-file FILE"
            ),
        }
    }

    /// Creates the data directory (mode 0700) if it does not exist.
    pub fn create(&self) -> anyhow::Result<()> {
        create_private_dir(&self.dir)
    }
}

/// Creates a directory readable by its owner only.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))
}
