//! The keyring in the key database on PKCS#11 tokens (issue 14): the
//! storage keys are wrapped under the token's root key `microcert-kroot`
//! and kept in the database, so a rotation at one center is used at once
//! by a center on a second token made by copying the first token's
//! SoftHSM2 directory while it was stopped (the "vendor cloning" of
//! docs/hsm.md). Also: a wrapped key edited in the database is refused,
//! the root key only unwraps into sensitive, non-extractable session keys
//! and encrypts nothing, held keys survive the token dropping every
//! session, and a token from before the keyring keeps its storage keys
//! beside it.
//!
//! This binary makes its own SoftHSM2: token A is initialised by a child
//! process (this binary re-run on `child_init_token`), then its directory
//! is copied as token B (label and serial changed, as a second device of
//! the same vendor cloning domain would have), all before this process
//! loads the module.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use microcert_center::db::KeyringRow;
use microcert_center::{
    Center, CenterConfig, EncryptionCard, Error, KeyDatabase, ReplayMode, SqliteDatabase, backup,
};
use microcert_core::{Audience, DeviceId, KeySeed};
use microcert_pkcs11::{Pkcs11Card, Pkcs11Config, SOFTHSM2_MODULE};
use microcert_testkit::nodes::{NOW, TestNode, make_fleet, write_batch};

const PIN: &str = "mc-pin-7351-q";
const SO_PIN: &str = "mc-so-pin-9046";
const C: Audience = Audience::CENTER;
const CHILD_ENV: &str = "MC_KEYRING_CHILD_CONF";

/// Tokens made by softhsm2-util; "mc-ring-a" is initialised by the child
/// and copied as "mc-ring-b".
const TOKENS: &[&str] = &[
    "mc-ring-a",
    "mc-attr",
    "mc-legacy",
    "mc-lost",
    "mc-back",
    "mc-roll",
    "mc-soft",
    "mc-steady",
];

struct Hsm {
    _dir: tempfile::TempDir,
}

static HSM: OnceLock<Option<Hsm>> = OnceLock::new();

/// Re-run by `setup` in a child process: initialises the card on token A
/// (a process of its own, so that this one loads the module only after
/// token B exists). Does nothing in a normal run.
#[test]
fn child_init_token() {
    let Ok(conf) = std::env::var(CHILD_ENV) else {
        return;
    };
    assert!(Path::new(&conf).exists());
    let card = Pkcs11Card::init(&config("mc-ring-a")).unwrap();
    assert!(card.has_keyring_root());
}

fn token_dir_of(tokens: &Path, label: &str) -> Result<PathBuf, String> {
    for e in std::fs::read_dir(tokens).map_err(|e| e.to_string())? {
        let dir = e.map_err(|e| e.to_string())?.path();
        let obj = std::fs::read(dir.join("token.object")).unwrap_or_default();
        let mut padded = label.as_bytes().to_vec();
        padded.resize(32, b' ');
        if obj.windows(32).any(|w| w == padded) {
            return Ok(dir);
        }
    }
    Err(format!("no token directory for {label}"))
}

fn setup() -> Result<Hsm, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let conf = microcert_testkit::softhsm::init_tokens(dir.path(), TOKENS, SO_PIN, PIN)?;
    // Token A gets its keys in a child process.
    let out = std::process::Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
        .args([
            "child_init_token",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &conf)
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "child init: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // Token A stopped: its directory copied as token B.
    let tokens = dir.path().join("tokens");
    let a = token_dir_of(&tokens, "mc-ring-a")?;
    let b = tokens.join("0b0b0b0b-0b0b-0b0b-0b0b-0b0b0b0b0b0b");
    std::fs::create_dir_all(&b).map_err(|e| e.to_string())?;
    for e in std::fs::read_dir(&a).map_err(|e| e.to_string())? {
        let p = e.map_err(|e| e.to_string())?.path();
        let mut bytes = std::fs::read(&p).map_err(|e| e.to_string())?;
        if p.file_name().is_some_and(|n| n == "token.object") {
            // Same length label; a serial of its own (SoftHSM2 derives
            // the slot id from it).
            let serial = a
                .file_name()
                .and_then(|n| n.to_str())
                .map(|n| n.replace('-', "")[16..].to_owned())
                .ok_or("token dir name")?;
            bytes = replace(&bytes, b"mc-ring-a", b"mc-ring-b");
            bytes = replace(&bytes, serial.as_bytes(), b"0b0b0b0b0b0b0b0b");
        }
        std::fs::write(b.join(p.file_name().ok_or("name")?), bytes).map_err(|e| e.to_string())?;
    }
    // SAFETY: once, inside the OnceLock, before any test of this binary
    // reaches the PKCS#11 module (every test goes through `hsm()` first).
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("SOFTHSM2_CONF", &conf);
    }
    Ok(Hsm { _dir: dir })
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = hay.to_vec();
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    out
}

