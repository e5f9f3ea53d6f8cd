//! The connection string: a `postgres://` URL or a libpq key/value string
//! (`host=... user=... dbname=...`), with the settings tokio-postgres does
//! not read taken out first: `sslmode` (libpq's six values), `sslrootcert`,
//! `passfile`, and the pool's own `pool_size`, `checkout_timeout` and
//! `statement_timeout` (seconds). The password comes from the string or
//! else from the password file (`passfile`, `PGPASSFILE`, `~/.pgpass`),
//! read the way libpq reads it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::{DbFailure, Error, Result};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// Plain TCP only (libpq: TLS if the server insists; this backend
    /// never asks for it).
    Allow,
    /// TLS when the server offers it, else plain; the certificate is not
    /// checked (libpq's default).
    Prefer,
    /// TLS or no connection; the certificate is not checked unless
    /// `sslrootcert` is given (then as verify-ca, as libpq does).
    Require,
    /// TLS, the server's certificate chains to `sslrootcert`.
    VerifyCa,
    /// As verify-ca, and the certificate names the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::db(
                    DbFailure::Config,
                    format!(
                        "invalid PostgreSQL sslmode {other:?}: expected disable, allow, prefer, \
                     require, verify-ca or verify-full"
                    ),
                ));
            }
        })
    }
}

/// What was taken out of the connection string.
#[derive(Debug, Clone, Default)]
pub(super) struct Extras {
    pub sslmode: Option<SslMode>,
    pub sslrootcert: Option<PathBuf>,
    pub passfile: Option<PathBuf>,
    pub pool_size: Option<usize>,
    pub checkout_timeout: Option<Duration>,
    pub statement_timeout: Option<Duration>,
    /// Whether the string set `target_session_attrs` itself.
    pub session_attrs: bool,
}

impl Extras {
    fn take(&mut self, key: &str, value: &str) -> Result<bool> {
        let secs = |v: &str| -> Result<Duration> {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e6)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| {
                    Error::db(
                        DbFailure::Config,
                        format!("invalid PostgreSQL {key} {v:?}: expected seconds > 0"),
                    )
                })
        };
        match key {
            "sslmode" => self.sslmode = Some(SslMode::parse(value)?),
            "sslrootcert" => self.sslrootcert = Some(PathBuf::from(value)),
            "passfile" => self.passfile = Some(PathBuf::from(value)),
            "pool_size" => {
                self.pool_size = Some(
                    value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=1000).contains(n))
                        .ok_or_else(|| {
                            Error::db(
                                DbFailure::Config,
                                format!(
                                    "invalid PostgreSQL pool_size {value:?}: expected 1..=1000"
                                ),
                            )
                        })?,
                )
            }
            "checkout_timeout" => self.checkout_timeout = Some(secs(value)?),
            "statement_timeout" => self.statement_timeout = Some(secs(value)?),
            "target_session_attrs" => {
                self.session_attrs = true;
                return Ok(false);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits the connection string into what tokio-postgres parses and the
/// [`Extras`].
pub(super) fn split(s: &str) -> Result<(String, Extras)> {
    let mut ex = Extras::default();
    let s = s.trim();
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        let Some((base, query)) = s.split_once('?') else {
            return Ok((s.to_string(), ex));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !ex.take(&pct_decode(k), &pct_decode(v))? {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, ex));
    }
    // key = value pairs; a value may be 'quoted' and use \ escapes.
    let b = s.as_bytes();
    let mut i = 0;
    let mut kept: Vec<&str> = Vec::new();
    let ws = |c: u8| c.is_ascii_whitespace();
    while i < b.len() {
        while i < b.len() && ws(b[i]) {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !ws(b[i]) {
            i += 1;
        }
        let key = &s[start..i];
        while i < b.len() && ws(b[i]) {
            i += 1;
        }
        if i >= b.len() || b[i] != b'=' {
            return Err(Error::db(
                DbFailure::Config,
                format!("invalid PostgreSQL connection string: {key:?} has no value"),
            ));
        }
        i += 1;
        while i < b.len() && ws(b[i]) {
            i += 1;
        }
        let mut value = Vec::new();
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            loop {
                match b.get(i) {
                    None => {
                        return Err(Error::db(
                            DbFailure::Config,
                            "invalid PostgreSQL connection string: unterminated quote",
                        ));
                    }
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < b.len() => {
                        value.push(b[i + 1]);
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !ws(b[i]) {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
        }
        let value = String::from_utf8_lossy(&value).into_owned();
        if !ex.take(key, &value)? {
            kept.push(&s[start..i]);
        }
    }
    Ok((kept.join(" "), ex))
}

/// One `.pgpass` field: `\` escapes the next character; `*` alone matches
/// anything.
fn pgpass_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(n), Some(f)) = (chars.next(), fields.last_mut()) {
                    f.push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(f) = fields.last_mut() {
                    f.push(c)
                }
            }
        }
    }
    fields
}

