//! Calendar edges: 29 February, the last second of a year and the first
//! of the next, and times outside the seed's five years. Expected Unix
//! times were computed outside the crate (Python's `datetime`, UTC).

use microcert_core::csk::{combine, pick_fixed_rows, year_index};
use microcert_core::time::{Date, date_of, days_from_civil, year_start};
use microcert_core::{
    Audience, Auth, DeviceId, Error, Header, KeySeed, SEED_LEN, Suite, make_auth, verify_auth,
};

const BASE_YEAR: u16 = 2026;
const T_2025_12_31_235959: u32 = 1_767_225_599;
const T_2026_01_01_000000: u32 = 1_767_225_600;
const T_2026_12_31_235959: u32 = 1_798_761_599;
const T_2027_01_01_000000: u32 = 1_798_761_600;
const T_2028_02_28_120000: u32 = 1_835_352_000;
const T_2028_02_29_000000: u32 = 1_835_395_200;
const T_2028_02_29_235959: u32 = 1_835_481_599;
const T_2028_03_01_000000: u32 = 1_835_481_600;
const T_2030_12_31_235959: u32 = 1_924_991_999;
const T_2031_01_01_000000: u32 = 1_924_992_000;

fn seed() -> KeySeed {
    let bytes: [u8; SEED_LEN] = core::array::from_fn(|i| (i * 37 + 11) as u8);
    KeySeed::from_bytes(&bytes, BASE_YEAR)
}

fn date(year: i64, month: u8, day: u8) -> Date {
    Date { year, month, day }
}

/// The rows K0 depends on at (t, r), found from outside: change each row
/// in turn and see whether K0 changes.
fn rows_used(t: u32, r: u64) -> Vec<usize> {
    let base = seed();
    let k0 = combine(&base, t, r).unwrap();
    (0..61)
        .filter(|row| {
            let mut bytes = *base.expose();
            bytes[row * 16] ^= 1;
            combine(&KeySeed::from_bytes(&bytes, BASE_YEAR), t, r).unwrap() != k0
        })
        .collect()
}

/// The rows the design says (t, r) uses: Y[yi], M[m-1], D[d-1] and the
/// four fixed rows, sorted.
fn rows_expected(yi: usize, month: usize, day: usize, r: u64) -> Vec<usize> {
    let mut v = vec![yi, 5 + month - 1, 17 + day - 1];
    v.extend(pick_fixed_rows(r).iter().map(|p| 48 + p));
    v.sort_unstable();
    v
}

fn auth_at(t: u32) -> Result<(), Error> {
    let s = seed();
    let h = Header {
        suite: Suite::CMAC64,
        device: DeviceId([1, 2, 3, 4, 5, 6, 7, 8]),
        generation: 0,
        t,
        r: 0x0123_4567_89ab_cdef,
    };
    let mut buf = [0u8; 31];
    make_auth(&s, &h, &Audience::CENTER, &mut buf)?;
    verify_auth(&s, &Auth::decode(&buf).unwrap(), &Audience::CENTER)
}

#[test]
fn date_of_known_dates() {
    assert_eq!(date_of(0), date(1970, 1, 1));
    assert_eq!(date_of(86_399), date(1970, 1, 1));
    assert_eq!(date_of(86_400), date(1970, 1, 2));
    assert_eq!(date_of(-1), date(1969, 12, 31));
    assert_eq!(date_of(951_825_600), date(2000, 2, 29));
    assert_eq!(date_of(1_790_000_000), date(2026, 9, 21));
    assert_eq!(date_of(4_107_542_400), date(2100, 3, 1));
    assert_eq!(date_of(i64::from(u32::MAX)), date(2106, 2, 7));
}

#[test]
fn date_of_around_29_february_2028() {
    assert_eq!(date_of(T_2028_02_28_120000.into()), date(2028, 2, 28));
    assert_eq!(date_of(T_2028_02_29_000000.into()), date(2028, 2, 29));
    assert_eq!(date_of(T_2028_02_29_235959.into()), date(2028, 2, 29));
    assert_eq!(date_of(T_2028_03_01_000000.into()), date(2028, 3, 1));
}

#[test]
fn date_of_around_new_year() {
    assert_eq!(date_of(T_2026_12_31_235959.into()), date(2026, 12, 31));
    assert_eq!(date_of(T_2027_01_01_000000.into()), date(2027, 1, 1));
    assert_eq!(date_of(T_2030_12_31_235959.into()), date(2030, 12, 31));
    assert_eq!(date_of(T_2031_01_01_000000.into()), date(2031, 1, 1));
}

#[test]
fn days_from_civil_and_year_start_invert_date_of() {
    assert_eq!(days_from_civil(1970, 1, 1), 0);
    assert_eq!(
        days_from_civil(2028, 2, 29) * 86_400,
        i64::from(T_2028_02_29_000000)
    );
    assert_eq!(year_start(2026), i64::from(T_2026_01_01_000000));
    assert_eq!(year_start(2031), i64::from(T_2031_01_01_000000));
}

#[test]
fn seed_validity_bounds() {
    let s = seed();
    assert_eq!(s.valid_from(), i64::from(T_2026_01_01_000000));
    assert_eq!(s.valid_until(), i64::from(T_2031_01_01_000000));
    assert_eq!(s.last_year(), 2030);
}

