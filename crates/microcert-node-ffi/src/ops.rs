//! The C API's work, in safe Rust over slices: load the node from its
//! image, call it, write the image back when it changed.

#![forbid(unsafe_code)]

use microcert_core::{Audience, DeviceId, Key128, Suite};
use microcert_node::{
    Answered, Entropy, Error, IMAGE_LEN, NodeRecord, Personalization, SecureChip, SoftChip,
};

/// The fields of a factory personalization line, as the C side gives them.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// EUI-64.
    pub device: [u8; 8],
    /// Personalization epoch.
    pub epoch: u8,
    /// Suite id (1 = CMAC64, 2 = CMAC128).
    pub suite: u8,
    /// Ktr(device, epoch).
    pub transport_key: &'a [u8; 16],
    /// Device class.
    pub class: u8,
    /// Provisioning time, Unix seconds.
    pub issued: u32,
}

/// Writes the image of a blank node into `image`.
pub fn blank(image: &mut [u8; IMAGE_LEN]) {
    NodeRecord::blank().to_image(image);
}

/// Loads the node, runs `f`, and writes the image back if the node changed
/// (also when `f` failed: a REVOKE wipes the keys even when its reply
/// could not be written, and the node time moves forward with an
/// authentic RECEIPT that reports a refusal).
fn with_node<E: Entropy, T>(
    image: &mut [u8; IMAGE_LEN],
    rng: E,
    f: impl FnOnce(&mut SoftChip<E>) -> Result<T, Error>,
) -> Result<T, Error> {
    let mut node = SoftChip::from_image(image.as_slice(), rng)?;
    let result = f(&mut node);
    if node.is_dirty() {
        node.to_image(image);
    }
    result
}

/// Personalizes the node held in `image` (a blank one, or a revoked one
/// with the next epoch).
pub fn personalize<E: Entropy>(
    image: &mut [u8; IMAGE_LEN],
    rng: E,
    line: &Line<'_>,
) -> Result<(), Error> {
    let suite = Suite::new(line.suite).map_err(Error::Malformed)?;
    let p = Personalization {
        device: DeviceId(line.device),
        epoch: line.epoch,
        suite,
        transport_key: Key128::from_bytes(*line.transport_key),
        class: line.class,
        issued: line.issued,
    };
    with_node(image, rng, |n| n.personalize(&p))
}

/// Adds a relying party by name; returns its audience.
pub fn add_audience<E: Entropy>(
    image: &mut [u8; IMAGE_LEN],
    rng: E,
    name: &[u8],
) -> Result<[u8; 8], Error> {
    let name = core::str::from_utf8(name).map_err(|_| Error::UnknownAudience)?;
    with_node(image, rng, |n| n.add_audience(name).map(|a| a.0))
}

/// The ENROLL: the first one under Ktr, a re-enrollment after expiry, or
/// the identical bytes of the one still waiting for its RECEIPT.
pub fn enroll<E: Entropy>(
    image: &mut [u8; IMAGE_LEN],
    rng: E,
    now: u32,
    out: &mut [u8],
) -> Result<usize, Error> {
    with_node(image, rng, |n| n.enroll(now, out))
}

/// An AUTH for `audience` (`None`: the center).
pub fn auth<E: Entropy>(
    image: &mut [u8; IMAGE_LEN],
    rng: E,
    now: u32,
    audience: Option<[u8; 8]>,
    out: &mut [u8],
) -> Result<usize, Error> {
    let aud = audience.map_or(Audience::CENTER, Audience);
    with_node(image, rng, |n| n.auth(now, &aud, out))
}

/// Verifies and carries out a COMMAND; the reply (ENROLL or RECEIPT) goes
/// to `out`.
pub fn handle_command<E: Entropy>(
    image: &mut [u8; IMAGE_LEN],
    rng: E,
    now: u32,
    command: &[u8],
    out: &mut [u8],
) -> Result<usize, Error> {
    with_node(image, rng, |n| n.handle_command(now, command, out))
}

/// Checks a RECEIPT of the center; returns the generation now in use for
/// an ENROLL's RECEIPT, `None` for an AUTH's.
pub fn accept_receipt<E: Entropy>(
    image: &mut [u8; IMAGE_LEN],
    rng: E,
    receipt: &[u8],
) -> Result<Option<u8>, Error> {
    with_node(image, rng, |n| {
        n.accept_receipt(receipt).map(|a| match a {
            Answered::Enrollment { generation } => Some(generation),
            Answered::Authentication => None,
        })
    })
}

/// The identical bytes of the message still waiting for a RECEIPT.
pub fn retransmit<E: Entropy>(
    image: &mut [u8; IMAGE_LEN],
    rng: E,
    out: &mut [u8],
) -> Result<usize, Error> {
    with_node(image, rng, |n| n.retransmit(out))
}

/// The node's status.
pub fn status<E: Entropy>(image: &[u8], rng: E) -> Result<microcert_node::Status, Error> {
    SoftChip::from_image(image, rng).map(|n| n.status())
}
