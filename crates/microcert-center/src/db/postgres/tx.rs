//! [`Tx`] over one PostgreSQL transaction.

use std::collections::{HashMap, HashSet};

use microcert_core::DeviceId;
use tokio_postgres::types::ToSql;

use super::PgConn;
use super::rows::*;
use crate::db::{
    AuditRecord, Blob, CommandRow, DeviceRow, DigestShard, ImportMark, NewAudit, NotaryKey,
    NotaryRow, ReplayAcc, ReplayKey, ReplayRow, SeedRow, Tx, one_row,
};
use crate::{DbFailure, Error, Result, audit};

/// Advisory lock keys (transaction-scoped): one per digest shard, one for
/// the audit chain. The high bits spell "MCDG" / "MCAU" so they do not
/// collide with another application's keys on a shared server.
const DIGEST_LOCK: i64 = 0x4d43_4447_0000_0000;
const AUDIT_LOCK: i64 = 0x4d43_4155_0000_0000;

pub(super) struct PgTx<'c> {
    pub(super) c: &'c mut PgConn,
    /// Whether any statement wrote: a transaction that only read ends
    /// with ROLLBACK, which unlike COMMIT waits for no WAL flush (its
    /// `FOR UPDATE` row lock alone would otherwise cost a durable commit
    /// on every cold-cache verification). Every method that writes sets
    /// it first.
    pub(super) wrote: bool,
    /// Devices whose records this transaction changed: other centers are
    /// told with NOTIFY, delivered when (and only if) it commits.
    pub(super) changed: Vec<DeviceId>,
    /// Inserts not sent yet (write-behind): sent as multi-row INSERTs
    /// before any other statement of this transaction and before it ends,
    /// so a batch of enrollments costs a few statements, not three per
    /// device. A failed insert fails the transaction, as it would have.
    pub(super) pending: Pending,
    /// Device rows read ahead under `FOR UPDATE` ([`Tx::prefetch_devices`]).
    pub(super) prefetched: HashMap<DeviceId, Option<DeviceRow>>,
    /// The audit chain's next (seq, prev_hash) once this transaction holds
    /// the audit lock (nobody else appends until it ends).
    pub(super) audit_head: Option<(u64, [u8; 32])>,
    /// Digest shards whose advisory lock this transaction holds (taken
    /// once, held to its end).
    pub(super) shard_locks: HashSet<u8>,
}

type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// The parameters of a statement, borrowed from owned values.
fn refs<'a>(
    values: impl Iterator<Item = &'a Box<dyn ToSql + Sync + Send>>,
) -> Vec<&'a (dyn ToSql + Sync)> {
    values.map(|b| &**b as &(dyn ToSql + Sync)).collect()
}

/// The values of a device row, in [`DEVICE_COLS`] order.
fn device_values(d: &DeviceRow) -> Params {
    vec![
        Box::new(d.id.0.to_vec()),
        Box::new(small(d.class)),
        Box::new(small(d.suite.id())),
        Box::new(small(d.epoch)),
        Box::new(d.transport_open),
        Box::new(i(d.created)),
        Box::new(d.highest_generation.map(small)),
        Box::new(i64::from(d.command_counter)),
        Box::new(d.tag.to_vec()),
    ]
}

/// The values of a seed row, in [`SEED_COLS`] order.
fn seed_values(s: &SeedRow) -> Params {
    vec![
        Box::new(s.device.0.to_vec()),
        Box::new(small(s.generation)),
        Box::new(s.state.name().to_string()),
        Box::new(i32::from(s.base_year)),
        Box::new(small(s.suite.id())),
        Box::new(i64::from(s.kstore_version)),
        Box::new(s.ciphertext.as_ref().map(|c| c.0.to_vec())),
        Box::new(s.tag.to_vec()),
        Box::new(s.via.name().to_string()),
        Box::new(i64::from(s.enroll_t)),
        Box::new(i(s.enroll_r)),
        Box::new(s.enroll_digest.to_vec()),
        Box::new(s.receipt.0.to_vec()),
        Box::new(i(s.created)),
        Box::new(oi(s.activated_at)),
        Box::new(oi(s.suspended_at)),
        Box::new(oi(s.deactivated_at)),
        Box::new(oi(s.compromised_at)),
        Box::new(oi(s.destroyed_at)),
        Box::new(oi(s.grace_until)),
    ]
}

/// The write-behind buffer of a transaction.
#[derive(Default)]
pub(super) struct Pending {
    devices: Vec<Params>,
    device_ids: HashSet<DeviceId>,
    seeds: Vec<Params>,
    audit: Vec<Params>,
    /// Digest rows to write (the last value of each shard).
    digests: Vec<DigestShard>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.devices.is_empty()
            && self.seeds.is_empty()
            && self.audit.is_empty()
            && self.digests.is_empty()
    }
}

