//! The device and relying-party resources over CoAP (RFC 7252) on UDP,
//! with Block1 reassembly (RFC 7959) for ENROLL, which is over 1,000 bytes,
//! and de-duplication of confirmable retransmissions: a retransmitted AUTH
//! must get the same answer again, not a replay refusal.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use coap_lite::{
    BlockHandler, BlockHandlerConfig, CoapRequest, ContentFormat, MessageClass, MessageType,
    Packet, RequestType, ResponseType,
};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::api::{self, DeviceService, Route};

/// How long an answer is kept for a retransmitted confirmable request
/// (RFC 7252 EXCHANGE_LIFETIME).
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
/// Most answers kept for de-duplication; older ones are dropped first.
const DEDUP_CAPACITY: usize = 65_536;
/// Largest datagram read; larger ones are truncated and fail to parse.
const MAX_DATAGRAM: usize = 1500;

type Key = (SocketAddr, u16);

/// Answers sent recently, by peer and message id.
#[derive(Default)]
struct Dedup {
    answers: HashMap<Key, (Instant, Vec<u8>)>,
}

impl Dedup {
    fn get(&self, key: &Key) -> Option<Vec<u8>> {
        self.answers
            .get(key)
            .filter(|(at, _)| at.elapsed() < EXCHANGE_LIFETIME)
            .map(|(_, bytes)| bytes.clone())
    }

    fn put(&mut self, key: Key, bytes: Vec<u8>) {
        if self.answers.len() >= DEDUP_CAPACITY {
            self.answers
                .retain(|_, (at, _)| at.elapsed() < EXCHANGE_LIFETIME);
            if self.answers.len() >= DEDUP_CAPACITY {
                self.answers.clear();
            }
        }
        self.answers.insert(key, (Instant::now(), bytes));
    }
}

struct Shared {
    svc: Arc<dyn DeviceService>,
    blocks: Mutex<BlockHandler<SocketAddr>>,
    dedup: Mutex<Dedup>,
}

/// Serves CoAP on `socket` with `workers` concurrent receive loops until
/// `shutdown` turns true. Requests in flight are finished first.
pub async fn serve(
    socket: UdpSocket,
    svc: Arc<dyn DeviceService>,
    workers: usize,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let socket = Arc::new(socket);
    let shared = Arc::new(Shared {
        svc,
        blocks: Mutex::new(BlockHandler::new(BlockHandlerConfig::default())),
        dedup: Mutex::new(Dedup::default()),
    });
    let mut tasks = Vec::new();
    for _ in 0..workers.max(1) {
        let socket = socket.clone();
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                let (n, peer) = tokio::select! {
                    r = socket.recv_from(&mut buf) => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::debug!(error = %e, "coap receive failed");
                            continue;
                        }
                    },
                    _ = stop.changed() => break,
                };
                let reply = tokio::task::block_in_place(|| handle(&shared, &buf[..n], peer));
                if let Some(bytes) = reply
                    && let Err(e) = socket.send_to(&bytes, peer).await
                {
                    tracing::debug!(error = %e, %peer, "coap send failed");
                }
            }
        }));
    }
    let _ = shutdown.wait_for(|stop| *stop).await;
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// Handles one datagram; returns the datagram to send back, if any.
/// Garbage is dropped silently (no reply), as RFC 7252 allows.
fn handle(shared: &Shared, datagram: &[u8], peer: SocketAddr) -> Option<Vec<u8>> {
    let packet = Packet::from_bytes(datagram).ok()?;
    match packet.header.code {
        MessageClass::Request(_) => {}
        MessageClass::Empty if packet.header.get_type() == MessageType::Confirmable => {
            // A CoAP ping: answer with a reset.
            let mut rst = Packet::new();
            rst.header.set_type(MessageType::Reset);
            rst.header.message_id = packet.header.message_id;
            return rst.to_bytes().ok();
        }
        _ => return None,
    }
    let key = (peer, packet.header.message_id);
    if packet.header.get_type() == MessageType::Confirmable {
        let cached = shared
            .dedup
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key);
        if cached.is_some() {
            return cached;
        }
    }
    let confirmable = packet.header.get_type() == MessageType::Confirmable;
    let mut req = CoapRequest::from_packet(packet, peer);
    req.response.as_ref()?;
    let intercepted = shared
        .blocks
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .intercept_request(&mut req);
    match intercepted {
        Ok(true) => {}
        Ok(false) => {
            respond(shared, &mut req);
            let _ = shared
                .blocks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .intercept_response(&mut req);
        }
        Err(e) => {
            req.apply_from_error(e);
        }
    }
    let bytes = req.response?.message.to_bytes().ok()?;
    if confirmable {
        shared
            .dedup
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .put(key, bytes.clone());
    }
    Some(bytes)
}

fn respond(shared: &Shared, req: &mut CoapRequest<SocketAddr>) {
    let post = match req.message.header.code {
        MessageClass::Request(RequestType::Post) => Some(true),
        MessageClass::Request(RequestType::Get) => Some(false),
        _ => None,
    };
    let route = match post {
        Some(post) => api::route(post, &req.get_path()),
        None => Route::WrongMethod,
    };
    let Some(resp) = req.response.as_mut() else {
        return;
    };
    let (status, format, payload) = match route {
        Route::Device(res) => {
            let body = std::mem::take(&mut req.message.payload);
            match api::serve_device(shared.svc.as_ref(), res, &body) {
                Ok(body) => {
                    let status = if post == Some(true) {
                        ResponseType::Changed
                    } else {
                        ResponseType::Content
                    };
                    let body = body.unwrap_or_default();
                    let format =
                        (!body.is_empty()).then_some(ContentFormat::ApplicationOctetStream);
                    (status, format, body)
                }
                Err(refusal) => (
                    refusal.coap_status(),
                    Some(ContentFormat::TextPlain),
                    refusal.kind().as_bytes().to_vec(),
                ),
            }
        }
        Route::WrongMethod => (ResponseType::MethodNotAllowed, None, Vec::new()),
        Route::NotFound => (ResponseType::NotFound, None, Vec::new()),
    };
    resp.set_status(status);
    if let Some(format) = format {
        resp.message.set_content_format(format);
    }
    resp.message.payload = payload;
}
