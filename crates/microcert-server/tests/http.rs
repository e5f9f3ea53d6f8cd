//! The HTTP binding on a real loopback socket: every route of the OpenAPI
//! table is served, and the device resources answer with the statuses of
//! PROTOCOL.md section 8.

mod common;

use microcert_server::openapi::ROUTES;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_is_served() {
    let srv = common::TestServer::start().await;
    let client = client();
    for r in ROUTES {
        let path = r
            .path
            .replace("{device}", "0102030405060708")
            .replace("{action}", "suspend");
        let url = format!("http://{}{path}", srv.http);
        let req = match r.method {
            "get" => client.get(&url),
            "post" => client.post(&url).body(Vec::<u8>::new()),
            other => panic!("method {other} not in the test"),
        };
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let body = resp.bytes().await.unwrap();
        // Anything but "no such route": a refusal, an auth demand, a
        // success. A 404 must be the center's "unknown device", with a body.
        if status == 404 {
            let v: serde_json::Value = serde_json::from_slice(&body)
                .unwrap_or_else(|_| panic!("{} {path} is not served", r.method));
            assert_eq!(v["error"], "unknown-device", "{} {path}", r.method);
        }
        assert_ne!(status, 405, "{} {path} has the wrong method", r.method);
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_refusals_map_to_protocol_statuses() {
    let srv = common::TestServer::start().await;
    let client = client();
    let url = |p: &str| format!("http://{}{p}", srv.http);
    // A well-formed AUTH from a device the center does not know: 404.
    let auth = hex::decode(
        [
            "1101010203040506070800", /* gen 0 */
            "6ab0cbe8",               /* t */
            "0123456789abcdef",       /* r */
            "1122334455667788",       /* tag */
        ]
        .concat(),
    )
    .unwrap();
    let r = client
        .post(url("/v1/device/auth"))
        .body(auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unknown-device");
    // Malformed: 400.
    let r = client
        .post(url("/v1/device/auth"))
        .body(vec![0x11])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A command poll for an unknown device: 404; for a bad id: 400.
    let r = client
        .get(url("/v1/device/0102030405060708/command"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client
        .get(url("/v1/device/xyz/command"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    srv.stop().await;
}

/// An HTTP client; reqwest's TLS needs the process's rustls provider set.
fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}