const AUDIT_COLS: &str = "seq, time, actor, action, device, generation, reason, prev_hash, hash";

/// Rows per multi-row INSERT (seeds: 20 parameters a row, so 10,000
/// parameters of the 65,535 a statement may have).
const ROWS_PER_INSERT: usize = 500;

impl<'c> PgTx<'c> {
    pub(super) fn new(c: &'c mut PgConn) -> Self {
        PgTx {
            c,
            wrote: false,
            changed: Vec::new(),
            pending: Pending::default(),
            prefetched: HashMap::new(),
            audit_head: None,
            shard_locks: HashSet::new(),
        }
    }

    /// The connection, after the pending inserts were sent.
    fn conn(&mut self) -> Result<&mut PgConn> {
        self.flush()?;
        Ok(&mut *self.c)
    }

    /// Sends the pending inserts: devices, then seeds, then audit records.
    pub(super) fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let p = std::mem::take(&mut self.pending);
        for (table, cols, n, rows) in [
            ("devices", DEVICE_COLS, 9, p.devices),
            ("seeds", SEED_COLS, 20, p.seeds),
            ("audit", AUDIT_COLS, 9, p.audit),
        ] {
            for chunk in rows.chunks(ROWS_PER_INSERT) {
                let mut sql = format!("INSERT INTO {table} ({cols}) VALUES ");
                let mut k = 0;
                for (r, _) in chunk.iter().enumerate() {
                    if r > 0 {
                        sql.push(',');
                    }
                    sql.push('(');
                    for c in 0..n {
                        k += 1;
                        if c > 0 {
                            sql.push(',');
                        }
                        sql.push_str(&format!("${k}"));
                    }
                    sql.push(')');
                }
                let params: Vec<&(dyn ToSql + Sync)> =
                    chunk.iter().flat_map(|row| refs(row.iter())).collect();
                let n_rows = self.c.execute(&sql, &params)?;
                if n_rows != chunk.len() as u64 {
                    return Err(Error::db(
                        DbFailure::Corrupt,
                        format!("{table}: {n_rows} of {} rows inserted", chunk.len()),
                    ));
                }
            }
        }
        if !p.digests.is_empty() {
            // One statement for every digest row the transaction changed
            // (each shard at most once: its lock is held to the end).
            let mut sql = String::from("INSERT INTO digest (shard, acc, count, seq, tag) VALUES ");
            let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
            for (r, d) in p.digests.iter().enumerate() {
                if r > 0 {
                    sql.push(',');
                }
                let k = r * 5;
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, ${})",
                    k + 1,
                    k + 2,
                    k + 3,
                    k + 4,
                    k + 5
                ));
                params.push(Box::new(small(d.shard)));
                params.push(Box::new(d.acc.to_vec()));
                params.push(Box::new(i(d.count)));
                params.push(Box::new(i(d.seq)));
                params.push(Box::new(d.tag.to_vec()));
            }
            sql.push_str(
                " ON CONFLICT (shard) DO UPDATE SET acc = EXCLUDED.acc, count = EXCLUDED.count, \
                 seq = EXCLUDED.seq, tag = EXCLUDED.tag",
            );
            let refs: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|b| &**b as &(dyn ToSql + Sync)).collect();
            self.c.execute(&sql, &refs)?;
        }
        Ok(())
    }

    /// Takes a digest shard's advisory lock unless this transaction
    /// already holds it.
    fn lock_shard(&mut self, shard: u8) -> Result<()> {
        if self.shard_locks.contains(&shard) {
            return Ok(());
        }
        self.conn()?.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&(DIGEST_LOCK | i64::from(shard))],
        )?;
        self.shard_locks.insert(shard);
        Ok(())
    }

    fn touch(&mut self, id: DeviceId) {
        self.wrote = true;
        self.prefetched.remove(&id);
        if self.changed.last() != Some(&id) && !self.changed.contains(&id) {
            self.changed.push(id);
        }
    }

    /// Queues the NOTIFY of every changed device in this transaction.
    pub(super) fn notify_changes(&mut self) -> Result<()> {
        self.flush()?;
        if self.changed.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = self.changed.iter().map(|d| hex::encode(d.0)).collect();
        self.conn()?.execute(
            "SELECT pg_notify($1, x) FROM unnest($2::text[]) AS x",
            &[&super::CHANGES_CHANNEL, &ids],
        )?;
        Ok(())
    }
}

