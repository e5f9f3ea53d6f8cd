//! Generates the known-answer vectors of `testdata/kat.txt`.
//!
//! Run once, and commit the output; the tests then check the code against
//! the committed file, so a change of any byte on the wire shows up as a
//! failing test instead of silently changing the vectors:
//!
//! ```text
//! cargo run -q -p microcert-core --example gen_vectors -- --date 2026-12-02 \
//!     > crates/microcert-core/testdata/kat.txt
//! cargo run -q -p microcert-core --example gen_vectors -- --corpus fuzz/corpus > /dev/null
//! ```
//!
//! `--corpus DIR` also writes every message as a binary seed file into
//! `DIR/<fuzz target>/`, the committed seed corpus of the fuzz targets.
//!
//! Every input is fixed. The two seeds are random bytes drawn once from
//! the operating system and committed in `testdata/kat_random.txt`, so
//! that their 61 rows are all different: with a periodic seed (the first
//! vectors used byte i = (37 i + 11) mod 256, only 16 distinct rows) an
//! implementation that reads the month, day or fixed rows at a wrong offset
//! passed every vector. Base year 2026, device 0102030405060708, times in
//! 2026 and one AUTH per suite in 2029 (year row 3); the inputs use
//! distinct month, day and fixed rows, so that a wrong row selection
//! changes the vectors. The generator refuses a seed with a repeated row.

use std::fmt::Write as _;
use std::path::PathBuf;

use microcert_core::csk::combine;
use microcert_core::{
    Audience, DataDigest, DeviceId, EnrollKey, Header, Key128, KeySeed, Opcode, Purpose, SEED_LEN,
    Sender, Suite, challenge_window, make_auth, make_auth_response, make_challenge, make_command,
    make_enroll, make_receipt, make_signature, seal, transport_key, working_key,
};

const BASE_YEAR: u16 = 2026;
const DEVICE: DeviceId = DeviceId([1, 2, 3, 4, 5, 6, 7, 8]);
const RELYING_PARTY: &str = "billing.example";
const SIGNED_DATA: &[u8] = b"temperature=21.5C;humidity=40%";
const SEALED_DATA: &[u8] = b"meter 4711: 1234.5 kWh";

/// The committed random bytes (`NAME = hex` lines).
const RANDOM: &str = include_str!("../testdata/kat_random.txt");

fn pattern<const N: usize>(mul: usize, add: usize) -> [u8; N] {
    core::array::from_fn(|i| ((i * mul + add) % 256) as u8)
}

/// A seed of the committed random bytes named `name`; all 61 rows differ.
fn random_seed(name: &str) -> KeySeed {
    let hex = RANDOM
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(" = "))
        .unwrap_or_else(|| panic!("{name} missing from kat_random.txt"));
    let bytes: [u8; SEED_LEN] = hex::decode(hex.trim())
        .expect("hex")
        .try_into()
        .expect("976 bytes");
    let rows: std::collections::HashSet<&[u8]> = bytes.chunks(16).collect();
    assert_eq!(rows.len(), SEED_LEN / 16, "{name} repeats a row");
    KeySeed::from_bytes(&bytes, BASE_YEAR)
}

fn seed() -> KeySeed {
    random_seed("SEED")
}

fn new_seed() -> KeySeed {
    random_seed("NEW_SEED")
}

fn ktrans() -> Key128 {
    Key128::from_bytes(pattern::<16>(13, 7))
}

fn kchal() -> Key128 {
    Key128::from_bytes(pattern::<16>(11, 5))
}

/// The record being written: lines `NAME = value`, in insertion order.
struct Record {
    text: String,
}

impl Record {
    fn new(count: &mut usize, ty: &str) -> Self {
        let mut r = Record {
            text: String::new(),
        };
        r.line("COUNT", *count);
        r.line("TYPE", ty);
        *count += 1;
        r
    }

    fn line(&mut self, name: &str, value: impl std::fmt::Display) {
        writeln!(self.text, "{name} = {value}").unwrap();
    }

