//! Test nodes: [`TestNode`], made from the protocol core's functions
//! with deterministic seeds (a test can compute every key it holds), a
//! fleet of them personalized by a center's card, and [`Chip`], the node
//! crate's software chip drawing from the OS random generator (the chip
//! `microcert simulate` keeps as an image).

use std::io::Write;
use std::path::Path;

use microcert_center::EncryptionCard;
use microcert_core::fs::{EphemeralKey, FsBinding};
use microcert_core::make_enroll_fs;
use microcert_core::{
    Audience, Command, DataDigest, DeviceId, EnrollKey, HEADER_LEN, Header, Key128, KeySeed,
    Opcode, Receipt, Sender, Suite, make_auth, make_auth_response, make_enroll, make_receipt,
    make_signature, seal, verify_command, verify_receipt,
};
use microcert_node::{EntropyFailure, SecureChip, SoftChip};
use sha2::{Digest, Sha256};

/// 2026-06-01T00:00:00Z: the tests' clock.
pub const NOW: u64 = 1_780_272_000;
/// The relying party of the tests.
pub const RP: &str = "billing.example";

/// A deterministic seed for a device and generation (test data only).
pub fn test_seed(id: DeviceId, generation: u8, base_year: u16) -> KeySeed {
    KeySeed::generate(base_year, |buf| {
        for (i, chunk) in buf.chunks_mut(32).enumerate() {
            let d = Sha256::new()
                .chain_update(b"test seed")
                .chain_update(id.0)
                .chain_update([generation])
                .chain_update((i as u32).to_be_bytes())
                .finalize();
            chunk.copy_from_slice(&d[..chunk.len()]);
        }
    })
}

/// A forward-secret update as a wiretapper recorded it, and the key only
/// the two ends can derive.
#[derive(Debug)]
pub struct FsRecord {
    /// The UPDATE_SEED_FS COMMAND's bytes.
    pub command: Vec<u8>,
    /// The ENROLL's bytes.
    pub enroll: Vec<u8>,
    /// Kfs (the node's and the center's; never on the wire).
    pub kfs: Key128,
}

/// What a node did with a COMMAND.
#[derive(Debug)]
pub enum Reply {
    /// An ENROLL of the next generation (answer to UPDATE_SEED).
    Enroll(Vec<u8>),
    /// A RECEIPT (answer to REVOKE); the node has wiped its seed.
    Receipt(Vec<u8>),
}

/// A software node built from core functions.
#[derive(Debug)]
pub struct TestNode {
    pub id: DeviceId,
    pub suite: Suite,
    pub class: u8,
    pub epoch: u8,
    pub ktr: Key128,
    pub seed: Option<KeySeed>,
    pub generation: u8,
    /// A seed update in flight: the new seed, and the ENROLL's r.
    pub next: Option<(KeySeed, u64)>,
    /// The last forward-secret update (v1.2) this node answered: the
    /// COMMAND's and the ENROLL's bytes as recorded on the wire, and Kfs.
    pub last_fs: Option<FsRecord>,
    pub counter_seen: u32,
    r_next: u64,
}

impl TestNode {
    pub fn new(id: DeviceId, class: u8, suite: Suite, ktr: Key128) -> Self {
        TestNode {
            id,
            suite,
            class,
            epoch: 0,
            ktr,
            seed: Some(test_seed(id, 0, 2026)),
            generation: 0,
            next: None,
            last_fs: None,
            counter_seen: 0,
            r_next: id.to_u64().rotate_left(17) ^ 0x5eed,
        }
    }

    pub fn fresh_r(&mut self) -> u64 {
        self.r_next = self.r_next.wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.r_next
    }

    pub fn header(&mut self, t: u64) -> Header {
        Header {
            suite: self.suite,
            device: self.id,
            generation: self.generation,
            t: t as u32,
            r: self.fresh_r(),
        }
    }

    fn seed(&self) -> &KeySeed {
        self.seed.as_ref().expect("node holds a seed")
    }

