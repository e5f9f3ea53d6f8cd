//! The device and relying-party resources over CoAP (RFC 7252) on UDP,
//! with Block1 reassembly (RFC 7959) for ENROLL, which is over 1,000 bytes,
//! and de-duplication of confirmable retransmissions: a retransmitted AUTH
//! must get the same answer again, not a replay refusal.
//!
//! Performance shape: each worker is an OS thread blocked in `recv_from`
//! on the shared socket, which handles the datagram inline (the center's
//! calls are synchronous and short) and sends the answer: two system calls
//! per request, no task hand-off. The de-duplication map is sharded by
//! peer and message id, and the block-wise handler (one mutex, one state
//! entry per peer and path) is used only by requests that carry a Block1
//! or Block2 option or whose answer needs blocks.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use coap_lite::{
    BlockHandler, BlockHandlerConfig, CoapOption, CoapRequest, ContentFormat, MessageClass,
    MessageType, Packet, RequestType, ResponseType,
};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::api::{self, DeviceService, Route};

/// How long an answer is kept for a retransmitted confirmable request
/// (RFC 7252 EXCHANGE_LIFETIME).
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
/// Most answers kept for de-duplication, over all shards; older ones are
/// dropped first.
const DEDUP_CAPACITY: usize = 65_536;
const DEDUP_SHARDS: usize = 16;
/// Largest datagram read; larger ones are truncated and fail to parse.
const MAX_DATAGRAM: usize = 1500;
/// Answers up to this size are sent whole without the block handler
/// (its own limit is 1,152 bytes for the whole message).
const WHOLE_ANSWER: usize = 1024;
/// How often an idle worker looks at the shutdown flag.
const POLL: Duration = Duration::from_millis(100);

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

    fn put(&mut self, key: Key, bytes: Vec<u8>, capacity: usize) {
        if self.answers.len() >= capacity {
            self.answers
                .retain(|_, (at, _)| at.elapsed() < EXCHANGE_LIFETIME);
            if self.answers.len() >= capacity {
                self.answers.clear();
            }
        }
        self.answers.insert(key, (Instant::now(), bytes));
    }
}

struct Shared {
    svc: Arc<dyn DeviceService>,
    blocks: Mutex<BlockHandler<SocketAddr>>,
    dedup: Vec<Mutex<Dedup>>,
    hasher: RandomState,
}

impl Shared {
    fn dedup(&self, key: &Key) -> std::sync::MutexGuard<'_, Dedup> {
        let i = (self.hasher.hash_one(key) as usize) % DEDUP_SHARDS;
        self.dedup[i].lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Serves CoAP on `socket` with `workers` receive threads until `shutdown`
/// turns true. Requests in flight are finished first.
pub async fn serve(
    socket: UdpSocket,
    svc: Arc<dyn DeviceService>,
    workers: usize,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let socket = socket.into_std()?;
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(POLL))?;
    let socket = Arc::new(socket);
    let shared = Arc::new(Shared {
        svc,
        blocks: Mutex::new(BlockHandler::new(BlockHandlerConfig::default())),
        dedup: (0..DEDUP_SHARDS)
            .map(|_| Mutex::new(Dedup::default()))
            .collect(),
        hasher: RandomState::new(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let turn = Arc::new(Mutex::new(()));
    let mut threads = Vec::new();
    for i in 0..workers.max(1) {
        let (socket, shared, stop) = (socket.clone(), shared.clone(), stop.clone());
        let turn = turn.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("coap-{i}"))
                .spawn(move || worker(&socket, &turn, &shared, &stop))?,
        );
    }
    let _ = shutdown.wait_for(|stop| *stop).await;
    stop.store(true, Ordering::SeqCst);
    // The threads notice within one poll interval; wait off the runtime.
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await;
    Ok(())
}

/// One worker. Workers take turns to wait in `recv_from` (leader and
/// followers): several threads blocked on one UDP socket are all woken for
/// each datagram, and all but one go back to sleep; that herd cost a third
/// of the server's time. A follower waits on `turn` instead, which wakes
/// one thread at a time, and handles its datagram after passing the turn on.
fn worker(socket: &std::net::UdpSocket, turn: &Mutex<()>, shared: &Shared, stop: &AtomicBool) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::Relaxed) {
        let received = {
            let _turn = turn.lock().unwrap_or_else(PoisonError::into_inner);
            socket.recv_from(&mut buf)
        };
        let (n, peer) = match received {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "coap receive failed");
                continue;
            }
        };
        if let Some(bytes) = handle(shared, &buf[..n], peer)
            && let Err(e) = socket.send_to(&bytes, peer)
        {
            tracing::debug!(error = %e, %peer, "coap send failed");
        }
    }
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
    let confirmable = packet.header.get_type() == MessageType::Confirmable;
    if confirmable {
        let cached = shared.dedup(&key).get(&key);
        if cached.is_some() {
            return cached;
        }
    }
    let blockwise = packet.get_option(CoapOption::Block1).is_some()
        || packet.get_option(CoapOption::Block2).is_some();
    let mut req = CoapRequest::from_packet(packet, peer);
    req.response.as_ref()?;
    if blockwise {
        let intercepted = shared
            .blocks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .intercept_request(&mut req);
        match intercepted {
            Ok(true) => {}
            Ok(false) => {
                respond(shared, &mut req);
                block_response(shared, &mut req);
            }
            Err(e) => {
                req.apply_from_error(e);
            }
        }
    } else {
        respond(shared, &mut req);
        if req
            .response
            .as_ref()
            .is_some_and(|r| r.message.payload.len() > WHOLE_ANSWER)
        {
            block_response(shared, &mut req);
        }
    }
    let bytes = req.response?.message.to_bytes().ok()?;
    if confirmable {
        shared
            .dedup(&key)
            .put(key, bytes.clone(), DEDUP_CAPACITY / DEDUP_SHARDS);
    }
    Some(bytes)
}

/// Lets the block handler split an answer too large for one datagram.
fn block_response(shared: &Shared, req: &mut CoapRequest<SocketAddr>) {
    let _ = shared
        .blocks
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .intercept_response(req);
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
