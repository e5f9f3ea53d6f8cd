//! A PKCS#11 session invalidated by the token is replaced (issue 15 item
//! 4): another handle on the same module closes every session of the
//! token (as a token reset, an HSM restart or another library user's
//! C_CloseAllSessions does), which also logs the application out; the
//! card's next operations open new sessions, log in again with the PIN
//! it keeps, and answer as before.

mod common;

use microcert_center::card::EncryptionCard;
use microcert_core::{DeviceId, KeySeed};

use common::{main_card, raw_context};
use microcert_pkcs11::SOFTHSM2_MODULE;

/// C_CloseAllSessions on `slot` through a second handle on the module
/// (cryptoki does not wrap it): every session of this process on the
/// token is closed and the process is logged out of it.
#[allow(unsafe_code)]
fn close_all_sessions(slot: u64) {
    // SAFETY: the module is already loaded and initialised by the card (a
    // second dlopen gives the same library state); C_CloseAllSessions
    // takes a slot id by value and touches no memory of ours.
    let lib = unsafe { cryptoki_sys::Pkcs11::new(SOFTHSM2_MODULE) }.unwrap();
    let rv = unsafe { lib.C_CloseAllSessions(slot as cryptoki_sys::CK_SLOT_ID) };
    assert_eq!(rv, cryptoki_sys::CKR_OK);
}

#[test]
fn sessions_closed_by_the_token_are_replaced_and_logged_in_again() {
    let Some(card) = main_card() else { return };
    let tag = card.record_tag(b"before").unwrap();
    let dev = DeviceId::from_u64(9);
    let seed = KeySeed::generate(2026, |b| b.fill(0x42));
    let sealed = card.seal_seed(dev, 0, &seed).unwrap();

    let ctx = raw_context();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == "mc-main")
        .unwrap();
    close_all_sessions(slot.id());

    // Every pooled session is dead; each operation replaces the one it
    // borrows (more operations than sessions in the pool).
    for _ in 0..8 {
        assert_eq!(card.record_tag(b"before").unwrap(), tag);
    }
    let back = card
        .unseal_seed(dev, 0, sealed.kstore_version, &sealed.ciphertext)
        .unwrap();
    assert!(back == seed);
    let again = card.seal_seed(dev, 1, &seed).unwrap();
    assert_eq!(again.ciphertext.len(), sealed.ciphertext.len());
    let mut r = [0u8; 16];
    card.random(&mut r).unwrap();
    assert_ne!(r, [0u8; 16]);
}
