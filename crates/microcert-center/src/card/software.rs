//! The software encryption card: keys from an SP 800-90A HMAC_DRBG seeded
//! from the OS random generator (see `os_random`), kept in
//! memory in zeroizing buffers, sealed at rest in a card file under a key
//! derived from a passphrase with Argon2id.
//!
//! Card file layout (all integers big-endian):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `"MCCARD01"` |
//! | 8 | 4 | Argon2id memory cost (KiB) |
//! | 12 | 4 | Argon2id time cost |
//! | 16 | 4 | Argon2id parallelism |
//! | 20 | 16 | salt |
//! | 36 | 12 | AES-256-GCM nonce |
//! | 48 | .. | AES-256-GCM(key = Argon2id(passphrase, salt), aad = bytes 0..48, keys) |
//!
//! The sealed keys are the [`CardKeys`] encoding (`keys_to_bytes`); the same
//! encoding is what the Shamir backup shares split. Key block version 1
//! holds the storage keys (Kstore versions) itself; version 2 (issue 14)
//! holds none: they live in the key database's keyring ([`crate::keyring`]),
//! wrapped under the card's root key, which is derived from the integrity
//! key (HMAC-SHA256(Kint, "MC-KEYRING-ROOT\0"), so every clone and every
//! recovery of the card has it and no file format change carries it).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::SystemTime;

use aes_gcm::aead::array::Array;
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use hmac::{Hmac, Mac};
use microcert_core::{
    CHALLENGE_LEN, DeviceId, Key128, KeySeed, SEED_LEN, challenge_window, derive_key, transport_key,
};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use super::{EncryptionCard, SealedSeed, TAG_LEN};
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"MCCARD01";
const FILE_HEADER_LEN: usize = 48;
const KEYS_VERSION: u8 = 1;
/// Key block without storage keys: they are in the keyring (issue 14).
const KEYS_VERSION_KEYRING: u8 = 2;
const GCM_NONCE: usize = 12;
const GCM_TAG: usize = 16;
const SEED_PLAIN: usize = SEED_LEN + 2;

/// Argon2id cost parameters for the card file's key; stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane (RFC 9106's second recommended option).
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// Tiny parameters that make a card file open in milliseconds. For
    /// tests only: they give a passphrase almost no protection.
    pub const fn insecure_for_tests() -> Self {
        KdfParams {
            m_cost_kib: 64,
            t_cost: 1,
            p_cost: 1,
        }
    }
}

/// The card's keys.
pub(crate) struct CardKeys {
    card_id: [u8; 16],
    ktrans: Key128,
    kint: Zeroizing<[u8; 32]>,
    kchal: Key128,
    kstore_current: u32,
    /// Every Kstore version still needed, in version order.
    kstore: Vec<(u32, Zeroizing<[u8; 32]>)>,
    /// The storage keys are the keyring's (held in memory, never written
    /// to the card file): the card file keeps only the root key.
    in_db: bool,
}

impl CardKeys {
    fn generate() -> Result<Self> {
        let mut card_id = [0u8; 16];
        os_random(&mut card_id)?;
        let mut k16 = Zeroizing::new([0u8; 16]);
        os_random(&mut k16[..])?;
        let ktrans = Key128::from_bytes(*k16);
        os_random(&mut k16[..])?;
        let kchal = Key128::from_bytes(*k16);
        let mut kint = Zeroizing::new([0u8; 32]);
        os_random(&mut kint[..])?;
        let mut kstore = Zeroizing::new([0u8; 32]);
        os_random(&mut kstore[..])?;
        Ok(CardKeys {
            card_id,
            ktrans,
            kint,
            kchal,
            kstore_current: 1,
            kstore: vec![(1, kstore)],
            in_db: false,
        })
    }

