//! Bearer tokens for operators and relying parties (issue 14: shared by
//! every center on one database). A token is printed once at creation;
//! only its SHA-256 is stored, in the key database's `tokens` table with a
//! card tag over what decides its use ([`microcert_center::tokens`]).
//!
//! Each center keeps a cache of the table, reloaded from the database at
//! most every [`REFRESH`] while requests arrive, and at once (at most every
//! [`MISS_RELOAD`]) when a token it does not know is presented: a token
//! made at another center works within MISS_RELOAD (100 ms), a revocation anywhere takes
//! effect everywhere within [`REFRESH`]. When the database cannot be read
//! for [`STALE_MAX`], every token is refused (fail closed). Refusals are
//! counted (`microcert_token_refusals_total{reason}`) and, for a known
//! token that is revoked or expired, in its row's `failures` column; its
//! `last_used` is written with the next reload (at most once a REFRESH).
//!
//! A legacy `DATA/tokens.json` (before issue 14) is imported at the first
//! start with a database ([`migrate_file`]) and renamed
//! `tokens.json.migrated`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use microcert_center::Center;
use microcert_center::db::{NewAudit, TokenRow};
use microcert_center::tokens::{LegacyToken, TokenStatus, token_hash, token_status};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// How old the cache may get while requests arrive: the bound on how long
/// a token revoked at another center still works here.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The least time between two reloads caused by unknown tokens (a flood of
/// made-up tokens costs at most one table read per MISS_RELOAD).
pub const MISS_RELOAD: Duration = Duration::from_millis(100);

/// How long the cache is used when the database cannot be read; then
/// every token is refused until a reload succeeds.
pub const STALE_MAX: Duration = Duration::from_secs(10);

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

    /// The role of a stored name.
    pub fn from_name(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "auditor" => Some(Role::Auditor),
            "verifier" => Some(Role::Verifier),
            _ => None,
        }
    }
}

/// The holder of an accepted token: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Who holds it; for a verifier, the relying party's name.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

