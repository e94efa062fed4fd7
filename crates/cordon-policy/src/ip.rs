//! IP address literals, in every form a client library or resolver may accept.
//!
//! Guarantees: [`parse_ip_literal`] sorts any host string into exactly one of three answers:
//!
//! - [`IpLiteral::Ip`]: it is an address — dotted quad, IPv6 bare or in brackets, or any legacy
//!   `inet_aton` form: one 32-bit number (`2852039166`), hex (`0xa9fea9fe`), octal parts
//!   (`0251.0376.0251.0376`), short forms (`169.254.43518`, `127.1`), a trailing dot;
//! - [`IpLiteral::Invalid`]: it looks like an address but is not a valid one (`1.2.3.999`,
//!   `08.1.1.1`, `0x`, `1.2.3.4.5`, `fe80::1%eth0`). Such a string must be refused: a resolver or
//!   client might read it as some address we never checked;
//! - [`IpLiteral::NotIp`]: it cannot be an address; it may be a host name (check with
//!   [`crate::host::HostName::parse`]).
//!
//! "Looks like an address" follows the WHATWG URL standard's rule: a string whose last dot-separated
//! part (ignoring one trailing dot) is a number — decimal digits, or `0x` followed by hex digits —
//! is an IPv4 address or nothing; anything containing `:` or starting with `[` is IPv6 or nothing.
//! No real DNS name ends in a numeric label, so no name is lost.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::error::quoted;

/// What a host string is, as far as IP addresses go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpLiteral {
    /// A valid address.
    Ip(IpAddr),
    /// Not an address at all (it may still be a host name).
    NotIp,
    /// Looks like an address but is not a valid one: refuse it, never resolve it.
    Invalid(IpLiteralError),
}

/// Why a string that looks like an address is not a valid one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpLiteralError {
    #[error("{} looks like an IPv4 address but is not a valid one", quoted(.0))]
    BadIpv4(String),
    #[error("{} is not a valid IPv6 address", quoted(.0))]
    BadIpv6(String),
    #[error("{} has an IPv6 zone id (%...), which is not allowed", quoted(.0))]
    ZoneId(String),
}

/// Sorts `host` into an address, not-an-address, or an invalid address; see the module
/// documentation.
pub fn parse_ip_literal(host: &str) -> IpLiteral {
    if let Some(inner) = host.strip_prefix('[') {
        return match inner.strip_suffix(']') {
            Some(inner) if inner.contains(':') => parse_ipv6(host, inner),
            _ => IpLiteral::Invalid(IpLiteralError::BadIpv6(host.to_owned())),
        };
    }
    if host.contains(':') {
        return parse_ipv6(host, host);
    }
    if !ends_in_number(host) {
        return IpLiteral::NotIp;
    }
    match parse_ipv4(host) {
        Some(addr) => IpLiteral::Ip(IpAddr::V4(addr)),
        None => IpLiteral::Invalid(IpLiteralError::BadIpv4(host.to_owned())),
    }
}

/// True if `host` is an address or looks like one: it must never be treated as a host name.
pub fn is_ip_like(host: &str) -> bool {
    !matches!(parse_ip_literal(host), IpLiteral::NotIp)
}

fn parse_ipv6(original: &str, text: &str) -> IpLiteral {
    if text.contains('%') {
        return IpLiteral::Invalid(IpLiteralError::ZoneId(original.to_owned()));
    }
    match text.parse::<Ipv6Addr>() {
        Ok(addr) => IpLiteral::Ip(IpAddr::V6(addr)),
        Err(_) => IpLiteral::Invalid(IpLiteralError::BadIpv6(original.to_owned())),
    }
}

/// The dot-separated parts of a would-be IPv4 address, without one trailing empty part (a
/// trailing dot, which resolvers accept).
fn ipv4_parts(host: &str) -> Vec<&str> {
    let mut parts: Vec<&str> = host.split('.').collect();
    if parts.len() > 1 && parts.last().is_some_and(|p| p.is_empty()) {
        parts.pop();
    }
    parts
}

/// The WHATWG "ends in a number" check: is the last part all digits, or `0x` + hex digits?
fn ends_in_number(host: &str) -> bool {
    let parts = ipv4_parts(host);
    let Some(last) = parts.last() else {
        return false;
    };
    if last.is_empty() {
        return false;
    }
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    match last.strip_prefix("0x").or_else(|| last.strip_prefix("0X")) {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => false,
    }
}

/// `inet_aton`: 1 to 4 parts, each decimal, `0x` hex or `0`-prefixed octal; all parts but the last
/// are one byte, the last fills the remaining bytes.
fn parse_ipv4(host: &str) -> Option<Ipv4Addr> {
    let parts = ipv4_parts(host);
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut numbers = Vec::with_capacity(parts.len());
    for part in &parts {
        numbers.push(parse_ipv4_number(part)?);
    }
    let (last, leading) = numbers.split_last()?;
    let mut addr: u32 = 0;
    for (i, n) in leading.iter().enumerate() {
        let byte = u8::try_from(*n).ok()?;
        addr |= u32::from(byte) << (24 - 8 * i);
    }
    // The last part fills the bytes the leading parts did not: 32, 24, 16 or 8 bits.
    let last_bits = 32 - 8 * leading.len() as u32;
    if last_bits < 32 && *last >> last_bits != 0 {
        return None;
    }
    Some(Ipv4Addr::from(addr | *last))
}