    pub(crate) fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut b = Zeroizing::new(Vec::with_capacity(90 + 36 * self.kstore.len()));
        if self.in_db {
            b.push(KEYS_VERSION_KEYRING);
            b.extend_from_slice(&self.card_id);
            b.extend_from_slice(self.ktrans.expose());
            b.extend_from_slice(&self.kint[..]);
            b.extend_from_slice(self.kchal.expose());
            b.extend_from_slice(&0u32.to_be_bytes());
            b.push(0);
            return b;
        }
        b.push(KEYS_VERSION);
        b.extend_from_slice(&self.card_id);
        b.extend_from_slice(self.ktrans.expose());
        b.extend_from_slice(&self.kint[..]);
        b.extend_from_slice(self.kchal.expose());
        b.extend_from_slice(&self.kstore_current.to_be_bytes());
        // At most 255 versions are kept; rotation (issue 5) destroys old ones.
        b.push(self.kstore.len().min(255) as u8);
        for (v, k) in self.kstore.iter().take(255) {
            b.extend_from_slice(&v.to_be_bytes());
            b.extend_from_slice(&k[..]);
        }
        b
    }

    pub(crate) fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = || Error::CardFormat("key block has the wrong length or version".into());
        let fixed = 1 + 16 + 16 + 32 + 16 + 4 + 1;
        if b.len() < fixed || (b[0] != KEYS_VERSION && b[0] != KEYS_VERSION_KEYRING) {
            return Err(bad());
        }
        let in_db = b[0] == KEYS_VERSION_KEYRING;
        let n = usize::from(b[fixed - 1]);
        if b.len() != fixed + 36 * n || (n == 0) != in_db {
            return Err(bad());
        }
        let arr16 = |o: usize| -> [u8; 16] {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[o..o + 16]);
            a
        };
        let mut card_id = [0u8; 16];
        card_id.copy_from_slice(&b[1..17]);
        let mut k = arr16(17);
        let ktrans = Key128::from_bytes(k);
        let mut kint = Zeroizing::new([0u8; 32]);
        kint.copy_from_slice(&b[33..65]);
        k = arr16(65);
        let kchal = Key128::from_bytes(k);
        k.zeroize();
        let kstore_current = u32::from_be_bytes([b[81], b[82], b[83], b[84]]);
        let mut kstore = Vec::with_capacity(n);
        for i in 0..n {
            let o = fixed + 36 * i;
            let v = u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            let mut key = Zeroizing::new([0u8; 32]);
            key.copy_from_slice(&b[o + 4..o + 36]);
            kstore.push((v, key));
        }
        if !in_db && !kstore.iter().any(|(v, _)| *v == kstore_current) {
            return Err(bad());
        }
        Ok(CardKeys {
            card_id,
            ktrans,
            kint,
            kchal,
            kstore_current,
            kstore,
            in_db,
        })
    }
}

/// The software encryption card.
///
/// The keys sit behind a lock because storage-key rotation changes them
/// while the center serves; every other operation takes the read side.
pub struct SoftwareCard {
    keys: RwLock<CardKeys>,
    /// Where the keys are sealed at rest and under which file key, so a
    /// rotation can re-seal them without asking for the passphrase again.
    /// None for an ephemeral or recovered card.
    file: Option<CardFile>,
}

/// A card file and the Argon2id-derived key that seals it (zeroized on drop).
struct CardFile {
    path: PathBuf,
    params: KdfParams,
    salt: [u8; 16],
    key: Zeroizing<[u8; 32]>,
    /// Modification time and length when this process last read or wrote
    /// the file: another process (`card rotate-storage-key` beside a
    /// serving center) may add or destroy a storage key in it.
    stamp: Mutex<Option<(SystemTime, u64)>>,
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Decrypts a card file's bytes under its file key.
fn decrypt_file(bytes: &[u8], key: &[u8; 32]) -> Result<CardKeys> {
    if bytes.len() < FILE_HEADER_LEN + GCM_TAG || &bytes[..8] != MAGIC {
        return Err(Error::CardFormat("not a microcert card file".into()));
    }
    let nonce: [u8; GCM_NONCE] = bytes[36..48]
        .try_into()
        .map_err(|_| Error::WrongPassphrase)?;
    let (header, body) = bytes.split_at(FILE_HEADER_LEN);
    let (ct, tag) = body.split_at(body.len() - GCM_TAG);
    let mut plain = Zeroizing::new(ct.to_vec());
    let tag: &Array<u8, _> = tag.try_into().map_err(|_| Error::WrongPassphrase)?;
    gcm(key)
        .decrypt_inout_detached((&nonce).into(), header, plain[..].as_mut().into(), tag)
        .map_err(|_| Error::WrongPassphrase)?;
    CardKeys::from_bytes(&plain)
}

impl std::fmt::Debug for SoftwareCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = self.read();
        f.debug_struct("SoftwareCard")
            .field("card_id", &hex::encode(k.card_id))
            .field("kstore_version", &k.kstore_current)
            .finish_non_exhaustive()
    }
}

/// Every random byte of the software card (card keys, salts, nonces,
/// seeds, challenges): output of the core's SP 800-90A HMAC_DRBG
/// (`microcert_core::drbg`, SHA-256), one per process, instantiated from the
/// OS generator (getrandom) at first use after its known-answer self-test,
/// and reseeded from it every [`CARD_RESEED_REQUESTS`] requests, every
/// [`CARD_RESEED_AGE`], and whenever the process id changed (a fork must not
/// share the parent's state).
fn os_random(out: &mut [u8]) -> Result<()> {
    card_random(out)
}

