//! `microcert factory provision`: what a manufacturer gets. Registers N new
//! device ids with the center and writes the personalization file of
//! PROTOCOL.md section 9 (JSON Lines, mode 0600).
//!
//! # Interrupted runs
//!
//! The devices are registered one chunk ([`CHUNK`]) per transaction, and
//! chips.jsonl appears only complete: the lines go to `chips.jsonl.partial`
//! (mode 0600), each chunk's lines written and synced *before* the chunk
//! is registered, and the file is renamed to chips.jsonl (then the
//! directory synced) after the last chunk. So a run killed at any point
//! leaves either a complete chips.jsonl whose devices are all registered,
//! or no chips.jsonl and a `chips.jsonl.partial` that lists every device
//! the run registered, plus at most one chunk of devices that were never
//! registered (killed between the sync and the commit).
//! `factory provision --recover --out DIR` keeps the lines of the
//! partial file whose device is registered (with the epoch and class the
//! line gives) and renames it to chips.jsonl: the consistent pair again.

use std::io::{BufRead, Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use microcert_center::lines::FactoryLine;
use microcert_center::{CenterConfig, Error};
use microcert_core::DeviceId;
use microcert_server::service::now;
use zeroize::{Zeroize, Zeroizing};

use crate::binding::Access;
use crate::config::{ConfigArgs, Open};
use crate::datadir::create_private_dir;

/// Arguments of `factory provision`.
#[derive(Debug, Args)]
pub struct ProvisionArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// How many chips.
    #[arg(long, required_unless_present = "recover", default_value_t = 0)]
    pub count: u32,
    /// RFC 7228 device class (1, 2 or 3): selects the suite and limits.
    #[arg(long, default_value_t = 1)]
    pub class: u8,
    /// Directory for chips.jsonl (created, mode 0700).
    #[arg(long)]
    pub out: PathBuf,
    /// The operator name written to the audit log.
    #[arg(long, default_value = "factory")]
    pub actor: String,
    /// Finish an interrupted run: keep the lines of OUT/chips.jsonl.partial
    /// whose device is registered, and rename it to chips.jsonl.
    #[arg(long)]
    pub recover: bool,
}

/// Devices registered per transaction.
pub const CHUNK: usize = 1000;

/// A test build's fault point: `MICROCERT_FACTORY_FAULT=step:chunk` aborts
/// the process there (as a kill would: no destructor runs). Compiled only
/// with debug assertions, never into a release binary.
fn fault(step: &str, chunk: usize) {
    #[cfg(debug_assertions)]
    if std::env::var("MICROCERT_FACTORY_FAULT").ok().as_deref()
        == Some(format!("{step}:{chunk}").as_str())
    {
        std::process::abort();
    }
    let _ = (step, chunk);
}

/// Syncs a directory (a rename in it is durable after this).
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    let _ = dir;
    Ok(())
}

/// Creates `path` for the chip lines: new, mode 0600.
fn create_secret_file(path: &Path) -> anyhow::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
        .with_context(|| format!("cannot create {} (it must not exist)", path.display()))
}

/// Bytes of chips.jsonl held before they are written to the file.
const BUFFER: usize = 64 * 1024;
/// Room for one line (about 150 bytes; the actor is not in it).
const LINE_MAX: usize = 512;

/// chips.jsonl's writer: lines with transport keys go through one buffer
/// allocated once (never grown, so never copied by a reallocation) and
/// zeroized after every write to the file and when dropped. (A BufWriter
/// would leave them in its buffer.)
struct SecretLines {
    file: std::fs::File,
    buf: Zeroizing<Vec<u8>>,
}

impl SecretLines {
    fn new(file: std::fs::File) -> Self {
        SecretLines {
            file,
            buf: Zeroizing::new(Vec::with_capacity(BUFFER + LINE_MAX)),
        }
    }

