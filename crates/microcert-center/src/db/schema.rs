//! The schema text the two backends share: one template per migration
//! where the dialects differ only in words, each backend filling in its
//! own (SQLite: BLOB, INTEGER, WITHOUT ROWID; PostgreSQL: BYTEA, SMALLINT,
//! BIGINT, BOOLEAN). The filled-in text is each backend's migration, as
//! applied; never change what a template makes for an applied version.
//!
//! The words: `blob` bytes; `small` a u8 or u16; `big` a u32, u64 or
//! time; `boolean`; `keyed` what follows a table keyed by its primary key
//! alone (SQLite's " WITHOUT ROWID"); `audit_guard` the triggers that keep
//! the audit log append-only.

/// Version 1: the tables of PROTOCOL.md section 7.
#[rustfmt::skip]
macro_rules! schema_v1 {
    (
        blob = $blob:literal,
        small = $small:literal,
        big = $big:literal,
        boolean = $bool:literal,
        keyed = $keyed:literal,
        audit_guard = $guard:literal $(,)?
    ) => {
        concat!(
            "
CREATE TABLE devices (
    id ", $blob, " PRIMARY KEY CHECK (length(id) = 8),
    class ", $small, " NOT NULL,
    suite ", $small, " NOT NULL,
    epoch ", $small, " NOT NULL,
    transport_open ", $bool, " NOT NULL,
    created ", $big, " NOT NULL,
    highest_gen ", $small, ",
    command_counter ", $big, " NOT NULL DEFAULT 0,
    tag ", $blob, " NOT NULL
)", $keyed, ";

CREATE TABLE seeds (
    device ", $blob, " NOT NULL REFERENCES devices(id),
    generation ", $small, " NOT NULL,
    state TEXT NOT NULL,
    base_year INTEGER NOT NULL,
    suite ", $small, " NOT NULL,
    kstore_version ", $big, " NOT NULL,
    ciphertext ", $blob, ",
    tag ", $blob, " NOT NULL,
    via TEXT NOT NULL,
    enroll_t ", $big, " NOT NULL,
    enroll_r ", $big, " NOT NULL,
    enroll_digest ", $blob, " NOT NULL,
    receipt ", $blob, " NOT NULL,
    created ", $big, " NOT NULL,
    activated_at ", $big, ",
    suspended_at ", $big, ",
    deactivated_at ", $big, ",
    compromised_at ", $big, ",
    destroyed_at ", $big, ",
    grace_until ", $big, ",
    PRIMARY KEY (device, generation)
)", $keyed, ";
CREATE UNIQUE INDEX seeds_enroll_nonce ON seeds (device, enroll_t, enroll_r);
CREATE INDEX seeds_state_year ON seeds (state, base_year);
CREATE INDEX seeds_grace ON seeds (grace_until) WHERE grace_until IS NOT NULL;

CREATE TABLE replay (
    device ", $blob, " NOT NULL,
    generation ", $small, " NOT NULL,
    t ", $big, " NOT NULL,
    r ", $big, " NOT NULL,
    expires ", $big, " NOT NULL,
    PRIMARY KEY (device, generation, t, r)
)", $keyed, ";
CREATE INDEX replay_expires ON replay (expires);

CREATE TABLE challenges (
    device ", $blob, " NOT NULL,
    c ", $blob, " NOT NULL,
    expires ", $big, " NOT NULL,
    PRIMARY KEY (device, c)
)", $keyed, ";
CREATE INDEX challenges_expires ON challenges (expires);

CREATE TABLE notary (
    device ", $blob, " NOT NULL REFERENCES devices(id),
    generation ", $small, " NOT NULL,
    t ", $big, " NOT NULL,
    r ", $big, " NOT NULL,
    digest ", $blob, " NOT NULL,
    tag ", $blob, " NOT NULL,
    first_seen ", $big, " NOT NULL,
    PRIMARY KEY (device, generation, t, r, digest)
)", $keyed, ";

CREATE TABLE commands (
    device ", $blob, " PRIMARY KEY REFERENCES devices(id),
    counter ", $big, " NOT NULL,
    opcode ", $small, " NOT NULL,
    generation ", $small, " NOT NULL,
    r ", $big, " NOT NULL,
    bytes ", $blob, " NOT NULL,
    created ", $big, " NOT NULL,
    answered_at ", $big, ",
    status ", $small, "
)", $keyed, ";

CREATE TABLE digest (
    shard ", $small, " PRIMARY KEY,
    acc ", $blob, " NOT NULL,
    count ", $big, " NOT NULL,
    seq ", $big, " NOT NULL,
    tag ", $blob, " NOT NULL
);

CREATE TABLE audit (
    seq ", $big, " PRIMARY KEY,
    time ", $big, " NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    device ", $blob, ",
    generation ", $small, ",
    reason TEXT NOT NULL,
    prev_hash ", $blob, " NOT NULL,
    hash ", $blob, " NOT NULL
);
", $guard, "
CREATE TABLE imports (
    file_digest ", $blob, " PRIMARY KEY,
    next_line ", $big, " NOT NULL,
    updated ", $big, " NOT NULL
)", $keyed, ";
"
        )
    };
}

/// Version 2: card tags on notary records, commands and import progress
/// (issue 12).
#[rustfmt::skip]
macro_rules! schema_v2 {
    (blob = $blob:literal $(,)?) => {
        concat!(
            "
ALTER TABLE notary ADD COLUMN seal ", $blob, ";
ALTER TABLE commands ADD COLUMN seal ", $blob, ";
ALTER TABLE imports ADD COLUMN seal ", $blob, ";
"
        )
    };
}

/// Migration "tokens" (issue 14, shared state): the operator API's bearer
/// tokens, hashed, shared by every center on the database. `tag` is a card
/// tag over hash, name, role, created, expires and revoked
/// ([`crate::tokens::token_bytes`]); last_used and failures are bookkeeping.
#[rustfmt::skip]
macro_rules! schema_tokens {
    (blob = $blob:literal, big = $big:literal, keyed = $keyed:literal $(,)?) => {
        concat!(
            "
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    created ", $big, " NOT NULL,
    expires ", $big, ",
    revoked ", $big, ",
    last_used ", $big, ",
    failures ", $big, " NOT NULL DEFAULT 0,
    tag ", $blob, " NOT NULL
)", $keyed, ";
"
        )
    };
}

/// Asserts that the first migrations still make the text they made when
/// they were applied: `pinned` holds the SHA-256 (hex) of each.
#[cfg(test)]
pub(super) fn assert_pinned(migrations: &[&str], pinned: &[&str]) {
    use sha2::{Digest, Sha256};
    assert!(migrations.len() >= pinned.len());
    for (i, (m, h)) in migrations.iter().zip(pinned).enumerate() {
        assert_eq!(hex::encode(Sha256::digest(m)), *h, "migration {}", i + 1);
    }
}