/// Fills `out` from the software card's SP 800-90A DRBG (one per process,
/// seeded and reseeded from the OS): for every key the card, its shares
/// and the offline tools make.
pub fn card_random(out: &mut [u8]) -> Result<()> {
    static RNG: Mutex<CardRng> = Mutex::new(CardRng::new());
    RNG.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .fill(&mut OsEntropy, out)
}

/// Requests between two reseeds of the card's DRBG from the OS.
pub(crate) const CARD_RESEED_REQUESTS: u64 = 1024;
/// Longest time between two reseeds of the card's DRBG from the OS.
pub(crate) const CARD_RESEED_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// The operating system's generator as the DRBG's entropy source.
struct OsEntropy;

impl microcert_core::drbg::EntropySource for OsEntropy {
    fn fill_entropy(
        &mut self,
        buf: &mut [u8],
    ) -> std::result::Result<(), microcert_core::DrbgError> {
        getrandom::fill(buf).map_err(|_| microcert_core::DrbgError::Entropy)
    }
}

/// The card's DRBG and when it was last seeded. Its state zeroizes on drop
/// and prints redacted.
#[derive(Debug)]
struct CardRng {
    drbg: Option<microcert_core::Drbg>,
    pid: u32,
    seeded: Option<std::time::Instant>,
}

impl CardRng {
    const fn new() -> Self {
        CardRng {
            drbg: None,
            pid: 0,
            seeded: None,
        }
    }

