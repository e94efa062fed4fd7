//! Allowlist entries: which destinations (host or address, and port) a sandbox may reach.
//!
//! Guarantees: an entry is one of
//!
//! | text | matches |
//! |---|---|
//! | `api.github.com` | that name, port 443 |
//! | `api.github.com:8443`, `api.github.com:*` | that name, that port / any port |
//! | `*.githubusercontent.com[:port\|:*]` | strict subdomains only, never the apex |
//! | `203.0.113.7[:port\|:*]` | that IPv4 address (written as a plain dotted quad) |
//! | `[2001:db8::1]:443`, `2001:db8::1` | that IPv6 address (bare form means port 443) |
//! | `198.51.100.0/24[:port\|:*]`, `[2001:db8::/32]:443` | addresses in that CIDR (host bits zero) |
//!
//! Names are normalised with [`HostName`], so `API.GitHub.com.` and `api.github.com` are one entry.
//! A name entry only ever matches a name and an address entry only an address. Wildcards are only
//! a leading `*.` and must leave at least two labels (`*.com` is refused). Ports are 1..=65535.
//! The entry's text, exactly as written, is its rule id in decisions and audit records.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::decide::Target;
use crate::error::quoted;
use crate::host::{HostError, HostName};
use crate::ip::{parse_ip_literal, IpLiteral};

/// The port used when an entry names none.
pub const DEFAULT_PORT: u16 = 443;

/// One allowlist entry; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AllowEntry {
    raw: String,
    host: AllowHost,
    port: PortSpec,
}

/// What hosts an entry matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AllowHost {
    /// Exactly this name.
    Name(HostName),
    /// Strict subdomains of this name (`*.example.com`).
    Subdomains(HostName),
    /// Exactly this address.
    Ip(IpAddr),
    /// Any address in this network.
    Cidr(IpNet),
}

/// What ports an entry matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortSpec {
    Any,
    One(u16),
}

impl PortSpec {
    pub fn allows(self, port: u16) -> bool {
        match self {
            PortSpec::Any => true,
            PortSpec::One(p) => p == port,
        }
    }
}

/// Why a string is not an allowlist entry. Every message starts with the quoted entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowError {
    #[error("an allow entry cannot be empty")]
    Empty,
    #[error("{}: whitespace and control characters are not allowed", quoted(.0))]
    Whitespace(String),
    #[error("{}: {} is not a port: expected 1-65535 or *", quoted(.entry), quoted(.port))]
    BadPort { entry: String, port: String },
    #[error("{}: {source}", quoted(.entry))]
    Host { entry: String, source: HostError },
    #[error(
        "{}: a wildcard is only allowed as a leading \"*.\", like \"*.example.com\"",
        quoted(.0)
    )]
    Wildcard(String),
    #[error(
        "{}: a wildcard must leave at least two labels (\"*.example.com\", not \"*.com\")",
        quoted(.0)
    )]
    WildcardTooBroad(String),
    #[error("{}: {reason}", quoted(.entry))]
    BadAddress { entry: String, reason: String },
    #[error("{}: write an IPv4 address as four decimal numbers, like {canonical}", quoted(.entry))]
    NonCanonicalIpv4 { entry: String, canonical: String },
    #[error("{}: {reason}", quoted(.entry))]
    BadCidr { entry: String, reason: String },
    #[error("{}: the CIDR has host bits set; did you mean {suggestion}?", quoted(.entry))]
    CidrHostBits { entry: String, suggestion: String },
}