impl Tx for PgTx<'_> {
    fn device(&mut self, id: DeviceId) -> Result<Option<DeviceRow>> {
        if let Some(d) = self.prefetched.get(&id) {
            return Ok(d.clone());
        }
        // Unsent inserts of other devices do not change this row.
        let c = if self.pending.device_ids.contains(&id) {
            self.conn()?
        } else {
            &mut *self.c
        };
        c.query_opt(
            &format!("SELECT {DEVICE_COLS} FROM devices WHERE id = $1 FOR UPDATE"),
            &[&&id.0[..]],
        )?
        .map(|r| device_row(&r))
        .transpose()
    }

    fn insert_device(&mut self, d: &DeviceRow) -> Result<()> {
        self.touch(d.id);
        self.pending.device_ids.insert(d.id);
        self.pending.devices.push(device_values(d));
        Ok(())
    }
    fn update_device(&mut self, d: &DeviceRow) -> Result<()> {
        self.touch(d.id);
        let n = self.conn()?.execute(
            "UPDATE devices SET class = $2, suite = $3, epoch = $4, transport_open = $5, \
             created = $6, highest_gen = $7, command_counter = $8, tag = $9 WHERE id = $1",
            &refs(device_values(d).iter()),
        )?;
        one_row(n, || format!("device {}", d.id))
    }

    fn seeds(&mut self, id: DeviceId) -> Result<Vec<SeedRow>> {
        self.conn()?
            .query(
                &format!("SELECT {SEED_COLS} FROM seeds WHERE device = $1 ORDER BY generation"),
                &[&&id.0[..]],
            )?
            .iter()
            .map(seed_row)
            .collect()
    }

    fn seed_by_enroll_nonce(&mut self, id: DeviceId, t: u32, r: u64) -> Result<Option<SeedRow>> {
        self.conn()?.query_opt(
                &format!(
                    "SELECT {SEED_COLS} FROM seeds WHERE device = $1 AND enroll_t = $2 AND enroll_r = $3"
                ),
                &[&&id.0[..], &i64::from(t), &i(r)],
            )?
            .map(|r| seed_row(&r))
            .transpose()
    }

    fn insert_seed(&mut self, s: &SeedRow) -> Result<()> {
        self.touch(s.device);
        self.pending.seeds.push(seed_values(s));
        Ok(())
    }

    fn update_seed(&mut self, s: &SeedRow) -> Result<()> {
        self.touch(s.device);
        let v = seed_values(s);
        let n = self.conn()?.execute(
            "UPDATE seeds SET state = $3, base_year = $4, suite = $5, kstore_version = $6, \
             ciphertext = $7, tag = $8, activated_at = $9, suspended_at = $10, \
             deactivated_at = $11, compromised_at = $12, destroyed_at = $13, grace_until = $14 \
             WHERE device = $1 AND generation = $2",
            // The values of an insert but via, enroll_*, receipt and created
            // (the 9th to 14th), which never change.
            &refs(v[..8].iter().chain(&v[14..])),
        )?;
        one_row(n, || {
            format!("seed {} generation {}", s.device, s.generation)
        })
    }

    fn record_replay(&mut self, (id, generation, t, r, expires): ReplayKey) -> Result<bool> {
        self.wrote = true;
        // Of two concurrent inserts of one key (two centers), the second
        // waits for the first to commit and then inserts nothing.
        // Nothing is inserted for a record that would have expired before
        // the pruning high-water (shared by every center): its earlier
        // copy may have been pruned.
        let n = self.conn()?.execute(
            "INSERT INTO replay (device, generation, t, r, expires) \
             SELECT $1::bytea, $2::smallint, $3::bigint, $4::bigint, $5::bigint WHERE $5::bigint >= \
             COALESCE((SELECT value FROM marks WHERE name = 'pruned'), 0) \
             ON CONFLICT DO NOTHING",
            &[
                &&id.0[..],
                &small(generation),
                &i64::from(t),
                &i(r),
                &i(expires),
            ],
        )?;
        Ok(n == 1)
    }

    fn record_replays(&mut self, rows: &[ReplayKey]) -> Result<Vec<bool>> {
        if rows.len() <= 1 {
            return rows.iter().map(|&rec| self.record_replay(rec)).collect();
        }
        // A floor of 0 leaves only the stored pruning mark.
        self.record_replays_above(rows, 0)
    }

    fn record_replays_above(&mut self, rows: &[ReplayKey], floor: u64) -> Result<Vec<bool>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.wrote = true;
        let devices: Vec<&[u8]> = rows.iter().map(|x| &x.0.0[..]).collect();
        let gens: Vec<i16> = rows.iter().map(|x| small(x.1)).collect();
        let ts: Vec<i64> = rows.iter().map(|x| i64::from(x.2)).collect();
        let rs: Vec<i64> = rows.iter().map(|x| i(x.3)).collect();
        let es: Vec<i64> = rows.iter().map(|x| i(x.4)).collect();
        // As record_replays, with the floor the caller checked as well as
        // the stored mark.
        let inserted = self.conn()?.query(
            "INSERT INTO replay (device, generation, t, r, expires) \
             SELECT x.d, x.g, x.t, x.r, x.e \
             FROM unnest($1::bytea[], $2::smallint[], $3::bigint[], $4::bigint[], $5::bigint[]) \
             AS x(d, g, t, r, e) \
             WHERE x.e >= $6::bigint \
             AND x.e >= COALESCE((SELECT value FROM marks WHERE name = 'pruned'), 0) \
             ON CONFLICT DO NOTHING RETURNING device, generation, t, r",
            &[&devices, &gens, &ts, &rs, &es, &i(floor)],
        )?;
        let mut fresh = std::collections::HashSet::with_capacity(inserted.len());
        for row in &inserted {
            let d: &[u8] = g(row, 0)?;
            fresh.insert((
                d.to_vec(),
                g::<i16>(row, 1)?,
                g::<i64>(row, 2)?,
                g::<i64>(row, 3)?,
            ));
        }
        Ok(rows
            .iter()
            .map(|x| fresh.remove(&(x.0.0.to_vec(), small(x.1), i64::from(x.2), i(x.3))))
            .collect())
    }

    fn spend_challenge_above(&mut self, d: DeviceId, c: &[u8; 8], e: u64, m: u64) -> Result<bool> {
        self.wrote = true;
        let n = self.conn()?.execute(
            "INSERT INTO challenges (device, c, expires) SELECT $1::bytea, $2::bytea, $3::bigint \
             WHERE $3::bigint >= $4::bigint AND $3::bigint >= \
             COALESCE((SELECT value FROM marks WHERE name = 'pruned'), 0) ON CONFLICT DO NOTHING",
            &[&&d.0[..], &&c[..], &i(e), &i(m)],
        )?;
        Ok(n == 1)
    }

    fn read_mark(&mut self, name: &str) -> Result<Option<(u64, Vec<u8>)>> {
        // No lock: the hot path reads the pruning high-water per batch.
        Ok(self
            .conn()?
            .query_opt("SELECT value, tag FROM marks WHERE name = $1", &[&name])?
            .map(|r| (r.get::<_, i64>(0).max(0) as u64, r.get::<_, Vec<u8>>(1))))
    }

    fn marks(&mut self) -> Result<Vec<(String, u64, Vec<u8>)>> {
        super::read_marks(self.conn()?)
    }

    fn replay_rows(&mut self, ids: &[DeviceId]) -> Result<Vec<ReplayRow>> {
        let keys: Vec<&[u8]> = ids.iter().map(|d| &d.0[..]).collect();
        // Both tables in one round trip: kind 0 replay records, 1 spent
        // challenges (c in the fourth column).
        let rows = self.conn()?.query(
            "SELECT 0::smallint, device, generation, t, r, expires, NULL::bytea FROM replay \
             WHERE device = ANY($1::bytea[]) \
             UNION ALL SELECT 1::smallint, device, NULL::smallint, NULL::bigint, NULL::bigint, \
             expires, c FROM challenges WHERE device = ANY($1::bytea[])",
            &[&keys],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let device = dev(g(row, 1)?)?;
            let expires = g::<i64>(row, 5)?.max(0) as u64;
            if g::<i16>(row, 0)? == 0 {
                out.push(ReplayRow::Replay {
                    device,
                    generation: u8_of(g(row, 2)?)?,
                    t: u32_of(g(row, 3)?)?,
                    r: g::<i64>(row, 4)? as u64,
                    expires,
                });
            } else {
                let c: &[u8] = g(row, 6)?;
                let mut cc = [0u8; 8];
                let n = c.len().min(8);
                cc[..n].copy_from_slice(&c[..n]);
                out.push(ReplayRow::Challenge {
                    device,
                    c: cc,
                    expires: if c.len() == 8 { expires } else { u64::MAX },
                });
            }
        }
        Ok(out)
    }

    fn replay_accs(&mut self, ids: &[DeviceId]) -> Result<Vec<ReplayAcc>> {
        let keys: Vec<&[u8]> = ids.iter().map(|d| &d.0[..]).collect();
        // FOR UPDATE in device order: two batches touching the same
        // devices take turns, and lock them in the same order.
        let rows = self.conn()?.query(
            "SELECT device, acc, count, max_expires, tag FROM replay_acc \
             WHERE device = ANY($1::bytea[]) ORDER BY device FOR UPDATE",
            &[&keys],
        )?;
        rows.iter()
            .map(|r| {
                Ok(ReplayAcc {
                    device: dev(g(r, 0)?)?,
                    acc: arr32(g(r, 1)?)?,
                    count: g::<i64>(r, 2)?.max(0) as u64,
                    max_expires: g::<i64>(r, 3)?.max(0) as u64,
                    tag: arr32(g(r, 4)?)?,
                })
            })
            .collect()
    }

    fn put_replay_accs(&mut self, accs: &[ReplayAcc]) -> Result<()> {
        if accs.is_empty() {
            return Ok(());
        }
        self.wrote = true;
        let d: Vec<&[u8]> = accs.iter().map(|a| &a.device.0[..]).collect();
        let x: Vec<&[u8]> = accs.iter().map(|a| &a.acc[..]).collect();
        let n: Vec<i64> = accs.iter().map(|a| i(a.count)).collect();
        let m: Vec<i64> = accs.iter().map(|a| i(a.max_expires)).collect();
        let t: Vec<&[u8]> = accs.iter().map(|a| &a.tag[..]).collect();
        self.conn()?.execute(
            "INSERT INTO replay_acc (device, acc, count, max_expires, tag) \
             SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bigint[], $4::bigint[], $5::bytea[]) \
             ON CONFLICT (device) DO UPDATE SET acc = excluded.acc, count = excluded.count, \
             max_expires = excluded.max_expires, tag = excluded.tag",
            &[&d, &x, &n, &m, &t],
        )?;
        Ok(())
    }

    fn prune_replay_rows(&mut self, now: u64, limit: usize) -> Result<Vec<ReplayRow>> {
        self.wrote = true;
        let lim = i64::try_from(limit).unwrap_or(i64::MAX);
        let c = self.conn()?;
        let mut out = Vec::new();
        for row in c.query(
            "DELETE FROM replay WHERE ctid IN \
             (SELECT ctid FROM replay WHERE expires < $1 LIMIT $2) \
             RETURNING device, generation, t, r, expires",
            &[&i(now), &lim],
        )? {
            out.push(ReplayRow::Replay {
                device: dev(g(&row, 0)?)?,
                generation: u8_of(g(&row, 1)?)?,
                t: u32_of(g(&row, 2)?)?,
                r: g::<i64>(&row, 3)? as u64,
                expires: g::<i64>(&row, 4)?.max(0) as u64,
            });
        }
        let left = lim - out.len() as i64;
        if left <= 0 {
            return Ok(out);
        }
        for row in c.query(
            "DELETE FROM challenges WHERE ctid IN \
             (SELECT ctid FROM challenges WHERE expires < $1 LIMIT $2) \
             RETURNING device, c, expires",
            &[&i(now), &left],
        )? {
            out.push(challenge_of(&row)?);
        }
        Ok(out)
    }

    fn spend_challenge(&mut self, id: DeviceId, c: &[u8; 8], expires: u64) -> Result<bool> {
        self.wrote = true;
        let n = self.conn()?.execute(
            "INSERT INTO challenges (device, c, expires) SELECT $1::bytea, $2::bytea, $3::bigint WHERE $3::bigint >= \
             COALESCE((SELECT value FROM marks WHERE name = 'pruned'), 0) ON CONFLICT DO NOTHING",
            &[&&id.0[..], &&c[..], &i(expires)],
        )?;
        Ok(n == 1)
    }

    fn high_water(&mut self, name: &str) -> Result<Option<(u64, Vec<u8>)>> {
        // FOR UPDATE: two centers raising the same mark take turns.
        Ok(self
            .conn()?
            .query_opt(
                "SELECT value, tag FROM marks WHERE name = $1 FOR UPDATE",
                &[&name],
            )?
            .map(|r| (r.get::<_, i64>(0).max(0) as u64, r.get::<_, Vec<u8>>(1))))
    }

    fn set_high_water(&mut self, name: &str, value: u64, tag: &[u8]) -> Result<()> {
        self.wrote = true;
        self.conn()?.execute(
            "INSERT INTO marks (name, value, tag) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value, tag = excluded.tag",
            &[&name, &i(value), &tag],
        )?;
        Ok(())
    }

    fn insert_notary(&mut self, n: &NotaryRow) -> Result<bool> {
        self.wrote = true;
        let inserted = self.conn()?.execute(
            "INSERT INTO notary (device, generation, t, r, digest, tag, first_seen, seal) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            &[
                &&n.device.0[..],
                &small(n.generation),
                &i64::from(n.t),
                &i(n.r),
                &&n.digest[..],
                &&n.tag[..],
                &i(n.first_seen),
                &n.seal.as_ref().map(|s| &s[..]),
            ],
        )? == 1;
        Ok(inserted)
    }

    fn notary(
        &mut self,
        (id, generation, t, r, digest): NotaryKey<'_>,
    ) -> Result<Option<NotaryRow>> {
        let row = self.conn()?.query_opt(
            "SELECT tag, first_seen, seal FROM notary WHERE device = $1 AND generation = $2 \
             AND t = $3 AND r = $4 AND digest = $5",
            &[
                &&id.0[..],
                &small(generation),
                &i64::from(t),
                &i(r),
                &&digest[..],
            ],
        )?;
        row.map(|row| {
            Ok(NotaryRow {
                device: id,
                generation,
                t,
                r,
                digest: *digest,
                tag: g(&row, 0)?,
                first_seen: g::<i64>(&row, 1)? as u64,
                seal: g::<Option<&[u8]>>(&row, 2)?.map(arr32).transpose()?,
            })
        })
        .transpose()
    }

    fn set_seed_tag(&mut self, id: DeviceId, generation: u8, tag: &[u8; 32]) -> Result<()> {
        self.wrote = true;
        self.conn()?.execute(
            "UPDATE seeds SET tag = $3 WHERE device = $1 AND generation = $2",
            &[&&id.0[..], &small(generation), &&tag[..]],
        )?;
        Ok(())
    }

    fn set_notary_seal(&mut self, n: &NotaryRow) -> Result<()> {
        self.wrote = true;
        self.conn()?.execute(
            "UPDATE notary SET seal = $6 WHERE device = $1 AND generation = $2 AND t = $3 \
             AND r = $4 AND digest = $5",
            &[
                &&n.device.0[..],
                &small(n.generation),
                &i64::from(n.t),
                &i(n.r),
                &&n.digest[..],
                &n.seal.as_ref().map(|s| &s[..]),
            ],
        )?;
        Ok(())
    }

    fn command_sealed(&mut self, id: DeviceId) -> Result<Option<(CommandRow, Option<[u8; 32]>)>> {
        let row = self.conn()?.query_opt(
            "SELECT counter, opcode, generation, r, bytes, created, answered_at, status, seal \
             FROM commands WHERE device = $1",
            &[&&id.0[..]],
        )?;
        row.map(|row| {
            Ok((
                CommandRow {
                    device: id,
                    counter: u32_of(g(&row, 0)?)?,
                    opcode: u8_of(g(&row, 1)?)?,
                    generation: u8_of(g(&row, 2)?)?,
                    r: g::<i64>(&row, 3)? as u64,
                    bytes: Blob(g(&row, 4)?),
                    created: g::<i64>(&row, 5)? as u64,
                    answered_at: ou(g(&row, 6)?),
                    status: g::<Option<i16>>(&row, 7)?.map(u8_of).transpose()?,
                },
                g::<Option<&[u8]>>(&row, 8)?.map(arr32).transpose()?,
            ))
        })
        .transpose()
    }

    fn put_command_sealed(&mut self, c: &CommandRow, seal: Option<&[u8; 32]>) -> Result<()> {
        self.wrote = true;
        self.conn()?.execute(
            "INSERT INTO commands (device, counter, opcode, generation, r, bytes, created, \
             answered_at, status, seal) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (device) DO UPDATE SET counter = EXCLUDED.counter, \
             opcode = EXCLUDED.opcode, generation = EXCLUDED.generation, r = EXCLUDED.r, \
             bytes = EXCLUDED.bytes, created = EXCLUDED.created, \
             answered_at = EXCLUDED.answered_at, status = EXCLUDED.status, seal = EXCLUDED.seal",
            &[
                &&c.device.0[..],
                &i64::from(c.counter),
                &small(c.opcode),
                &small(c.generation),
                &i(c.r),
                &&c.bytes.0[..],
                &i(c.created),
                &oi(c.answered_at),
                &c.status.map(small),
                &seal.map(|s| &s[..]),
            ],
        )?;
        Ok(())
    }

    fn digest_shard(&mut self, shard: u8) -> Result<Option<DigestShard>> {
        // The lock is taken before the read and held to commit, so the
        // read-modify-write of a shard is serialised across centers, also
        // for its first write when there is no row to lock yet. Under READ
        // COMMITTED the SELECT after it sees the previous holder's commit.
        // Only this shard's unsent write matters to this read; the other
        // unsent rows stay buffered.
        if self.pending.digests.iter().any(|d| d.shard == shard) {
            self.flush()?;
        }
        const READ: &str = "SELECT acc, count, seq, tag FROM digest WHERE shard = $1";
        let row = if self.shard_locks.contains(&shard) {
            self.c.query_opt(READ, &[&small(shard)])?
        } else {
            // The lock and the read in one round trip; the read runs
            // after the lock is granted.
            let row =
                self.c
                    .locked_query_opt(DIGEST_LOCK | i64::from(shard), READ, &[&small(shard)])?;
            self.shard_locks.insert(shard);
            row
        };
        row.map(|row| {
            Ok(DigestShard {
                shard,
                acc: arr32(g(&row, 0)?)?,
                count: g::<i64>(&row, 1)? as u64,
                seq: g::<i64>(&row, 2)? as u64,
                tag: arr32(g(&row, 3)?)?,
            })
        })
        .transpose()
    }

    fn put_digest_shard(&mut self, s: &DigestShard) -> Result<()> {
        self.wrote = true;
        self.lock_shard(s.shard)?;
        // Write-behind, as the inserts: sent before the next read of this
        // shard and before the transaction ends.
        self.pending.digests.retain(|d| d.shard != s.shard);
        self.pending.digests.push(s.clone());
        Ok(())
    }

    fn append_audit(&mut self, e: &NewAudit) -> Result<()> {
        self.wrote = true;
        let (seq, prev) = match self.audit_head {
            Some(h) => h,
            None => {
                let c = self.conn()?;
                // The lock and the head's read in one round trip.
                let last = c.locked_query_opt(
                    AUDIT_LOCK,
                    "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                    &[],
                )?;
                match last {
                    Some(r) => (g::<i64>(&r, 0)? as u64 + 1, arr32(g(&r, 1)?)?),
                    None => (1, [0u8; 32]),
                }
            }
        };
        let hash = audit::chain_hash(&prev, seq, e);
        // The lock is held until this transaction ends: the head is ours.
        self.audit_head = Some((seq + 1, hash));
        self.pending.audit.push(audit_params(seq, e, &prev, &hash));
        Ok(())
    }

    fn delete_notary(&mut self, n: &NotaryRow) -> Result<bool> {
        self.wrote = true;
        let k = self.conn()?.execute(
            "DELETE FROM notary WHERE device = $1 AND generation = $2 AND t = $3 AND r = $4 \
             AND digest = $5",
            &[
                &&n.device.0[..],
                &small(n.generation),
                &i64::from(n.t),
                &i(n.r),
                &&n.digest[..],
            ],
        )?;
        Ok(k == 1)
    }

    fn delete_audit_through(&mut self, through: u64) -> Result<u64> {
        self.wrote = true;
        let n = self
            .conn()?
            .execute("DELETE FROM audit WHERE seq <= $1", &[&i(through)])?;
        Ok(n)
    }

    fn insert_audit_record(&mut self, r: &AuditRecord) -> Result<()> {
        self.wrote = true;
        if self.audit_head.is_none() {
            // The same lock as an append: the head is ours until the end.
            self.conn()?
                .execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK])?;
        }
        self.audit_head = Some((r.seq + 1, r.hash));
        let e = &r.entry;
        self.pending
            .audit
            .push(audit_params(r.seq, e, &r.prev_hash, &r.hash));
        Ok(())
    }

    fn prefetch_devices(&mut self, ids: &[DeviceId]) -> Result<()> {
        let ids: Vec<DeviceId> = ids
            .iter()
            .copied()
            .filter(|id| !self.prefetched.contains_key(id) && !self.pending.device_ids.contains(id))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let keys: Vec<&[u8]> = ids.iter().map(|d| &d.0[..]).collect();
        let rows = self.conn()?.query(
            &format!("SELECT {DEVICE_COLS} FROM devices WHERE id = ANY($1) FOR UPDATE"),
            &[&keys],
        )?;
        for id in &ids {
            self.prefetched.insert(*id, None);
        }
        for r in &rows {
            let d = device_row(r)?;
            self.prefetched.insert(d.id, Some(d));
        }
        Ok(())
    }

    fn delete_seed(&mut self, id: DeviceId, generation: u8) -> Result<bool> {
        self.touch(id);
        let n = self.conn()?.execute(
            "DELETE FROM seeds WHERE device = $1 AND generation = $2",
            &[&&id.0[..], &small(generation)],
        )?;
        Ok(n == 1)
    }

    fn import_progress_sealed(
        &mut self,
        file: &[u8; 32],
    ) -> Result<Option<(u64, Option<[u8; 32]>)>> {
        let row = self.conn()?.query_opt(
            "SELECT next_line, seal FROM imports WHERE file_digest = $1",
            &[&&file[..]],
        )?;
        row.map(|r| {
            Ok((
                g::<i64>(&r, 0)? as u64,
                g::<Option<&[u8]>>(&r, 1)?.map(arr32).transpose()?,
            ))
        })
        .transpose()
    }

    fn set_import_progress_sealed(&mut self, p: &ImportMark<'_>) -> Result<()> {
        let (file, next_line, now, seal) = (p.file, p.next_line, p.now, p.seal);
        self.wrote = true;
        self.conn()?.execute(
            "INSERT INTO imports (file_digest, next_line, updated, seal) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (file_digest) DO UPDATE SET next_line = EXCLUDED.next_line, \
             updated = EXCLUDED.updated, seal = EXCLUDED.seal",
            &[&&file[..], &i(next_line), &i(now), &seal.map(|s| &s[..])],
        )?;
        Ok(())
    }

    fn tokens(&mut self) -> Result<Vec<crate::db::TokenRow>> {
        let rows = self.c.query(
            &format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY created, hash"),
            &[],
        )?;
        rows.iter().map(token_row).collect()
    }

    fn insert_token(&mut self, t: &crate::db::TokenRow) -> Result<()> {
        self.wrote = true;
        self.c.execute(
            &format!(
                "INSERT INTO tokens ({TOKEN_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ),
            &[
                &t.hash,
                &t.name,
                &t.role,
                &i(t.created),
                &oi(t.expires),
                &oi(t.revoked),
                &oi(t.last_used),
                &i(t.failures),
                &t.tag,
            ],
        )?;
        Ok(())
    }

    fn update_token(&mut self, t: &crate::db::TokenRow) -> Result<()> {
        self.wrote = true;
        let n = self.c.execute(
            "UPDATE tokens SET expires = $2, revoked = $3, tag = $4 WHERE hash = $1",
            &[&t.hash, &oi(t.expires), &oi(t.revoked), &t.tag],
        )?;
        one_row(n, || "token".into())
    }

    fn keyring(&mut self) -> Result<Vec<crate::db::KeyringRow>> {
        let rows = self.c.query(
            "SELECT version, bytes, tag FROM keyring ORDER BY version",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                Ok(crate::db::KeyringRow {
                    version: u32::try_from(g::<i64>(r, 0)?).unwrap_or(u32::MAX),
                    bytes: g(r, 1)?,
                    tag: g(r, 2)?,
                })
            })
            .collect()
    }

    fn insert_keyring(&mut self, r: &crate::db::KeyringRow) -> Result<()> {
        self.wrote = true;
        self.c.execute(
            "INSERT INTO keyring (version, bytes, tag) VALUES ($1, $2, $3)",
            &[&i64::from(r.version), &r.bytes, &r.tag],
        )?;
        Ok(())
    }

    fn update_keyring(&mut self, r: &crate::db::KeyringRow, old_tag: &[u8]) -> Result<bool> {
        self.wrote = true;
        let n = self.c.execute(
            "UPDATE keyring SET bytes = $2, tag = $3 WHERE version = $1 AND tag = $4",
            &[&i64::from(r.version), &r.bytes, &r.tag, &old_tag],
        )?;
        Ok(n == 1)
    }

    fn delete_keyring(&mut self, version: u32) -> Result<bool> {
        self.wrote = true;
        let n = self.c.execute(
            "DELETE FROM keyring WHERE version = $1",
            &[&i64::from(version)],
        )?;
        Ok(n == 1)
    }
}

/// A challenge row (device, c, expires); a challenge of another length was
/// not written by a center and counts as a record no MAC matches.
fn challenge_of(row: &tokio_postgres::Row) -> Result<ReplayRow> {
    let c: &[u8] = g(row, 1)?;
    let mut cc = [0u8; 8];
    let n = c.len().min(8);
    cc[..n].copy_from_slice(&c[..n]);
    Ok(ReplayRow::Challenge {
        device: dev(g(row, 0)?)?,
        c: cc,
        expires: if c.len() == 8 {
            g::<i64>(row, 2)?.max(0) as u64
        } else {
            u64::MAX
        },
    })
}

/// The parameters of one audit row's insert (write-behind).
fn audit_params(seq: u64, e: &NewAudit, prev: &[u8; 32], hash: &[u8; 32]) -> Params {
    vec![
        Box::new(i(seq)),
        Box::new(i(e.time)),
        Box::new(e.actor.clone()),
        Box::new(e.action.clone()),
        Box::new(e.device.map(|d| d.0.to_vec())),
        Box::new(e.generation.map(small)),
        Box::new(e.reason.clone()),
        Box::new(prev.to_vec()),
        Box::new(hash.to_vec()),
    ]
}