/// One `inet_aton` number, at most 32 bits. Empty parts, empty hex (`0x`) and non-octal digits
/// after a leading 0 are refused; WHATWG reads `0x` as 0, refusing it is the safe side.
fn parse_ipv4_number(part: &str) -> Option<u32> {
    let (digits, radix) =
        if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (part, 10)
        };
    if digits.is_empty() {
        return None;
    }
    let mut value: u32 = 0;
    for c in digits.chars() {
        let digit = c.to_digit(radix)?;
        value = value.checked_mul(radix)?.checked_add(digit)?;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpLiteral {
        IpLiteral::Ip(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
    }

    #[test]
    fn dotted_quads_parse() {
        assert_eq!(parse_ip_literal("169.254.169.254"), v4(169, 254, 169, 254));
        assert_eq!(parse_ip_literal("0.0.0.0"), v4(0, 0, 0, 0));
        assert_eq!(parse_ip_literal("255.255.255.255"), v4(255, 255, 255, 255));
        assert_eq!(parse_ip_literal("127.0.0.1."), v4(127, 0, 0, 1));
    }

    #[test]
    fn every_legacy_inet_aton_form_of_the_metadata_address_parses() {
        let metadata = v4(169, 254, 169, 254);
        for form in [
            "2852039166",
            "0xa9fea9fe",
            "0XA9FEA9FE",
            "0251.0376.0251.0376",
            "0xa9.0xfe.0xa9.0xfe",
            "169.254.43518",
            "169.16689662",
            "0251.0xfe.43518",
            "025177524776",
            "00000251.254.169.254",
            "0xa9fea9fe.",
        ] {
            assert_eq!(parse_ip_literal(form), metadata, "{form}");
        }
    }

    #[test]
    fn short_forms_fill_the_last_part() {
        assert_eq!(parse_ip_literal("127.1"), v4(127, 0, 0, 1));
        assert_eq!(parse_ip_literal("0"), v4(0, 0, 0, 0));
        assert_eq!(parse_ip_literal("10.1.2"), v4(10, 1, 0, 2));
        assert_eq!(parse_ip_literal("4294967295"), v4(255, 255, 255, 255));
    }

    #[test]
    fn numeric_looking_strings_that_are_not_addresses_are_invalid() {
        for bad in [
            "1.2.3.999",
            "1.2.3.4.5",
            "256.1.1.1",
            "4294967296",
            "08.1.1.1",
            "1.2.3.09",
            "0x",
            "1.0x",
            "0x1.0xg.1",
            "1..2",
            " 127.0.0.1",
            "1.2.65536",
            "1.16777216",
            "99999999999999999999999",
            "１２７.0.0.1",
        ] {
            assert!(
                matches!(
                    parse_ip_literal(bad),
                    IpLiteral::Invalid(IpLiteralError::BadIpv4(_))
                ),
                "{bad:?}: {:?}",
                parse_ip_literal(bad)
            );
        }
    }

    #[test]
    fn names_are_not_ip_literals() {
        for name in [
            "example.com",
            "127.0.0.1.nip.io",
            "0x7f.com",
            "1.2.3.4x",
            "0xzz",
            "a",
            "",
            ".",
            "1.2.3.4..",
            // glibc's inet_aton, WHATWG and std all refuse a signed part: this is (at most) a name.
            "127.0.0.-1",
        ] {
            assert_eq!(parse_ip_literal(name), IpLiteral::NotIp, "{name:?}");
        }
    }

    #[test]
    fn ipv6_literals_parse_bare_and_in_brackets() {
        let loopback = IpLiteral::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(parse_ip_literal("::1"), loopback);
        assert_eq!(parse_ip_literal("[::1]"), loopback);
        assert_eq!(
            parse_ip_literal("::ffff:169.254.169.254"),
            IpLiteral::Ip(IpAddr::V6(
                Ipv4Addr::new(169, 254, 169, 254).to_ipv6_mapped()
            ))
        );
        assert_eq!(
            parse_ip_literal("[FD00:EC2::254]"),
            IpLiteral::Ip(IpAddr::V6(Ipv6Addr::new(
                0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254
            )))
        );
    }

    #[test]
    fn ipv6_zone_ids_and_malformed_brackets_are_invalid() {
        assert_eq!(
            parse_ip_literal("fe80::1%eth0"),
            IpLiteral::Invalid(IpLiteralError::ZoneId("fe80::1%eth0".into()))
        );
        assert_eq!(
            parse_ip_literal("[fe80::1%25eth0]"),
            IpLiteral::Invalid(IpLiteralError::ZoneId("[fe80::1%25eth0]".into()))
        );
        for bad in [
            "[::1",
            "[::1]:80",
            "[1.2.3.4]",
            "[]",
            "[example.com]",
            "::ffff:0x7f.1",
            "1:2:3:4:5:6:7:8:9",
            "example.com:443",
            ":::",
        ] {
            assert!(
                matches!(parse_ip_literal(bad), IpLiteral::Invalid(_)),
                "{bad:?}: {:?}",
                parse_ip_literal(bad)
            );
        }
    }

    #[test]
    fn is_ip_like_covers_valid_and_invalid_literals() {
        assert!(is_ip_like("127.1"));
        assert!(is_ip_like("1.2.3.999"));
        assert!(is_ip_like("::1"));
        assert!(!is_ip_like("example.com"));
    }
}
