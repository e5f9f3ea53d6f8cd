//! Making and checking messages (PROTOCOL.md sections 3 to 6).
//!
//! Every function takes the seed (or key), the header fields and the time
//! and randomness already chosen by the caller; none reads a clock or draws
//! a random number. A failed check is always [`Error::Verification`].

// The encryption-only AES: CMAC and CCM never decrypt, so the decryption
// key schedule would be wasted work on every call (about 8% of a verify).
use aes::Aes128Enc;
use ccm::aead::array::Array;
use ccm::aead::consts::{U8, U13, U16};
use ccm::{AeadInOut, Ccm, KeyInit};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::csk;
use crate::kdf::{Purpose, cmac_parts, derive_key};
use crate::msg::{
    Auth, AuthResponse, CHALLENGE_LEN, Codec, Command, ENROLL_PLAINTEXT_LEN, Enroll, EnrollFs,
    FS_PUBLIC_LEN, MAX_SEALED_PLAINTEXT, Opcode, Receipt, Sealed, Sender, Signature,
};
use crate::secret::{Key128, KeySeed, SEED_LEN};
use crate::wire::{Audience, DeviceId, HEADER_LEN, Header, MsgType, Suite};
use crate::{Error, Result};

/// A working key of `seed` for `purpose`, keyed to the header's t and r and
/// bound to its device, generation, t and r.
pub fn working_key(seed: &KeySeed, purpose: Purpose, header: &Header) -> Result<Key128> {
    let k0 = csk::combine(seed, header.t, header.r)?;
    Ok(derive_key(&k0, purpose.label(), &header.context()))
}

/// The full 16-byte MAC; callers truncate to the suite's length. Wiped
/// on drop because with suite 0x01 its second half is never sent.
fn mac(key: &Key128, parts: &[&[u8]]) -> Zeroizing<[u8; 16]> {
    Zeroizing::new(*cmac_parts(key.expose(), parts).expose())
}

fn check_mac(key: &Key128, suite: Suite, parts: &[&[u8]], tag: &[u8]) -> Result<()> {
    let full = mac(key, parts);
    let len = suite.tag_len();
    if tag.len() == len && bool::from(full[..len].ct_eq(tag)) {
        Ok(())
    } else {
        Err(Error::Verification)
    }
}

/// The tag field of a message being made, before its MAC is known.
const NO_TAG: [u8; 16] = [0; 16];

/// The longest MAC-tagged message: an UPDATE_SEED_FS COMMAND in suite 0x02.
const MAX_TAGGED_LEN: usize = HEADER_LEN + 5 + FS_PUBLIC_LEN + 16;

/// A placeholder tag of the suite's length.
fn no_tag(header: &Header) -> &'static [u8] {
    &NO_TAG[..header.suite.tag_len()]
}

/// Encodes `msg` (whose tag is a placeholder) into `out`, then writes its
/// tag over the placeholder: tag(key, H || body || mac_tail), where
/// `H || body` are the bytes just encoded. Returns the message length.
fn write_tagged<'a, M: Codec<'a>>(
    msg: &M,
    key: &Key128,
    mac_tail: &[u8],
    out: &mut [u8],
) -> Result<usize> {
    let len = msg.encode(out)?;
    let tag_len = msg.header().suite.tag_len();
    let (signed, tag) = out[..len].split_at_mut(len - tag_len);
    let full = mac(key, &[signed, mac_tail]);
    tag.copy_from_slice(&full[..tag_len]);
    Ok(len)
}

/// Checks the tag of a decoded MAC-tagged message against tag(key, H ||
/// body || mac_tail), re-encoding `H || body` from its fields.
fn check_tagged<'a, M: Codec<'a>>(msg: &M, key: &Key128, mac_tail: &[u8]) -> Result<()> {
    let mut buf = [0u8; MAX_TAGGED_LEN];
    let len = msg.encode(&mut buf).map_err(|_| Error::Verification)?;
    let signed = &buf[..len - msg.tag().len()];
    check_mac(key, msg.header().suite, &[signed, mac_tail], msg.tag())
}

