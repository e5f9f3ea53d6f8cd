//! Which key database a card was last used with (issue 14), recorded on
//! both sides so a command pointed at another database by mistake is
//! caught before it changes anything:
//!
//! - the database records the card: `card_id` (16 hex digits derived from
//!   the card's digest key, so clones of one card share it) and
//!   `card_tag`, a card tag over (database id, card id), in its `meta`
//!   table beside its own random `database_id`;
//! - the card's data directory records the database: `DATA/database.binding`
//!   with the database id, its location (for messages) and a card tag over
//!   (database id, card id).
//!
//! Commands that write record both on first use and refuse a mismatch;
//! destructive ones (storage-key rotation, integrity repair) also refuse
//! while either side is unrecorded; read-only ones only warn. `card bind`
//! records a move to another database on purpose.

use std::path::Path;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::{Site, SiteError, SiteResult};
use crate::{Center, EncryptionCard};

/// What a command does to the database: decides what the check demands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only (audit verify/export, backup verify): a mismatch is a
    /// warning; nothing is recorded.
    ReadOnly,
    /// Writes (serve, factory, backup create, integrity check-local, which
    /// refreshes the anchor): a mismatch is refused; on first use both
    /// sides are recorded.
    Write,
    /// Changes or destroys what cannot be put back (storage-key rotation,
    /// integrity repair): refused unless both sides are recorded and match.
    Destructive,
    /// backup restore: into an empty database; refused when the database
    /// records another card, or the data directory another database at
    /// another location (a database lost and made again at the same
    /// location is the recovery case). The caller records after restoring.
    Restore,
    /// `card bind`: no check (it records).
    Bind,
}

const CARD_ID_DOMAIN: &[u8] = b"MC-CARD-ID-v1";
const DIR_TAG_DOMAIN: &[u8] = b"MC-DB-BINDING-v1";
const DB_TAG_DOMAIN: &[u8] = b"MC-DB-CARD-v1";

/// The card's id: the first 8 bytes of its digest tag over a fixed
/// domain, as 16 hex digits. Clones of one card (same keys) share it.
pub fn card_id(card: &dyn EncryptionCard) -> SiteResult<String> {
    Ok(hex::encode(&card.digest_tag(CARD_ID_DOMAIN)?[..8]))
}

fn tag(
    card: &dyn EncryptionCard,
    domain: &[u8],
    database_id: &str,
    card_id: &str,
) -> SiteResult<String> {
    let mut b = domain.to_vec();
    b.push(0);
    b.extend_from_slice(database_id.as_bytes());
    b.push(0);
    b.extend_from_slice(card_id.as_bytes());
    Ok(hex::encode(card.digest_tag(&b)?))
}

fn same_tag(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// `DATA/database.binding`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DirRecord {
    database_id: String,
    location: String,
    card_id: String,
    tag: String,
}

#[derive(Debug)]
enum DirSide {
    Unrecorded,
    Same,
    Other(DirRecord),
    Invalid(String),
}

#[derive(Debug)]
enum DbSide {
    Unrecorded,
    Ours,
    Other(String),
    Invalid,
}

/// Both sides as found.
#[derive(Debug)]
struct State {
    card_id: String,
    database_id: String,
    dir: DirSide,
    db: DbSide,
}

fn read_dir(path: &Path) -> SiteResult<Option<Result<DirRecord, String>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SiteError::Io {
                what: format!("cannot read {}", path.display()),
                source,
            });
        }
    };
    Ok(Some(serde_json::from_str(&text).map_err(|e| {
        format!("{} is not readable: {e}", path.display())
    })))
}

fn database_id(center: &Center, r: &Site) -> SiteResult<String> {
    center
        .database()
        .meta("database_id")?
        .ok_or_else(|| SiteError::NoDatabaseId {
            database: r.database_shown(),
        })
}

fn state(center: &Center, r: &Site) -> SiteResult<State> {
    let card = center.card();
    let card_id = card_id(card)?;
    let database_id = database_id(center, r)?;
    let dir = match read_dir(&r.binding_file())? {
        None => DirSide::Unrecorded,
        Some(Err(why)) => DirSide::Invalid(why),
        Some(Ok(rec)) => {
            let expect = tag(card, DIR_TAG_DOMAIN, &rec.database_id, &rec.card_id)?;
            if rec.card_id != card_id || !same_tag(&rec.tag, &expect) {
                DirSide::Invalid(format!(
                    "{} does not verify under this card (changed, or written for another card)",
                    r.binding_file().display()
                ))
            } else if rec.database_id == database_id {
                DirSide::Same
            } else {
                DirSide::Other(rec)
            }
        }
    };
    let db = match center.database().meta("card_id")? {
        None => DbSide::Unrecorded,
        Some(c) if c != card_id => DbSide::Other(c),
        Some(c) => {
            let expect = tag(card, DB_TAG_DOMAIN, &database_id, &c)?;
            match center.database().meta("card_tag")? {
                Some(t) if same_tag(&t, &expect) => DbSide::Ours,
                _ => DbSide::Invalid,
            }
        }
    };
    Ok(State {
        card_id,
        database_id,
        dir,
        db,
    })
}

impl State {
    /// What is wrong, one line each (empty: nothing recorded contradicts).
    fn problems(&self, r: &Site, restore: bool) -> Vec<String> {
        let mut out = Vec::new();
        match &self.dir {
            DirSide::Unrecorded | DirSide::Same => {}
            DirSide::Invalid(why) => out.push(why.clone()),
            DirSide::Other(rec) => {
                if !(restore && rec.location == r.database.shown()) {
                    out.push(format!(
                        "the data directory {} records that this card was last used with the database {} (id {}), not this one",
                        r.data_dir.display(),
                        rec.location,
                        rec.database_id
                    ))
                }
            }
        }
        match &self.db {
            DbSide::Unrecorded | DbSide::Ours => {}
            DbSide::Other(c) => out.push(format!(
                "the database {} records that it was last used with card {c}, not this card ({})",
                r.database.shown(),
                self.card_id
            )),
            DbSide::Invalid => out.push(format!(
                "the database {}'s record of its card does not verify under this card",
                r.database.shown()
            )),
        }
        out
    }

