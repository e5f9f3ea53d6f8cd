//! `microcert token create | list | revoke`: bearer tokens in the key
//! database (issue 14), shared by every center on it. Each command first
//! moves a legacy `DATA/tokens.json` into the database.

use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::Subcommand;
use microcert_server::tokens::{self, Role};

use crate::binding::Access;
use crate::config::{self, Open};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it (only the token, once; it is stored hashed).
    Create {
        #[command(flatten)]
        cfg: config::ConfigArgs,
        /// What the token may do.
        #[arg(long, value_enum)]
        role: crate::config::RoleArg,
        /// Who holds it; for a verifier, the relying party's name (its audience).
        #[arg(long)]
        name: String,
        /// How long it is valid: seconds, or a number with s, m, h or d
        /// (e.g. 90d). Without it, until revoked.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
    },
    /// List the tokens (never the tokens themselves): name, role, status,
    /// created, expires, last used, refused presentations.
    List {
        #[command(flatten)]
        cfg: config::ConfigArgs,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke every token with this name (of this role when given); every
    /// center refuses them within a second.
    Revoke {
        #[command(flatten)]
        cfg: config::ConfigArgs,
        /// The tokens' name.
        #[arg(long)]
        name: String,
        /// Only the tokens of this role.
        #[arg(long, value_enum)]
        role: Option<crate::config::RoleArg>,
    },
}

/// A duration in seconds: `N`, `Ns`, `Nm`, `Nh` or `Nd`, at least 1 s.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 3600, 90m, 12h, 30d)"))?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("{s:?}: the unit is one of s, m, h, d")),
    };
    match n.checked_mul(mult) {
        Some(0) => Err("a time to live is at least 1 s".into()),
        Some(v) => Ok(v),
        None => Err(format!("{s:?} is too long")),
    }
}

pub(crate) fn actor() -> String {
    match std::env::var("USER") {
        Ok(u) if !u.is_empty() && u.len() <= 64 && !u.chars().any(char::is_control) => {
            format!("cli:{u}")
        }
        _ => "cli".to_owned(),
    }
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn run(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            cfg,
            role,
            name,
            ttl,
        } => {
            let r = cfg.resolve()?;
            // The card must exist (`card init` or the first `serve` makes
            // it); the database is made if missing.
            let center = r.open_center(Open {
                create_db: true,
                ..Open::maintenance(Access::Write)
            })?;
            tokens::migrate_file(&center, &r.data_dir)?;
            let token = tokens::create(&center, role.into(), &name, ttl, &actor())
                .context("cannot create the token")?;
            say!("{}", token.as_str());
        }
        TokenCommand::List { cfg, json } => {
            let r = cfg.resolve()?;
            let center = r.open_center(Open::maintenance(Access::Write))?;
            tokens::migrate_file(&center, &r.data_dir)?;
            let t = now();
            let rows = center.list_tokens(t)?;
            if !json {
                say!(
                    "{:<24} {:<9} {:<8} {:<10} {:<10} {:<10} {:<10} {}",
                    "NAME",
                    "ROLE",
                    "STATUS",
                    "ID",
                    "CREATED",
                    "EXPIRES",
                    "LAST USED",
                    "REFUSED"
                );
            }
            for (row, status) in rows {
                if json {
                    say!(
                        "{}",
                        serde_json::json!({
                            "name": row.name,
                            "role": row.role,
                            "status": status.name(),
                            "id": &row.hash[..8],
                            "created": row.created,
                            "expires": row.expires,
                            "revoked": row.revoked,
                            "last_used": row.last_used,
                            "refused": row.failures,
                        })
                    );
                } else {
                    let o = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
                    say!(
                        "{:<24} {:<9} {:<8} {:<10} {:<10} {:<10} {:<10} {}",
                        row.name,
                        row.role,
                        status.name(),
                        &row.hash[..8],
                        row.created,
                        o(row.expires),
                        o(row.last_used),
                        row.failures
                    );
                }
            }
        }
        TokenCommand::Revoke { cfg, name, role } => {
            let r = cfg.resolve()?;
            let center = r.open_center(Open::maintenance(Access::Write))?;
            tokens::migrate_file(&center, &r.data_dir)?;
            let n =
                center.revoke_tokens(&name, role.map(|r| Role::from(r).name()), &actor(), now())?;
            if n == 0 {
                bail!("no unrevoked token named {name:?}");
            }
            say!("revoked {n} token(s) named {name:?}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_ttl;

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("3600"), Ok(3600));
        assert_eq!(parse_ttl("90m"), Ok(5400));
        assert_eq!(parse_ttl("2d"), Ok(172_800));
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("abc").is_err());
        assert!(parse_ttl("99999999999999999999d").is_err());
    }
}
