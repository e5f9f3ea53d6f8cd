//! Shared by the examples and the bench: a cheap deterministic entropy
//! source and an enrolled chip (the center's part done with core functions).

use microcert_core::{
    DeviceId, Enroll, EnrollKey, Header, Key128, Sender, Suite, make_receipt, open_enroll,
    transport_key,
};
use microcert_node::{Entropy, EntropyFailure, Personalization, SecureChip, SoftChip};

/// xorshift64: deterministic, a few instructions per byte.
#[derive(Debug)]
pub struct Xorshift(pub u64);

impl Entropy for Xorshift {
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

/// 2026-09-21T14:13:20Z.
pub const ISSUED: u32 = 1_790_000_000;

pub const DEVICE: DeviceId = DeviceId([0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]);

/// Ktr(DEVICE, 0) under a fixed test Ktrans.
pub fn ktr() -> Key128 {
    transport_key(&Key128::from_bytes([0x4b; 16]), DEVICE, 0)
}

/// A personalized chip, not enrolled yet.
pub fn personalized_chip() -> SoftChip<Xorshift> {
    let device = DEVICE;
    let ktr = ktr();
    let mut chip = SoftChip::new(Xorshift(0x9e37_79b9_7f4a_7c15));
    chip.personalize(&Personalization {
        device,
        epoch: 0,
        suite: Suite::CMAC64,
        transport_key: Key128::from_bytes(*ktr.expose()),
        class: 1,
        issued: ISSUED,
    })
    .expect("personalize");
    chip
}

/// A personalized chip whose generation-0 seed the center has answered.
pub fn enrolled_chip() -> SoftChip<Xorshift> {
    let device = DEVICE;
    let ktr = ktr();
    let mut chip = personalized_chip();
    let mut buf = [0u8; 1100];
    let n = chip.enroll(0, &mut buf).expect("enroll");
    let msg = Enroll::decode(&buf[..n]).expect("decode");
    let seed = open_enroll(EnrollKey::Transport(&ktr), &msg).expect("open");
    let header = Header {
        suite: Suite::CMAC64,
        device,
        generation: 0,
        t: ISSUED + 1,
        r: 1,
    };
    let mut rc = [0u8; 64];
    let m =
        make_receipt(&seed, &header, Sender::Center, msg.header.r, 0, &mut rc).expect("receipt");
    chip.accept_receipt(&rc[..m]).expect("accept");
    chip.add_audience("acme-gateway").expect("audience");
    chip
}
