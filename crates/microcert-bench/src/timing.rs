//! A short manual timing loop, for figures printed beside criterion's.
//!
//! Work is run in batches long enough (about [`BATCH`]) for the clock to be
//! exact; each batch gives one time per operation, and the median of the
//! batches is reported, so a batch slowed down by another process on the
//! machine moves nothing. [`compare`] interleaves the batches of two
//! operations so that both see the same machine.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// Target length of one batch.
pub const BATCH: Duration = Duration::from_millis(10);

/// How many operations make a batch of about [`BATCH`].
pub fn calibrate(f: &mut impl FnMut() -> bool) -> u64 {
    let mut n: u64 = 1;
    loop {
        let start = Instant::now();
        for _ in 0..n {
            black_box(f());
        }
        let el = start.elapsed();
        if el >= BATCH / 4 || n >= 1 << 30 {
            let per = el.as_secs_f64() / n as f64;
            return ((BATCH.as_secs_f64() / per.max(1e-12)) as u64).max(1);
        }
        n *= 4;
    }
}

/// Nanoseconds per operation of one batch of `n` calls.
fn batch(f: &mut impl FnMut() -> bool, n: u64) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        black_box(f());
    }
    start.elapsed().as_secs_f64() * 1e9 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Median nanoseconds per call of `f` over `rounds` batches.
pub fn ns_per_op(mut f: impl FnMut() -> bool, rounds: usize) -> f64 {
    let n = calibrate(&mut f);
    median((0..rounds.max(1)).map(|_| batch(&mut f, n)).collect())
}

/// Median nanoseconds per call of `a` and of `b`, batches interleaved.
pub fn compare(
    mut a: impl FnMut() -> bool,
    mut b: impl FnMut() -> bool,
    rounds: usize,
) -> (f64, f64) {
    let na = calibrate(&mut a);
    let nb = calibrate(&mut b);
    let mut ta = Vec::with_capacity(rounds);
    let mut tb = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        ta.push(batch(&mut a, na));
        tb.push(batch(&mut b, nb));
    }
    (median(ta), median(tb))
}

/// Operations per second of an operation taking `ns` nanoseconds.
pub fn per_second(ns: f64) -> f64 {
    1e9 / ns
}

/// `v` with thousands separators, rounded to a whole number.
pub fn grouped(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn grouped_thousands() {
        assert_eq!(grouped(1_234_567.4), "1,234,567");
        assert_eq!(grouped(999.0), "999");
        assert_eq!(grouped(1000.0), "1,000");
    }

    #[test]
    fn slower_work_takes_longer() {
        let mut x = 0u64;
        let (fast, slow) = compare(
            || {
                x = x.wrapping_add(1);
                true
            },
            || {
                let mut y = 0u64;
                for i in 0..2000u64 {
                    y = black_box(y.wrapping_mul(31).wrapping_add(i));
                }
                y != 1
            },
            3,
        );
        assert!(slow > fast, "slow {slow} ns, fast {fast} ns");
    }
}
