//! CSK selection and combination (PROTOCOL.md section 2).
//!
//! The date of `t` picks one year, one month and one day row; `r` picks four
//! of the thirteen fixed rows by a partial Fisher-Yates shuffle. K0 is the
//! SP 800-56C extraction with AES-128-CMAC keyed by the year row (a secret
//! salt) over the month, day and fixed rows.

use crate::kdf::cmac_parts;
use crate::secret::{Key128, KeySeed};
use crate::time;
use crate::{Error, Result};

/// The four fixed rows picked by `r`, in combination order.
pub fn pick_fixed_rows(r: u64) -> [usize; 4] {
    let mut pick: [usize; 13] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
    for j in 0..4 {
        let v = ((r >> (48 - 16 * j)) & 0xFFFF) as usize;
        let k = j + v % (13 - j);
        pick.swap(j, k);
    }
    [pick[0], pick[1], pick[2], pick[3]]
}

/// Index of the year row serving Unix time `t`, or why there is none.
pub fn year_index(base_year: u16, t: u32) -> Result<usize> {
    let year = time::date_of(i64::from(t)).year;
    let yi = year - i64::from(base_year);
    if yi < 0 {
        Err(Error::SeedNotYetValid)
    } else if yi >= i64::from(crate::secret::SEED_YEARS) {
        Err(Error::SeedExpired)
    } else {
        Ok(yi as usize)
    }
}

/// K0: the combined key of `seed` for time `t` and random number `r`.
pub fn combine(seed: &KeySeed, t: u32, r: u64) -> Result<Key128> {
    let yi = year_index(seed.base_year(), t)?;
    let date = time::date_of(i64::from(t));
    let [a, b, c, d] = pick_fixed_rows(r);
    Ok(cmac_parts(
        seed.year_row(yi),
        &[
            seed.month_row(date.month),
            seed.day_row(date.day),
            seed.fixed_row(a),
            seed.fixed_row(b),
            seed.fixed_row(c),
            seed.fixed_row(d),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r_zero_picks_first_rows() {
        assert_eq!(pick_fixed_rows(0), [0, 1, 2, 3]);
    }

    #[test]
    fn picks_are_distinct() {
        for r in [u64::MAX, 0x0123_4567_89ab_cdef, 0xffff_0000_ffff_0000, 12] {
            let p = pick_fixed_rows(r);
            for i in 0..4 {
                assert!(p[i] < 13);
                for j in 0..i {
                    assert_ne!(p[i], p[j], "r = {r:#x}");
                }
            }
        }
    }

    #[test]
    fn pick_by_hand() {
        // v0 = 0x0001 -> k = 0 + 1 % 13 = 1: swap 0,1 -> [1,0,2,..]
        // v1 = 0x0002 -> k = 1 + 2 % 12 = 3: swap 1,3 -> [1,3,2,0,..]
        // v2 = 0x000b -> k = 2 + 11 % 11 = 2: no swap
        // v3 = 0x000a -> k = 3 + 10 % 10 = 3: no swap
        assert_eq!(pick_fixed_rows(0x0001_0002_000b_000a), [1, 3, 2, 0]);
    }
}