impl AllowEntry {
    /// Parses one entry; see the module documentation.
    pub fn parse(raw: &str) -> Result<AllowEntry, AllowError> {
        if raw.is_empty() {
            return Err(AllowError::Empty);
        }
        if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(AllowError::Whitespace(raw.to_owned()));
        }
        let (host_text, port_text, bracketed) = split_host_port(raw)?;
        let port = match port_text {
            None => PortSpec::One(DEFAULT_PORT),
            Some("*") => PortSpec::Any,
            Some(p) => PortSpec::One(parse_port(p).ok_or_else(|| AllowError::BadPort {
                entry: raw.to_owned(),
                port: p.to_owned(),
            })?),
        };
        let host = if bracketed || host_text.contains(':') {
            parse_ipv6_host(raw, host_text)?
        } else if host_text.contains('/') {
            parse_cidr(raw, host_text)?
        } else if let Some(suffix) = host_text.strip_prefix("*.") {
            if suffix.contains('*') {
                return Err(AllowError::Wildcard(raw.to_owned()));
            }
            let suffix = HostName::parse(suffix).map_err(|source| AllowError::Host {
                entry: raw.to_owned(),
                source,
            })?;
            if suffix.labels().count() < 2 {
                return Err(AllowError::WildcardTooBroad(raw.to_owned()));
            }
            AllowHost::Subdomains(suffix)
        } else if host_text.contains('*') {
            return Err(AllowError::Wildcard(raw.to_owned()));
        } else {
            match parse_ip_literal(host_text) {
                IpLiteral::Ip(IpAddr::V4(addr)) => {
                    let canonical = addr.to_string();
                    if canonical != host_text {
                        return Err(AllowError::NonCanonicalIpv4 {
                            entry: raw.to_owned(),
                            canonical,
                        });
                    }
                    AllowHost::Ip(IpAddr::V4(addr))
                }
                IpLiteral::Ip(addr @ IpAddr::V6(_)) => AllowHost::Ip(addr),
                IpLiteral::Invalid(reason) => {
                    return Err(AllowError::BadAddress {
                        entry: raw.to_owned(),
                        reason: reason.to_string(),
                    })
                }
                IpLiteral::NotIp => {
                    AllowHost::Name(HostName::parse(host_text).map_err(|source| {
                        AllowError::Host {
                            entry: raw.to_owned(),
                            source,
                        }
                    })?)
                }
            }
        };
        Ok(AllowEntry {
            raw: raw.to_owned(),
            host,
            port,
        })
    }

    /// The entry exactly as written: its rule id.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    pub fn host(&self) -> &AllowHost {
        &self.host
    }

    pub fn port(&self) -> PortSpec {
        self.port
    }

    /// True if this entry allows `target` on `port`.
    pub fn matches(&self, target: Target<'_>, port: u16) -> bool {
        self.matches_host(target) && self.port.allows(port)
    }

    /// True if this entry names `target`, whatever the port.
    pub fn matches_host(&self, target: Target<'_>) -> bool {
        match (&self.host, target) {
            (AllowHost::Name(name), Target::Name(target)) => name == target,
            (AllowHost::Subdomains(parent), Target::Name(target)) => target.is_subdomain_of(parent),
            (AllowHost::Ip(addr), Target::Addr(target)) => *addr == target,
            (AllowHost::Cidr(net), Target::Addr(target)) => net.contains(&target),
            _ => false,
        }
    }
}

/// Splits `host[:port]`, `[v6][:port]` or a bare IPv6 address (two or more colons, no port).
/// Returns (host, port, was-bracketed).
fn split_host_port(raw: &str) -> Result<(&str, Option<&str>, bool), AllowError> {
    if let Some(rest) = raw.strip_prefix('[') {
        let bad = || AllowError::BadAddress {
            entry: raw.to_owned(),
            reason: "expected [IPv6 address] or [IPv6 address]:port".to_owned(),
        };
        let (inner, after) = rest.split_once(']').ok_or_else(bad)?;
        return match after {
            "" => Ok((inner, None, true)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((inner, Some(port), true)),
                None => Err(bad()),
            },
        };
    }
    match raw.matches(':').count() {
        0 => Ok((raw, None, false)),
        1 => {
            let (host, port) = raw.split_once(':').unwrap_or((raw, ""));
            Ok((host, Some(port), false))
        }
        _ => Ok((raw, None, false)),
    }
}

fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Long runs of leading zeros are still a number; u16 parsing handles overflow.
    let trimmed = text.trim_start_matches('0');
    let port: u16 = if trimmed.is_empty() {
        0
    } else if trimmed.len() > 5 {
        return None;
    } else {
        trimmed.parse().ok()?
    };
    (port != 0).then_some(port)
}

fn parse_ipv6_host(raw: &str, text: &str) -> Result<AllowHost, AllowError> {
    if text.contains('%') {
        return Err(AllowError::BadAddress {
            entry: raw.to_owned(),
            reason: "IPv6 zone ids (%...) are not allowed".to_owned(),
        });
    }
    if text.contains('/') {
        return parse_cidr(raw, text);
    }
    match text.parse::<Ipv6Addr>() {
        Ok(addr) => Ok(AllowHost::Ip(IpAddr::V6(addr))),
        Err(_) => Err(AllowError::BadAddress {
            entry: raw.to_owned(),
            reason: format!("{} is not an IPv6 address", quoted(text)),
        }),
    }
}

