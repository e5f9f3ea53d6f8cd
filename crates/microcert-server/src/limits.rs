//! Bounds on the work and memory an unauthenticated peer can cost the
//! device resources: rate limits per source address and per device id
//! (CoAP 4.29 with Max-Age, HTTP 429 with Retry-After), and the sizes of
//! the CoAP Block1 reassembly and de-duplication state (used by `coap.rs`).
//!
//! What is charged: a request a limiter counts is one that made the center
//! work without proving anything: a refusal of any kind, a challenge (it is
//! always answered) and a command poll (unauthenticated by design). An
//! accepted AUTH, AUTH_RESPONSE, ENROLL or RECEIPT carried a valid MAC or
//! AEAD tag and is free: a fleet, a simulator or a benchmark sending valid
//! messages from one address is never slowed, while a source (or a device
//! id) that has spent its budget on garbage, replays or challenges is
//! refused before any work until the budget refills. Every request is
//! checked against the budget; only unproven ones spend it.
//!
//! Memory: each limiter keeps at most `max_keys` entries (sharded). A key
//! whose bucket is full again is the same as no entry and is dropped when a
//! shard fills up; if a shard is still full, new keys share one overflow
//! bucket per shard, so spraying source ports (the key is the address, and
//! an IPv6 address's /64), addresses or device ids cannot grow the state.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use microcert_core::DeviceId;
use serde::Deserialize;

use crate::api::DeviceResource;

/// A token bucket: `burst` requests at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Sustained requests per second (at least 1).
    pub per_second: u32,
    /// Requests allowed at once after a quiet period (at least 1).
    pub burst: u32,
}

/// The configurable limits, with defaults that let a simulator or a
/// benchmark on one loopback address through (valid messages are free)
/// and refuse a flood of unproven requests within a few thousand.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Rate limits on (false turns all three off; the size bounds stay).
    pub enabled: bool,
    /// Unproven requests per source address (IPv4, or an IPv6 /64).
    pub per_source: Rate,
    /// Unproven requests per device id (from the path, the challenge body
    /// or the message header).
    pub per_device: Rate,
    /// Challenges issued per device id (each valid for up to 120 s, so at
    /// most about `burst + 120 * per_second` are outstanding).
    pub challenges_per_device: Rate,
    /// Keys kept by each limiter before new keys share overflow buckets.
    pub max_keys: usize,
    /// Largest Block1-reassembled request body, bytes (an ENROLL of suite
    /// 0x02 is 1,017).
    pub max_block1_body: usize,
    /// Block1 transfers in progress per peer address.
    pub block1_per_peer: usize,
    /// Block1 transfers in progress overall.
    pub block1_total: usize,
    /// Seconds a Block1 transfer may take from its first block.
    pub block1_lifetime_secs: u64,
    /// Answers kept for de-duplication of confirmable retransmissions.
    pub dedup_capacity: usize,
    /// Milliseconds after which a call into the center (database, card)
    /// counts as stalled: new device requests are then shed with 5.03 /
    /// 503 until it returns (see [`crate::shed`]).
    pub shed_after_ms: u64,
    /// Calls into the center in flight at once from the device and
    /// relying-party resources (CoAP and HTTP together); beyond, 5.03 / 503.
    pub max_in_flight: usize,
    /// Max-Age / Retry-After of a shed request, seconds.
    pub shed_retry_secs: u32,
    /// Milliseconds a client has to send a request's headers (slowloris).
    pub http_header_timeout_ms: u64,
    /// Seconds a device or relying-party request (body and answer) may
    /// take (408 beyond); for an operator request (which may run long: an
    /// integrity check of a large fleet), the time to read its body.
    pub http_request_timeout_secs: u64,
    /// HTTP connections open at once per listener; beyond, new ones are
    /// closed at once.
    pub http_max_connections: usize,
    /// HTTP requests in progress at once per listener; beyond, 503 with
    /// Retry-After.
    pub http_max_in_flight: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            enabled: true,
            per_source: Rate {
                per_second: 1_000,
                burst: 5_000,
            },
            per_device: Rate {
                per_second: 50,
                burst: 500,
            },
            challenges_per_device: Rate {
                per_second: 5,
                burst: 300,
            },
            max_keys: 65_536,
            max_block1_body: 1_152,
            block1_per_peer: 4,
            block1_total: 1_024,
            block1_lifetime_secs: 30,
            dedup_capacity: 65_536,
            shed_after_ms: 500,
            max_in_flight: 64,
            shed_retry_secs: 1,
            http_header_timeout_ms: 10_000,
            http_request_timeout_secs: 30,
            http_max_connections: 1_024,
            http_max_in_flight: 256,
        }
    }
}

const SHARDS: usize = 16;

struct Shard<K> {
    /// Per key: the GCRA theoretical arrival time, in nanoseconds since
    /// the limiter's start.
    tat: HashMap<K, u64>,
    /// Shared by new keys while the shard is full.
    overflow: u64,
}

