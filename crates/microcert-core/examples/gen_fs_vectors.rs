//! Generates the known-answer vectors of the forward-secret seed update
//! (protocol v1.2), `testdata/kat_fs.txt`. Run once and commit the output:
//!
//! ```text
//! cargo run -q -p microcert-core --features forward-secret --example gen_fs_vectors \
//!     -- --date 2026-12-02 > crates/microcert-core/testdata/kat_fs.txt
//! ```
//!
//! Every input is fixed: SEED and NEW_SEED as in `kat.txt`, and the two
//! ephemeral private keys FS_CENTER_D and FS_NODE_D, random bytes drawn
//! once from the operating system and committed in `testdata/kat_random.txt`.
//! One record per suite: the UPDATE_SEED_FS COMMAND (generation 0) and the
//! ENROLL answering it (generation 1), with every intermediate value (Z,
//! salt, Kdk, Context, Kfs, Kupd).

use std::fmt::Write as _;

use microcert_core::csk::combine;
use microcert_core::fs::{EphemeralKey, FsBinding, fs_key};
use microcert_core::{
    DeviceId, Header, KeySeed, Purpose, SEED_LEN, Suite, make_command_fs, make_enroll_fs,
    working_key,
};

const BASE_YEAR: u16 = 2026;
const DEVICE: DeviceId = DeviceId([1, 2, 3, 4, 5, 6, 7, 8]);
const RANDOM: &str = include_str!("../testdata/kat_random.txt");

fn random(name: &str) -> Vec<u8> {
    let hex = RANDOM
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(" = "))
        .unwrap_or_else(|| panic!("{name} missing from kat_random.txt"));
    hex::decode(hex.trim()).expect("hex")
}

fn seed(name: &str) -> KeySeed {
    let bytes: [u8; SEED_LEN] = random(name).try_into().expect("976 bytes");
    KeySeed::from_bytes(&bytes, BASE_YEAR)
}

fn key(name: &str) -> EphemeralKey {
    let d: [u8; 32] = random(name).try_into().expect("32 bytes");
    EphemeralKey::from_candidate(&d).expect("a private key in [1, n-1]")
}

fn line(out: &mut String, name: &str, value: impl std::fmt::Display) {
    writeln!(out, "{name} = {value}").unwrap();
}

fn hexl(out: &mut String, name: &str, bytes: &[u8]) {
    line(out, name, hex::encode(bytes));
}

fn main() {
    let mut date = String::from("(no date given)");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--date" => date = args.next().expect("--date YYYY-MM-DD"),
            _ => panic!("usage: gen_fs_vectors [--date YYYY-MM-DD]"),
        }
    }
    let old = seed("SEED");
    let new = seed("NEW_SEED");
    let dc = key("FS_CENTER_D");
    let dn = key("FS_NODE_D");
    print!(
        "# microcert forward-secret update (v1.2) known-answer vectors, generated once\n\
         # by examples/gen_fs_vectors.rs on {date}.\n\
         #\n\
         # Format as kat.txt. D_C, D_N: the center's and the node's ephemeral private\n\
         # keys (big-endian scalars), Q_C, Q_N: their SEC1 compressed public keys.\n\
         # Z = x(D_C * Q_N) = x(D_N * Q_C); SALT = r(COMMAND) || r(ENROLL);\n\
         # KDK = AES-CMAC(SALT, Z); CONTEXT = device || g || g+1 || Q_C || Q_N;\n\
         # KFS = KDF(KDK, \"MC-FS-UPD\", CONTEXT); CMD_KEY = Kcmd, UPD_KEY = Kupd of SEED.\n\
         # Checked independently by testdata/kat_crosscheck.py (pyca/cryptography).\n\
         SEED = {}\n\
         BASE_YEAR = {BASE_YEAR}\n",
        hex::encode(old.expose())
    );
    let mut buf = [0u8; 2048];
    for (count, suite) in [Suite::CMAC64, Suite::CMAC128].into_iter().enumerate() {
        let s = suite.id();
        let cmd_h = Header {
            suite,
            device: DEVICE,
            generation: 0,
            t: 1_790_000_900 + u32::from(s),
            r: 0x0f50_c0de_0000_0000 + u64::from(s),
        };
        let enr_h = Header {
            suite,
            device: DEVICE,
            generation: 1,
            t: 1_790_000_960 + u32::from(s),
            r: 0x0f50_e4e0_0000_0000 + u64::from(s),
        };
        let counter = cmd_h.t;
        let mut rec = String::new();
        line(&mut rec, "COUNT", count);
        line(&mut rec, "TYPE", "fs-update");
        line(&mut rec, "SUITE", s);
        hexl(&mut rec, "DEVICE", &DEVICE.0);
        line(&mut rec, "CMD_TIME", cmd_h.t);
        line(&mut rec, "CMD_NONCE", format_args!("{:016x}", cmd_h.r));
        line(&mut rec, "COUNTER", counter);
        line(&mut rec, "ENROLL_TIME", enr_h.t);
        line(&mut rec, "ENROLL_NONCE", format_args!("{:016x}", enr_h.r));
        hexl(&mut rec, "D_C", &dc.secret_bytes()[..]);
        hexl(&mut rec, "Q_C", dc.public());
        hexl(&mut rec, "D_N", &dn.secret_bytes()[..]);
        hexl(&mut rec, "Q_N", dn.public());
        let z = dc.shared_secret(dn.public()).unwrap();
        assert_eq!(*z, *dn.shared_secret(dc.public()).unwrap());
        hexl(&mut rec, "Z", &z[..]);
        let binding = FsBinding {
            device: DEVICE,
            new_generation: 1,
            command_r: cmd_h.r,
            enroll_r: enr_h.r,
            center_public: dc.public(),
            node_public: dn.public(),
        };
        hexl(&mut rec, "SALT", &binding.salt());
        let kdk = microcert_core::aes_cmac(&binding.salt(), &z[..]);
        hexl(&mut rec, "KDK", &kdk);
        hexl(&mut rec, "CONTEXT", &binding.context());
        let kfs = fs_key(&z, &binding);
        hexl(&mut rec, "KFS", kfs.expose());
        let k0 = combine(&old, cmd_h.t, cmd_h.r).unwrap();
        hexl(&mut rec, "CMD_K0", k0.expose());
        let kcmd = working_key(&old, Purpose::Cmd, &cmd_h).unwrap();
        hexl(&mut rec, "CMD_KEY", kcmd.expose());
        let n = make_command_fs(&old, &cmd_h, counter, dc.public(), &mut buf).unwrap();
        hexl(&mut rec, "COMMAND", &buf[..n]);
        let k0 = combine(&old, enr_h.t, enr_h.r).unwrap();
        hexl(&mut rec, "UPD_K0", k0.expose());
        let kupd = working_key(&old, Purpose::Upd, &enr_h).unwrap();
        hexl(&mut rec, "UPD_KEY", kupd.expose());
        hexl(&mut rec, "NEW_SEED", new.expose());
        line(&mut rec, "NEW_SEED_BASE_YEAR", new.base_year());
        let n = make_enroll_fs(&old, &kfs, dn.public(), &new, &enr_h, &mut buf).unwrap();
        hexl(&mut rec, "MESSAGE", &buf[..n]);
        print!("\n{rec}");
    }
}
