//! Host names, normalised once so that comparing two names is comparing two strings.
//!
//! Guarantees: a [`HostName`] is lower-case ASCII; internationalised names are in punycode (UTS #46
//! processing through the `idna` crate, the way browsers do it, so `ＥＸＡＭＰＬＥ．com`,
//! `Example.COM.` and `example.com` are one name); it has no trailing dot; every label is 1..=63
//! characters of `a-z`, `0-9`, `-` or `_`; the whole is at most 253 characters; and it is never
//! an IP address or something that looks like one (`127.1`, `1.2.3.999`, `１２７.0.0.1`): those
//! are refused here and must be handled by [`crate::ip::parse_ip_literal`]. A name never holds a
//! port, user info, path, wildcard or zone: the caller splits ports off first.

use std::fmt;
use std::str::FromStr;

use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::quoted;
use crate::ip;

/// The longest name, without a trailing dot (RFC 1035: 255 octets on the wire).
pub const MAX_NAME_LEN: usize = 253;
/// The longest label.
pub const MAX_LABEL_LEN: usize = 63;
/// Input longer than this is refused before any Unicode processing, to bound the work.
const MAX_INPUT_LEN: usize = 1024;

/// A normalised DNS host name; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostName(String);

/// Why a string is not a host name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the host name is empty")]
    Empty,
    #[error("{} is not a host name: it contains {ch:?}", quoted(.input))]
    ForbiddenChar { input: String, ch: char },
    #[error("{} is not a valid internationalised host name", quoted(.0))]
    Idna(String),
    #[error(
        "{} is not a host name: {ch:?} is not allowed (letters, digits, '-' and '_' only)",
        quoted(.input)
    )]
    InvalidChar { input: String, ch: char },
    #[error("{} is not a host name: it has an empty label", quoted(.0))]
    EmptyLabel(String),
    #[error("{} is not a host name: a label is longer than 63 characters", quoted(.0))]
    LabelTooLong(String),
    #[error("{} is not a host name: it is longer than 253 characters", quoted(.0))]
    TooLong(String),
    #[error("{} is an IP address (or looks like one), not a host name", quoted(.0))]
    IpLiteral(String),
}

/// Characters refused before any processing: they separate URL parts or hide text, and UTS #46
/// must never get a chance to map them into something else.
fn is_forbidden(ch: char) -> bool {
    ch.is_control() || ch.is_whitespace() || matches!(ch, '[' | ']' | '@' | '%' | '\\' | '/' | ':')
}

impl HostName {
    /// Normalises and checks `input`; see the module documentation.
    pub fn parse(input: &str) -> Result<HostName, HostError> {
        if input.is_empty() {
            return Err(HostError::Empty);
        }
        if input.len() > MAX_INPUT_LEN {
            return Err(HostError::TooLong(input.to_owned()));
        }
        if let Some(ch) = input.chars().find(|c| is_forbidden(*c)) {
            return Err(HostError::ForbiddenChar {
                input: input.to_owned(),
                ch,
            });
        }
        let ascii = Uts46::new()
            .to_ascii(
                input.as_bytes(),
                AsciiDenyList::URL,
                Hyphens::Allow,
                DnsLength::Ignore,
            )
            .map_err(|_| HostError::Idna(input.to_owned()))?;
        let name = ascii.strip_suffix('.').unwrap_or(&ascii);
        if name.is_empty() {
            return Err(HostError::EmptyLabel(input.to_owned()));
        }
        if let Some(ch) = name.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
        }) {
            return Err(HostError::InvalidChar {
                input: input.to_owned(),
                ch,
            });
        }
        if name.len() > MAX_NAME_LEN {
            return Err(HostError::TooLong(input.to_owned()));
        }
        for label in name.split('.') {
            if label.is_empty() {
                return Err(HostError::EmptyLabel(input.to_owned()));
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(HostError::LabelTooLong(input.to_owned()));
            }
        }
        if ip::is_ip_like(name) {
            return Err(HostError::IpLiteral(input.to_owned()));
        }
        Ok(HostName(name.to_owned()))
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The labels, left to right.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }

    /// True if `self` is a strict subdomain of `parent` (`a.example.com` of `example.com`; a name
    /// is not a subdomain of itself, and `badexample.com` is not one of `example.com`).
    pub fn is_subdomain_of(&self, parent: &HostName) -> bool {
        let (name, parent) = (self.0.as_bytes(), parent.0.as_bytes());
        name.len() > parent.len() + 1
            && name.ends_with(parent)
            && name[name.len() - parent.len() - 1] == b'.'
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for HostName {
    type Err = HostError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostName::parse(s)
    }
}