    fn fill(
        &mut self,
        source: &mut impl microcert_core::drbg::EntropySource,
        out: &mut [u8],
    ) -> Result<()> {
        let failed = |e: microcert_core::DrbgError| Error::Card(format!("random generator: {e}"));
        let pid = std::process::id();
        let drbg = match &mut self.drbg {
            Some(d) if self.pid == pid => d,
            slot => {
                let mut d = microcert_core::Drbg::instantiate(source, b"MC-CARD-DRBG", false)
                    .map_err(failed)?;
                d.set_reseed_interval(CARD_RESEED_REQUESTS)
                    .map_err(failed)?;
                self.pid = pid;
                self.seeded = Some(std::time::Instant::now());
                slot.insert(d)
            }
        };
        for chunk in out.chunks_mut(microcert_core::drbg::MAX_REQUEST_LEN) {
            let counter = drbg.reseed_counter();
            let stale = self.seeded.is_none_or(|t| t.elapsed() >= CARD_RESEED_AGE);
            if stale {
                drbg.reseed(source, b"").map_err(failed)?;
                self.seeded = Some(std::time::Instant::now());
            }
            drbg.generate(source, chunk, false, b"").map_err(failed)?;
            if drbg.reseed_counter() <= counter && !stale {
                // The reseed counter limit made the DRBG reseed.
                self.seeded = Some(std::time::Instant::now());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod rng_tests {
    use std::cell::Cell;

    use microcert_core::DrbgError;

    use super::*;

    struct Counting<'a>(&'a Cell<usize>, bool);

    impl microcert_core::drbg::EntropySource for Counting<'_> {
        fn fill_entropy(&mut self, buf: &mut [u8]) -> std::result::Result<(), DrbgError> {
            self.0.set(self.0.get() + 1);
            if self.1 {
                return Err(DrbgError::Entropy);
            }
            buf.fill(0x5a);
            Ok(())
        }
    }

    #[test]
    fn card_random_is_drbg_output_reseeded_by_count_and_age() {
        let calls = Cell::new(0);
        let mut src = Counting(&calls, false);
        let mut rng = CardRng::new();
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        rng.fill(&mut src, &mut a).unwrap();
        rng.fill(&mut src, &mut b).unwrap();
        // One instantiation for both requests, and not the source's bytes.
        assert_eq!(calls.get(), 1);
        assert_ne!(a, [0x5a; 32]);
        assert_ne!(a, b);
        for _ in 2..CARD_RESEED_REQUESTS {
            rng.fill(&mut src, &mut a).unwrap();
        }
        assert_eq!(calls.get(), 1);
        rng.fill(&mut src, &mut a).unwrap();
        assert_eq!(calls.get(), 2, "reseeded after CARD_RESEED_REQUESTS");
        // Age: pretend the last seeding is old.
        rng.seeded = std::time::Instant::now().checked_sub(CARD_RESEED_AGE);
        rng.fill(&mut src, &mut a).unwrap();
        assert_eq!(calls.get(), 3, "reseeded after CARD_RESEED_AGE");
        // Another process id (a fork): instantiated anew.
        rng.pid ^= 1;
        rng.fill(&mut src, &mut a).unwrap();
        assert_eq!(calls.get(), 4);
        // More than one DRBG request's worth is served in pieces.
        let mut big = vec![0u8; microcert_core::drbg::MAX_REQUEST_LEN * 2 + 5];
        rng.fill(&mut src, &mut big).unwrap();
        assert!(big[big.len() - 5..].iter().any(|b| *b != 0));
        // A failing OS generator at a reseed: an error, no output.
        rng.seeded = std::time::Instant::now().checked_sub(CARD_RESEED_AGE);
        let mut broken = Counting(&calls, true);
        let mut c = [0u8; 16];
        assert!(rng.fill(&mut broken, &mut c).is_err());
        assert_eq!(c, [0; 16]);
        let mut fresh = CardRng::new();
        assert!(fresh.fill(&mut broken, &mut c).is_err());
        assert!(format!("{fresh:?}").contains("drbg: None"));
        assert!(format!("{rng:?}").contains("<redacted>"));
    }
}

fn file_key(passphrase: &[u8], salt: &[u8], p: KdfParams) -> Result<Zeroizing<[u8; 32]>> {
    let params = argon2::Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(32))
        .map_err(|e| Error::CardFormat(format!("Argon2id parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, salt, &mut key[..])
        .map_err(|e| Error::Card(format!("Argon2id: {e}")))?;
    Ok(key)
}

fn gcm(key: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new(key.into())
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or
/// the new one: a temporary file in the same directory (mode 0600), fsync,
/// rename over `path`, fsync of the directory.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Io(std::io::Error::other("card path has no file name")))?;
    let mut suffix = [0u8; 6];
    os_random(&mut suffix)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        hex::encode(suffix)
    ));
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let result = (|| -> Result<()> {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        fs::File::open(&dir)?.sync_all()?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

impl SoftwareCard {
    /// Makes new keys from the OS random generator and writes them to a new
    /// card file at `path` (refused when the file exists).
    pub fn init(path: &Path, passphrase: &[u8], params: KdfParams) -> Result<Self> {
        if path.exists() {
            return Err(Error::CardFileExists {
                path: path.to_owned(),
            });
        }
        let card = SoftwareCard {
            keys: RwLock::new(CardKeys::generate()?),
            file: None,
        };
        let file = card.save_new(path, passphrase, params)?;
        tracing::info!(card_id = %card.card_id(), "software card initialised");
        Ok(SoftwareCard {
            file: Some(file),
            ..card
        })
    }

    /// Makes new keys in memory only (tests, throw-away `--dev` centers).
    pub fn ephemeral() -> Result<Self> {
        Ok(SoftwareCard {
            keys: RwLock::new(CardKeys::generate()?),
            file: None,
        })
    }

    /// Opens a card file. A wrong passphrase is [`Error::WrongPassphrase`].
    pub fn open(path: &Path, passphrase: &[u8]) -> Result<Self> {
        let bytes = Zeroizing::new(fs::read(path)?);
        if bytes.len() < FILE_HEADER_LEN + GCM_TAG || &bytes[..8] != MAGIC {
            return Err(Error::CardFormat(format!(
                "{} is not a microcert card file",
                path.display()
            )));
        }
        let u32_at =
            |o: usize| u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let params = KdfParams {
            m_cost_kib: u32_at(8),
            t_cost: u32_at(12),
            p_cost: u32_at(16),
        };
        let key = file_key(passphrase, &bytes[20..36], params)?;
        let keys = decrypt_file(&bytes, &key)?;
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&bytes[20..36]);
        Ok(SoftwareCard {
            keys: RwLock::new(keys),
            file: Some(CardFile {
                path: path.to_path_buf(),
                params,
                salt,
                key,
                stamp: Mutex::new(file_stamp(path)),
            }),
        })
    }

    /// Writes the card's keys to `path` under `passphrase` (atomically,
    /// replacing a file that is there): after [`SoftwareCard::recover`], or
    /// to change the passphrase.
    pub fn save(&self, path: &Path, passphrase: &[u8], params: KdfParams) -> Result<()> {
        self.save_new(path, passphrase, params).map(|_| ())
    }

    /// Writes the card as a card file from before the keyring (key block
    /// version 1) holding the storage keys it holds now, with the current
    /// one: the data directory of an older release, for migration tests.
    #[doc(hidden)]
    pub fn save_pre_keyring(
        &self,
        path: &Path,
        passphrase: &[u8],
        params: KdfParams,
    ) -> Result<()> {
        let keys = self.read();
        let copy = CardKeys {
            card_id: keys.card_id,
            ktrans: Key128::from_bytes(*keys.ktrans.expose()),
            kint: keys.kint.clone(),
            kchal: Key128::from_bytes(*keys.kchal.expose()),
            kstore_current: keys.kstore_current,
            kstore: keys.kstore.clone(),
            in_db: false,
        };
        drop(keys);
        let card = SoftwareCard {
            keys: RwLock::new(copy),
            file: None,
        };
        card.save(path, passphrase, params)
    }

    /// [`SoftwareCard::save`] under a fresh salt; returns the file key.
    fn save_new(&self, path: &Path, passphrase: &[u8], params: KdfParams) -> Result<CardFile> {
        let mut salt = [0u8; 16];
        os_random(&mut salt)?;
        let key = file_key(passphrase, &salt, params)?;
        let file = CardFile {
            path: path.to_path_buf(),
            params,
            salt,
            key,
            stamp: Mutex::new(None),
        };
        self.write_file(&file, &self.read())?;
        Ok(file)
    }

    /// Seals `keys` into the card file under its file key and a fresh nonce.
    fn write_file(&self, card_file: &CardFile, keys: &CardKeys) -> Result<()> {
        let file = card_file;
        let params = file.params;
        let mut header = [0u8; FILE_HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&params.m_cost_kib.to_be_bytes());
        header[12..16].copy_from_slice(&params.t_cost.to_be_bytes());
        header[16..20].copy_from_slice(&params.p_cost.to_be_bytes());
        header[20..36].copy_from_slice(&file.salt);
        os_random(&mut header[36..48])?;
        let key = &file.key;
        let path = &file.path;
        let nonce: [u8; GCM_NONCE] = header[36..48]
            .try_into()
            .map_err(|_| Error::Card("nonce".into()))?;
        let mut body = keys.to_bytes();
        let tag = gcm(key)
            .encrypt_inout_detached((&nonce).into(), &header, body[..].as_mut().into())
            .map_err(|_| Error::Card("AES-GCM encryption of the card file failed".into()))?;
        let mut file = Vec::with_capacity(FILE_HEADER_LEN + body.len() + GCM_TAG);
        file.extend_from_slice(&header);
        file.extend_from_slice(&body);
        file.extend_from_slice(&tag);
        write_atomically(path, &file)?;
        if let Ok(mut st) = card_file.stamp.lock() {
            *st = file_stamp(path);
        }
        Ok(())
    }

    /// The card's public identifier (random, made at init), in hex.
    pub fn card_id(&self) -> String {
        hex::encode(self.read().card_id)
    }

    /// Writes changed keys to the card file, when the card has one.
    fn persist(&self, keys: &CardKeys) -> Result<()> {
        match &self.file {
            Some(f) => self.write_file(f, keys),
            None => Ok(()),
        }
    }

    /// Reads the card file again when another process changed it (a
    /// storage key added or destroyed), so a serving center seals under
    /// the new version and opens records re-sealed by the other process.
    /// A file that no longer opens under this card's file key (a new
    /// passphrase) or holds another card is ignored, with a warning.
    fn reload_if_changed(&self) {
        let Some(f) = &self.file else { return };
        let now = file_stamp(&f.path);
        {
            let Ok(mut st) = f.stamp.lock() else { return };
            if now.is_none() || *st == now {
                return;
            }
            *st = now;
        }
        let loaded = fs::read(&f.path)
            .map_err(Error::from)
            .map(Zeroizing::new)
            .and_then(|b| decrypt_file(&b, &f.key));
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        match loaded {
            Ok(mut k) if k.card_id == keys.card_id => {
                if k.in_db {
                    // The keyring's keys are held in memory only: keep them.
                    k.kstore = std::mem::take(&mut keys.kstore);
                    k.kstore_current = keys.kstore_current;
                }
                tracing::info!(
                    kstore_version = k.kstore_current,
                    "card file changed by another process: keys reloaded"
                );
                *keys = k;
            }
            Ok(_) => tracing::warn!("card file now holds another card: ignored"),
            Err(e) => tracing::warn!(error = %e, "card file changed but does not open: ignored"),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, CardKeys> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Splits the card's keys into `shares` printable Shamir shares of
    /// which any `threshold` recover the card (see [`super::split_secret`]).
    pub fn split(&self, shares: u8, threshold: u8) -> Result<Vec<String>> {
        let secret = self.read().to_bytes();
        super::split_secret(&secret, shares, threshold)
    }

    /// Recovers a card from at least its threshold of shares. The result
    /// is in memory only: [`SoftwareCard::save`] writes it to a card file.
    pub fn recover<S: AsRef<str>>(shares: &[S]) -> Result<Self> {
        let secret = super::recover_secret(shares)?;
        Ok(SoftwareCard {
            keys: RwLock::new(CardKeys::from_bytes(&secret)?),
            file: None,
        })
    }

    fn hmac(&self, domain: &[u8], data: &[u8]) -> Result<[u8; TAG_LEN]> {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.read().kint[..])
            .map_err(|_| Error::Card("integrity key".into()))?;
        m.update(domain);
        m.update(data);
        Ok(m.finalize().into_bytes().into())
    }
}

impl CardKeys {
    /// The keyring's root key: HMAC-SHA256(Kint, "MC-KEYRING-ROOT\0")
    /// (a domain no record, digest or anchor tag starts with).
    fn root(&self) -> Result<Zeroizing<[u8; 32]>> {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.kint[..])
            .map_err(|_| Error::Card("integrity key".into()))?;
        m.update(b"MC-KEYRING-ROOT\0");
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&m.finalize().into_bytes());
        Ok(out)
    }

    fn kstore(&self, version: u32) -> Result<&[u8; 32]> {
        self.kstore
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, k)| &**k)
            .ok_or_else(|| Error::Card(format!("no storage key of version {version}")))
    }
}

fn seed_aad(device: DeviceId, generation: u8) -> [u8; 9] {
    let mut aad = [0u8; 9];
    aad[..8].copy_from_slice(&device.0);
    aad[8] = generation;
    aad
}

impl SoftwareCard {
    /// Kw = KDF(Kchal, "MC-CHAL", u32(w)).
    fn challenge_key(&self, w: u32) -> Key128 {
        derive_key(&self.read().kchal, super::CHALLENGE_LABEL, &w.to_be_bytes())
    }
}

impl EncryptionCard for SoftwareCard {
    fn transport_key(&self, device: DeviceId, epoch: u8) -> Result<Key128> {
        Ok(transport_key(&self.read().ktrans, device, epoch))
    }

