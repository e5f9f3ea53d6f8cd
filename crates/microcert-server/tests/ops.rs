//! Running like a production service, over real sockets on 127.0.0.1
//! (issue 15, items 1 to 3): a slowloris client is dropped within the
//! header timeout; a stalled database makes device requests shed with
//! 5.03 / 503 and Max-Age / Retry-After at once instead of blocking every
//! worker; readiness fails while the database stalls and comes back; the
//! operator listener is apart from the device listener; `/metrics` has
//! the documented names.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_lite::option_value::OptionValueU32;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use microcert_center::{Center, CenterConfig, SoftwareCard};
use microcert_core::{Audience, DeviceId, Suite};
use microcert_server::app::{App, Schedule, Settings};
use microcert_server::limits::LimitsConfig;
use microcert_server::run::Listeners;
use microcert_server::service::now;
use microcert_server::tokens::TokenStore;
use microcert_testkit::nodes::TestNode;
use tokio::sync::watch;

const DEVICE: u64 = 7;

struct Running {
    dir: tempfile::TempDir,
    center: Arc<Center>,
    http: SocketAddr,
    coap: SocketAddr,
    operator: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn start(limits: LimitsConfig, separate_operator: bool) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let card = Arc::new(SoftwareCard::ephemeral().unwrap());
        let center = Arc::new(
            Center::open_sqlite(&dir.path().join("center.db"), card, CenterConfig::default())
                .unwrap(),
        );
        center
            .register_device(DeviceId::from_u64(DEVICE), 1, None, 0, "test", now())
            .unwrap();
        let tokens = Arc::new(TokenStore::new(center.clone()));
        let mut schedule = Schedule::for_data_dir(dir.path());
        schedule.backup_interval_secs = 3600;
        let app = App::new(
            center.clone(),
            tokens,
            Settings {
                coap_workers: 2,
                limits,
                tls: None,
                schedule,
                access_log: true,
            },
        )
        .unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let listeners = Listeners::bind_all(any, any, separate_operator.then_some(any))
            .await
            .unwrap();
        let (http, coap) = listeners.addrs().unwrap();
        let operator = listeners.operator_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(app.run(listeners, rx));
        Running {
            dir,
            center,
            http,
            coap,
            operator,
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("stops")
            .unwrap()
            .unwrap();
    }

    fn db(&self) -> std::path::PathBuf {
        self.dir.path().join("center.db")
    }
}

/// One HTTP/1.1 request on a new connection; the whole answer (bounded).
fn http(addr: SocketAddr, method: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn command_poll(mid: u16) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Get);
    p.header.message_id = mid;
    p.set_token(mid.to_be_bytes().to_vec());
    let path = format!("v1/device/{}/command", DeviceId::from_u64(DEVICE));
    for seg in path.split('/') {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    p.to_bytes().unwrap()
}

fn coap_post(mid: u16, path: &str, body: &[u8]) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = mid;
    p.set_token(mid.to_be_bytes().to_vec());
    for seg in path.split('/') {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    p.payload = body.to_vec();
    p.to_bytes().unwrap()
}

fn answer(s: &UdpSocket, mid: u16) -> Option<Packet> {
    let mut buf = [0u8; 1600];
    loop {
        let (n, _) = s.recv_from(&mut buf).ok()?;
        let p = Packet::from_bytes(&buf[..n]).unwrap();
        if p.header.message_id == mid {
            return Some(p);
        }
    }
}

/// Holds SQLite's write lock on `db` (another process's connection: a
/// backup tool, an administrator's shell) until dropped.
fn lock_database(db: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch("BEGIN IMMEDIATE;").unwrap();
    c
}

/// POSTs `body` on a new connection; the whole answer (bounded).
fn http_post(addr: SocketAddr, path: &str, body: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Slowloris: a client that sends its headers one line at a time, never
/// finishing them, is disconnected within the header timeout (it would
/// otherwise hold a connection and a task for as long as it likes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_headers_is_dropped_within_the_bound() {
    let srv = Running::start(
        LimitsConfig {
            http_header_timeout_ms: 1_000,
            ..LimitsConfig::default()
        },
        false,
    )
    .await;
    let addr = srv.http;
    let held = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let started = Instant::now();
        s.write_all(b"POST /v1/device/auth HTTP/1.1\r\nHost: t\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        // A header line every 200 ms for at most 15 s.
        for i in 0..75 {
            std::thread::sleep(Duration::from_millis(200));
            if s.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
                .is_err()
            {
                return started.elapsed();
            }
            match s.read(&mut buf) {
                // Closed (or a 408 and then closed): dropped.
                Ok(_) => return started.elapsed(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return started.elapsed(),
            }
        }
        started.elapsed()
    })
    .await
    .unwrap();
    assert!(
        held < Duration::from_secs(3),
        "a slowloris client held its connection for {held:?}"
    );
    srv.stop().await;
}

