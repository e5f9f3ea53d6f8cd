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

use crate::datadir::{DataArgs, create_private_dir};

/// Arguments of `factory provision`.
#[derive(Debug, Args)]
pub struct ProvisionArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// How many chips.
    #[arg(long)]
    pub count: u32,
    /// RFC 7228 device class (1, 2 or 3): selects the suite and limits.
    #[arg(long, default_value_t = 1)]
    pub class: u8,
    /// Directory for chips.jsonl (created, mode 0700).
    #[arg(long)]
    pub out: PathBuf,
    /// The configuration file of `serve` (for a `[pkcs11]` card).
    #[arg(long, env = "MICROCERT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The operator name written to the audit log.
    #[arg(long, default_value = "factory")]
    pub actor: String,
}

/// Runs `factory provision`.
pub fn provision(args: ProvisionArgs) -> anyhow::Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let file = crate::serve::load_config(args.config.as_deref())?;
    let center = crate::serve::open_center(
        &args.data,
        false,
        file.pkcs11.as_ref(),
        CenterConfig::default(),
    )?;
    create_private_dir(&args.out)?;
    let path = args.out.join("chips.jsonl");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let file = opts
        .open(&path)
        .with_context(|| format!("cannot create {} (it must not exist)", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
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
            Err(Error::Refused(_)) => continue, // id already taken: draw another
            Err(e) => return Err(e).context("cannot register the device"),
        };
        let ktr = center.factory_transport_key(id, &args.actor, t)?;
        let line = zeroize::Zeroizing::new(format!(
            "{{\"device_id\": \"{id}\", \"epoch\": {}, \"transport_key\": \"{}\", \"class\": {}, \"suite\": {}, \"issued\": {t}}}\n",
            row.epoch,
            hex::encode(ktr.expose()),
            row.class,
            row.suite.id(),
        ));
        out.write_all(line.as_bytes())?;
        made += 1;
        bar.inc(1);
    }
    out.flush()?;
    out.get_ref().sync_all()?;
    bar.finish_and_clear();
    say!("{} chips written to {}", args.count, path.display());
    Ok(())
}