    fn make_challenge(&self, device: DeviceId, now: u32) -> Result<[u8; CHALLENGE_LEN]> {
        let mut c = [0u8; 8];
        os_random(&mut c)?;
        let w = challenge_window(now);
        Ok(super::challenge_with(&self.challenge_key(w), device, &c))
    }

    fn check_challenge(&self, device: DeviceId, c: &[u8; CHALLENGE_LEN], now: u32) -> Result<()> {
        // Two CMACs per window key: cheaper than keeping a cache here.
        let mut ok = false;
        for w in super::challenge_windows(challenge_window(now)) {
            ok |= super::challenge_matches(&self.challenge_key(w), device, c);
        }
        if ok { Ok(()) } else { Err(Error::Verification) }
    }

    fn seal_seed(&self, device: DeviceId, generation: u8, seed: &KeySeed) -> Result<SealedSeed> {
        self.reload_if_changed();
        let keys = self.read();
        let version = keys.kstore_current;
        let key = keys.kstore(version)?;
        let mut out = vec![0u8; GCM_NONCE + SEED_PLAIN + GCM_TAG];
        let mut nonce = [0u8; GCM_NONCE];
        os_random(&mut nonce)?;
        out[..GCM_NONCE].copy_from_slice(&nonce);
        // The plaintext is written straight into the output buffer and
        // encrypted in place, so no other copy of it exists.
        let body = &mut out[GCM_NONCE..GCM_NONCE + SEED_PLAIN];
        body[..SEED_LEN].copy_from_slice(seed.expose());
        body[SEED_LEN..].copy_from_slice(&seed.base_year().to_be_bytes());
        let tag = match gcm(key).encrypt_inout_detached(
            (&nonce).into(),
            &seed_aad(device, generation),
            body.into(),
        ) {
            Ok(t) => t,
            Err(_) => {
                out.zeroize();
                return Err(Error::Card("AES-GCM seal failed".into()));
            }
        };
        out[GCM_NONCE + SEED_PLAIN..].copy_from_slice(&tag);
        Ok(SealedSeed {
            kstore_version: version,
            ciphertext: out,
        })
    }

