//! The schema, as versioned migrations.

use rusqlite::{Connection, TransactionBehavior};

use crate::{Error, Result};

/// Schema versions, applied in order; `user_version` counts those applied.
/// Never edit an applied one: add the next.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE devices (
    id BLOB PRIMARY KEY CHECK (length(id) = 8),
    class INTEGER NOT NULL,
    suite INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    transport_open INTEGER NOT NULL,
    created INTEGER NOT NULL,
    highest_gen INTEGER,
    command_counter INTEGER NOT NULL DEFAULT 0,
    tag BLOB NOT NULL
) WITHOUT ROWID;

CREATE TABLE seeds (
    device BLOB NOT NULL REFERENCES devices(id),
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    base_year INTEGER NOT NULL,
    suite INTEGER NOT NULL,
    kstore_version INTEGER NOT NULL,
    ciphertext BLOB,
    tag BLOB NOT NULL,
    via TEXT NOT NULL,
    enroll_t INTEGER NOT NULL,
    enroll_r INTEGER NOT NULL,
    enroll_digest BLOB NOT NULL,
    receipt BLOB NOT NULL,
    created INTEGER NOT NULL,
    activated_at INTEGER,
    suspended_at INTEGER,
    deactivated_at INTEGER,
    compromised_at INTEGER,
    destroyed_at INTEGER,
    grace_until INTEGER,
    PRIMARY KEY (device, generation)
) WITHOUT ROWID;
CREATE UNIQUE INDEX seeds_enroll_nonce ON seeds (device, enroll_t, enroll_r);
CREATE INDEX seeds_state_year ON seeds (state, base_year);
CREATE INDEX seeds_grace ON seeds (grace_until) WHERE grace_until IS NOT NULL;

CREATE TABLE replay (
    device BLOB NOT NULL,
    generation INTEGER NOT NULL,
    t INTEGER NOT NULL,
    r INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (device, generation, t, r)
) WITHOUT ROWID;
CREATE INDEX replay_expires ON replay (expires);

CREATE TABLE challenges (
    device BLOB NOT NULL,
    c BLOB NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (device, c)
) WITHOUT ROWID;
CREATE INDEX challenges_expires ON challenges (expires);

CREATE TABLE notary (
    device BLOB NOT NULL REFERENCES devices(id),
    generation INTEGER NOT NULL,
    t INTEGER NOT NULL,
    r INTEGER NOT NULL,
    digest BLOB NOT NULL,
    tag BLOB NOT NULL,
    first_seen INTEGER NOT NULL,
    PRIMARY KEY (device, generation, t, r, digest)
) WITHOUT ROWID;

CREATE TABLE commands (
    device BLOB PRIMARY KEY REFERENCES devices(id),
    counter INTEGER NOT NULL,
    opcode INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    r INTEGER NOT NULL,
    bytes BLOB NOT NULL,
    created INTEGER NOT NULL,
    answered_at INTEGER,
    status INTEGER
) WITHOUT ROWID;

CREATE TABLE digest (
    shard INTEGER PRIMARY KEY,
    acc BLOB NOT NULL,
    count INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    tag BLOB NOT NULL
);

CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    time INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    device BLOB,
    generation INTEGER,
    reason TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;

CREATE TABLE imports (
    file_digest BLOB PRIMARY KEY,
    next_line INTEGER NOT NULL,
    updated INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    // 2: card tags on notary records and commands (issue 12). Rows written
    // before carry NULL until the center tags them right after this migration
    // (crate::integrity::upgrade_legacy).
    r#"
ALTER TABLE notary ADD COLUMN seal BLOB;
ALTER TABLE commands ADD COLUMN seal BLOB;
ALTER TABLE imports ADD COLUMN seal BLOB;
"#,
    MIGRATION_META,
    MIGRATION_TOKENS,
    MIGRATION_KEYRING,
];

/// Migration "keyring" (issue 14, shared state): the storage-key versions,
/// wrapped under the card's root key, and the head row (version 0) that
/// says which one is current, each with a card tag ([`crate::keyring`]);
/// and the leases that elect one center to run the periodic jobs.
const MIGRATION_KEYRING: &str = r#"
CREATE TABLE IF NOT EXISTS keyring (
    version INTEGER PRIMARY KEY,
    bytes BLOB NOT NULL,
    tag BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    tag BLOB NOT NULL
) WITHOUT ROWID;
"#;

/// Migration "tokens" (issue 14, shared state): the operator API's bearer
/// tokens, hashed, shared by every center on the database. `tag` is a card
/// tag over hash, name, role, created, expires and revoked
/// ([`crate::tokens::token_bytes`]); last_used and failures are bookkeeping.
const MIGRATION_TOKENS: &str = r#"
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER,
    revoked INTEGER,
    last_used INTEGER,
    failures INTEGER NOT NULL DEFAULT 0,
    tag BLOB NOT NULL
) WITHOUT ROWID;
"#;

/// Migration "meta" (issue 14, one configuration for every command): a
/// key/value table with the database's identity, a random id drawn when
/// the table is made (at creation for a new database, at the upgrade for
/// an old one), and the id of the card last used with it (written by the
/// CLI). Kept as its own step so other migrations can be appended beside.
const MIGRATION_META: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (key, value) VALUES ('database_id', lower(hex(randomblob(16))));
"#;

/// Named high-water marks shared by every center (issue 12: the pruning
/// high-water, the highest clock time seen), each with a card tag. Created
/// if missing outside the numbered migrations, so that it composes with
/// any of them.
const MARKS: &str = "
CREATE TABLE IF NOT EXISTS marks (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL,
    tag BLOB NOT NULL
) WITHOUT ROWID;";

/// Brings the schema up to date; returns the version found when anything
/// was migrated.
pub(super) fn migrate(conn: &mut Connection) -> Result<Option<u32>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
    let version: u32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as u32;
    if version > known {
        return Err(Error::Database(format!(
            "database schema version {version} is newer than this program's {known}"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as u32 + 1)?;
        tracing::info!(version = i + 1, "database schema migrated");
    }
    tx.execute_batch(MARKS)?;
    tx.commit()?;
    Ok((version < known).then_some(version))
}
