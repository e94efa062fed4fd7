//! Byte sizes (`"512M"`, `"1GiB"`, `"10MB"`, `"1048576"`).
//!
//! Guarantees: parsing is exact integer arithmetic (no floats, no rounding); a value that does not
//! fit in 64 bits is an error, never a wrap-around; and for every `ByteSize`,
//! `ByteSize::parse(&size.to_string()) == Ok(size)`.
//!
//! `K`/`M`/`G`/`T` (and `KiB`, `Ki`, ...) are powers of 1024, as `ulimit` and cgroups count;
//! `KB`/`MB`/`GB`/`TB` are powers of 1000, as disk vendors count. Letters are case-insensitive.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::quoted;

/// A number of bytes. Displays as the shortest exact 1024-based form (`512M`, `1G`, `1000000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// A size that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{} is not a size: expected a number with an optional K/M/G/T suffix", quoted(.0))]
    Malformed(String),
    #[error("{} is too large: a size must be below 16 exbibytes", quoted(.0))]
    TooLarge(String),
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Suffixes, lower-cased, and what they multiply by.
const SUFFIXES: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("k", KIB),
    ("ki", KIB),
    ("kib", KIB),
    ("m", MIB),
    ("mi", MIB),
    ("mib", MIB),
    ("g", GIB),
    ("gi", GIB),
    ("gib", GIB),
    ("t", TIB),
    ("ti", TIB),
    ("tib", TIB),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
];

impl ByteSize {
    pub const fn kib(n: u64) -> ByteSize {
        ByteSize(n * KIB)
    }

    pub const fn mib(n: u64) -> ByteSize {
        ByteSize(n * MIB)
    }

    pub const fn gib(n: u64) -> ByteSize {
        ByteSize(n * GIB)
    }

    /// Parses `"512M"`-style text: ASCII digits, then an optional unit, nothing else (no sign, no
    /// spaces, no fractions).
    pub fn parse(text: &str) -> Result<ByteSize, SizeError> {
        let malformed = || SizeError::Malformed(text.to_owned());
        let digits_end = text
            .bytes()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, suffix) = text.split_at(digits_end);
        if digits.is_empty() {
            return Err(malformed());
        }
        let suffix = suffix.to_ascii_lowercase();
        let multiplier = SUFFIXES
            .iter()
            .find(|(name, _)| *name == suffix)
            .map(|(_, m)| *m)
            .ok_or_else(malformed)?;
        let mut value: u64 = 0;
        for digit in digits.bytes() {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(digit - b'0')))
                .ok_or_else(|| SizeError::TooLarge(text.to_owned()))?;
        }
        value
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| SizeError::TooLarge(text.to_owned()))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n != 0 {
            for (unit, suffix) in [(TIB, "T"), (GIB, "G"), (MIB, "M"), (KIB, "K")] {
                if n.is_multiple_of(unit) {
                    return write!(f, "{}{suffix}", n / unit);
                }
            }
        }
        write!(f, "{n}")
    }
}

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ByteSize::parse(s)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Accepts the text form or a non-negative integer number of bytes.
impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"512M\" or a number of bytes")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("{v} is not a size: sizes cannot be negative")))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_binary_suffixes_are_powers_of_1024() {
        assert_eq!(ByteSize::parse("512M"), Ok(ByteSize(512 * 1024 * 1024)));
        assert_eq!(ByteSize::parse("512MiB"), Ok(ByteSize(512 * 1024 * 1024)));
        assert_eq!(ByteSize::parse("512mi"), Ok(ByteSize(512 * 1024 * 1024)));
        assert_eq!(ByteSize::parse("1G"), Ok(ByteSize(1 << 30)));
        assert_eq!(ByteSize::parse("64k"), Ok(ByteSize(64 * 1024)));
        assert_eq!(ByteSize::parse("2T"), Ok(ByteSize(2 << 40)));
    }

    #[test]
    fn sizes_with_decimal_suffixes_are_powers_of_1000() {
        assert_eq!(ByteSize::parse("10MB"), Ok(ByteSize(10_000_000)));
        assert_eq!(ByteSize::parse("1gb"), Ok(ByteSize(1_000_000_000)));
        assert_eq!(ByteSize::parse("3KB"), Ok(ByteSize(3_000)));
    }

    #[test]
    fn plain_numbers_are_bytes() {
        assert_eq!(ByteSize::parse("1048576"), Ok(ByteSize(1_048_576)));
        assert_eq!(ByteSize::parse("7B"), Ok(ByteSize(7)));
        assert_eq!(ByteSize::parse("0"), Ok(ByteSize(0)));
    }

    #[test]
    fn malformed_sizes_are_rejected_with_the_expected_form() {
        for bad in [
            "", "12X", "M", "-1M", "+1M", "1.5G", " 1M", "1M ", "1 M", "1MM", "0x10", "1e6", "１M",
        ] {
            let err = ByteSize::parse(bad).unwrap_err();
            assert_eq!(err, SizeError::Malformed(bad.to_owned()), "{bad:?}");
        }
        assert_eq!(
            ByteSize::parse("12X").unwrap_err().to_string(),
            "\"12X\" is not a size: expected a number with an optional K/M/G/T suffix"
        );
    }

    #[test]
    fn sizes_that_overflow_64_bits_are_rejected() {
        assert_eq!(
            ByteSize::parse("18446744073709551616"),
            Err(SizeError::TooLarge("18446744073709551616".into()))
        );
        assert_eq!(
            ByteSize::parse("16777216T"),
            Err(SizeError::TooLarge("16777216T".into()))
        );
        assert_eq!(
            ByteSize::parse("18446744073709551615"),
            Ok(ByteSize(u64::MAX))
        );
    }

    #[test]
    fn display_is_the_shortest_exact_binary_form() {
        assert_eq!(ByteSize(512 << 20).to_string(), "512M");
        assert_eq!(ByteSize(1 << 30).to_string(), "1G");
        assert_eq!(ByteSize(1536).to_string(), "1536");
        assert_eq!(ByteSize(1_000_000).to_string(), "1000000");
        assert_eq!(ByteSize(10_000_000).to_string(), "10000000");
        assert_eq!(ByteSize(0).to_string(), "0");
        assert_eq!(ByteSize(1 << 60).to_string(), "1048576T");
        assert_eq!(ByteSize(3 * 1024).to_string(), "3K");
    }
}