    fn unseal_seed(&self, id: DeviceId, g: u8, version: u32, ct: &[u8]) -> Result<KeySeed> {
        if ct.len() != GCM_NONCE + SEED_PLAIN + GCM_TAG {
            return Err(Error::Verification);
        }
        if !self.read().kstore.iter().any(|(v, _)| *v == version) {
            self.reload_if_changed();
        }
        let keys = self.read();
        let key = keys.kstore(version)?;
        let nonce: [u8; GCM_NONCE] = ct[..GCM_NONCE]
            .try_into()
            .map_err(|_| Error::Verification)?;
        let mut plain = Zeroizing::new([0u8; SEED_PLAIN]);
        plain.copy_from_slice(&ct[GCM_NONCE..GCM_NONCE + SEED_PLAIN]);
        let tag: &Array<u8, _> = ct[GCM_NONCE + SEED_PLAIN..]
            .try_into()
            .map_err(|_| Error::Verification)?;
        gcm(key)
            .decrypt_inout_detached(
                (&nonce).into(),
                &seed_aad(id, g),
                plain[..].as_mut().into(),
                tag,
            )
            .map_err(|_| Error::Verification)?;
        let base_year = u16::from_be_bytes([plain[SEED_LEN], plain[SEED_LEN + 1]]);
        KeySeed::from_slice(&plain[..SEED_LEN], base_year).map_err(|_| Error::Verification)
    }

