//! The HTTP device and relying-party routes (`device_routes`) over a real
//! center on arbitrary requests: a route chosen by the first byte, a
//! device id and a body from the rest. Never panics, never answers 500
//! (garbage is the client's fault), and every answer is one the API
//! documents.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Method, Request};
use libfuzzer_sys::fuzz_target;
use microcert_center::{Center, CenterConfig, SoftwareCard};
use microcert_server::api::DeviceService;
use microcert_server::http::{HttpState, device_routes};
use microcert_server::limits::Limits;
use microcert_server::service::CenterService;
use microcert_server::tokens::TokenStore;
use tower::ServiceExt;

struct Setup {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    router: axum::Router,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let card = Arc::new(SoftwareCard::ephemeral().unwrap());
        let center = Arc::new(
            Center::open_sqlite(&dir.path().join("center.db"), card, CenterConfig::default())
                .unwrap(),
        );
        let svc: Arc<dyn DeviceService> = Arc::new(CenterService::new(center.clone()));
        let router = device_routes(HttpState {
            svc,
            tokens: Arc::new(TokenStore::new(center)),
            limits: Arc::new(Limits::default()),
        });
        Setup {
            _dir: dir,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            router,
        }
    })
}

const ROUTES: [(&str, &str); 8] = [
    ("POST", "/v1/device/enroll"),
    ("POST", "/v1/device/auth"),
    ("POST", "/v1/device/challenge"),
    ("POST", "/v1/device/auth-response"),
    ("POST", "/v1/device/receipt"),
    ("GET", "/v1/device/{}/command"),
    ("POST", "/v1/verify"),
    ("POST", "/v1/open"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (method, path) = ROUTES[usize::from(sel) % ROUTES.len()];
    let (id, body) = rest.split_at(rest.len().min(8));
    let path = path.replace("{}", &hex::encode(id));
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(path);
    if sel & 0x80 != 0 {
        // A bearer token made of the body's first bytes.
        let token: String = body.iter().take(40).map(|b| char::from(b'a' + b % 26)).collect();
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req.body(Body::from(body.to_vec())).unwrap();
    let s = setup();
    let status = s
        .rt
        .block_on(s.router.clone().oneshot(req))
        .expect("the router is infallible")
        .status()
        .as_u16();
    assert_ne!(status, 500, "500 on a garbage request");
    assert!(
        [200, 204, 400, 401, 403, 404, 405, 409, 410, 413, 415, 422, 429, 503].contains(&status),
        "an undocumented status {status}"
    );
});