/// A keyed rate limiter (GCRA) with a hard bound on its memory.
pub struct Limiter<K> {
    interval: u64,
    tolerance: u64,
    per_shard: usize,
    start: Instant,
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<Mutex<Shard<K>>>,
}

impl<K> std::fmt::Debug for Limiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("interval_ns", &self.interval)
            .field("tolerance_ns", &self.tolerance)
            .field("per_shard", &self.per_shard)
            .finish()
    }
}

impl<K: Hash + Eq + Copy> Limiter<K> {
    /// A limiter of `rate` keeping at most `max_keys` keys (rounded up to
    /// a multiple of the shard count).
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        let interval = 1_000_000_000 / u64::from(rate.per_second.max(1));
        let tolerance = interval * u64::from(rate.burst.max(1) - 1);
        Limiter {
            interval,
            tolerance,
            per_shard: max_keys.div_ceil(SHARDS).max(1),
            start: Instant::now(),
            hasher: Default::default(),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        tat: HashMap::new(),
                        overflow: 0,
                    })
                })
                .collect(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn shard(&self, key: &K) -> std::sync::MutexGuard<'_, Shard<K>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// How long `key` must wait before its next request, if its budget is
    /// spent; spends nothing.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let now = self.now();
        let shard = self.shard(key);
        let tat = shard.tat.get(key).copied().unwrap_or(
            // A key without an entry has a full bucket, unless the shard
            // is full and it would share the overflow bucket.
            if shard.tat.len() >= self.per_shard {
                shard.overflow
            } else {
                0
            },
        );
        self.verdict(tat, now)
    }

    fn verdict(&self, tat: u64, now: u64) -> Result<(), Duration> {
        let allow_at = tat.saturating_sub(self.tolerance);
        if allow_at <= now {
            Ok(())
        } else {
            Err(Duration::from_nanos(allow_at - now))
        }
    }

    /// Spends one request of `key`'s budget (even if it is already spent:
    /// the wait grows, bounded by one burst beyond the tolerance).
    pub fn charge(&self, key: K) {
        let now = self.now();
        let mut shard = self.shard(&key);
        let cap = now + self.tolerance + self.interval;
        if let Some(tat) = shard.tat.get_mut(&key) {
            *tat = ((*tat).max(now) + self.interval).min(cap);
            return;
        }
        if shard.tat.len() >= self.per_shard {
            // Entries whose bucket is full again carry no information.
            shard.tat.retain(|_, tat| *tat > now);
        }
        if shard.tat.len() >= self.per_shard {
            shard.overflow = (shard.overflow.max(now) + self.interval).min(cap);
        } else {
            shard.tat.insert(key, now + self.interval);
        }
    }

    /// Checks and, if allowed, charges in one step.
    pub fn take(&self, key: K) -> Result<(), Duration> {
        self.check(&key)?;
        self.charge(key);
        Ok(())
    }

    /// Keys held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).tat.len())
            .sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key of a source address: the IPv4 address, or an IPv6 address's
/// /64 (one host usually owns a whole /64); an IPv4-mapped IPv6 address
/// is its IPv4 address.
pub fn source_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(u32::from(v4)),
            None => (u128::from(v6) & !0xffff_ffff_ffff_ffff) | 1 << 32,
        },
    }
}

/// The device id a request names, if any: in the path (command), the body
/// (challenge) or the message header (bytes 2 to 9).
pub fn device_of(res: DeviceResource, body: &[u8]) -> Option<DeviceId> {
    match res {
        DeviceResource::Command(id) => Some(id),
        DeviceResource::Challenge => <[u8; 8]>::try_from(body).ok().map(DeviceId),
        _ => body
            .get(2..10)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(DeviceId),
    }
}

/// The rate limits of the device resources, shared by CoAP and HTTP.
#[derive(Debug)]
pub struct Limits {
    config: LimitsConfig,
    shed: std::sync::Arc<crate::shed::Shedder>,
    source: Limiter<u128>,
    device: Limiter<DeviceId>,
    challenge: Limiter<DeviceId>,
}

/// A request let through, to be settled once its outcome is known.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct Admitted {
    source: Option<u128>,
    device: Option<DeviceId>,
}

