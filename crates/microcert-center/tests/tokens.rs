//! Bearer tokens in the key database (issue 14): shared by every center on
//! one database, card-tagged against edits from outside, audited.

mod common;

use std::sync::Arc;

use common::{Backend, NOW, open_center};
use microcert_center::tokens::{TokenStatus, token_hash};
use microcert_center::{Center, KdfParams, SoftwareCard};

/// Two centers on one database with cloned cards (one card file opened
/// twice).
fn two_centers(dir: &std::path::Path, location: &str) -> (Center, Center) {
    let card_path = dir.join("card");
    let a =
        Arc::new(SoftwareCard::init(&card_path, b"pw", KdfParams::insecure_for_tests()).unwrap());
    let b = Arc::new(SoftwareCard::open(&card_path, b"pw").unwrap());
    (open_center(location, a), open_center(location, b))
}

fn status(c: &Center, name: &str) -> Vec<TokenStatus> {
    c.list_tokens(NOW)
        .unwrap()
        .into_iter()
        .filter(|(t, _)| t.name == name)
        .map(|(_, s)| s)
        .collect()
}

fn a_token_made_at_one_center_works_at_the_other(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let loc = backend.location(dir.path(), "tokens.db");
    let (a, b) = two_centers(dir.path(), &loc);
    let token = a
        .create_token("alice", "operator", None, "admin-a", NOW)
        .unwrap();
    let at_b = b.list_tokens(NOW).unwrap();
    assert_eq!(at_b.len(), 1);
    assert_eq!(at_b[0].0.hash, token_hash(&token));
    assert_eq!(at_b[0].1, TokenStatus::Valid);
    // The same name and role again is refused at the other center.
    assert!(
        b.create_token("alice", "operator", None, "admin-b", NOW)
            .is_err()
    );
    // Revoked at B: A sees it revoked at once (no cache in the center).
    assert_eq!(
        b.revoke_tokens("alice", None, "admin-b", NOW + 1).unwrap(),
        1
    );
    assert_eq!(status(&a, "alice"), [TokenStatus::Revoked]);
    // An expiry: valid before, refused from it on.
    a.create_token("bob", "auditor", Some(60), "admin-a", NOW)
        .unwrap();
    assert_eq!(status(&b, "bob"), [TokenStatus::Valid]);
    let rows = b.list_tokens(NOW + 60).unwrap();
    let bob = rows.iter().find(|(t, _)| t.name == "bob").unwrap();
    assert_eq!(bob.1, TokenStatus::Expired);
    // Creation and revocation are in the (shared) audit log.
    let log = b.audit_log(0, 100).unwrap();
    let actions: Vec<(&str, &str)> = log
        .iter()
        .map(|e| (e.entry.action.as_str(), e.entry.actor.as_str()))
        .collect();
    assert!(actions.contains(&("token-create", "admin-a")));
    assert!(actions.contains(&("token-revoke", "admin-b")));
    // Bookkeeping from a server: not tagged, does not break the tag.
    let h = token_hash(&token);
    a.database().note_token_use(&h, Some(NOW + 5), 2).unwrap();
    a.database().note_token_use(&h, Some(NOW + 1), 1).unwrap();
    let rows = b.database().list_tokens().unwrap();
    let alice = rows.iter().find(|t| t.hash == h).unwrap();
    assert_eq!((alice.last_used, alice.failures), (Some(NOW + 5), 3));
    assert_eq!(status(&b, "alice"), [TokenStatus::Revoked]);
}

both_backends!(a_token_made_at_one_center_works_at_the_other);

