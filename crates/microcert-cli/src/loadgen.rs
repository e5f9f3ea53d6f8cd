//! `microcert bench`: a load generator. Software nodes (from a factory
//! file, enrolled on first use) send AUTHs to a running center over CoAP or
//! HTTP on loopback, each waiting for its RECEIPT and checking it, from M
//! concurrent tasks for a bounded time; then throughput, latency
//! percentiles and errors. `bench scale` is the in-process scale run
//! ([`scale`]).

mod scale;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Args, Subcommand};
use microcert_core::Audience;
use microcert_node::SecureChip;
use microcert_server::coap_client::CoapClient;

use crate::simulate::{Link, Node, Transport, load_chips, now32, percentile};

/// Arguments of `bench`.
#[derive(Debug, Args)]
#[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// Another benchmark instead of the network load.
    #[command(subcommand)]
    pub mode: Option<BenchMode>,
    /// The center and the transport to load.
    #[command(flatten)]
    pub link: crate::simulate::CenterLink,
    /// The factory personalization file (chips.jsonl).
    #[arg(long, required = true)]
    pub chips: Option<PathBuf>,
    /// Chip images kept between runs (`simulate --state`).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Concurrent clients (each with its own socket and its share of nodes).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds of load, after enrollment. At most 600.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The benchmarks other than the network load.
#[derive(Debug, Subcommand)]
pub enum BenchMode {
    /// In process, no server: import N devices into one new SQLite
    /// database, then measure cold verification and an integrity check.
    Scale(scale::ScaleArgs),
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, u64>,
}

async fn enroll(link: &mut Link, node: &mut Node) -> Result<(), String> {
    let mut buf = [0u8; 1100];
    let n = node
        .chip
        .enroll(now32(), &mut buf)
        .map_err(|e| e.to_string())?;
    node.persist();
    let receipt = link
        .call(true, "/v1/device/enroll", &buf[..n], None)
        .await?;
    let receipt = receipt.ok_or("no receipt")?;
    node.chip
        .accept_receipt(&receipt)
        .map_err(|e| e.to_string())?;
    node.persist();
    Ok(())
}

