//! `microcert`: the command-line front of the microcert key management
//! system. Libraries return typed errors; this binary prints the chain.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `println!` that ends the process quietly when stdout is gone (a closed
/// pipe, as in `microcert demo | head`), instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(141);
        }
    }};
}

mod binding;
mod card;
mod cert;
mod config;
mod datadir;
mod demo;
mod docsgen;
mod factory;
mod hexarg;
mod loadgen;
mod maint;
mod nodecmd;
mod ops;
mod serve;
mod simulate;
mod tokencmd;

/// microcert: symmetric micro-certificates and key management for IoT fleets.
#[derive(Debug, Parser)]
#[command(
    name = "microcert",
    version,
    about = "microcert: symmetric micro-certificates and key management for IoT fleets",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Offline tools: make, verify, open and inspect micro-certificates.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// Run the center: CoAP and HTTP for devices, HTTP for relying parties and operators.
    Serve(serve::ServeArgs),
    /// What a manufacturer gets: personalization files for new chips.
    #[command(subcommand)]
    Factory(FactoryCommand),
    /// Devices over the operator API: list, show, life cycle, updates.
    #[command(subcommand)]
    Device(ops::DeviceCommand),
    /// Import a factory batch (JSON Lines of ENROLLs) through the center.
    Import {
        #[command(flatten)]
        server: ops::ServerArgs,
        /// The batch file.
        file: std::path::PathBuf,
    },
    /// The audit log: verify the hash chain, export, list.
    #[command(subcommand)]
    Audit(AuditTop),
    /// Integrity of the key database.
    #[command(subcommand)]
    Integrity(IntegrityCommand),
    /// The center's clock: status, confirm a step.
    #[command(subcommand)]
    Clock(ops::ClockCommand),
    /// Software nodes from a factory file live against a running center.
    Simulate(simulate::SimulateArgs),
    /// Load a running center with AUTHs from many nodes; print throughput and latency.
    Bench(loadgen::BenchArgs),
    /// Act as one simulated node from its chip image (e.g. sign data).
    #[command(subcommand)]
    Node(nodecmd::NodeCommand),
    /// Backups of the key database: create, verify, restore.
    #[command(subcommand)]
    Backup(maint::BackupCommand),
    /// The encryption card: init, split into shares, recover, rotate the storage key.
    #[command(subcommand)]
    Card(CardTop),
    /// Bearer tokens for operators and relying parties.
    #[command(subcommand)]
    Token(tokencmd::TokenCommand),
    /// Issue and check every message type in one process, and print them.
    Demo {
        /// The suite: 1 (8-byte tags) or 2 (16-byte tags).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        suite: u8,
    },
    /// Shell completions on stdout (e.g. `microcert completions bash > /etc/bash_completion.d/microcert`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Man pages, one per command (`microcert.1`, `microcert-serve.1`, ...), written into a directory.
    Man {
        /// The directory (made if missing).
        dir: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum IntegrityCommand {
    /// Recompute every record tag and the card digest; exit 1 if anything
    /// does not match, naming the records.
    Check {
        #[command(flatten)]
        server: ops::ServerArgs,
    },
    /// The same on a data directory, with the audit log's card-tagged head
    /// and the card's anchor (an older copy of the whole database).
    CheckLocal {
        #[command(flatten)]
        local: config::ConfigArgs,
    },
    /// Put tampered, deleted or forged records right from the backups,
    /// only where the card's digest vouches for the result; exit 1 if
    /// anything was refused (each refusal says why).
    Repair {
        #[command(flatten)]
        local: config::ConfigArgs,
        /// The backup directory (default DATA/backups).
        #[arg(long, value_name = "DIR")]
        backup_dir: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditTop {
    #[command(flatten)]
    Remote(ops::AuditCommand),
    #[command(flatten)]
    Local(maint::LocalAuditCommand),
}

#[derive(Debug, Subcommand)]
enum CardTop {
    #[command(flatten)]
    Base(card::CardCommand),
    /// Make a new storage-key version and re-seal every seed under it
    /// (resumes an interrupted rotation); destroy old versions nothing uses.
    RotateStorageKey(maint::RotateArgs),
}

fn exit_ok(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[derive(Debug, Subcommand)]
enum FactoryCommand {
    /// Register N new device ids and write DIR/chips.jsonl (mode 0600).
    Provision(factory::ProvisionArgs),
}

/// An action's outcome: success, or its error with exit status 1.
fn done(r: anyhow::Result<()>) -> Result<ExitCode, (anyhow::Error, ExitCode)> {
    r.map(|()| ExitCode::SUCCESS)
        .map_err(|e| (e, ExitCode::FAILURE))
}

/// A check's outcome: 0 when it passed, 1 when it found something, 2 when
/// it could not run.
fn checked(r: anyhow::Result<bool>) -> Result<ExitCode, (anyhow::Error, ExitCode)> {
    r.map(exit_ok).map_err(|e| (e, ExitCode::from(2)))
}

fn main() -> ExitCode {
    // One TLS crypto provider for the process (HTTP clients and the server).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Cert(cmd) => cert::run(cmd).map_err(|e| (e, ExitCode::from(2))),
        Command::Serve(args) => done(serve::run(args)),
        Command::Factory(FactoryCommand::Provision(args)) => done(factory::provision(args)),
        Command::Device(cmd) => done(ops::device(cmd)),
        Command::Import { server, file } => done(ops::import(&server, &file)),
        Command::Audit(AuditTop::Local(cmd)) => checked(maint::audit(cmd)),
        Command::Audit(AuditTop::Remote(cmd)) => checked(ops::audit(cmd)),
        Command::Integrity(IntegrityCommand::CheckLocal { local }) => {
            checked(maint::integrity_check(&local))
        }
        Command::Integrity(IntegrityCommand::Repair { local, backup_dir }) => {
            checked(maint::integrity_repair(&local, backup_dir))
        }
        Command::Integrity(IntegrityCommand::Check { server }) => checked(ops::integrity(&server)),
        Command::Clock(cmd) => checked(ops::clock(cmd)),
        Command::Simulate(args) => done(simulate::run(args)),
        Command::Bench(args) => done(loadgen::run(args)),
        Command::Node(cmd) => done(nodecmd::run(cmd)),
        Command::Backup(cmd) => done(maint::backup(cmd)),
        Command::Card(CardTop::RotateStorageKey(args)) => done(maint::rotate_storage_key(args)),
        Command::Card(CardTop::Base(cmd)) => done(card::run(cmd)),
        Command::Token(cmd) => done(tokencmd::run(cmd)),
        Command::Demo { suite } => done(demo::run(suite)),
        Command::Completions { shell } => done(docsgen::completions::<Cli>(shell)),
        Command::Man { dir } => done(docsgen::man_pages::<Cli>(&dir)),
    };
    match result {
        Ok(code) => code,
        Err((e, code)) => {
            eprintln!("error: {e:#}");
            code
        }
    }
}
