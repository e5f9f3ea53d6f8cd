//! `microcert node`: act as one simulated node (a chip image that
//! `simulate --state DIR` keeps), e.g. to sign data for a relying party.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use microcert_core::DataDigest;
use microcert_node::{EntropyFailure, SecureChip, SoftChip};

/// Node commands.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Sign a file with a node's chip and write SIGNATURE || data, the body
    /// a relying party posts to /v1/verify.
    Sign {
        /// The directory of chip images (`simulate --state DIR`).
        #[arg(long)]
        state: PathBuf,
        /// The device id, 16 hex digits.
        #[arg(long)]
        device: String,
        /// The data to sign.
        #[arg(long)]
        data: PathBuf,
        /// Where to write SIGNATURE || data.
        #[arg(long)]
        out: PathBuf,
    },
}

fn os_entropy(buf: &mut [u8]) -> Result<(), EntropyFailure> {
    getrandom::fill(buf).map_err(|_| EntropyFailure)
}

/// Runs a node command.
pub fn run(cmd: NodeCommand) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::Sign {
            state,
            device,
            data,
            out,
        } => {
            crate::hexarg::hex8(&device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
            let path = state.join(format!("{}.img", device.to_lowercase()));
            let image = zeroize::Zeroizing::new(
                std::fs::read(&path)
                    .with_context(|| format!("no chip image {}", path.display()))?,
            );
            let mut chip = SoftChip::from_image(&image, os_entropy)
                .map_err(|e| anyhow::anyhow!("chip image {}: {e}", path.display()))?;
            let bytes =
                std::fs::read(&data).with_context(|| format!("cannot read {}", data.display()))?;
            let mut digest = DataDigest::new();
            digest.update(&bytes);
            let mut sig = [0u8; 64];
            let now = microcert_server::service::now();
            let n = chip
                .sign(u32::try_from(now).unwrap_or(u32::MAX), digest, &mut sig)
                .map_err(|e| anyhow::anyhow!("the chip refused to sign: {e}"))?;
            // The r counter moved: store the image before the signature leaves.
            let mut img = zeroize::Zeroizing::new([0u8; microcert_node::IMAGE_LEN]);
            chip.to_image(&mut img);
            crate::cert::write_secret_file_replace(&path, &img[..])?;
            let mut body = sig[..n].to_vec();
            body.extend_from_slice(&bytes);
            std::fs::write(&out, &body)
                .with_context(|| format!("cannot write {}", out.display()))?;
            say!("{} bytes: a {n}-byte SIGNATURE and the data", body.len());
        }
    }
    Ok(())
}