    /// The first ENROLL, under Ktr.
    pub fn enroll_transport(&mut self, t: u64) -> Vec<u8> {
        let h = self.header(t);
        let mut out = vec![0u8; 1100];
        let n = make_enroll(EnrollKey::Transport(&self.ktr), self.seed(), &h, &mut out).unwrap();
        out.truncate(n);
        out
    }

    pub fn auth(&mut self, aud: &Audience, t: u64) -> (Vec<u8>, u64) {
        let h = self.header(t);
        let mut out = vec![0u8; 64];
        let n = make_auth(self.seed(), &h, aud, &mut out).unwrap();
        out.truncate(n);
        (out, h.r)
    }

    pub fn auth_response(&mut self, challenge: &[u8; 16], t: u64) -> (Vec<u8>, u64) {
        let h = self.header(t);
        let mut out = vec![0u8; 64];
        let n =
            make_auth_response(self.seed(), &h, challenge, &Audience::CENTER, &mut out).unwrap();
        out.truncate(n);
        (out, h.r)
    }

    pub fn sign(&mut self, data: &[u8], t: u64) -> Vec<u8> {
        let h = self.header(t);
        let mut out = vec![0u8; 64];
        let n = make_signature(self.seed(), &h, &DataDigest::of(data), &mut out).unwrap();
        out.truncate(n);
        out
    }

    pub fn seal(&mut self, aud: &Audience, plaintext: &[u8], t: u64) -> Vec<u8> {
        let h = self.header(t);
        let mut out = vec![0u8; HEADER_LEN + plaintext.len() + 16];
        let n = seal(self.seed(), &h, aud, plaintext, &mut out).unwrap();
        out.truncate(n);
        out
    }

    /// Checks the center's RECEIPT for the message whose r was `r`.
    pub fn check_receipt(&self, receipt: &[u8], r: u64) -> bool {
        let Ok(msg) = Receipt::decode(receipt) else {
            return false;
        };
        msg.reference == r
            && msg.status == 0
            && msg.header.generation == self.generation
            && verify_receipt(self.seed(), &msg, Sender::Center).is_ok()
    }

    /// Handles a COMMAND as a node would.
    pub fn handle_command(&mut self, bytes: &[u8], t: u64) -> Reply {
        let cmd = Command::decode(bytes).unwrap();
        verify_command(self.seed(), &cmd).expect("COMMAND verifies");
        assert!(cmd.counter > self.counter_seen, "counter must rise");
        self.counter_seen = cmd.counter;
        if let Some(qc) = cmd.ephemeral {
            // v1.2: an ephemeral key pair (deterministic: test data only),
            // Kfs from the ECDH, the EnrollFs under Kfs and Kupd.
            let g = self.generation + 1;
            let new = test_seed(self.id, g, 2026);
            let h = Header {
                suite: self.suite,
                device: self.id,
                generation: g,
                t: t as u32,
                r: self.fresh_r(),
            };
            let mut n = 0u32;
            let key = EphemeralKey::generate(|buf| {
                n += 1;
                let d = Sha256::new()
                    .chain_update(b"test ephemeral")
                    .chain_update(self.id.0)
                    .chain_update([g])
                    .chain_update(n.to_be_bytes())
                    .finalize();
                buf.copy_from_slice(&d);
                Ok(())
            })
            .unwrap();
            let binding = FsBinding {
                device: self.id,
                new_generation: g,
                command_r: cmd.header.r,
                enroll_r: h.r,
                center_public: qc,
                node_public: key.public(),
            };
            let kfs = key
                .transport_key(qc, &binding)
                .expect("the center's key is valid");
            let mut out = vec![0u8; 1100];
            let n = make_enroll_fs(self.seed(), &kfs, key.public(), &new, &h, &mut out).unwrap();
            out.truncate(n);
            self.last_fs = Some(FsRecord {
                command: bytes.to_vec(),
                enroll: out.clone(),
                kfs,
            });
            self.next = Some((new, h.r));
            Reply::Enroll(out)
        } else if cmd.opcode == Opcode::UPDATE_SEED {
            let g = self.generation + 1;
            let new = test_seed(self.id, g, 2026);
            let h = Header {
                suite: self.suite,
                device: self.id,
                generation: g,
                t: t as u32,
                r: self.fresh_r(),
            };
            let mut out = vec![0u8; 1100];
            let n = make_enroll(EnrollKey::Update(self.seed()), &new, &h, &mut out).unwrap();
            out.truncate(n);
            self.next = Some((new, h.r));
            Reply::Enroll(out)
        } else {
            let h = self.header(t);
            let mut out = vec![0u8; 64];
            let n = make_receipt(self.seed(), &h, Sender::Node, cmd.header.r, 0, &mut out).unwrap();
            out.truncate(n);
            self.seed = None;
            Reply::Receipt(out)
        }
    }