fn hsm() -> Option<&'static Hsm> {
    if std::env::var(CHILD_ENV).is_ok() {
        return None;
    }
    HSM.get_or_init(|| microcert_testkit::skip::require("SoftHSM2 keyring tests", setup()))
        .as_ref()
}

fn config(label: &str) -> Pkcs11Config {
    Pkcs11Config::new(SOFTHSM2_MODULE, label)
        .with_pin(PIN)
        .with_sessions(4)
}

fn center_config() -> CenterConfig {
    CenterConfig {
        replay: ReplayMode::Database,
        // No cached seed hides a key problem.
        cache_capacity: 0,
        ..CenterConfig::default()
    }
}

fn center(db: &Path, card: Arc<Pkcs11Card>) -> Center {
    Center::open_sqlite(db, card, center_config()).unwrap()
}

fn import(c: &Center, dir: &Path, fleet: &mut [TestNode], name: &str) {
    let batch = dir.join(name);
    write_batch(&batch, fleet, NOW);
    c.import_batch(&batch, "factory", NOW, &mut |_| {}).unwrap();
}

fn auth_all(c: &Center, fleet: &mut [TestNode], t: u64) {
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&C, t);
        c.verify_auth(&a, &C, t)
            .unwrap_or_else(|e| panic!("{:?}: {e}", node.id));
    }
}

fn versions_in_records(c: &Center) -> Vec<u32> {
    let mut v: Vec<u32> = c
        .database()
        .scan_seeds(None, 1_000_000)
        .unwrap()
        .iter()
        .filter(|s| s.ciphertext.is_some())
        .map(|s| s.kstore_version)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn rows(db: &Path) -> Vec<KeyringRow> {
    let raw = SqliteDatabase::open(db).unwrap();
    let mut out = Vec::new();
    raw.read_transaction(&mut |tx| {
        out = tx.keyring()?;
        Ok(())
    })
    .unwrap();
    out.sort_by_key(|r| r.version);
    out
}

fn put_rows(db: &Path, rows: &[KeyringRow]) {
    let raw = SqliteDatabase::open(db).unwrap();
    raw.transaction(&mut |tx| {
        for r in tx.keyring()? {
            tx.delete_keyring(r.version)?;
        }
        for r in rows {
            tx.insert_keyring(r)?;
        }
        Ok(())
    })
    .unwrap();
}

/// A raw context on the module (already initialised by a card: the same
/// library state).
fn raw_context() -> cryptoki::context::Pkcs11 {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    let ctx = Pkcs11::new(SOFTHSM2_MODULE).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    ctx
}

/// A logged-in raw session on token `label`.
fn raw_session(label: &str) -> Session {
    let ctx = raw_context();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == label)
        .unwrap();
    let s = ctx.open_rw_session(slot).unwrap();
    match s.login(UserType::User, Some(&AuthPin::new(PIN.into()))) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("login: {e}"),
    }
    s
}

fn find(s: &Session, label: &str) -> Option<ObjectHandle> {
    s.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
    .unwrap()
    .into_iter()
    .next()
}

