//! Durations (`"500ms"`, `"60s"`, `"2m"`, `"1h30m"`).
//!
//! Guarantees: a duration is one or more `<digits><unit>` parts with units `h`, `m`, `s`, `ms`,
//! `us`, `ns`, each used at most once and largest first; nothing else is accepted (no bare
//! numbers, no signs, no spaces, no fractions). Arithmetic is exact and checked. For every
//! `Duration` `d`, `parse_duration(&format_duration(d)) == Ok(d)`.

use std::fmt;
use std::time::Duration;

use serde::Serializer;

use crate::error::quoted;

/// A duration that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error(
        "{} is not a duration: expected numbers with units (h, m, s, ms), like \"500ms\", \"60s\" or \"1h30m\"",
        quoted(.0)
    )]
    Malformed(String),
    #[error("{} is not a duration: units must go from largest to smallest, each once", quoted(.0))]
    UnitOrder(String),
    #[error("{} is too long a duration", quoted(.0))]
    TooLarge(String),
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Units, largest first, with their length in nanoseconds.
const UNITS: &[(&str, u128)] = &[
    ("h", 3600 * NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Parses a duration; see the module documentation for the grammar.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let malformed = || DurationError::Malformed(text.to_owned());
    let too_large = || DurationError::TooLarge(text.to_owned());
    if text.is_empty() {
        return Err(malformed());
    }
    let mut rest = text;
    let mut total: u128 = 0;
    // Index into UNITS of the last unit used; the next must be strictly smaller.
    let mut last_unit: Option<usize> = None;
    while !rest.is_empty() {
        let digits_end = rest
            .bytes()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits_end == 0 {
            return Err(malformed());
        }
        let (digits, after) = rest.split_at(digits_end);
        let unit_end = after
            .bytes()
            .position(|b| !b.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        let unit_index = UNITS
            .iter()
            .position(|(name, _)| *name == unit)
            .ok_or_else(malformed)?;
        if last_unit.is_some_and(|last| unit_index <= last) {
            return Err(DurationError::UnitOrder(text.to_owned()));
        }
        last_unit = Some(unit_index);
        let mut value: u128 = 0;
        for digit in digits.bytes() {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(u128::from(digit - b'0')))
                .ok_or_else(too_large)?;
        }
        let nanos = value
            .checked_mul(UNITS[unit_index].1)
            .ok_or_else(too_large)?;
        total = total.checked_add(nanos).ok_or_else(too_large)?;
        rest = after;
    }
    let secs = u64::try_from(total / NANOS_PER_SEC).map_err(|_| too_large())?;
    // The remainder is below one second, so it fits in u32.
    let nanos = u32::try_from(total % NANOS_PER_SEC).map_err(|_| too_large())?;
    Ok(Duration::new(secs, nanos))
}

/// The canonical text of a duration: its non-zero parts, largest first (`"1h30m"`, `"1s500ms"`),
/// or `"0s"`.
pub fn format_duration(duration: Duration) -> String {
    DurationText(duration).to_string()
}

struct DurationText(Duration);

impl fmt::Display for DurationText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut remaining = self.0.as_nanos();
        if remaining == 0 {
            return f.write_str("0s");
        }
        for (name, nanos) in UNITS {
            let count = remaining / nanos;
            if count > 0 {
                write!(f, "{count}{name}")?;
                remaining %= nanos;
            }
        }
        Ok(())
    }
}

/// Serializes a duration as its canonical text, so policies render the way they are written.
pub(crate) fn serialize<S: Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&DurationText(*duration))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_with_one_unit_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
    }

    #[test]
    fn durations_with_several_units_add_up() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1m500ms"), Ok(Duration::from_millis(60_500)));
        assert_eq!(
            parse_duration("1h2m3s4ms"),
            Ok(Duration::from_millis(3_723_004))
        );
    }

    #[test]
    fn malformed_durations_are_rejected() {
        for bad in [
            "", "60", "s", "1.5s", "-1s", "+1s", " 1s", "1s ", "1 s", "1d", "1S", "1hh", "1h 30m",
            "60sec", "1µs", "１s",
        ] {
            assert_eq!(
                parse_duration(bad),
                Err(DurationError::Malformed(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn units_out_of_order_or_repeated_are_rejected() {
        for bad in ["30m1h", "1s1s", "1ms1s", "1m1m"] {
            assert_eq!(
                parse_duration(bad),
                Err(DurationError::UnitOrder(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn huge_durations_are_errors_not_wrap_arounds() {
        let text = "99999999999999999999999999999999999999999h";
        assert_eq!(
            parse_duration(text),
            Err(DurationError::TooLarge(text.to_owned()))
        );
        let text = "18446744073709551616s";
        assert_eq!(
            parse_duration(text),
            Err(DurationError::TooLarge(text.to_owned()))
        );
    }

    #[test]
    fn format_uses_the_largest_units_first() {
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(60)), "1m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::new(1, 1)), "1s1ns");
    }

    #[test]
    fn error_message_shows_the_expected_form() {
        assert_eq!(
            parse_duration("60").unwrap_err().to_string(),
            "\"60\" is not a duration: expected numbers with units (h, m, s, ms), like \"500ms\", \"60s\" or \"1h30m\""
        );
    }
}
