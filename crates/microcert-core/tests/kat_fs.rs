//! The committed known-answer vectors of the forward-secret seed update
//! (v1.2), `testdata/kat_fs.txt` (made once by `examples/gen_fs_vectors.rs`,
//! cross-checked by `testdata/kat_crosscheck.py`): both sides derive the
//! committed Z and Kfs from the fixed ephemeral keys, every make gives the
//! committed bytes, every check accepts them, every single-bit change is
//! refused, and no key derivable from the old seed and the recorded
//! messages opens the new seed.

mod common;

use common::{Kat, Record};
use microcert_core::fs::{EphemeralKey, FsBinding, fs_key};
use microcert_core::{
    Command, EnrollFs, EnrollKey, Error, Header, Key128, KeySeed, Opcode, Purpose, SEED_LEN, Suite,
    make_command_fs, make_enroll_fs, open_enroll, open_enroll_fs, verify_command, verify_enroll_fs,
    working_key,
};

const KAT_FS: &str = include_str!("../testdata/kat_fs.txt");

fn headers(rec: &Record) -> (Header, Header) {
    let suite = Suite::new(rec.num("SUITE")).unwrap();
    let device = microcert_core::DeviceId(rec.array("DEVICE"));
    (
        Header {
            suite,
            device,
            generation: 0,
            t: rec.num("CMD_TIME"),
            r: rec.u64_hex("CMD_NONCE"),
        },
        Header {
            suite,
            device,
            generation: 1,
            t: rec.num("ENROLL_TIME"),
            r: rec.u64_hex("ENROLL_NONCE"),
        },
    )
}

fn new_seed(rec: &Record) -> KeySeed {
    let bytes: [u8; SEED_LEN] = rec.array("NEW_SEED");
    KeySeed::from_bytes(&bytes, rec.num("NEW_SEED_BASE_YEAR"))
}

#[test]
fn the_forward_secret_vectors_are_reproduced_and_checked() {
    let kat = Kat::parse(KAT_FS);
    let old = kat.seed();
    assert_eq!(kat.records.len(), 2, "one record per suite");
    for rec in &kat.records {
        let (ch, eh) = headers(rec);
        let dc = EphemeralKey::from_candidate(&rec.array("D_C")).unwrap();
        let dn = EphemeralKey::from_candidate(&rec.array("D_N")).unwrap();
        assert_eq!(hex::encode(dc.public()), rec.str("Q_C"));
        assert_eq!(hex::encode(dn.public()), rec.str("Q_N"));
        let z = dc.shared_secret(dn.public()).unwrap();
        assert_eq!(hex::encode(&z[..]), rec.str("Z"));
        assert_eq!(*z, *dn.shared_secret(dc.public()).unwrap());
        let binding = FsBinding {
            device: ch.device,
            new_generation: 1,
            command_r: ch.r,
            enroll_r: eh.r,
            center_public: dc.public(),
            node_public: dn.public(),
        };
        assert_eq!(hex::encode(binding.salt()), rec.str("SALT"));
        assert_eq!(hex::encode(binding.context()), rec.str("CONTEXT"));
        let kfs = fs_key(&z, &binding);
        assert_eq!(hex::encode(kfs.expose()), rec.str("KFS"));
        let kcmd = working_key(&old, Purpose::Cmd, &ch).unwrap();
        assert_eq!(hex::encode(kcmd.expose()), rec.str("CMD_KEY"));
        let kupd = working_key(&old, Purpose::Upd, &eh).unwrap();
        assert_eq!(hex::encode(kupd.expose()), rec.str("UPD_KEY"));

        let mut buf = [0u8; 2048];
        let n = make_command_fs(&old, &ch, rec.num("COUNTER"), dc.public(), &mut buf).unwrap();
        let command = rec.hex("COMMAND");
        assert_eq!(&buf[..n], &command[..], "COUNT {} COMMAND", rec.count());
        let cmd = Command::decode(&command).unwrap();
        assert_eq!(cmd.opcode, Opcode::UPDATE_SEED_FS);
        assert_eq!(cmd.ephemeral, Some(dc.public()));
        verify_command(&old, &cmd).unwrap();
        // The public key is under the COMMAND's tag: every bit counts.
        let mut m = command.clone();
        for bit in 0..m.len() * 8 {
            m[bit / 8] ^= 1 << (bit % 8);
            let ok = Command::decode(&m).is_ok_and(|c| verify_command(&old, &c).is_ok());
            assert!(
                !ok,
                "COUNT {}: COMMAND bit {bit} flipped accepted",
                rec.count()
            );
            m[bit / 8] ^= 1 << (bit % 8);
        }

        let fresh = new_seed(rec);
        let n = make_enroll_fs(&old, &kfs, dn.public(), &fresh, &eh, &mut buf).unwrap();
        let message = rec.hex("MESSAGE");
        assert_eq!(&buf[..n], &message[..], "COUNT {} MESSAGE", rec.count());
        let tag = if ch.suite == Suite::CMAC64 { 8 } else { 16 };
        assert_eq!(message.len(), 23 + 33 + 978 + 2 * tag);
        let msg = EnrollFs::decode(&message).unwrap();
        verify_enroll_fs(&old, &msg).unwrap();
        let opened = open_enroll_fs(&kfs, &msg).unwrap();
        assert_eq!(opened.expose(), fresh.expose());
        assert_eq!(opened.base_year(), fresh.base_year());
        let mut m = message.clone();
        for bit in 0..m.len() * 8 {
            m[bit / 8] ^= 1 << (bit % 8);
            let ok = EnrollFs::decode(&m).is_ok_and(|e| {
                verify_enroll_fs(&old, &e).is_ok() && open_enroll_fs(&kfs, &e).is_ok()
            });
            assert!(
                !ok,
                "COUNT {}: ENROLL bit {bit} flipped accepted",
                rec.count()
            );
            m[bit / 8] ^= 1 << (bit % 8);
        }
    }
}

