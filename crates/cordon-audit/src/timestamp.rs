//! Time as the audit store sees it.
//!
//! Guarantees:
//! - A [`Timestamp`] is a whole number of milliseconds since the Unix epoch, UTC. Its text form
//!   ([`Timestamp::to_rfc3339`]) is RFC 3339 with exactly three fractional digits and a `Z`, and is
//!   a pure function of the integer: the store keeps both, and the hash chain covers both, so the
//!   two columns cannot be made to disagree unnoticed.
//! - Formatting is total (every `i64` formats); parsing accepts any RFC 3339 offset and rounds
//!   finer precision down to the millisecond.
//! - [`parse_since`] and [`parse_age`] reject anything they do not fully understand (empty input,
//!   unknown units, overflow) with an error naming the input; they never guess.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const MS_PER_DAY: i64 = 86_400_000;

/// Why a time or duration could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error(
        "invalid timestamp {input:?}: expected RFC 3339 such as 2025-01-31T12:00:00Z ({detail})"
    )]
    Rfc3339 { input: String, detail: String },
    #[error("invalid duration {input:?}: expected a number and a unit (ms, s, m, h, d, w), e.g. 30m, 7d, 1h30m")]
    Duration { input: String },
    #[error("duration {input:?} is too large")]
    Overflow { input: String },
    #[error(
        "invalid --since {input:?}: expected a duration (1h, 30m, 7d) or an RFC 3339 timestamp"
    )]
    Since { input: String },
}

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The timestamp `ms` milliseconds after the Unix epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// The current wall-clock time, truncated to the millisecond.
    pub fn now() -> Self {
        let ms = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
            // A clock set before 1970: keep the (negative) truth rather than inventing a time.
            Err(before) => i64::try_from(before.duration().as_millis())
                .map(|ms| -ms)
                .unwrap_or(i64::MIN),
        };
        Timestamp(ms)
    }

    /// This timestamp moved back by `ms` milliseconds (saturating).
    pub const fn minus_millis(self, ms: i64) -> Self {
        Timestamp(self.0.saturating_sub(ms))
    }

    /// RFC 3339, UTC, exactly three fractional digits: `2025-01-31T12:00:00.000Z`.
    pub fn to_rfc3339(self) -> String {
        let days = self.0.div_euclid(MS_PER_DAY);
        let ms_of_day = self.0.rem_euclid(MS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        let hour = ms_of_day / 3_600_000;
        let minute = ms_of_day / 60_000 % 60;
        let second = ms_of_day / 1000 % 60;
        let milli = ms_of_day % 1000;
        if (0..=9999).contains(&year) {
            // The common case without the formatting machinery (the audit writer's hot path);
            // the same text as the general case below.
            let mut out = [0u8; 24];
            put_digits(&mut out[0..4], year);
            out[4] = b'-';
            put_digits(&mut out[5..7], month);
            out[7] = b'-';
            put_digits(&mut out[8..10], day);
            out[10] = b'T';
            put_digits(&mut out[11..13], hour);
            out[13] = b':';
            put_digits(&mut out[14..16], minute);
            out[16] = b':';
            put_digits(&mut out[17..19], second);
            out[19] = b'.';
            put_digits(&mut out[20..23], milli);
            out[23] = b'Z';
            // Only ASCII digits and separators were written.
            return String::from_utf8(out.to_vec()).unwrap_or_default();
        }
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z")
    }

    /// Parses any RFC 3339 timestamp (any offset, any fractional precision, rounded down to ms).
    pub fn parse_rfc3339(input: &str) -> Result<Self, TimeError> {
        let parsed = time::OffsetDateTime::parse(
            input.trim(),
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|e| TimeError::Rfc3339 {
            input: input.to_owned(),
            detail: e.to_string(),
        })?;
        let ms = parsed.unix_timestamp_nanos().div_euclid(1_000_000);
        // time's default range (years -9999..=9999) always fits in i64 milliseconds.
        i64::try_from(ms)
            .map(Timestamp)
            .map_err(|_| TimeError::Rfc3339 {
                input: input.to_owned(),
                detail: "out of range".to_owned(),
            })
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TsVisitor;
        impl Visitor<'_> for TsVisitor {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp or integer milliseconds since the epoch")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Timestamp, E> {
                Timestamp::parse_rfc3339(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Timestamp, E> {
                Ok(Timestamp(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Timestamp, E> {
                i64::try_from(v)
                    .map(Timestamp)
                    .map_err(|_| E::custom("timestamp out of range"))
            }
        }
        deserializer.deserialize_any(TsVisitor)
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
/// Howard Hinnant's `civil_from_days`; exact for every `i64` day count we can produce from
/// `i64` milliseconds.
/// Writes the `out.len()` lowest decimal digits of `n` (which is not negative), zero-padded.
fn put_digits(out: &mut [u8], mut n: i64) {
    for slot in out.iter_mut().rev() {
        // `n % 10` is 0..=9 for the non-negative values callers pass.
        *slot = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
    }
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Parses an age such as `30m`, `7d` or `1h30m` into milliseconds. Units: `ms`, `s`, `m`, `h`,
/// `d`, `w`. Every segment needs a unit; the total must fit in an `i64`.
pub fn parse_age(input: &str) -> Result<i64, TimeError> {
    let bad = || TimeError::Duration {
        input: input.to_owned(),
    };
    let overflow = || TimeError::Overflow {
        input: input.to_owned(),
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(bad());
    }
    let bytes = s.as_bytes();
    let mut total: i64 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        let number: i64 = s[start..i].parse().map_err(|_| overflow())?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit_ms: i64 = match &s[unit_start..i] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => MS_PER_DAY,
            "w" => 7 * MS_PER_DAY,
            _ => return Err(bad()),
        };
        let segment = number.checked_mul(unit_ms).ok_or_else(overflow)?;
        total = total.checked_add(segment).ok_or_else(overflow)?;
    }
    Ok(total)
}

/// `--since` as a person types it: an age (`1h`, `30m`, `7d`, meaning that long before now), an
/// RFC 3339 timestamp, or a plain date (`2025-01-31`, midnight UTC).
pub fn parse_since(input: &str) -> Result<Timestamp, TimeError> {
    parse_since_at(input, Timestamp::now())
}

/// [`parse_since`] with an explicit "now", so callers and tests get a deterministic answer.
pub fn parse_since_at(input: &str, now: Timestamp) -> Result<Timestamp, TimeError> {
    let s = input.trim();
    let starts_with_date = s.len() >= 10
        && s.as_bytes()[4] == b'-'
        && s.as_bytes()[7] == b'-'
        && s.as_bytes()[..4].iter().all(u8::is_ascii_digit);
    if starts_with_date {
        if s.len() == 10 {
            return Timestamp::parse_rfc3339(&format!("{s}T00:00:00Z")).map_err(|_| {
                TimeError::Since {
                    input: input.to_owned(),
                }
            });
        }
        return Timestamp::parse_rfc3339(s);
    }
    match parse_age(s) {
        Ok(age) => Ok(now.minus_millis(age)),
        Err(TimeError::Overflow { input }) => Err(TimeError::Overflow { input }),
        Err(_) => Err(TimeError::Since {
            input: input.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn epoch_and_known_instants_format_as_rfc3339_with_milliseconds() {
        assert_eq!(Timestamp(0).to_rfc3339(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Timestamp(1_700_000_000_123).to_rfc3339(),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(Timestamp(-1).to_rfc3339(), "1969-12-31T23:59:59.999Z");
        // Leap day.
        assert_eq!(
            Timestamp(951_782_400_000).to_rfc3339(),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn formatting_never_panics_at_the_extremes() {
        assert!(!Timestamp(i64::MAX).to_rfc3339().is_empty());
        assert!(!Timestamp(i64::MIN).to_rfc3339().is_empty());
    }

    #[test]
    fn offsets_and_fine_fractions_parse_to_utc_milliseconds() {
        let t = Timestamp::parse_rfc3339("2023-11-14T23:13:20.123999+01:00").unwrap();
        assert_eq!(t, Timestamp(1_700_000_000_123));
        let t = Timestamp::parse_rfc3339("2023-11-14T22:13:20Z").unwrap();
        assert_eq!(t, Timestamp(1_700_000_000_000));
    }

    #[test]
    fn since_accepts_ages_timestamps_and_dates() {
        let now = Timestamp(1_700_000_000_000);
        assert_eq!(
            parse_since_at("1h", now).unwrap(),
            Timestamp(1_700_000_000_000 - 3_600_000)
        );
        assert_eq!(
            parse_since_at("30m", now).unwrap(),
            Timestamp(1_700_000_000_000 - 1_800_000)
        );
        assert_eq!(
            parse_since_at("7d", now).unwrap(),
            Timestamp(1_700_000_000_000 - 7 * 86_400_000)
        );
        assert_eq!(
            parse_since_at("1h30m", now).unwrap(),
            Timestamp(1_700_000_000_000 - 5_400_000)
        );
        assert_eq!(
            parse_since_at("2023-11-14T22:13:20.123Z", now).unwrap(),
            Timestamp(1_700_000_000_123)
        );
        assert_eq!(
            parse_since_at("2023-11-14", now).unwrap(),
            Timestamp(1_699_920_000_000)
        );
    }

    #[test]
    fn since_rejects_what_it_does_not_understand() {
        let now = Timestamp(0);
        for bad in [
            "",
            "h",
            "1",
            "1y",
            "-1h",
            "1 h",
            "1h-",
            "yesterday",
            "2023-13-01",
            "2023-11-14T25:00:00Z",
        ] {
            assert!(parse_since_at(bad, now).is_err(), "{bad:?} was accepted");
        }
        assert!(matches!(
            parse_since_at("99999999999999999999d", now),
            Err(TimeError::Overflow { .. })
        ));
        assert!(matches!(
            parse_since_at("9999999999999w", now),
            Err(TimeError::Overflow { .. })
        ));
    }

    #[test]
    fn timestamps_serialize_as_strings_and_accept_integers_back() {
        let t = Timestamp(1_700_000_000_123);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2023-11-14T22:13:20.123Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
        assert_eq!(
            serde_json::from_str::<Timestamp>("1700000000123").unwrap(),
            t
        );
    }

    proptest! {
        #[test]
        fn formatting_then_parsing_gives_back_the_same_millisecond(
            // Years 0001..=9999, the range RFC 3339 can express.
            ms in -62_135_596_800_000i64..253_402_300_799_999i64
        ) {
            let t = Timestamp(ms);
            prop_assert_eq!(Timestamp::parse_rfc3339(&t.to_rfc3339()).unwrap(), t);
        }

        #[test]
        fn the_fast_text_form_is_the_formatted_one(
            // Years about -2000..=20000: both sides of the fast path's range.
            ms in -125_000_000_000_000i64..570_000_000_000_000i64
        ) {
            let t = Timestamp(ms);
            let days = ms.div_euclid(MS_PER_DAY);
            let of_day = ms.rem_euclid(MS_PER_DAY);
            let (y, mo, d) = civil_from_days(days);
            let expected = format!(
                "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
                of_day / 3_600_000,
                of_day / 60_000 % 60,
                of_day / 1000 % 60,
                of_day % 1000
            );
            prop_assert_eq!(t.to_rfc3339(), expected);
        }

        #[test]
        fn since_parsing_never_panics(s in "\\PC{0,40}") {
            let _ = parse_since_at(&s, Timestamp(0));
        }

        #[test]
        fn ages_parse_to_the_sum_of_their_segments(h in 0i64..10_000, m in 0i64..10_000) {
            prop_assert_eq!(parse_age(&format!("{h}h{m}m")).unwrap(), h * 3_600_000 + m * 60_000);
        }
    }
}
