//! `microcert simulate`: software nodes personalized from a factory file
//! enroll, authenticate (checking the center's RECEIPT), sign, seal, poll
//! commands and obey them, over HTTP or CoAP, for a bounded time; then a
//! summary of operations, refusals by kind and latencies.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use microcert_core::{Audience, DataDigest, DeviceId, HEADER_LEN, Key128, Suite};
use microcert_node::{EntropyFailure, Personalization, SecureChip, SoftChip};
use microcert_server::coap_client::CoapClient;
use serde::Deserialize;

/// Where simulated devices reach the center, and how (`simulate` and
/// `bench`).
#[derive(Debug, Args)]
pub struct CenterLink {
    /// The center's HTTP address (also for /v1/verify and /v1/open).
    #[arg(
        long,
        env = "MICROCERT_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// The center's CoAP address, for `--transport coap`.
    #[arg(long, default_value = "127.0.0.1:5683")]
    pub coap: SocketAddr,
    /// How devices talk to the center.
    #[arg(long, value_enum, default_value_t = Transport::Coap)]
    pub transport: Transport,
}

/// Arguments of `simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The center and the transport.
    #[command(flatten)]
    pub link: CenterLink,
    /// The factory personalization file (chips.jsonl).
    #[arg(long)]
    pub chips: PathBuf,
    /// How long to run, in seconds, after enrollment.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Stop after this many rounds per node (each round: AUTH, challenge
    /// and AUTH_RESPONSE, sign and seal, command poll), or at --duration,
    /// whichever comes first.
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Concurrent node tasks.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// A verifier token: nodes also sign and seal for that relying party,
    /// which checks them through /v1/verify and /v1/open.
    #[arg(long, env = "MICROCERT_VERIFIER_TOKEN", hide_env_values = true)]
    pub verifier_token: Option<crate::ops::BearerToken>,
    /// The relying party's name (the verifier token's name).
    #[arg(long, default_value = "simulator")]
    pub relying_party: String,
    /// Keep each chip's image in this directory, so nodes survive between
    /// runs (enrolled once, then authenticating, obeying commands).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Device transport of the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// CoAP over UDP.
    Coap,
    /// HTTP.
    Http,
}

#[derive(Deserialize)]
struct ChipLine {
    device_id: String,
    epoch: u8,
    transport_key: String,
    class: u8,
    suite: u8,
    issued: u32,
}

fn os_entropy(buf: &mut [u8]) -> Result<(), EntropyFailure> {
    getrandom::fill(buf).map_err(|_| EntropyFailure)
}

pub(crate) type Chip = SoftChip<fn(&mut [u8]) -> Result<(), EntropyFailure>>;

/// A simulated node: its chip, and where its image is kept between runs.
pub(crate) struct Node {
    pub(crate) chip: Chip,
    image: Option<PathBuf>,
}

impl Node {
    /// Honors the chip's persistence contract: the image is stored before
    /// anything the chip made is transmitted.
    pub(crate) fn persist(&mut self) {
        if self.chip.is_dirty() {
            self.persist_always();
        }
    }

    /// Writes the image whether or not the chip says it changed.
    pub(crate) fn persist_always(&mut self) {
        if let Some(path) = &self.image {
            let mut img = zeroize::Zeroizing::new([0u8; microcert_node::IMAGE_LEN]);
            self.chip.to_image(&mut img);
            if let Err(e) = crate::cert::write_secret_file_replace(path, &img[..]) {
                eprintln!("cannot store the chip image {}: {e:#}", path.display());
                return;
            }
        }
        self.chip.mark_persisted();
    }
}

fn entropy() -> fn(&mut [u8]) -> Result<(), EntropyFailure> {
    os_entropy
}

