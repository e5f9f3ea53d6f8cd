//! A secure element implements only `ChipStorage`; the generic `Node`
//! brings the whole protocol. Here a stand-in for a hardware element (its
//! record in "protected memory", its own TRNG, and a flash it writes the
//! image to at the end of every call that changed the record) runs the
//! full life next to a `SoftChip` drawing the same random bytes: every
//! message is byte-identical, and the center's side accepts them.

mod common;

use common::{DEVICE, Det, ISSUED, ktr, line, open, receipt};
use microcert_core::{Audience, Auth, EnrollKey, Opcode, Suite, verify_auth};
use microcert_node::{ChipStorage, IMAGE_LEN, Node, NodeRecord, SecureChip, SoftChip, Status};

/// The element: record, TRNG, and the count of changes since the last
/// write of its flash.
struct Element {
    record: NodeRecord,
    trng: Det,
    changes: u32,
    flash: [u8; IMAGE_LEN],
    flash_writes: u32,
}

impl Element {
    fn new(trng: Det) -> Self {
        let record = NodeRecord::blank();
        let mut flash = [0u8; IMAGE_LEN];
        record.to_image(&mut flash);
        Element {
            record,
            trng,
            changes: 0,
            flash,
            flash_writes: 0,
        }
    }

    /// What the element's firmware does when a call returns: write the
    /// record to flash if it changed.
    fn commit(&mut self) {
        if self.changes > 0 {
            self.record.to_image(&mut self.flash);
            self.flash_writes += 1;
            self.changes = 0;
        }
    }
}

impl ChipStorage for Element {
    type Rng = Det;

    fn record(&self) -> &NodeRecord {
        &self.record
    }

    fn parts(&mut self) -> (&mut NodeRecord, &mut Det) {
        (&mut self.record, &mut self.trng)
    }

    fn mark_changed(&mut self) {
        self.changes += 1;
    }
}

const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

fn both<T: PartialEq + std::fmt::Debug>(
    soft: &mut SoftChip<Det>,
    hw: &mut Node<Element>,
    f: impl Fn(&mut dyn SecureChip) -> T,
) -> T {
    let a = f(soft);
    let b = f(hw);
    hw.storage_mut().commit();
    assert_eq!(a, b, "the element and the soft chip differ");
    a
}

#[test]
fn an_element_with_only_storage_runs_the_whole_protocol() {
    let mut soft = SoftChip::new(Det(SEED));
    let mut hw = Node::from_storage(Element::new(Det(SEED)));
    let p = line(0, Suite::CMAC64);
    both(&mut soft, &mut hw, |c| c.personalize(&p)).unwrap();
    assert_eq!(hw.storage().flash_writes, 1);

    // ENROLL, identical bytes; the center opens it under Ktr.
    let enroll = both(&mut soft, &mut hw, |c| {
        let mut out = [0u8; 1100];
        c.enroll(ISSUED, &mut out).map(|n| out[..n].to_vec())
    })
    .unwrap();
    let (h, seed) = open(&enroll, EnrollKey::Transport(&ktr(0)));
    let rc = receipt(&seed, 0, ISSUED + 5, h.r, 0);
    both(&mut soft, &mut hw, |c| c.accept_receipt(&rc)).unwrap();

    // AUTH: identical, and it verifies under the enrolled seed.
    let auth = both(&mut soft, &mut hw, |c| {
        let mut out = [0u8; 64];
        c.auth(ISSUED + 10, &Audience::CENTER, &mut out)
            .map(|n| out[..n].to_vec())
    })
    .unwrap();
    verify_auth(&seed, &Auth::decode(&auth).unwrap(), &Audience::CENTER).unwrap();

    // COMMAND UPDATE_SEED: the reply opens under Kupd; a replay is refused.
    let cmd = common::command(&seed, 0, ISSUED + 20, 1, Opcode::UPDATE_SEED);
    let update = both(&mut soft, &mut hw, |c| {
        let mut out = [0u8; 1100];
        c.handle_command(ISSUED + 20, &cmd, &mut out)
            .map(|n| out[..n].to_vec())
    })
    .unwrap();
    let (uh, _) = open(&update, EnrollKey::Update(&seed));
    assert_eq!(uh.generation, 1);
    assert_eq!(
        both(&mut soft, &mut hw, |c| {
            let mut out = [0u8; 1100];
            c.handle_command(ISSUED + 21, &cmd, &mut out)
        }),
        Err(microcert_node::Error::Replay)
    );

    let status: Status = both(&mut soft, &mut hw, |c| c.status());
    assert_eq!(status.device, DEVICE);
    assert_eq!(status.highest_counter, 1);
    assert_eq!(status.pending_generation, Some(1));

    // The element's flash holds what the soft chip's image holds, and it
    // restores a node that retransmits the pending update byte for byte.
    let mut soft_image = [0u8; IMAGE_LEN];
    soft.to_image(&mut soft_image);
    assert_eq!(hw.storage().flash, soft_image);
    let restored = NodeRecord::from_image(&hw.storage().flash).unwrap();
    let mut element = Element::new(Det(1));
    element.record = restored;
    let again = Node::from_storage(element);
    let mut out = [0u8; 1100];
    let n = again.retransmit(&mut out).unwrap();
    assert_eq!(out[..n], update[..]);
}

#[test]
fn a_refused_command_asks_the_element_to_store_nothing() {
    let mut hw = Node::from_storage(Element::new(Det(SEED)));
    hw.personalize(&line(0, Suite::CMAC64)).unwrap();
    let mut out = [0u8; 1100];
    let n = hw.enroll(ISSUED, &mut out).unwrap();
    let (h, seed) = open(&out[..n], EnrollKey::Transport(&ktr(0)));
    hw.accept_receipt(&receipt(&seed, 0, ISSUED + 5, h.r, 0))
        .unwrap();
    hw.storage_mut().commit();
    let writes = hw.storage().flash_writes;
    let mut forged = common::command(&seed, 0, ISSUED + 20, 1, Opcode::REVOKE);
    *forged.last_mut().unwrap() ^= 1;
    assert_eq!(
        hw.handle_command(ISSUED + 20, &forged, &mut out),
        Err(microcert_node::Error::Verification)
    );
    assert_eq!(
        hw.storage().changes,
        0,
        "a forged COMMAND changed the record"
    );
    hw.storage_mut().commit();
    assert_eq!(hw.storage().flash_writes, writes);
}