    fn record_tag(&self, record: &[u8]) -> Result<[u8; TAG_LEN]> {
        self.hmac(b"MC-REC\0", record)
    }

    fn digest_tag(&self, state: &[u8]) -> Result<[u8; TAG_LEN]> {
        self.hmac(b"MC-DIGEST\0", state)
    }

    fn random(&self, out: &mut [u8]) -> Result<()> {
        os_random(out)
    }

    fn storage_key_version(&self) -> u32 {
        self.read().kstore_current
    }

    fn storage_key_versions(&self) -> Vec<u32> {
        self.reload_if_changed();
        self.read().kstore.iter().map(|(v, _)| *v).collect()
    }

    fn rotate_storage_key(&self) -> Result<u32> {
        self.reload_if_changed();
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if keys.in_db {
            return Err(Error::CardUnsupported {
                operation: "rotate a storage key outside the keyring in the key database",
            });
        }
        let prev = keys.kstore_current;
        let next = keys
            .kstore
            .iter()
            .map(|(v, _)| *v)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .filter(|_| keys.kstore.len() < 255)
            .ok_or(Error::StorageKeysExhausted)?;
        let mut k = Zeroizing::new([0u8; 32]);
        os_random(&mut k[..])?;
        keys.kstore.push((next, k));
        keys.kstore_current = next;
        // Written before any record is sealed under it: a crash after this
        // leaves a card that opens both versions, never a record whose key
        // is lost.
        if let Err(e) = self.persist(&keys) {
            keys.kstore.pop();
            keys.kstore_current = prev;
            return Err(e);
        }
        tracing::info!(version = next, "new storage key");
        Ok(next)
    }

    fn destroy_storage_key(&self, version: u32) -> Result<()> {
        self.reload_if_changed();
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if keys.in_db {
            return Err(Error::CardUnsupported {
                operation: "destroy a storage key outside the keyring in the key database",
            });
        }
        if version == keys.kstore_current {
            return Err(Error::CurrentStorageKey { version });
        }
        let pos = keys
            .kstore
            .iter()
            .position(|(v, _)| *v == version)
            .ok_or(Error::NoStorageKey { version })?;
        let removed = keys.kstore.remove(pos);
        if let Err(e) = self.persist(&keys) {
            keys.kstore.insert(pos, removed);
            return Err(e);
        }
        // `removed` zeroizes here.
        tracing::info!(version, "storage key destroyed");
        Ok(())
    }

    fn has_keyring_root(&self) -> bool {
        true
    }

    fn new_wrapped_storage_key(&self) -> Result<Vec<u8>> {
        let mut k = Zeroizing::new([0u8; 32]);
        os_random(&mut k[..])?;
        let root = self.read().root()?;
        Ok(super::kw::wrap(&root, &k).to_vec())
    }

    fn hold_storage_key(&self, version: u32, wrapped: &[u8]) -> Result<()> {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        let root = keys.root()?;
        let key = super::kw::unwrap(&root, wrapped).ok_or_else(|| {
            Error::Keyring(format!(
                "storage key version {version} does not unwrap under this card's root key"
            ))
        })?;
        // A held version is replaced (a keyring restored from a backup
        // over one made for the empty database).
        keys.kstore.retain(|(v, _)| *v != version);
        keys.kstore.push((version, key));
        keys.kstore.sort_by_key(|(v, _)| *v);
        Ok(())
    }

    fn release_storage_key(&self, version: u32) -> Result<()> {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if version == keys.kstore_current {
            return Err(Error::CurrentStorageKey { version });
        }
        // The removed key zeroizes on drop.
        keys.kstore.retain(|(v, _)| *v != version);
        Ok(())
    }

