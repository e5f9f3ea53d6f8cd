//! A real SoftHSM2 for each test binary: one SOFTHSM2_CONF directory with
//! one token per test that needs its own, all made before the module's
//! C_Initialize (SoftHSM2 lists its tokens only then, and a process can
//! initialise a module only once).
//!
//! The tokens are made by the test kit's launcher
//! (`microcert_testkit::softhsm`). Without softhsm2 the tests follow the
//! kit's skip rule: they print why and pass as skipped, unless CI is set:
//! then a missing softhsm2 is a failure.

#![allow(dead_code)]

use std::sync::OnceLock;
// The imports this module had before the kit, kept so that helpers
// appended to it compile unchanged.
#[allow(unused_imports)]
use std::path::{Path, PathBuf};
#[allow(unused_imports)]
use std::process::Command;

use microcert_pkcs11::{Pkcs11Card, Pkcs11Config, SOFTHSM2_MODULE};

/// The user PIN of every test token; distinctive, so a test can search
/// Debug output for it.
pub const PIN: &str = "mc-pin-7351-q";
/// The security officer PIN of every test token.
pub const SO_PIN: &str = "mc-so-pin-9046";

/// Every token label a test of this crate uses; each test owns its own.
pub const TOKENS: &[&str] = &[
    "mc-main",
    "mc-init",
    "mc-pin",
    "mc-nokey",
    "mc-partial",
    "mc-known",
    "mc-rotate",
    "mc-weak",
    "mc-clone-a",
    "mc-clone-b",
    "mc-center",
    "mc-bench",
];

pub use microcert_testkit::softhsm::SoftHsm;

static HSM: OnceLock<Option<SoftHsm>> = OnceLock::new();

fn setup() -> Result<SoftHsm, String> {
    let hsm = SoftHsm::create(TOKENS, SO_PIN, PIN)?;
    // SAFETY: this runs once, inside the OnceLock, before any test of this
    // binary reaches the PKCS#11 module (every test goes through `hsm()`
    // first), so no C code reads the environment concurrently; Rust's own
    // environment access is serialised by std.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("SOFTHSM2_CONF", &hsm.conf);
    }
    Ok(hsm)
}

/// The test SoftHSM2, or None (after printing why; a failure when CI is
/// set: the kit's skip rule) when softhsm2 is not installed.
pub fn hsm() -> Option<&'static SoftHsm> {
    HSM.get_or_init(|| microcert_testkit::skip::require("SoftHSM2 tests", setup()))
        .as_ref()
}

/// The configuration of test token `label`, with the right PIN.
pub fn config(label: &str) -> Pkcs11Config {
    Pkcs11Config::new(SOFTHSM2_MODULE, label).with_pin(PIN)
}

/// The card on token "mc-main", initialised once for the whole binary.
pub fn main_card() -> Option<&'static Pkcs11Card> {
    static CARD: OnceLock<Option<Pkcs11Card>> = OnceLock::new();
    hsm()?;
    CARD.get_or_init(|| Some(Pkcs11Card::init(&config("mc-main").with_sessions(4)).unwrap()))
        .as_ref()
}

/// A raw PKCS#11 context on the same module (it is already initialised by
/// the card: the same library state is shared).
pub fn raw_context() -> cryptoki::context::Pkcs11 {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    let ctx = Pkcs11::new(SOFTHSM2_MODULE).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    ctx
}

/// A logged-in raw session on token `label`.
pub fn raw_session(label: &str) -> cryptoki::session::Session {
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    let ctx = raw_context();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == label)
        .unwrap();
    let s = ctx.open_rw_session(slot).unwrap();
    match s.login(UserType::User, Some(&AuthPin::new(PIN.into()))) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
    s
}