    fn header(&self, r: &Site) -> String {
        format!(
            "  configured database: {}, database id {}\n  card: {} (data directory {}, {}), card id {}",
            r.database_shown(),
            self.database_id,
            r.card_shown,
            r.data_dir.display(),
            r.data_source,
            self.card_id
        )
    }
}

fn refusal(st: &State, r: &Site, problems: &[String]) -> SiteError {
    SiteError::OtherDatabase {
        header: st.header(r),
        problems: problems.to_vec(),
    }
}

/// One indented bullet a line, for the refusals' lists.
pub(crate) fn bullets(lines: &[String]) -> String {
    lines
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Checks the database against the card for a command doing `access`,
/// and on first use by a writer records both sides. Returns warnings (a
/// read-only command reads a database that is not the card's, with a
/// warning).
pub fn check(center: &Center, r: &Site, access: Access) -> SiteResult<Vec<String>> {
    if access == Access::Bind {
        return Ok(Vec::new());
    }
    if access == Access::ReadOnly {
        // A read-only command reads a database without an identity too
        // (a copy, forensics), with a warning.
        let st = match state(center, r) {
            Ok(st) => st,
            Err(e) => return Ok(vec![chain(&e)]),
        };
        let problems = st.problems(r, false);
        if problems.is_empty() {
            return Ok(Vec::new());
        }
        return Ok(vec![format!(
            "the key database is not the one this card was last used with (reading it anyway)\n{}",
            problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        )]);
    }
    let st = state(center, r)?;
    let problems = st.problems(r, access == Access::Restore);
    if !problems.is_empty() {
        return Err(refusal(&st, r, &problems));
    }
    match access {
        Access::Destructive => {
            let mut missing = Vec::new();
            if matches!(st.dir, DirSide::Unrecorded) {
                missing.push(format!(
                    "the data directory {} records no database for this card (no {})",
                    r.data_dir.display(),
                    r.binding_file().display()
                ));
            }
            if matches!(st.db, DbSide::Unrecorded) {
                missing.push(format!(
                    "the database {} records no card",
                    r.database.shown()
                ));
            }
            if !missing.is_empty() {
                return Err(SiteError::BindingUnrecorded {
                    header: st.header(r),
                    missing,
                });
            }
        }
        Access::Write => write_missing(center, r, &st)?,
        Access::Restore | Access::ReadOnly | Access::Bind => {}
    }
    Ok(Vec::new())
}

/// An error and its sources on one line, as `{:#}` of anyhow prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn write_missing(center: &Center, r: &Site, st: &State) -> SiteResult<()> {
    let card = center.card();
    if !matches!(st.db, DbSide::Ours) {
        let t = tag(card, DB_TAG_DOMAIN, &st.database_id, &st.card_id)?;
        // The tag first: a card id without its tag reads as Invalid,
        // never as recorded.
        center.database().set_meta("card_tag", &t)?;
        center.database().set_meta("card_id", &st.card_id)?;
    }
    if !matches!(st.dir, DirSide::Same) {
        let rec = DirRecord {
            database_id: st.database_id.clone(),
            location: r.database.shown(),
            card_id: st.card_id.clone(),
            tag: tag(card, DIR_TAG_DOMAIN, &st.database_id, &st.card_id)?,
        };
        r.create_data_dir()?;
        let mut text = serde_json::to_string_pretty(&rec).map_err(SiteError::BindingEncode)?;
        text.push('\n');
        super::write_private_file_replace(&r.binding_file(), text.as_bytes())?;
    }
    Ok(())
}

/// Records both sides for the database the center is open on (after a
/// restore, or `card bind`). Refuses a database that records another
/// card, or whose record of this card does not verify. Returns what the
/// data directory recorded before, for the operator.
pub fn record(center: &Center, r: &Site) -> SiteResult<Option<String>> {
    let st = state(center, r)?;
    match &st.db {
        DbSide::Other(_) | DbSide::Invalid => {
            let problems = st.problems(r, false);
            return Err(refusal(&st, r, &problems));
        }
        DbSide::Unrecorded | DbSide::Ours => {}
    }
    let before = match &st.dir {
        DirSide::Other(rec) => Some(format!("{} (id {})", rec.location, rec.database_id)),
        DirSide::Invalid(why) => Some(format!("an invalid record ({why})")),
        DirSide::Unrecorded | DirSide::Same => None,
    };
    write_missing(center, r, &st)?;
    Ok(before)
}

/// Before a restore makes a database: refuses when the data directory
/// records that the card's database is at another location than the
/// configured one (restoring at the same place is the recovery of a lost
/// database). Read before the card is open, so unverified: it can only
/// refuse.
pub fn refuse_other_location(r: &Site) -> SiteResult<()> {
    if let Some(Ok(rec)) = read_dir(&r.binding_file())?
        && rec.location != r.database.shown()
    {
        return Err(SiteError::OtherLocation {
            data_dir: r.data_dir.clone(),
            recorded: rec.location,
            database_id: rec.database_id,
            configured: r.database_shown(),
        });
    }
    Ok(())
}

/// The database's id (after the center is open), for messages.
pub fn database_id_of(center: &Center) -> SiteResult<Option<String>> {
    Ok(center.database().meta("database_id")?)
}