/// Makes an AUTH for audience `aud` into `out`; returns its length.
pub fn make_auth(seed: &KeySeed, header: &Header, aud: &Audience, out: &mut [u8]) -> Result<usize> {
    let key = working_key(seed, Purpose::Auth, header)?;
    let msg = Auth {
        header: *header,
        tag: no_tag(header),
    };
    write_tagged(&msg, &key, &aud.0, out)
}

/// Checks an AUTH's tag for audience `aud` (not its freshness).
pub fn verify_auth(seed: &KeySeed, msg: &Auth<'_>, aud: &Audience) -> Result<()> {
    let key = working_key(seed, Purpose::Auth, &msg.header)?;
    check_tagged(msg, &key, &aud.0)
}

/// Makes an AUTH_RESPONSE to `challenge` into `out`; returns its length.
pub fn make_auth_response(
    seed: &KeySeed,
    header: &Header,
    challenge: &[u8; CHALLENGE_LEN],
    aud: &Audience,
    out: &mut [u8],
) -> Result<usize> {
    let key = working_key(seed, Purpose::Auth, header)?;
    let msg = AuthResponse {
        header: *header,
        challenge,
        tag: no_tag(header),
    };
    write_tagged(&msg, &key, &aud.0, out)
}

/// Checks an AUTH_RESPONSE's tag (the challenge itself is the center's to check).
pub fn verify_auth_response(seed: &KeySeed, msg: &AuthResponse<'_>, aud: &Audience) -> Result<()> {
    let key = working_key(seed, Purpose::Auth, &msg.header)?;
    check_tagged(msg, &key, &aud.0)
}

/// SHA-256 of signed data, fed in pieces so data of any size needs no buffer.
#[derive(Clone, Default)]
pub struct DataDigest(Sha256);

impl core::fmt::Debug for DataDigest {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("DataDigest { .. }")
    }
}

impl DataDigest {
    /// An empty digest.
    pub fn new() -> Self {
        DataDigest(Sha256::new())
    }

    /// Adds the next piece of data.
    pub fn update(&mut self, piece: &[u8]) {
        self.0.update(piece);
    }

    /// The 32-byte digest.
    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }

    /// The digest of data held in one slice.
    pub fn of(data: &[u8]) -> [u8; 32] {
        let mut d = DataDigest::new();
        d.update(data);
        d.finish()
    }
}

/// Makes a SIGNATURE over data whose SHA-256 is `digest`.
pub fn make_signature(
    seed: &KeySeed,
    header: &Header,
    digest: &[u8; 32],
    out: &mut [u8],
) -> Result<usize> {
    let key = working_key(seed, Purpose::Sign, header)?;
    let msg = Signature {
        header: *header,
        tag: no_tag(header),
    };
    write_tagged(&msg, &key, digest, out)
}

/// Checks a SIGNATURE over data whose SHA-256 is `digest`.
pub fn verify_signature(seed: &KeySeed, msg: &Signature<'_>, digest: &[u8; 32]) -> Result<()> {
    let key = working_key(seed, Purpose::Sign, &msg.header)?;
    check_tagged(msg, &key, digest)
}

fn ccm_encrypt(
    key: &Key128,
    suite: Suite,
    nonce: &[u8; 13],
    aad: &[u8],
    buf: &mut [u8],
    tag_out: &mut [u8],
) -> Result<()> {
    let nonce: &Array<u8, U13> = nonce.into();
    match suite.tag_len() {
        8 => {
            let tag = Ccm::<Aes128Enc, U8, U13>::new(key.expose().into())
                .encrypt_inout_detached(nonce, aad, buf.into())
                .map_err(|_| Error::PlaintextTooLong)?;
            tag_out.copy_from_slice(&tag);
        }
        _ => {
            let tag = Ccm::<Aes128Enc, U16, U13>::new(key.expose().into())
                .encrypt_inout_detached(nonce, aad, buf.into())
                .map_err(|_| Error::PlaintextTooLong)?;
            tag_out.copy_from_slice(&tag);
        }
    }
    Ok(())
}

