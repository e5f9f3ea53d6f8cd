//! A small CoAP client for the simulator, the load generator and tests:
//! confirmable requests with bounded retransmission, and Block1 for bodies
//! larger than one block (an ENROLL is over 1,000 bytes).

use std::net::SocketAddr;
use std::time::Duration;

use coap_lite::block_handler::BlockValue;
use coap_lite::{
    CoapOption, ContentFormat, MessageClass, MessageType, Packet, RequestType, ResponseType,
};
use tokio::net::UdpSocket;

/// Block size used for Block1 (2^(4+5) bytes).
pub const BLOCK_SIZE: usize = 512;
/// First retransmission timeout; doubled at each try (RFC 7252 ACK_TIMEOUT).
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Tries per datagram before giving up (RFC 7252 MAX_RETRANSMIT + 1).
const MAX_TRIES: u32 = 5;

/// A CoAP reply: its response code and payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The response code.
    pub code: ResponseType,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Reply {
    /// True for a 2.xx response.
    pub fn is_success(&self) -> bool {
        matches!(
            self.code,
            ResponseType::Created
                | ResponseType::Deleted
                | ResponseType::Valid
                | ResponseType::Changed
                | ResponseType::Content
                | ResponseType::Continue
        )
    }
}

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A socket operation failed.
    #[error("udp: {0}")]
    Io(#[from] std::io::Error),
    /// No acknowledgement after every retransmission.
    #[error("no reply from the server after {MAX_TRIES} tries")]
    Timeout,
    /// The request could not be encoded.
    #[error("cannot encode the request: {0}")]
    Encode(String),
    /// The server refused a block of a Block1 transfer.
    #[error("block transfer refused: {0:?}")]
    Block(ResponseType),
}

/// A client bound to one server.
#[derive(Debug)]
pub struct CoapClient {
    socket: UdpSocket,
    next_mid: u16,
    next_token: u32,
    ack_timeout: Duration,
}

impl CoapClient {
    /// A client on an ephemeral loopback-or-any port, connected to `server`.
    pub async fn connect(server: SocketAddr) -> std::io::Result<Self> {
        let local: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal address")
        } else {
            "[::]:0".parse().expect("literal address")
        };
        let socket = UdpSocket::bind(local).await?;
        socket.connect(server).await?;
        let mut seed = [0u8; 6];
        getrandom::fill(&mut seed).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(CoapClient {
            socket,
            next_mid: u16::from_be_bytes([seed[0], seed[1]]),
            next_token: u32::from_be_bytes([seed[2], seed[3], seed[4], seed[5]]),
            ack_timeout: ACK_TIMEOUT,
        })
    }

    /// Shortens the retransmission timeout (load tests on loopback).
    pub fn set_ack_timeout(&mut self, t: Duration) {
        self.ack_timeout = t;
    }

    /// POST `body` to `path`.
    pub async fn post(&mut self, path: &str, body: &[u8]) -> Result<Reply, ClientError> {
        self.request(RequestType::Post, path, body).await
    }

    /// GET `path`.
    pub async fn get(&mut self, path: &str) -> Result<Reply, ClientError> {
        self.request(RequestType::Get, path, &[]).await
    }

    /// Sends a request, in Block1 blocks when `body` is larger than one.
    pub async fn request(
        &mut self,
        method: RequestType,
        path: &str,
        body: &[u8],
    ) -> Result<Reply, ClientError> {
        self.next_token = self.next_token.wrapping_add(1);
        let token = self.next_token.to_be_bytes().to_vec();
        if body.len() <= BLOCK_SIZE {
            let p = packet(method, path, &token, body, None)?;
            return self.exchange(p).await;
        }
        let blocks = body.chunks(BLOCK_SIZE).count();
        for (num, chunk) in body.chunks(BLOCK_SIZE).enumerate() {
            let more = num + 1 < blocks;
            let block = BlockValue::new(num, more, BLOCK_SIZE)
                .map_err(|e| ClientError::Encode(format!("{e:?}")))?;
            let p = packet(method, path, &token, chunk, Some(block))?;
            let reply = self.exchange(p).await?;
            if !more {
                return Ok(reply);
            }
            if reply.code != ResponseType::Continue {
                return Err(ClientError::Block(reply.code));
            }
        }
        Err(ClientError::Encode("empty block transfer".into()))
    }

    /// Sends one confirmable datagram and waits for its piggybacked answer,
    /// retransmitting with exponential back-off a bounded number of times.
    async fn exchange(&mut self, mut p: Packet) -> Result<Reply, ClientError> {
        self.next_mid = self.next_mid.wrapping_add(1);
        p.header.message_id = self.next_mid;
        let bytes = p
            .to_bytes()
            .map_err(|e| ClientError::Encode(e.to_string()))?;
        let mut wait = self.ack_timeout;
        let mut buf = vec![0u8; 2048];
        for _ in 0..MAX_TRIES {
            self.socket.send(&bytes).await?;
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let n = match tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await {
                    Ok(r) => r?,
                    Err(_) => break,
                };
                let Ok(reply) = Packet::from_bytes(&buf[..n]) else {
                    continue;
                };
                if reply.header.message_id != p.header.message_id
                    || reply.get_token() != p.get_token()
                {
                    continue;
                }
                if let MessageClass::Response(code) = reply.header.code {
                    return Ok(Reply {
                        code,
                        payload: reply.payload,
                    });
                }
            }
            wait *= 2;
        }
        Err(ClientError::Timeout)
    }
}

fn packet(
    method: RequestType,
    path: &str,
    token: &[u8],
    body: &[u8],
    block1: Option<BlockValue>,
) -> Result<Packet, ClientError> {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(method);
    p.set_token(token.to_vec());
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    if !body.is_empty() {
        p.set_content_format(ContentFormat::ApplicationOctetStream);
    }
    if let Some(b) = block1 {
        p.add_option_as(CoapOption::Block1, b);
    }
    p.payload = body.to_vec();
    Ok(p)
}
