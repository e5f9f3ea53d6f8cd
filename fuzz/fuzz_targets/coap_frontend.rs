//! The CoAP front end (`microcert_server::coap::Frontend`) over a real
//! center (software card, SQLite file) on arbitrary datagrams from
//! arbitrary peers: never panics, and whatever it answers is a CoAP
//! message that parses, fits one datagram, and is never a 5.00 (garbage
//! is the client's fault, not the center's).
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use microcert_center::{Center, CenterConfig, SoftwareCard};
use microcert_server::api::DeviceService;
use microcert_server::coap::Frontend;
use microcert_server::limits::Limits;
use microcert_server::service::CenterService;

struct Setup {
    _dir: tempfile::TempDir,
    frontend: Frontend,
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
        let svc: Arc<dyn DeviceService> = Arc::new(CenterService::new(center));
        Setup {
            _dir: dir,
            frontend: Frontend::new(svc, Arc::new(Limits::default())),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    // Two bytes choose the peer's port, so per-peer state is exercised.
    let (port, datagram) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]), rest),
        _ => (0, data),
    };
    let peer = SocketAddr::from(([127, 0, 0, 1], port));
    if let Some(reply) = setup().frontend.handle(datagram, peer) {
        assert!(reply.len() <= 1280, "a reply larger than one datagram");
        let p = coap_lite::Packet::from_bytes(&reply).expect("the reply parses");
        let code = u8::from(p.header.code);
        assert_ne!(code, (5 << 5), "5.00 on garbage");
    }
});