#[test]
fn a_rotation_at_one_token_is_used_at_its_clone_at_once() {
    let Some(_) = hsm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let card_a = Arc::new(Pkcs11Card::open(&config("mc-ring-a")).unwrap());
    let card_b = Arc::new(Pkcs11Card::open(&config("mc-ring-b")).unwrap());
    assert!(card_a.has_keyring_root() && card_b.has_keyring_root());
    let mut fleet = make_fleet(&*card_a, 30);
    let a = center(&db, card_a.clone());
    let b = center(&db, card_b.clone());
    // The keyring starts above the token's own version 1, current at once.
    let head = a.sync_keyring().unwrap().unwrap();
    assert_eq!((head.current, head.versions.clone()), (2, vec![2]));
    assert_eq!(b.sync_keyring().unwrap().unwrap(), head);
    import(&a, dir.path(), &mut fleet[..20], "a.jsonl");
    assert_eq!(versions_in_records(&a), vec![2]);
    auth_all(&b, &mut fleet[..20], NOW + 1);

    let r = a
        .rotate_storage_key(7, None, "ops", NOW + 2, &mut |_| {})
        .unwrap();
    assert_eq!(r.version, 3);
    assert_eq!(r.resealed, 20);
    // Keyring version 2 and token A's own version 1 (no record uses it).
    assert_eq!(r.destroyed, vec![1, 2]);
    assert_eq!(rows(&db).len(), 2, "head and version 3");
    // B opens what A re-sealed, under a version it did not hold, without
    // a restart.
    auth_all(&b, &mut fleet[..20], NOW + 3);
    // B seals under the new version once it re-read the keyring.
    std::thread::sleep(microcert_center::keyring::REFRESH + Duration::from_millis(300));
    import(&b, dir.path(), &mut fleet[20..], "b.jsonl");
    assert_eq!(versions_in_records(&b), vec![3]);
    auth_all(&a, &mut fleet, NOW + 4);
    assert_eq!(a.card().storage_key_versions(), vec![3]);
    // Token B still has its copy of the token's version 1: a token object
    // is destroyed where the rotation runs (docs/hsm.md).
    assert_eq!(b.card().storage_key_versions(), vec![1, 3]);
    // No keyring version is ever a token object.
    let s = raw_session("mc-ring-a");
    assert!(find(&s, "microcert-kstore-v3").is_none());
    assert!(find(&s, "microcert-kstore-v1").is_none());
}

/// Attack: with write access to the database, edit a wrapped storage key
/// (or put another version's wrapped key and tag in its place) so that
/// the centers use a key of the attacker's making or a wrong one. The
/// rows are card-tagged by the token's integrity key: refused before the
/// token is asked to unwrap anything; and a blob whose tag were right
/// still fails the token's AES key-wrap integrity check.
#[test]
fn attack_wrapped_key_edited_in_the_database_is_refused() {
    let Some(_) = hsm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let card = Arc::new(Pkcs11Card::open(&config("mc-ring-a")).unwrap());
    let mut fleet = make_fleet(&*card, 6);
    let c = center(&db, card.clone());
    import(&c, dir.path(), &mut fleet[..3], "a.jsonl");
    c.card().rotate_storage_key().unwrap();
    import(&c, dir.path(), &mut fleet[3..], "b.jsonl");
    drop(c);
    let good = rows(&db);
    assert_eq!(good.len(), 3);
    let newest = good[2].version;

    let mut edited = good.clone();
    edited[2].bytes[5] ^= 0x40;
    let mut moved = good.clone();
    let (r1, r2) = (moved[1].clone(), moved[2].clone());
    moved[1] = KeyringRow {
        version: r1.version,
        ..r2.clone()
    };
    moved[2] = KeyringRow {
        version: r2.version,
        ..r1
    };
    for bad in [edited.clone(), moved] {
        put_rows(&db, &bad);
        let fresh = Arc::new(Pkcs11Card::open(&config("mc-ring-a")).unwrap());
        let c = center(&db, fresh);
        let e = c.sync_keyring().unwrap_err();
        assert!(matches!(e, Error::Keyring(_)), "{e}");
        assert!(e.to_string().contains("card tag"), "{e}");
        let (m, _) = fleet[5].auth(&C, NOW + 1);
        assert!(c.verify_auth(&m, &C, NOW + 1).is_err());
    }
    // Past the tag, the token itself refuses an altered blob.
    let e = card
        .hold_storage_key(newest + 10, &edited[2].bytes)
        .unwrap_err();
    assert!(e.to_string().contains("does not unwrap"), "{e}");

    put_rows(&db, &good);
    let c = center(
        &db,
        Arc::new(Pkcs11Card::open(&config("mc-ring-a")).unwrap()),
    );
    auth_all(&c, &mut fleet, NOW + 2);
}

