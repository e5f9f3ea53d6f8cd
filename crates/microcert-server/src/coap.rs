//! The device and relying-party resources over CoAP (RFC 7252) on UDP,
//! with Block1 reassembly (RFC 7959) for ENROLL, which is over 1,000 bytes,
//! and de-duplication of confirmable retransmissions: a retransmitted AUTH
//! must get the same answer again, not a replay refusal.
//!
//! Performance shape: each worker is an OS thread blocked in `recv_from`
//! on the shared socket, which handles the datagram inline (the center's
//! calls are synchronous and short) and sends the answer: two system calls
//! per request, no task hand-off. The de-duplication map is sharded by
//! peer, message id and token; the Block1 state (one mutex) is used only by
//! requests that carry a Block1 option.
//!
//! Bounds (see [`crate::limits::LimitsConfig`]): a Block1 transfer holds
//! at most `max_block1_body` bytes (an ENROLL and a margin; 4.13 with Size1
//! beyond), a peer address at most `block1_per_peer` transfers and the
//! server at most `block1_total` (4.13 beyond), each for at most
//! `block1_lifetime_secs`; transfers exist only for the device resources.
//! De-duplication keeps at most `dedup_capacity` answers, evicting the
//! oldest first, and only answers to requests that proved a device key:
//! an unauthenticated peer's answers are never kept (0 bytes, whatever
//! their size), and are computed again for a retransmission, which is
//! safe because they changed nothing. Answers always fit one datagram, so
//! Block2 is never used.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use coap_lite::block_handler::BlockValue;
use coap_lite::option_value::OptionValueU32;
use coap_lite::{
    CoapOption, CoapResponse, ContentFormat, MessageClass, MessageType, Packet, RequestType,
    ResponseType,
};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::api::{self, DeviceResource, DeviceService, Refusal, Route};
use crate::limits::{Limits, LimitsConfig, proven, retry_secs, source_key};

/// How long an answer is kept for a retransmitted confirmable request
/// (RFC 7252 EXCHANGE_LIFETIME).
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
const DEDUP_SHARDS: usize = 16;
/// Largest datagram read; larger ones are truncated and fail to parse.
const MAX_DATAGRAM: usize = 1500;
/// How often an idle worker looks at the shutdown flag.
const POLL: Duration = Duration::from_millis(100);

/// De-duplication key: peer, message id and token (at most 8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    peer: SocketAddr,
    mid: u16,
    token: [u8; 8],
    token_len: u8,
}

impl Key {
    fn of(peer: SocketAddr, packet: &Packet) -> Key {
        let t = packet.get_token();
        let mut token = [0u8; 8];
        let n = t.len().min(8);
        token[..n].copy_from_slice(&t[..n]);
        Key {
            peer,
            mid: packet.header.message_id,
            token,
            token_len: n as u8,
        }
    }
}

/// Answers sent recently, by peer, message id and token, evicted by age
/// (oldest first) when they expire or the shard is full.
#[derive(Default)]
struct Dedup {
    answers: HashMap<Key, (Instant, Vec<u8>)>,
    order: VecDeque<(Instant, Key)>,
}

impl Dedup {
    fn get(&self, key: &Key) -> Option<Vec<u8>> {
        self.answers
            .get(key)
            .filter(|(at, _)| at.elapsed() < EXCHANGE_LIFETIME)
            .map(|(_, bytes)| bytes.clone())
    }

    fn put(&mut self, key: Key, bytes: Vec<u8>, capacity: usize) {
        let now = Instant::now();
        while let Some(&(at, k)) = self.order.front() {
            let expired = now.duration_since(at) >= EXCHANGE_LIFETIME;
            if !expired && self.answers.len() < capacity && self.order.len() < 2 * capacity {
                break;
            }
            self.order.pop_front();
            if self.answers.get(&k).is_some_and(|(a, _)| *a == at) {
                self.answers.remove(&k);
            }
        }
        self.answers.insert(key, (now, bytes));
        self.order.push_back((now, key));
    }
}

/// A Block1 transfer in progress.
struct Transfer {
    body: Vec<u8>,
    started: Instant,
}