/// The password of the first line of a `.pgpass` text matching (host,
/// port, database, user), libpq's rules.
pub(super) fn pgpass_lookup(
    text: &str,
    host: &str,
    port: u16,
    db: &str,
    user: &str,
) -> Option<String> {
    let port = port.to_string();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f = pgpass_fields(line);
        if f.len() != 5 {
            continue;
        }
        let m = |pat: &str, v: &str| pat == "*" || pat == v;
        if m(&f[0], host) && m(&f[1], &port) && m(&f[2], db) && m(&f[3], user) {
            return Some(f[4].clone());
        }
    }
    None
}

/// Where the password file is: `passfile`, else `PGPASSFILE`, else
/// `~/.pgpass`.
fn pgpass_path(ex: &Extras) -> Option<PathBuf> {
    if let Some(p) = &ex.passfile {
        return Some(p.clone());
    }
    if let Some(p) = std::env::var_os("PGPASSFILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass"))
}

/// Fills in the password from the password file when the connection
/// string has none. A file that group or others can read is ignored with
/// a warning, as libpq does.
pub(super) fn apply_pgpass(config: &mut tokio_postgres::Config, ex: &Extras) -> Result<()> {
    if config.get_password().is_some() {
        return Ok(());
    }
    let Some(path) = pgpass_path(ex) else {
        return Ok(());
    };
    let Ok(meta) = std::fs::metadata(&path) else {
        return Ok(());
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "PostgreSQL password file has group or world access; ignored (chmod 0600 it)"
            );
            return Ok(());
        }
    }
    if !meta.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::db(
            DbFailure::Config,
            format!("PostgreSQL password file {}: {e}", path.display()),
        )
    })?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(_)) => "localhost".to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("").to_string();
    let db = config.get_dbname().unwrap_or(&user).to_string();
    if let Some(pw) = pgpass_lookup(&text, &host, port, &db, &user) {
        config.password(pw);
    }
    Ok(())
}

/// The TLS connector for `mode` (None: no TLS at all).
pub(super) fn tls(
    mode: SslMode,
    rootcert: Option<&Path>,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>> {
    use rustls::ClientConfig;
    let mode = match (mode, rootcert) {
        (SslMode::Disable | SslMode::Allow, _) => return Ok(None),
        // libpq: require with a root certificate checks the chain.
        (SslMode::Require, Some(_)) => SslMode::VerifyCa,
        (m, _) => m,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::db(DbFailure::Config, format!("PostgreSQL TLS: {e}")))?;
    let config = match mode {
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let path = rootcert.map(Path::to_path_buf).or_else(|| {
                std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql/root.crt"))
            });
            let Some(path) = path.filter(|p| p.exists()) else {
                return Err(Error::db(
                    DbFailure::Config,
                    "PostgreSQL sslmode verify-ca/verify-full needs sslrootcert (a PEM file of \
                     the CA certificates to trust)",
                ));
            };
            let roots = load_roots(&path)?;
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                provider.clone(),
            )
            .build()
            .map_err(|e| Error::db(DbFailure::Config, format!("PostgreSQL TLS roots: {e}")))?;
            let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> =
                if mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(verify::Lenient {
                        provider,
                        chain: Some(webpki),
                    })
                };
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::Lenient {
                provider,
                chain: None,
            }))
            .with_no_client_auth(),
    };
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

fn load_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
        Error::db(
            DbFailure::Config,
            format!("PostgreSQL sslrootcert {}: {e}", path.display()),
        )
    })?;
    for c in certs {
        let c = c.map_err(|e| {
            Error::db(
                DbFailure::Config,
                format!("PostgreSQL sslrootcert {}: {e}", path.display()),
            )
        })?;
        roots.add(c).map_err(|e| {
            Error::db(
                DbFailure::Config,
                format!("PostgreSQL sslrootcert {}: {e}", path.display()),
            )
        })?;
    }
    if roots.is_empty() {
        return Err(Error::db(
            DbFailure::Config,
            format!(
                "PostgreSQL sslrootcert {}: no certificate in it",
                path.display()
            ),
        ));
    }
    Ok(Arc::new(roots))
}

