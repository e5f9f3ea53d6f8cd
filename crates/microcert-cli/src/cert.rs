//! `microcert cert`: offline tools to make, verify, open and inspect
//! micro-certificates with a seed file, the way `openssl x509` serves
//! certificates. Nothing here touches a center or a database.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use microcert_core::{
    self as core, Audience, DataDigest, DeviceId, EnrollKey, HEADER_LEN, Header, Key128, KeySeed,
    Message, SEED_LEN, Sender, Suite,
};
use zeroize::Zeroizing;

use crate::hexarg;

/// Offline micro-certificate tools.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Make a message and print it as lowercase hex.
    Make(MakeArgs),
    /// Check a message's cryptography and its seed's years (not freshness).
    /// Prints "valid" and exits 0, or "invalid: <kind>" and exits 1.
    Verify(VerifyArgs),
    /// Open a SEALED message and print its plaintext as hex.
    Open(OpenArgs),
    /// Print every header field of a message, one per line. Needs no seed.
    Inspect {
        /// The message as hex.
        hex: String,
    },
    /// Write a fresh random 976-byte seed file (mode 0600), for experiments.
    NewSeed {
        /// Where to write the seed; refuses to overwrite.
        #[arg(long)]
        out: PathBuf,
    },
}

/// The seed a message is made or checked with.
#[derive(Debug, Args)]
pub struct SeedArgs {
    /// A raw 976-byte key seed file.
    #[arg(long, value_name = "FILE")]
    seed: PathBuf,
    /// The calendar year served by the seed's first year row.
    #[arg(long, value_name = "Y")]
    base_year: u16,
}

/// Message kinds the offline tool can make.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MakeKind {
    /// AUTH: H || tag(Kauth, H || aud).
    Auth,
    /// AUTH_RESPONSE to a center challenge (needs --challenge).
    AuthResponse,
    /// SIGNATURE over --data.
    Signature,
    /// SEALED: --data encrypted for a relying party (needs --audience).
    Sealed,
}

/// Arguments of `cert make`.
#[derive(Debug, Args)]
pub struct MakeArgs {
    /// Which message to make.
    kind: MakeKind,
    #[command(flatten)]
    seed: SeedArgs,
    /// The device's EUI-64, 16 hex digits.
    #[arg(long, value_name = "HEX16", value_parser = hexarg::hex8)]
    device: [u8; 8],
    /// The seed generation.
    #[arg(long, value_name = "N")]
    generation: u8,
    /// t: seconds since 1970-01-01T00:00:00Z.
    #[arg(long, value_name = "UNIX_SECONDS")]
    time: u32,
    /// r: the 64-bit random number of this message, 16 hex digits.
    #[arg(long, value_name = "HEX16", value_parser = hexarg::hex8)]
    nonce: [u8; 8],
    /// The suite: 1 (8-byte tags) or 2 (16-byte tags).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    suite: u8,
    /// The center's challenge (AUTH_RESPONSE), 32 hex digits.
    #[arg(long, value_name = "HEX32", value_parser = hexarg::hex16)]
    challenge: Option<[u8; 16]>,
    /// The audience, 16 hex digits; eight zero bytes is the center.
    #[arg(long, value_name = "HEX16", value_parser = hexarg::hex8, default_value = "0000000000000000")]
    audience: [u8; 8],
    /// The signed data (SIGNATURE) or the plaintext (SEALED).
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
}

/// Arguments of `cert verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    seed: SeedArgs,
    /// The audience, 16 hex digits; eight zero bytes is the center.
    #[arg(long, value_name = "HEX16", value_parser = hexarg::hex8, default_value = "0000000000000000")]
    audience: [u8; 8],
    /// The signed data, for a SIGNATURE.
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// For an ENROLL under a transport key: a file holding Ktr(device,
    /// epoch) as 32 hex digits (`-`: standard input). Without it an ENROLL
    /// is checked as a seed update (Kupd). Keys are never taken on the
    /// command line, where `ps` and the shell history show them.
    #[arg(long, value_name = "FILE")]
    transport_key_file: Option<PathBuf>,
    /// No longer accepted (a key on the command line is visible to every
    /// user through `ps`): use --transport-key-file.
    #[arg(long = "transport-key", hide = true, value_name = "HEX32")]
    transport_key_on_argv: Option<Zeroizing<String>>,
    /// The message as hex.
    hex: String,
}