/// Block1 reassembly: one transfer per peer and resource, bounded in size,
/// in number per peer address and overall, and in age.
#[derive(Default)]
struct Transfers {
    map: HashMap<(SocketAddr, DeviceResource), Transfer>,
    per_peer: HashMap<u128, usize>,
}

/// What a Block1 block comes to.
enum Step {
    /// More blocks are expected: 2.31 Continue.
    Continue,
    /// The last block: the whole body.
    Complete(Vec<u8>),
    /// Refused; with Size1 (the largest body accepted) for 4.13.
    Refuse(ResponseType, Option<u32>),
}

impl Transfers {
    fn remove(&mut self, key: &(SocketAddr, DeviceResource)) -> Option<Transfer> {
        let t = self.map.remove(key)?;
        let src = source_key(key.0.ip());
        if let Some(n) = self.per_peer.get_mut(&src) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&src);
            }
        }
        Some(t)
    }

    fn sweep(&mut self, lifetime: Duration) {
        let old: Vec<_> = self
            .map
            .iter()
            .filter(|(_, t)| t.started.elapsed() >= lifetime)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            self.remove(&k);
        }
    }

    fn block(
        &mut self,
        cfg: &LimitsConfig,
        key: (SocketAddr, DeviceResource),
        b: &BlockValue,
        payload: &[u8],
    ) -> Step {
        let lifetime = Duration::from_secs(cfg.block1_lifetime_secs);
        let too_large = Step::Refuse(
            ResponseType::RequestEntityTooLarge,
            u32::try_from(cfg.max_block1_body).ok(),
        );
        // SZX 7 is BERT, for CoAP over TCP only.
        if b.size_exponent > 6 {
            self.remove(&key);
            return Step::Refuse(ResponseType::BadRequest, None);
        }
        let size = b.size();
        if (b.more && payload.len() != size) || payload.len() > size {
            self.remove(&key);
            return Step::Refuse(ResponseType::BadRequest, None);
        }
        let offset = usize::from(b.num) * size;
        if offset + payload.len() > cfg.max_block1_body {
            self.remove(&key);
            return too_large;
        }
        if b.num == 0 {
            self.remove(&key);
            if !b.more {
                return Step::Complete(payload.to_vec());
            }
            let src = source_key(key.0.ip());
            let full = |t: &Self| {
                t.map.len() >= cfg.block1_total
                    || t.per_peer.get(&src).copied().unwrap_or(0) >= cfg.block1_per_peer
            };
            if full(self) {
                self.sweep(lifetime);
                if full(self) {
                    return Step::Refuse(ResponseType::RequestEntityTooLarge, None);
                }
            }
            let mut body = Vec::with_capacity(cfg.max_block1_body.min(2 * size));
            body.extend_from_slice(payload);
            self.map.insert(
                key,
                Transfer {
                    body,
                    started: Instant::now(),
                },
            );
            *self.per_peer.entry(src).or_insert(0) += 1;
            return Step::Continue;
        }
        let fits = self
            .map
            .get(&key)
            .is_some_and(|t| t.started.elapsed() < lifetime && t.body.len() == offset);
        if !fits {
            self.remove(&key);
            return Step::Refuse(ResponseType::RequestEntityIncomplete, None);
        }
        if b.more {
            if let Some(t) = self.map.get_mut(&key) {
                t.body.extend_from_slice(payload);
            }
            return Step::Continue;
        }
        match self.remove(&key) {
            Some(mut t) => {
                t.body.extend_from_slice(payload);
                Step::Complete(t.body)
            }
            None => Step::Refuse(ResponseType::RequestEntityIncomplete, None),
        }
    }
}

struct Shared {
    svc: Arc<dyn DeviceService>,
    limits: Arc<Limits>,
    transfers: Mutex<Transfers>,
    dedup: Vec<Mutex<Dedup>>,
    hasher: RandomState,
}

impl Shared {
    fn new(svc: Arc<dyn DeviceService>, limits: Arc<Limits>) -> Self {
        Shared {
            svc,
            limits,
            transfers: Mutex::new(Transfers::default()),
            dedup: (0..DEDUP_SHARDS)
                .map(|_| Mutex::new(Dedup::default()))
                .collect(),
            hasher: RandomState::new(),
        }
    }