/// Decrypts in place; on failure the buffer is wiped.
fn ccm_decrypt(
    key: &Key128,
    suite: Suite,
    nonce: &[u8; 13],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8],
) -> Result<()> {
    let nonce: &Array<u8, U13> = nonce.into();
    let ok = match suite.tag_len() {
        8 => {
            let tag = <&Array<u8, U8>>::try_from(tag).map_err(|_| Error::Verification)?;
            Ccm::<Aes128Enc, U8, U13>::new(key.expose().into())
                .decrypt_inout_detached(nonce, aad, buf.into(), tag)
                .is_ok()
        }
        _ => {
            let tag = <&Array<u8, U16>>::try_from(tag).map_err(|_| Error::Verification)?;
            Ccm::<Aes128Enc, U16, U13>::new(key.expose().into())
                .decrypt_inout_detached(nonce, aad, buf.into(), tag)
                .is_ok()
        }
    };
    if ok {
        Ok(())
    } else {
        buf.fill(0);
        Err(Error::Verification)
    }
}

fn sealed_aad(hb: &[u8; HEADER_LEN], aud: &Audience) -> [u8; HEADER_LEN + 8] {
    let mut aad = [0u8; HEADER_LEN + 8];
    aad[..HEADER_LEN].copy_from_slice(hb);
    aad[HEADER_LEN..].copy_from_slice(&aud.0);
    aad
}

/// Makes a SEALED message in place: the caller has put `plaintext_len`
/// bytes of plaintext at `buf[HEADER_LEN..]`; this writes the header before
/// it, encrypts it in place and appends the tag. Returns the message length.
pub fn seal_in_place(
    seed: &KeySeed,
    header: &Header,
    aud: &Audience,
    buf: &mut [u8],
    plaintext_len: usize,
) -> Result<usize> {
    if aud.is_center() {
        return Err(Error::CenterAudience);
    }
    if plaintext_len > MAX_SEALED_PLAINTEXT {
        return Err(Error::PlaintextTooLong);
    }
    let tag_len = header.suite.tag_len();
    let len = HEADER_LEN + plaintext_len + tag_len;
    if buf.len() < len {
        return Err(Error::BufferTooSmall);
    }
    let key = working_key(seed, Purpose::Enc, header)?;
    let hb = header.to_bytes(MsgType::SEALED);
    let (head, rest) = buf.split_at_mut(HEADER_LEN);
    let (body, tail) = rest.split_at_mut(plaintext_len);
    head.copy_from_slice(&hb);
    ccm_encrypt(
        &key,
        header.suite,
        &header.nonce(),
        &sealed_aad(&hb, aud),
        body,
        &mut tail[..tag_len],
    )?;
    Ok(len)
}

/// Makes a SEALED message of `plaintext` into `out`.
pub fn seal(
    seed: &KeySeed,
    header: &Header,
    aud: &Audience,
    plaintext: &[u8],
    out: &mut [u8],
) -> Result<usize> {
    if plaintext.len() > MAX_SEALED_PLAINTEXT {
        return Err(Error::PlaintextTooLong);
    }
    if out.len() < HEADER_LEN + plaintext.len() + header.suite.tag_len() {
        return Err(Error::BufferTooSmall);
    }
    out[HEADER_LEN..HEADER_LEN + plaintext.len()].copy_from_slice(plaintext);
    seal_in_place(seed, header, aud, out, plaintext.len())
}

