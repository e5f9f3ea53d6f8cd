//! Bounded unauthenticated work over real sockets on 127.0.0.1: the CoAP
//! Block1 bounds (per transfer, per peer, overall, by age) and the rate
//! limits (4.29 with Max-Age, 429 with Retry-After, bounded key state).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use coap_lite::block_handler::BlockValue;
use coap_lite::option_value::OptionValueU32;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use microcert_server::limits::{LimitsConfig, Rate};

fn socket(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind(format!("{ip}:0")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

fn post(mid: u16, path: &str, body: &[u8], block1: Option<BlockValue>) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = mid;
    p.set_token(mid.to_be_bytes().to_vec());
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    if let Some(b) = block1 {
        p.add_option_as(CoapOption::Block1, b);
    }
    p.payload = body.to_vec();
    p.to_bytes().unwrap()
}

/// Sends one datagram and waits for the answer with the same message id.
fn exchange(s: &UdpSocket, to: SocketAddr, datagram: &[u8]) -> Packet {
    let mid = Packet::from_bytes(datagram).unwrap().header.message_id;
    s.send_to(datagram, to).unwrap();
    let mut buf = [0u8; 1600];
    for _ in 0..20 {
        let (n, _) = s.recv_from(&mut buf).expect("an answer within 2 s");
        let p = Packet::from_bytes(&buf[..n]).unwrap();
        if p.header.message_id == mid {
            return p;
        }
    }
    panic!("no answer to message {mid}");
}

fn code(p: &Packet) -> ResponseType {
    match p.header.code {
        MessageClass::Response(r) => r,
        other => panic!("not a response: {other:?}"),
    }
}

fn block(num: usize, more: bool, size: usize) -> Option<BlockValue> {
    Some(BlockValue::new(num, more, size).unwrap())
}

fn u32_option(p: &Packet, o: CoapOption) -> Option<u32> {
    p.get_first_option_as::<OptionValueU32>(o)
        .map(|v| v.unwrap().0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block1_transfer_beyond_the_largest_message_is_4_13_with_size1() {
    let srv = common::TestServer::start().await;
    let max = LimitsConfig::default().max_block1_body;
    let coap = srv.coap;
    tokio::task::spawn_blocking(move || {
        let s = socket("127.0.0.1");
        let mut mid = 1u16;
        let mut last = None;
        // 64-byte blocks until the total passes the limit.
        for num in 0..(max / 64 + 2) {
            let r = exchange(
                &s,
                coap,
                &post(mid, "/v1/device/enroll", &[0; 64], block(num, true, 64)),
            );
            mid += 1;
            if code(&r) != ResponseType::Continue {
                last = Some((num, r));
                break;
            }
        }
        let (num, r) = last.expect("the transfer was refused");
        assert_eq!(num, max / 64, "refused exactly at the limit");
        assert_eq!(code(&r), ResponseType::RequestEntityTooLarge);
        assert_eq!(u32_option(&r, CoapOption::Size1), Some(max as u32));
        // The transfer is gone: continuing it is incomplete.
        let r = exchange(
            &s,
            coap,
            &post(mid, "/v1/device/enroll", &[0; 64], block(1, true, 64)),
        );
        assert_eq!(code(&r), ResponseType::RequestEntityIncomplete);
    })
    .await
    .unwrap();
    srv.stop().await;
}

const RESOURCES: [&str; 4] = ["enroll", "auth", "auth-response", "receipt"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block1_transfers_are_bounded_per_peer_address_and_by_age() {
    let srv = common::TestServer::start_with(microcert_server::limits::Limits::new(LimitsConfig {
        block1_per_peer: 3,
        block1_lifetime_secs: 1,
        ..LimitsConfig::default()
    }))
    .await;
    let coap = srv.coap;
    tokio::task::spawn_blocking(move || {
        // Three transfers from three ports of one address are held; a
        // fourth, from yet another port, is refused.
        let mut mid = 100;
        for path in &RESOURCES[..3] {
            let s = socket("127.0.0.1");
            let r = exchange(
                &s,
                coap,
                &post(
                    mid,
                    &format!("/v1/device/{path}"),
                    &[0; 64],
                    block(0, true, 64),
                ),
            );
            mid += 1;
            assert_eq!(code(&r), ResponseType::Continue, "{path}");
        }
        let s = socket("127.0.0.1");
        let r = exchange(
            &s,
            coap,
            &post(mid, "/v1/device/receipt", &[0; 64], block(0, true, 64)),
        );
        assert_eq!(code(&r), ResponseType::RequestEntityTooLarge);
        // Another address is not affected.
        let other = socket("127.0.0.2");
        let r = exchange(
            &other,
            coap,
            &post(mid + 1, "/v1/device/receipt", &[0; 64], block(0, true, 64)),
        );
        assert_eq!(code(&r), ResponseType::Continue);
        // Once the transfers have expired, the address may start again.
        std::thread::sleep(Duration::from_millis(1_100));
        let r = exchange(
            &s,
            coap,
            &post(mid + 2, "/v1/device/receipt", &[0; 64], block(0, true, 64)),
        );
        assert_eq!(code(&r), ResponseType::Continue);
        // And an expired transfer cannot be continued.
        std::thread::sleep(Duration::from_millis(1_100));
        let r = exchange(
            &s,
            coap,
            &post(mid + 3, "/v1/device/receipt", &[0; 64], block(1, true, 64)),
        );
        assert_eq!(code(&r), ResponseType::RequestEntityIncomplete);
    })
    .await
    .unwrap();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block1_transfers_are_bounded_overall() {
    let srv = common::TestServer::start_with(microcert_server::limits::Limits::new(LimitsConfig {
        block1_total: 5,
        ..LimitsConfig::default()
    }))
    .await;
    let coap = srv.coap;
    tokio::task::spawn_blocking(move || {
        let mut held = 0;
        let mut refused = 0;
        for i in 0..8u16 {
            let s = socket(&format!("127.0.0.{}", 10 + i));
            let r = exchange(
                &s,
                coap,
                &post(i, "/v1/device/enroll", &[0; 64], block(0, true, 64)),
            );
            match code(&r) {
                ResponseType::Continue => held += 1,
                ResponseType::RequestEntityTooLarge => refused += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((held, refused), (5, 3));
    })
    .await
    .unwrap();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_enroll_in_blocks_still_reaches_the_center() {
    let srv = common::TestServer::start().await;
    let mut c = microcert_server::coap_client::CoapClient::connect(srv.coap)
        .await
        .unwrap();
    // 1,017 bytes of garbage: two blocks, reassembled, refused by the
    // center as malformed or unknown (not by the transport).
    let r = c.post("/v1/device/enroll", &[0x5A; 1_017]).await.unwrap();
    assert!(
        matches!(
            r.code,
            ResponseType::BadRequest | ResponseType::NotFound | ResponseType::Unauthorized
        ),
        "{r:?}"
    );
    srv.stop().await;
}

fn tight() -> microcert_server::limits::Limits {
    microcert_server::limits::Limits::new(LimitsConfig {
        per_source: Rate {
            per_second: 1,
            burst: 20,
        },
        per_device: Rate {
            per_second: 1,
            burst: 10,
        },
        challenges_per_device: Rate {
            per_second: 1,
            burst: 5,
        },
        max_keys: 256,
        ..LimitsConfig::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenges_beyond_the_device_budget_are_4_29_with_max_age() {
    let srv = common::TestServer::start_with(tight()).await;
    let coap = srv.coap;
    tokio::task::spawn_blocking(move || {
        let s = socket("127.0.0.1");
        let mut codes = Vec::new();
        let mut max_age = None;
        for mid in 0..8u16 {
            let r = exchange(&s, coap, &post(mid, "/v1/device/challenge", &[3; 8], None));
            codes.push(code(&r));
            if code(&r) == ResponseType::TooManyRequests {
                max_age = u32_option(&r, CoapOption::MaxAge);
            }
        }
        let served = codes
            .iter()
            .filter(|c| **c == ResponseType::Changed)
            .count();
        assert_eq!(served, 5, "{codes:?}");
        assert!(
            codes[5..]
                .iter()
                .all(|c| *c == ResponseType::TooManyRequests)
        );
        assert!(matches!(max_age, Some(1..=2)), "{max_age:?}");
        // Another device is served.
        let r = exchange(&s, coap, &post(50, "/v1/device/challenge", &[4; 8], None));
        assert_eq!(code(&r), ResponseType::Changed);
    })
    .await
    .unwrap();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_beyond_the_source_budget_is_4_29_and_key_state_stays_bounded() {
    let srv = common::TestServer::start_with(tight()).await;
    let coap = srv.coap;
    let limits = srv.limits.clone();
    tokio::task::spawn_blocking(move || {
        let s = socket("127.0.0.1");
        // Garbage AUTHs naming 1,000 different device ids, from one address.
        let mut limited = 0;
        for i in 0..1_000u16 {
            let mut body = vec![1u8, 1];
            body.extend_from_slice(&u64::from(i).to_be_bytes());
            body.resize(39, 0);
            let r = exchange(&s, coap, &post(i, "/v1/device/auth", &body, None));
            if code(&r) == ResponseType::TooManyRequests {
                limited += 1;
                assert!(u32_option(&r, CoapOption::MaxAge).is_some());
            }
        }
        assert!(limited >= 970, "{limited}");
        // Device ids sprayed from many addresses: the state stays bounded.
        for i in 0..2_000u16 {
            let s = socket(&format!("127.0.{}.{}", 1 + i / 250, 1 + i % 250));
            s.send_to(
                &post(i, "/v1/device/challenge", &u64::from(i).to_be_bytes(), None),
                coap,
            )
            .unwrap();
        }
        std::thread::sleep(Duration::from_millis(500));
        let (src, dev, chal) = limits.keys();
        assert!(
            src <= 256 && dev <= 256 && chal <= 256,
            "{src} {dev} {chal}"
        );
    })
    .await
    .unwrap();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_answers_429_with_retry_after() {
    let srv = common::TestServer::start_with(tight()).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/device/challenge", srv.http);
    let mut statuses = Vec::new();
    let mut retry = None;
    for _ in 0..8 {
        let r = client.post(&url).body(vec![6u8; 8]).send().await.unwrap();
        if r.status() == 429 {
            retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
        }
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    assert!(matches!(retry.as_deref(), Some("1" | "2")), "{retry:?}");
    // Unproven requests are charged to the source address too.
    let url = format!("http://{}/v1/device/auth", srv.http);
    let mut limited = false;
    for _ in 0..30 {
        let r = client.post(&url).body(vec![0u8; 5]).send().await.unwrap();
        limited |= r.status() == 429;
    }
    assert!(limited, "the source's budget ran out");
    srv.stop().await;
}
