//! What a chip must store: the [`NodeRecord`] (keys, counters, the message
//! waiting for an answer) and the [`ChipStorage`] trait through which the
//! generic [`crate::Node`] reaches it. A hardware secure element implements
//! only [`ChipStorage`]; all protocol logic stays in the node.

use microcert_core::{
    Audience, CHALLENGE_LEN, DeviceId, HEADER_LEN, Header, Key128, KeySeed, SEED_LEN, Suite,
};

use crate::chip::{Entropy, EntropyFailure, Life};
use crate::seedgen::SeedInput;

/// How many relying parties a chip can be configured for.
pub const MAX_AUDIENCES: usize = 4;
/// Longest SEALED plaintext a class 1 device sends (PROTOCOL.md section 5).
pub const CLASS1_MAX_SEALED: usize = 1024;
/// Longest message kept for retransmission: an AUTH_RESPONSE with 16-byte tags.
pub(crate) const AWAIT_MAX: usize = HEADER_LEN + CHALLENGE_LEN + 16;

/// What a forward-secret update ENROLL (v1.2) needs beyond a plain one to
/// be rebuilt byte for byte: the node's ephemeral public key and Kfs. The
/// ephemeral private key itself is wiped as soon as Kfs is derived; Kfs
/// goes with the pending ENROLL when its RECEIPT commits the new seed.
#[cfg(feature = "forward-secret")]
pub(crate) struct FsPending {
    pub(crate) public: [u8; microcert_core::FS_PUBLIC_LEN],
    pub(crate) kfs: Key128,
}

/// An ENROLL sent and not yet answered by the center's RECEIPT. Everything
/// needed to rebuild its identical bytes: t, r, generation, base year, the
/// key it is under and the generator input of its seed.
pub(crate) struct Pending {
    pub(crate) generation: u8,
    pub(crate) t: u32,
    pub(crate) r: u64,
    pub(crate) base_year: u16,
    /// Under Kupd of the current seed (an update) rather than Ktr.
    pub(crate) under_update: bool,
    pub(crate) input: SeedInput,
    /// A forward-secret update: the ENROLL is an EnrollFs.
    #[cfg(feature = "forward-secret")]
    pub(crate) fs: Option<FsPending>,
}

/// The bytes of the last AUTH or AUTH_RESPONSE to the center, waiting for
/// its RECEIPT. Not secret.
#[derive(Clone, Copy)]
pub(crate) struct Awaiting {
    pub(crate) len: u8,
    pub(crate) bytes: [u8; AWAIT_MAX],
}

impl Awaiting {
    pub(crate) fn message(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or(&[])
    }

    pub(crate) fn header(&self) -> Option<Header> {
        Header::parse(self.message()).ok().map(|(_, h)| h)
    }
}

/// Everything a chip keeps across power loss: identifiers, Ktr, the seed in
/// use, the command and message counters, the node time, the ENROLL and the
/// AUTH waiting for the center's answer, the relying parties.
///
/// Its fields are private: only the protocol logic of [`crate::Node`]
/// changes them, and [`NodeRecord::to_image`] / [`NodeRecord::from_image`]
/// turn the record into a fixed-size, versioned, checksummed byte image
/// and back. Its keys zeroize on drop; `Debug` prints no key material.
pub struct NodeRecord {
    pub(crate) life: Life,
    pub(crate) device: DeviceId,
    pub(crate) epoch: u8,
    pub(crate) suite: Suite,
    pub(crate) class: u8,
    pub(crate) node_time: u32,
    pub(crate) highest_counter: u32,
    /// High half of every r; bumped before each message goes out.
    pub(crate) r_counter: u32,
    pub(crate) ktr: Key128,
    /// The seed in use; all zero while `has_seed` is false.
    pub(crate) seed: KeySeed,
    pub(crate) has_seed: bool,
    /// Generation of the seed held, or of the last one enrolled.
    pub(crate) generation: u8,
    /// Whether `generation` means anything (an ENROLL was ever accepted).
    pub(crate) enrolled_before: bool,
    pub(crate) pending: Option<Pending>,
    pub(crate) awaiting: Option<Awaiting>,
    pub(crate) audiences: [Audience; MAX_AUDIENCES],
    pub(crate) audience_count: u8,
}