pub(crate) fn load_chips(
    path: &std::path::Path,
    state: Option<&std::path::Path>,
) -> anyhow::Result<Vec<Node>> {
    if let Some(dir) = state {
        crate::datadir::create_private_dir(dir)?;
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    );
    let mut chips = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let l: ChipLine = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not a chip line", path.display(), i + 1))?;
        let id = crate::hexarg::hex8(&l.device_id)
            .map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))?;
        let ktr = crate::hexarg::hex16(&l.transport_key)
            .map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))?;
        let image = state.map(|d| d.join(format!("{}.img", l.device_id.to_lowercase())));
        if let Some(img) = image.as_ref().filter(|p| p.exists()) {
            let bytes = zeroize::Zeroizing::new(std::fs::read(img)?);
            let chip = SoftChip::from_image(&bytes, entropy())
                .map_err(|e| anyhow::anyhow!("chip image {}: {e}", img.display()))?;
            chips.push(Node { chip, image });
            continue;
        }
        let mut chip: Chip = SoftChip::new(entropy());
        chip.personalize(&Personalization {
            device: DeviceId(id),
            epoch: l.epoch,
            suite: Suite::new(l.suite)?,
            transport_key: Key128::from_bytes(ktr),
            class: l.class,
            issued: l.issued,
        })
        .map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))?;
        let mut node = Node { chip, image };
        node.persist();
        chips.push(node);
    }
    if chips.is_empty() {
        bail!("{} holds no chips", path.display());
    }
    Ok(chips)
}

/// A device-side connection to the center.
pub(crate) enum Link {
    Http(reqwest::Client, String),
    Coap(Box<CoapClient>),
}

/// A reply: the body, or the refusal kind.
pub(crate) type Outcome = Result<Option<Vec<u8>>, String>;

impl Link {
    pub(crate) async fn call(
        &mut self,
        post: bool,
        path: &str,
        body: &[u8],
        bearer: Option<&str>,
    ) -> Outcome {
        match self {
            Link::Http(client, base) => {
                let url = format!("{base}{path}");
                let mut req = if post {
                    client.post(&url).body(body.to_vec())
                } else {
                    client.get(&url)
                };
                if let Some(t) = bearer {
                    req = req.bearer_auth(t);
                }
                let resp = req.send().await.map_err(|_| "transport".to_owned())?;
                let status = resp.status();
                let bytes = resp.bytes().await.map_err(|_| "transport".to_owned())?;
                if status.is_success() {
                    Ok((!bytes.is_empty()).then(|| bytes.to_vec()))
                } else {
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                    Err(v["error"]
                        .as_str()
                        .map_or_else(|| status.to_string(), str::to_owned))
                }
            }
            Link::Coap(client) => {
                let r = if post {
                    client.post(path, body).await
                } else {
                    client.get(path).await
                };
                let r = r.map_err(|e| format!("transport: {e}"))?;
                if r.is_success() {
                    Ok((!r.payload.is_empty()).then_some(r.payload))
                } else {
                    Err(String::from_utf8(r.payload).unwrap_or_else(|_| format!("{:?}", r.code)))
                }
            }
        }
    }
}

#[derive(Default)]
struct Stats {
    ops: BTreeMap<&'static str, (u64, Vec<Duration>)>,
    refusals: BTreeMap<(&'static str, String), u64>,
}

impl Stats {
    fn record(&mut self, op: &'static str, took: Duration, outcome: &Result<(), String>) {
        let e = self.ops.entry(op).or_default();
        e.0 += 1;
        e.1.push(took);
        if let Err(kind) = outcome {
            *self.refusals.entry((op, kind.clone())).or_default() += 1;
        }
    }
}

pub(crate) fn now32() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

pub(crate) struct Ctx {
    link: Link,
    rp: Option<(String, Audience, String)>,
    http: Option<(reqwest::Client, String)>,
    stats: Arc<Mutex<Stats>>,
}

impl Ctx {
    async fn timed(&mut self, op: &'static str, post: bool, path: &str, body: &[u8]) -> Outcome {
        let start = Instant::now();
        let r = self.link.call(post, path, body, None).await;
        let status = r.as_ref().map(|_| ()).map_err(Clone::clone);
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(op, start.elapsed(), &status);
        r
    }

    fn local_refusal(&self, op: &'static str, kind: String) {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(op, Duration::ZERO, &Err(kind));
    }

    /// Sends a message that the center answers with a RECEIPT, and checks it.
    async fn with_receipt(
        &mut self,
        node: &mut Node,
        op: &'static str,
        path: &str,
        msg: &[u8],
    ) -> bool {
        match self.timed(op, true, path, msg).await {
            Ok(Some(receipt)) => match node.chip.accept_receipt(&receipt) {
                Ok(_) => true,
                Err(e) => {
                    self.local_refusal("receipt-check", e.to_string());
                    false
                }
            },
            Ok(None) => false,
            Err(_) => false,
        }
    }