    fn set_storage_key_version(&self, version: u32) -> Result<()> {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if !keys.kstore.iter().any(|(v, _)| *v == version) {
            return Err(Error::NoStorageKey { version });
        }
        keys.kstore_current = version;
        Ok(())
    }

    fn held_storage_keys(&self) -> Result<Option<super::WrappedStorageKeys>> {
        let keys = self.read();
        if keys.kstore.is_empty() {
            return Ok(None);
        }
        wrapped_storage_keys(&keys).map(Some)
    }

    fn legacy_storage_keys(&self) -> Result<Option<super::WrappedStorageKeys>> {
        self.reload_if_changed();
        let keys = self.read();
        if keys.in_db {
            return Ok(None);
        }
        wrapped_storage_keys(&keys).map(Some)
    }

    fn drop_legacy_storage_keys(&self) -> Result<()> {
        self.reload_if_changed();
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if keys.in_db {
            return Ok(());
        }
        keys.in_db = true;
        if let Err(e) = self.persist(&keys) {
            keys.in_db = false;
            return Err(e);
        }
        tracing::info!("card file now keeps only the root key: storage keys are in the keyring");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_sealed_to_its_record() {
        let card = SoftwareCard::ephemeral().unwrap();
        let seed = KeySeed::generate(2026, |b| b.fill(7));
        let dev = DeviceId::from_u64(1);
        let sealed = card.seal_seed(dev, 0, &seed).unwrap();
        let back = card
            .unseal_seed(dev, 0, sealed.kstore_version, &sealed.ciphertext)
            .unwrap();
        assert!(back == seed);
        // Moved to another device or generation: refused.
        assert!(matches!(
            card.unseal_seed(DeviceId::from_u64(2), 0, 1, &sealed.ciphertext),
            Err(Error::Verification)
        ));
        assert!(matches!(
            card.unseal_seed(dev, 1, 1, &sealed.ciphertext),
            Err(Error::Verification)
        ));
        let mut flipped = sealed.ciphertext.clone();
        flipped[40] ^= 1;
        assert!(card.unseal_seed(dev, 0, 1, &flipped).is_err());
    }

    #[test]
    fn debug_shows_no_key() {
        let card = SoftwareCard::ephemeral().unwrap();
        let dbg = format!("{card:?}");
        assert!(!dbg.contains(&hex::encode(card.read().ktrans.expose())));
        assert!(!dbg.contains(&hex::encode(&card.read().kint[..])));
    }

    #[test]
    fn rotation_is_saved_and_seen_by_another_instance() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("card");
        let a = SoftwareCard::init(&path, b"pw", KdfParams::insecure_for_tests()).unwrap();
        let b = SoftwareCard::open(&path, b"pw").unwrap();
        let dev = DeviceId::from_u64(9);
        let seed = KeySeed::generate(2026, |x| x.fill(3));
        assert_eq!(a.rotate_storage_key().unwrap(), 2);
        let sealed = a.seal_seed(dev, 0, &seed).unwrap();
        assert_eq!(sealed.kstore_version, 2);
        // The other instance (another process) opens it and seals under 2.
        assert!(b.unseal_seed(dev, 0, 2, &sealed.ciphertext).unwrap() == seed);
        assert_eq!(b.seal_seed(dev, 0, &seed).unwrap().kstore_version, 2);
        a.destroy_storage_key(1).unwrap();
        assert!(a.destroy_storage_key(2).is_err(), "the current one stays");
        let c = SoftwareCard::open(&path, b"pw").unwrap();
        assert_eq!(c.storage_key_versions(), vec![2]);
        assert_eq!(b.storage_key_versions(), vec![2]);
    }

    #[test]
    fn key_block_round_trip() {
        let card = SoftwareCard::ephemeral().unwrap();
        let b = card.read().to_bytes();
        let again = CardKeys::from_bytes(&b).unwrap();
        assert_eq!(&again.to_bytes()[..], &b[..]);
        assert!(CardKeys::from_bytes(&b[..b.len() - 1]).is_err());
    }
}

/// The storage keys `keys` holds, wrapped under its root key, with the
/// current version.
fn wrapped_storage_keys(keys: &CardKeys) -> Result<super::WrappedStorageKeys> {
    let root = keys.root()?;
    let wrapped = keys
        .kstore
        .iter()
        .map(|(v, k)| (*v, super::kw::wrap(&root, k).to_vec()))
        .collect();
    Ok((keys.kstore_current, wrapped))
}