/// Attack: someone who can drive the token (the center's host, with the
/// PIN) uses the root key to unwrap a keyring row into an extractable or
/// readable key, or as a plain cipher, to get a storage key out of the
/// token. The root's CKA_UNWRAP_TEMPLATE and attributes forbid it; a root
/// made with the same attributes but no unwrap template (shown first)
/// would let the key out.
#[test]
fn attack_root_key_cannot_release_a_storage_key() {
    let Some(_) = hsm() else { return };
    let card = Pkcs11Card::init(&config("mc-attr")).unwrap();
    let wrapped = card.new_wrapped_storage_key().unwrap();
    assert_eq!(wrapped.len(), 40);
    let s = raw_session("mc-attr");
    let root = find(&s, "microcert-kroot").unwrap();
    // The mechanism the card uses is on the token's list (SoftHSM2 2.6.1
    // offers CKM_AES_KEY_WRAP and CKM_AES_KEY_WRAP_PAD).
    let slot = s.get_session_info().unwrap().slot_id();
    let mechs = raw_context().get_mechanism_list(slot).unwrap();
    assert!(mechs.contains(&cryptoki::mechanism::MechanismType::AES_KEY_WRAP));
    eprintln!(
        "AES_KEY_WRAP_PAD offered: {}",
        mechs.contains(&cryptoki::mechanism::MechanismType::AES_KEY_WRAP_PAD)
    );

    let aes = |extra: Vec<Attribute>| {
        let mut t = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
        ];
        t.extend(extra);
        t
    };
    let readable = aes(vec![
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]);
    let extractable = aes(vec![
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
    ]);
    let on_token = aes(vec![
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Token(true),
    ]);
    let silent = aes(vec![]);

    // The naive root: same attributes, no unwrap template. The attack works.
    let naive = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32u64.into()),
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
            ],
        )
        .unwrap();
    let victim = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &aes(vec![
                Attribute::ValueLen(32u64.into()),
                Attribute::Extractable(true),
            ]),
        )
        .unwrap();
    let naive_wrapped = s.wrap_key(&Mechanism::AesKeyWrap, naive, victim).unwrap();
    let out = s
        .unwrap_key(&Mechanism::AesKeyWrap, naive, &naive_wrapped, &readable)
        .unwrap();
    let value = s.get_attributes(out, &[AttributeType::Value]).unwrap();
    assert!(
        matches!(value.first(), Some(Attribute::Value(v)) if v.len() == 32),
        "without an unwrap template the key is read out"
    );

    // The card's root refuses every such template.
    for t in [&readable, &extractable, &on_token] {
        assert!(
            s.unwrap_key(&Mechanism::AesKeyWrap, root, &wrapped, t)
                .is_err(),
            "{t:?}"
        );
    }
    // A template that says nothing gets the root's template, or nothing.
    if let Ok(h) = s.unwrap_key(&Mechanism::AesKeyWrap, root, &wrapped, &silent) {
        let attrs = s
            .get_attributes(
                h,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Token,
                ],
            )
            .unwrap();
        assert!(attrs.contains(&Attribute::Sensitive(true)), "{attrs:?}");
        assert!(attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
        assert!(attrs.contains(&Attribute::Token(false)), "{attrs:?}");
    }
    // No plain encryption or decryption with the root, by any mechanism.
    for m in [Mechanism::AesEcb, Mechanism::AesKeyWrap] {
        assert!(s.encrypt(&m, root, &[0u8; 32]).is_err());
        assert!(s.decrypt(&m, root, &wrapped).is_err());
    }
    // Nor is its value readable.
    assert!(
        s.get_attributes(root, &[AttributeType::Value]).is_err() || {
            let v = s.get_attributes(root, &[AttributeType::Value]).unwrap();
            !v.iter().any(|a| matches!(a, Attribute::Value(_)))
        }
    );
    // The card's own hold works and seals.
    card.hold_storage_key(40, &wrapped).unwrap();
    card.set_storage_key_version(40).unwrap();
    let seed = KeySeed::generate(2026, |b| b.fill(0x33));
    let dev = DeviceId::from_u64(7);
    let sealed = card.seal_seed(dev, 0, &seed).unwrap();
    assert_eq!(sealed.kstore_version, 40);
    assert!(card.unseal_seed(dev, 0, 40, &sealed.ciphertext).unwrap() == seed);
}

