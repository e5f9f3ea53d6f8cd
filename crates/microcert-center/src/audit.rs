//! The audit log's hash chain: every entry's hash covers the previous
//! entry's hash, so an edited, deleted, inserted or reordered entry breaks
//! the chain from that point on (the card's tag over the chain head, which
//! makes truncation detectable too, is issue 5's).

use sha2::{Digest, Sha256};

use crate::db::{AuditRecord, NewAudit};

fn put_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

/// SHA-256("MC-AUDIT" 0x00 || prev || seq || time || actor || action ||
/// device || generation || reason), strings length-prefixed (u64), absent
/// device or generation as a 0 flag byte, present ones as 1 and the value.
pub fn chain_hash(prev: &[u8; 32], seq: u64, e: &NewAudit) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"MC-AUDIT\0");
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(e.time.to_be_bytes());
    put_str(&mut h, &e.actor);
    put_str(&mut h, &e.action);
    match e.device {
        Some(d) => {
            h.update([1]);
            h.update(d.0);
        }
        None => h.update([0]),
    }
    match e.generation {
        Some(g) => h.update([1, g]),
        None => h.update([0]),
    }
    put_str(&mut h, &e.reason);
    h.finalize().into()
}

/// Checks a run of consecutive entries starting after `prev` (0^32 before
/// the first entry); returns the seq of the first entry that breaks the
/// chain, if any.
pub fn verify_chain(prev: [u8; 32], entries: &[AuditRecord]) -> Option<u64> {
    let mut prev = prev;
    let first = entries.first().map(|e| e.seq)?;
    for (expect_seq, e) in (first..).zip(entries) {
        if e.seq != expect_seq
            || e.prev_hash != prev
            || chain_hash(&prev, e.seq, &e.entry) != e.hash
        {
            return Some(e.seq);
        }
        prev = e.hash;
    }
    None
}
