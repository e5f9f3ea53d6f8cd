//! Property tests of every codec and check: round trips, single-bit
//! changes, arbitrary input, and one error variant per kind of bad header.

use microcert_core::{
    Audience, Auth, AuthResponse, CHALLENGE_LEN, Command, DataDigest, DeviceId, Enroll, EnrollFs,
    EnrollKey, Error, HEADER_LEN, Header, Key128, KeySeed, Message, Opcode, Receipt, SEED_LEN,
    Sealed, Sender, Signature, Suite, check_challenge, make_auth, make_auth_response,
    make_challenge, make_command, make_enroll, make_receipt, make_signature, open_enroll,
    open_in_place, seal, verify_auth, verify_auth_response, verify_command, verify_receipt,
    verify_signature,
};
use proptest::prelude::*;

const T_2026: u32 = 1_767_225_600;
const T_2031: u32 = 1_924_992_000;

fn seed() -> KeySeed {
    KeySeed::from_bytes(
        &core::array::from_fn::<u8, SEED_LEN, _>(|i| (i * 37 + 11) as u8),
        2026,
    )
}

fn ktr() -> Key128 {
    Key128::from_bytes([0x6b; 16])
}

fn rp() -> Audience {
    Audience::relying_party("billing.example")
}

fn suite() -> impl Strategy<Value = Suite> {
    prop_oneof![Just(Suite::CMAC64), Just(Suite::CMAC128)]
}

/// A header whose t is inside the test seed's years.
fn header() -> impl Strategy<Value = Header> {
    (
        suite(),
        any::<[u8; 8]>(),
        any::<u8>(),
        T_2026..T_2031,
        any::<u64>(),
    )
        .prop_map(|(suite, device, generation, t, r)| Header {
            suite,
            device: DeviceId(device),
            generation,
            t,
            r,
        })
}

/// A header with any t at all.
fn any_header() -> impl Strategy<Value = Header> {
    (header(), any::<u32>()).prop_map(|(mut h, t)| {
        h.t = t;
        h
    })
}

const CHALLENGE: [u8; CHALLENGE_LEN] = *b"0123456789abcdef";
const DATA: &[u8] = b"signed or sealed data";

/// A valid message of type `ty` (1..=7) made under the test seed.
fn make(ty: u8, h: &Header) -> Vec<u8> {
    let s = seed();
    let mut buf = vec![0u8; 1100];
    let n = match ty {
        1 => make_auth(&s, h, &Audience::CENTER, &mut buf),
        2 => make_auth_response(&s, h, &CHALLENGE, &Audience::CENTER, &mut buf),
        3 => make_signature(&s, h, &DataDigest::of(DATA), &mut buf),
        4 => seal(&s, h, &rp(), DATA, &mut buf),
        5 => make_enroll(EnrollKey::Transport(&ktr()), &s, h, &mut buf),
        6 => make_command(&s, h, h.t, Opcode::UPDATE_SEED, &mut buf),
        _ => make_receipt(&s, h, Sender::Center, 42, 0, &mut buf),
    }
    .unwrap();
    buf.truncate(n);
    buf
}

/// Decodes `bytes` as type `ty` and checks it as `make` made it.
fn verify(ty: u8, bytes: &[u8]) -> Result<(), Error> {
    let s = seed();
    match ty {
        1 => verify_auth(&s, &Auth::decode(bytes)?, &Audience::CENTER),
        2 => verify_auth_response(&s, &AuthResponse::decode(bytes)?, &Audience::CENTER),
        3 => verify_signature(&s, &Signature::decode(bytes)?, &DataDigest::of(DATA)),
        4 => open_in_place(&s, &mut bytes.to_vec(), &rp()).map(|_| ()),
        5 => open_enroll(EnrollKey::Transport(&ktr()), &Enroll::decode(bytes)?).map(|_| ()),
        6 => verify_command(&s, &Command::decode(bytes)?),
        _ => verify_receipt(&s, &Receipt::decode(bytes)?, Sender::Center),
    }
}

