//! The PostgreSQL schema, as versioned migrations that mirror the SQLite
//! ones version for version (the same tables, keys and constraints; types
//! mapped: BLOB -> BYTEA, u8/u16 -> SMALLINT/INTEGER, u32/u64 -> BIGINT
//! holding the i64 of the same bits).

use tokio_postgres::Client;

use super::{block_on, pg_err};
use crate::{Error, Result};

/// Schema versions, applied in order; `schema_version` counts those
/// applied. Never edit an applied one: add the next (and the SQLite one of
/// the same number).
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE devices (
    id BYTEA PRIMARY KEY CHECK (length(id) = 8),
    class SMALLINT NOT NULL,
    suite SMALLINT NOT NULL,
    epoch SMALLINT NOT NULL,
    transport_open BOOLEAN NOT NULL,
    created BIGINT NOT NULL,
    highest_gen SMALLINT,
    command_counter BIGINT NOT NULL DEFAULT 0,
    tag BYTEA NOT NULL
);

CREATE TABLE seeds (
    device BYTEA NOT NULL REFERENCES devices(id),
    generation SMALLINT NOT NULL,
    state TEXT NOT NULL,
    base_year INTEGER NOT NULL,
    suite SMALLINT NOT NULL,
    kstore_version BIGINT NOT NULL,
    ciphertext BYTEA,
    tag BYTEA NOT NULL,
    via TEXT NOT NULL,
    enroll_t BIGINT NOT NULL,
    enroll_r BIGINT NOT NULL,
    enroll_digest BYTEA NOT NULL,
    receipt BYTEA NOT NULL,
    created BIGINT NOT NULL,
    activated_at BIGINT,
    suspended_at BIGINT,
    deactivated_at BIGINT,
    compromised_at BIGINT,
    destroyed_at BIGINT,
    grace_until BIGINT,
    PRIMARY KEY (device, generation)
);
CREATE UNIQUE INDEX seeds_enroll_nonce ON seeds (device, enroll_t, enroll_r);
CREATE INDEX seeds_state_year ON seeds (state, base_year);
CREATE INDEX seeds_grace ON seeds (grace_until) WHERE grace_until IS NOT NULL;

CREATE TABLE replay (
    device BYTEA NOT NULL,
    generation SMALLINT NOT NULL,
    t BIGINT NOT NULL,
    r BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    PRIMARY KEY (device, generation, t, r)
);
CREATE INDEX replay_expires ON replay (expires);

CREATE TABLE challenges (
    device BYTEA NOT NULL,
    c BYTEA NOT NULL,
    expires BIGINT NOT NULL,
    PRIMARY KEY (device, c)
);
CREATE INDEX challenges_expires ON challenges (expires);

CREATE TABLE notary (
    device BYTEA NOT NULL REFERENCES devices(id),
    generation SMALLINT NOT NULL,
    t BIGINT NOT NULL,
    r BIGINT NOT NULL,
    digest BYTEA NOT NULL,
    tag BYTEA NOT NULL,
    first_seen BIGINT NOT NULL,
    PRIMARY KEY (device, generation, t, r, digest)
);

CREATE TABLE commands (
    device BYTEA PRIMARY KEY REFERENCES devices(id),
    counter BIGINT NOT NULL,
    opcode SMALLINT NOT NULL,
    generation SMALLINT NOT NULL,
    r BIGINT NOT NULL,
    bytes BYTEA NOT NULL,
    created BIGINT NOT NULL,
    answered_at BIGINT,
    status SMALLINT
);

CREATE TABLE digest (
    shard SMALLINT PRIMARY KEY,
    acc BYTEA NOT NULL,
    count BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    tag BYTEA NOT NULL
);

CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    time BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    device BYTEA,
    generation SMALLINT,
    reason TEXT NOT NULL,
    prev_hash BYTEA NOT NULL,
    hash BYTEA NOT NULL
);
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END; $$;
CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();

CREATE TABLE imports (
    file_digest BYTEA PRIMARY KEY,
    next_line BIGINT NOT NULL,
    updated BIGINT NOT NULL
);
"#,
    // 2: card tags on notary records and commands (issue 12), as SQLite's 2.
    r#"
ALTER TABLE notary ADD COLUMN seal BYTEA;
ALTER TABLE commands ADD COLUMN seal BYTEA;
ALTER TABLE imports ADD COLUMN seal BYTEA;
"#,
    MIGRATION_META,
    MIGRATION_TOKENS,
    MIGRATION_KEYRING,
];

/// Migration "keyring" (issue 14): the same as SQLite's of that name.
const MIGRATION_KEYRING: &str = r#"
CREATE TABLE IF NOT EXISTS keyring (
    version BIGINT PRIMARY KEY,
    bytes BYTEA NOT NULL,
    tag BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_ms BIGINT NOT NULL,
    tag BYTEA NOT NULL
);
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
    created BIGINT NOT NULL,
    expires BIGINT,
    revoked BIGINT,
    last_used BIGINT,
    failures BIGINT NOT NULL DEFAULT 0,
    tag BYTEA NOT NULL
);
"#;

/// Migration "meta" (issue 14): the same as SQLite's of that name: the
/// database's identity (a random id drawn when the table is made) and the
/// id of the card last used with it.
const MIGRATION_META: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('database_id', replace(gen_random_uuid()::text, '-', '')) ON CONFLICT (key) DO NOTHING;
"#;

/// Advisory lock key that serialises migrations of several centers
/// starting at once against one database ("MCSCHEMA").
const MIGRATION_LOCK: i64 = 0x4d43_5343_4845_4d41;

/// Brings the schema up to date; returns the version found when anything
/// was migrated.
pub(super) fn migrate(client: &Client) -> Result<Option<u32>> {
    block_on(client.batch_execute(
        "BEGIN; CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL); COMMIT;",
    ))
    .or_else(|e| {
        // Two centers creating the table at the same moment: one loses
        // the race on the catalog's unique index, and the table exists.
        if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
            block_on(client.batch_execute("ROLLBACK"))
        } else {
            Err(e)
        }
    })
    .map_err(pg_err)?;
    block_on(async {
        client.batch_execute("BEGIN").await?;
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        Ok::<_, tokio_postgres::Error>(())
    })
    .map_err(pg_err)?;
    let result = apply(client);
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    block_on(client.batch_execute(end)).map_err(pg_err)?;
    result
}

fn apply(client: &Client) -> Result<Option<u32>> {
    let rows = block_on(client.query("SELECT version FROM schema_version", &[])).map_err(pg_err)?;
    let version: i32 = match rows.first() {
        Some(r) => r.get(0),
        None => {
            block_on(client.execute("INSERT INTO schema_version (version) VALUES (0)", &[]))
                .map_err(pg_err)?;
            0
        }
    };
    let known = MIGRATIONS.len() as i32;
    if version > known {
        return Err(Error::Database(format!(
            "database schema version {version} is newer than this program's {known}"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        block_on(client.batch_execute(sql)).map_err(pg_err)?;
        let v = i as i32 + 1;
        block_on(client.execute("UPDATE schema_version SET version = $1", &[&v]))
            .map_err(pg_err)?;
        tracing::info!(version = v, "PostgreSQL schema migrated");
    }
    // Outside the numbered migrations, so that it composes with any of
    // them (issue 12): named high-water marks with their card tags.
    block_on(client.batch_execute(
        "CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value BIGINT NOT NULL, tag BYTEA NOT NULL)",
    ))
    .map_err(pg_err)?;
    Ok((version < known).then_some(version as u32))
}