    fn dedup(&self, key: &Key) -> std::sync::MutexGuard<'_, Dedup> {
        let i = (self.hasher.hash_one(key) as usize) % DEDUP_SHARDS;
        self.dedup[i].lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The CoAP front end without its socket: what a worker does with one
/// datagram (parsing, de-duplication, Block1 reassembly, limits, the
/// resources). For the fuzz target of the front end and for tests.
#[allow(missing_debug_implementations)] // holds a trait object
pub struct Frontend(Shared);

impl Frontend {
    /// A front end over `svc` with `limits`.
    pub fn new(svc: Arc<dyn DeviceService>, limits: Arc<Limits>) -> Self {
        Frontend(Shared::new(svc, limits))
    }

    /// Handles one datagram from `peer`; the datagram to send back, if any.
    pub fn handle(&self, datagram: &[u8], peer: SocketAddr) -> Option<Vec<u8>> {
        handle(&self.0, datagram, peer)
    }
}

/// Serves CoAP on `socket` with `workers` receive threads until `shutdown`
/// turns true, with the default [`Limits`]. Requests in flight are
/// finished first.
pub async fn serve(
    socket: UdpSocket,
    svc: Arc<dyn DeviceService>,
    workers: usize,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_limited(socket, svc, Arc::new(Limits::default()), workers, shutdown).await
}

/// Like [`serve`], with `limits` (shared with the HTTP resources).
pub async fn serve_limited(
    socket: UdpSocket,
    svc: Arc<dyn DeviceService>,
    limits: Arc<Limits>,
    workers: usize,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let socket = socket.into_std()?;
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(POLL))?;
    let socket = Arc::new(socket);
    let shared = Arc::new(Shared::new(svc, limits));
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
    let key = Key::of(peer, &packet);
    let confirmable = packet.header.get_type() == MessageType::Confirmable;
    if confirmable {
        let cached = shared.dedup(&key).get(&key);
        if cached.is_some() {
            return cached;
        }
    }
    let mut resp = CoapResponse::new(&packet)?;
    let started = Instant::now();
    let span =
        tracing::info_span!("request", id = %crate::observe::request_id(), transport = "coap");
    let mut resource = "unmatched";
    let proven = span.in_scope(|| respond(shared, packet, peer, &mut resp, &mut resource));
    let n = u16::from(u8::from(resp.message.header.code));
    let code = (n >> 5) * 100 + (n & 0x1f);
    crate::observe::record("coap", resource, code, started.elapsed());
    let bytes = resp.message.to_bytes().ok()?;
    // Only an answer to a request that proved a device key is kept: the
    // others (refusals, challenges, command polls, Block1 steps) changed
    // nothing and are computed again for a retransmission, so an
    // unauthenticated peer can make the server keep no answer at all.
    if confirmable && proven {
        let cap = shared.limits.config().dedup_capacity.div_ceil(DEDUP_SHARDS);
        shared.dedup(&key).put(key, bytes.clone(), cap.max(1));
    }
    Some(bytes)
}

/// The request's path from its Uri-Path options.
fn path_of(packet: &Packet) -> String {
    let mut path = String::new();
    if let Some(segs) = packet.get_option(CoapOption::UriPath) {
        for seg in segs {
            path.push('/');
            path.push_str(&String::from_utf8_lossy(seg));
        }
    }
    path
}

