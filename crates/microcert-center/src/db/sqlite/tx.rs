//! [`Tx`] over one SQLite transaction.

use microcert_core::DeviceId;
use rusqlite::{OptionalExtension, params};

use super::rows::*;
use crate::db::{
    AuditRecord, CommandRow, DeviceRow, DigestShard, ImportMark, NewAudit, NotaryKey, NotaryRow,
    ReplayAcc, ReplayKey, ReplayRow, SeedRow, TokenRow, Tx, one_row,
};
use crate::{Result, audit};

/// The parameters ?1 to ?9 of a device row, in [`DEVICE_COLS`] order.
macro_rules! device_params {
    ($d:expr) => {
        params![
            &$d.id.0[..],
            $d.class,
            $d.suite.id(),
            $d.epoch,
            $d.transport_open,
            i($d.created),
            $d.highest_generation,
            $d.command_counter,
            &$d.tag[..]
        ]
    };
}

/// The parameters ?1 to ?20 of a seed row, in [`SEED_COLS`] order.
macro_rules! seed_params {
    ($s:expr) => {
        params![
            &$s.device.0[..],
            $s.generation,
            $s.state.name(),
            $s.base_year,
            $s.suite.id(),
            $s.kstore_version,
            $s.ciphertext.as_ref().map(|c| &c.0[..]),
            &$s.tag[..],
            $s.via.name(),
            $s.enroll_t,
            i($s.enroll_r),
            &$s.enroll_digest[..],
            &$s.receipt.0[..],
            i($s.created),
            oi($s.activated_at),
            oi($s.suspended_at),
            oi($s.deactivated_at),
            oi($s.compromised_at),
            oi($s.destroyed_at),
            oi($s.grace_until)
        ]
    };
}

pub(super) struct SqliteTx<'c> {
    pub(super) tx: &'c rusqlite::Transaction<'c>,
}