/// A database stalled by another process's lock: the first device request
/// (an ENROLL, which writes) waits on SQLite's busy timeout, but every
/// later one (AUTHs and command polls), over CoAP and HTTP, is answered
/// 5.03 / 503 with Max-Age / Retry-After at once (asserted: within 2 s, for
/// loaded CI machines) instead of blocking every worker for 10 s.
/// Readiness fails meanwhile,
/// the process keeps running, and both recover when the lock goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_database_sheds_device_requests_quickly() {
    let srv = Running::start(
        LimitsConfig {
            shed_after_ms: 300,
            ..LimitsConfig::default()
        },
        false,
    )
    .await;
    let (coap, http_addr, db) = (srv.coap, srv.http, srv.db());
    let id = DeviceId::from_u64(DEVICE);
    let mut node = TestNode::new(
        id,
        1,
        Suite::CMAC64,
        srv.center.card().transport_key(id, 0).unwrap(),
    );
    let enroll = node.enroll_transport(now());
    let auths: Vec<Vec<u8>> = (0..10)
        .map(|_| node.auth(&Audience::CENTER, now()).0)
        .collect();
    assert!(http(http_addr, "GET", "/readyz").starts_with("HTTP/1.1 200"));
    tokio::task::spawn_blocking(move || {
        let lock = lock_database(&db);
        // The ENROLL meets the lock and waits on SQLite's busy timeout.
        let first = std::thread::spawn(move || {
            http_post(
                http_addr,
                "/v1/device/enroll",
                &enroll,
                Duration::from_secs(15),
            )
        });
        std::thread::sleep(Duration::from_millis(600));

        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        for mid in 2..8u16 {
            let t = Instant::now();
            // AUTHs and command polls alike.
            let req = if mid % 2 == 0 {
                coap_post(mid, "v1/device/auth", &auths[usize::from(mid)])
            } else {
                command_poll(mid)
            };
            s.send_to(&req, coap).unwrap();
            let p = answer(&s, mid).expect("an answer while the database stalls");
            assert_eq!(
                p.header.code,
                MessageClass::Response(ResponseType::ServiceUnavailable)
            );
            let max_age = p
                .get_first_option_as::<OptionValueU32>(CoapOption::MaxAge)
                .map(|v| v.unwrap().0);
            assert_eq!(max_age, Some(1));
            assert_eq!(p.payload, b"unavailable");
            // Far below the 10 s busy timeout the request would have waited.
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        }
        let t = Instant::now();
        let r = http_post(
            http_addr,
            "/v1/device/auth",
            &auths[0],
            Duration::from_secs(5),
        );
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.to_ascii_lowercase().contains("retry-after: 1"), "{r}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // Not ready while the database does not answer (the probe's bound
        // is 2 s).
        let t = Instant::now();
        let r = http(http_addr, "GET", "/readyz");
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("\"not_shedding\":false"), "{r}");
        assert!(t.elapsed() < Duration::from_secs(4));

        drop(lock);
        // The stalled request finishes, and the next ones are served.
        let r = first.join().unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(&command_poll(100), coap).unwrap();
        let p = answer(&s, 100).unwrap();
        assert_eq!(p.header.code, MessageClass::Response(ResponseType::Content));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = http(http_addr, "GET", "/readyz");
            if r.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(Instant::now() < deadline, "never ready again: {r}");
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .unwrap();
    srv.stop().await;
}

/// `operator_http`: the operator API, the relying-party resources and
/// `/metrics` are on their own listener; the device listener serves the
/// device resources only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_listener_is_apart_from_the_device_listener() {
    let srv = Running::start(LimitsConfig::default(), true).await;
    let (dev, op) = (srv.http, srv.operator.expect("an operator listener"));
    tokio::task::spawn_blocking(move || {
        let poll = format!("/v1/device/{}/command", DeviceId::from_u64(DEVICE));
        // Devices: the device resources, nothing else.
        assert!(http(dev, "GET", &poll).starts_with("HTTP/1.1 204"));
        for path in ["/v1/devices", "/metrics", "/v1/audit", "/v1/openapi.json"] {
            let r = http(dev, "GET", path);
            assert!(r.starts_with("HTTP/1.1 404"), "{path} on devices: {r}");
        }
        let r = http(dev, "POST", "/v1/verify");
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        // Operators: the API (behind its tokens), readiness and metrics.
        assert!(http(op, "GET", "/v1/devices").starts_with("HTTP/1.1 401"));
        assert!(http(op, "POST", "/v1/verify").starts_with("HTTP/1.1 401"));
        assert!(http(op, "GET", "/readyz").starts_with("HTTP/1.1 200"));
        assert!(http(op, "GET", &poll).starts_with("HTTP/1.1 404"));
        // Every answer carries its request id.
        let r = http(op, "GET", "/healthz");
        assert!(r.to_ascii_lowercase().contains("x-request-id: "), "{r}");
        let metrics = http(op, "GET", "/metrics");
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        for name in [
            "microcert_request_duration_seconds_bucket{transport=\"http\",resource=\"command\"",
            "microcert_seed_cache_devices",
            "microcert_seed_cache_hits_total",
            "microcert_replay_guard_entries",
            "microcert_audit_entries",
            "microcert_center_calls_in_flight",
            "microcert_shedding",
            "microcert_clock_step_alarm",
            "microcert_card_probe_seconds_bucket",
            "microcert_database_probe_seconds_bucket",
            "microcert_ready",
        ] {
            assert!(metrics.contains(name), "no {name} in\n{metrics}");
        }
    })
    .await
    .unwrap();
    srv.stop().await;
}

