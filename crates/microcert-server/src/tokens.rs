//! Bearer tokens for operators and relying parties. A token is printed once
//! at creation; only its SHA-256 is stored, in `tokens.json` of the data
//! directory (written atomically). The server re-reads the file when it
//! changes, so `microcert token create` works while it runs.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use microcert_core::Audience;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including tokens and card operations.
    Admin,
    /// Device life cycle, updates, import, backup, integrity.
    Operator,
    /// Read-only: devices, audit log, integrity status.
    Auditor,
    /// A relying party: `/v1/verify` and `/v1/open` only. Its name is its audience.
    Verifier,
}

impl Role {
    /// The role's name.
    pub const fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
            Role::Verifier => "verifier",
        }
    }
}

/// One stored token: never the token itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Who holds it; for a verifier, the relying party's name.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the token, hex.
    pub sha256: String,
    /// Unix seconds.
    pub created: u64,
}

/// Errors of the token store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Reading or writing the token file failed.
    #[error("token file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The token file is not valid JSON of the expected shape.
    #[error("token file {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The name is empty, too long or already used for this role.
    #[error("invalid token name: {0}")]
    Name(String),
    /// The OS random generator failed.
    #[error("random generator: {0}")]
    Random(String),
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn read(path: &Path) -> Result<Vec<TokenRecord>, TokenError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| TokenError::Corrupt {
            path: path.to_owned(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(TokenError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Creates a token for `name` with `role` in the data directory's token
/// file and returns the token, which is shown once and never stored.
pub fn create(data_dir: &Path, role: Role, name: &str) -> Result<Zeroizing<String>, TokenError> {
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(TokenError::Name(
            "a name is 1 to 200 characters, no control characters".into(),
        ));
    }
    let path = data_dir.join("tokens.json");
    let mut records = read(&path)?;
    if records.iter().any(|r| r.name == name && r.role == role) {
        return Err(TokenError::Name(format!(
            "a {} token named {name:?} already exists",
            role.name()
        )));
    }
    if role == Role::Verifier {
        let aud = Audience::relying_party(name);
        if aud.is_center() {
            return Err(TokenError::Name(format!(
                "{name:?} hashes to the center's audience 0^8; choose another name"
            )));
        }
        if let Some(other) = records
            .iter()
            .find(|r| r.role == Role::Verifier && Audience::relying_party(&r.name) == aud)
        {
            return Err(TokenError::Name(format!(
                "{name:?} has the same audience as relying party {:?}",
                other.name
            )));
        }
    }
    let mut raw = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut raw[..]).map_err(|e| TokenError::Random(e.to_string()))?;
    let token = Zeroizing::new(format!("mct_{}", hex::encode(&raw[..])));
    records.push(TokenRecord {
        name: name.to_owned(),
        role,
        sha256: hash(&token),
        created: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    let json = serde_json::to_vec_pretty(&records).map_err(|source| TokenError::Corrupt {
        path: path.clone(),
        source,
    })?;
    write_atomic(&path, &json).map_err(|source| TokenError::Io { path, source })?;
    Ok(token)
}

/// The token file as the server sees it, re-read when it changes.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    state: Mutex<(Option<SystemTime>, HashMap<String, TokenRecord>)>,
}

impl TokenStore {
    /// A store over the data directory's token file (which may not exist yet).
    pub fn open(data_dir: &Path) -> Result<Self, TokenError> {
        let store = TokenStore {
            path: data_dir.join("tokens.json"),
            state: Mutex::new((None, HashMap::new())),
        };
        store.reload_if_changed()?;
        Ok(store)
    }

    fn reload_if_changed(&self) -> Result<(), TokenError> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.0 == modified && modified.is_some() {
            return Ok(());
        }
        let records = read(&self.path)?;
        state.1 = records.into_iter().map(|r| (r.sha256.clone(), r)).collect();
        state.0 = modified;
        Ok(())
    }

    /// The record of a presented token, if it is known.
    pub fn check(&self, token: &str) -> Option<TokenRecord> {
        if let Err(e) = self.reload_if_changed() {
            tracing::warn!(error = %e, "cannot reload tokens; keeping the ones loaded");
        }
        let h = hash(token);
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // The map is keyed by hash; compare again in constant time so the
        // lookup result does not depend on a short-circuit string compare.
        state
            .1
            .get(&h)
            .filter(|r| bool::from(r.sha256.as_bytes().ct_eq(h.as_bytes())))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_stored_hashed_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let token = create(dir.path(), Role::Operator, "alice").unwrap();
        let file = std::fs::read_to_string(dir.path().join("tokens.json")).unwrap();
        assert!(!file.contains(token.as_str()));
        let store = TokenStore::open(dir.path()).unwrap();
        let rec = store.check(&token).unwrap();
        assert_eq!((rec.name.as_str(), rec.role), ("alice", Role::Operator));
        assert!(store.check("mct_00").is_none());
    }

    #[test]
    fn a_second_verifier_with_the_same_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path(), Role::Verifier, "billing").unwrap();
        assert!(matches!(
            create(dir.path(), Role::Verifier, "billing"),
            Err(TokenError::Name(_))
        ));
        assert!(matches!(
            create(dir.path(), Role::Verifier, ""),
            Err(TokenError::Name(_))
        ));
    }

    #[test]
    fn tokens_created_later_are_seen_by_a_running_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        let token = create(dir.path(), Role::Admin, "root").unwrap();
        assert!(store.check(&token).is_some());
    }
}
