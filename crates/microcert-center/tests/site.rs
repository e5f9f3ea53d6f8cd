//! `microcert_center::site`: what a front end does with the data
//! directory, the database and the card in one call each. A restore is one
//! call that leaves the database bound to the card on both sides, the
//! pending commands rebuilt and nothing made when it refuses; the binding
//! check refuses a writer on another card's database and only warns a
//! reader.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use microcert_center::site::{Access, Location, OpenOptions, Site, SiteError, Source};
use microcert_center::{EncryptionCard, SoftwareCard};
use microcert_core::Audience;

fn site(data: &Path, db: &Path) -> Site {
    Site {
        data_dir: data.to_path_buf(),
        data_source: Source::Default,
        database: Location::Sqlite(db.to_path_buf()),
        database_source: Source::Default,
        card_shown: "test card".into(),
        hint: String::new(),
    }
}

fn opener(card: &Arc<SoftwareCard>) -> impl FnOnce() -> std::io::Result<Arc<dyn EncryptionCard>> {
    let card: Arc<dyn EncryptionCard> = card.clone();
    move || Ok(card)
}

fn write_open(card: &Arc<SoftwareCard>, s: &Site) -> Arc<microcert_center::Center> {
    s.open(
        OpenOptions {
            create_db: true,
            ..OpenOptions::maintenance(Access::Write)
        },
        opener(card),
        &mut |w| panic!("a writer is not warned: {w}"),
    )
    .unwrap()
}

#[test]
fn restore_is_one_call_that_binds_and_rebuilds() {
    let data = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let first = site(data.path(), &data.path().join("center.db"));
    let c = write_open(&card, &first);
    let mut fleet = make_fleet(&*card, 5);
    let batch = data.path().join("batch.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    c.import_batch(&batch, "factory", NOW, &mut |_| {}).unwrap();
    let (a, _) = fleet[1].auth(&Audience::CENTER, NOW + 1);
    c.verify_auth(&a, &Audience::CENTER, NOW + 1).unwrap();
    c.queue_update(fleet[1].id, "ops", "roll-out", NOW + 1)
        .unwrap();
    let pending = c.command(fleet[1].id).unwrap().unwrap();
    let s = c
        .create_backup(&first.backup_dir(), 5, None, "ops", NOW + 2)
        .unwrap();
    drop(c);

    // Another location than the data directory records: refused, and
    // nothing is made there.
    let other = tempfile::tempdir().unwrap();
    let db2 = other.path().join("center.db");
    let second = site(data.path(), &db2);
    let e = second
        .restore_backup(&s.path, false, opener(&card), "ops", NOW + 3)
        .unwrap_err();
    assert!(matches!(e, SiteError::OtherLocation { .. }), "{e}");
    assert!(e.to_string().contains("--rebind"), "{e}");
    assert!(!db2.exists());

    // With --rebind: one call restores, records both sides, rebuilds.
    let r = second
        .restore_backup(&s.path, true, opener(&card), "ops", NOW + 3)
        .unwrap();
    assert_eq!((r.devices, r.seeds, r.rebuilt), (5, 5, 1));
    assert!(r.binding_before.is_some(), "the card's database moved");
    // Bound on both sides: a destructive command is allowed at once.
    let c = second
        .open(
            OpenOptions::maintenance(Access::Destructive),
            opener(&card),
            &mut |w| panic!("{w}"),
        )
        .unwrap();
    let rebuilt = c.command(fleet[1].id).unwrap().unwrap();
    assert_ne!(rebuilt, pending, "fresh counter, t and r");
    assert!(c.verify_audit().unwrap().1.is_none());
    drop(c);

    // A restore into an existing database is refused and changes nothing.
    let before = std::fs::read(&db2).unwrap();
    let e = second
        .restore_backup(&s.path, true, opener(&card), "ops", NOW + 4)
        .unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
    assert_eq!(std::fs::read(&db2).unwrap(), before);
}

#[test]
fn another_cards_database_refuses_writers_and_warns_readers() {
    let data = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let db = data.path().join("center.db");
    drop(write_open(&card, &site(data.path(), &db)));

    let thief = Arc::new(SoftwareCard::ephemeral().unwrap());
    let theirs = tempfile::tempdir().unwrap();
    let s = site(theirs.path(), &db);
    let e = s
        .open(
            OpenOptions::maintenance(Access::Write),
            opener(&thief),
            &mut |w| panic!("{w}"),
        )
        .unwrap_err();
    assert!(e.to_string().starts_with("refused:"), "{e}");
    assert!(!s.binding_file().exists(), "nothing recorded on a refusal");
    // Said even though opening fails afterwards (the audit head does not
    // verify under this card).
    let mut warnings = Vec::new();
    let _ = s.open(
        OpenOptions::maintenance(Access::ReadOnly),
        opener(&thief),
        &mut |w| warnings.push(w),
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("not the one this card"));

    // No database at all: refused before the card is asked for.
    let none = site(theirs.path(), &theirs.path().join("missing.db"));
    let e = none
        .open(
            OpenOptions::maintenance(Access::ReadOnly),
            || Err::<Arc<dyn EncryptionCard>, _>(std::io::Error::other("card asked for")),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(e.to_string().starts_with("no key database at"), "{e}");
}