fn parse_cidr(raw: &str, text: &str) -> Result<AllowHost, AllowError> {
    let bad = |reason: String| AllowError::BadCidr {
        entry: raw.to_owned(),
        reason,
    };
    let (addr_text, prefix_text) = text
        .split_once('/')
        .ok_or_else(|| bad("expected address/prefix".to_owned()))?;
    let prefix: u8 = if !prefix_text.is_empty()
        && prefix_text.len() <= 3
        && prefix_text.bytes().all(|b| b.is_ascii_digit())
    {
        prefix_text
            .parse()
            .map_err(|_| bad(format!("{} is not a prefix length", quoted(prefix_text))))?
    } else {
        return Err(bad(format!(
            "{} is not a prefix length",
            quoted(prefix_text)
        )));
    };
    let net = if addr_text.contains(':') {
        let addr: Ipv6Addr = addr_text
            .parse()
            .map_err(|_| bad(format!("{} is not an IPv6 address", quoted(addr_text))))?;
        IpNet::V6(
            Ipv6Net::new(addr, prefix)
                .map_err(|_| bad(format!("/{prefix} is longer than 128 bits")))?,
        )
    } else {
        let addr: Ipv4Addr = addr_text.parse().map_err(|_| {
            bad(format!(
                "{} is not an IPv4 address (write four decimal numbers, like 198.51.100.0)",
                quoted(addr_text)
            ))
        })?;
        IpNet::V4(
            Ipv4Net::new(addr, prefix)
                .map_err(|_| bad(format!("/{prefix} is longer than 32 bits")))?,
        )
    };
    if net.trunc() != net {
        return Err(AllowError::CidrHostBits {
            entry: raw.to_owned(),
            suggestion: net.trunc().to_string(),
        });
    }
    Ok(AllowHost::Cidr(net))
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl FromStr for AllowEntry {
    type Err = AllowError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AllowEntry::parse(s)
    }
}

impl Serialize for AllowEntry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.raw)
    }
}