/// Runs the load.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(BenchMode::Scale(s)) = &args.mode {
        return scale::run(s);
    }
    let Some(chips) = args.chips.as_deref() else {
        bail!("--chips is required");
    };
    if args.duration == 0 || args.duration > 600 {
        bail!("--duration is 1 to 600 seconds");
    }
    let nodes = load_chips(chips, args.state.as_deref())?;
    let total_nodes = nodes.len();
    let tasks = args.concurrency.clamp(1, total_nodes);
    let mut shares: Vec<Vec<Node>> = (0..tasks).map(|_| Vec::new()).collect();
    for (i, n) in nodes.into_iter().enumerate() {
        shares[i % tasks].push(n);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let base = args.link.server.trim_end_matches('/').to_owned();
    let (transport, coap, duration) = (
        args.link.transport,
        args.link.coap,
        Duration::from_secs(args.duration),
    );
    let (tallies, elapsed) = rt.block_on(async move {
        // Enroll first (not measured), then start every client together.
        let mut links = Vec::new();
        for share in &mut shares {
            let mut link = match transport {
                Transport::Http => Link::Http(reqwest::Client::new(), base.clone()),
                Transport::Coap => {
                    let mut c = CoapClient::connect(coap).await?;
                    c.set_ack_timeout(Duration::from_millis(500));
                    Link::Coap(Box::new(c))
                }
            };
            // Revoked or tampered chips (e.g. left by `simulate`) sit out.
            share.retain(|n| n.chip.status().life == microcert_node::Life::Personalized);
            for node in share.iter_mut() {
                if node.chip.status().generation.is_none() {
                    enroll(&mut link, node)
                        .await
                        .map_err(|e| anyhow::anyhow!("enrollment failed: {e}"))?;
                }
            }
            links.push(link);
        }
        let start = Instant::now();
        let deadline = start + duration;
        let mut handles = Vec::new();
        for (mut share, mut link) in shares.into_iter().zip(links) {
            handles.push(tokio::spawn(async move {
                let mut t = Tally::default();
                let mut buf = [0u8; 64];
                let mut i = 0;
                while Instant::now() < deadline && !share.is_empty() {
                    let len = share.len();
                    let node = &mut share[i % len];
                    i += 1;
                    let n = match node.chip.auth(now32(), &Audience::CENTER, &mut buf) {
                        Ok(n) => n,
                        Err(e) => {
                            *t.errors.entry(format!("node: {e}")).or_default() += 1;
                            continue;
                        }
                    };
                    // The image is written once at the end: durability is
                    // not what is measured here.
                    node.chip.mark_persisted();
                    let sent = Instant::now();
                    match link.call(true, "/v1/device/auth", &buf[..n], None).await {
                        Ok(Some(receipt)) => match node.chip.accept_receipt(&receipt) {
                            Ok(_) => t.latencies.push(sent.elapsed()),
                            Err(e) => *t.errors.entry(format!("receipt: {e}")).or_default() += 1,
                        },
                        Ok(None) => *t.errors.entry("no receipt".into()).or_default() += 1,
                        Err(kind) => *t.errors.entry(kind).or_default() += 1,
                    }
                }
                for node in &mut share {
                    // Mark dirty state persisted by writing the image now.
                    node.persist_always();
                }
                t
            }));
        }
        let mut tallies = Vec::new();
        for h in handles {
            tallies.push(h.await?);
        }
        anyhow::Ok((tallies, start.elapsed()))
    })?;
    let mut lat: Vec<Duration> = tallies
        .iter()
        .flat_map(|t| t.latencies.iter().copied())
        .collect();
    lat.sort_unstable();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for t in &tallies {
        for (k, v) in &t.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
    }
    let ok = lat.len() as f64;
    let rate = ok / elapsed.as_secs_f64();
    let (p50, p99, p999) = (
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
    );
    // The baseline of the issue 16 table, measured after the load in this
    // process: one thread verifying ECDSA P-256 signatures (ring).
    let ecdsa = ecdsa_verify_rate()?;
    let met = rate >= TARGET_RATE && p99 < TARGET_P99;
    if args.json {
        say!(
            "{}",
            serde_json::json!({
                "transport": format!("{:?}", args.link.transport).to_lowercase(),
                "nodes": total_nodes, "concurrency": tasks, "seconds": elapsed.as_secs_f64(),
                "accepted": lat.len(), "per_second": rate,
                "p50_us": p50.as_micros() as u64, "p99_us": p99.as_micros() as u64, "p999_us": p999.as_micros() as u64,
                "errors": errors,
                "ecdsa_p256_verify_per_second": ecdsa,
                "target": {"per_second": TARGET_RATE, "p99_us": TARGET_P99.as_micros() as u64, "met": met},
            })
        );
    } else {
        say!(
            "{:?} AUTH on {} nodes, {tasks} clients, {:.1} s: {} accepted, {rate:.0}/s, p50 {p50:.2?}, p99 {p99:.2?}, p99.9 {p999:.2?}, errors {}",
            args.link.transport,
            total_nodes,
            elapsed.as_secs_f64(),
            lat.len(),
            errors.values().sum::<u64>()
        );
        for (k, v) in &errors {
            say!("  {k}: {v}");
        }
        say!(
            "| AUTH over {:?}, {tasks} clients | {rate:.0} /s, p99 {p99:.2?} | >= {TARGET_RATE:.0} /s, p99 < {TARGET_P99:?} | {} | {:.1}x ECDSA P-256 verify ({ecdsa:.0} /s, one thread, same process) |",
            args.link.transport,
            if met { "yes" } else { "no" },
            rate / ecdsa.max(1.0),
        );
    }
    Ok(())
}

/// The target of AUTH over CoAP (ARCHITECTURE.md, issue 16).
const TARGET_RATE: f64 = 100_000.0;
/// Its latency bound.
const TARGET_P99: Duration = Duration::from_millis(2);

/// ECDSA P-256 verifications per second on one thread (ring, a 300-byte
/// message), the median of nine batches of about 30 ms: the baseline the
/// figures of docs/benchmarks.md are put beside.
fn ecdsa_verify_rate() -> anyhow::Result<f64> {
    use ring::rand::SystemRandom;
    use ring::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
        UnparsedPublicKey,
    };
    let rng = SystemRandom::new();
    let bad = || anyhow::anyhow!("ECDSA baseline setup failed");
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).map_err(|_| bad())?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| bad())?;
    let message = [0x5au8; 300];
    let sig = pair.sign(&rng, &message).map_err(|_| bad())?;
    let key = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, pair.public_key().as_ref());
    let mut rates = Vec::with_capacity(9);
    for _ in 0..9 {
        let start = Instant::now();
        let mut n = 0u32;
        while start.elapsed() < Duration::from_millis(30) {
            if key
                .verify(std::hint::black_box(&message), sig.as_ref())
                .is_err()
            {
                bail!("ECDSA baseline does not verify");
            }
            n += 1;
        }
        rates.push(f64::from(n) / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}
