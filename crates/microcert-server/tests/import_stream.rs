//! `/v1/import` at fleet size: a batch far above the old 2 MiB body limit
//! is streamed, its progress comes back as NDJSON after every chunk, an
//! interrupted or repeated upload resumes by the declared digest, a wrong
//! digest resets the progress, and an over-long line is one rejected entry.

mod common;

use common::TestServer;
use microcert_center::EncryptionCard;
use microcert_center::lines::{ImportEvent, ImportLine};
use microcert_core::{DeviceId, EnrollKey, Header, KeySeed, Suite, make_enroll};
use microcert_server::tokens::{Role, create};
use sha2::{Digest, Sha256};

const NOW: u64 = 1_780_000_000; // 2026

fn batch(card: &dyn EncryptionCard, n: u64) -> Vec<u8> {
    batch_range(card, 0, n)
}

fn batch_range(card: &dyn EncryptionCard, lo: u64, hi: u64) -> Vec<u8> {
    let year = u16::try_from(microcert_core::time::date_of(NOW as i64).year).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 1100];
    for i in lo..hi {
        let id = DeviceId::from_u64(0x1400_0000_0000_0000 + i);
        let ktr = card.transport_key(id, 0).unwrap();
        let seed = KeySeed::generate(year, |b| {
            for (k, x) in b.iter_mut().enumerate() {
                *x = (i as u8).wrapping_mul(31).wrapping_add(k as u8);
            }
        });
        let h = Header {
            suite: Suite::CMAC64,
            device: id,
            generation: 0,
            t: NOW as u32,
            r: i,
        };
        let len = make_enroll(EnrollKey::Transport(&ktr), &seed, &h, &mut buf).unwrap();
        let line = ImportLine {
            device_id: id.to_string().into(),
            class: 1,
            epoch: 0,
            enroll: hex::encode(&buf[..len]).into(),
        };
        serde_json::to_writer(&mut out, &line).unwrap();
        out.push(b'\n');
    }
    out
}