/// Arguments of `cert open`.
#[derive(Debug, Args)]
pub struct OpenArgs {
    #[command(flatten)]
    seed: SeedArgs,
    /// The relying party's audience, 16 hex digits.
    #[arg(long, value_name = "HEX16", value_parser = hexarg::hex8, default_value = "0000000000000000")]
    audience: [u8; 8],
    /// The SEALED message as hex.
    hex: String,
}

/// Runs a `cert` command. Errors are usage errors: the caller exits 2.
pub fn run(cmd: CertCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CertCommand::Make(args) => make(args).map(|()| ExitCode::SUCCESS),
        CertCommand::Verify(args) => verify(args),
        CertCommand::Open(args) => open(args),
        CertCommand::Inspect { hex } => inspect(&hex),
        CertCommand::NewSeed { out } => new_seed(&out).map(|()| ExitCode::SUCCESS),
    }
}

fn load_seed(args: &SeedArgs) -> anyhow::Result<KeySeed> {
    let bytes = Zeroizing::new(
        std::fs::read(&args.seed)
            .with_context(|| format!("cannot read seed file {}", args.seed.display()))?,
    );
    if bytes.len() != SEED_LEN {
        bail!(
            "seed file {} holds {} bytes; a seed is exactly {SEED_LEN}",
            args.seed.display(),
            bytes.len()
        );
    }
    Ok(KeySeed::from_slice(&bytes, args.base_year)?)
}

/// SHA-256 of a file, read in pieces.
fn digest_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut f =
        File::open(path).with_context(|| format!("cannot read data file {}", path.display()))?;
    let mut digest = DataDigest::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(digest.finish());
        }
        digest.update(&buf[..n]);
    }
}

fn make(args: MakeArgs) -> anyhow::Result<()> {
    let seed = load_seed(&args.seed)?;
    let header = Header {
        suite: Suite::new(args.suite)?,
        device: DeviceId(args.device),
        generation: args.generation,
        t: args.time,
        r: u64::from_be_bytes(args.nonce),
    };
    let aud = Audience(args.audience);
    let data_path = || {
        args.data
            .as_deref()
            .context("this message needs --data FILE")
    };
    let mut out = vec![0u8; HEADER_LEN + 64];
    let len = match args.kind {
        MakeKind::Auth => core::make_auth(&seed, &header, &aud, &mut out),
        MakeKind::AuthResponse => {
            let challenge = args
                .challenge
                .context("auth-response needs --challenge HEX32")?;
            core::make_auth_response(&seed, &header, &challenge, &aud, &mut out)
        }
        MakeKind::Signature => {
            let digest = digest_file(data_path()?)?;
            core::make_signature(&seed, &header, &digest, &mut out)
        }
        MakeKind::Sealed => {
            if aud.is_center() {
                bail!("sealed needs --audience of a relying party (not the center's 0^8)");
            }
            let plaintext = Zeroizing::new(std::fs::read(data_path()?)?);
            out = vec![0u8; HEADER_LEN + plaintext.len() + header.suite.tag_len()];
            core::seal(&seed, &header, &aud, &plaintext, &mut out)
        }
    }
    .map_err(|e| anyhow::anyhow!("cannot make the message: {e}"))?;
    say!("{}", hex::encode(&out[..len]));
    Ok(())
}

/// The short name of a refusal, as printed after "invalid: ".
fn kind(e: &core::Error) -> &'static str {
    match e {
        core::Error::Length
        | core::Error::Version(_)
        | core::Error::UnknownType(_)
        | core::Error::UnknownSuite(_)
        | core::Error::UnknownOpcode(_)
        | core::Error::WrongType { .. } => "malformed",
        core::Error::SeedNotYetValid => "seed-not-yet-valid",
        core::Error::SeedExpired => "seed-expired",
        core::Error::CenterAudience => "center-audience",
        _ => "verification-failed",
    }
}

