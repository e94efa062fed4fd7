//! `host:port` authorities as clients send them: CONNECT targets, absolute-URI authorities and
//! `Host` headers.
//!
//! Guarantees:
//! - The host is either a normalised [`HostName`] or an address parsed strictly by
//!   `parse_ip_literal` (every legacy IPv4 encoding is decoded, so `2852039166` *is*
//!   169.254.169.254); something that looks like an address but is not a valid one is an error,
//!   never a name to resolve.
//! - User info (`user@host`), IPv6 zone ids, empty hosts, unbracketed IPv6 with a port, ports that
//!   are not 1–65535 in plain decimal, and anything with whitespace or control characters are
//!   errors.
//! - Parsing never panics (proptest).

use std::fmt;
use std::net::IpAddr;

use cordon_policy::host::{HostError, HostName};
use cordon_policy::ip::{parse_ip_literal, IpLiteral};
use thiserror::Error;

/// Longest authority we look at; real ones are under 260 bytes.
const MAX_AUTHORITY_LEN: usize = 1024;

/// A destination host: a name or an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(HostName),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => write!(f, "{n}"),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A parsed `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Authority {
    pub host: Host,
    pub port: u16,
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]:{}", self.port),
            host => write!(f, "{host}:{}", self.port),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthorityError {
    #[error("empty host")]
    Empty,
    #[error("authority longer than {MAX_AUTHORITY_LEN} bytes")]
    TooLong,
    #[error("user info in an authority is not allowed")]
    UserInfo,
    #[error("a port is required")]
    MissingPort,
    #[error("invalid port {0:?}")]
    BadPort(String),
    #[error("IPv6 addresses must be in brackets when a port follows")]
    UnbracketedIpv6,
    #[error("invalid host: {0}")]
    BadHost(#[from] HostError),
    #[error("invalid address literal: {0}")]
    BadAddress(String),
}

/// Parses a host (name or address literal) without a port.
pub fn parse_host(host: &str) -> Result<Host, AuthorityError> {
    if host.is_empty() {
        return Err(AuthorityError::Empty);
    }
    match parse_ip_literal(host) {
        IpLiteral::Ip(ip) => Ok(Host::Ip(ip)),
        IpLiteral::Invalid(e) => Err(AuthorityError::BadAddress(e.to_string())),
        IpLiteral::NotIp => Ok(Host::Name(HostName::parse(host)?)),
    }
}

fn parse_port(s: &str) -> Result<u16, AuthorityError> {
    let bad = || AuthorityError::BadPort(s.chars().take(16).collect());
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(p) => Ok(p),
    }
}

