//! Which key database a card was last used with (issue 14): the check and
//! the records are `microcert_center::site::binding`; this module maps
//! them onto the resolved configuration for `card bind`.

use microcert_center::Center;
pub use microcert_center::site::Access;

use crate::config::Resolved;

/// Records both sides for the database the center is open on (`card
/// bind`); returns what the data directory recorded before.
pub fn record(center: &Center, r: &Resolved) -> anyhow::Result<Option<String>> {
    Ok(microcert_center::site::binding::record(center, r)?)
}

/// The database's id (after the center is open), for messages.
pub fn database_id_of(center: &Center) -> anyhow::Result<Option<String>> {
    Ok(microcert_center::site::binding::database_id_of(center)?)
}
