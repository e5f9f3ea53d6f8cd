//! A bounded cache of devices with their opened seeds, so a hot device is
//! verified without a database read or an unseal.
//!
//! Seeds are [`KeySeed`]s, which zeroize on drop: an entry evicted,
//! invalidated or replaced is wiped when the last request using it ends.
//! Every state change this center commits invalidates the device's entry;
//! changes by another center sharing the database are seen after at most
//! the TTL.
//!
//! A load that raced with an invalidation must not put the old state back:
//! [`SeedCache::ticket`] is taken before the database read, and
//! [`SeedCache::insert`] drops the entry if the shard was invalidated since.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microcert_core::{DeviceId, KeySeed};

use crate::db::{DeviceRow, SeedRow};

const SHARDS: usize = 64;

/// A seed record (without ciphertext) and, for the seeds that may verify,
/// the opened seed.
pub(crate) struct CachedSeed {
    pub(crate) row: SeedRow,
    pub(crate) seed: Option<KeySeed>,
}

/// A device as the verification path needs it.
pub(crate) struct CachedDevice {
    pub(crate) device: DeviceRow,
    pub(crate) seeds: Vec<CachedSeed>,
    /// What the life-cycle policy sees of it (computed once per load; the
    /// cached rows carry no ciphertext, so `has_ciphertext` is false here:
    /// no rule of a message's use looks at it).
    snapshot: crate::policy::DeviceSnapshot,
    loaded: Instant,
}

impl CachedDevice {
    pub(crate) fn new(device: DeviceRow, seeds: Vec<CachedSeed>) -> Self {
        let snapshot = crate::policy::DeviceSnapshot::of(&device, seeds.iter().map(|s| &s.row));
        CachedDevice {
            device,
            seeds,
            snapshot,
            loaded: Instant::now(),
        }
    }

    pub(crate) fn snapshot(&self) -> &crate::policy::DeviceSnapshot {
        &self.snapshot
    }

    pub(crate) fn seed(&self, generation: u8) -> Option<&CachedSeed> {
        self.seeds.iter().find(|s| s.row.generation == generation)
    }
}

struct Shard {
    map: Mutex<HashMap<DeviceId, Arc<CachedDevice>>>,
    /// Changed only with `map` locked; read without the lock by
    /// [`SeedCache::ticket`], which the verification path calls twice per
    /// message.
    version: AtomicU64,
}

/// The cache.
pub(crate) struct SeedCache {
    shards: Vec<Shard>,
    per_shard: usize,
    ttl: Duration,
    /// Lookups answered from the cache, and not (for metrics).
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for SeedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedCache")
            .field("per_shard", &self.per_shard)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn shard_index(id: DeviceId) -> usize {
    (id.0[7] as usize ^ ((id.0[6] as usize) << 8)) % SHARDS
}

impl SeedCache {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        SeedCache {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    map: Mutex::new(HashMap::new()),
                    version: AtomicU64::new(0),
                })
                .collect(),
            per_shard: capacity.div_ceil(SHARDS),
            ttl,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn map(shard: &Shard) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Arc<CachedDevice>>> {
        // A poisoned shard only means a panic elsewhere while holding it;
        // its map is still consistent (each operation is one map call).
        match shard.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub(crate) fn get(&self, id: DeviceId) -> Option<Arc<CachedDevice>> {
        let found = self.lookup(id);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    fn lookup(&self, id: DeviceId) -> Option<Arc<CachedDevice>> {
        let shard = &self.shards[shard_index(id)];
        let mut m = Self::map(shard);
        let hit = m.get(&id)?;
        if hit.loaded.elapsed() <= self.ttl {
            return Some(Arc::clone(hit));
        }
        m.remove(&id);
        None
    }

    /// Lookups answered from the cache and not, since the start.
    pub(crate) fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn ticket(&self, id: DeviceId) -> u64 {
        self.shards[shard_index(id)].version.load(Ordering::Acquire)
    }

    pub(crate) fn insert(&self, id: DeviceId, dev: Arc<CachedDevice>, ticket: u64) {
        if self.per_shard == 0 {
            return;
        }
        let shard = &self.shards[shard_index(id)];
        let mut m = Self::map(shard);
        if shard.version.load(Ordering::Acquire) != ticket {
            return;
        }
        if m.len() >= self.per_shard
            && !m.contains_key(&id)
            && let Some(victim) = m.keys().next().copied()
        {
            // Full: drop an arbitrary entry (O(1); a scan for expired
            // entries on every insert would cost O(capacity)).
            m.remove(&victim);
        }
        m.insert(id, dev);
    }

    pub(crate) fn invalidate(&self, id: DeviceId) {
        let shard = &self.shards[shard_index(id)];
        let mut m = Self::map(shard);
        shard.version.fetch_add(1, Ordering::AcqRel);
        m.remove(&id);
    }

    pub(crate) fn clear(&self) {
        for shard in &self.shards {
            let mut m = Self::map(shard);
            shard.version.fetch_add(1, Ordering::AcqRel);
            m.clear();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| Self::map(s).len()).sum()
    }
}

/// Heap bytes the cache holds for one device with `seeds` seed records,
/// from the struct sizes: the map's slot (key, pointer, control byte, at
/// the map's 7/8 maximum load), the `Arc` block (two counters and the
/// device), the seed records and the policy snapshot's seed list. The
/// allocator's rounding and the map's spare capacity after a resize come
/// on top; the benchmark measures those by resident memory.
pub(crate) fn bytes_per_device(seeds: usize) -> usize {
    let slot = (size_of::<DeviceId>() + size_of::<Arc<CachedDevice>>() + 1) * 8 / 7;
    let arc = 2 * size_of::<usize>() + size_of::<CachedDevice>();
    let records = seeds * size_of::<CachedSeed>();
    let snapshot = seeds * size_of::<crate::policy::SeedSnapshot>();
    slot + arc + records + snapshot
}