/// Parses `host:port`, `[v6]:port`, or — when `default_port` is given — a bare host.
pub fn parse_authority(s: &str, default_port: Option<u16>) -> Result<Authority, AuthorityError> {
    if s.len() > MAX_AUTHORITY_LEN {
        return Err(AuthorityError::TooLong);
    }
    if s.is_empty() {
        return Err(AuthorityError::Empty);
    }
    if s.contains('@') {
        return Err(AuthorityError::UserInfo);
    }
    let (host, port) = if s.starts_with('[') {
        let end = s.find(']').ok_or_else(|| {
            AuthorityError::BadAddress(format!("unterminated bracket in {:?}", truncate(s)))
        })?;
        let (host, rest) = s.split_at(end + 1);
        match rest {
            "" => (host, None),
            _ => match rest.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => {
                    return Err(AuthorityError::BadAddress(format!(
                        "text after ']' in {:?}",
                        truncate(s)
                    )))
                }
            },
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => return Err(AuthorityError::UnbracketedIpv6),
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match (port, default_port) {
        (Some(p), _) => parse_port(p)?,
        (None, Some(d)) => d,
        (None, None) => return Err(AuthorityError::MissingPort),
    };
    Ok(Authority {
        host: parse_host(host)?,
        port,
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn name(s: &str) -> Host {
        Host::Name(HostName::parse(s).unwrap())
    }

    #[test]
    fn names_and_ports_are_parsed_and_normalised() {
        assert_eq!(
            parse_authority("API.GitHub.com.:443", None),
            Ok(Authority {
                host: name("api.github.com"),
                port: 443
            })
        );
        assert_eq!(
            parse_authority("example.com", Some(80)),
            Ok(Authority {
                host: name("example.com"),
                port: 80
            })
        );
    }

    #[test]
    fn every_ipv4_encoding_becomes_the_address_it_means() {
        let meta = Host::Ip(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)));
        for s in [
            "2852039166:80",
            "0xa9fea9fe:80",
            "0251.0376.0251.0376:80",
            "169.254.43518:80",
        ] {
            assert_eq!(parse_authority(s, None).unwrap().host, meta, "{s}");
        }
        assert_eq!(
            parse_authority("0:80", None).unwrap().host,
            Host::Ip(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        );
        assert_eq!(
            parse_authority("127.1:80", None).unwrap().host,
            Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }

    #[test]
    fn bracketed_ipv6_is_parsed_with_and_without_port() {
        let mapped: Ipv6Addr = "::ffff:169.254.169.254".parse().unwrap();
        assert_eq!(
            parse_authority("[::ffff:a9fe:a9fe]:443", None),
            Ok(Authority {
                host: Host::Ip(IpAddr::V6(mapped)),
                port: 443
            })
        );
        assert_eq!(
            parse_authority("[::1]", Some(80)).unwrap().host,
            Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
    }

    #[test]
    fn malformed_authorities_are_refused() {
        for s in [
            "",
            ":80",
            "user@example.com:80",
            "example.com:",
            "example.com:0",
            "example.com:65536",
            "example.com:+80",
            "example.com:8 0",
            "::1:80",
            "[::1",
            "[::1]x:80",
            "[fe80::1%25eth0]:80",
            "1.2.3.999:80",
            "exa mple.com:80",
            "example.com\0:80",
        ] {
            assert!(parse_authority(s, Some(80)).is_err(), "{s:?} was accepted");
        }
        assert_eq!(
            parse_authority("example.com", None),
            Err(AuthorityError::MissingPort)
        );
    }

    #[test]
    fn display_round_trips() {
        for s in ["example.com:443", "[::1]:80", "10.0.0.1:22"] {
            assert_eq!(parse_authority(s, None).unwrap().to_string(), s);
        }
    }

    proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,80}", d in proptest::option::of(1u16..)) {
            let _ = parse_authority(&s, d);
        }

        #[test]
        fn parsing_bytes_near_the_grammar_never_panics(s in "[\\[\\]:@.%0-9a-fA-Fx]{0,40}") {
            let _ = parse_authority(&s, Some(80));
        }

        #[test]
        fn valid_names_round_trip(labels in proptest::collection::vec("[a-z][a-z0-9]{0,4}(-[a-z0-9]{1,4})?[a-z]", 1..4), port in 1u16..) {
            let host = labels.join(".");
            let a = parse_authority(&format!("{host}:{port}"), None).unwrap();
            prop_assert_eq!(a.port, port);
            prop_assert_eq!(a.to_string(), format!("{host}:{port}"));
        }

        #[test]
        fn anything_with_user_info_is_refused(a in "[a-z]{0,8}", b in "[a-z.:0-9]{0,16}") {
            prop_assert_eq!(parse_authority(&format!("{a}@{b}"), Some(80)), Err(AuthorityError::UserInfo));
        }

        #[test]
        fn every_ipv4_address_round_trips(ip in any::<u32>(), port in 1u16..) {
            let ip = Ipv4Addr::from(ip);
            let a = parse_authority(&format!("{ip}:{port}"), None).unwrap();
            prop_assert_eq!(a.host, Host::Ip(IpAddr::V4(ip)));
            // The bare 32-bit number form means the same address.
            let b = parse_authority(&format!("{}:{port}", u32::from(ip)), None).unwrap();
            prop_assert_eq!(b.host, Host::Ip(IpAddr::V4(ip)));
        }
    }
}
