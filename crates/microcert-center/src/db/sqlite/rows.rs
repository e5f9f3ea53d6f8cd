//! Row conversions between SQLite values and the record types.

use microcert_core::{DeviceId, KeyState, Suite};
use rusqlite::Row;

use crate::card::EnrollVia;
use crate::db::{Blob, DeviceRow, SeedRow};

pub(super) fn dev(b: Vec<u8>) -> rusqlite::Result<DeviceId> {
    let a: [u8; 8] = b.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            "device id".into(),
        )
    })?;
    Ok(DeviceId(a))
}

pub(super) fn arr32(b: Vec<u8>) -> rusqlite::Result<[u8; 32]> {
    b.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            "32-byte value".into(),
        )
    })
}

pub(super) fn conv(what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        what.to_string().into(),
    )
}

pub(super) fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|x| x as u64)
}

pub(super) const DEVICE_COLS: &str =
    "id, class, suite, epoch, transport_open, created, highest_gen, command_counter, tag";

pub(super) fn device_row(r: &Row<'_>) -> rusqlite::Result<DeviceRow> {
    Ok(DeviceRow {
        id: dev(r.get(0)?)?,
        class: r.get(1)?,
        suite: Suite::new(r.get(2)?).map_err(|_| conv("suite"))?,
        epoch: r.get(3)?,
        transport_open: r.get(4)?,
        created: r.get::<_, i64>(5)? as u64,
        highest_generation: r.get(6)?,
        command_counter: r.get(7)?,
        tag: arr32(r.get(8)?)?,
    })
}

pub(super) const SEED_COLS: &str = "device, generation, state, base_year, suite, kstore_version, ciphertext, \
     tag, via, enroll_t, enroll_r, enroll_digest, receipt, created, activated_at, suspended_at, \
     deactivated_at, compromised_at, destroyed_at, grace_until";

/// Seed columns with the ciphertext left out (operator queries).
pub(super) const SEED_COLS_NO_CT: &str = "device, generation, state, base_year, suite, kstore_version, NULL, \
     tag, via, enroll_t, enroll_r, enroll_digest, receipt, created, activated_at, suspended_at, \
     deactivated_at, compromised_at, destroyed_at, grace_until";

pub(super) fn seed_row(r: &Row<'_>) -> rusqlite::Result<SeedRow> {
    seed_row_at(r, 0)
}

pub(super) fn seed_row_at(r: &Row<'_>, o: usize) -> rusqlite::Result<SeedRow> {
    let state: String = r.get(o + 2)?;
    let via: String = r.get(o + 8)?;
    Ok(SeedRow {
        device: dev(r.get(o)?)?,
        generation: r.get(o + 1)?,
        state: KeyState::from_name(&state).ok_or_else(|| conv("state"))?,
        base_year: r.get(o + 3)?,
        suite: Suite::new(r.get(o + 4)?).map_err(|_| conv("suite"))?,
        kstore_version: r.get(o + 5)?,
        ciphertext: r.get::<_, Option<Vec<u8>>>(o + 6)?.map(Blob),
        tag: arr32(r.get(o + 7)?)?,
        via: EnrollVia::from_name(&via).ok_or_else(|| conv("via"))?,
        enroll_t: r.get(o + 9)?,
        enroll_r: r.get::<_, i64>(o + 10)? as u64,
        enroll_digest: arr32(r.get(o + 11)?)?,
        receipt: Blob(r.get(o + 12)?),
        created: r.get::<_, i64>(o + 13)? as u64,
        activated_at: opt_u64(r.get(o + 14)?),
        suspended_at: opt_u64(r.get(o + 15)?),
        deactivated_at: opt_u64(r.get(o + 16)?),
        compromised_at: opt_u64(r.get(o + 17)?),
        destroyed_at: opt_u64(r.get(o + 18)?),
        grace_until: opt_u64(r.get(o + 19)?),
    })
}

pub(super) fn i(v: u64) -> i64 {
    v as i64
}

pub(super) fn oi(v: Option<u64>) -> Option<i64> {
    v.map(i)
}

/// A mark: (name, value, tag), from `SELECT name, value, tag`.
pub(super) fn mark_row(r: &Row<'_>) -> rusqlite::Result<(String, u64, Vec<u8>)> {
    Ok((
        r.get::<_, String>(0)?,
        r.get::<_, i64>(1)?.max(0) as u64,
        r.get::<_, Vec<u8>>(2)?,
    ))
}

/// The columns [`command_row`] reads, in order.
pub(super) const COMMAND_COLS: &str =
    "device, counter, opcode, generation, r, bytes, created, answered_at, status, seal";

/// A command row and its card tag (None: written without one).
pub(super) fn command_row(
    row: &Row<'_>,
) -> rusqlite::Result<(crate::db::CommandRow, Option<[u8; 32]>)> {
    Ok((
        crate::db::CommandRow {
            device: dev(row.get(0)?)?,
            counter: row.get(1)?,
            opcode: row.get(2)?,
            generation: row.get(3)?,
            r: row.get::<_, i64>(4)? as u64,
            bytes: crate::db::Blob(row.get(5)?),
            created: row.get::<_, i64>(6)? as u64,
            answered_at: opt_u64(row.get(7)?),
            status: row.get(8)?,
        },
        row.get::<_, Option<Vec<u8>>>(9)?.map(arr32).transpose()?,
    ))
}

/// Token columns (issue 14).
pub(super) const TOKEN_COLS: &str =
    "hash, name, role, created, expires, revoked, last_used, failures, tag";

pub(super) fn token_row(r: &Row<'_>) -> rusqlite::Result<crate::db::TokenRow> {
    Ok(crate::db::TokenRow {
        hash: r.get(0)?,
        name: r.get(1)?,
        role: r.get(2)?,
        created: r.get::<_, i64>(3)? as u64,
        expires: opt_u64(r.get(4)?),
        revoked: opt_u64(r.get(5)?),
        last_used: opt_u64(r.get(6)?),
        failures: r.get::<_, i64>(7)? as u64,
        tag: r.get(8)?,
    })
}