/// Opens a SEALED message in place and returns its plaintext, a sub-slice
/// of `msg`. On failure the ciphertext is wiped.
pub fn open_in_place<'a>(
    seed: &KeySeed,
    msg: &'a mut [u8],
    aud: &Audience,
) -> Result<(Header, &'a mut [u8])> {
    if aud.is_center() {
        return Err(Error::CenterAudience);
    }
    let (header, ct_len) = {
        let sealed = Sealed::decode(msg)?;
        (sealed.header, sealed.ciphertext.len())
    };
    let key = working_key(seed, Purpose::Enc, &header)?;
    let hb = header.to_bytes(MsgType::SEALED);
    let (_, rest) = msg.split_at_mut(HEADER_LEN);
    let (body, tag) = rest.split_at_mut(ct_len);
    ccm_decrypt(
        &key,
        header.suite,
        &header.nonce(),
        &sealed_aad(&hb, aud),
        body,
        tag,
    )?;
    Ok((header, body))
}

/// The key that protects an ENROLL.
#[derive(Debug, Clone, Copy)]
pub enum EnrollKey<'a> {
    /// Ktr(device, epoch): first enrollment, or re-enrollment the center
    /// opened for a node that holds no usable seed.
    Transport(&'a Key128),
    /// Kupd from the node's current seed: a seed update.
    Update(&'a KeySeed),
}

fn enroll_key(key: EnrollKey<'_>, header: &Header) -> Result<Key128> {
    match key {
        EnrollKey::Transport(k) => Ok(Key128::from_bytes(*k.expose())),
        EnrollKey::Update(seed) => working_key(seed, Purpose::Upd, header),
    }
}

/// Makes an ENROLL carrying `new_seed` (generation = the header's).
pub fn make_enroll(
    key: EnrollKey<'_>,
    new_seed: &KeySeed,
    header: &Header,
    out: &mut [u8],
) -> Result<usize> {
    let tag_len = header.suite.tag_len();
    let len = HEADER_LEN + ENROLL_PLAINTEXT_LEN + tag_len;
    if out.len() < len {
        return Err(Error::BufferTooSmall);
    }
    let k = enroll_key(key, header)?;
    let hb = header.to_bytes(MsgType::ENROLL);
    let (head, rest) = out.split_at_mut(HEADER_LEN);
    let (body, tail) = rest.split_at_mut(ENROLL_PLAINTEXT_LEN);
    head.copy_from_slice(&hb);
    body[..SEED_LEN].copy_from_slice(new_seed.expose());
    body[SEED_LEN..].copy_from_slice(&new_seed.base_year().to_be_bytes());
    if let Err(e) = ccm_encrypt(
        &k,
        header.suite,
        &header.nonce(),
        &hb,
        body,
        &mut tail[..tag_len],
    ) {
        body.fill(0);
        return Err(e);
    }
    Ok(len)
}

/// Opens an ENROLL and returns the seed it carries.
pub fn open_enroll(key: EnrollKey<'_>, msg: &Enroll<'_>) -> Result<KeySeed> {
    let k = enroll_key(key, &msg.header)?;
    let hb = msg.header.to_bytes(MsgType::ENROLL);
    let mut pt = Zeroizing::new(*msg.ciphertext);
    ccm_decrypt(
        &k,
        msg.header.suite,
        &msg.header.nonce(),
        &hb,
        &mut pt[..],
        msg.tag,
    )?;
    let base_year = u16::from_be_bytes([pt[SEED_LEN], pt[SEED_LEN + 1]]);
    KeySeed::from_slice(&pt[..SEED_LEN], base_year)
}

/// Makes a COMMAND (center to node). UPDATE_SEED_FS carries a public key:
/// it is made by [`make_command_fs`], and refused here ([`Error::Length`]).
pub fn make_command(
    seed: &KeySeed,
    header: &Header,
    counter: u32,
    opcode: Opcode,
    out: &mut [u8],
) -> Result<usize> {
    if opcode == Opcode::UPDATE_SEED_FS {
        return Err(Error::Length);
    }
    let key = working_key(seed, Purpose::Cmd, header)?;
    let msg = Command {
        header: *header,
        counter,
        opcode,
        ephemeral: None,
        tag: no_tag(header),
    };
    write_tagged(&msg, &key, &[], out)
}

/// Makes an UPDATE_SEED_FS COMMAND (v1.2) carrying the center's ephemeral
/// public key `qc`, authenticated by the tag under Kcmd.
pub fn make_command_fs(
    seed: &KeySeed,
    header: &Header,
    counter: u32,
    qc: &[u8; FS_PUBLIC_LEN],
    out: &mut [u8],
) -> Result<usize> {
    let key = working_key(seed, Purpose::Cmd, header)?;
    let msg = Command {
        header: *header,
        counter,
        opcode: Opcode::UPDATE_SEED_FS,
        ephemeral: Some(qc),
        tag: no_tag(header),
    };
    write_tagged(&msg, &key, &[], out)
}

/// Makes the ENROLL of a forward-secret update (v1.2): `new_seed`
/// encrypted under `kfs` (derived from the ECDH, [`crate::fs::fs_key`])
/// with `H || qn` as associated data, then the whole message tagged under
/// Kupd of `current` (the seed of generation g; the header carries g + 1).
pub fn make_enroll_fs(
    current: &KeySeed,
    kfs: &Key128,
    qn: &[u8; FS_PUBLIC_LEN],
    new_seed: &KeySeed,
    header: &Header,
    out: &mut [u8],
) -> Result<usize> {
    let tag_len = header.suite.tag_len();
    let len = HEADER_LEN + FS_PUBLIC_LEN + ENROLL_PLAINTEXT_LEN + 2 * tag_len;
    if out.len() < len {
        return Err(Error::BufferTooSmall);
    }
    let kupd = working_key(current, Purpose::Upd, header)?;
    let hb = header.to_bytes(MsgType::ENROLL);
    let mut aad = [0u8; HEADER_LEN + FS_PUBLIC_LEN];
    aad[..HEADER_LEN].copy_from_slice(&hb);
    aad[HEADER_LEN..].copy_from_slice(qn);
    let (signed, mac_out) = out[..len].split_at_mut(len - tag_len);
    let (head, rest) = signed.split_at_mut(HEADER_LEN + FS_PUBLIC_LEN);
    let (body, ccm_tag) = rest.split_at_mut(ENROLL_PLAINTEXT_LEN);
    head.copy_from_slice(&aad);
    body[..SEED_LEN].copy_from_slice(new_seed.expose());
    body[SEED_LEN..].copy_from_slice(&new_seed.base_year().to_be_bytes());
    if let Err(e) = ccm_encrypt(kfs, header.suite, &header.nonce(), &aad, body, ccm_tag) {
        body.fill(0);
        return Err(e);
    }
    let full = mac(&kupd, &[signed]);
    mac_out.copy_from_slice(&full[..tag_len]);
    Ok(len)
}

/// Checks the Kupd tag of a forward-secret ENROLL under `current` (the
/// seed of generation g): who sent the node's public key. Cheap, and
/// checked before any elliptic-curve work or key unsealing.
pub fn verify_enroll_fs(current: &KeySeed, msg: &EnrollFs<'_>) -> Result<()> {
    let kupd = working_key(current, Purpose::Upd, &msg.header)?;
    let mut buf = [0u8; HEADER_LEN + FS_PUBLIC_LEN + ENROLL_PLAINTEXT_LEN + 32];
    let len = msg.encode(&mut buf).map_err(|_| Error::Verification)?;
    check_mac(
        &kupd,
        msg.header.suite,
        &[&buf[..len - msg.tag.len()]],
        msg.tag,
    )
}

/// Opens the seed of a forward-secret ENROLL under `kfs` (its Kupd tag is
/// [`verify_enroll_fs`]'s to check).
pub fn open_enroll_fs(kfs: &Key128, msg: &EnrollFs<'_>) -> Result<KeySeed> {
    let hb = msg.header.to_bytes(MsgType::ENROLL);
    let mut aad = [0u8; HEADER_LEN + FS_PUBLIC_LEN];
    aad[..HEADER_LEN].copy_from_slice(&hb);
    aad[HEADER_LEN..].copy_from_slice(msg.ephemeral);
    let mut pt = Zeroizing::new(*msg.ciphertext);
    ccm_decrypt(
        kfs,
        msg.header.suite,
        &msg.header.nonce(),
        &aad,
        &mut pt[..],
        msg.ccm_tag,
    )?;
    let base_year = u16::from_be_bytes([pt[SEED_LEN], pt[SEED_LEN + 1]]);
    KeySeed::from_slice(&pt[..SEED_LEN], base_year)
}

/// Checks a COMMAND's tag (the counter's freshness is the node's to check).
pub fn verify_command(seed: &KeySeed, msg: &Command<'_>) -> Result<()> {
    let key = working_key(seed, Purpose::Cmd, &msg.header)?;
    check_tagged(msg, &key, &[])
}

fn receipt_purpose(sender: Sender) -> Purpose {
    match sender {
        Sender::Center => Purpose::ReceiptCenter,
        Sender::Node => Purpose::ReceiptNode,
    }
}

/// Makes a RECEIPT answering the message whose r is `reference`.
pub fn make_receipt(
    seed: &KeySeed,
    header: &Header,
    sender: Sender,
    reference: u64,
    status: u8,
    out: &mut [u8],
) -> Result<usize> {
    let key = working_key(seed, receipt_purpose(sender), header)?;
    let msg = Receipt {
        header: *header,
        reference,
        status,
        tag: no_tag(header),
    };
    write_tagged(&msg, &key, &[], out)
}

/// Checks a RECEIPT's tag as sent by `sender`.
pub fn verify_receipt(seed: &KeySeed, msg: &Receipt<'_>, sender: Sender) -> Result<()> {
    let key = working_key(seed, receipt_purpose(sender), &msg.header)?;
    check_tagged(msg, &key, &[])
}

/// The challenge window of `now`: w = floor(now / 60).
pub const fn challenge_window(now: u32) -> u32 {
    now / 60
}

fn challenge_mac(kchal: &Key128, device: DeviceId, c: &[u8; 8], w: u32) -> Zeroizing<[u8; 16]> {
    mac(kchal, &[&device.0, c, &w.to_be_bytes()])
}

/// A stateless challenge: c || AES-CMAC(Kchal, device_id || c || w)[0..8].
pub fn make_challenge(
    kchal: &Key128,
    device: DeviceId,
    c: [u8; 8],
    now: u32,
) -> [u8; CHALLENGE_LEN] {
    let m = challenge_mac(kchal, device, &c, challenge_window(now));
    let mut out = [0u8; CHALLENGE_LEN];
    out[..8].copy_from_slice(&c);
    out[8..].copy_from_slice(&m[..8]);
    out
}

/// Checks a challenge for the current or the previous window.
pub fn check_challenge(
    kchal: &Key128,
    device: DeviceId,
    challenge: &[u8; CHALLENGE_LEN],
    now: u32,
) -> Result<()> {
    let (c, tag) = challenge.split_at(8);
    let c: &[u8; 8] = c.try_into().map_err(|_| Error::Verification)?;
    let w = challenge_window(now);
    let cur = challenge_mac(kchal, device, c, w);
    // In window 0 there is no previous window: checking window 0 twice
    // (rather than wrapping to u32::MAX) accepts nothing extra.
    let prev = challenge_mac(kchal, device, c, w.saturating_sub(1));
    let ok = cur[..8].ct_eq(tag) | prev[..8].ct_eq(tag);
    if bool::from(ok) {
        Ok(())
    } else {
        Err(Error::Verification)
    }
}