    fn hex(&mut self, name: &str, bytes: &[u8]) {
        self.line(name, hex::encode(bytes));
    }

    fn header(&mut self, h: &Header) {
        self.line("SUITE", h.suite.id());
        self.hex("DEVICE", &h.device.0);
        self.line("GENERATION", h.generation);
        self.line("TIME", h.t);
        self.line("NONCE", format_args!("{:016x}", h.r));
    }

    /// K0 and the working key of `purpose` for header `h` under `seed`.
    fn keys(&mut self, seed: &KeySeed, purpose: Purpose, h: &Header) {
        let k0 = combine(seed, h.t, h.r).expect("t is in the seed's years");
        self.hex("K0", k0.expose());
        let key = working_key(seed, purpose, h).expect("t is in the seed's years");
        self.hex("KEY", key.expose());
    }
}

struct Out {
    records: Vec<(String, Record, Vec<u8>)>,
}

impl Out {
    /// Adds a finished record; `target` names the fuzz target whose corpus
    /// gets its message.
    fn push(&mut self, target: &str, mut rec: Record, message: &[u8]) {
        rec.hex("MESSAGE", message);
        self.records
            .push((target.to_owned(), rec, message.to_vec()));
    }
}

fn header(suite: Suite, generation: u8, t: u32, r: u64) -> Header {
    Header {
        suite,
        device: DEVICE,
        generation,
        t,
        r,
    }
}

/// r for suite 2 differs from suite 1's, so that both exercise other rows.
fn r_for(suite: Suite, r: u64) -> u64 {
    if suite == Suite::CMAC64 {
        r
    } else {
        r.rotate_left(8)
    }
}

