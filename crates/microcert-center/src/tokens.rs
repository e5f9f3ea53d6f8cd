//! Bearer tokens of the operator API, kept in the key database (issue 14:
//! shared state), so a token made at one center works at every center on
//! the same database and a revocation reaches them all.
//!
//! Only a token's SHA-256 is stored. The fields that decide what a token
//! may do (its hash, name, role, creation, expiry and revocation) are
//! covered by a card tag under its own domain ("MC-TOKEN-v1",
//! [`token_bytes`]): a row edited outside the center (a verifier turned
//! into an operator, an expiry pushed back, a revocation cleared, a row
//! inserted) fails its tag and is refused. `last_used` and `failures` are
//! bookkeeping and are not tagged. Creation, revocation and the import of
//! a legacy `tokens.json` are written to the audit log in the same
//! transaction as the rows.
//!
//! Every row also has its place in a token digest shard (16 shards by the
//! first hex digit of the hash, [`crate::integrity::TOKEN_BASE`]), updated
//! in the same transaction (gap 3 of SECURITY.md): a row put back to its
//! copy from before its revocation has a valid tag but no longer matches
//! its shard. Decision: the tokens of a shard that does not match its rows
//! are refused ([`Center::trusted_tokens`], what every server's token
//! cache loads, checked at each reload, so within its refresh bound), shown
//! as "unverified" by `token list`, and named by the integrity check,
//! until [`Center::repair_token_shards`] revokes every token of the shard
//! (audited; their holders get new tokens) and makes the shard whole
//! again. Refusing the whole shard, not just the row: which row was put
//! back cannot be told from the shard.

use microcert_core::Audience;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::card::EncryptionCard;
use crate::db::{DigestShard, NewAudit, TokenRow, with_snapshot, with_tx};
use crate::integrity::{self, SHARDS, TOKEN_BASE, tag32, token_shard};
use crate::{Center, Error, Result};

/// The roles a token may have (the server maps them to its routes).
pub const ROLES: [&str; 4] = ["admin", "operator", "auditor", "verifier"];

/// How many tokens (revoked ones included) the database keeps at most: a
/// bound on the table and on what every center holds in memory.
pub const MAX_TOKENS: usize = 10_000;

/// The longest token name (bytes).
pub const MAX_NAME: usize = 200;

/// SHA-256 of a presented token, lowercase hex (how tokens are stored).
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The canonical bytes a token row's card tag covers.
pub fn token_bytes(t: &TokenRow) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + t.hash.len() + t.name.len() + t.role.len());
    b.extend_from_slice(b"MC-TOKEN-v1");
    for s in [&t.hash, &t.name, &t.role] {
        b.extend_from_slice(&(s.len() as u32).to_be_bytes());
        b.extend_from_slice(s.as_bytes());
    }
    b.extend_from_slice(&t.created.to_be_bytes());
    for v in [t.expires, t.revoked] {
        match v {
            Some(v) => {
                b.push(1);
                b.extend_from_slice(&v.to_be_bytes());
            }
            None => b.extend_from_slice(&[0; 9]),
        }
    }
    b
}

/// Whether a token row's tag is the card's tag of its fields (constant
/// time in the tag).
pub fn token_tag_ok(card: &dyn EncryptionCard, t: &TokenRow) -> bool {
    match card.record_tag(&token_bytes(t)) {
        Ok(tag) => t.tag.len() == tag.len() && bool::from(tag[..].ct_eq(&t.tag[..])),
        Err(_) => false,
    }
}

/// What a stored token is worth at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStatus {
    /// It may be used.
    Valid,
    /// It was revoked.
    Revoked,
    /// Its expiry has passed.
    Expired,
    /// Its row fails its card tag: edited outside the center.
    Forged,
    /// Its row's digest shard does not match the shard's rows: a row of
    /// the shard was put back, deleted or inserted outside the center.
    /// Refused until [`Center::repair_token_shards`].
    Unverified,
}

impl TokenStatus {
    /// A short name (metrics labels, `token list`).
    pub const fn name(self) -> &'static str {
        match self {
            TokenStatus::Valid => "valid",
            TokenStatus::Revoked => "revoked",
            TokenStatus::Expired => "expired",
            TokenStatus::Forged => "forged",
            TokenStatus::Unverified => "unverified",
        }
    }
}

