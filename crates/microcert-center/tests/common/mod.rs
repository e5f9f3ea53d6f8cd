//! The center's test helpers: the shared test kit's test nodes, fleet
//! builder and PostgreSQL backend (re-exported under the names the tests
//! use), and a few center-specific helpers.
#![allow(dead_code)]

mod backend;
#[allow(unused_imports)] // not every test binary runs on both backends
pub use backend::*;
#[allow(unused_imports)] // not every test binary uses every node helper
pub use microcert_testkit::nodes::{NOW, RP, Reply, fleet_id, test_seed};

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::Arc;

use microcert_center::{Center, CenterConfig, EncryptionCard, SoftwareCard};
use microcert_core::{DeviceId, Key128, Suite};
use microcert_testkit::nodes as kit;

// The imports this module had before the kit, kept so that helpers
// appended to it compile unchanged.
#[allow(unused_imports)]
use microcert_core::{
    Audience, Command, DataDigest, EnrollKey, HEADER_LEN, Header, KeySeed, Opcode, Receipt, Sender,
    make_auth, make_auth_response, make_enroll, make_receipt, make_signature, seal, verify_command,
    verify_receipt,
};
#[allow(unused_imports)]
use sha2::{Digest, Sha256};
#[allow(unused_imports)]
use std::io::Write;

/// The kit's test node ([`kit::TestNode`]), wrapped so that a test file
/// may add methods of its own (`impl TestNode { ... }`).
#[derive(Debug)]
pub struct TestNode(pub kit::TestNode);

impl TestNode {
    pub fn new(id: DeviceId, class: u8, suite: Suite, ktr: Key128) -> Self {
        TestNode(kit::TestNode::new(id, class, suite, ktr))
    }
}

impl Deref for TestNode {
    type Target = kit::TestNode;
    fn deref(&self) -> &kit::TestNode {
        &self.0
    }
}

impl DerefMut for TestNode {
    fn deref_mut(&mut self) -> &mut kit::TestNode {
        &mut self.0
    }
}

impl AsMut<kit::TestNode> for TestNode {
    fn as_mut(&mut self) -> &mut kit::TestNode {
        &mut self.0
    }
}

/// A fleet of n nodes personalized by `card` (see [`kit::make_fleet`]).
pub fn make_fleet(card: &dyn EncryptionCard, n: u64) -> Vec<TestNode> {
    kit::make_fleet(card, n).into_iter().map(TestNode).collect()
}

/// One batch-file line.
pub fn batch_line(node: &mut TestNode, t: u64) -> String {
    kit::batch_line(node, t)
}

/// Writes the batch file of a fleet.
pub fn write_batch(path: &Path, fleet: &mut [TestNode], t: u64) {
    kit::write_batch(path, fleet, t)
}

pub fn new_center(path: &Path, card: Arc<SoftwareCard>) -> Center {
    Center::open_sqlite(path, card, CenterConfig::default()).unwrap()
}

/// A center over the database at `location` (an SQLite path or a
/// PostgreSQL URL, see [`Backend::location`]).
pub fn open_center(location: &str, card: Arc<SoftwareCard>) -> Center {
    Center::open_url(location, card, CenterConfig::default()).unwrap()
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
