//! The center's side of the exchanges, done with the core's functions
//! directly, and a deterministic entropy source.
#![allow(dead_code)]

use microcert_core::{
    Command, DeviceId, Enroll, EnrollKey, Header, Key128, KeySeed, Opcode, Receipt, Sender, Suite,
    make_command, make_receipt, open_enroll, transport_key,
};
use microcert_node::{Entropy, EntropyFailure, Personalization, SecureChip, SoftChip};

pub const DEVICE: DeviceId = DeviceId([0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]);
/// 2026-09-21T14:13:20Z.
pub const ISSUED: u32 = 1_790_000_000;
/// 2031-01-01T00:00:00Z: 22,280 days after 1970-01-01 (61 years, 15 of
/// them leap years), the first second after a 2026 seed's five years.
pub const YEAR_2031: u32 = 1_924_992_000;

pub fn ktrans() -> Key128 {
    Key128::from_bytes([0x4b; 16])
}

pub fn ktr(epoch: u8) -> Key128 {
    transport_key(&ktrans(), DEVICE, epoch)
}

/// A fixed byte sequence (xorshift64), so every run draws the same bytes.
#[derive(Debug)]
pub struct Det(pub u64);

impl Entropy for Det {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyFailure> {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
        Ok(())
    }
}

/// An entropy source that always fails.
#[derive(Debug)]
pub struct Broken;

impl Entropy for Broken {
    fn fill(&mut self, _: &mut [u8]) -> Result<(), EntropyFailure> {
        Err(EntropyFailure)
    }
}

pub fn line(epoch: u8, suite: Suite) -> Personalization {
    Personalization {
        device: DEVICE,
        epoch,
        suite,
        transport_key: ktr(epoch),
        class: 1,
        issued: ISSUED,
    }
}

pub fn personalized(suite: Suite) -> SoftChip<Det> {
    let mut chip = SoftChip::new(Det(0x9e37_79b9_7f4a_7c15));
    chip.personalize(&line(0, suite)).unwrap();
    chip
}

/// The center's RECEIPT answering the message whose r is `reference`.
pub fn receipt(seed: &KeySeed, generation: u8, t: u32, reference: u64, status: u8) -> Vec<u8> {
    receipt_as(
        seed,
        Suite::CMAC64,
        generation,
        t,
        reference,
        status,
        Sender::Center,
    )
}

pub fn receipt_as(
    seed: &KeySeed,
    suite: Suite,
    generation: u8,
    t: u32,
    reference: u64,
    status: u8,
    sender: Sender,
) -> Vec<u8> {
    let header = Header {
        suite,
        device: DEVICE,
        generation,
        t,
        r: 0xc0c0_0000_0000_0000 | u64::from(t),
    };
    let mut out = vec![0u8; 64];
    let n = make_receipt(seed, &header, sender, reference, status, &mut out).unwrap();
    out.truncate(n);
    out
}

/// The center's COMMAND, keyed by `seed` of `generation`.
pub fn command(seed: &KeySeed, generation: u8, t: u32, counter: u32, opcode: Opcode) -> Vec<u8> {
    command_in(seed, Suite::CMAC64, DEVICE, generation, t, counter, opcode)
}

pub fn command_in(
    seed: &KeySeed,
    suite: Suite,
    device: DeviceId,
    generation: u8,
    t: u32,
    counter: u32,
    opcode: Opcode,
) -> Vec<u8> {
    let header = Header {
        suite,
        device,
        generation,
        t,
        r: 0xcccc_0000_0000_0000 | u64::from(counter),
    };
    let mut out = vec![0u8; 64];
    let n = make_command(seed, &header, counter, opcode, &mut out).unwrap();
    out.truncate(n);
    assert!(Command::decode(&out).is_ok());
    out
}

/// Opens an ENROLL with `key`, as the center does.
pub fn open(bytes: &[u8], key: EnrollKey<'_>) -> (Header, KeySeed) {
    let msg = Enroll::decode(bytes).unwrap();
    let seed = open_enroll(key, &msg).unwrap();
    (msg.header, seed)
}

/// A chip enrolled at generation 0 (ENROLL answered), and its seed as the
/// center holds it.
pub fn enrolled(suite: Suite) -> (SoftChip<Det>, KeySeed) {
    let mut chip = personalized(suite);
    let mut buf = [0u8; 1100];
    let n = chip.enroll(0, &mut buf).unwrap();
    let (h, seed) = open(&buf[..n], EnrollKey::Transport(&ktr(0)));
    let rc = receipt_as(&seed, suite, 0, h.t + 5, h.r, 0, Sender::Center);
    chip.accept_receipt(&rc).unwrap();
    (chip, seed)
}

pub fn receipt_header(bytes: &[u8]) -> (Header, u64, u8) {
    let rc = Receipt::decode(bytes).unwrap();
    (rc.header, rc.reference, rc.status)
}