fn invalid(e: &core::Error) -> ExitCode {
    say!("invalid: {}", kind(e));
    ExitCode::from(1)
}

/// Reads a 128-bit key written as 32 hex digits from a file (`-`:
/// standard input); every copy is zeroized.
pub fn read_key_file(path: &Path) -> anyhow::Result<Key128> {
    let text = Zeroizing::new(if path == Path::new("-") {
        let mut s = String::new();
        io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the key from standard input")?;
        s
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the key file {}", path.display()))?
    });
    let digits = text.trim();
    let mut key = Zeroizing::new([0u8; 16]);
    if digits.len() != 32 || hex::decode_to_slice(digits, &mut key[..]).is_err() {
        bail!(
            "the key file {} must hold exactly 32 hex digits",
            path.display()
        );
    }
    Ok(Key128::from_bytes(*key))
}

fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    if args.transport_key_on_argv.is_some() {
        bail!(
            "--transport-key no longer takes the key on the command line (every user sees it in `ps` and it stays in shell history): \
             write the 32 hex digits to a file readable only by you and pass --transport-key-file FILE, or --transport-key-file - to read standard input"
        );
    }
    let ktr = args
        .transport_key_file
        .as_deref()
        .map(read_key_file)
        .transpose()?;
    let seed = load_seed(&args.seed)?;
    let aud = Audience(args.audience);
    // Zeroized: a SEALED message is opened in place in it.
    let Ok(mut bytes) = hexarg::hex_any(&args.hex).map(Zeroizing::new) else {
        say!("invalid: malformed");
        return Ok(ExitCode::from(1));
    };
    let msg = match Message::decode(&bytes) {
        Ok(m) => m,
        Err(e) => return Ok(invalid(&e)),
    };
    let checked = match msg {
        Message::Auth(m) => core::verify_auth(&seed, &m, &aud).map(|()| None),
        Message::AuthResponse(m) => core::verify_auth_response(&seed, &m, &aud).map(|()| None),
        Message::Signature(m) => {
            let path = args
                .data
                .as_deref()
                .context("a SIGNATURE needs --data FILE")?;
            core::verify_signature(&seed, &m, &digest_file(path)?).map(|()| None)
        }
        Message::Sealed(_) => core::open_in_place(&seed, &mut bytes, &aud).map(|_| None),
        Message::Enroll(m) => {
            let key = match &ktr {
                Some(k) => EnrollKey::Transport(k),
                None => EnrollKey::Update(&seed),
            };
            core::open_enroll(key, &m).map(|new| {
                Some(format!(
                    "carries a seed for {}..={}",
                    new.base_year(),
                    new.last_year()
                ))
            })
        }
        Message::Command(m) => core::verify_command(&seed, &m).map(|()| None),
        Message::Receipt(m) => core::verify_receipt(&seed, &m, Sender::Center)
            .map(|()| Some("sent by the center".to_owned()))
            .or_else(|_| {
                core::verify_receipt(&seed, &m, Sender::Node)
                    .map(|()| Some("sent by the node".to_owned()))
            }),
    };
    Ok(match checked {
        Ok(None) => {
            say!("valid");
            ExitCode::SUCCESS
        }
        Ok(Some(note)) => {
            say!("valid ({note})");
            ExitCode::SUCCESS
        }
        Err(e) => invalid(&e),
    })
}