/// The status of `t` at `now`, its tag checked first.
pub fn token_status(card: &dyn EncryptionCard, t: &TokenRow, now: u64) -> TokenStatus {
    if !token_tag_ok(card, t) {
        TokenStatus::Forged
    } else if t.revoked.is_some() {
        TokenStatus::Revoked
    } else if t.expires.is_some_and(|e| now >= e) {
        TokenStatus::Expired
    } else {
        TokenStatus::Valid
    }
}

/// The token digest shards that do not match `rows` (their tag, their
/// XOR of the rows' tags, their count); a shard never written stands for
/// no row.
pub fn bad_token_shards(
    card: &dyn EncryptionCard,
    rows: &[TokenRow],
    shards: &[DigestShard],
) -> Result<Vec<u8>> {
    let mut acc = [([0u8; 32], 0u64); SHARDS as usize];
    for r in rows {
        let a = &mut acc[usize::from(token_shard(&r.hash) - TOKEN_BASE)];
        for (x, t) in a.0.iter_mut().zip(tag32(&r.tag)) {
            *x ^= t;
        }
        a.1 += 1;
    }
    let mut bad = Vec::new();
    for (i, (x, n)) in acc.iter().enumerate() {
        let shard = TOKEN_BASE + i as u8;
        let ok = match shards.iter().find(|s| s.shard == shard) {
            Some(s) => {
                let tag = card.digest_tag(&integrity::shard_bytes(s))?;
                bool::from(tag[..].ct_eq(&s.tag[..]) & s.acc[..].ct_eq(&x[..])) && s.count == *n
            }
            None => *n == 0,
        };
        if !ok {
            bad.push(shard);
        }
    }
    Ok(bad)
}

/// A token of a legacy `tokens.json` (its hash, never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyToken {
    /// SHA-256 of the token, hex.
    pub sha256: String,
    /// Its name.
    pub name: String,
    /// Its role's name.
    pub role: String,
    /// Unix seconds.
    pub created: u64,
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(Error::BadTokenName { max: MAX_NAME });
    }
    Ok(())
}

fn check_role(role: &str) -> Result<()> {
    if ROLES.contains(&role) {
        Ok(())
    } else {
        Err(Error::UnknownRole {
            role: role.to_owned(),
        })
    }
}

fn tag_row(card: &dyn EncryptionCard, t: &mut TokenRow) -> Result<()> {
    t.tag = card.record_tag(&token_bytes(t))?.to_vec();
    Ok(())
}

impl Center {
    /// Makes a token for `name` with `role`, valid for `ttl` seconds (None:
    /// until revoked), stores its hash with a card tag and audits it as
    /// `actor`; returns the token, which is shown once and never stored.
    ///
    /// Refused: a bad name or role, a valid token of the same name and
    /// role, a verifier whose audience is the center's or another valid
    /// verifier's, a full table ([`MAX_TOKENS`]).
    pub fn create_token(
        &self,
        name: &str,
        role: &str,
        ttl: Option<u64>,
        actor: &str,
        now: u64,
    ) -> Result<Zeroizing<String>> {
        check_name(name)?;
        check_role(role)?;
        if ttl == Some(0) {
            return Err(Error::TokenTtlZero);
        }
        let aud = Audience::relying_party(name);
        if role == "verifier" && aud.is_center() {
            return Err(Error::CenterAudience {
                name: name.to_owned(),
            });
        }
        let card = self.card();
        let mut raw = Zeroizing::new([0u8; 32]);
        card.random(&mut raw[..])?;
        let token = Zeroizing::new(format!("mct_{}", hex::encode(&raw[..])));
        let mut row = TokenRow {
            hash: token_hash(&token),
            name: name.to_owned(),
            role: role.to_owned(),
            created: now,
            expires: ttl.map(|t| now.saturating_add(t)),
            revoked: None,
            last_used: None,
            failures: 0,
            tag: Vec::new(),
        };
        tag_row(card, &mut row)?;
        let expiry = match row.expires {
            Some(e) => format!("expires at {e}"),
            None => "no expiry".to_owned(),
        };
        with_tx(self.database(), |tx| {
            // The audit append comes first: it serialises token changes
            // across centers (one writer / one advisory lock), so the
            // checks below see every committed token.
            self.audit(
                tx,
                now,
                actor,
                "token-create",
                (None, None),
                &format!("{role} token {name:?}, {expiry}"),
            )?;
            let rows = tx.tokens()?;
            if rows.len() >= MAX_TOKENS {
                return Err(Error::TooManyTokens { max: MAX_TOKENS });
            }
            for r in &rows {
                if token_status(card, r, now) != TokenStatus::Valid {
                    continue;
                }
                if r.name == name && r.role == role {
                    return Err(Error::TokenNameTaken {
                        name: name.to_owned(),
                        role: role.to_owned(),
                    });
                }
                if role == "verifier"
                    && r.role == "verifier"
                    && r.name != name
                    && Audience::relying_party(&r.name) == aud
                {
                    return Err(Error::AudienceTaken {
                        name: name.to_owned(),
                        other: r.name.clone(),
                    });
                }
            }
            tx.insert_token(&row)
        })?;
        Ok(token)
    }