    /// Appends one line made by `line` (which must not exceed LINE_MAX).
    fn line(
        &mut self,
        line: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        let before = self.buf.len();
        line(&mut self.buf)?;
        anyhow::ensure!(
            self.buf.len() - before <= LINE_MAX,
            "internal: a chip line is longer than {LINE_MAX} bytes"
        );
        if self.buf.len() >= BUFFER {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        let r = self.file.write_all(&self.buf);
        self.buf.zeroize();
        Ok(r?)
    }

    /// Writes the buffered lines and syncs the file.
    fn sync(&mut self) -> anyhow::Result<()> {
        self.flush()?;
        self.file.sync_data()?;
        Ok(())
    }

    /// Drops what was written after `len` bytes (buffered lines included).
    fn truncate(&mut self, len: u64) -> anyhow::Result<()> {
        self.buf.zeroize();
        self.file.set_len(len)?;
        self.file.seek(std::io::SeekFrom::Start(len))?;
        self.file.sync_data()?;
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<()> {
        self.flush()?;
        self.file.sync_all()?;
        Ok(())
    }
}

/// Runs `factory provision`.
pub fn provision(args: ProvisionArgs) -> anyhow::Result<()> {
    if args.count == 0 && !args.recover {
        bail!("--count must be at least 1");
    }
    let r = args.cfg.resolve()?;
    let center = r.open_center(Open {
        access: Access::Write,
        create_db: !args.recover,
        create_card: !args.recover,
        dev: false,
        center: CenterConfig::default(),
    })?;
    let path = args.out.join("chips.jsonl");
    let partial = args.out.join("chips.jsonl.partial");
    if args.recover {
        return recover(&center, &partial, &path);
    }
    create_private_dir(&args.out)?;
    if path.exists() {
        bail!("{} exists: give another --out", path.display());
    }
    let file = create_secret_file(&partial).with_context(|| {
        format!(
            "an interrupted run may have left it: `factory provision --recover --out {}` finishes it",
            args.out.display()
        )
    })?;
    let mut out = SecretLines::new(file);
    let bar = indicatif::ProgressBar::new(u64::from(args.count));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} chips {per_sec} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let Some(profile) = CenterConfig::default().profile(args.class).cloned() else {
        bail!("no profile for device class {}", args.class);
    };
    let suite = profile.default_suite;
    let count = args.count as usize;
    let mut made = 0usize;
    let mut chunk_no = 0usize;
    while made < count {
        let n = CHUNK.min(count - made);
        let mut ids = Vec::with_capacity(n);
        while ids.len() < n {
            let mut id = [0u8; 8];
            getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("OS random generator: {e}"))?;
            if !ids.contains(&DeviceId(id)) {
                ids.push(DeviceId(id));
            }
        }
        let t = now();
        // The chunk's lines are on disk before its devices are registered:
        // the partial file never misses a registered device.
        let mark = out.file.stream_position()?;
        for &id in &ids {
            let ktr = center.card().transport_key(id, 0)?;
            let mut ktr_hex = Zeroizing::new([0u8; 32]);
            hex::encode_to_slice(ktr.expose(), &mut ktr_hex[..])?;
            let line = FactoryLine {
                device_id: id.to_string().into(),
                epoch: 0,
                transport_key: std::str::from_utf8(&ktr_hex[..])?.into(),
                class: args.class,
                suite: suite.id(),
                issued: t,
            };
            out.line(|b| {
                serde_json::to_writer(&mut *b, &line)?;
                b.push(b'\n');
                Ok(())
            })?;
        }
        out.sync()?;
        fault("lines", chunk_no);
        match center.provision(&ids, args.class, Some(suite), 0, &args.actor, t) {
            Ok(_keys) => {}
            Err(Error::AlreadyRegistered { .. }) => {
                // An id already taken: forget the chunk's lines, draw again.
                out.truncate(mark)?;
                continue;
            }
            Err(e) => return Err(e).context("cannot register the devices"),
        }
        fault("commit", chunk_no);
        made += n;
        chunk_no += 1;
        bar.inc(n as u64);
    }
    out.finish()?;
    fault("rename", 0);
    std::fs::rename(&partial, &path)?;
    sync_dir(&args.out)?;
    bar.finish_and_clear();
    say!("{} chips written to {}", args.count, path.display());
    Ok(())
}

/// `factory provision --recover`: the lines of an interrupted run's
/// partial file whose device is registered with the line's class and
/// epoch, written to chips.jsonl (temporary file, sync, rename).
fn recover(center: &microcert_center::Center, partial: &Path, path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        bail!("{} exists: nothing to recover", path.display());
    }
    let input = std::fs::File::open(partial)
        .with_context(|| format!("cannot open {}", partial.display()))?;
    let tmp = partial.with_extension("recovering");
    let _ = std::fs::remove_file(&tmp);
    let mut out = SecretLines::new(create_secret_file(&tmp)?);
    let (mut kept, mut dropped) = (0u64, 0u64);
    let mut reader = std::io::BufReader::new(input);
    let mut text = Zeroizing::new(Vec::with_capacity(LINE_MAX));
    loop {
        text.clear();
        // Lines are short; a longer one is not ours, and reading stops there
        // (what was read so far is kept).
        if (&mut reader)
            .take(LINE_MAX as u64)
            .read_until(b'\n', &mut text)?
            == 0
        {
            break;
        }
        let Ok(line) = serde_json::from_slice::<FactoryLine<'_>>(text.trim_ascii_end()) else {
            dropped += 1; // a line cut by the kill
            continue;
        };
        let mut id = [0u8; 8];
        let registered = hex::decode_to_slice(line.device_id.as_bytes(), &mut id).is_ok()
            && center
                .device(DeviceId(id))?
                .is_some_and(|d| d.device.class == line.class && d.device.epoch == line.epoch);
        if registered {
            out.line(|b| {
                b.extend_from_slice(text.trim_ascii_end());
                b.push(b'\n');
                Ok(())
            })?;
            kept += 1;
        } else {
            dropped += 1;
        }
    }
    out.finish()?;
    std::fs::rename(&tmp, path)?;
    std::fs::remove_file(partial)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    say!(
        "{kept} chips written to {} ({dropped} lines of devices never registered dropped)",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffer never grows (no copy left behind by a reallocation) and
    /// is all zeros, over its whole capacity, after each write to the file.
    #[test]
    #[allow(unsafe_code)] // reads the spare capacity: the only way to see it
    fn the_line_buffer_is_zeroized_after_writing() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("chips.jsonl")).unwrap();
        let mut w = SecretLines::new(file);
        let cap = w.buf.capacity();
        let secret = "ab".repeat(16);
        for _ in 0..1000 {
            w.line(|b| writeln!(b, "{{\"transport_key\": \"{secret}\"}}"))
                .unwrap();
            assert_eq!(w.buf.capacity(), cap, "the buffer grew");
        }
        w.flush().unwrap();
        assert!(w.buf.is_empty());
        // SAFETY: the whole capacity was written (lines, then zeros by
        // zeroize), so every byte is initialised.
        let all = unsafe { std::slice::from_raw_parts(w.buf.as_ptr(), cap) };
        assert!(
            all.iter().all(|&b| b == 0),
            "secret bytes left in the buffer"
        );
        w.finish().unwrap();
        let text = std::fs::read_to_string(dir.path().join("chips.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 1000);
    }
}
