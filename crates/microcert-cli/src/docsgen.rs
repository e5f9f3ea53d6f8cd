//! Shell completions and man pages, generated from the command-line
//! definition itself (clap_complete, clap_mangen), so they never drift
//! from the binary.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

/// Writes `shell`'s completion script for the whole command tree to stdout.
pub fn completions<C: CommandFactory>(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut cmd = C::command();
    let name = cmd.get_name().to_string();
    // Into memory first: clap_complete panics on a write error, and a
    // closed pipe (`| head`) must end the process quietly instead.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    use std::io::Write as _;
    if std::io::stdout().write_all(&script).is_err() {
        std::process::exit(141);
    }
    Ok(())
}

/// Writes one man page per command and subcommand into `dir`:
/// `microcert.1`, `microcert-serve.1`, `microcert-card-init.1`, ...
pub fn man_pages<C: CommandFactory>(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    let cmd = C::command();
    let mut written = 0usize;
    write_tree(&cmd, cmd.get_name().to_string(), dir, &mut written)?;
    say!("{written} man pages written to {}", dir.display());
    Ok(())
}

fn write_tree(cmd: &clap::Command, name: String, dir: &Path, n: &mut usize) -> anyhow::Result<()> {
    let page = cmd.clone().name(name.clone());
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    *n += 1;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_tree(sub, format!("{name}-{}", sub.get_name()), dir, n)?;
    }
    Ok(())
}