    /// Revokes every unrevoked token named `name` (of `role` when given)
    /// and audits it as `actor`; returns how many were revoked. A matching
    /// row that fails its tag is refused (it was edited outside the center).
    pub fn revoke_tokens(
        &self,
        name: &str,
        role: Option<&str>,
        actor: &str,
        now: u64,
    ) -> Result<usize> {
        if let Some(r) = role {
            check_role(r)?;
        }
        let card = self.card();
        with_tx(self.database(), |tx| {
            let mut n = 0;
            let rows = tx.tokens()?;
            for mut r in rows {
                if r.name != name || role.is_some_and(|x| x != r.role) || r.revoked.is_some() {
                    continue;
                }
                if !token_tag_ok(card, &r) {
                    return Err(Error::TokenIntegrity {
                        role: r.role.clone(),
                        name: r.name.clone(),
                        hash_prefix: r.hash.chars().take(8).collect(),
                    });
                }
                r.revoked = Some(now);
                tag_row(card, &mut r)?;
                tx.update_token(&r)?;
                self.audit(
                    tx,
                    now,
                    actor,
                    "token-revoke",
                    (None, None),
                    &format!("{} token {:?} ({})", r.role, r.name, &r.hash[..8]),
                )?;
                n += 1;
            }
            Ok(n)
        })
    }

    /// Every stored token and the token shards that do not match them,
    /// read in one consistent view.
    fn tokens_and_bad_shards(&self) -> Result<(Vec<TokenRow>, Vec<u8>)> {
        let card = self.card();
        with_snapshot(self.database(), |db| {
            let rows = db.list_tokens()?;
            let shards = db.digest_shards()?;
            let bad = bad_token_shards(card, &rows, &shards)?;
            Ok((rows, bad))
        })
    }

    /// Every stored token with its status at `now` (tags and shards
    /// checked).
    pub fn list_tokens(&self, now: u64) -> Result<Vec<(TokenRow, TokenStatus)>> {
        let card = self.card();
        let (rows, bad) = self.tokens_and_bad_shards()?;
        Ok(rows
            .into_iter()
            .map(|t| {
                let s = match token_status(card, &t, now) {
                    TokenStatus::Forged => TokenStatus::Forged,
                    _ if bad.contains(&token_shard(&t.hash)) => TokenStatus::Unverified,
                    s => s,
                };
                (t, s)
            })
            .collect())
    }

    /// The stored tokens a server may trust (what its token cache loads):
    /// every row whose digest shard matches its rows (revoked, expired and
    /// forged rows included: the caller checks each row's status). The
    /// rows of a shard that does not match are left out, logged and
    /// counted (`microcert_token_shard_mismatch_total`).
    pub fn trusted_tokens(&self) -> Result<Vec<TokenRow>> {
        let (rows, bad) = self.tokens_and_bad_shards()?;
        if !bad.is_empty() {
            metrics::counter!("microcert_token_shard_mismatch_total").increment(1);
            tracing::error!(
                shards = ?bad,
                "token digest shards do not match their rows (a token row put back, deleted or inserted \
                 outside the center): their tokens are refused until `microcert integrity repair`"
            );
        }
        Ok(rows
            .into_iter()
            .filter(|t| !bad.contains(&token_shard(&t.hash)))
            .collect())
    }

    /// Makes every token digest shard that does not match its rows whole
    /// again: each token of such a shard that is not revoked is revoked
    /// (its row may be the one put back), then the shard is rebuilt from
    /// the rows, in one audited transaction. Returns how many shards were
    /// repaired. Forged rows (failing their own tag) are left as they are
    /// (refused) and counted in the shard as they stand.
    pub fn repair_token_shards(&self, actor: &str, now: u64) -> Result<usize> {
        self.repair_token_shards_behind(actor, now, None)
    }

