//! The center's half of the forward-secret seed update (protocol v1.2,
//! docs/protocol.md section 6, "Forward-secret update").
//!
//! For a device whose class profile sets `forward_secret_update`, an
//! update is queued as UPDATE_SEED_FS: a fresh ephemeral P-256 key pair
//! from the card's generator, its public key in the COMMAND (under the
//! COMMAND's Kcmd tag), and its private key sealed under the card's
//! storage key (as a seed is) and kept after the COMMAND's bytes in the
//! command row, covered by the row's card tag. It is never in the clear
//! in the database, and it is destroyed (the sealed bytes removed from
//! the row) as soon as the update is answered (by the ENROLL, or by the
//! node's RECEIPT) or the command is replaced (REVOKE, a rebuild after a
//! restore, which draws a new key pair). Until then, whoever steals both
//! the database and the card can open the key and, with a recording of
//! the node's ENROLL, that one new seed: the window is the update's
//! pending time, not the seed's life.

use microcert_core::fs::EphemeralKey;
use microcert_core::{
    DeviceId, EnrollFs, FS_PUBLIC_LEN, HEADER_LEN, KeySeed, Opcode, SEED_LEN, Suite,
};
use zeroize::Zeroizing;

use crate::card::EncryptionCard;
use crate::db::CommandRow;
use crate::{Error, Result};

/// The base year written into the padded seed that carries a sealed
/// ephemeral key: no real seed has it (a real one covers its center's
/// date), so a sealed key is never taken for a seed.
const EPHEMERAL_MARK: u16 = 0;

/// Length of a COMMAND's wire bytes from its first bytes: the suite's tag
/// length and the opcode decide it. None when the bytes are too short or
/// name no suite or opcode.
fn wire_len(bytes: &[u8]) -> Option<usize> {
    let suite = Suite::new(*bytes.get(1)?).ok()?;
    let opcode = Opcode::new(*bytes.get(HEADER_LEN + 4)?).ok()?;
    let body = if opcode == Opcode::UPDATE_SEED_FS {
        5 + FS_PUBLIC_LEN
    } else {
        5
    };
    Some(HEADER_LEN + body + suite.tag_len())
}

/// The COMMAND bytes of a row (what is served to the node), without the
/// sealed ephemeral key that may follow them.
pub(crate) fn wire(row: &CommandRow) -> &[u8] {
    let b = &row.bytes.0;
    match wire_len(b) {
        Some(n) if n <= b.len() => &b[..n],
        _ => b,
    }
}

/// Destroys the sealed ephemeral key of a row (keeps the COMMAND bytes).
/// The caller writes the row back.
pub(crate) fn destroy_secret(row: &mut CommandRow) {
    let n = wire(row).len();
    row.bytes.0.truncate(n);
}

/// Whether the opcode byte is an update of either kind.
pub(crate) fn is_update(opcode: u8) -> bool {
    opcode == Opcode::UPDATE_SEED.get() || opcode == Opcode::UPDATE_SEED_FS.get()
}

/// A fresh ephemeral key pair from the card's generator.
pub(crate) fn new_key(card: &dyn EncryptionCard) -> Result<EphemeralKey> {
    EphemeralKey::generate(|buf| {
        card.random(buf)
            .map_err(|_| microcert_core::Error::Verification)
    })
    .map_err(|_| Error::Card("no ephemeral key from the card's generator".into()))
}

/// The sealed form of an ephemeral private key, appended to the COMMAND
/// bytes: Kstore version (4, big-endian) || the card's seal of a padded
/// seed whose first 32 bytes are the scalar (associated data device ||
/// generation of the COMMAND).
pub(crate) fn seal_key(
    card: &dyn EncryptionCard,
    device: DeviceId,
    generation: u8,
    key: &EphemeralKey,
) -> Result<Vec<u8>> {
    let d = key.secret_bytes();
    let padded = KeySeed::generate(EPHEMERAL_MARK, |buf| {
        buf.fill(0);
        buf[..32].copy_from_slice(&d[..]);
    });
    let sealed = card.seal_seed(device, generation, &padded)?;
    let mut out = Vec::with_capacity(4 + sealed.ciphertext.len());
    out.extend_from_slice(&sealed.kstore_version.to_be_bytes());
    out.extend_from_slice(&sealed.ciphertext);
    Ok(out)
}

/// The Kstore version that sealed the row's ephemeral key, if it holds one.
pub(crate) fn sealed_version(row: &CommandRow) -> Option<u32> {
    let n = wire(row).len();
    let v = row.bytes.0.get(n..n + 4)?;
    Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
}

/// Opens the sealed ephemeral key of a pending UPDATE_SEED_FS row. A row
/// without one (answered, destroyed, or tampered with) is refused.
pub(crate) fn unseal_key(card: &dyn EncryptionCard, row: &CommandRow) -> Result<EphemeralKey> {
    let n = wire(row).len();
    let rest = &row.bytes.0[n..];
    if rest.len() < 4 {
        return Err(Error::Verification);
    }
    let version = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let padded = card
        .unseal_seed(row.device, row.generation, version, &rest[4..])
        .map_err(|_| {
            Error::Integrity(format!(
                "{}: sealed ephemeral key does not open",
                row.device
            ))
        })?;
    if padded.base_year() != EPHEMERAL_MARK || padded.expose()[32..SEED_LEN].iter().any(|&b| b != 0)
    {
        return Err(Error::Integrity(format!(
            "{}: sealed ephemeral key is not one",
            row.device
        )));
    }
    let mut d = Zeroizing::new([0u8; 32]);
    d.copy_from_slice(&padded.expose()[..32]);
    EphemeralKey::from_candidate(&d).ok_or_else(|| {
        Error::Integrity(format!("{}: sealed ephemeral key out of range", row.device))
    })
}

/// The center's public key in a pending UPDATE_SEED_FS row's COMMAND.
pub(crate) fn center_public(row: &CommandRow) -> Result<[u8; FS_PUBLIC_LEN]> {
    let cmd = microcert_core::Command::decode(wire(row)).map_err(|_| Error::Verification)?;
    cmd.ephemeral.copied().ok_or(Error::Verification)
}

/// Kfs of a forward-secret ENROLL answering the pending row: the card
/// opens the center's ephemeral key, ECDH with the node's, SP 800-56C.
pub(crate) fn transport_key(
    card: &dyn EncryptionCard,
    row: &CommandRow,
    msg: &EnrollFs<'_>,
) -> Result<microcert_core::Key128> {
    let qc = center_public(row)?;
    let key = unseal_key(card, row)?;
    if key.public() != &qc {
        return Err(Error::Integrity(format!(
            "{}: sealed ephemeral key does not match its COMMAND",
            row.device
        )));
    }
    let binding = microcert_core::fs::FsBinding {
        device: msg.header.device,
        new_generation: msg.header.generation,
        command_r: row.r,
        enroll_r: msg.header.r,
        center_public: &qc,
        node_public: msg.ephemeral,
    };
    // An invalid node public key is a refusal like a bad MAC.
    key.transport_key(msg.ephemeral, &binding)
        .map_err(|_| Error::Verification)
}
