//! Row conversions between PostgreSQL values and the record types.
//!
//! Integer mapping: u8 <-> SMALLINT (i16), u16 <-> INTEGER (i32),
//! u32 and u64 <-> BIGINT (the i64 of the same bits, as in SQLite).

use microcert_core::{DeviceId, KeyState, Suite};
use tokio_postgres::Row;

use crate::card::EnrollVia;
use crate::db::{Blob, DeviceRow, SeedRow};
use crate::{DbFailure, Error, Result};

/// A column's value, with the driver's error mapped.
pub(super) fn g<'a, T: tokio_postgres::types::FromSql<'a>>(r: &'a Row, idx: usize) -> Result<T> {
    r.try_get(idx).map_err(super::pg_err)
}

fn bad(what: &str) -> Error {
    Error::db(DbFailure::Corrupt, format!("stored {what} out of range"))
}

pub(super) fn dev(b: &[u8]) -> Result<DeviceId> {
    Ok(DeviceId(b.try_into().map_err(|_| bad("device id"))?))
}

pub(super) fn arr32(b: &[u8]) -> Result<[u8; 32]> {
    b.try_into().map_err(|_| bad("32-byte value"))
}

pub(super) fn u8_of(v: i16) -> Result<u8> {
    u8::try_from(v).map_err(|_| bad("small integer"))
}

pub(super) fn u16_of(v: i32) -> Result<u16> {
    u16::try_from(v).map_err(|_| bad("integer"))
}

pub(super) fn u32_of(v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| bad("32-bit integer"))
}

pub(super) fn i(v: u64) -> i64 {
    v as i64
}

pub(super) fn oi(v: Option<u64>) -> Option<i64> {
    v.map(i)
}

pub(super) fn ou(v: Option<i64>) -> Option<u64> {
    v.map(|x| x as u64)
}

pub(super) fn small(v: u8) -> i16 {
    i16::from(v)
}

pub(super) const DEVICE_COLS: &str =
    "id, class, suite, epoch, transport_open, created, highest_gen, command_counter, tag";

pub(super) fn device_row(r: &Row) -> Result<DeviceRow> {
    Ok(DeviceRow {
        id: dev(g(r, 0)?)?,
        class: u8_of(g(r, 1)?)?,
        suite: Suite::new(u8_of(g(r, 2)?)?).map_err(|_| bad("suite"))?,
        epoch: u8_of(g(r, 3)?)?,
        transport_open: g(r, 4)?,
        created: g::<i64>(r, 5)? as u64,
        highest_generation: g::<Option<i16>>(r, 6)?.map(u8_of).transpose()?,
        command_counter: u32_of(g(r, 7)?)?,
        tag: arr32(g(r, 8)?)?,
    })
}

pub(super) const SEED_COLS: &str = "device, generation, state, base_year, suite, kstore_version, ciphertext, \
     tag, via, enroll_t, enroll_r, enroll_digest, receipt, created, activated_at, suspended_at, \
     deactivated_at, compromised_at, destroyed_at, grace_until";

/// Seed columns with the ciphertext left out (operator queries).
pub(super) const SEED_COLS_NO_CT: &str = "device, generation, state, base_year, suite, kstore_version, NULL::bytea, \
     tag, via, enroll_t, enroll_r, enroll_digest, receipt, created, activated_at, suspended_at, \
     deactivated_at, compromised_at, destroyed_at, grace_until";

/// The seed columns prefixed with a table alias (the NULL placeholder
/// kept as is).
pub(super) fn prefixed(cols: &str, alias: &str) -> String {
    cols.split(", ")
        .map(|c| {
            let c = c.trim();
            if c.starts_with("NULL") {
                c.to_string()
            } else {
                format!("{alias}.{c}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn seed_row(r: &Row) -> Result<SeedRow> {
    seed_row_at(r, 0)
}

pub(super) fn seed_row_at(r: &Row, o: usize) -> Result<SeedRow> {
    let state: &str = g(r, o + 2)?;
    let via: &str = g(r, o + 8)?;
    Ok(SeedRow {
        device: dev(g(r, o)?)?,
        generation: u8_of(g(r, o + 1)?)?,
        state: KeyState::from_name(state).ok_or_else(|| bad("state"))?,
        base_year: u16_of(g(r, o + 3)?)?,
        suite: Suite::new(u8_of(g(r, o + 4)?)?).map_err(|_| bad("suite"))?,
        kstore_version: u32_of(g(r, o + 5)?)?,
        ciphertext: g::<Option<Vec<u8>>>(r, o + 6)?.map(Blob),
        tag: arr32(g(r, o + 7)?)?,
        via: EnrollVia::from_name(via).ok_or_else(|| bad("via"))?,
        enroll_t: u32_of(g(r, o + 9)?)?,
        enroll_r: g::<i64>(r, o + 10)? as u64,
        enroll_digest: arr32(g(r, o + 11)?)?,
        receipt: Blob(g(r, o + 12)?),
        created: g::<i64>(r, o + 13)? as u64,
        activated_at: ou(g(r, o + 14)?),
        suspended_at: ou(g(r, o + 15)?),
        deactivated_at: ou(g(r, o + 16)?),
        compromised_at: ou(g(r, o + 17)?),
        destroyed_at: ou(g(r, o + 18)?),
        grace_until: ou(g(r, o + 19)?),
    })
}

/// Token columns (issue 14).
pub(super) const TOKEN_COLS: &str =
    "hash, name, role, created, expires, revoked, last_used, failures, tag";

pub(super) fn token_row(r: &Row) -> Result<crate::db::TokenRow> {
    Ok(crate::db::TokenRow {
        hash: g(r, 0)?,
        name: g(r, 1)?,
        role: g(r, 2)?,
        created: g::<i64>(r, 3)? as u64,
        expires: ou(g(r, 4)?),
        revoked: ou(g(r, 5)?),
        last_used: ou(g(r, 6)?),
        failures: g::<i64>(r, 7)? as u64,
        tag: g(r, 8)?,
    })
}