impl Limits {
    /// Limits with `config`.
    pub fn new(config: LimitsConfig) -> Self {
        Limits {
            shed: std::sync::Arc::new(crate::shed::Shedder::new(
                config.max_in_flight,
                Duration::from_millis(config.shed_after_ms),
                config.shed_retry_secs,
            )),
            source: Limiter::new(config.per_source, config.max_keys),
            device: Limiter::new(config.per_device, config.max_keys),
            challenge: Limiter::new(config.challenges_per_device, config.max_keys),
            config,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// The load shedder of the calls into the center.
    pub fn shedder(&self) -> &std::sync::Arc<crate::shed::Shedder> {
        &self.shed
    }

    /// Lets a request through, or says how long to wait. A challenge
    /// spends its device's challenge budget here.
    pub fn admit(
        &self,
        peer: Option<IpAddr>,
        res: DeviceResource,
        body: &[u8],
    ) -> Result<Admitted, Duration> {
        let none = Admitted {
            source: None,
            device: None,
        };
        if !self.config.enabled {
            return Ok(none);
        }
        let source = peer.map(source_key);
        let device = device_of(res, body);
        let limited = |which: &'static str| {
            move |wait| {
                metrics::counter!("microcert_rate_limited_total", "limit" => which).increment(1);
                wait
            }
        };
        if let Some(s) = &source {
            self.source.check(s).map_err(limited("source"))?;
        }
        if let Some(d) = &device {
            self.device.check(d).map_err(limited("device"))?;
        }
        if res == DeviceResource::Challenge
            && let Some(d) = device
        {
            self.challenge.take(d).map_err(limited("challenge"))?;
        }
        Ok(Admitted { source, device })
    }

    /// Settles an admitted request: an unproven one (`proven` false)
    /// spends the source's and the device's budgets.
    pub fn settle(&self, admitted: Admitted, proven: bool) {
        if proven {
            return;
        }
        if let Some(s) = admitted.source {
            self.source.charge(s);
        }
        if let Some(d) = admitted.device {
            self.device.charge(d);
        }
    }

    /// Keys held by the three limiters (source, device, challenge).
    pub fn keys(&self) -> (usize, usize, usize) {
        (self.source.len(), self.device.len(), self.challenge.len())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(LimitsConfig::default())
    }
}

/// Whether an outcome proves the sender holds a device key: an accepted
/// AUTH, AUTH_RESPONSE, ENROLL or RECEIPT. A challenge or a command poll
/// proves nothing.
pub fn proven(res: DeviceResource, accepted: bool) -> bool {
    accepted
        && matches!(
            res,
            DeviceResource::Enroll
                | DeviceResource::Auth
                | DeviceResource::AuthResponse
                | DeviceResource::Receipt
        )
}

/// Whole seconds to wait, rounded up, at least 1 (for Max-Age and
/// Retry-After).
pub fn retry_secs(wait: Duration) -> u32 {
    let s = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    u32::try_from(s.max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_refusals_with_a_wait() {
        let l = Limiter::new(
            Rate {
                per_second: 1,
                burst: 3,
            },
            16,
        );
        for _ in 0..3 {
            l.take(7u32).unwrap();
        }
        let wait = l.take(7u32).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        l.take(8u32).unwrap();
    }

    #[test]
    fn memory_is_bounded_under_a_key_spray() {
        let l = Limiter::new(
            Rate {
                per_second: 1,
                burst: 2,
            },
            64,
        );
        for k in 0..100_000u32 {
            l.charge(k);
        }
        assert!(l.len() <= 64, "{}", l.len());
        // New keys now share the overflow buckets, which are spent.
        let refused = (200_000..200_100u32)
            .filter(|k| l.check(k).is_err())
            .count();
        assert!(refused > 90, "{refused}");
    }

    #[test]
    fn ipv6_hosts_share_their_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(source_key(v4), source_key(mapped));
        assert_ne!(source_key(v4), source_key("::a01:203".parse().unwrap()));
    }

    #[test]
    fn valid_messages_are_free_and_unproven_ones_are_charged() {
        let limits = Limits::new(LimitsConfig {
            per_source: Rate {
                per_second: 1,
                burst: 5,
            },
            ..LimitsConfig::default()
        });
        let peer = Some("192.0.2.1".parse().unwrap());
        for _ in 0..100 {
            let a = limits.admit(peer, DeviceResource::Auth, &[]).unwrap();
            limits.settle(a, proven(DeviceResource::Auth, true));
        }
        for _ in 0..5 {
            let a = limits.admit(peer, DeviceResource::Auth, &[]).unwrap();
            limits.settle(a, proven(DeviceResource::Auth, false));
        }
        assert!(limits.admit(peer, DeviceResource::Auth, &[]).is_err());
        let other = Some("192.0.2.2".parse().unwrap());
        assert!(limits.admit(other, DeviceResource::Auth, &[]).is_ok());
    }

    #[test]
    fn challenges_per_device_are_bounded() {
        let limits = Limits::default();
        let body = [1u8; 8];
        let mut served = 0;
        for i in 0..5_000u32 {
            let peer = Some(IpAddr::from(i.to_be_bytes()));
            if let Ok(a) = limits.admit(peer, DeviceResource::Challenge, &body) {
                served += 1;
                limits.settle(a, false);
            }
        }
        let c = LimitsConfig::default().challenges_per_device;
        assert!(served >= c.burst && served <= c.burst + 10, "{served}");
        assert!(
            limits
                .admit(None, DeviceResource::Challenge, &[2u8; 8])
                .is_ok()
        );
    }

    #[test]
    fn retry_is_rounded_up() {
        assert_eq!(retry_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_secs(Duration::from_millis(1_001)), 2);
        assert_eq!(retry_secs(Duration::ZERO), 1);
    }
}