impl<'de> Deserialize<'de> for AllowEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        AllowEntry::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(raw: &str) -> AllowEntry {
        AllowEntry::parse(raw).unwrap()
    }

    fn name(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    fn expect(raw: &str, host: AllowHost, port: PortSpec) {
        assert_eq!(
            AllowEntry::parse(raw),
            Ok(AllowEntry {
                raw: raw.to_owned(),
                host,
                port
            }),
            "{raw}"
        );
    }

    #[test]
    fn a_bare_name_means_port_443() {
        expect(
            "api.github.com",
            AllowHost::Name(name("api.github.com")),
            PortSpec::One(443),
        );
    }

    #[test]
    fn names_take_a_port_or_any_port() {
        expect(
            "api.github.com:443",
            AllowHost::Name(name("api.github.com")),
            PortSpec::One(443),
        );
        expect(
            "example.org:*",
            AllowHost::Name(name("example.org")),
            PortSpec::Any,
        );
        expect(
            "API.Example.ORG.:8443",
            AllowHost::Name(name("api.example.org")),
            PortSpec::One(8443),
        );
    }

    #[test]
    fn wildcards_name_subdomains() {
        expect(
            "*.githubusercontent.com:443",
            AllowHost::Subdomains(name("githubusercontent.com")),
            PortSpec::One(443),
        );
        expect(
            "*.example.com",
            AllowHost::Subdomains(name("example.com")),
            PortSpec::One(443),
        );
        expect(
            "*.example.com:*",
            AllowHost::Subdomains(name("example.com")),
            PortSpec::Any,
        );
    }

    #[test]
    fn addresses_and_cidrs_parse() {
        expect(
            "203.0.113.7:8080",
            AllowHost::Ip("203.0.113.7".parse().unwrap()),
            PortSpec::One(8080),
        );
        expect(
            "203.0.113.7",
            AllowHost::Ip("203.0.113.7".parse().unwrap()),
            PortSpec::One(443),
        );
        expect(
            "198.51.100.0/24:443",
            AllowHost::Cidr("198.51.100.0/24".parse().unwrap()),
            PortSpec::One(443),
        );
        expect(
            "0.0.0.0/0:*",
            AllowHost::Cidr("0.0.0.0/0".parse().unwrap()),
            PortSpec::Any,
        );
        expect(
            "[2001:db8::1]:443",
            AllowHost::Ip("2001:db8::1".parse().unwrap()),
            PortSpec::One(443),
        );
        expect(
            "[2001:db8::1]",
            AllowHost::Ip("2001:db8::1".parse().unwrap()),
            PortSpec::One(443),
        );
        expect(
            "2001:db8::1",
            AllowHost::Ip("2001:db8::1".parse().unwrap()),
            PortSpec::One(443),
        );
        expect(
            "[2001:db8::/32]:*",
            AllowHost::Cidr("2001:db8::/32".parse().unwrap()),
            PortSpec::Any,
        );
        expect(
            "2001:db8::/32",
            AllowHost::Cidr("2001:db8::/32".parse().unwrap()),
            PortSpec::One(443),
        );
    }

    #[test]
    fn bad_ports_are_refused() {
        for (raw, port) in [
            ("a.com:0", "0"),
            ("a.com:65536", "65536"),
            ("a.com:", ""),
            ("a.com:-1", "-1"),
            ("a.com:+443", "+443"),
            ("a.com:http", "http"),
            ("[::1]:99999999", "99999999"),
            ("a.com:00000", "00000"),
        ] {
            assert_eq!(
                AllowEntry::parse(raw),
                Err(AllowError::BadPort {
                    entry: raw.into(),
                    port: port.into()
                }),
                "{raw}"
            );
        }
        assert_eq!(entry("a.com:0443").port(), PortSpec::One(443));
    }

    #[test]
    fn misplaced_or_too_broad_wildcards_are_refused() {
        for raw in ["*", "*:443", "api.*.com", "*foo.com", "*.*.com", "foo*.com"] {
            assert_eq!(
                AllowEntry::parse(raw),
                Err(AllowError::Wildcard(raw.into())),
                "{raw}"
            );
        }
        assert_eq!(
            AllowEntry::parse("*.com"),
            Err(AllowError::WildcardTooBroad("*.com".into()))
        );
    }

    #[test]
    fn odd_address_forms_are_refused_in_favour_of_dotted_quads() {
        assert_eq!(
            AllowEntry::parse("2852039166:80"),
            Err(AllowError::NonCanonicalIpv4 {
                entry: "2852039166:80".into(),
                canonical: "169.254.169.254".into()
            })
        );
        assert!(matches!(
            AllowEntry::parse("127.1"),
            Err(AllowError::NonCanonicalIpv4 { .. })
        ));
        assert!(matches!(
            AllowEntry::parse("1.2.3.999"),
            Err(AllowError::BadAddress { .. })
        ));
        assert!(matches!(
            AllowEntry::parse("[fe80::1%eth0]:443"),
            Err(AllowError::BadAddress { .. })
        ));
        assert!(matches!(
            AllowEntry::parse("[::1"),
            Err(AllowError::BadAddress { .. })
        ));
        assert!(matches!(
            AllowEntry::parse("[::1]x"),
            Err(AllowError::BadAddress { .. })
        ));
        assert!(matches!(
            AllowEntry::parse("[example.com]:443"),
            Err(AllowError::BadAddress { .. })
        ));
    }

    #[test]
    fn bad_cidrs_are_refused() {
        assert_eq!(
            AllowEntry::parse("198.51.100.7/24"),
            Err(AllowError::CidrHostBits {
                entry: "198.51.100.7/24".into(),
                suggestion: "198.51.100.0/24".into()
            })
        );
        for raw in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/x",
            "10.0.0.0/-1",
            "10.0.0.0/0008",
            "010.0.0.0/8",
            "10/8",
            "[::/129]:443",
            "example.com/24",
        ] {
            assert!(
                matches!(AllowEntry::parse(raw), Err(AllowError::BadCidr { .. })),
                "{raw}: {:?}",
                AllowEntry::parse(raw)
            );
        }
    }

    #[test]
    fn bad_names_and_whitespace_are_refused() {
        assert_eq!(AllowEntry::parse(""), Err(AllowError::Empty));
        assert_eq!(
            AllowEntry::parse(" a.com"),
            Err(AllowError::Whitespace(" a.com".into()))
        );
        assert!(matches!(
            AllowEntry::parse("user@a.com"),
            Err(AllowError::Host { .. })
        ));
        assert!(matches!(
            AllowEntry::parse("a..com"),
            Err(AllowError::Host { .. })
        ));
        assert_eq!(
            AllowEntry::parse("a_b!.com").unwrap_err().to_string(),
            "\"a_b!.com\": \"a_b!.com\" is not a host name: '!' is not allowed (letters, digits, '-' and '_' only)"
        );
    }

    #[test]
    fn names_match_only_names_and_addresses_only_addresses() {
        let github = name("api.github.com");
        let e = entry("api.github.com");
        assert!(e.matches(Target::Name(&github), 443));
        assert!(!e.matches(Target::Name(&github), 80));
        assert!(!e.matches(Target::Name(&name("github.com")), 443));
        assert!(!e.matches(Target::Addr("140.82.112.3".parse().unwrap()), 443));

        let e = entry("*.githubusercontent.com:*");
        assert!(e.matches(Target::Name(&name("raw.githubusercontent.com")), 1));
        assert!(!e.matches(Target::Name(&name("githubusercontent.com")), 443));
        assert!(!e.matches(Target::Name(&name("evilgithubusercontent.com")), 443));

        let e = entry("198.51.100.0/24:443");
        assert!(e.matches(Target::Addr("198.51.100.200".parse().unwrap()), 443));
        assert!(!e.matches(Target::Addr("198.51.101.1".parse().unwrap()), 443));
        assert!(e.matches_host(Target::Addr("198.51.100.1".parse().unwrap())));

        let e = entry("[2001:db8::1]:443");
        assert!(e.matches(Target::Addr("2001:db8::1".parse().unwrap()), 443));
        assert!(!e.matches(Target::Addr("2001:db8::2".parse().unwrap()), 443));
    }
}
