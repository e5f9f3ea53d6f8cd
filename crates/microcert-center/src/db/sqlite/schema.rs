//! The schema, as versioned migrations.

use rusqlite::{Connection, TransactionBehavior};

use crate::{DbFailure, Error, Result};

/// Schema versions, applied in order; `user_version` counts those applied.
/// Never edit an applied one: add the next.
pub(super) const MIGRATIONS: &[&str] = &[
    schema_v1!(
        blob = "BLOB",
        small = "INTEGER",
        big = "INTEGER",
        boolean = "INTEGER",
        keyed = " WITHOUT ROWID",
        audit_guard = "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
",
    ),
    // 2: card tags on notary records and commands (issue 12). Rows written
    // before carry NULL until the center tags them right after this migration
    // (crate::integrity::upgrade_legacy).
    schema_v2!(blob = "BLOB"),
    MIGRATION_META,
    MIGRATION_TOKENS,
    MIGRATION_REPLAY_ACC,
    MIGRATION_KEYRING,
    MIGRATION_AUDIT_ARCHIVE,
];

/// Migration "audit_archive" (issue 15 item 5, retention): the audit log
/// stays append-only except for the entries at or before the card-tagged
/// archive checkpoint (digest shard 254, written before the rows are
/// deleted, [`crate::audit_archive`]). Idempotent.
const MIGRATION_AUDIT_ARCHIVE: &str = "
DROP TRIGGER IF EXISTS audit_no_delete;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    WHEN OLD.seq > COALESCE((SELECT count FROM digest WHERE shard = 254), 0)
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
";

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

/// Migration "tokens" (issue 14, shared state): see `schema_tokens` in db/schema.rs.
const MIGRATION_TOKENS: &str =
    schema_tokens!(blob = "BLOB", big = "INTEGER", keyed = " WITHOUT ROWID");

/// Migration "replay_acc" (gap 2 of SECURITY.md): per device, the
/// card-keyed accumulator of its live replay records and spent challenges
/// (see [`crate::db::ReplayAcc`]). On a database that holds rows already,
/// it leaves `rows_cover` = "pending" in `meta`: the center then covers
/// them once ([`crate::integrity::cover_rows`]).
const MIGRATION_REPLAY_ACC: &str = r#"
CREATE TABLE IF NOT EXISTS replay_acc (
    device BLOB PRIMARY KEY,
    acc BLOB NOT NULL,
    count INTEGER NOT NULL,
    max_expires INTEGER NOT NULL,
    tag BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS marks (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL,
    tag BLOB NOT NULL
) WITHOUT ROWID;
INSERT OR REPLACE INTO meta (key, value) SELECT 'rows_cover',
    CASE WHEN EXISTS (SELECT 1 FROM devices) OR EXISTS (SELECT 1 FROM tokens)
        OR EXISTS (SELECT 1 FROM marks) THEN 'pending' ELSE 'done' END;
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
        return Err(Error::db(
            DbFailure::Schema,
            format!("database schema version {version} is newer than this program's {known}"),
        ));
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

#[cfg(test)]
#[test]
fn applied_migrations_keep_their_text() {
    crate::db::schema::assert_pinned(
        MIGRATIONS,
        &[
            "978c6ef97cd42d3ef168e6a9760b96329fc3b71c88d619e78aba88526b5616c9",
            "1eea762338e6516c7a9392539c752ca93bdc285eea10695027447f8360232182",
            "2869d28685670b601472b5acd8a86ca8e9e521da5017b6a63608769fa968dc7d",
            "335a1fd632a6846c3559cbd5ece291366923617a747b58611cdcbfaacd4653a7",
        ],
    );
}