/// Decodes with the decoder of type `ty` and encodes again.
fn reencode(ty: u8, bytes: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = vec![0u8; bytes.len()];
    let n = match ty {
        1 => Auth::decode(bytes)?.encode(&mut out)?,
        2 => AuthResponse::decode(bytes)?.encode(&mut out)?,
        3 => Signature::decode(bytes)?.encode(&mut out)?,
        4 => Sealed::decode(bytes)?.encode(&mut out)?,
        5 => Enroll::decode(bytes)?.encode(&mut out)?,
        6 => Command::decode(bytes)?.encode(&mut out)?,
        7 => Receipt::decode(bytes)?.encode(&mut out)?,
        _ => Message::decode(bytes)?.encode(&mut out)?,
    };
    out.truncate(n);
    Ok(out)
}

fn message_type() -> impl Strategy<Value = u8> {
    1u8..=7
}

/// A valid message with a few bytes changed, so that decoders see inputs
/// close to valid ones more often than random bytes alone would give.
fn near_valid() -> impl Strategy<Value = Vec<u8>> {
    (
        message_type(),
        header(),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    )
        .prop_map(|(ty, h, edits)| {
            let mut m = make(ty, &h);
            for (i, v) in edits {
                let len = m.len();
                m[i % len] = v;
            }
            m
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_message_round_trips(ty in message_type(), h in header()) {
        let m = make(ty, &h);
        prop_assert_eq!(&reencode(ty, &m).unwrap(), &m);
        prop_assert_eq!(&reencode(0, &m).unwrap(), &m);
        let msg = Message::decode(&m).unwrap();
        prop_assert_eq!(msg.msg_type().get(), ty);
        prop_assert_eq!(msg.header(), &h);
        prop_assert_eq!(verify(ty, &m), Ok(()));
    }

    #[test]
    fn fields_round_trip_through_encode_and_decode(
        h in any_header(),
        tag in any::<[u8; 16]>(),
        challenge in any::<[u8; 16]>(),
        counter in any::<u32>(),
        reference in any::<u64>(),
        status in any::<u8>(),
        revoke in any::<bool>(),
        ciphertext in proptest::collection::vec(any::<u8>(), 0..300),
        enroll_ct in any::<u8>(),
    ) {
        let tag = &tag[..h.suite.tag_len()];
        let mut buf = vec![0u8; 1100];
        let auth = Auth { header: h, tag };
        let n = auth.encode(&mut buf).unwrap();
        prop_assert_eq!(Auth::decode(&buf[..n]).unwrap(), auth);
        let ar = AuthResponse { header: h, challenge: &challenge, tag };
        let n = ar.encode(&mut buf).unwrap();
        prop_assert_eq!(AuthResponse::decode(&buf[..n]).unwrap(), ar);
        let sig = Signature { header: h, tag };
        let n = sig.encode(&mut buf).unwrap();
        prop_assert_eq!(Signature::decode(&buf[..n]).unwrap(), sig);
        let sealed = Sealed { header: h, ciphertext: &ciphertext, tag };
        let n = sealed.encode(&mut buf).unwrap();
        prop_assert_eq!(Sealed::decode(&buf[..n]).unwrap(), sealed);
        let ect = [enroll_ct; 978];
        let enroll = Enroll { header: h, ciphertext: &ect, tag };
        let n = enroll.encode(&mut buf).unwrap();
        prop_assert_eq!(Enroll::decode(&buf[..n]).unwrap(), enroll);
        let opcode = if revoke { Opcode::REVOKE } else { Opcode::UPDATE_SEED };
        let cmd = Command { header: h, counter, opcode, ephemeral: None, tag };
        let n = cmd.encode(&mut buf).unwrap();
        prop_assert_eq!(Command::decode(&buf[..n]).unwrap(), cmd);
        let qc = [enroll_ct; 33];
        let cmd = Command { header: h, counter, opcode: Opcode::UPDATE_SEED_FS, ephemeral: Some(&qc), tag };
        let n = cmd.encode(&mut buf).unwrap();
        prop_assert_eq!(Command::decode(&buf[..n]).unwrap(), cmd);
        let efs = EnrollFs { header: h, ephemeral: &qc, ciphertext: &ect, ccm_tag: tag, tag };
        let n = efs.encode(&mut buf).unwrap();
        prop_assert_eq!(EnrollFs::decode(&buf[..n]).unwrap(), efs);
        prop_assert_eq!(Enroll::decode(&buf[..n]), Err(Error::Length));
        let rc = Receipt { header: h, reference, status, tag };
        let n = rc.encode(&mut buf).unwrap();
        prop_assert_eq!(Receipt::decode(&buf[..n]).unwrap(), rc);
    }

    #[test]
    fn decode_then_encode_gives_the_input(bytes in near_valid()) {
        for ty in 0..=7 {
            if let Ok(again) = reencode(ty, &bytes) {
                prop_assert_eq!(&again, &bytes);
            }
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..1100),
    ) {
        for ty in 0..=7 {
            if let Ok(again) = reencode(ty, &bytes) {
                prop_assert_eq!(&again, &bytes);
            }
        }
        let _ = Header::parse(&bytes);
        let _ = Signature::decode_prefix(&bytes);
        let _ = open_in_place(&seed(), &mut bytes.clone(), &rp());
    }

    #[test]
    fn arbitrary_bytes_with_a_valid_first_byte_never_panic(
        ty in message_type(),
        suite in 1u8..=2,
        rest in proptest::collection::vec(any::<u8>(), 0..1100),
    ) {
        let mut bytes = vec![0x10 | ty, suite];
        bytes.extend(rest);
        let _ = verify(ty, &bytes);
        if let Ok(again) = reencode(0, &bytes) {
            prop_assert_eq!(&again, &bytes);
        }
    }

    #[test]
    fn any_single_bit_change_of_a_message_is_rejected(
        ty in message_type(),
        h in header(),
        bit in any::<usize>(),
    ) {
        let mut m = make(ty, &h);
        let bit = bit % (m.len() * 8);
        m[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(verify(ty, &m).is_err(), "bit {} of type {}", bit, ty);
    }

    #[test]
    fn any_single_bit_change_of_a_challenge_is_rejected(
        kchal in any::<[u8; 16]>(),
        device in any::<[u8; 8]>(),
        c in any::<[u8; 8]>(),
        now in 60u32..u32::MAX - 60,
        later in 0u32..120,
        bit in 0usize..128,
    ) {
        let kchal = Key128::from_bytes(kchal);
        let device = DeviceId(device);
        let mut ch = make_challenge(&kchal, device, c, now);
        // Valid in its own window and the next.
        let check_at = now - now % 60 + later;
        prop_assert_eq!(check_challenge(&kchal, device, &ch, check_at), Ok(()));
        ch[bit / 8] ^= 1 << (bit % 8);
        prop_assert_eq!(check_challenge(&kchal, device, &ch, check_at), Err(Error::Verification));
    }

    #[test]
    fn a_challenge_expires_after_the_previous_window(
        c in any::<[u8; 8]>(),
        now in 0u32..u32::MAX - 240,
        after in 120u32..240,
    ) {
        let kchal = Key128::from_bytes([9; 16]);
        let device = DeviceId([1; 8]);
        let ch = make_challenge(&kchal, device, c, now);
        let late = now - now % 60 + after;
        prop_assert_eq!(check_challenge(&kchal, device, &ch, late), Err(Error::Verification));
    }

    #[test]
    fn any_single_bit_change_of_signed_data_is_rejected(
        h in header(),
        data in proptest::collection::vec(any::<u8>(), 1..400),
        bit in any::<usize>(),
    ) {
        let s = seed();
        let mut buf = [0u8; 39];
        let n = make_signature(&s, &h, &DataDigest::of(&data), &mut buf).unwrap();
        let sig = Signature::decode(&buf[..n]).unwrap();
        // The digest is fed in two pieces: the split must not matter.
        let mut d = DataDigest::new();
        let half = data.len() / 2;
        d.update(&data[..half]);
        d.update(&data[half..]);
        prop_assert_eq!(verify_signature(&s, &sig, &d.finish()), Ok(()));
        let mut changed = data.clone();
        let bit = bit % (data.len() * 8);
        changed[bit / 8] ^= 1 << (bit % 8);
        prop_assert_eq!(
            verify_signature(&s, &sig, &DataDigest::of(&changed)),
            Err(Error::Verification)
        );
    }

    #[test]
    fn wrong_length_is_error_length(ty in message_type(), h in header(), cut in any::<usize>(),
                                    extra in proptest::collection::vec(any::<u8>(), 1..32)) {
        let m = make(ty, &h);
        // A SEALED ciphertext has any length, so only a cut into its
        // header or tag is short.
        let min = if ty == 4 { HEADER_LEN + h.suite.tag_len() } else { m.len() };
        let short = &m[..cut % min];
        prop_assert_eq!(reencode(ty, short), Err(Error::Length));
        prop_assert_eq!(reencode(0, short), Err(Error::Length));
        if ty != 4 {
            let mut long = m.clone();
            long.extend(&extra);
            prop_assert_eq!(reencode(ty, &long), Err(Error::Length));
            prop_assert_eq!(reencode(0, &long), Err(Error::Length));
        }
    }

    #[test]
    fn wrong_version_is_error_version(ty in message_type(), h in header(), v in 0u8..16) {
        prop_assume!(v != 1);
        let mut m = make(ty, &h);
        m[0] = (v << 4) | (m[0] & 0x0f);
        prop_assert_eq!(reencode(ty, &m), Err(Error::Version(v)));
        prop_assert_eq!(reencode(0, &m), Err(Error::Version(v)));
        prop_assert_eq!(verify(ty, &m), Err(Error::Version(v)));
    }

    #[test]
    fn unknown_type_is_error_unknown_type(ty in message_type(), h in header(), nibble in 0u8..16) {
        prop_assume!(!(1..=7).contains(&nibble));
        let mut m = make(ty, &h);
        m[0] = 0x10 | nibble;
        prop_assert_eq!(reencode(ty, &m), Err(Error::UnknownType(nibble)));
        prop_assert_eq!(reencode(0, &m), Err(Error::UnknownType(nibble)));
    }

    #[test]
    fn another_type_is_error_wrong_type(ty in message_type(), other in message_type(), h in header()) {
        prop_assume!(ty != other);
        let mut m = make(ty, &h);
        m[0] = 0x10 | other;
        prop_assert_eq!(
            reencode(ty, &m),
            Err(Error::WrongType { expected: ty, found: other })
        );
    }

    #[test]
    fn unknown_suite_is_error_unknown_suite(ty in message_type(), h in header(), s in any::<u8>()) {
        prop_assume!(s != 1 && s != 2);
        let mut m = make(ty, &h);
        m[1] = s;
        prop_assert_eq!(reencode(ty, &m), Err(Error::UnknownSuite(s)));
        prop_assert_eq!(reencode(0, &m), Err(Error::UnknownSuite(s)));
    }

    #[test]
    fn unknown_opcode_is_error_unknown_opcode(h in header(), op in any::<u8>()) {
        prop_assume!(!(1..=3).contains(&op));
        let mut m = make(6, &h);
        m[HEADER_LEN + 4] = op;
        prop_assert_eq!(reencode(6, &m), Err(Error::UnknownOpcode(op)));
        // UPDATE_SEED_FS without its public key is the wrong length.
        m[HEADER_LEN + 4] = 3;
        prop_assert_eq!(reencode(6, &m), Err(Error::Length));
    }
}