impl Tx for SqliteTx<'_> {
    fn device(&mut self, id: DeviceId) -> Result<Option<DeviceRow>> {
        let mut st = self
            .tx
            .prepare_cached(&format!("SELECT {DEVICE_COLS} FROM devices WHERE id = ?1"))?;
        Ok(st.query_row([&id.0[..]], device_row).optional()?)
    }

    fn insert_device(&mut self, d: &DeviceRow) -> Result<()> {
        let sql = format!(
            "INSERT INTO devices ({DEVICE_COLS}) VALUES ({})",
            placeholders(9)
        );
        self.tx.prepare_cached(&sql)?.execute(device_params!(d))?;
        Ok(())
    }

    fn update_device(&mut self, d: &DeviceRow) -> Result<()> {
        let mut st = self.tx.prepare_cached(
            "UPDATE devices SET class = ?2, suite = ?3, epoch = ?4, transport_open = ?5, \
             created = ?6, highest_gen = ?7, command_counter = ?8, tag = ?9 WHERE id = ?1",
        )?;
        let n = st.execute(device_params!(d))?;
        one_row(n as u64, || format!("device {}", d.id))
    }

    fn seeds(&mut self, id: DeviceId) -> Result<Vec<SeedRow>> {
        let mut st = self.tx.prepare_cached(&format!(
            "SELECT {SEED_COLS} FROM seeds WHERE device = ?1 ORDER BY generation"
        ))?;
        let rows = st.query_map([&id.0[..]], seed_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn seed_by_enroll_nonce(&mut self, id: DeviceId, t: u32, r: u64) -> Result<Option<SeedRow>> {
        let mut st = self.tx.prepare_cached(&format!(
            "SELECT {SEED_COLS} FROM seeds WHERE device = ?1 AND enroll_t = ?2 AND enroll_r = ?3"
        ))?;
        Ok(st
            .query_row(params![&id.0[..], t, i(r)], seed_row)
            .optional()?)
    }

    fn insert_seed(&mut self, s: &SeedRow) -> Result<()> {
        let sql = format!(
            "INSERT INTO seeds ({SEED_COLS}) VALUES ({})",
            placeholders(20)
        );
        self.tx.prepare_cached(&sql)?.execute(seed_params!(s))?;
        Ok(())
    }

    fn update_seed(&mut self, s: &SeedRow) -> Result<()> {
        let mut st = self.tx.prepare_cached(
            // The parameters of an insert; via, enroll_* , receipt and
            // created (?9 to ?14) never change.
            "UPDATE seeds SET state = ?3, base_year = ?4, suite = ?5, kstore_version = ?6, \
             ciphertext = ?7, tag = ?8, activated_at = ?15, suspended_at = ?16, \
             deactivated_at = ?17, compromised_at = ?18, destroyed_at = ?19, grace_until = ?20 \
             WHERE device = ?1 AND generation = ?2",
        )?;
        let n = st.execute(seed_params!(s))?;
        one_row(n as u64, || {
            format!("seed {} generation {}", s.device, s.generation)
        })
    }

    fn record_replay(&mut self, (id, generation, t, r, expires): ReplayKey) -> Result<bool> {
        // Nothing is inserted for a record that would have expired before
        // the pruning high-water: its earlier copy may have been pruned.
        let mut st = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO replay (device, generation, t, r, expires) \
             SELECT ?1, ?2, ?3, ?4, ?5 WHERE ?5 >= \
             COALESCE((SELECT value FROM marks WHERE name = 'pruned'), 0)",
        )?;
        Ok(st.execute(params![&id.0[..], generation, t, i(r), i(expires)])? == 1)
    }

    fn record_replays_above(&mut self, rows: &[ReplayKey], floor: u64) -> Result<Vec<bool>> {
        // The floor the caller checked, and the stored mark (which only
        // a center raises).
        let mut st = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO replay (device, generation, t, r, expires) \
             SELECT ?1, ?2, ?3, ?4, ?5 WHERE ?5 >= ?6 AND ?5 >= \
             COALESCE((SELECT value FROM marks WHERE name = 'pruned'), 0)",
        )?;
        rows.iter()
            .map(|&(d, g, t, r, e)| {
                Ok(st.execute(params![&d.0[..], g, t, i(r), i(e), i(floor)])? == 1)
            })
            .collect()
    }

    fn spend_challenge_above(&mut self, d: DeviceId, c: &[u8; 8], e: u64, m: u64) -> Result<bool> {
        let mut st = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO challenges (device, c, expires) \
             SELECT ?1, ?2, ?3 WHERE ?3 >= ?4 AND ?3 >= \
             COALESCE((SELECT value FROM marks WHERE name = 'pruned'), 0)",
        )?;
        Ok(st.execute(params![&d.0[..], &c[..], i(e), i(m)])? == 1)
    }

    fn marks(&mut self) -> Result<Vec<(String, u64, Vec<u8>)>> {
        let mut st = self
            .tx
            .prepare_cached("SELECT name, value, tag FROM marks ORDER BY name")?;
        let rows = st.query_map([], mark_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn replay_rows(&mut self, ids: &[DeviceId]) -> Result<Vec<ReplayRow>> {
        let mut out = Vec::new();
        let mut rs = self
            .tx
            .prepare_cached("SELECT generation, t, r, expires FROM replay WHERE device = ?1")?;
        for id in ids {
            let rows = rs.query_map([&id.0[..]], |r| {
                Ok(ReplayRow::Replay {
                    device: *id,
                    generation: r.get(0)?,
                    t: r.get(1)?,
                    r: r.get::<_, i64>(2)? as u64,
                    expires: r.get::<_, i64>(3)?.max(0) as u64,
                })
            })?;
            for row in rows {
                out.push(row?);
            }
        }
        let mut cs = self
            .tx
            .prepare_cached("SELECT c, expires FROM challenges WHERE device = ?1")?;
        for id in ids {
            let rows = cs.query_map([&id.0[..]], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
            })?;
            for row in rows {
                let (c, expires) = row?;
                // A challenge of another length was not written by a
                // center: it counts as a record no MAC matches.
                let mut cc = [0u8; 8];
                let n = c.len().min(8);
                cc[..n].copy_from_slice(&c[..n]);
                out.push(ReplayRow::Challenge {
                    device: *id,
                    c: cc,
                    expires: if c.len() == 8 { expires } else { u64::MAX },
                });
            }
        }
        Ok(out)
    }

    fn replay_accs(&mut self, ids: &[DeviceId]) -> Result<Vec<ReplayAcc>> {
        let mut st = self.tx.prepare_cached(
            "SELECT acc, count, max_expires, tag FROM replay_acc WHERE device = ?1",
        )?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let row = st
                .query_row([&id.0[..]], |r| {
                    Ok(ReplayAcc {
                        device: *id,
                        acc: arr32(r.get(0)?)?,
                        count: r.get::<_, i64>(1)?.max(0) as u64,
                        max_expires: r.get::<_, i64>(2)?.max(0) as u64,
                        tag: arr32(r.get(3)?)?,
                    })
                })
                .optional()?;
            out.extend(row);
        }
        Ok(out)
    }

    fn put_replay_accs(&mut self, accs: &[ReplayAcc]) -> Result<()> {
        let mut st = self.tx.prepare_cached(
            "INSERT INTO replay_acc (device, acc, count, max_expires, tag) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (device) DO UPDATE SET \
             acc = excluded.acc, count = excluded.count, \
             max_expires = excluded.max_expires, tag = excluded.tag",
        )?;
        for a in accs {
            st.execute(params![
                &a.device.0[..],
                &a.acc[..],
                i(a.count),
                i(a.max_expires),
                &a.tag[..]
            ])?;
        }
        Ok(())
    }

    fn prune_replay_rows(&mut self, now: u64, limit: usize) -> Result<Vec<ReplayRow>> {
        let mut out = Vec::new();
        let mut st = self.tx.prepare_cached(
            "DELETE FROM replay WHERE (device, generation, t, r) IN \
             (SELECT device, generation, t, r FROM replay WHERE expires < ?1 LIMIT ?2) \
             RETURNING device, generation, t, r, expires",
        )?;
        let rows = st.query_map(params![i(now), limit as i64], |r| {
            Ok(ReplayRow::Replay {
                device: dev(r.get(0)?)?,
                generation: r.get(1)?,
                t: r.get(2)?,
                r: r.get::<_, i64>(3)? as u64,
                expires: r.get::<_, i64>(4)?.max(0) as u64,
            })
        })?;
        for row in rows {
            out.push(row?);
        }
        let left = limit.saturating_sub(out.len());
        if left == 0 {
            return Ok(out);
        }
        let mut st = self.tx.prepare_cached(
            "DELETE FROM challenges WHERE (device, c) IN \
             (SELECT device, c FROM challenges WHERE expires < ?1 LIMIT ?2) \
             RETURNING device, c, expires",
        )?;
        let rows = st.query_map(params![i(now), left as i64], |r| {
            let c: Vec<u8> = r.get(1)?;
            let mut cc = [0u8; 8];
            let n = c.len().min(8);
            cc[..n].copy_from_slice(&c[..n]);
            Ok(ReplayRow::Challenge {
                device: dev(r.get(0)?)?,
                c: cc,
                expires: if c.len() == 8 {
                    r.get::<_, i64>(2)?.max(0) as u64
                } else {
                    u64::MAX
                },
            })
        })?;
        for row in rows {
            out.push(row?);
        }
        Ok(out)
    }

    fn spend_challenge(&mut self, id: DeviceId, c: &[u8; 8], expires: u64) -> Result<bool> {
        let mut st = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO challenges (device, c, expires) \
             SELECT ?1, ?2, ?3 WHERE ?3 >= \
             COALESCE((SELECT value FROM marks WHERE name = 'pruned'), 0)",
        )?;
        Ok(st.execute(params![&id.0[..], &c[..], i(expires)])? == 1)
    }

    fn high_water(&mut self, name: &str) -> Result<Option<(u64, Vec<u8>)>> {
        let mut st = self
            .tx
            .prepare_cached("SELECT value, tag FROM marks WHERE name = ?1")?;
        Ok(st
            .query_row([name], |r| {
                Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get::<_, Vec<u8>>(1)?))
            })
            .optional()?)
    }

    fn set_high_water(&mut self, name: &str, value: u64, tag: &[u8]) -> Result<()> {
        let mut st = self.tx.prepare_cached(
            "INSERT INTO marks (name, value, tag) VALUES (?1, ?2, ?3) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value, tag = excluded.tag",
        )?;
        st.execute(params![name, i(value), tag])?;
        Ok(())
    }

    fn insert_notary(&mut self, n: &NotaryRow) -> Result<bool> {
        let mut st = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO notary (device, generation, t, r, digest, tag, first_seen, \
             seal) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        let inserted = st.execute(params![
            &n.device.0[..],
            n.generation,
            n.t,
            i(n.r),
            &n.digest[..],
            &n.tag[..],
            i(n.first_seen),
            n.seal.as_ref().map(|s| &s[..])
        ])? == 1;
        Ok(inserted)
    }

    fn notary(
        &mut self,
        (id, generation, t, r, digest): NotaryKey<'_>,
    ) -> Result<Option<NotaryRow>> {
        let mut st = self.tx.prepare_cached(
            "SELECT tag, first_seen, seal FROM notary WHERE device = ?1 AND generation = ?2 \
             AND t = ?3 AND r = ?4 AND digest = ?5",
        )?;
        Ok(st
            .query_row(
                params![&id.0[..], generation, t, i(r), &digest[..]],
                |row| {
                    Ok(NotaryRow {
                        device: id,
                        generation,
                        t,
                        r,
                        digest: *digest,
                        tag: row.get(0)?,
                        first_seen: row.get::<_, i64>(1)? as u64,
                        seal: row.get::<_, Option<Vec<u8>>>(2)?.map(arr32).transpose()?,
                    })
                },
            )
            .optional()?)
    }

    fn set_seed_tag(&mut self, id: DeviceId, generation: u8, tag: &[u8; 32]) -> Result<()> {
        self.tx.execute(
            "UPDATE seeds SET tag = ?3 WHERE device = ?1 AND generation = ?2",
            params![&id.0[..], generation, &tag[..]],
        )?;
        Ok(())
    }

    fn set_notary_seal(&mut self, n: &NotaryRow) -> Result<()> {
        self.tx.execute(
            "UPDATE notary SET seal = ?6 WHERE device = ?1 AND generation = ?2 AND t = ?3 \
             AND r = ?4 AND digest = ?5",
            params![
                &n.device.0[..],
                n.generation,
                n.t,
                i(n.r),
                &n.digest[..],
                n.seal.as_ref().map(|s| &s[..])
            ],
        )?;
        Ok(())
    }

    fn command_sealed(&mut self, id: DeviceId) -> Result<Option<(CommandRow, Option<[u8; 32]>)>> {
        let mut st = self.tx.prepare_cached(&format!(
            "SELECT {COMMAND_COLS} FROM commands WHERE device = ?1"
        ))?;
        Ok(st.query_row([&id.0[..]], command_row).optional()?)
    }

    fn put_command_sealed(&mut self, c: &CommandRow, seal: Option<&[u8; 32]>) -> Result<()> {
        let mut st = self.tx.prepare_cached(
            "INSERT OR REPLACE INTO commands (device, counter, opcode, generation, r, bytes, \
             created, answered_at, status, seal) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        st.execute(params![
            &c.device.0[..],
            c.counter,
            c.opcode,
            c.generation,
            i(c.r),
            &c.bytes.0[..],
            i(c.created),
            oi(c.answered_at),
            c.status,
            seal.map(|s| &s[..])
        ])?;
        Ok(())
    }

    fn digest_shard(&mut self, shard: u8) -> Result<Option<DigestShard>> {
        let mut st = self
            .tx
            .prepare_cached("SELECT acc, count, seq, tag FROM digest WHERE shard = ?1")?;
        Ok(st
            .query_row([shard], |row| {
                Ok(DigestShard {
                    shard,
                    acc: arr32(row.get(0)?)?,
                    count: row.get::<_, i64>(1)? as u64,
                    seq: row.get::<_, i64>(2)? as u64,
                    tag: arr32(row.get(3)?)?,
                })
            })
            .optional()?)
    }

    fn put_digest_shard(&mut self, s: &DigestShard) -> Result<()> {
        let mut st = self.tx.prepare_cached(
            "INSERT OR REPLACE INTO digest (shard, acc, count, seq, tag) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        st.execute(params![
            s.shard,
            &s.acc[..],
            i(s.count),
            i(s.seq),
            &s.tag[..]
        ])?;
        Ok(())
    }

    fn append_audit(&mut self, e: &NewAudit) -> Result<()> {
        let last: Option<(i64, Vec<u8>)> = self
            .tx
            .prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let (seq, prev) = match last {
            Some((s, h)) => (s as u64 + 1, arr32(h)?),
            None => (1, [0u8; 32]),
        };
        let hash = audit::chain_hash(&prev, seq, e);
        self.insert_audit_row(seq, e, (&prev, &hash))
    }

    fn delete_notary(&mut self, n: &NotaryRow) -> Result<bool> {
        let k = self.tx.execute(
            "DELETE FROM notary WHERE device = ?1 AND generation = ?2 AND t = ?3 AND r = ?4 \
             AND digest = ?5",
            params![&n.device.0[..], n.generation, n.t, i(n.r), &n.digest[..]],
        )?;
        Ok(k == 1)
    }

    fn delete_audit_through(&mut self, through: u64) -> Result<u64> {
        let n = self
            .tx
            .execute("DELETE FROM audit WHERE seq <= ?1", params![i(through)])?;
        Ok(n as u64)
    }

    fn insert_audit_record(&mut self, r: &AuditRecord) -> Result<()> {
        self.insert_audit_row(r.seq, &r.entry, (&r.prev_hash, &r.hash))
    }

    fn import_progress_sealed(
        &mut self,
        file: &[u8; 32],
    ) -> Result<Option<(u64, Option<[u8; 32]>)>> {
        let mut st = self
            .tx
            .prepare_cached("SELECT next_line, seal FROM imports WHERE file_digest = ?1")?;
        Ok(st
            .query_row([&file[..]], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, Option<Vec<u8>>>(1)?.map(arr32).transpose()?,
                ))
            })
            .optional()?)
    }

    fn delete_seed(&mut self, id: DeviceId, generation: u8) -> Result<bool> {
        let mut st = self
            .tx
            .prepare_cached("DELETE FROM seeds WHERE device = ?1 AND generation = ?2")?;
        Ok(st.execute(params![&id.0[..], generation])? == 1)
    }

    fn set_import_progress_sealed(&mut self, p: &ImportMark<'_>) -> Result<()> {
        let (file, next_line, now, seal) = (p.file, p.next_line, p.now, p.seal);
        let mut st = self.tx.prepare_cached(
            "INSERT OR REPLACE INTO imports (file_digest, next_line, updated, seal) \
             VALUES (?1, ?2, ?3, ?4)",
        )?;
        st.execute(params![
            &file[..],
            i(next_line),
            i(now),
            seal.map(|s| &s[..])
        ])?;
        Ok(())
    }

    fn tokens(&mut self) -> Result<Vec<TokenRow>> {
        let mut st = self.tx.prepare_cached(&format!(
            "SELECT {TOKEN_COLS} FROM tokens ORDER BY created, hash"
        ))?;
        let rows = st.query_map([], token_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn insert_token(&mut self, t: &TokenRow) -> Result<()> {
        let mut st = self.tx.prepare_cached(&format!(
            "INSERT INTO tokens ({TOKEN_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
        ))?;
        st.execute(params![
            t.hash,
            t.name,
            t.role,
            i(t.created),
            oi(t.expires),
            oi(t.revoked),
            oi(t.last_used),
            i(t.failures),
            t.tag
        ])?;
        Ok(())
    }

    fn update_token(&mut self, t: &TokenRow) -> Result<()> {
        let mut st = self.tx.prepare_cached(
            "UPDATE tokens SET expires = ?2, revoked = ?3, tag = ?4 WHERE hash = ?1",
        )?;
        let n = st.execute(params![t.hash, oi(t.expires), oi(t.revoked), t.tag])?;
        one_row(n as u64, || "token".into())
    }

    fn keyring(&mut self) -> Result<Vec<crate::db::KeyringRow>> {
        let mut st = self
            .tx
            .prepare_cached("SELECT version, bytes, tag FROM keyring ORDER BY version")?;
        let rows = st.query_map([], |r| {
            Ok(crate::db::KeyringRow {
                version: u32::try_from(r.get::<_, i64>(0)?).unwrap_or(u32::MAX),
                bytes: r.get(1)?,
                tag: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn insert_keyring(&mut self, r: &crate::db::KeyringRow) -> Result<()> {
        self.tx
            .prepare_cached("INSERT INTO keyring (version, bytes, tag) VALUES (?1, ?2, ?3)")?
            .execute(params![i64::from(r.version), r.bytes, r.tag])?;
        Ok(())
    }

    fn update_keyring(&mut self, r: &crate::db::KeyringRow, old_tag: &[u8]) -> Result<bool> {
        let n = self
            .tx
            .prepare_cached(
                "UPDATE keyring SET bytes = ?2, tag = ?3 WHERE version = ?1 AND tag = ?4",
            )?
            .execute(params![i64::from(r.version), r.bytes, r.tag, old_tag])?;
        Ok(n == 1)
    }

    fn delete_keyring(&mut self, version: u32) -> Result<bool> {
        let n = self
            .tx
            .prepare_cached("DELETE FROM keyring WHERE version = ?1")?
            .execute(params![i64::from(version)])?;
        Ok(n == 1)
    }
}

/// "?1, ?2, ..., ?n": the placeholders of an n-column insert.
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|k| format!("?{k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl SqliteTx<'_> {
    /// Inserts one audit row with its place in the hash chain.
    fn insert_audit_row(
        &mut self,
        seq: u64,
        e: &NewAudit,
        (prev, hash): (&[u8; 32], &[u8; 32]),
    ) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO audit (seq, time, actor, action, device, generation, reason, \
                 prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                i(seq),
                i(e.time),
                e.actor,
                e.action,
                e.device.map(|d| d.0.to_vec()),
                e.generation,
                e.reason,
                &prev[..],
                &hash[..]
            ])?;
        Ok(())
    }
}