mod verify {
    use std::sync::Arc;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

    /// A verifier looser than rustls's own, as libpq's sslmodes are. Without
    /// `chain` (sslmode=prefer/require without a root certificate): the
    /// connection is encrypted, the certificate not checked (the
    /// handshake's signatures still are). With it (sslmode=verify-ca): the
    /// chain must lead to a trusted root; the name is not compared (rustls
    /// checks the chain before the name, so a name mismatch means the chain
    /// was good).
    #[derive(Debug)]
    pub struct Lenient {
        /// The signature algorithms of the handshake.
        pub provider: Arc<CryptoProvider>,
        /// The trusted roots' verifier, None to accept any certificate.
        pub chain: Option<Arc<WebPkiServerVerifier>>,
    }

    impl Lenient {
        fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
            &self.provider.signature_verification_algorithms
        }
    }

    impl ServerCertVerifier for Lenient {
        fn verify_server_cert(
            &self,
            end: &CertificateDer<'_>,
            inter: &[CertificateDer<'_>],
            name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let Some(chain) = &self.chain else {
                return Ok(ServerCertVerified::assertion());
            };
            match chain.verify_server_cert(end, inter, name, ocsp, now) {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, self.algorithms())
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, self.algorithms())
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms().supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_strings_lose_only_the_extras() {
        let (rest, ex) = split(
            "host=db.example user=mc dbname='key db' sslmode=verify-full \
             sslrootcert=/etc/ca.pem statement_timeout=2.5 pool_size=8 password='a\\'b'",
        )
        .unwrap();
        assert_eq!(
            rest,
            "host=db.example user=mc dbname='key db' password='a\\'b'"
        );
        assert_eq!(ex.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(ex.sslrootcert.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(ex.statement_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(ex.pool_size, Some(8));
        let c: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(c.get_dbname(), Some("key db"));
        assert_eq!(c.get_password(), Some(&b"a'b"[..]));
    }

    #[test]
    fn url_query_extras() {
        let (rest, ex) =
            split("postgres://mc@h:5433/db?sslmode=require&connect_timeout=3&checkout_timeout=1")
                .unwrap();
        assert_eq!(rest, "postgres://mc@h:5433/db?connect_timeout=3");
        assert_eq!(ex.sslmode, Some(SslMode::Require));
        assert_eq!(ex.checkout_timeout, Some(Duration::from_secs(1)));
        assert!(split("host=h sslmode=bogus").is_err());
        assert!(split("host=h statement_timeout=-1").is_err());
        assert!(split("host=h dbname='open").is_err());
        assert!(split("host").is_err());
    }

    #[test]
    fn pgpass_matching() {
        let text = "# comment\n\
                    other:5432:*:mc:wrong\n\
                    db\\:x:*:keys:mc:first\\:pw\n\
                    *:5432:*:mc:fallback\n";
        assert_eq!(
            pgpass_lookup(text, "db:x", 6000, "keys", "mc").as_deref(),
            Some("first:pw")
        );
        assert_eq!(
            pgpass_lookup(text, "h", 5432, "keys", "mc").as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup(text, "h", 5433, "keys", "mc"), None);
        assert_eq!(pgpass_lookup(text, "h", 5432, "keys", "other"), None);
    }

    #[test]
    fn pgpass_file_is_read_only_when_private() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(&file, "127.0.0.1:5432:keys:mc:s3cret\n").unwrap();
        let ex = Extras {
            passfile: Some(file.clone()),
            ..Extras::default()
        };
        let cfg =
            || -> tokio_postgres::Config { "host=127.0.0.1 user=mc dbname=keys".parse().unwrap() };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            let mut c = cfg();
            apply_pgpass(&mut c, &ex).unwrap();
            assert_eq!(c.get_password(), None, "a world-readable file is ignored");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let mut c = cfg();
        apply_pgpass(&mut c, &ex).unwrap();
        assert_eq!(c.get_password(), Some(&b"s3cret"[..]));
        // A password in the string wins.
        let mut c: tokio_postgres::Config = "host=127.0.0.1 user=mc dbname=keys password=given"
            .parse()
            .unwrap();
        apply_pgpass(&mut c, &ex).unwrap();
        assert_eq!(c.get_password(), Some(&b"given"[..]));
    }
}
