//! Operator commands over the center's HTTP API: they print tables, or the
//! API's JSON with `--json`.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use comfy_table::{ContentArrangement, Table, presets::UTF8_BORDERS_ONLY};
use serde_json::{Value, json};

/// Where the center is and who asks.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The center's HTTP address.
    #[arg(
        long,
        env = "MICROCERT_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// A bearer token (see `microcert token create`).
    #[arg(long, env = "MICROCERT_TOKEN", hide_env_values = true)]
    pub token: BearerToken,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A PEM certificate to trust for an `https://` server (e.g. the
    /// center's own self-signed certificate), besides the system's roots.
    #[arg(long, env = "MICROCERT_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,
}

/// A bearer token given on the command line: printed as redacted by
/// `Debug`, zeroized when dropped.
#[derive(Clone)]
pub struct BearerToken(zeroize::Zeroizing<String>);

impl BearerToken {
    /// The token, for the Authorization header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for BearerToken {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(BearerToken(zeroize::Zeroizing::new(s.to_owned())))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// An HTTP client; TLS with rustls (ring) and the given extra root.
pub fn http_client(ca_cert: Option<&std::path::Path>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder();
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        b = b.add_root_certificate(
            reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("{} is not a PEM certificate", path.display()))?,
        );
    }
    b.build().context("cannot build the HTTP client")
}

/// Device commands.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// List devices, filtered by state, class and seed expiry.
    List {
        #[command(flatten)]
        server: ServerArgs,
        /// Current seed state: pre-activation, active, suspended, deactivated, compromised, destroyed.
        #[arg(long)]
        state: Option<String>,
        /// Device class (1..=3).
        #[arg(long)]
        class: Option<u8>,
        /// Only seeds whose last year is at most this year.
        #[arg(long, value_name = "YEAR")]
        expires_by: Option<u16>,
        /// Page size.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this device id (paging).
        #[arg(long, value_name = "DEVICE_HEX")]
        after: Option<String>,
    },
    /// Show one device and all its seeds.
    Show {
        #[command(flatten)]
        server: ServerArgs,
        /// The device id, 16 hex digits.
        device: String,
    },
    /// Suspend a device's seed (refused until resumed).
    Suspend(ActionArgs),
    /// Resume a suspended device.
    Resume(ActionArgs),
    /// Revoke: refused at once, REVOKE command queued.
    Revoke(ActionArgs),
    /// Destroy a deactivated or revoked seed's ciphertext.
    Destroy(ActionArgs),
    /// Activate a pre-activation seed.
    Activate(ActionArgs),
    /// Queue UPDATE_SEED for one device, or with --due for every device in its seed's last year.
    Update {
        #[command(flatten)]
        server: ServerArgs,
        /// The device id (omit with --due).
        device: Option<String>,
        /// Every device whose seed is in its last year.
        #[arg(long)]
        due: bool,
        /// Why (audited).
        #[arg(long, default_value = "seed update")]
        reason: String,
    },
    /// Reopen transport-key enrollment (after expiry; with --epoch after a revocation).
    Reopen {
        #[command(flatten)]
        action: ActionArgs,
        /// The chip's new epoch, after it was re-personalized.
        #[arg(long)]
        epoch: Option<u8>,
    },
}

/// One device and why.
#[derive(Debug, Args)]
pub struct ActionArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The device id, 16 hex digits.
    device: String,
    /// Why (written to the audit log with the token's name).
    #[arg(long)]
    reason: String,
}

