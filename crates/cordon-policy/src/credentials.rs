//! `[[credentials]]`: secrets the supervisor holds and the gateway injects, and
//! `network.intercept`: the hosts whose TLS the gateway terminates.
//!
//! Guarantees: a credential names where its secret comes from (exactly one of `from_env`,
//! `from_file`, `from_command`), where it goes (exactly one of `header`, `query`, `basic_auth`,
//! `any_header`), which exact hosts it is bound to (each allowed by `network.allow`), and the
//! sandbox variable that holds its placeholder. The policy holds no secret value: only where to
//! read one.

use std::fmt;
use std::path::PathBuf;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::error::quoted;
use crate::host::HostName;

/// Where a credential's secret is put in a request to one of its hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injection {
    /// The value of this request header becomes `format` with the secret.
    Header(String),
    /// The value of this query parameter becomes `format` with the secret (percent-encoded).
    Query(String),
    /// `Authorization: Basic`: the placeholder in the user or password is replaced.
    BasicAuth,
    /// The placeholder is replaced wherever it appears in any header value.
    AnyHeader,
}

impl fmt::Display for Injection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Injection::Header(h) => write!(f, "header {h}"),
            Injection::Query(q) => write!(f, "query parameter {q}"),
            Injection::BasicAuth => f.write_str("basic auth"),
            Injection::AnyHeader => f.write_str("any header"),
        }
    }
}

/// Where the supervisor reads a credential's secret (at session start, never in the sandbox).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable of cordon's own process.
    Env(String),
    /// A file (its content, one trailing newline removed).
    File(PathBuf),
    /// A command run by the supervisor (argv, no shell); its standard output, one trailing
    /// newline removed.
    Command(Vec<String>),
}

/// One `[[credentials]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub name: String,
    pub hosts: Vec<HostName>,
    pub inject: Injection,
    /// How the secret is written where it goes: contains `{secret}` exactly once.
    pub format: String,
    pub source: SecretSource,
    /// The sandbox environment variable that holds the placeholder.
    pub env: String,
    /// A request to a bound host that does not carry the placeholder is refused.
    pub require: bool,
}

impl Credential {
    /// True if `host` is one of this credential's hosts.
    pub fn bound_to(&self, host: &HostName) -> bool {
        self.hosts.iter().any(|h| h == host)
    }
}

/// Written back as the TOML it was read from.
impl Serialize for Credential {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("name", &self.name)?;
        let hosts: Vec<&str> = self.hosts.iter().map(HostName::as_str).collect();
        m.serialize_entry("hosts", &hosts)?;
        match &self.inject {
            Injection::Header(h) => m.serialize_entry("header", h)?,
            Injection::Query(q) => m.serialize_entry("query", q)?,
            Injection::BasicAuth => m.serialize_entry("basic_auth", &true)?,
            Injection::AnyHeader => m.serialize_entry("any_header", &true)?,
        }
        m.serialize_entry("format", &self.format)?;
        match &self.source {
            SecretSource::Env(v) => m.serialize_entry("from_env", v)?,
            SecretSource::File(p) => m.serialize_entry("from_file", &p.to_string_lossy())?,
            SecretSource::Command(argv) => m.serialize_entry("from_command", argv)?,
        }
        m.serialize_entry("env", &self.env)?;
        m.serialize_entry("require", &self.require)?;
        m.end()
    }
}

/// The placeholder in a format.
pub const SECRET_MARK: &str = "{secret}";

/// Headers a credential may not be injected into: they frame the message, route it, or belong to
/// the proxy hop.
const RESERVED_HEADERS: [&str; 12] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "proxy-connection",
    "proxy-authorization",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "cookie2",
];

pub(crate) fn name(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(format!(
            "{} is not a credential name: 1 to 64 letters, digits, '-' or '_'",
            quoted(text)
        ));
    }
    Ok(text.to_owned())
}

pub(crate) fn header(text: &str) -> Result<String, String> {
    let token = !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(format!("{} is not an HTTP header name", quoted(text)));
    }
    if RESERVED_HEADERS
        .iter()
        .any(|r| r.eq_ignore_ascii_case(text))
    {
        return Err(format!(
            "{} frames or routes the request; a credential cannot go there",
            quoted(text)
        ));
    }
    Ok(text.to_owned())
}

pub(crate) fn query(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    if !ok {
        return Err(format!(
            "{} is not a query parameter name: letters, digits, '-', '.', '_' or '~'",
            quoted(text)
        ));
    }
    Ok(text.to_owned())
}

pub(crate) fn format(text: &str) -> Result<String, String> {
    if text.matches(SECRET_MARK).count() != 1 {
        return Err(format!(
            "{} must contain {SECRET_MARK} exactly once",
            quoted(text)
        ));
    }
    if text.chars().any(|c| c.is_control()) {
        return Err(format!(
            "{} cannot contain control characters",
            quoted(text)
        ));
    }
    Ok(text.to_owned())
}

pub(crate) fn command(argv: &[String]) -> Result<Vec<String>, String> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err("needs a program: [\"program\", \"arg\", ...]".to_owned());
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err("an argument cannot contain a NUL character".to_owned());
    }
    Ok(argv.to_vec())
}

/// A `network.intercept` entry: a host name, or `*.domain` for every subdomain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterceptHost {
    Name(HostName),
    Subdomains(HostName),
}

impl InterceptHost {
    pub fn parse(text: &str) -> Result<InterceptHost, String> {
        let (wild, rest) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let name = HostName::parse(rest).map_err(|e| e.to_string())?;
        if wild && name.labels().count() < 2 {
            return Err(format!(
                "{} is too broad: name a registered domain (\"*.example.com\")",
                quoted(text)
            ));
        }
        Ok(if wild {
            InterceptHost::Subdomains(name)
        } else {
            InterceptHost::Name(name)
        })
    }

    pub fn matches(&self, host: &HostName) -> bool {
        match self {
            InterceptHost::Name(n) => n == host,
            InterceptHost::Subdomains(parent) => host.is_subdomain_of(parent),
        }
    }
}

impl fmt::Display for InterceptHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InterceptHost::Name(n) => write!(f, "{n}"),
            InterceptHost::Subdomains(n) => write!(f, "*.{n}"),
        }
    }
}

impl Serialize for InterceptHost {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked() {
        assert!(name("github").is_ok());
        assert!(name("git hub").is_err());
        assert!(header("Authorization").is_ok());
        assert!(header("Host").is_err());
        assert!(header("Proxy-Authorization").is_err());
        assert!(header("Bad Header").is_err());
        assert!(query("access_token").is_ok());
        assert!(query("a&b").is_err());
        assert!(format("Bearer {secret}").is_ok());
        assert!(format("Bearer").is_err());
        assert!(format("{secret}{secret}").is_err());
        assert!(format("{secret}\r\nX: y").is_err());
        assert!(command(&[]).is_err());
    }

    #[test]
    fn intercept_hosts_match_names_and_subdomains() {
        let h = |s| HostName::parse(s).unwrap();
        let exact = InterceptHost::parse("api.example.com").unwrap();
        assert!(exact.matches(&h("api.example.com")));
        assert!(!exact.matches(&h("x.api.example.com")));
        let wild = InterceptHost::parse("*.example.com").unwrap();
        assert!(wild.matches(&h("api.example.com")));
        assert!(!wild.matches(&h("example.com")));
        assert!(InterceptHost::parse("*.com").is_err());
        assert!(InterceptHost::parse("a b").is_err());
    }
}
