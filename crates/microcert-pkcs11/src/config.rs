//! Where the card finds its token: module, token label, PIN.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::error::{Pkcs11Error, Result};

/// The environment variable read for the PIN when no other source is set.
pub const PIN_ENV: &str = "MICROCERT_PKCS11_PIN";

/// The module Debian's `softhsm2` package installs.
pub const SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Configuration of a PKCS#11 card, shaped to sit in a TOML file (the
/// CLI's configuration file reads it from a top-level `[pkcs11]` table):
///
/// ```toml
/// [pkcs11]
/// module = "/usr/lib/softhsm/libsofthsm2.so"
/// token_label = "microcert"
/// pin_file = "/etc/microcert/token.pin"   # or pin_env = "MICROCERT_PKCS11_PIN"
/// sessions = 8
/// ```
///
/// The PIN itself is never part of the file: it is read from `pin_file`
/// (first line, trailing newline removed), else from the environment
/// variable `pin_env` (default [`PIN_ENV`]). A program can also set it
/// directly with [`Pkcs11Config::with_pin`].
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (shared library).
    pub module: PathBuf,
    /// Label of the token the card's keys live in.
    pub token_label: String,
    /// A file holding the user PIN.
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// The environment variable holding the user PIN (default
    /// `MICROCERT_PKCS11_PIN`).
    #[serde(default)]
    pub pin_env: Option<String>,
    /// Sessions kept open and logged in, so that concurrent requests do not
    /// wait on one another (default 8).
    #[serde(default = "default_sessions")]
    pub sessions: usize,
    #[serde(skip)]
    pin: Option<Zeroizing<String>>,
}

fn default_sessions() -> usize {
    8
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin_file", &self.pin_file)
            .field("pin_env", &self.pin_env)
            .field("sessions", &self.sessions)
            .field("pin", &self.pin.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Pkcs11Config {
    /// A configuration for `token_label` on `module`, PIN from the
    /// environment, 8 sessions.
    pub fn new(module: impl Into<PathBuf>, token_label: impl Into<String>) -> Self {
        Pkcs11Config {
            module: module.into(),
            token_label: token_label.into(),
            pin_file: None,
            pin_env: None,
            sessions: default_sessions(),
            pin: None,
        }
    }

    /// Sets the PIN directly (it takes precedence over file and
    /// environment). The caller should zeroize its own copy.
    pub fn with_pin(mut self, pin: &str) -> Self {
        self.pin = Some(Zeroizing::new(pin.to_owned()));
        self
    }

    /// Reads the PIN from a file.
    pub fn with_pin_file(mut self, path: impl AsRef<Path>) -> Self {
        self.pin_file = Some(path.as_ref().to_path_buf());
        self
    }

    /// The number of sessions to keep.
    pub fn with_sessions(mut self, n: usize) -> Self {
        self.sessions = n;
        self
    }

    /// The user PIN from the first configured source: the value set by
    /// [`Pkcs11Config::with_pin`], `pin_file`, the environment.
    pub(crate) fn read_pin(&self) -> Result<Zeroizing<String>> {
        let pin = if let Some(p) = &self.pin {
            p.clone()
        } else if let Some(path) = &self.pin_file {
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                Pkcs11Error::PinSource(format!("cannot read PIN file {}: {e}", path.display()))
            })?);
            Zeroizing::new(text.lines().next().unwrap_or("").to_owned())
        } else {
            let var = self.pin_env.as_deref().unwrap_or(PIN_ENV);
            let value = std::env::var(var).map_err(|_| {
                Pkcs11Error::PinSource(format!("environment variable {var} is not set"))
            })?;
            Zeroizing::new(value)
        };
        if pin.is_empty() {
            return Err(Pkcs11Error::PinSource("the PIN is empty".into()));
        }
        Ok(pin)
    }
}