/// C_CloseAllSessions on `slot` through a second handle on the module
/// (as a token reset or an HSM restart does): every session object dies.
#[allow(unsafe_code)]
fn close_all_sessions(label: &str) {
    let s = raw_session(label);
    let slot = s.get_session_info().unwrap().slot_id();
    drop(s);
    // SAFETY: the module is loaded and initialised by the card already;
    // C_CloseAllSessions takes a slot id by value.
    let lib = unsafe { cryptoki_sys::Pkcs11::new(SOFTHSM2_MODULE) }.unwrap();
    let rv = unsafe { lib.C_CloseAllSessions(slot.id() as cryptoki_sys::CK_SLOT_ID) };
    assert_eq!(rv, cryptoki_sys::CKR_OK);
}

#[test]
fn held_keys_are_unwrapped_again_after_the_token_drops_every_session() {
    let Some(_) = hsm() else { return };
    let card = Arc::new(Pkcs11Card::init(&config("mc-lost")).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let mut fleet = make_fleet(&*card, 4);
    let c = center(&db, card.clone());
    import(&c, dir.path(), &mut fleet, "a.jsonl");
    assert_eq!(versions_in_records(&c), vec![2]);
    close_all_sessions("mc-lost");
    auth_all(&c, &mut fleet, NOW + 1);
    let seed = KeySeed::generate(2026, |b| b.fill(0x44));
    let sealed = c
        .card()
        .seal_seed(DeviceId::from_u64(99), 0, &seed)
        .unwrap();
    assert_eq!(sealed.kstore_version, 2);
    close_all_sessions("mc-lost");
    assert!(
        c.card()
            .unseal_seed(DeviceId::from_u64(99), 0, 2, &sealed.ciphertext)
            .unwrap()
            == seed
    );
}

/// A token initialised before the keyring (no `microcert-kroot`, seeds
/// under its token object `microcert-kstore-v1`) keeps working as it is;
/// `add_keyring_root` gives it a root; the next start makes the keyring
/// at version 2 beside the token's version 1, and the first rotation
/// moves every seed into the keyring and destroys the token object.
#[test]
fn a_token_from_before_the_keyring_keeps_its_storage_keys_beside_it() {
    let Some(_) = hsm() else { return };
    let cfg = config("mc-legacy");
    drop(Pkcs11Card::init(&cfg).unwrap());
    let s = raw_session("mc-legacy");
    s.destroy_object(find(&s, "microcert-kroot").unwrap())
        .unwrap();
    drop(s);

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let old = Arc::new(Pkcs11Card::open(&cfg).unwrap());
    assert!(!old.has_keyring_root());
    let mut fleet = make_fleet(&*old, 10);
    let c = center(&db, old);
    import(&c, dir.path(), &mut fleet[..5], "a.jsonl");
    assert_eq!(versions_in_records(&c), vec![1]);
    assert!(c.sync_keyring().unwrap().is_none());
    assert!(rows(&db).is_empty());
    drop(c);

    Pkcs11Card::add_keyring_root(&cfg).unwrap();
    assert!(matches!(
        Pkcs11Card::add_keyring_root(&cfg),
        Err(microcert_pkcs11::Pkcs11Error::KeysExist { .. })
    ));
    let card = Arc::new(Pkcs11Card::open(&cfg).unwrap());
    assert!(card.has_keyring_root());
    let c = center(&db, card);
    let head = c.sync_keyring().unwrap().unwrap();
    assert_eq!((head.current, head.versions), (2, vec![2]));
    assert_eq!(c.card().storage_key_versions(), vec![1, 2]);
    auth_all(&c, &mut fleet[..5], NOW + 1);
    import(&c, dir.path(), &mut fleet[5..], "b.jsonl");
    assert_eq!(versions_in_records(&c), vec![1, 2]);

    // The first rotation finds seeds under an older version than the
    // current one: it finishes moving them (into keyring version 2) and
    // destroys the token object; the next one makes version 3.
    let r = c
        .rotate_storage_key(4, None, "ops", NOW + 2, &mut |_| {})
        .unwrap();
    assert!(r.resumed);
    assert_eq!((r.version, r.resealed, r.destroyed), (2, 5, vec![1]));
    assert_eq!(versions_in_records(&c), vec![2]);
    assert_eq!(c.card().storage_key_versions(), vec![2]);
    let r = c
        .rotate_storage_key(4, None, "ops", NOW + 3, &mut |_| {})
        .unwrap();
    assert_eq!((r.version, r.resealed, r.destroyed), (3, 10, vec![2]));
    auth_all(&c, &mut fleet, NOW + 4);
    let s = raw_session("mc-legacy");
    assert!(find(&s, "microcert-kstore-v1").is_none());
}

/// Attack: copy the keyring rows, wait for a rotation (the old key is
/// retired because it leaked), put the old rows back so that new seeds
/// are sealed under the retired key again. A center on a token that has
/// seen the newer keyring refuses the older one and keeps sealing under
/// the newest version it has seen.
#[test]
fn attack_keyring_rolled_back_is_refused_on_a_token() {
    let Some(_) = hsm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let card = Arc::new(Pkcs11Card::init(&config("mc-roll")).unwrap());
    let mut fleet = make_fleet(&*card, 6);
    let c = center(&db, card.clone());
    import(&c, dir.path(), &mut fleet[..3], "a.jsonl");
    let saved = rows(&db);
    let r = c
        .rotate_storage_key(10, None, "ops", NOW + 1, &mut |_| {})
        .unwrap();
    let newest = r.version;
    let newer = rows(&db);

    put_rows(&db, &saved);
    std::thread::sleep(microcert_center::keyring::REFRESH + Duration::from_millis(300));
    let e = c.sync_keyring().unwrap_err();
    assert!(e.to_string().contains("rolled back"), "{e}");
    import(&c, dir.path(), &mut fleet[3..], "b.jsonl");
    assert_eq!(versions_in_records(&c), vec![newest]);

    put_rows(&db, &newer);
    assert_eq!(c.sync_keyring().unwrap().unwrap().current, newest);
    auth_all(&c, &mut fleet, NOW + 2);
}

/// A backup made with a token card carries the keyring; restored into a
/// new database, its seeds open with the token; without its keyring the
/// restore is refused before anything is written.
#[test]
fn a_backup_on_a_token_carries_the_keyring() {
    let Some(_) = hsm() else { return };
    let card = Arc::new(Pkcs11Card::init(&config("mc-back")).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let mut fleet = make_fleet(&*card, 6);
    let c = center(&db, card.clone());
    import(&c, dir.path(), &mut fleet[..3], "a.jsonl");
    c.card().rotate_storage_key().unwrap();
    import(&c, dir.path(), &mut fleet[3..], "b.jsonl");
    let s = c
        .create_backup(&dir.path().join("backups"), 5, None, "ops", NOW + 1)
        .unwrap();
    assert_eq!(s.kstore_versions, vec![2, 3]);
    drop(c);
    let b = backup::read(&s.path, &*card).unwrap();
    assert_eq!(b.keyring.len(), 3);

    let db2 = dir.path().join("restored.db");
    {
        let raw = SqliteDatabase::open(&db2).unwrap();
        backup::restore_into(&raw, &*card, &b, "ops", NOW + 2).unwrap();
    }
    let c2 = center(&db2, card.clone());
    auth_all(&c2, &mut fleet, NOW + 3);
    drop(c2);

    let mut stripped = b.clone();
    stripped.keyring.clear();
    let db3 = dir.path().join("refused.db");
    let raw = SqliteDatabase::open(&db3).unwrap();
    let e = backup::restore_into(&raw, &*card, &stripped, "ops", NOW + 2).unwrap_err();
    assert!(matches!(e, Error::Keyring(_)), "{e}");
    assert!(e.to_string().contains("[2, 3]"), "{e}");
    assert!(raw.list_devices(&Default::default()).unwrap().is_empty());
}

/// A software card of the keyring era moved into a token
/// (`import_key_block` of the block its Shamir shares recover): the token
/// gets the card's keyring root, so the database's keyring, wrapped by
/// the software card, opens on the token unchanged; a rotation at the
/// token is opened by the software card, and the other way round.
#[test]
fn a_software_card_moved_into_a_token_keeps_its_keyring() {
    let Some(_) = hsm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("center.db");
    let soft = Arc::new(
        microcert_center::SoftwareCard::init(
            &dir.path().join("card"),
            b"pass",
            microcert_center::KdfParams::insecure_for_tests(),
        )
        .unwrap(),
    );
    let mut fleet = make_fleet(&*soft, 8);
    let c = Center::open_sqlite(&db, soft.clone(), center_config()).unwrap();
    import(&c, dir.path(), &mut fleet[..4], "a.jsonl");
    c.rotate_storage_key(10, None, "ops", NOW + 1, &mut |_| {})
        .unwrap();
    let head = c.sync_keyring().unwrap().unwrap();
    drop(c);

    let shares = soft.split(2, 2).unwrap();
    let block = microcert_center::card::recover_secret(&shares).unwrap();
    assert_eq!(block[0], 2, "a keyring card's key block");
    let token = Arc::new(
        Pkcs11Card::import_key_block(
            &config("mc-soft"),
            &block,
            microcert_pkcs11::KeyPolicy::NonExtractable,
        )
        .unwrap(),
    );
    assert!(token.has_keyring_root());
    assert!(token.storage_key_versions().is_empty());
    let t = center(&db, token);
    assert_eq!(t.sync_keyring().unwrap().unwrap(), head);
    auth_all(&t, &mut fleet[..4], NOW + 2);
    import(&t, dir.path(), &mut fleet[4..], "b.jsonl");
    let r = t
        .rotate_storage_key(10, None, "ops", NOW + 3, &mut |_| {})
        .unwrap();
    assert_eq!(r.version, head.current + 1);
    drop(t);
    let c = Center::open_sqlite(&db, soft, center_config()).unwrap();
    auth_all(&c, &mut fleet, NOW + 4);
}

/// The keyring is re-read every REFRESH; a version held already is not
/// unwrapped again (the same session objects stay: no churn of objects
/// that operations in flight use).
#[test]
fn held_keys_stay_the_same_objects_across_refreshes() {
    let Some(_) = hsm() else { return };
    let card = Arc::new(Pkcs11Card::init(&config("mc-steady")).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let c = center(&dir.path().join("center.db"), card);
    c.sync_keyring().unwrap().unwrap();
    let s = raw_session("mc-steady");
    let session_keys = || {
        let mut h: Vec<u64> = s
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(false),
            ])
            .unwrap()
            .iter()
            .map(|h| h.handle())
            .collect();
        h.sort_unstable();
        h
    };
    let before = session_keys();
    assert_eq!(before.len(), 1, "one keyring version held");
    std::thread::sleep(microcert_center::keyring::REFRESH * 2 + Duration::from_millis(300));
    c.sync_keyring().unwrap();
    assert_eq!(session_keys(), before);
}