/// A body beyond a device resource's bound is refused before the center
/// sees it (413), while the relying-party resources take theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_bodies_are_bounded_per_route() {
    let srv = Running::start(LimitsConfig::default(), false).await;
    let addr = srv.http;
    tokio::task::spawn_blocking(move || {
        let post = |path: &str, len: usize| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(
                s,
                "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let _ = s.write_all(&vec![0u8; len]);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        };
        let r = post("/v1/device/auth", 4 * 1024);
        assert!(r.starts_with("HTTP/1.1 413"), "{r}");
        let r = post("/v1/device/auth", 64);
        assert!(!r.starts_with("HTTP/1.1 413"), "{r}");
        // 4 KiB to /v1/verify is within its bound: refused for the token.
        let r = post("/v1/verify", 4 * 1024);
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    })
    .await
    .unwrap();
    srv.stop().await;
}

/// deploy/grafana-dashboard.json queries only metrics the server emits
/// (a string literal in its sources), so a renamed metric cannot leave the
/// dashboard silently empty.
#[test]
fn the_dashboard_uses_the_documented_metric_names() {
    let dashboard = include_str!("../../../deploy/grafana-dashboard.json");
    let sources = [
        include_str!("../src/observe.rs"),
        include_str!("../src/shed.rs"),
        include_str!("../src/service.rs"),
        include_str!("../src/limits.rs"),
        include_str!("../src/run.rs"),
        include_str!("../src/app.rs"),
    ]
    .concat();
    let v: serde_json::Value = serde_json::from_str(dashboard).unwrap();
    assert!(v["panels"].as_array().unwrap().len() >= 10);
    let mut seen = 0;
    for (i, _) in dashboard.match_indices("microcert_") {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = name
            .strip_suffix("_bucket")
            .unwrap_or(&name)
            .trim_end_matches('_');
        if base == "microcert" {
            continue;
        }
        seen += 1;
        assert!(
            sources.contains(&format!("\"{base}\"")),
            "{base} is not a metric the server emits"
        );
    }
    assert!(seen > 20);
}

/// A body trickled byte by byte is cut off by the request timeout: on a
/// device resource (the whole request) and on an operator route (the
/// reading of its body, before any token is looked at), each answered 408
/// or closed within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_a_body_is_cut_off() {
    let srv = Running::start(
        LimitsConfig {
            http_request_timeout_secs: 1,
            ..LimitsConfig::default()
        },
        false,
    )
    .await;
    let addr = srv.http;
    tokio::task::spawn_blocking(move || {
        for path in ["/v1/device/auth", "/v1/devices/bulk"] {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let started = Instant::now();
            write!(
                s,
                "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n"
            )
            .unwrap();
            let mut buf = [0u8; 512];
            let mut answer = String::new();
            for _ in 0..75 {
                std::thread::sleep(Duration::from_millis(200));
                if s.write_all(b"x").is_err() {
                    break;
                }
                match s.read(&mut buf) {
                    Ok(n) => {
                        answer = String::from_utf8_lossy(&buf[..n]).into_owned();
                        break;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            let held = started.elapsed();
            assert!(held < Duration::from_secs(3), "{path}: held {held:?}");
            assert!(
                answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
                "{path}: {answer}"
            );
        }
    })
    .await
    .unwrap();
    srv.stop().await;
}

/// The HTTP concurrency limit: with one request in progress (an ENROLL
/// stalled on the database) and a limit of one, the next request, even
/// `/healthz`, is 503 with Retry-After at once instead of queueing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_concurrency_limit_are_503() {
    let srv = Running::start(
        LimitsConfig {
            http_max_in_flight: 1,
            ..LimitsConfig::default()
        },
        false,
    )
    .await;
    let (http_addr, db) = (srv.http, srv.db());
    let id = DeviceId::from_u64(DEVICE);
    let mut node = TestNode::new(
        id,
        1,
        Suite::CMAC64,
        srv.center.card().transport_key(id, 0).unwrap(),
    );
    let enroll = node.enroll_transport(now());
    tokio::task::spawn_blocking(move || {
        assert!(http(http_addr, "GET", "/healthz").starts_with("HTTP/1.1 200"));
        let lock = lock_database(&db);
        let first = std::thread::spawn(move || {
            http_post(
                http_addr,
                "/v1/device/enroll",
                &enroll,
                Duration::from_secs(15),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let r = http(http_addr, "GET", "/healthz");
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.to_ascii_lowercase().contains("retry-after: 1"), "{r}");
        assert!(t.elapsed() < Duration::from_secs(2));
        drop(lock);
        let r = first.join().unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(http(http_addr, "GET", "/healthz").starts_with("HTTP/1.1 200"));
    })
    .await
    .unwrap();
    srv.stop().await;
}
