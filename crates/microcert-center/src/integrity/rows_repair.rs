//! Repair of the marks' digest shard (gap 3): which mark was deleted or put
//! back cannot be told from the shard, so every mark whose loss could
//! reopen something is set to its safe value before the shard is rebuilt
//! from the rows: the pruning high-water to at least now plus the instance
//! skew (no record that may have been pruned is inserted again), the clock
//! high-water to at least now, and the clock-step alarm raised (an
//! operator confirms the time with `microcert clock confirm`). Other marks
//! (the in-memory guard's marker) are kept as they are: their owners treat
//! a missing one as the unsafe case already. Audited.

use subtle::ConstantTimeEq;

use super::{MARK_SHARD, shard_bytes, tag32};
use crate::db::{DigestShard, MARK_CLOCK, MARK_PRUNED, NewAudit, with_tx};
use crate::{Center, Result};

/// The clock-step alarm's mark (see `crate::center::watch`).
const MARK_ALARM: &str = "clock_alarm";

impl Center {
    /// Whether the marks' digest shard matches the stored marks.
    pub fn mark_shard_ok(&self) -> Result<bool> {
        let card = self.card();
        crate::db::with_snapshot(self.database(), |db| {
            let marks = db.list_marks()?;
            let stored = db.digest_shards()?;
            let mut acc = [0u8; 32];
            for (_, _, tag) in &marks {
                for (a, t) in acc.iter_mut().zip(tag32(tag)) {
                    *a ^= t;
                }
            }
            Ok(match stored.iter().find(|s| s.shard == MARK_SHARD) {
                Some(s) => {
                    let tag = card.digest_tag(&shard_bytes(s))?;
                    bool::from(tag[..].ct_eq(&s.tag[..]) & s.acc[..].ct_eq(&acc[..]))
                        && s.count == marks.len() as u64
                }
                None => marks.is_empty(),
            })
        })
    }

    /// Makes the marks' digest shard whole again when it does not match
    /// the marks (see the module docs); returns whether it did anything.
    pub fn repair_mark_shard(&self, actor: &str, now: u64) -> Result<bool> {
        self.repair_mark_shard_behind(actor, now, None)
    }

    /// [`Center::repair_mark_shard`], also when the marks' shard is whole
    /// but older than the card's anchor `behind` saw it (marks put back
    /// together with their shard row): the marks get their safe values and
    /// the shard's count moves past the anchor's.
    pub fn repair_mark_shard_behind(
        &self,
        actor: &str,
        now: u64,
        behind: Option<&crate::anchor::Anchor>,
    ) -> Result<bool> {
        let floor = behind.map_or(0, |a| a.shard_seq[usize::from(MARK_SHARD)]);
        let stored_seq = self
            .database()
            .digest_shards()?
            .into_iter()
            .find(|s| s.shard == MARK_SHARD)
            .map_or(0, |s| s.seq);
        if stored_seq >= floor && self.mark_shard_ok()? {
            return Ok(false);
        }
        let card = self.card();
        let skew = self.config().instance_skew;
        with_tx(self.database(), |tx| {
            let good = |tx: &mut dyn crate::db::Tx, name: &str| -> Result<Option<u64>> {
                Ok(match tx.high_water(name)? {
                    Some((v, tag)) => {
                        let want = card.record_tag(&crate::center::mark_bytes(name, v))?;
                        bool::from(want[..].ct_eq(&tag[..])).then_some(v)
                    }
                    None => None,
                })
            };
            let pruned = good(tx, MARK_PRUNED)?
                .unwrap_or(0)
                .max(now.saturating_add(skew));
            let clock = good(tx, MARK_CLOCK)?.unwrap_or(0).max(now);
            let alarm = match good(tx, MARK_ALARM)? {
                Some(v) if v > 0 => v,
                _ => now.max(1),
            };
            for (name, value) in [
                (MARK_PRUNED, pruned),
                (MARK_CLOCK, clock),
                (MARK_ALARM, alarm),
            ] {
                let tag = card.record_tag(&crate::center::mark_bytes(name, value))?;
                tx.set_high_water(name, value, &tag)?;
            }
            let old = tx.digest_shard(MARK_SHARD)?;
            // The rows as this transaction wrote them.
            let rows = tx.marks()?;
            let mut s = DigestShard {
                shard: MARK_SHARD,
                acc: [0; 32],
                count: rows.len() as u64,
                seq: old.map_or(0, |o| o.seq).max(floor) + 1,
                tag: [0; 32],
            };
            for (_, _, tag) in &rows {
                for (a, t) in s.acc.iter_mut().zip(tag32(tag)) {
                    *a ^= t;
                }
            }
            s.tag = card.digest_tag(&shard_bytes(&s))?;
            tx.put_digest_shard(&s)?;
            crate::audit::append(
                tx,
                card,
                &NewAudit::new(now, actor, "mark-shard-repair").because(format!(
                        "the marks did not match their digest shard: pruning high-water {pruned}, clock high-water {clock}, clock-step alarm raised at {alarm} (confirm the time with `microcert clock confirm`)"
                    )),
            )?;
            tracing::warn!(
                pruned,
                clock,
                "marks' digest shard repaired; the clock-step alarm is raised until an operator confirms the time"
            );
            Ok(true)
        })
    }
}