#[test]
fn year_index_at_the_edges_of_the_five_years() {
    assert_eq!(
        year_index(BASE_YEAR, T_2025_12_31_235959),
        Err(Error::SeedNotYetValid)
    );
    assert_eq!(year_index(BASE_YEAR, T_2026_01_01_000000), Ok(0));
    assert_eq!(year_index(BASE_YEAR, T_2026_12_31_235959), Ok(0));
    assert_eq!(year_index(BASE_YEAR, T_2027_01_01_000000), Ok(1));
    assert_eq!(year_index(BASE_YEAR, T_2028_02_29_000000), Ok(2));
    assert_eq!(year_index(BASE_YEAR, T_2030_12_31_235959), Ok(4));
    assert_eq!(
        year_index(BASE_YEAR, T_2031_01_01_000000),
        Err(Error::SeedExpired)
    );
    assert_eq!(year_index(BASE_YEAR, 0), Err(Error::SeedNotYetValid));
    assert_eq!(year_index(BASE_YEAR, u32::MAX), Err(Error::SeedExpired));
}

#[test]
fn messages_work_inside_the_years_and_fail_outside() {
    assert_eq!(auth_at(T_2025_12_31_235959), Err(Error::SeedNotYetValid));
    assert_eq!(auth_at(T_2026_01_01_000000), Ok(()));
    assert_eq!(auth_at(T_2028_02_29_235959), Ok(()));
    assert_eq!(auth_at(T_2030_12_31_235959), Ok(()));
    assert_eq!(auth_at(T_2031_01_01_000000), Err(Error::SeedExpired));
}

#[test]
fn verify_refuses_a_message_dated_outside_the_years() {
    // A message made under a seed based a year later, checked under ours.
    let mut bytes = *seed().expose();
    bytes[0] ^= 0xff;
    let later = KeySeed::from_bytes(&bytes, BASE_YEAR + 5);
    let h = Header {
        suite: Suite::CMAC64,
        device: DeviceId([1; 8]),
        generation: 0,
        t: T_2031_01_01_000000,
        r: 7,
    };
    let mut buf = [0u8; 31];
    make_auth(&later, &h, &Audience::CENTER, &mut buf).unwrap();
    let msg = Auth::decode(&buf).unwrap();
    assert_eq!(
        verify_auth(&seed(), &msg, &Audience::CENTER),
        Err(Error::SeedExpired)
    );
}

#[test]
fn rows_on_29_february_2028() {
    // Year row Y[2] (2028), month row M[1] (February), day row D[28].
    assert_eq!(
        rows_used(T_2028_02_29_000000, 0),
        rows_expected(2, 2, 29, 0)
    );
    assert_eq!(
        rows_used(T_2028_02_29_000000, 0),
        vec![2, 6, 45, 48, 49, 50, 51]
    );
    assert_eq!(
        rows_used(T_2028_02_28_120000, 0),
        vec![2, 6, 44, 48, 49, 50, 51]
    );
    assert_eq!(
        rows_used(T_2028_03_01_000000, 0),
        vec![2, 7, 17, 48, 49, 50, 51]
    );
}

#[test]
fn the_year_row_changes_at_new_year() {
    // 2026-12-31T23:59:59 uses Y[0], M[11], D[30]; one second later Y[1], M[0], D[0].
    assert_eq!(
        rows_used(T_2026_12_31_235959, 0),
        vec![0, 16, 47, 48, 49, 50, 51]
    );
    assert_eq!(
        rows_used(T_2027_01_01_000000, 0),
        vec![1, 5, 17, 48, 49, 50, 51]
    );
    // The last second of the last year uses the last year row.
    assert_eq!(
        rows_used(T_2030_12_31_235959, 0),
        vec![4, 16, 47, 48, 49, 50, 51]
    );
    assert_eq!(
        rows_used(T_2026_01_01_000000, 0),
        vec![0, 5, 17, 48, 49, 50, 51]
    );
}

#[test]
fn r_selects_the_fixed_rows_by_partial_fisher_yates() {
    // Worked by hand from the design: v_j = (r >> (48 - 16 j)) & 0xffff,
    // k = j + v_j mod (13 - j), swap(pick[j], pick[k]).
    // r = 0x000c_000b_000a_0009: k = 12, 1 + 11 = 12, 2 + 10 % 11 = 12,
    // 3 + 9 % 10 = 12; picks 12, then 0, 1, 2 as they are swapped to the end.
    assert_eq!(pick_fixed_rows(0x000c_000b_000a_0009), [12, 0, 1, 2]);
    // r = u64::MAX: v = 65535; 65535 % 13 = 2, % 12 = 3, % 11 = 8, % 10 = 5:
    // k = 2, 4, 10, 8; [0..13] -> swap(0,2) [2,1,0,..] -> swap(1,4) [2,4,0,3,1,..]
    // -> swap(2,10) [2,4,10,3,..] -> swap(3,8) [2,4,10,8].
    assert_eq!(pick_fixed_rows(u64::MAX), [2, 4, 10, 8]);
    assert_eq!(
        rows_used(T_2028_02_29_000000, u64::MAX),
        vec![2, 6, 45, 48 + 2, 48 + 4, 48 + 8, 48 + 10]
    );
}