/// Audit log commands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk the hash chain; exit 1 if it is broken.
    Verify {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Write every entry as JSON Lines to standard output.
    Export {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show entries after a sequence number.
    List {
        #[command(flatten)]
        server: ServerArgs,
        /// Entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

struct Api {
    base: String,
    token: BearerToken,
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Api {
    fn new(s: &ServerArgs) -> anyhow::Result<Self> {
        Ok(Api {
            base: s.server.trim_end_matches('/').to_owned(),
            token: s.token.clone(),
            client: http_client(s.ca_cert.as_deref())?,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Body>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        self.rt.block_on(async {
            let mut req = self
                .client
                .request(method, &url)
                .bearer_auth(self.token.expose());
            match body {
                Some(Body::Json(v)) => req = req.json(&v),
                None => {}
            }
            let resp = req
                .send()
                .await
                .with_context(|| format!("cannot reach the center at {}", self.base))?;
            let status = resp.status();
            let text = resp.text().await?;
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            if !status.is_success() {
                let msg = value
                    .get("message")
                    .or_else(|| value.get("error"))
                    .and_then(Value::as_str)
                    .map_or_else(|| value.to_string(), str::to_owned);
                bail!("{status}: {msg}");
            }
            Ok(value)
        })
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None)
    }

    fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, Some(Body::Json(body)))
    }
}

enum Body {
    Json(Value),
}

fn print_json(v: &Value) {
    say!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn table(headers: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(headers.iter().copied());
    t
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

fn print_device(v: &Value) {
    let mut t = table(&[
        "device",
        "class",
        "suite",
        "epoch",
        "state",
        "transport open",
    ]);
    t.add_row(vec![
        s(&v["device"]),
        s(&v["class"]),
        s(&v["suite"]),
        s(&v["epoch"]),
        s(&v["state"]),
        s(&v["transport_open"]),
    ]);
    say!("{t}");
    let mut seeds = table(&[
        "generation",
        "state",
        "years",
        "kstore",
        "via",
        "activated",
        "grace until",
    ]);
    for seed in v["seeds"].as_array().into_iter().flatten() {
        seeds.add_row(vec![
            s(&seed["generation"]),
            s(&seed["state"]),
            format!("{}..={}", s(&seed["base_year"]), s(&seed["last_year"])),
            s(&seed["kstore_version"]),
            s(&seed["via"]),
            s(&seed["activated_at"]),
            s(&seed["grace_until"]),
        ]);
    }
    say!("{seeds}");
}

fn action(a: &ActionArgs, name: &str, extra: Value) -> anyhow::Result<()> {
    let api = Api::new(&a.server)?;
    let mut body = json!({ "reason": a.reason });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let v = api.post(&format!("/v1/devices/{}/{name}", a.device), body)?;
    if a.server.json {
        print_json(&v);
    } else {
        say!("{}: {name} done; state {}", a.device, s(&v["state"]));
    }
    Ok(())
}

/// Runs a device command.
pub fn device(cmd: DeviceCommand) -> anyhow::Result<()> {
    match cmd {
        DeviceCommand::List {
            server,
            state,
            class,
            expires_by,
            limit,
            after,
        } => {
            let api = Api::new(&server)?;
            let mut q = vec![format!("limit={limit}")];
            if let Some(x) = state {
                q.push(format!("state={x}"));
            }
            if let Some(x) = class {
                q.push(format!("class={x}"));
            }
            if let Some(x) = expires_by {
                q.push(format!("expires_by={x}"));
            }
            if let Some(x) = after {
                q.push(format!("after={x}"));
            }
            let v = api.get(&format!("/v1/devices?{}", q.join("&")))?;
            if server.json {
                print_json(&v);
                return Ok(());
            }
            let mut t = table(&["device", "class", "state", "generation", "seed years"]);
            for d in v["devices"].as_array().into_iter().flatten() {
                let cur = d["seeds"]
                    .as_array()
                    .and_then(|a| a.last())
                    .cloned()
                    .unwrap_or(Value::Null);
                t.add_row(vec![
                    s(&d["device"]),
                    s(&d["class"]),
                    s(&d["state"]),
                    s(&cur["generation"]),
                    if cur.is_null() {
                        "-".into()
                    } else {
                        format!("{}..={}", s(&cur["base_year"]), s(&cur["last_year"]))
                    },
                ]);
            }
            say!("{t}");
            if let Some(next) = v["next"].as_str() {
                say!("more: --after {next}");
            }
        }
        DeviceCommand::Show { server, device } => {
            let api = Api::new(&server)?;
            let v = api.get(&format!("/v1/devices/{device}"))?;
            if server.json {
                print_json(&v);
            } else {
                print_device(&v);
            }
        }
        DeviceCommand::Suspend(a) => action(&a, "suspend", json!({}))?,
        DeviceCommand::Resume(a) => action(&a, "resume", json!({}))?,
        DeviceCommand::Revoke(a) => action(&a, "revoke", json!({}))?,
        DeviceCommand::Destroy(a) => action(&a, "destroy", json!({}))?,
        DeviceCommand::Activate(a) => action(&a, "activate", json!({}))?,
        DeviceCommand::Reopen { action: a, epoch } => {
            action(&a, "reopen", json!({ "epoch": epoch }))?
        }
        DeviceCommand::Update {
            server,
            device,
            due,
            reason,
        } => {
            let api = Api::new(&server)?;
            let v = match (device, due) {
                (Some(d), false) => api.post(
                    &format!("/v1/devices/{d}/update"),
                    json!({ "reason": reason }),
                )?,
                (None, true) => api.post("/v1/updates/due", json!({}))?,
                _ => bail!("give either a device id or --due"),
            };
            if server.json {
                print_json(&v);
            } else if let Some(n) = v.get("queued") {
                say!("UPDATE_SEED queued for {n} devices");
            } else {
                say!("UPDATE_SEED queued for {}", s(&v["device"]));
            }
        }
    }
    Ok(())
}

/// The SHA-256 and line count of a batch file (the server checks the
/// digest at the end and keys the import's progress with it).
fn batch_digest(file: &std::path::Path) -> anyhow::Result<([u8; 32], u64)> {
    use sha2::Digest;
    use std::io::Read;
    let mut f =
        std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let (mut lines, mut last) = (0u64, b'\n');
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        last = buf[n - 1];
    }
    if last != b'\n' {
        lines += 1;
    }
    Ok((h.finalize().into(), lines))
}

/// `microcert import FILE`: a factory batch of any size, streamed to the
/// center, with a progress bar fed by the center's NDJSON progress lines.
/// Sending the same file again resumes after its last committed chunk.
pub fn import(server: &ServerArgs, file: &std::path::Path) -> anyhow::Result<()> {
    use microcert_center::lines::{ImportEvent, ImportSummary, RejectedLine};
    /// Rejected entries printed (all are counted by kind).
    const SHOWN: usize = 1000;
    let api = Api::new(server)?;
    let (digest, total) = batch_digest(file)?;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} lines {per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let url = format!("{}/v1/import", api.base);
    let mut rejected: Vec<RejectedLine> = Vec::new();
    let mut started = false;
    let end: anyhow::Result<ImportSummary> = api.rt.block_on(async {
        let body = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("cannot read {}", file.display()))?;
        let mut resp = api
            .client
            .post(&url)
            .bearer_auth(api.token.expose())
            .header("content-type", "application/jsonl")
            .header("x-batch-sha256", hex::encode(digest))
            .header("x-batch-lines", total.to_string())
            .body(reqwest::Body::from(body))
            .send()
            .await
            .with_context(|| format!("cannot reach the center at {}", api.base))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            let msg = value
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| value.to_string(), str::to_owned);
            bail!("{status}: {msg}");
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(bytes) = resp.chunk().await? {
            pending.extend_from_slice(&bytes);
            anyhow::ensure!(
                pending.len() <= 16 << 20,
                "the center sent a progress line longer than 16 MiB"
            );
            while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                match serde_json::from_slice::<ImportEvent>(&line)
                    .context("the center sent an unreadable progress line")?
                {
                    ImportEvent::Progress {
                        lines_done,
                        lines_total,
                        enrolled,
                        rejected: r,
                    } => {
                        if !started {
                            // A resumed import starts where the last one
                            // stopped: the rate counts from here.
                            bar.reset();
                            started = true;
                        }
                        bar.set_length(lines_total.max(total));
                        bar.set_position(lines_done);
                        bar.set_message(format!("{enrolled} enrolled"));
                        let room = SHOWN.saturating_sub(rejected.len());
                        rejected.extend(r.into_iter().take(room));
                    }
                    ImportEvent::Done(summary) => return Ok(summary),
                    ImportEvent::Error { error, message } => {
                        bail!("the import stopped ({error}): {message}; what was committed stays, run it again to resume")
                    }
                }
            }
        }
        bail!("the center closed the connection before the import's summary; run it again to resume")
    });
    bar.finish_and_clear();
    let summary = end?;
    let refused: u64 = summary.refused.values().sum();
    if server.json {
        print_json(&json!({
            "lines": summary.lines,
            "resumed_after": summary.resumed_after,
            "enrolled": summary.enrolled,
            "already": summary.already,
            "refused": summary.refused,
            "rejected": rejected,
        }));
        return Ok(());
    }
    say!(
        "{} lines: {} enrolled, {} already enrolled, {} rejected{}",
        summary.lines,
        summary.enrolled,
        summary.already,
        refused,
        if summary.resumed_after > 0 {
            format!(" (resumed after line {})", summary.resumed_after)
        } else {
            String::new()
        }
    );
    for (kind, n) in &summary.refused {
        say!("  {kind}: {n}");
    }
    for r in &rejected {
        say!("  line {}: {} ({})", r.line, r.error, r.message);
    }
    if refused > rejected.len() as u64 {
        say!("  ... {} more not shown", refused - rejected.len() as u64);
    }
    Ok(())
}

/// `microcert integrity check --server`: exit 1 when anything was found.
pub fn integrity(server: &ServerArgs) -> anyhow::Result<bool> {
    let v = Api::new(server)?.get("/v1/integrity")?;
    if server.json {
        print_json(&v);
    } else if v["clean"].as_bool() == Some(true) {
        say!("clean: {} records checked", s(&v["records"]));
    } else {
        say!("TAMPERED: {} records checked", s(&v["records"]));
        for r in v["bad_records"].as_array().into_iter().flatten() {
            say!(
                "  record device {} generation {}",
                s(&r["device"]),
                s(&r["generation"])
            );
        }
        for sh in v["bad_shards"].as_array().into_iter().flatten() {
            say!("  digest shard {sh}");
        }
    }
    Ok(v["clean"].as_bool() == Some(true))
}

/// Runs an audit command; false when the chain is broken.
pub fn audit(cmd: AuditCommand) -> anyhow::Result<bool> {
    match cmd {
        AuditCommand::Verify { server } => {
            let v = Api::new(&server)?.get("/v1/audit/verify")?;
            if server.json {
                print_json(&v);
            } else if v["intact"].as_bool() == Some(true) {
                say!("audit chain intact");
            } else {
                say!("audit chain BROKEN at entry {}", s(&v["first_bad"]));
            }
            Ok(v["intact"].as_bool() == Some(true))
        }
        AuditCommand::Export { server } => {
            let api = Api::new(&server)?;
            let mut after = 0;
            loop {
                let v = api.get(&format!("/v1/audit?after={after}&limit=1000"))?;
                let entries = v["entries"].as_array().cloned().unwrap_or_default();
                let Some(last) = entries.last() else { break };
                after = last["seq"].as_u64().unwrap_or(u64::MAX);
                for e in &entries {
                    say!("{e}");
                }
            }
            Ok(true)
        }
        AuditCommand::List {
            server,
            after,
            limit,
        } => {
            let v = Api::new(&server)?.get(&format!("/v1/audit?after={after}&limit={limit}"))?;
            if server.json {
                print_json(&v);
                return Ok(true);
            }
            let mut t = table(&["seq", "time", "actor", "action", "device", "gen", "reason"]);
            for e in v["entries"].as_array().into_iter().flatten() {
                t.add_row(vec![
                    s(&e["seq"]),
                    s(&e["time"]),
                    s(&e["actor"]),
                    s(&e["action"]),
                    s(&e["device"]),
                    s(&e["generation"]),
                    s(&e["reason"]),
                ]);
            }
            say!("{t}");
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_never_shows_in_debug_output() {
        let t: BearerToken = "mct_0123456789abcdef".parse().unwrap();
        let args = format!("{t:?}");
        assert!(!args.contains("0123456789abcdef"), "{args}");
        assert_eq!(t.expose(), "mct_0123456789abcdef");
    }
}

/// The center's clock (issue 12: a step of the clock stops housekeeping
/// until an operator confirms the time).
#[derive(Debug, Subcommand)]
pub enum ClockCommand {
    /// Show the server's time and the unconfirmed clock step, if any;
    /// exit 1 while there is one.
    Status {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Confirm that the server's clock is right now: the alarm ends and
    /// housekeeping resumes (audited with the token's name).
    Confirm {
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Runs a clock command; false while a step is unconfirmed (status).
pub fn clock(cmd: ClockCommand) -> anyhow::Result<bool> {
    match cmd {
        ClockCommand::Status { server } => {
            let v = Api::new(&server)?.get("/v1/clock")?;
            let alarm = !v["alarm"].is_null();
            if server.json {
                print_json(&v);
            } else if alarm {
                say!(
                    "CLOCK STEP unconfirmed (found at {}); server time {}: housekeeping waits for `microcert clock confirm`",
                    s(&v["alarm"]),
                    s(&v["now"])
                );
            } else {
                say!("clock ok; server time {}", s(&v["now"]));
            }
            Ok(!alarm)
        }
        ClockCommand::Confirm { server } => {
            let v = Api::new(&server)?.post("/v1/clock/confirm", json!({}))?;
            if server.json {
                print_json(&v);
            } else {
                say!("clock confirmed at {}", s(&v["confirmed"]));
            }
            Ok(true)
        }
    }
}
