//! SoftHSM2 tokens in a directory of their own: a token directory, a
//! `softhsm2.conf` pointing at it, and `softhsm2-util --init-token` for
//! each label. The process finds them through `SOFTHSM2_CONF`; SoftHSM2
//! lists its tokens only at `C_Initialize`, so every token a process needs
//! is made before the module is loaded.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::skip;

/// Where Debian's softhsm2 installs its PKCS#11 module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Whether SoftHSM2 is installed, or why it is not usable.
pub fn available() -> Result<(), String> {
    if !Path::new(MODULE).exists() {
        return Err(format!("{MODULE} is missing (apt-get install -y softhsm2)"));
    }
    if !skip::on_path("softhsm2-util") {
        return Err("softhsm2-util is not on PATH (apt-get install -y softhsm2)".into());
    }
    Ok(())
}

/// Writes `dir/softhsm2.conf` with its tokens in `dir/tokens` and
/// initialises a token per label (SO PIN `so_pin`, user PIN `pin`);
/// returns the configuration's path (the value for `SOFTHSM2_CONF`).
pub fn init_tokens(
    dir: &Path,
    labels: &[&str],
    so_pin: &str,
    pin: &str,
) -> Result<PathBuf, String> {
    available()?;
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| e.to_string())?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    for label in labels {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", so_pin, "--pin", pin])
            .output()
            .map_err(|e| format!("softhsm2-util: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "softhsm2-util --init-token {label}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(conf)
}

/// [`init_tokens`] under the skip rule: None (after printing why, or a
/// panic when CI is set) when SoftHSM2 is not usable.
pub fn tokens(dir: &Path, labels: &[&str], so_pin: &str, pin: &str) -> Option<PathBuf> {
    skip::require("SoftHSM2 tests", init_tokens(dir, labels, so_pin, pin))
}

/// Tokens in a temporary directory of their own, removed when dropped.
#[derive(Debug)]
pub struct SoftHsm {
    _dir: tempfile::TempDir,
    /// The value for `SOFTHSM2_CONF`.
    pub conf: PathBuf,
}

impl SoftHsm {
    /// A new directory with a token per label, or why SoftHSM2 is not
    /// usable (apply [`skip::require`] to it).
    pub fn create(labels: &[&str], so_pin: &str, pin: &str) -> Result<SoftHsm, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let conf = init_tokens(dir.path(), labels, so_pin, pin)?;
        Ok(SoftHsm { _dir: dir, conf })
    }
}