impl NodeRecord {
    /// The record of a blank (never personalized) chip.
    pub fn blank() -> Self {
        NodeRecord {
            life: Life::Blank,
            device: DeviceId::default(),
            epoch: 0,
            suite: Suite::CMAC64,
            class: 0,
            node_time: 0,
            highest_counter: 0,
            r_counter: 0,
            ktr: Key128::from_bytes([0; 16]),
            seed: KeySeed::from_bytes(&[0; SEED_LEN], 0),
            has_seed: false,
            generation: 0,
            enrolled_before: false,
            pending: None,
            awaiting: None,
            audiences: [Audience::CENTER; MAX_AUDIENCES],
            audience_count: 0,
        }
    }

    /// Drops every key; the old values zeroize as they are dropped.
    pub(crate) fn wipe_keys(&mut self) {
        self.ktr = Key128::from_bytes([0; 16]);
        self.seed = KeySeed::from_bytes(&[0; SEED_LEN], 0);
        self.has_seed = false;
        self.pending = None;
        self.awaiting = None;
    }

    pub(crate) fn configured(&self) -> &[Audience] {
        self.audiences
            .get(..usize::from(self.audience_count))
            .unwrap_or(&[])
    }
}

/// What a secure element must provide so that [`crate::Node`] runs the
/// protocol on it: storage for the [`NodeRecord`] (keys, counters, the
/// persistent image), an entropy source, and a hook told each time the
/// record changed.
///
/// Nothing in it makes or checks a message: a hardware secure element that
/// implements this trait gets AUTH, SIGNATURE, SEALED, ENROLL, COMMAND and
/// RECEIPT handling, the time-forward rule and the pending-seed rules from
/// the node, unchanged. [`SoftStorage`] is the implementation in RAM.
///
/// Persistence contract: after [`ChipStorage::mark_changed`], the record
/// must reach non-volatile memory before any message the node wrote since
/// leaves the device (an implementation may write through at once, or let
/// the application save [`NodeRecord::to_image`] before it transmits, as
/// [`SoftStorage`] does).
pub trait ChipStorage {
    /// The entropy source of the element (its TRNG). The node never uses
    /// its bytes directly: they instantiate and reseed the node's SP 800-90A
    /// HMAC_DRBG (`microcert_core::drbg`), whose output is every random byte
    /// the node uses.
    type Rng: Entropy;

    /// The stored record.
    fn record(&self) -> &NodeRecord;

    /// The stored record and the entropy source together (the node's DRBG
    /// writes a seed's generator input straight into the record).
    fn parts(&mut self) -> (&mut NodeRecord, &mut Self::Rng);

    /// The record changed: it must be persisted before the next transmission.
    fn mark_changed(&mut self);
}

/// The chip's storage in RAM: the record, an entropy source and a dirty
/// flag; the caller saves [`NodeRecord::to_image`] while the flag is set.
pub struct SoftStorage<E> {
    pub(crate) record: NodeRecord,
    pub(crate) entropy: E,
    pub(crate) dirty: bool,
}

impl<E> SoftStorage<E> {
    /// Storage holding `record`, drawing randomness from `entropy`; `dirty`
    /// says whether the record still has to be saved.
    pub fn new(record: NodeRecord, entropy: E, dirty: bool) -> Self {
        SoftStorage {
            record,
            entropy,
            dirty,
        }
    }

    /// True when the record changed since [`SoftStorage::mark_persisted`].
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Records that the caller stored the current image.
    pub fn mark_persisted(&mut self) {
        self.dirty = false;
    }
}

impl<E: Entropy> ChipStorage for SoftStorage<E> {
    type Rng = E;

    fn record(&self) -> &NodeRecord {
        &self.record
    }

    fn parts(&mut self) -> (&mut NodeRecord, &mut E) {
        (&mut self.record, &mut self.entropy)
    }

    fn mark_changed(&mut self) {
        self.dirty = true;
    }
}

/// An entropy source that always fails: for a node that only checks
/// messages (loading an image to read its status, say).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEntropy;

impl Entropy for NoEntropy {
    fn fill(&mut self, _: &mut [u8]) -> core::result::Result<(), EntropyFailure> {
        Err(EntropyFailure)
    }
}

impl core::fmt::Debug for NodeRecord {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        crate::node::debug_record("NodeRecord", self, f).finish()
    }
}