async fn post(
    srv: &TestServer,
    token: &str,
    body: Vec<u8>,
    digest: Option<[u8; 32]>,
) -> Vec<ImportEvent> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut req = reqwest::Client::new()
        .post(format!("http://{}/v1/import", srv.http))
        .bearer_auth(token)
        .header("x-batch-lines", "0");
    if let Some(d) = digest {
        req = req.header("x-batch-sha256", hex::encode(d));
    }
    let resp = req.body(body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_far_above_2_mib_is_streamed_with_progress_and_resumes() {
    let srv = TestServer::start().await;
    let token = create(&srv.center, Role::Operator, "alice", None, "test").unwrap();
    let n = 20_000u64;
    let body = batch(srv.center.card(), n);
    assert!(
        body.len() > 10 * (2 << 20),
        "the batch is {} bytes",
        body.len()
    );
    let digest: [u8; 32] = Sha256::digest(&body).into();

    let events = post(&srv, &token, body.clone(), Some(digest)).await;
    let progress = events
        .iter()
        .filter(|e| matches!(e, ImportEvent::Progress { .. }))
        .count();
    assert_eq!(
        progress, 20,
        "one progress line per committed chunk of 1,000"
    );
    let Some(ImportEvent::Done(s)) = events.last() else {
        panic!("no summary: {:?}", events.last());
    };
    assert_eq!((s.lines, s.enrolled, s.already), (n, n, 0));
    assert!(s.refused.is_empty());
    for i in [0, n / 2, n - 1] {
        let id = DeviceId::from_u64(0x1400_0000_0000_0000 + i);
        let v = srv.center.device(id).unwrap().expect("imported");
        assert_eq!(v.seeds.len(), 1);
    }

    // The same batch again: every chunk was committed, nothing is redone.
    let events = post(&srv, &token, body.clone(), Some(digest)).await;
    let Some(ImportEvent::Done(s)) = events.last() else {
        panic!("no summary");
    };
    assert_eq!((s.resumed_after, s.enrolled), (n, 0));

    // The same digest declared for other bytes (the first 5,000 lines
    // only): refused at the end, and the progress under that digest is
    // reset, so that nothing would be skipped next time.
    let cut = body
        .split_inclusive(|&b| b == b'\n')
        .take(5_000)
        .flatten()
        .copied()
        .collect::<Vec<u8>>();
    let events = post(&srv, &token, cut, Some(digest)).await;
    assert!(
        matches!(events.last(), Some(ImportEvent::Error { error, .. }) if error == "malformed"),
        "{:?}",
        events.last()
    );
    let events = post(&srv, &token, body, Some(digest)).await;
    let Some(ImportEvent::Done(s)) = events.last() else {
        panic!("no summary");
    };
    assert_eq!((s.resumed_after, s.enrolled, s.already), (0, 0, n));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlong_line_is_one_rejected_entry_and_the_rest_goes_on() {
    let srv = TestServer::start().await;
    let token = create(&srv.center, Role::Operator, "alice", None, "test").unwrap();
    let good = batch(srv.center.card(), 3);
    let mut body = Vec::new();
    let mut lines = good.split_inclusive(|&b| b == b'\n');
    body.extend_from_slice(lines.next().unwrap());
    // 1 MiB without a newline: read through, never held.
    body.extend(std::iter::repeat_n(b'a', 1 << 20));
    body.push(b'\n');
    for l in lines {
        body.extend_from_slice(l);
    }
    let events = post(&srv, &token, body, None).await;
    let rejected: Vec<_> = events
        .iter()
        .flat_map(|e| match e {
            ImportEvent::Progress { rejected, .. } => rejected.clone(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(
        (rejected[0].line, rejected[0].error.as_str()),
        (2, "malformed")
    );
    let Some(ImportEvent::Done(s)) = events.last() else {
        panic!("no summary");
    };
    assert_eq!((s.lines, s.enrolled), (4, 3));
    assert_eq!(s.refused.get("malformed"), Some(&1));
    srv.stop().await;
}

#[tokio::test]
async fn a_bad_digest_header_is_refused_before_anything_is_read() {
    let srv = TestServer::start().await;
    let token = create(&srv.center, Role::Operator, "alice", None, "test").unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/import", srv.http))
        .bearer_auth(token.as_str())
        .header("x-batch-sha256", "zz")
        .body("{}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    srv.stop().await;
}

/// The measured run of docs/benchmarks.md: 1,000,000 devices (about
/// 2.2 GB) streamed through `/v1/import` over a plain HTTP/1.1 chunked
/// upload, the batch made on the fly (never held whole), into SQLite.
/// `MICROCERT_IMPORT_N` changes the count. Run it alone, in release:
/// `cargo test --release -p microcert-server --test import_stream -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measured run: 1,000,000 devices, about 2.2 GB through loopback"]
async fn one_million_devices_streamed_into_sqlite() {
    use std::io::{Read, Write};
    let n: u64 = std::env::var("MICROCERT_IMPORT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let srv = TestServer::start().await;
    let token = create(&srv.center, Role::Operator, "alice", None, "test").unwrap();
    let center = srv.center.clone();
    let addr = srv.http;
    let (raw, secs) = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /v1/import HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {}\r\n\
             X-Batch-Lines: {n}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            token.as_str()
        )
        .unwrap();
        let mut r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            r.read_to_end(&mut all).unwrap();
            all
        });
        let started = std::time::Instant::now();
        let step = 1000;
        let mut lo = 0;
        while lo < n {
            let hi = (lo + step).min(n);
            let chunk = batch_range(center.card(), lo, hi);
            write!(s, "{:x}\r\n", chunk.len()).unwrap();
            s.write_all(&chunk).unwrap();
            s.write_all(b"\r\n").unwrap();
            lo = hi;
        }
        s.write_all(b"0\r\n\r\n").unwrap();
        let raw = reader.join().unwrap();
        (raw, started.elapsed().as_secs_f64())
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&raw);
    let done = text
        .lines()
        .filter_map(|l| serde_json::from_str::<ImportEvent>(l).ok())
        .find_map(|e| match e {
            ImportEvent::Done(s) => Some(s),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no summary in {}", &text[text.len().saturating_sub(500)..]));
    assert_eq!((done.lines, done.enrolled), (n, n));
    eprintln!(
        "{n} devices streamed and imported in {secs:.1} s: {:.0} seeds/s (batch made on the fly, same process)",
        n as f64 / secs
    );
    srv.stop().await;
}