impl AsRef<str> for HostName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for HostName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for HostName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        HostName::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn name(s: &str) -> String {
        HostName::parse(s).unwrap().as_str().to_owned()
    }

    #[test]
    fn names_are_lower_cased_and_lose_the_trailing_dot() {
        assert_eq!(name("API.GitHub.com"), "api.github.com");
        assert_eq!(name("example.com."), "example.com");
        assert_eq!(name("localhost"), "localhost");
        assert_eq!(name("_dmarc.example.com"), "_dmarc.example.com");
        assert_eq!(name("a-b--c.example"), "a-b--c.example");
    }

    #[test]
    fn internationalised_names_become_punycode() {
        assert_eq!(name("bücher.example"), "xn--bcher-kva.example");
        assert_eq!(name("xn--bcher-kva.example"), "xn--bcher-kva.example");
        assert_eq!(name("ＥＸＡＭＰＬＥ．com"), "example.com");
        assert_eq!(name("example。com"), "example.com");
        assert_eq!(name("ａｐｉ.github.com"), "api.github.com");
        // UTS #46 deletes the soft hyphen: the name is the plain one.
        assert_eq!(name("exa\u{ad}mple.com"), "example.com");
    }

    #[test]
    fn separators_and_control_characters_are_refused() {
        for (input, ch) in [
            ("a b.com", ' '),
            ("a\0b.com", '\0'),
            ("a\tb.com", '\t'),
            ("user@evil.com", '@'),
            ("evil.com%2f", '%'),
            ("evil.com\\x", '\\'),
            ("evil.com/x", '/'),
            ("evil.com:443", ':'),
            ("[::1]", '['),
            ("a\u{85}b", '\u{85}'),
            ("a\u{3000}b", '\u{3000}'),
        ] {
            assert_eq!(
                HostName::parse(input),
                Err(HostError::ForbiddenChar {
                    input: input.into(),
                    ch
                }),
                "{input:?}"
            );
        }
    }

    #[test]
    fn characters_outside_ldh_and_underscore_are_refused() {
        assert_eq!(
            HostName::parse("*.example.com"),
            Err(HostError::InvalidChar {
                input: "*.example.com".into(),
                ch: '*'
            })
        );
        assert!(matches!(
            HostName::parse("a!b.com"),
            Err(HostError::InvalidChar { ch: '!', .. })
        ));
        // Full-width solidus maps to '/', which the URL deny list refuses inside idna.
        assert!(HostName::parse("evil.com\u{ff0f}x").is_err());
    }

    #[test]
    fn empty_labels_and_lengths_are_checked() {
        assert_eq!(HostName::parse(""), Err(HostError::Empty));
        assert_eq!(HostName::parse("."), Err(HostError::EmptyLabel(".".into())));
        assert_eq!(
            HostName::parse("a..b"),
            Err(HostError::EmptyLabel("a..b".into()))
        );
        assert_eq!(
            HostName::parse("example.com.."),
            Err(HostError::EmptyLabel("example.com..".into()))
        );
        assert_eq!(
            HostName::parse(".example.com"),
            Err(HostError::EmptyLabel(".example.com".into()))
        );
        let label63 = "a".repeat(63);
        assert!(HostName::parse(&format!("{label63}.com")).is_ok());
        let label64 = format!("{}.com", "a".repeat(64));
        assert_eq!(
            HostName::parse(&label64),
            Err(HostError::LabelTooLong(label64.clone()))
        );
        let long = vec!["a".repeat(50); 5].join(".") + ".com"; // 259 characters
        assert_eq!(
            HostName::parse(&long),
            Err(HostError::TooLong(long.clone()))
        );
        let ok = vec!["a".repeat(62); 4].join("."); // 251 characters
        assert!(HostName::parse(&ok).is_ok());
    }

    #[test]
    fn ip_addresses_and_look_alikes_are_not_names() {
        for input in [
            "127.0.0.1",
            "127.1",
            "2852039166",
            "0x7f.1",
            "1.2.3.999",
            "１２７.0.0.1",
            "127。0。0。1",
            "a.123",
        ] {
            assert_eq!(
                HostName::parse(input),
                Err(HostError::IpLiteral(input.into())),
                "{input:?}"
            );
        }
    }

    #[test]
    fn subdomains_are_strict_and_label_aligned() {
        let parent = HostName::parse("example.com").unwrap();
        assert!(HostName::parse("a.example.com")
            .unwrap()
            .is_subdomain_of(&parent));
        assert!(HostName::parse("a.b.example.com")
            .unwrap()
            .is_subdomain_of(&parent));
        assert!(!parent.is_subdomain_of(&parent));
        assert!(!HostName::parse("badexample.com")
            .unwrap()
            .is_subdomain_of(&parent));
        assert!(!HostName::parse("example.com.evil")
            .unwrap()
            .is_subdomain_of(&parent));
    }
}