/// Answers a request into `resp`; true if the request proved possession
/// of a device key (see [`crate::limits`]).
fn respond(
    shared: &Shared,
    mut packet: Packet,
    peer: SocketAddr,
    resp: &mut CoapResponse,
    resource: &mut &'static str,
) -> bool {
    let post = match packet.header.code {
        MessageClass::Request(RequestType::Post) => Some(true),
        MessageClass::Request(RequestType::Get) => Some(false),
        _ => None,
    };
    let route = match post {
        Some(post) => api::route(post, &path_of(&packet)),
        None => Route::WrongMethod,
    };
    let res = match route {
        Route::Device(res) => {
            *resource = res.name();
            res
        }
        Route::WrongMethod => {
            resp.set_status(ResponseType::MethodNotAllowed);
            return false;
        }
        Route::NotFound => {
            resp.set_status(ResponseType::NotFound);
            return false;
        }
    };
    // Answers always fit one datagram, so a Block2 option is ignored;
    // Block1 bodies are reassembled here, within the limits.
    let block1 = match packet.get_first_option_as::<BlockValue>(CoapOption::Block1) {
        None => None,
        Some(Ok(b)) => Some(b),
        Some(Err(_)) => {
            resp.set_status(ResponseType::BadOption);
            return false;
        }
    };
    let body = match &block1 {
        None => std::mem::take(&mut packet.payload),
        Some(b) => {
            let step = shared
                .transfers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .block(shared.limits.config(), (peer, res), b, &packet.payload);
            match step {
                Step::Continue => {
                    resp.set_status(ResponseType::Continue);
                    resp.message
                        .add_option_as(CoapOption::Block1, block_echo(b, true));
                    return false;
                }
                Step::Complete(body) => {
                    resp.message
                        .add_option_as(CoapOption::Block1, block_echo(b, false));
                    body
                }
                Step::Refuse(status, size1) => {
                    resp.set_status(status);
                    if let Some(n) = size1 {
                        resp.message
                            .add_option_as(CoapOption::Size1, OptionValueU32(n));
                    }
                    return false;
                }
            }
        }
    };
    let admitted = match shared.limits.admit(Some(peer.ip()), res, &body) {
        Ok(a) => a,
        Err(wait) => {
            resp.set_status(ResponseType::TooManyRequests);
            resp.message
                .add_option_as(CoapOption::MaxAge, OptionValueU32(retry_secs(wait)));
            return false;
        }
    };
    // A stalled database or card, or too many calls in flight: 5.03 at
    // once (not settled: a shed request spends no rate budget).
    let permit = match shared.limits.shedder().enter() {
        Ok(p) => p,
        Err(_) => {
            resp.set_status(ResponseType::ServiceUnavailable);
            resp.message.add_option_as(
                CoapOption::MaxAge,
                OptionValueU32(shared.limits.shedder().retry_secs()),
            );
            resp.message.set_content_format(ContentFormat::TextPlain);
            resp.message.payload = Refusal::Unavailable.kind().as_bytes().to_vec();
            return false;
        }
    };
    let outcome = api::serve_device(shared.svc.as_ref(), res, &body);
    drop(permit);
    let proven = proven(res, outcome.is_ok());
    shared.limits.settle(admitted, proven);
    let (status, format, payload) = match outcome {
        Ok(body) => {
            let status = if post == Some(true) {
                ResponseType::Changed
            } else {
                ResponseType::Content
            };
            let body = body.unwrap_or_default();
            let format = (!body.is_empty()).then_some(ContentFormat::ApplicationOctetStream);
            (status, format, body)
        }
        Err(refusal) => {
            if refusal == Refusal::Unavailable {
                resp.message.add_option_as(
                    CoapOption::MaxAge,
                    OptionValueU32(shared.limits.shedder().retry_secs()),
                );
            }
            (
                refusal.coap_status(),
                Some(ContentFormat::TextPlain),
                refusal.kind().as_bytes().to_vec(),
            )
        }
    };
    resp.set_status(status);
    if let Some(format) = format {
        resp.message.set_content_format(format);
    }
    resp.message.payload = payload;
    proven
}