    pub(crate) async fn enroll(&mut self, node: &mut Node) -> bool {
        let mut buf = [0u8; 1100];
        let n = match node.chip.enroll(now32(), &mut buf) {
            Ok(n) => n,
            Err(e) => {
                self.local_refusal("enroll", e.to_string());
                return false;
            }
        };
        node.persist();
        self.with_receipt(node, "enroll", "/v1/device/enroll", &buf[..n])
            .await
    }

    /// One round of a node's life; false once the node is revoked.
    async fn round(&mut self, node: &mut Node) -> bool {
        let mut buf = [0u8; 1100];
        if let Ok(n) = node.chip.auth(now32(), &Audience::CENTER, &mut buf) {
            node.persist();
            self.with_receipt(node, "auth", "/v1/device/auth", &buf[..n])
                .await;
        }
        let device = node.chip.status().device;
        if let Ok(Some(ch)) = self
            .timed("challenge", true, "/v1/device/challenge", &device.0)
            .await
            && let Ok(ch) = <[u8; 16]>::try_from(ch.as_slice())
            && let Ok(n) = node.chip.auth_response(now32(), &ch, &mut buf)
        {
            node.persist();
            self.with_receipt(node, "auth-response", "/v1/device/auth-response", &buf[..n])
                .await;
        }
        if let (Some((_, aud, token)), Some((client, base))) = (self.rp.clone(), self.http.clone())
        {
            let data = format!("reading from {device} at {}", now32());
            let mut digest = DataDigest::new();
            digest.update(data.as_bytes());
            if let Ok(n) = node.chip.sign(now32(), digest, &mut buf) {
                let mut body = buf[..n].to_vec();
                body.extend_from_slice(data.as_bytes());
                self.relying_party(&client, &base, &token, "verify", &body)
                    .await;
            }
            let plain = b"21.5C";
            buf[HEADER_LEN..HEADER_LEN + plain.len()].copy_from_slice(plain);
            if let Ok(n) = node.chip.seal(now32(), &aud, &mut buf, plain.len()) {
                self.relying_party(&client, &base, &token, "open", &buf[..n])
                    .await;
            }
        }
        let path = format!("/v1/device/{device}/command");
        if let Ok(Some(cmd)) = self.timed("command", false, &path, &[]).await {
            match node.chip.handle_command(now32(), &cmd, &mut buf) {
                Ok(n) if node.chip.status().life == microcert_node::Life::Revoked => {
                    node.persist();
                    let _ = self
                        .timed("revoke-receipt", true, "/v1/device/receipt", &buf[..n])
                        .await;
                    return false;
                }
                Ok(n) => {
                    // UPDATE_SEED: the reply is the ENROLL of the next generation.
                    node.persist();
                    self.with_receipt(node, "update-enroll", "/v1/device/enroll", &buf[..n])
                        .await;
                }
                Err(e) => self.local_refusal("command-check", e.to_string()),
            }
        }
        node.chip.status().life == microcert_node::Life::Personalized
    }

