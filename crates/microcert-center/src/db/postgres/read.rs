//! The read-only queries, over one connection.

use super::*;
use crate::db::{Blob, CommandRow};

fn limit_of(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

pub(super) fn device_view(c: &mut PgConn, id: DeviceId) -> Result<Option<DeviceView>> {
    let Some(row) = c.query_opt(
        &format!("SELECT {DEVICE_COLS} FROM devices WHERE id = $1"),
        &[&&id.0[..]],
    )?
    else {
        return Ok(None);
    };
    let device = device_row(&row)?;
    let seeds = c
        .query(
            &format!("SELECT {SEED_COLS_NO_CT} FROM seeds WHERE device = $1 ORDER BY generation"),
            &[&&id.0[..]],
        )?
        .iter()
        .map(seed_row)
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(DeviceView { device, seeds }))
}

pub(super) fn list_devices(c: &mut PgConn, q: &DeviceQuery) -> Result<Vec<DeviceView>> {
    let limit = if q.limit == 0 {
        100
    } else {
        q.limit.min(10_000)
    };
    let dcols = prefixed(DEVICE_COLS, "d");
    let scols = prefixed(SEED_COLS_NO_CT, "s");
    let sql = format!(
        "SELECT {dcols}, {scols} FROM devices d \
         LEFT JOIN seeds s ON s.device = d.id AND s.generation = d.highest_gen \
         WHERE ($1::bytea IS NULL OR d.id > $1) \
         AND ($2::text IS NULL OR s.state = $2) \
         AND ($3::smallint IS NULL OR d.class = $3) \
         AND ($4::integer IS NULL OR s.base_year + 4 <= $4) \
         ORDER BY d.id LIMIT $5"
    );
    let after = q.after.map(|d| d.0.to_vec());
    let state = q.state.map(|s| s.name());
    let class = q.class.map(small);
    let year = q.last_year_at_most.map(i32::from);
    let rows = c.query(&sql, &[&after, &state, &class, &year, &limit_of(limit)])?;
    rows.iter()
        .map(|r| {
            let device = device_row(r)?;
            let has_seed: Option<&[u8]> = g(r, 9)?;
            let seeds = match has_seed {
                Some(_) => vec![seed_row_at(r, 9)?],
                None => Vec::new(),
            };
            Ok(DeviceView { device, seeds })
        })
        .collect()
}

pub(super) fn devices_due(
    c: &mut PgConn,
    max_base_year: u16,
    after: Option<DeviceId>,
    limit: usize,
) -> Result<Vec<DeviceId>> {
    let rows = c.query(
        "SELECT d.id FROM devices d JOIN seeds s ON s.device = d.id AND s.generation = d.highest_gen \
         LEFT JOIN commands c ON c.device = d.id AND c.answered_at IS NULL \
         WHERE s.state = 'active' AND s.base_year <= $1 AND c.device IS NULL \
         AND ($2::bytea IS NULL OR d.id > $2) ORDER BY d.id LIMIT $3",
        &[
            &i32::from(max_base_year),
            &after.map(|d| d.0.to_vec()),
            &limit_of(limit),
        ],
    )?;
    rows.iter().map(|r| dev(g(r, 0)?)).collect()
}

pub(super) fn devices_to_expire(
    c: &mut PgConn,
    now: u64,
    year_now: u16,
    limit: usize,
) -> Result<Vec<DeviceId>> {
    let rows = c.query(
        "SELECT DISTINCT device FROM seeds WHERE state = 'active' \
         AND ((grace_until IS NOT NULL AND grace_until < $1) OR base_year + 4 < $2) \
         ORDER BY device LIMIT $3",
        &[&i(now), &i32::from(year_now), &limit_of(limit)],
    )?;
    rows.iter().map(|r| dev(g(r, 0)?)).collect()
}

pub(super) fn scan_seeds(
    c: &mut PgConn,
    after: Option<(DeviceId, u8)>,
    limit: usize,
) -> Result<Vec<SeedRow>> {
    let (d, gen_after) = match after {
        Some((d, gen_after)) => (Some(d.0.to_vec()), i16::from(gen_after)),
        None => (None, -1),
    };
    let rows = c.query(
        &format!(
            "SELECT {SEED_COLS} FROM seeds \
             WHERE $1::bytea IS NULL OR (device, generation) > ($1, $2::smallint) \
             ORDER BY device, generation LIMIT $3"
        ),
        &[&d, &gen_after, &limit_of(limit)],
    )?;
    rows.iter().map(seed_row).collect()
}

pub(super) fn scan_notary(
    c: &mut PgConn,
    after: Option<&NotaryRow>,
    limit: usize,
) -> Result<Vec<NotaryRow>> {
    let (d, gen_after, t, r, dg) = match after {
        Some(n) => (
            Some(n.device.0.to_vec()),
            small(n.generation),
            i64::from(n.t),
            i(n.r),
            n.digest.to_vec(),
        ),
        None => (None, 0, 0, 0, Vec::new()),
    };
    let rows = c.query(
        "SELECT device, generation, t, r, digest, tag, first_seen, seal FROM notary \
         WHERE $1::bytea IS NULL \
         OR (device, generation, t, r, digest) > ($1, $2::smallint, $3::bigint, $4::bigint, $5::bytea) \
         ORDER BY device, generation, t, r, digest LIMIT $6",
        &[&d, &gen_after, &t, &r, &dg, &limit_of(limit)],
    )?;
    rows.iter()
        .map(|row| {
            Ok(NotaryRow {
                device: dev(g(row, 0)?)?,
                generation: u8_of(g(row, 1)?)?,
                t: u32_of(g(row, 2)?)?,
                r: g::<i64>(row, 3)? as u64,
                digest: arr32(g(row, 4)?)?,
                tag: g(row, 5)?,
                first_seen: g::<i64>(row, 6)? as u64,
                seal: g::<Option<&[u8]>>(row, 7)?.map(arr32).transpose()?,
            })
        })
        .collect()
}

