//! `microcert card`: the software encryption card of a data directory.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use microcert_center::card::{KdfParams, SoftwareCard};

use crate::datadir::DataArgs;

/// Card commands (local: they work on the data directory, not over HTTP).
#[derive(Debug, Subcommand)]
pub enum CardCommand {
    /// Make the card's keys from the OS random generator and seal them in
    /// the data directory under the passphrase (Argon2id).
    Init {
        #[command(flatten)]
        data: DataArgs,
        /// Make the keys inside a PKCS#11 token instead: the `serve`
        /// configuration file whose `[pkcs11]` section names the module,
        /// token and PIN source. Keys are sensitive and not extractable.
        #[arg(long, value_name = "CONFIG")]
        pkcs11: Option<PathBuf>,
    },
    /// Print the card's keys as M-of-N Shamir shares, one per line, for
    /// N custodians; any M of them recover the card.
    Split {
        #[command(flatten)]
        data: DataArgs,
        /// How many shares to make (N).
        #[arg(long, default_value_t = 5)]
        shares: u8,
        /// How many shares recover the card (M).
        #[arg(long, default_value_t = 3)]
        threshold: u8,
    },
    /// Rebuild the card file from shares (one per line, from FILE or
    /// standard input), sealed under the passphrase.
    Recover {
        #[command(flatten)]
        data: DataArgs,
        /// A file with the shares, one per line; standard input if absent.
        #[arg(long, value_name = "FILE")]
        shares_file: Option<PathBuf>,
    },
}

/// Runs a card command.
pub fn run(cmd: CardCommand) -> anyhow::Result<()> {
    match cmd {
        CardCommand::Init {
            data: _,
            pkcs11: Some(config),
        } => {
            let file = crate::serve::load_config(Some(&config))?;
            let Some(cfg) = file.pkcs11 else {
                bail!("{} has no [pkcs11] section", config.display());
            };
            let card = microcert_pkcs11::Pkcs11Card::init(&cfg).with_context(|| {
                format!("cannot make the card's keys in token {:?}", cfg.token_label)
            })?;
            say!("card keys made in PKCS#11 token {:?}", card.token_label());
        }
        CardCommand::Init { data, pkcs11: None } => {
            let pass = data.passphrase()?;
            data.create()?;
            let card = SoftwareCard::init(&data.card_file(), &pass, KdfParams::default())
                .context("cannot initialise the card")?;
            say!(
                "card {} initialised in {}",
                card.card_id(),
                data.card_file().display()
            );
        }
        CardCommand::Split {
            data,
            shares,
            threshold,
        } => {
            let pass = data.passphrase()?;
            let card =
                SoftwareCard::open(&data.card_file(), &pass).context("cannot open the card")?;
            let lines = card.split(shares, threshold)?;
            eprintln!(
                "{shares} shares of card {}; any {threshold} recover it. Give each to one custodian.",
                card.card_id()
            );
            for line in lines {
                say!("{line}");
            }
        }
        CardCommand::Recover { data, shares_file } => {
            let pass = data.passphrase()?;
            if data.card_file().exists() {
                bail!(
                    "{} exists: recover into a data directory without a card",
                    data.card_file().display()
                );
            }
            let text = match &shares_file {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
                None => {
                    let mut s = String::new();
                    for line in std::io::stdin().lock().lines() {
                        s.push_str(&line?);
                        s.push('\n');
                    }
                    s
                }
            };
            let shares: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let card = SoftwareCard::recover(&shares).context("cannot recover the card")?;
            data.create()?;
            card.save(&data.card_file(), &pass, KdfParams::default())?;
            say!(
                "card {} recovered into {}",
                card.card_id(),
                data.card_file().display()
            );
        }
    }
    Ok(())
}