    async fn relying_party(
        &mut self,
        client: &reqwest::Client,
        base: &str,
        token: &str,
        what: &'static str,
        body: &[u8],
    ) {
        let start = Instant::now();
        let r = client
            .post(format!("{base}/v1/{what}"))
            .bearer_auth(token)
            .body(body.to_vec())
            .send()
            .await;
        let status = match r {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => {
                let v: serde_json::Value = resp.json().await.unwrap_or_default();
                Err(v["error"].as_str().unwrap_or("refused").to_owned())
            }
            Err(_) => Err("transport".into()),
        };
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(
                if what == "verify" {
                    "rp-verify-signature"
                } else {
                    "rp-open-sealed"
                },
                start.elapsed(),
                &status,
            );
    }
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the simulation.
pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let chips = load_chips(&args.chips, args.state.as_deref())?;
    let total = chips.len();
    let stats = Arc::new(Mutex::new(Stats::default()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let base = args.link.server.trim_end_matches('/').to_owned();
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let bar = indicatif::ProgressBar::new(args.duration);
    bar.set_style(
        indicatif::ProgressStyle::with_template("simulating {len} s [{bar:30}] {pos}s {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let share = total.div_ceil(args.concurrency.max(1));
    let queue = Arc::new(Mutex::new(chips));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency.max(1) {
            let queue = queue.clone();
            let stats = stats.clone();
            let base = base.clone();
            let rp = args.verifier_token.clone().map(|t| {
                let t = t.expose().to_owned();
                (
                    args.relying_party.clone(),
                    Audience::relying_party(&args.relying_party),
                    t,
                )
            });
            let transport = args.link.transport;
            let coap = args.link.coap;
            let rounds = args.rounds;
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                let link = match transport {
                    Transport::Http => Link::Http(client.clone(), base.clone()),
                    Transport::Coap => Link::Coap(Box::new(CoapClient::connect(coap).await?)),
                };
                let mut ctx = Ctx {
                    link,
                    rp,
                    http: Some((client, base)),
                    stats,
                };
                // Each task takes its share of chips and keeps them.
                let mut mine = Vec::new();
                loop {
                    let next = queue.lock().unwrap_or_else(PoisonError::into_inner).pop();
                    match next {
                        Some(c) => mine.push(c),
                        None => break,
                    }
                    if mine.len() >= share {
                        break;
                    }
                }
                for node in &mut mine {
                    if let Some((name, _, _)) = &ctx.rp {
                        let _ = node.chip.add_audience(name);
                    }
                    // A node restored from its image may hold a seed already.
                    if node.chip.status().generation.is_none() {
                        ctx.enroll(node).await;
                    }
                }
                let mut alive: Vec<bool> = mine
                    .iter()
                    .map(|n| n.chip.status().life == microcert_node::Life::Personalized)
                    .collect();
                let mut round = 0u32;
                while Instant::now() < deadline
                    && alive.iter().any(|a| *a)
                    && rounds.is_none_or(|n| round < n)
                {
                    round += 1;
                    for (node, live) in mine.iter_mut().zip(alive.iter_mut()) {
                        if *live && Instant::now() < deadline {
                            *live = ctx.round(node).await;
                        }
                    }
                }
                anyhow::Ok(())
            }));
        }
        let ticker = {
            let bar = bar.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    bar.inc(1);
                }
            })
        };
        for t in tasks {
            t.await??;
        }
        ticker.abort();
        anyhow::Ok(())
    })?;
    bar.finish_and_clear();
    let stats = stats.lock().unwrap_or_else(PoisonError::into_inner);
    print_summary(&stats, total, args.json);
    Ok(())
}

fn print_summary(stats: &Stats, nodes: usize, json: bool) {
    let mut rows = Vec::new();
    for (op, (count, lat)) in &stats.ops {
        let mut sorted = lat.clone();
        sorted.sort();
        let refused: u64 = stats
            .refusals
            .iter()
            .filter(|((o, _), _)| o == op)
            .map(|(_, n)| n)
            .sum();
        rows.push((
            op,
            count,
            refused,
            percentile(&sorted, 0.5),
            percentile(&sorted, 0.99),
        ));
    }
    if json {
        let v = serde_json::json!({
            "nodes": nodes,
            "operations": rows.iter().map(|(op, n, r, p50, p99)| serde_json::json!({
                "op": op, "count": n, "refused": r,
                "p50_us": p50.as_micros() as u64, "p99_us": p99.as_micros() as u64,
            })).collect::<Vec<_>>(),
            "refusals": stats.refusals.iter().map(|((op, kind), n)| serde_json::json!({
                "op": op, "kind": kind, "count": n
            })).collect::<Vec<_>>(),
        });
        say!("{v}");
        return;
    }
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(vec![
        "operation",
        "count",
        "refused",
        "p50",
        "p99",
    ]);
    for (op, n, r, p50, p99) in &rows {
        t.add_row(vec![
            op.to_string(),
            n.to_string(),
            r.to_string(),
            format!("{p50:.2?}"),
            format!("{p99:.2?}"),
        ]);
    }
    say!("{nodes} nodes\n{t}");
    if !stats.refusals.is_empty() {
        let mut r = Table::new();
        r.load_preset(UTF8_BORDERS_ONLY)
            .set_header(vec!["operation", "refusal", "count"]);
        for ((op, kind), n) in &stats.refusals {
            r.add_row(vec![op.to_string(), kind.clone(), n.to_string()]);
        }
        say!("refusals by kind\n{r}");
    }
}