/// Attack: whoever can write the database (not the card) edits a token
/// row: a verifier made an operator, an expiry removed, a revocation
/// cleared, a row of their own inserted. Each row fails its card tag and
/// is refused (before issue 14, tokens.json had no tag: any such edit of
/// the file was accepted).
#[test]
fn an_outside_edit_of_a_token_row_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tokens.db");
    let loc = db.to_string_lossy().into_owned();
    let (a, _b) = two_centers(dir.path(), &loc);
    a.create_token("billing", "verifier", None, "t", NOW)
        .unwrap();
    a.create_token("temp", "operator", Some(60), "t", NOW)
        .unwrap();
    a.create_token("gone", "admin", None, "t", NOW).unwrap();
    a.revoke_tokens("gone", None, "t", NOW).unwrap();
    assert_eq!(status(&a, "billing"), [TokenStatus::Valid]);
    assert_eq!(status(&a, "temp"), [TokenStatus::Valid]);

    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "UPDATE tokens SET role = 'operator' WHERE name = 'billing';
         UPDATE tokens SET expires = NULL WHERE name = 'temp';
         UPDATE tokens SET revoked = NULL WHERE name = 'gone';",
    )
    .unwrap();
    conn.execute(
        "INSERT INTO tokens (hash, name, role, created, tag) VALUES (?1, 'mallory', 'admin', 1, x'00')",
        [token_hash("mct_mallory")],
    )
    .unwrap();
    // A real row's tag copied onto the made-up one does not help either.
    conn.execute(
        "INSERT INTO tokens (hash, name, role, created, tag) \
         SELECT ?1, name, role, created, tag FROM tokens WHERE name = 'billing'",
        [token_hash("mct_mallory2")],
    )
    .unwrap();
    drop(conn);
    for name in ["temp", "gone", "mallory"] {
        assert_eq!(status(&a, name), [TokenStatus::Forged], "{name}");
    }
    assert_eq!(status(&a, "billing"), [TokenStatus::Forged; 2]);
    // Revoking a forged row is refused too (it would re-tag it).
    assert!(a.revoke_tokens("temp", None, "t", NOW).is_err());
}

#[test]
fn bad_names_and_roles_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().join("t.db").to_string_lossy().into_owned();
    let (a, _) = two_centers(dir.path(), &loc);
    for (name, role) in [
        ("", "operator"),
        ("x\n", "operator"),
        (&"n".repeat(201)[..], "operator"),
        ("ok", "root"),
    ] {
        assert!(a.create_token(name, role, None, "t", NOW).is_err());
    }
    assert!(a.create_token("ok", "operator", Some(0), "t", NOW).is_err());
    assert!(a.list_tokens(NOW).unwrap().is_empty());
    assert!(
        a.audit_log(0, 100)
            .unwrap()
            .iter()
            .all(|e| !e.entry.action.starts_with("token"))
    );
}

/// Each token refusal is its own kind (issue 13, typed errors): an
/// operator, or a script reading the `error` field, can tell a taken name
/// from a bad role or a full table. They used to be one `refused`.
#[test]
fn each_token_refusal_names_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let loc = db.to_string_lossy().into_owned();
    let (a, _) = two_centers(dir.path(), &loc);
    let kind = |r: microcert_center::Result<_>| r.map(|_| ()).unwrap_err().kind();
    assert_eq!(
        kind(a.create_token("", "operator", None, "t", NOW)),
        "bad-token-name"
    );
    assert_eq!(
        kind(a.create_token("ok", "root", None, "t", NOW)),
        "unknown-role"
    );
    assert_eq!(
        kind(a.create_token("ok", "operator", Some(0), "t", NOW)),
        "token-ttl-zero"
    );
    a.create_token("alice", "operator", None, "t", NOW).unwrap();
    assert_eq!(
        kind(a.create_token("alice", "operator", None, "t", NOW)),
        "token-name-taken"
    );
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("UPDATE tokens SET expires = 1 WHERE name = 'alice'", [])
        .unwrap();
    drop(conn);
    let e = a.revoke_tokens("alice", None, "t", NOW).unwrap_err();
    assert_eq!(e.kind(), "token-integrity");
    assert!(e.is_refusal());
    assert!(e.to_string().contains("alice"), "{e}");
}