pub(super) fn scan_commands(
    c: &mut PgConn,
    after: Option<DeviceId>,
    limit: usize,
) -> Result<Vec<(CommandRow, Option<[u8; 32]>)>> {
    let after = after.map(|d| d.0.to_vec()).unwrap_or_default();
    let rows = c.query(
        "SELECT device, counter, opcode, generation, r, bytes, created, answered_at, status, \
         seal FROM commands WHERE device > $1 ORDER BY device LIMIT $2",
        &[&after, &limit_of(limit)],
    )?;
    rows.iter()
        .map(|row| {
            Ok((
                CommandRow {
                    device: dev(g(row, 0)?)?,
                    counter: u32_of(g(row, 1)?)?,
                    opcode: u8_of(g(row, 2)?)?,
                    generation: u8_of(g(row, 3)?)?,
                    r: g::<i64>(row, 4)? as u64,
                    bytes: Blob(g(row, 5)?),
                    created: g::<i64>(row, 6)? as u64,
                    answered_at: ou(g(row, 7)?),
                    status: g::<Option<i16>>(row, 8)?.map(u8_of).transpose()?,
                },
                g::<Option<&[u8]>>(row, 9)?.map(arr32).transpose()?,
            ))
        })
        .collect()
}

pub(super) fn digest_shards(c: &mut PgConn) -> Result<Vec<DigestShard>> {
    let rows = c.query(
        "SELECT shard, acc, count, seq, tag FROM digest ORDER BY shard",
        &[],
    )?;
    rows.iter()
        .map(|r| {
            Ok(DigestShard {
                shard: u8_of(g(r, 0)?)?,
                acc: arr32(g(r, 1)?)?,
                count: g::<i64>(r, 2)? as u64,
                seq: g::<i64>(r, 3)? as u64,
                tag: arr32(g(r, 4)?)?,
            })
        })
        .collect()
}

pub(super) fn audit_log(c: &mut PgConn, after: u64, limit: usize) -> Result<Vec<AuditRecord>> {
    let rows = c.query(
        "SELECT seq, time, actor, action, device, generation, reason, prev_hash, hash \
         FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
        &[&i(after), &limit_of(limit)],
    )?;
    rows.iter()
        .map(|r| {
            let device: Option<&[u8]> = g(r, 4)?;
            Ok(AuditRecord {
                seq: g::<i64>(r, 0)? as u64,
                entry: NewAudit {
                    time: g::<i64>(r, 1)? as u64,
                    actor: g(r, 2)?,
                    action: g(r, 3)?,
                    device: device.map(dev).transpose()?,
                    generation: g::<Option<i16>>(r, 5)?.map(u8_of).transpose()?,
                    reason: g(r, 6)?,
                },
                prev_hash: arr32(g(r, 7)?)?,
                hash: arr32(g(r, 8)?)?,
            })
        })
        .collect()
}

/// A device and all its seeds in one statement (a cold cache's load).
pub(super) fn load_device(
    c: &mut PgConn,
    id: DeviceId,
) -> Result<Option<(crate::db::DeviceRow, Vec<SeedRow>)>> {
    let dcols = prefixed(DEVICE_COLS, "d");
    let scols = prefixed(SEED_COLS, "s");
    let rows = c.query(
        &format!(
            "SELECT {dcols}, {scols} FROM devices d \
             LEFT JOIN seeds s ON s.device = d.id WHERE d.id = $1 ORDER BY s.generation"
        ),
        &[&&id.0[..]],
    )?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let device = device_row(first)?;
    let mut seeds = Vec::with_capacity(rows.len());
    for r in &rows {
        let has_seed: Option<&[u8]> = g(r, 9)?;
        if has_seed.is_some() {
            seeds.push(seed_row_at(r, 9)?);
        }
    }
    Ok(Some((device, seeds)))
}

/// Several devices and all their seeds in one statement: the cold loads
/// of concurrent verifications, grouped ([`super::ReadGroup`]). Devices
/// absent from the answer are not registered.
pub(super) fn load_devices(
    c: &mut PgConn,
    ids: &[DeviceId],
) -> Result<std::collections::HashMap<DeviceId, (crate::db::DeviceRow, Vec<SeedRow>)>> {
    let dcols = prefixed(DEVICE_COLS, "d");
    let scols = prefixed(SEED_COLS, "s");
    let keys: Vec<&[u8]> = ids.iter().map(|d| &d.0[..]).collect();
    let rows = c.query(
        &format!(
            "SELECT {dcols}, {scols} FROM devices d \
             LEFT JOIN seeds s ON s.device = d.id WHERE d.id = ANY($1) \
             ORDER BY d.id, s.generation"
        ),
        &[&keys],
    )?;
    let mut out: std::collections::HashMap<DeviceId, (crate::db::DeviceRow, Vec<SeedRow>)> =
        std::collections::HashMap::with_capacity(ids.len());
    for r in &rows {
        let device = device_row(r)?;
        let entry = out.entry(device.id).or_insert_with(|| (device, Vec::new()));
        let has_seed: Option<&[u8]> = g(r, 9)?;
        if has_seed.is_some() {
            entry.1.push(seed_row_at(r, 9)?);
        }
    }
    Ok(out)
}