/// Errors of the token store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Reading or renaming the legacy token file failed.
    #[error("token file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The legacy token file is not valid JSON of the expected shape.
    #[error("token file {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The center refused (bad name, duplicate, database error).
    #[error(transparent)]
    Center(#[from] microcert_center::Error),
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Creates a token for `name` with `role` (valid `ttl` seconds, or until
/// revoked), audited as `actor`; returns the token, shown once.
pub fn create(
    center: &Center,
    role: Role,
    name: &str,
    ttl: Option<u64>,
    actor: &str,
) -> Result<Zeroizing<String>, TokenError> {
    Ok(center.create_token(name, role.name(), ttl, actor, now_secs())?)
}

/// One record of a legacy `tokens.json`.
#[derive(Debug, Deserialize)]
struct LegacyRecord {
    name: String,
    role: Role,
    sha256: String,
    created: u64,
}

/// Imports a legacy `DATA/tokens.json` into the database and renames it
/// `tokens.json.migrated`; returns how many tokens were imported (None
/// when there is no such file). A crash between the import and the rename
/// is harmless: the next start imports nothing twice and renames.
pub fn migrate_file(center: &Center, data_dir: &Path) -> Result<Option<usize>, TokenError> {
    let path = data_dir.join("tokens.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(TokenError::Io { path, source }),
    };
    let records: Vec<LegacyRecord> =
        serde_json::from_slice(&bytes).map_err(|source| TokenError::Corrupt {
            path: path.clone(),
            source,
        })?;
    let legacy: Vec<LegacyToken> = records
        .into_iter()
        .map(|r| LegacyToken {
            sha256: r.sha256.to_ascii_lowercase(),
            name: r.name,
            role: r.role.name().to_owned(),
            created: r.created,
        })
        .collect();
    let n = center.import_legacy_tokens(&legacy, "migration", now_secs())?;
    let done = data_dir.join("tokens.json.migrated");
    std::fs::rename(&path, &done).map_err(|source| TokenError::Io {
        path: path.clone(),
        source,
    })?;
    if let Ok(d) = std::fs::File::open(data_dir) {
        let _ = d.sync_all();
    }
    tracing::info!(imported = n, file = %done.display(), "legacy tokens.json moved into the key database");
    Ok(Some(n))
}

#[derive(Debug, Default)]
struct Cache {
    /// When the table was last read successfully.
    loaded: Option<Instant>,
    /// When a reload was last tried (success or not).
    tried: Option<Instant>,
    /// The rows whose tag checked, by hash.
    rows: HashMap<String, TokenRow>,
    /// Bookkeeping not yet written: hash -> (last used, failures).
    pending: HashMap<String, (Option<u64>, u64)>,
}

/// The tokens as a server sees them (see the module docs).
#[derive(Debug)]
pub struct TokenStore {
    center: Arc<Center>,
    cache: Mutex<Cache>,
    failures: Mutex<Failures>,
    failures_total: AtomicU64,
}

/// Failed operator authentications are audited per window of this many
/// seconds: one entry per source address with its count, not one per
/// request (they come from unauthenticated peers).
pub const AUTH_FAILURE_WINDOW: u64 = 60;

/// At most this many sources get their own entry per window; the
/// failures of every further source are summed in one more entry. So a
/// flood writes at most `AUTH_FAILURE_SOURCES + 1` audit entries a window
/// per center, however many requests or addresses it uses, and the
/// aggregate in memory holds at most as many sources.
pub const AUTH_FAILURE_SOURCES: usize = 16;

/// Why a request's token was not accepted (counted and audited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenialKind {
    /// No token, or one that is unknown, revoked or expired.
    Unauthenticated,
    /// A valid token without the role the route needs.
    Forbidden,
}

/// The failed authentications of the current window.
#[derive(Debug, Default)]
struct Failures {
    /// Start of the window (Unix seconds, a multiple of the window).
    window: u64,
    /// Per source: (unauthenticated, forbidden).
    by_source: std::collections::BTreeMap<String, (u64, u64)>,
    /// The sources beyond [`AUTH_FAILURE_SOURCES`], summed.
    other: (u64, u64),
    /// Whether a flush at the window's end is scheduled.
    armed: bool,
}

impl Failures {
    fn is_empty(&self) -> bool {
        self.by_source.is_empty() && self.other == (0, 0)
    }

    /// The window's audit entries (and resets it).
    fn take(&mut self) -> Vec<NewAudit> {
        let start = self.window;
        let end = start + AUTH_FAILURE_WINDOW;
        let entry = |actor: String, (u, f): (u64, u64)| {
            NewAudit::new(end, actor, "auth-failure").because(format!(
                "{} failed operator authentication(s) in [{start}, {end}): {u} without a valid token, {f} with a token lacking the role",
                u + f
            ))
        };
        let mut out: Vec<NewAudit> = std::mem::take(&mut self.by_source)
            .into_iter()
            .map(|(src, n)| entry(src, n))
            .collect();
        if self.other != (0, 0) {
            out.push(entry("other-sources".into(), self.other));
        }
        self.other = (0, 0);
        self.armed = false;
        out
    }
}

fn refused(reason: &'static str) {
    metrics::counter!("microcert_token_refusals_total", "reason" => reason).increment(1);
}

impl TokenStore {
    /// A store over the center's database (read at the first check).
    pub fn new(center: Arc<Center>) -> Self {
        TokenStore {
            center,
            cache: Mutex::new(Cache::default()),
            failures: Mutex::new(Failures::default()),
            failures_total: AtomicU64::new(0),
        }
    }

    /// Counts a refused token from `source` at `now` (Unix seconds) in
    /// the Prometheus counter (`microcert_auth_failures_total{kind}`, every
    /// one) and in the window's aggregate (bounded, see
    /// [`AUTH_FAILURE_SOURCES`]). Returns the audit entries of a window
    /// that this one closed (to be written with [`TokenStore::write_failures`])
    /// and whether the caller should schedule a flush at the end of the
    /// window this failure opened ([`TokenStore::closed_failures`]).
    pub fn note_denied(
        &self,
        source: Option<std::net::IpAddr>,
        kind: DenialKind,
        now: u64,
    ) -> (Vec<NewAudit>, bool) {
        let label = match kind {
            DenialKind::Unauthenticated => "unauthenticated",
            DenialKind::Forbidden => "forbidden",
        };
        metrics::counter!("microcert_auth_failures_total", "kind" => label).increment(1);
        self.failures_total.fetch_add(1, Ordering::Relaxed);
        let window = now - now % AUTH_FAILURE_WINDOW;
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let closed = if f.window != window && !f.is_empty() {
            f.take()
        } else {
            Vec::new()
        };
        if f.window != window {
            f.window = window;
            f.armed = false;
        }
        let src = source.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
        let full = f.by_source.len() >= AUTH_FAILURE_SOURCES;
        let f = &mut *f;
        let slot = if !full || f.by_source.contains_key(&src) {
            f.by_source.entry(src).or_default()
        } else {
            &mut f.other
        };
        match kind {
            DenialKind::Unauthenticated => slot.0 += 1,
            DenialKind::Forbidden => slot.1 += 1,
        }
        let arm = !f.armed;
        f.armed = true;
        (closed, arm)
    }

    /// How many refused tokens were counted since the start (what
    /// `microcert_auth_failures_total` sums).
    pub fn failures_total(&self) -> u64 {
        self.failures_total.load(Ordering::Relaxed)
    }

    /// The audit entries of the aggregate when its window ended before
    /// `now` (or, with `now` = None, at once: at shutdown, in tests).
    pub fn closed_failures(&self, now: Option<u64>) -> Vec<NewAudit> {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let ended = now.is_none_or(|t| t >= f.window + AUTH_FAILURE_WINDOW);
        if ended && !f.is_empty() {
            f.take()
        } else {
            Vec::new()
        }
    }

    /// Writes failed-authentication entries to the audit log (blocking).
    /// A failure is logged and counted: the entries are lost, the
    /// Prometheus counter still has them.
    pub fn write_failures(&self, entries: &[NewAudit]) {
        if entries.is_empty() {
            return;
        }
        if let Err(e) = self.center.record_audit(entries) {
            metrics::counter!("microcert_auth_failure_audit_errors_total").increment(1);
            tracing::error!(error = %e, entries = entries.len(), "cannot audit failed operator authentications");
        }
    }

    fn reload(&self, c: &mut Cache, now: Instant) {
        c.tried = Some(now);
        let db = self.center.database();
        for (hash, (used, failures)) in std::mem::take(&mut c.pending) {
            if let Err(e) = db.note_token_use(&hash, used, failures) {
                tracing::warn!(error = %e, "cannot record a token's use");
            }
        }
        // Rows of a token digest shard that does not match its rows (a
        // row put back from outside) are left out: refused until repaired.
        match self.center.trusted_tokens() {
            Ok(rows) => {
                let card = self.center.card();
                let secs = now_secs();
                c.rows = rows
                    .into_iter()
                    .filter(|r| {
                        let forged = token_status(card, r, secs) == TokenStatus::Forged;
                        if forged {
                            metrics::counter!("microcert_token_forged_rows_total").increment(1);
                            tracing::error!(
                                name = %r.name,
                                role = %r.role,
                                "a token row fails its card tag (edited outside the center): refused"
                            );
                        }
                        !forged
                    })
                    .map(|r| (r.hash.clone(), r))
                    .collect();
                c.loaded = Some(now);
            }
            Err(e) => tracing::warn!(error = %e, "cannot reload tokens"),
        }
    }

    /// The holder of a presented token if it may be used now.
    pub fn check(&self, token: &str) -> Option<TokenRecord> {
        let h = token_hash(token);
        let now = Instant::now();
        let mut c = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let stale = c.loaded.is_none_or(|t| now.duration_since(t) >= REFRESH);
        let may_retry = c.tried.is_none_or(|t| now.duration_since(t) >= MISS_RELOAD);
        if may_retry && (stale || !c.rows.contains_key(&h)) {
            self.reload(&mut c, now);
        }
        if c.loaded.is_none_or(|t| now.duration_since(t) >= STALE_MAX) {
            refused("unavailable");
            return None;
        }
        // The map is keyed by the hash; the stored row's tag was checked
        // at load and is checked again here (a row is only trusted with
        // its tag), which also compares the hash in constant time.
        let secs = now_secs();
        let Some(row) = c.rows.get(&h) else {
            refused("unknown");
            return None;
        };
        let status = token_status(self.center.card(), row, secs);
        let role = Role::from_name(&row.role);
        let name = row.name.clone();
        match (status, role) {
            (TokenStatus::Valid, Some(role)) => {
                c.pending.entry(h).or_default().0 = Some(secs);
                Some(TokenRecord { name, role })
            }
            (s, _) => {
                refused(if role.is_none() { "role" } else { s.name() });
                c.pending.entry(h).or_default().1 += 1;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use microcert_center::{CenterConfig, SoftwareCard};

    use super::*;

    fn center(dir: &Path) -> Arc<Center> {
        let card = Arc::new(SoftwareCard::ephemeral().unwrap());
        Arc::new(
            Center::open_sqlite(&dir.join("center.db"), card, CenterConfig::default()).unwrap(),
        )
    }

    #[test]
    fn token_is_stored_hashed_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let c = center(dir.path());
        let token = create(&c, Role::Operator, "alice", None, "test").unwrap();
        let rows = c.database().list_tokens().unwrap();
        assert_eq!(rows.len(), 1);
        assert_ne!(rows[0].hash, token.as_str());
        assert_eq!(rows[0].hash, token_hash(&token));
        let store = TokenStore::new(c.clone());
        let rec = store.check(&token).unwrap();
        assert_eq!((rec.name.as_str(), rec.role), ("alice", Role::Operator));
        assert!(store.check("mct_00").is_none());
    }

    #[test]
    fn a_second_verifier_with_the_same_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = center(dir.path());
        create(&c, Role::Verifier, "billing", None, "test").unwrap();
        assert!(create(&c, Role::Verifier, "billing", None, "test").is_err());
        assert!(create(&c, Role::Verifier, "", None, "test").is_err());
        // Once revoked, the name may be used again.
        assert_eq!(c.revoke_tokens("billing", None, "test", 1).unwrap(), 1);
        create(&c, Role::Verifier, "billing", None, "test").unwrap();
    }

    #[test]
    fn tokens_created_later_are_seen_by_a_running_store() {
        let dir = tempfile::tempdir().unwrap();
        let c = center(dir.path());
        let store = TokenStore::new(c.clone());
        assert!(store.check("mct_00").is_none());
        std::thread::sleep(MISS_RELOAD);
        let token = create(&c, Role::Admin, "root", None, "test").unwrap();
        assert!(store.check(&token).is_some());
    }

    #[test]
    fn a_revoked_token_stops_within_the_refresh_bound() {
        let dir = tempfile::tempdir().unwrap();
        let c = center(dir.path());
        let store = TokenStore::new(c.clone());
        let token = create(&c, Role::Operator, "alice", None, "test").unwrap();
        assert!(store.check(&token).is_some());
        c.revoke_tokens("alice", Some("operator"), "test", now_secs())
            .unwrap();
        std::thread::sleep(REFRESH);
        assert!(store.check(&token).is_none());
        // The refusal is counted in the row (written at the next reload).
        std::thread::sleep(REFRESH);
        assert!(store.check(&token).is_none());
        let row = &c.database().list_tokens().unwrap()[0];
        assert!(row.failures >= 1);
        assert!(row.last_used.is_some());
    }

    #[test]
    fn an_expired_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = center(dir.path());
        let t = c
            .create_token("short", "operator", Some(5), "test", now_secs() - 10)
            .unwrap();
        let store = TokenStore::new(c.clone());
        assert!(store.check(&t).is_none());
        let t = create(&c, Role::Operator, "long", Some(3600), "test").unwrap();
        // A token unknown to the cache is looked up at most every MISS_RELOAD.
        std::thread::sleep(MISS_RELOAD);
        assert!(store.check(&t).is_some());
    }

    #[test]
    fn a_legacy_token_file_is_imported_once_and_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let c = center(dir.path());
        let token = "mct_legacy_operator_token";
        let json = serde_json::json!([
            {"name": "alice", "role": "operator", "sha256": token_hash(token), "created": 1_700_000_000u64},
            {"name": "billing", "role": "verifier", "sha256": token_hash("mct_v"), "created": 1_700_000_001u64},
        ]);
        std::fs::write(dir.path().join("tokens.json"), json.to_string()).unwrap();
        assert_eq!(migrate_file(&c, dir.path()).unwrap(), Some(2));
        assert!(!dir.path().join("tokens.json").exists());
        assert!(dir.path().join("tokens.json.migrated").exists());
        assert_eq!(migrate_file(&c, dir.path()).unwrap(), None);
        // An interrupted migration (file put back) imports nothing twice.
        std::fs::copy(
            dir.path().join("tokens.json.migrated"),
            dir.path().join("tokens.json"),
        )
        .unwrap();
        assert_eq!(migrate_file(&c, dir.path()).unwrap(), Some(0));
        assert_eq!(c.database().list_tokens().unwrap().len(), 2);
        let store = TokenStore::new(c.clone());
        let rec = store.check(token).unwrap();
        assert_eq!((rec.name.as_str(), rec.role), ("alice", Role::Operator));
        let audit = c.audit_log(0, 100).unwrap();
        assert_eq!(
            audit
                .iter()
                .filter(|a| a.entry.action == "token-import")
                .count(),
            1
        );
    }

    #[test]
    fn a_corrupt_legacy_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = center(dir.path());
        std::fs::write(dir.path().join("tokens.json"), b"[{\"name\": 1}").unwrap();
        assert!(matches!(
            migrate_file(&c, dir.path()),
            Err(TokenError::Corrupt { .. })
        ));
        assert!(dir.path().join("tokens.json").exists());
        assert!(c.database().list_tokens().unwrap().is_empty());
    }
}
