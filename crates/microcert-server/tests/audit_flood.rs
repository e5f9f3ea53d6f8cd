//! Failed operator authentications are audited (issue 15 item 5), but
//! they come from unauthenticated peers: a flood of bad tokens from many
//! addresses must not grow the audit table without bound. One entry per
//! source per window with its count, at most AUTH_FAILURE_SOURCES + 1 a
//! window; the Prometheus counter counts every one. Real HTTP on
//! 127.0.0.x.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;

use microcert_server::tokens::{AUTH_FAILURE_SOURCES, AUTH_FAILURE_WINDOW, Role, create};

const SOURCES: u8 = 40;
const PER_SOURCE: u64 = 25;

fn count_of(reason: &str) -> u64 {
    reason
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {reason:?}"))
}

/// Attack: an unauthenticated peer floods the operator API with made-up
/// tokens from 40 addresses (and a holder of a read-only token tries the
/// write routes). Defence: each refusal is counted; the audit log gets one
/// aggregated entry per source and window, the sources beyond the bound
/// summed in one more, so the flood costs at most AUTH_FAILURE_SOURCES + 1
/// entries a window and none is lost from the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_tokens_is_audited_in_bounded_entries() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let srv = common::TestServer::start().await;
    let auditor = create(&srv.center, Role::Auditor, "reader", None, "test").unwrap();
    let base = format!("http://{}", srv.http);
    let before = srv.center.audit_log(0, 100_000).unwrap().len();

    let mut sent = 0u64;
    for i in 0..SOURCES {
        let ip: IpAddr = format!("127.0.0.{}", 10 + i).parse().unwrap();
        let client = reqwest::Client::builder()
            .local_address(ip)
            .build()
            .unwrap();
        for j in 0..PER_SOURCE {
            let r = client
                .get(format!("{base}/v1/devices"))
                .bearer_auth(format!("mct_made_up_{i}_{j}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401);
            sent += 1;
        }
    }
    // A valid token without the role: forbidden, counted too.
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/updates/due"))
        .bearer_auth(auditor.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    sent += 1;

    // Every refusal is counted at once.
    assert_eq!(srv.tokens.failures_total(), sent);

    // The window's aggregate (written at its end; here at once), after a
    // window that may have closed during the test was written.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let tokens = srv.tokens.clone();
    tokio::task::spawn_blocking(move || {
        let last = tokens.closed_failures(None);
        tokens.write_failures(&last);
    })
    .await
    .unwrap();

    let log = srv.center.audit_log(0, 100_000).unwrap();
    let failures: Vec<_> = log
        .iter()
        .filter(|r| r.entry.action == "auth-failure")
        .collect();
    assert!(!failures.is_empty(), "failed authentications are audited");
    assert_eq!(
        failures
            .iter()
            .map(|r| count_of(&r.entry.reason))
            .sum::<u64>(),
        sent,
        "no failure lost from the aggregate"
    );
    // Bounded: per window, at most AUTH_FAILURE_SOURCES + 1 entries.
    let mut per_window: BTreeMap<u64, usize> = BTreeMap::new();
    for r in &failures {
        *per_window.entry(r.entry.time).or_default() += 1;
    }
    for (end, n) in &per_window {
        assert_eq!(end % AUTH_FAILURE_WINDOW, 0);
        assert!(
            *n <= AUTH_FAILURE_SOURCES + 1,
            "{n} entries in the window ending {end}"
        );
    }
    assert!(per_window.len() <= 2, "the test spans at most two windows");
    assert!(log.len() - before <= 2 * (AUTH_FAILURE_SOURCES + 1) + 1);
    // The sources beyond the bound are summed, not dropped.
    assert!(failures.iter().any(|r| r.entry.actor == "other-sources"));
    assert!(failures.iter().any(|r| r.entry.actor == "127.0.0.10"));
    assert!(
        failures
            .iter()
            .any(|r| r.entry.reason.contains("1 with a token lacking the role"))
    );
    assert_eq!(srv.center.verify_audit().unwrap().1, None);
    srv.stop().await;
}

/// A configured audit sink that cannot record: the operator API answers
/// 503 with `"error": "audit-sink"` and nothing changes (here a backup,
/// which is audited before it is made).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_sink_cannot_record_is_503_and_changes_nothing() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let srv = common::TestServer::start().await;
    let operator = create(&srv.center, Role::Operator, "alice", None, "test").unwrap();
    let sink_path = srv.dir.path().join("audit.jsonl");
    srv.center
        .set_audit_sink(std::sync::Arc::new(
            microcert_center::audit::FileSink::open(&sink_path).unwrap(),
        ))
        .unwrap();
    std::fs::remove_file(&sink_path).unwrap();
    std::fs::create_dir(&sink_path).unwrap();
    let before = srv.center.audit_log(0, 1000).unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/backups", srv.http))
        .bearer_auth(operator.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "audit-sink", "{body}");
    assert_eq!(srv.center.audit_log(0, 1000).unwrap(), before);
    assert!(
        !srv.dir.path().join("backups").exists()
            || std::fs::read_dir(srv.dir.path().join("backups"))
                .unwrap()
                .next()
                .is_none()
    );
    srv.stop().await;
}