    /// [`Center::repair_token_shards`], also for the shards that the card's
    /// anchor `behind` saw at a higher change count (a token row put back
    /// together with its shard row): their tokens are revoked too, and
    /// each rebuilt shard's count moves past the anchor's, so the next
    /// check finds it current.
    pub fn repair_token_shards_behind(
        &self,
        actor: &str,
        now: u64,
        behind: Option<&crate::anchor::Anchor>,
    ) -> Result<usize> {
        let card = self.card();
        with_tx(self.database(), |tx| {
            let rows = tx.tokens()?;
            let mut shards = Vec::new();
            for s in TOKEN_BASE..TOKEN_BASE + SHARDS {
                shards.extend(tx.digest_shard(s)?);
            }
            let mut bad = bad_token_shards(card, &rows, &shards)?;
            let floor = |shard: u8| behind.map_or(0, |a| a.shard_seq[usize::from(shard)]);
            for s in &shards {
                if s.seq < floor(s.shard) && !bad.contains(&s.shard) {
                    bad.push(s.shard);
                }
            }
            if bad.is_empty() {
                return Ok(0);
            }
            let mut revoked = 0usize;
            let mut kept = Vec::with_capacity(rows.len());
            for mut r in rows {
                if bad.contains(&token_shard(&r.hash))
                    && r.revoked.is_none()
                    && token_tag_ok(card, &r)
                {
                    r.revoked = Some(now);
                    tag_row(card, &mut r)?;
                    tx.update_token(&r)?;
                    revoked += 1;
                }
                kept.push(r);
            }
            for &shard in &bad {
                let old = tx.digest_shard(shard)?;
                let mut s = DigestShard {
                    shard,
                    acc: [0; 32],
                    count: 0,
                    seq: old.map_or(0, |o| o.seq).max(floor(shard)) + 1,
                    tag: [0; 32],
                };
                for r in kept.iter().filter(|r| token_shard(&r.hash) == shard) {
                    for (x, t) in s.acc.iter_mut().zip(tag32(&r.tag)) {
                        *x ^= t;
                    }
                    s.count += 1;
                }
                s.tag = card.digest_tag(&integrity::shard_bytes(&s))?;
                tx.put_digest_shard(&s)?;
            }
            crate::audit::append(
                tx,
                card,
                &NewAudit::new(now, actor, "token-shard-repair").because(format!(
                        "token digest shards {bad:?} did not match their rows: {revoked} token(s) revoked, shards rebuilt"
                    )),
            )?;
            tracing::warn!(shards = ?bad, revoked, "token digest shards repaired");
            Ok(bad.len())
        })
    }

    /// Imports the tokens of a legacy `tokens.json` (hashes only) that the
    /// database does not hold yet, tagged, with one audit entry; returns
    /// how many were imported. Safe to run again (an interrupted migration
    /// imports nothing twice).
    pub fn import_legacy_tokens(
        &self,
        tokens: &[LegacyToken],
        actor: &str,
        now: u64,
    ) -> Result<usize> {
        for t in tokens {
            check_name(&t.name)?;
            check_role(&t.role)?;
            if t.sha256.len() != 64
                || !t.sha256.bytes().all(|c| c.is_ascii_hexdigit())
                || t.sha256.bytes().any(|c| c.is_ascii_uppercase())
            {
                return Err(Error::BadLegacyToken {
                    name: t.name.clone(),
                });
            }
        }
        let card = self.card();
        with_tx(self.database(), |tx| {
            let have = tx.tokens()?;
            let new: Vec<&LegacyToken> = tokens
                .iter()
                .filter(|t| !have.iter().any(|h| h.hash == t.sha256))
                .collect();
            if new.is_empty() {
                return Ok(0);
            }
            if have.len() + new.len() > MAX_TOKENS {
                return Err(Error::TooManyTokens { max: MAX_TOKENS });
            }
            for t in &new {
                let mut row = TokenRow {
                    hash: t.sha256.clone(),
                    name: t.name.clone(),
                    role: t.role.clone(),
                    created: t.created,
                    expires: None,
                    revoked: None,
                    last_used: None,
                    failures: 0,
                    tag: Vec::new(),
                };
                tag_row(card, &mut row)?;
                tx.insert_token(&row)?;
            }
            self.audit(
                tx,
                now,
                actor,
                "token-import",
                (None, None),
                &format!("{} token(s) from a legacy tokens.json", new.len()),
            )?;
            Ok(new.len())
        })
    }
}
