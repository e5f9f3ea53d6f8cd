//! Calendar arithmetic on Unix time (UTC, proleptic Gregorian, no leap
//! seconds). The core reads no clock: every time is an argument.

/// A calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Date {
    /// The year, e.g. 2026.
    pub year: i64,
    /// The month, 1..=12.
    pub month: u8,
    /// The day of the month, 1..=31.
    pub day: u8,
}

/// Seconds in a day.
pub const DAY: i64 = 86_400;

/// The UTC calendar date of Unix time `t` (H. Hinnant's `civil_from_days`).
pub fn date_of(t: i64) -> Date {
    let z = t.div_euclid(DAY) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..=365
    let mp = (5 * doy + 2) / 153; // 0..=11
    let day = doy - (153 * mp + 2) / 5 + 1; // 1..=31
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // 1..=12
    let year = yoe + era * 400 + i64::from(month <= 2);
    // The ranges above are exact, so the narrowing casts cannot truncate.
    Date {
        year,
        month: month as u8,
        day: day as u8,
    }
}

/// Days since 1970-01-01 of a calendar date (H. Hinnant's `days_from_civil`).
pub fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let m = i64::from(month);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix time of 1 January of `year`, 00:00:00 UTC.
pub fn year_start(year: i64) -> i64 {
    days_from_civil(year, 1, 1) * DAY
}
