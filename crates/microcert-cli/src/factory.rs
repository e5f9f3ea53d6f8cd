//! `microcert factory provision`: what a manufacturer gets. Registers N new
//! device ids with the center and writes the personalization file of
//! PROTOCOL.md section 9 (JSON Lines, mode 0600).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
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
    #[arg(long)]
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

    fn finish(mut self) -> anyhow::Result<()> {
        self.flush()?;
        self.file.sync_all()?;
        Ok(())
    }
}

/// Runs `factory provision`.
pub fn provision(args: ProvisionArgs) -> anyhow::Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let r = args.cfg.resolve()?;
    let center = r.open_center(Open {
        access: Access::Write,
        create_db: true,
        create_card: true,
        dev: false,
        center: CenterConfig::default(),
    })?;
    create_private_dir(&args.out)?;
    let path = args.out.join("chips.jsonl");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let file = opts
        .open(&path)
        .with_context(|| format!("cannot create {} (it must not exist)", path.display()))?;
    let mut out = SecretLines::new(file);
    let bar = indicatif::ProgressBar::new(u64::from(args.count));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} chips {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut made = 0;
    while made < args.count {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("OS random generator: {e}"))?;
        let id = DeviceId(id);
        let t = now();
        let row = match center.register_device(id, args.class, None, 0, &args.actor, t) {
            Ok(row) => row,
            Err(Error::AlreadyRegistered { .. }) => continue, // id taken: draw another
            Err(e) => return Err(e).context("cannot register the device"),
        };
        let ktr = center.factory_transport_key(id, &args.actor, t)?;
        let mut ktr_hex = Zeroizing::new([0u8; 32]);
        hex::encode_to_slice(ktr.expose(), &mut ktr_hex[..])?;
        let ktr_hex = std::str::from_utf8(&ktr_hex[..])?;
        out.line(|b| {
            writeln!(
                b,
                "{{\"device_id\": \"{id}\", \"epoch\": {}, \"transport_key\": \"{ktr_hex}\", \"class\": {}, \"suite\": {}, \"issued\": {t}}}",
                row.epoch,
                row.class,
                row.suite.id(),
            )
        })?;
        made += 1;
        bar.inc(1);
    }
    out.finish()?;
    bar.finish_and_clear();
    say!("{} chips written to {}", args.count, path.display());
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
