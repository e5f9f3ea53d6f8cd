//! Files of the data directory: how it is made, and secrets read from the
//! first line of a file.

use std::path::Path;

use anyhow::{Context, bail};
use zeroize::Zeroizing;

/// Creates a directory readable by its owner only.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    Ok(microcert_center::site::create_private_dir(dir)?)
}

/// The first line of a file holding a secret (a passphrase), zeroized
/// when dropped, as the whole file's text is.
pub fn first_line_secret(path: &Path, what: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {what} {}", path.display()))?,
    );
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        bail!("{what} {} is empty", path.display());
    }
    Ok(Zeroizing::new(line.as_bytes().to_vec()))
}