    /// Checks the RECEIPT for its update ENROLL and switches to the new seed.
    pub fn finish_update(&mut self, receipt: &[u8]) -> bool {
        let (new, r) = self.next.take().expect("an update in flight");
        let msg = Receipt::decode(receipt).unwrap();
        let ok = msg.reference == r
            && msg.header.generation == self.generation + 1
            && verify_receipt(&new, &msg, Sender::Center).is_ok();
        if ok {
            self.seed = Some(new);
            self.generation += 1;
        } else {
            self.next = Some((new, r));
        }
        ok
    }
}

impl AsMut<TestNode> for TestNode {
    fn as_mut(&mut self) -> &mut TestNode {
        self
    }
}

/// Device id of fleet member i.
pub fn fleet_id(i: u64) -> DeviceId {
    DeviceId::from_u64(0x0200_0000_0000_0000 + i)
}

/// A fleet of n nodes personalized by `card` (every tenth one Class 3 with
/// 16-byte tags, the rest Class 1).
pub fn make_fleet(card: &dyn EncryptionCard, n: u64) -> Vec<TestNode> {
    (0..n)
        .map(|i| {
            let id = fleet_id(i);
            let (class, suite) = if i % 10 == 9 {
                (3, Suite::CMAC128)
            } else {
                (1, Suite::CMAC64)
            };
            TestNode::new(id, class, suite, card.transport_key(id, 0).unwrap())
        })
        .collect()
}

/// One batch-file line.
pub fn batch_line(node: &mut TestNode, t: u64) -> String {
    let enroll = node.enroll_transport(t);
    format!(
        "{{\"device_id\":\"{}\",\"class\":{},\"epoch\":{},\"enroll\":\"{}\"}}\n",
        hex::encode(node.id.0),
        node.class,
        node.epoch,
        hex::encode(enroll)
    )
}

/// Writes the batch file of a fleet.
pub fn write_batch<N: AsMut<TestNode>>(path: &Path, fleet: &mut [N], t: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    for node in fleet.iter_mut() {
        f.write_all(batch_line(node.as_mut(), t).as_bytes())
            .unwrap();
    }
    f.sync_all().unwrap();
}

/// A software chip drawing from the OS random generator.
pub type Chip = SoftChip<fn(&mut [u8]) -> Result<(), EntropyFailure>>;

/// The OS random generator as a chip's entropy.
pub fn os_entropy(buf: &mut [u8]) -> Result<(), EntropyFailure> {
    getrandom::fill(buf).map_err(|_| EntropyFailure)
}

/// A chip restored from an image `microcert simulate` wrote.
pub fn chip_from_image(image: &[u8]) -> Chip {
    let f: fn(&mut [u8]) -> Result<(), EntropyFailure> = os_entropy;
    SoftChip::from_image(image, f).unwrap()
}

/// The wall clock in seconds (a chip's time).
pub fn now32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as u32
}

/// A fresh AUTH from a chip, now, for the center's audience.
pub fn chip_auth(chip: &mut Chip) -> Vec<u8> {
    let mut out = [0u8; 64];
    let n = chip.auth(now32(), &Audience::CENTER, &mut out).unwrap();
    out[..n].to_vec()
}
