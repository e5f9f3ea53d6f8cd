//! `SoftChip`: the secure chip in software, a [`Node`] over
//! [`SoftStorage`]: its record in memory and a fixed-size byte image the
//! caller stores in non-volatile memory.

use core::fmt;

use crate::Result;
use crate::chip::Entropy;
use crate::image::IMAGE_LEN;
use crate::node::{Node, debug_record};
use crate::scrub::scrub_stack;
use crate::storage::{NodeRecord, SoftStorage};

/// A secure chip in software: the generic [`Node`] over [`SoftStorage`].
///
/// Persistence contract: every call that returns `Ok` with a message may
/// have advanced the r counter or stored an unanswered message. Before
/// transmitting anything the chip wrote, the caller checks
/// [`SoftChip::is_dirty`], stores [`SoftChip::to_image`] in non-volatile
/// memory and calls [`SoftChip::mark_persisted`]. Skipping this can reuse a
/// (t, r) pair after a power loss, or lose an ENROLL whose seed the center
/// then holds.
pub type SoftChip<E> = Node<SoftStorage<E>>;

impl<E: Entropy> Node<SoftStorage<E>> {
    /// A blank chip whose DRBG is seeded from `entropy` (see
    /// `microcert_core::drbg`).
    pub fn new(entropy: E) -> Self {
        Node::from_storage(SoftStorage::new(NodeRecord::blank(), entropy, true))
    }

    /// True when the state changed since the last [`SoftChip::mark_persisted`]:
    /// save the image before transmitting.
    pub fn is_dirty(&self) -> bool {
        self.store.is_dirty()
    }

    /// Records that the caller stored the current image.
    pub fn mark_persisted(&mut self) {
        self.store.mark_persisted();
    }

    /// Writes the chip's state into `out`. Store it before transmitting any
    /// message the chip made since the last save (see [`SoftChip::is_dirty`]).
    pub fn to_image(&self, out: &mut [u8; IMAGE_LEN]) {
        self.store.record.to_image(out);
    }

    /// Loads a chip from an image made by [`SoftChip::to_image`]. Fails with
    /// [`crate::Error::ImageMagic`], [`crate::Error::ImageVersion`],
    /// [`crate::Error::ImageLength`], [`crate::Error::ImageChecksum`] or
    /// [`crate::Error::ImageInvalid`], in that order of checking.
    pub fn from_image(image: &[u8], entropy: E) -> Result<Self> {
        let chip = Self::load(image, entropy);
        // Parsing moved the seed through a few frames: wipe them.
        scrub_stack();
        chip
    }

    #[inline(never)]
    fn load(image: &[u8], entropy: E) -> Result<Self> {
        let record = NodeRecord::decode_image(image)?;
        Ok(Node::from_storage(SoftStorage::new(record, entropy, false)))
    }
}

impl<E> fmt::Debug for SoftStorage<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_record("SoftStorage", &self.record, f)
            .field("dirty", &self.dirty)
            .finish()
    }
}