/// The Block1 option of an answer: the block's number and size, with
/// `more` for 2.31 Continue.
fn block_echo(b: &BlockValue, more: bool) -> BlockValue {
    BlockValue {
        num: b.num,
        more,
        size_exponent: b.size_exponent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Refusal, Verified};
    use microcert_core::DeviceId;

    /// A service whose challenge answer is large, to test the answer cap.
    struct Fake;

    impl DeviceService for Fake {
        fn enroll(&self, msg: &[u8]) -> Result<Vec<u8>, Refusal> {
            Ok(vec![0xAB; msg.len()])
        }
        fn auth(&self, _: &[u8]) -> Result<Vec<u8>, Refusal> {
            Err(Refusal::NotVerified)
        }
        fn challenge(&self, _: DeviceId) -> Result<[u8; 16], Refusal> {
            Ok([7; 16])
        }
        fn auth_response(&self, _: &[u8]) -> Result<Vec<u8>, Refusal> {
            Err(Refusal::NotVerified)
        }
        fn command(&self, _: DeviceId) -> Result<Option<Vec<u8>>, Refusal> {
            Ok(Some(vec![1; 400]))
        }
        fn receipt(&self, _: &[u8]) -> Result<(), Refusal> {
            Ok(())
        }
        fn verify(&self, _: &str, _: &[u8]) -> Result<Verified, Refusal> {
            Err(Refusal::NotVerified)
        }
        fn open(&self, _: &str, _: &[u8]) -> Result<Vec<u8>, Refusal> {
            Err(Refusal::NotVerified)
        }
    }

    fn shared(config: LimitsConfig) -> Shared {
        Shared::new(Arc::new(Fake), Arc::new(Limits::new(config)))
    }

    fn request(mid: u16, get: bool, path: &str, body: &[u8]) -> Vec<u8> {
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(if get {
            RequestType::Get
        } else {
            RequestType::Post
        });
        p.header.message_id = mid;
        p.set_token(vec![1, 2]);
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        p.payload = body.to_vec();
        p.to_bytes().unwrap()
    }

    fn cached(s: &Shared) -> usize {
        s.dedup
            .iter()
            .map(|d| d.lock().unwrap().answers.len())
            .sum()
    }

    #[test]
    fn only_answers_to_proven_requests_are_kept() {
        let s = shared(LimitsConfig::default());
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // A command poll answered with 400 bytes, ten times its request,
        // a challenge and a refusal: none is kept.
        let req = request(1, true, "v1/device/0102030405060708/command", &[]);
        let answer = handle(&s, &req, peer).unwrap();
        assert!(answer.len() > 4 * req.len());
        handle(&s, &request(2, false, "v1/device/challenge", &[1; 8]), peer).unwrap();
        handle(&s, &request(3, false, "v1/device/auth", &[1; 39]), peer).unwrap();
        assert_eq!(cached(&s), 0);
        // An accepted ENROLL is kept, and a retransmission gets it again.
        let req = request(4, false, "v1/device/enroll", &[5; 60]);
        let first = handle(&s, &req, peer).unwrap();
        assert_eq!(cached(&s), 1);
        assert_eq!(handle(&s, &req, peer).unwrap(), first);
    }

    #[test]
    fn dedup_evicts_the_oldest_not_everything() {
        let mut d = Dedup::default();
        let key = |mid| Key {
            peer: "127.0.0.1:9".parse().unwrap(),
            mid,
            token: [0; 8],
            token_len: 0,
        };
        for mid in 0..10 {
            d.put(key(mid), vec![mid as u8], 4);
        }
        assert_eq!(d.answers.len(), 4);
        assert!(d.get(&key(5)).is_none());
        for mid in 6..10 {
            assert_eq!(d.get(&key(mid)), Some(vec![mid as u8]));
        }
        assert!(d.order.len() <= 8);
    }

    #[test]
    fn dedup_drops_expired_answers_first() {
        let mut d = Dedup::default();
        let key = |mid| Key {
            peer: "127.0.0.1:9".parse().unwrap(),
            mid,
            token: [0; 8],
            token_len: 0,
        };
        let old = Instant::now() - EXCHANGE_LIFETIME - Duration::from_secs(1);
        for mid in 0..3 {
            d.answers.insert(key(mid), (old, vec![0]));
            d.order.push_back((old, key(mid)));
        }
        d.put(key(9), vec![9], 100);
        assert_eq!(d.answers.len(), 1, "expired answers are dropped");
        assert_eq!(d.get(&key(9)), Some(vec![9]));
    }

    #[test]
    fn the_token_is_part_of_the_dedup_key() {
        let s = shared(LimitsConfig::default());
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let a = request(5, false, "v1/device/receipt", &[1; 48]);
        let mut p = Packet::from_bytes(&a).unwrap();
        p.set_token(vec![9, 9]);
        let b = p.to_bytes().unwrap();
        handle(&s, &a, peer).unwrap();
        handle(&s, &b, peer).unwrap();
        assert_eq!(cached(&s), 2);
    }
}