fn main() {
    let mut date = None;
    let mut corpus: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--date" => date = args.next(),
            "--corpus" => corpus = args.next().map(PathBuf::from),
            _ => {
                eprintln!("usage: gen_vectors [--date YYYY-MM-DD] [--corpus DIR]");
                std::process::exit(2);
            }
        }
    }
    let date = date.unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let d = microcert_core::time::date_of(now as i64);
        format!("{:04}-{:02}-{:02}", d.year, d.month, d.day)
    });

    let seed = seed();
    let mut count = 0usize;
    let mut out = Out {
        records: Vec::new(),
    };
    let rp = Audience::relying_party(RELYING_PARTY);
    let mut buf = vec![0u8; 2048];

    // The challenge is suite-independent; the AUTH_RESPONSEs answer it.
    let c = pattern::<8>(1, 0xa0);
    let now = 1_789_999_990u32;
    let challenge = make_challenge(&kchal(), DEVICE, c, now);
    {
        let mut rec = Record::new(&mut count, "challenge");
        rec.hex("DEVICE", &DEVICE.0);
        rec.hex("KCHAL", kchal().expose());
        rec.hex("C", &c);
        rec.line("NOW", now);
        rec.line("W", challenge_window(now));
        out.push("", rec, &challenge);
    }
    for epoch in [0u8, 1] {
        let mut rec = Record::new(&mut count, "transport-key");
        rec.hex("DEVICE", &DEVICE.0);
        rec.hex("KTRANS", ktrans().expose());
        rec.line("EPOCH", epoch);
        rec.hex("KTR", transport_key(&ktrans(), DEVICE, epoch).expose());
        out.records.push((String::new(), rec, Vec::new()));
    }

    for suite in [Suite::CMAC64, Suite::CMAC128] {
        // AUTH for the center.
        let h = header(suite, 0, 1_790_000_000, r_for(suite, 0x0123_4567_89ab_cdef));
        let n = make_auth(&seed, &h, &Audience::CENTER, &mut buf).unwrap();
        let mut rec = Record::new(&mut count, "auth");
        rec.header(&h);
        rec.hex("AUDIENCE", &Audience::CENTER.0);
        rec.keys(&seed, Purpose::Auth, &h);
        out.push("auth", rec, &buf[..n]);
        let auth_r = h.r;

        // AUTH for a relying party.
        let h = header(suite, 0, 1_790_000_017, r_for(suite, 0xfedc_ba98_7654_3210));
        let n = make_auth(&seed, &h, &rp, &mut buf).unwrap();
        let mut rec = Record::new(&mut count, "auth");
        rec.header(&h);
        rec.line("AUDIENCE_NAME", RELYING_PARTY);
        rec.hex("AUDIENCE", &rp.0);
        rec.keys(&seed, Purpose::Auth, &h);
        out.push("auth", rec, &buf[..n]);

        // AUTH_RESPONSE to the challenge above.
        let h = header(suite, 0, 1_790_000_005, r_for(suite, 0x1122_3344_5566_7788));
        let n = make_auth_response(&seed, &h, &challenge, &Audience::CENTER, &mut buf).unwrap();
        let mut rec = Record::new(&mut count, "auth-response");
        rec.header(&h);
        rec.hex("AUDIENCE", &Audience::CENTER.0);
        rec.hex("CHALLENGE", &challenge);
        rec.keys(&seed, Purpose::Auth, &h);
        out.push("auth_response", rec, &buf[..n]);

        // SIGNATURE over SIGNED_DATA (on another day: 2026-10-31).
        let h = header(suite, 0, 1_793_450_096, r_for(suite, 0x8899_aabb_ccdd_eeff));
        let digest = DataDigest::of(SIGNED_DATA);
        let n = make_signature(&seed, &h, &digest, &mut buf).unwrap();
        let mut rec = Record::new(&mut count, "signature");
        rec.header(&h);
        rec.hex("DATA", SIGNED_DATA);
        rec.hex("DIGEST", &digest);
        rec.keys(&seed, Purpose::Sign, &h);
        out.push("signature", rec, &buf[..n]);

        // SEALED for the relying party (2026-02-28).
        let h = header(suite, 0, 1_772_280_000, r_for(suite, 0x0f1e_2d3c_4b5a_6978));
        let n = seal(&seed, &h, &rp, SEALED_DATA, &mut buf).unwrap();
        let mut rec = Record::new(&mut count, "sealed");
        rec.header(&h);
        rec.line("AUDIENCE_NAME", RELYING_PARTY);
        rec.hex("AUDIENCE", &rp.0);
        rec.hex("DATA", SEALED_DATA);
        rec.keys(&seed, Purpose::Enc, &h);
        out.push("sealed", rec, &buf[..n]);

        // First ENROLL, under Ktr(device, 0), carrying SEED itself.
        let h = header(suite, 0, 1_767_225_600, r_for(suite, 0x0000_0001_a5a5_5a5a));
        let ktr = transport_key(&ktrans(), DEVICE, 0);
        let n = make_enroll(EnrollKey::Transport(&ktr), &seed, &h, &mut buf).unwrap();
        let mut rec = Record::new(&mut count, "enroll-transport");
        rec.header(&h);
        rec.hex("KTRANS", ktrans().expose());
        rec.line("EPOCH", 0);
        rec.hex("KTR", ktr.expose());
        rec.hex("NEW_SEED", seed.expose());
        rec.line("NEW_SEED_BASE_YEAR", seed.base_year());
        rec.hex("KEY", ktr.expose());
        out.push("enroll", rec, &buf[..n]);

        // ENROLL of a seed update, under Kupd of SEED, generation 1.
        let h = header(suite, 1, 1_798_761_599, r_for(suite, 0x7766_5544_3322_1100));
        let next = new_seed();
        let n = make_enroll(EnrollKey::Update(&seed), &next, &h, &mut buf).unwrap();
        let mut rec = Record::new(&mut count, "enroll-update");
        rec.header(&h);
        rec.hex("NEW_SEED", next.expose());
        rec.line("NEW_SEED_BASE_YEAR", next.base_year());
        rec.keys(&seed, Purpose::Upd, &h);
        out.push("enroll", rec, &buf[..n]);

        // COMMANDs from the center, counter = now.
        for (i, opcode) in [Opcode::UPDATE_SEED, Opcode::REVOKE]
            .into_iter()
            .enumerate()
        {
            let t = 1_790_000_500 + i as u32;
            let h = header(suite, 0, t, r_for(suite, 0x3c3c_0000_1234_0000 + i as u64));
            let n = make_command(&seed, &h, t, opcode, &mut buf).unwrap();
            let mut rec = Record::new(&mut count, "command");
            rec.header(&h);
            rec.line("COUNTER", t);
            rec.line("OPCODE", opcode.get());
            rec.keys(&seed, Purpose::Cmd, &h);
            out.push("command", rec, &buf[..n]);
        }

        // AUTH for the center on 2029-04-04 (year row 3, month 4, day 4).
        let h = header(suite, 0, 1_870_000_000, r_for(suite, 0x6a09_e667_f3bc_c908));
        let n = make_auth(&seed, &h, &Audience::CENTER, &mut buf).unwrap();
        let mut rec = Record::new(&mut count, "auth");
        rec.header(&h);
        rec.hex("AUDIENCE", &Audience::CENTER.0);
        rec.keys(&seed, Purpose::Auth, &h);
        out.push("auth", rec, &buf[..n]);

        // RECEIPT by the center answering the first AUTH.
        let h = header(suite, 0, 1_790_000_001, r_for(suite, 0x5555_aaaa_0f0f_f0f0));
        let n = make_receipt(&seed, &h, Sender::Center, auth_r, 0, &mut buf).unwrap();
        let mut rec = Record::new(&mut count, "receipt-center");
        rec.header(&h);
        rec.line("REF", format_args!("{auth_r:016x}"));
        rec.line("STATUS", 0);
        rec.keys(&seed, Purpose::ReceiptCenter, &h);
        out.push("receipt", rec, &buf[..n]);

        // RECEIPT by the node answering the REVOKE command (status 0), and
        // one reporting an error (status 3).
        for status in [0u8, 3] {
            let h = header(
                suite,
                0,
                1_790_000_600 + u32::from(status),
                r_for(suite, 0x9e37_79b9_7f4a_7c15 ^ u64::from(status)),
            );
            let reference = r_for(suite, 0x3c3c_0000_1234_0001);
            let n = make_receipt(&seed, &h, Sender::Node, reference, status, &mut buf).unwrap();
            let mut rec = Record::new(&mut count, "receipt-node");
            rec.header(&h);
            rec.line("REF", format_args!("{reference:016x}"));
            rec.line("STATUS", status);
            rec.keys(&seed, Purpose::ReceiptNode, &h);
            out.push("receipt", rec, &buf[..n]);
        }
    }

    print!(
        "# microcert known-answer vectors, generated once by examples/gen_vectors.rs on {date}\n\
         #\n\
         # Format: NAME = value lines, records separated by blank lines, # comments.\n\
         # Hex is lowercase. NONCE is the header's r, REF a RECEIPT's reference,\n\
         # K0 the CSK combination, KEY the working key (Ktr for enroll-transport).\n\
         # An ENROLL's plaintext is NEW_SEED || NEW_SEED_BASE_YEAR (u16).\n\
         # Checked independently by testdata/kat_crosscheck.py (pyca/cryptography).\n\
         # SEED and NEW_SEED are random bytes committed in testdata/kat_random.txt\n\
         # (61 distinct rows each).\n\
         SEED = {}\n\
         BASE_YEAR = {BASE_YEAR}\n",
        hex::encode(seed.expose())
    );
    for (_, rec, _) in &out.records {
        print!("\n{}", rec.text);
    }

    if let Some(dir) = corpus {
        for (i, (target, _, msg)) in out.records.iter().enumerate() {
            if target.is_empty() {
                continue;
            }
            for t in [target.as_str(), "message"] {
                let d = dir.join(t);
                std::fs::create_dir_all(&d).expect("create corpus directory");
                std::fs::write(d.join(format!("kat-{i:02}")), msg).expect("write corpus file");
            }
        }
    }
}
