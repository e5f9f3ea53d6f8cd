//! What a device resource reveals before a MAC verifies (docs/protocol.md,
//! "What a refusal reveals"): a device's existence is public (ids are
//! EUI-64s printed on labels; 404 for an unknown one), its state (revoked,
//! suspended, not active) is not: a message that does not verify gets 401
//! (CoAP 4.01) whatever the state, and only a valid one learns the state.
//! The table runs every device resource against every state.

use std::sync::Arc;

use axum::http::StatusCode;
use coap_lite::ResponseType;
use microcert_center::{Center, CenterConfig, SoftwareCard};
use microcert_core::{Audience, DeviceId, Suite};
use microcert_node::{EntropyFailure, Personalization, SecureChip, SoftChip};
use microcert_server::api::{DeviceResource, serve_device};
use microcert_server::service::{CenterService, now};

fn os_entropy(buf: &mut [u8]) -> Result<(), EntropyFailure> {
    getrandom::fill(buf).map_err(|_| EntropyFailure)
}

type Entropy = fn(&mut [u8]) -> Result<(), EntropyFailure>;

struct Dev {
    id: DeviceId,
    chip: SoftChip<Entropy>,
}

fn enrolled(center: &Center, n: u64) -> Dev {
    let id = DeviceId::from_u64(0x1000 + n);
    let t = now();
    center.register_device(id, 1, None, 0, "test", t).unwrap();
    let ktr = center.factory_transport_key(id, "test", t).unwrap();
    let mut chip = SoftChip::new(os_entropy as Entropy);
    chip.personalize(&Personalization {
        device: id,
        epoch: 0,
        suite: Suite::CMAC64,
        transport_key: ktr,
        class: 1,
        issued: t as u32,
    })
    .unwrap();
    let mut buf = vec![0u8; 2048];
    let n = chip.enroll(t as u32, &mut buf).unwrap();
    let receipt = center.enroll(&buf[..n], t).unwrap();
    chip.accept_receipt(&receipt).unwrap();
    let n = chip.auth(t as u32, &Audience::CENTER, &mut buf).unwrap();
    let out = center.verify_auth(&buf[..n], &Audience::CENTER, t).unwrap();
    chip.accept_receipt(&out.receipt).unwrap();
    Dev { id, chip }
}

/// A message of type `ty` for `id` with a zero tag (and body).
fn forged(ty: u8, id: DeviceId, generation: u8, len: usize) -> Vec<u8> {
    let mut m = vec![0u8; len];
    m[0] = 0x10 | ty;
    m[1] = 0x01;
    m[2..10].copy_from_slice(&id.0);
    m[10] = generation;
    m[11..15].copy_from_slice(&(now() as u32).to_be_bytes());
    m[15..23].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_be_bytes());
    m
}

fn status(svc: &CenterService, res: DeviceResource, body: &[u8]) -> u16 {
    match serve_device(svc, res, body) {
        Ok(Some(_)) => 200,
        Ok(None) => 204,
        Err(r) => {
            // CoAP tells the same: 4.01, 4.04 for 401, 404.
            let coap = r.coap_status();
            match r.http_status().as_u16() {
                401 => assert_eq!(coap, ResponseType::Unauthorized),
                404 => assert_eq!(coap, ResponseType::NotFound),
                _ => {}
            }
            r.http_status().as_u16()
        }
    }
}

#[test]
fn a_bad_mac_never_reveals_a_devices_state() {
    let dir = tempfile::tempdir().unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = Arc::new(
        Center::open_sqlite(&dir.path().join("c.db"), card, CenterConfig::default()).unwrap(),
    );
    let svc = CenterService::new(center.clone());
    let t = now();
    let good = enrolled(&center, 1);
    let mut suspended = enrolled(&center, 2);
    let mut revoked = enrolled(&center, 3);
    center.suspend(suspended.id, "op", "test", t).unwrap();
    center.revoke(revoked.id, "op", "test", t).unwrap();
    let unknown = DeviceId::from_u64(0xdead);

    // (state, auth, auth-response, enroll, receipt, command, challenge)
    let rows: [(&str, DeviceId, [u16; 6]); 4] = [
        ("unknown", unknown, [404, 404, 404, 404, 404, 200]),
        ("good", good.id, [401, 401, 401, 401, 204, 200]),
        ("suspended", suspended.id, [401, 401, 401, 401, 204, 200]),
        // A pending REVOKE is served to anyone (the node polls without
        // authenticating): documented as public by design.
        ("revoked", revoked.id, [401, 401, 401, 401, 200, 200]),
    ];
    let mut table = Vec::new();
    for (name, id, want) in rows {
        let challenge = center.issue_challenge(id, t).unwrap();
        let mut ar = forged(2, id, 0, 23 + 16 + 8);
        ar[23..39].copy_from_slice(&challenge);
        let got = [
            status(&svc, DeviceResource::Auth, &forged(1, id, 0, 31)),
            status(&svc, DeviceResource::AuthResponse, &ar),
            status(&svc, DeviceResource::Enroll, &forged(5, id, 1, 1_009)),
            status(&svc, DeviceResource::Receipt, &forged(7, id, 0, 40)),
            status(&svc, DeviceResource::Command(id), &[]),
            status(&svc, DeviceResource::Challenge, &id.0),
        ];
        table.push(format!("{name}: {got:?}"));
        assert_eq!(got, want, "{name}\n{}", table.join("\n"));
    }

    // With a valid MAC the state is told: 403 and its kind.
    let mut buf = vec![0u8; 128];
    for (dev, kind) in [(&mut suspended, "suspended"), (&mut revoked, "revoked")] {
        let n = dev
            .chip
            .auth(now() as u32 + 1, &Audience::CENTER, &mut buf)
            .unwrap();
        let r = serve_device(&svc, DeviceResource::Auth, &buf[..n]).unwrap_err();
        assert_eq!(r.http_status(), StatusCode::FORBIDDEN);
        assert_eq!(r.kind(), kind);
    }
}
