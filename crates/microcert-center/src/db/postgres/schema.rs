//! The PostgreSQL schema, as versioned migrations that mirror the SQLite
//! ones version for version (the same tables, keys and constraints; types
//! mapped: BLOB -> BYTEA, u8/u16 -> SMALLINT/INTEGER, u32/u64 -> BIGINT
//! holding the i64 of the same bits).

use tokio_postgres::Client;

use super::{block_on, pg_err};
use crate::{DbFailure, Error, Result};

/// Schema versions, applied in order; `schema_version` counts those
/// applied. Never edit an applied one: add the next (and the SQLite one of
/// the same number).
pub(super) const MIGRATIONS: &[&str] = &[
    schema_v1!(
        blob = "BYTEA",
        small = "SMALLINT",
        big = "BIGINT",
        boolean = "BOOLEAN",
        keyed = "",
        audit_guard = "CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END; $$;
CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
",
    ),
    // 2: card tags on notary records and commands (issue 12), as SQLite's 2.
    schema_v2!(blob = "BYTEA"),
    MIGRATION_META,
    MIGRATION_TOKENS,
    MIGRATION_REPLAY_ACC,
    MIGRATION_KEYRING,
    MIGRATION_AUDIT_ARCHIVE,
];

/// Migration "audit_archive" (issue 15 item 5): the same as SQLite's of
/// that name: deletes only of entries at or before the archive checkpoint
/// (digest shard 254); updates and TRUNCATE stay refused. Idempotent.
const MIGRATION_AUDIT_ARCHIVE: &str = r#"
CREATE OR REPLACE FUNCTION audit_delete_archived() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN
        IF OLD.seq <= COALESCE((SELECT count FROM digest WHERE shard = 254), 0) THEN
            RETURN OLD;
        END IF;
        RAISE EXCEPTION 'the audit log is append-only';
    END; $$;
DROP TRIGGER IF EXISTS audit_no_update ON audit;
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
DROP TRIGGER IF EXISTS audit_no_delete ON audit;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_delete_archived();
"#;

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

/// Migration "tokens" (issue 14, shared state): see `schema_tokens` in db/schema.rs.
const MIGRATION_TOKENS: &str = schema_tokens!(blob = "BYTEA", big = "BIGINT", keyed = "");

/// Migration "replay_acc" (gap 2 of SECURITY.md): the same as SQLite's of
/// that name: per device, the card-keyed accumulator of its live replay
/// records and spent challenges.
const MIGRATION_REPLAY_ACC: &str = r#"
CREATE TABLE IF NOT EXISTS replay_acc (
    device BYTEA PRIMARY KEY,
    acc BYTEA NOT NULL,
    count BIGINT NOT NULL,
    max_expires BIGINT NOT NULL,
    tag BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value BIGINT NOT NULL, tag BYTEA NOT NULL);
INSERT INTO meta (key, value) SELECT 'rows_cover',
    CASE WHEN EXISTS (SELECT 1 FROM devices) OR EXISTS (SELECT 1 FROM tokens)
        OR EXISTS (SELECT 1 FROM marks) THEN 'pending' ELSE 'done' END
ON CONFLICT (key) DO UPDATE SET value = excluded.value;
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
        return Err(Error::db(
            DbFailure::Schema,
            format!("database schema version {version} is newer than this program's {known}"),
        ));
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

#[cfg(test)]
#[test]
fn applied_migrations_keep_their_text() {
    crate::db::schema::assert_pinned(
        MIGRATIONS,
        &[
            "a6f8975a21323df679a6bd2e8e1681f5e8480988adaf826bb4d6813d0b305f66",
            "93e277ac65cfae6aa49a55eafb4103e43f6a630e5d1a0e150d645113d9e08b15",
            "4cab09207c33f23835c4df439768e1499c0ee9cd099b4cc1b88138fa3e0bc7d0",
            "dcce37c8c311480a8e6ed1de526a0961c23c5224f676ef14c12a6b0a4a318ee8",
        ],
    );
}