/// The point of the forward-secret update: an attacker who recorded the
/// COMMAND and the ENROLL and later learns the old seed (generation g)
/// can verify the ENROLL's Kupd tag, but no key it can derive from the
/// old seed and the public values opens the new seed; only the key from
/// the ECDH's Z does.
#[test]
fn the_old_seed_and_the_recorded_messages_do_not_open_the_new_seed() {
    let kat = Kat::parse(KAT_FS);
    let old = kat.seed();
    for rec in &kat.records {
        let (ch, eh) = headers(rec);
        let message = rec.hex("MESSAGE");
        let msg = EnrollFs::decode(&message).unwrap();
        let cmd_bytes = rec.hex("COMMAND");
        let cmd = Command::decode(&cmd_bytes).unwrap();
        let qc = cmd.ephemeral.unwrap();
        // The thief's view: the old seed authenticates the recorded
        // messages (so it holds the right seed)...
        verify_command(&old, &cmd).unwrap();
        verify_enroll_fs(&old, &msg).unwrap();
        // ...and derives every key it can from the old seed and the public
        // values: each working key of both headers, Kupd as the v1.1 update
        // key, K0, and Kfs with Z replaced by what it knows (zeros, an
        // x coordinate of a public key, K0 or Kupd padded).
        let mut tried: Vec<Key128> = Vec::new();
        for h in [ch, eh] {
            let k0 = microcert_core::csk::combine(&old, h.t, h.r).unwrap();
            tried.push(Key128::from_bytes(*k0.expose()));
            for p in [
                Purpose::Auth,
                Purpose::Sign,
                Purpose::Enc,
                Purpose::Cmd,
                Purpose::Upd,
                Purpose::ReceiptCenter,
                Purpose::ReceiptNode,
            ] {
                tried.push(working_key(&old, p, &h).unwrap());
            }
        }
        let binding = FsBinding {
            device: ch.device,
            new_generation: 1,
            command_r: ch.r,
            enroll_r: eh.r,
            center_public: qc,
            node_public: msg.ephemeral,
        };
        let mut guesses: Vec<[u8; 32]> = vec![[0; 32]];
        guesses.push(qc[1..].try_into().unwrap());
        guesses.push(msg.ephemeral[1..].try_into().unwrap());
        for k in &tried {
            let mut g = [0u8; 32];
            g[..16].copy_from_slice(k.expose());
            guesses.push(g);
        }
        for z in &guesses {
            tried.push(fs_key(z, &binding));
        }
        for k in &tried {
            assert_eq!(open_enroll_fs(k, &msg).err(), Some(Error::Verification));
        }
        // Read as a v1.1 ENROLL under Kupd it does not even parse, and the
        // v1.1 rule (CCM under Kupd) over its ciphertext fails too.
        assert_eq!(
            microcert_core::Enroll::decode(&message).err(),
            Some(Error::Length)
        );
        let v11 = microcert_core::Enroll {
            header: msg.header,
            ciphertext: msg.ciphertext,
            tag: msg.ccm_tag,
        };
        assert_eq!(
            open_enroll(EnrollKey::Update(&old), &v11).err(),
            Some(Error::Verification)
        );
        // The true key, from Z, opens it.
        let kfs = Key128::from_bytes(rec.array("KFS"));
        assert_eq!(
            open_enroll_fs(&kfs, &msg).unwrap().expose(),
            new_seed(rec).expose()
        );
    }
}