fn open(args: OpenArgs) -> anyhow::Result<ExitCode> {
    let seed = load_seed(&args.seed)?;
    let aud = Audience(args.audience);
    if aud.is_center() {
        bail!("open needs --audience of the relying party the message was sealed for");
    }
    // The plaintext is opened in place in `bytes`, and printed from a
    // hex buffer: both zeroized, and written to standard output in one
    // call with its newline, which a line-buffered stdout passes straight
    // to the file descriptor without keeping a copy.
    let Ok(mut bytes) = hexarg::hex_any(&args.hex).map(Zeroizing::new) else {
        say!("invalid: malformed");
        return Ok(ExitCode::from(1));
    };
    Ok(match core::open_in_place(&seed, &mut bytes, &aud) {
        Ok((_, plaintext)) => {
            let mut line = Zeroizing::new(vec![0u8; plaintext.len() * 2 + 1]);
            let n = plaintext.len() * 2;
            hex::encode_to_slice(plaintext, &mut line[..n])?;
            line[n] = b'\n';
            if io::stdout().lock().write_all(&line).is_err() {
                std::process::exit(141);
            }
            ExitCode::SUCCESS
        }
        Err(e) => invalid(&e),
    })
}

/// `2026-09-21T14:13:20Z` for a Unix time.
pub fn rfc3339(t: u32) -> String {
    let t = i64::from(t);
    let d = core::time::date_of(t);
    let s = t.rem_euclid(core::time::DAY);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        d.year,
        d.month,
        d.day,
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn inspect(hex: &str) -> anyhow::Result<ExitCode> {
    let Ok(bytes) = hexarg::hex_any(hex) else {
        say!("invalid: malformed");
        return Ok(ExitCode::from(1));
    };
    let msg = match Message::decode(&bytes) {
        Ok(m) => m,
        Err(e) => {
            say!("invalid: {} ({e})", kind(&e));
            return Ok(ExitCode::from(1));
        }
    };
    let h = msg.header();
    let mut out = io::stdout().lock();
    writeln!(out, "length: {}", bytes.len())?;
    writeln!(out, "version: 1")?;
    writeln!(
        out,
        "type: {} ({})",
        msg.msg_type().name(),
        msg.msg_type().get()
    )?;
    writeln!(out, "suite: {}", h.suite)?;
    writeln!(out, "device: {}", h.device)?;
    writeln!(out, "generation: {}", h.generation)?;
    writeln!(out, "time: {} ({})", h.t, rfc3339(h.t))?;
    writeln!(out, "nonce: {:016x}", h.r)?;
    match msg {
        Message::Auth(m) => writeln!(out, "tag: {}", hex::encode(m.tag))?,
        Message::Signature(m) => writeln!(out, "tag: {}", hex::encode(m.tag))?,
        Message::AuthResponse(m) => {
            writeln!(out, "challenge: {}", hex::encode(m.challenge))?;
            writeln!(out, "tag: {}", hex::encode(m.tag))?;
        }
        Message::Sealed(m) => {
            writeln!(out, "ciphertext: {} bytes", m.ciphertext.len())?;
            writeln!(out, "tag: {}", hex::encode(m.tag))?;
        }
        Message::Enroll(m) => {
            writeln!(out, "ciphertext: {} bytes", m.ciphertext.len())?;
            writeln!(out, "tag: {}", hex::encode(m.tag))?;
        }
        Message::Command(m) => {
            writeln!(out, "counter: {}", m.counter)?;
            writeln!(out, "opcode: {} ({})", m.opcode.name(), m.opcode.get())?;
            writeln!(out, "tag: {}", hex::encode(m.tag))?;
        }
        Message::Receipt(m) => {
            writeln!(out, "ref: {:016x}", m.reference)?;
            writeln!(out, "status: {}", m.status)?;
            writeln!(out, "tag: {}", hex::encode(m.tag))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn new_seed(out: &Path) -> anyhow::Result<()> {
    let mut bytes = Zeroizing::new([0u8; SEED_LEN]);
    // A seed is key material: from the SP 800-90A DRBG (seeded from the OS).
    microcert_center::card::card_random(&mut bytes[..])?;
    write_secret_file(out, &bytes[..])
}

/// Creates a new file with mode 0600 and writes `bytes`; never overwrites.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Replaces `path` atomically with `bytes` (mode 0600): temporary file,
/// fsync, rename.
pub fn write_secret_file_replace(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    write_secret_file(&tmp, bytes)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}
