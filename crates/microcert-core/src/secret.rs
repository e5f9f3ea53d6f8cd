//! Secret types: a 128-bit key and the 976-byte key seed.
//!
//! Neither derives `Debug` or `Clone`; both zeroize on drop and compare in
//! constant time.

use core::fmt;

use subtle::{Choice, ConstantTimeEq};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::time;

/// A 128-bit symmetric key: K0, a working key, Ktr, Ktrans or Kchal.
pub struct Key128([u8; 16]);

impl Key128 {
    /// Wraps key bytes. The caller should zeroize its own copy.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Key128(bytes)
    }

    /// The key bytes, for a cipher or for sealed storage.
    pub const fn expose(&self) -> &[u8; 16] {
        &self.0
    }

    pub(crate) fn as_mut(&mut self) -> &mut [u8; 16] {
        &mut self.0
    }

    pub(crate) const fn zero() -> Self {
        Key128([0; 16])
    }
}

impl Drop for Key128 {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for Key128 {}

impl fmt::Debug for Key128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key128(<redacted>)")
    }
}

impl ConstantTimeEq for Key128 {
    fn ct_eq(&self, other: &Self) -> Choice {
        self.0.ct_eq(&other.0)
    }
}

impl PartialEq for Key128 {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for Key128 {}

/// Length of a key seed in bytes: 61 rows of 16 bytes.
pub const SEED_LEN: usize = 976;
/// Number of rows of a key seed.
pub const SEED_ROWS: usize = 61;
/// Number of calendar years a seed serves.
pub const SEED_YEARS: u16 = 5;

const MONTH_ROWS: usize = 5;
const DAY_ROWS: usize = 17;
const FIXED_ROWS: usize = 48;

/// A device's key seed: rows `Y[0..5]`, `M[0..12]`, `D[0..31]`, `R[0..13]` and the
/// calendar year served by `Y[0]`.
///
/// It serves the years `base_year..=base_year + 4`.
pub struct KeySeed {
    bytes: [u8; SEED_LEN],
    base_year: u16,
}

impl KeySeed {
    /// Wraps seed bytes (rows in storage order) and its base year.
    pub fn from_bytes(bytes: &[u8; SEED_LEN], base_year: u16) -> Self {
        KeySeed {
            bytes: *bytes,
            base_year,
        }
    }

    /// Like [`KeySeed::from_bytes`], from a slice that must be exactly
    /// [`SEED_LEN`] bytes long.
    pub fn from_slice(bytes: &[u8], base_year: u16) -> crate::Result<Self> {
        let mut seed = KeySeed {
            bytes: [0; SEED_LEN],
            base_year,
        };
        if bytes.len() != SEED_LEN {
            return Err(crate::Error::Length);
        }
        seed.bytes.copy_from_slice(bytes);
        Ok(seed)
    }

    /// Fills a seed in place with a caller's random generator, so that the
    /// bytes are never copied out of the seed.
    pub fn generate(base_year: u16, fill: impl FnOnce(&mut [u8])) -> Self {
        let mut seed = KeySeed {
            bytes: [0; SEED_LEN],
            base_year,
        };
        fill(&mut seed.bytes);
        seed
    }

    /// The seed bytes, rows in storage order. Handle with care.
    pub fn expose(&self) -> &[u8; SEED_LEN] {
        &self.bytes
    }

    /// The calendar year served by the first year row.
    pub const fn base_year(&self) -> u16 {
        self.base_year
    }

    /// The last calendar year the seed serves.
    pub const fn last_year(&self) -> u16 {
        self.base_year.saturating_add(SEED_YEARS - 1)
    }

    /// The first second the seed serves (1 January of its base year, UTC).
    pub fn valid_from(&self) -> i64 {
        time::year_start(i64::from(self.base_year))
    }

    /// The first second the seed no longer serves (1 January of
    /// base year + 5, UTC).
    pub fn valid_until(&self) -> i64 {
        time::year_start(i64::from(self.base_year) + i64::from(SEED_YEARS))
    }

    fn row(&self, i: usize) -> &[u8; 16] {
        let (rows, _) = self.bytes.as_chunks::<16>();
        &rows[i]
    }

    /// Y[i], the row of year base_year + i (i < 5).
    pub(crate) fn year_row(&self, i: usize) -> &[u8; 16] {
        self.row(i)
    }

    /// M[m - 1] for month m (1..=12).
    pub(crate) fn month_row(&self, month: u8) -> &[u8; 16] {
        self.row(MONTH_ROWS + usize::from(month) - 1)
    }

    /// D[d - 1] for day d (1..=31).
    pub(crate) fn day_row(&self, day: u8) -> &[u8; 16] {
        self.row(DAY_ROWS + usize::from(day) - 1)
    }

    /// R[i] (i < 13).
    pub(crate) fn fixed_row(&self, i: usize) -> &[u8; 16] {
        self.row(FIXED_ROWS + i)
    }
}

impl Drop for KeySeed {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl ZeroizeOnDrop for KeySeed {}

impl fmt::Debug for KeySeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySeed")
            .field("base_year", &self.base_year)
            .field("bytes", &"<redacted>")
            .finish()
    }
}

impl ConstantTimeEq for KeySeed {
    fn ct_eq(&self, other: &Self) -> Choice {
        self.bytes.ct_eq(&other.bytes) & self.base_year.ct_eq(&other.base_year)
    }
}

impl PartialEq for KeySeed {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for KeySeed {}
