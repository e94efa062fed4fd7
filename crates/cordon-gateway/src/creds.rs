//! Credentials at run time: secrets read by the supervisor, per-session placeholders, and the
//! swap on intercepted requests.
//!
//! Guarantees:
//! - A [`Secret`] never prints: its `Debug` shows the credential name only, and no error of this
//!   module carries a secret value (errors about a source name the source, not its content).
//! - A placeholder is `cordon-placeholder-` and 32 random hex digits (128 bits from the OS),
//!   new for every session.
//! - [`inject`] replaces the placeholder only at the place the credential names (a header, a
//!   query parameter, basic auth, or any header) and only for credentials bound to the request's
//!   host; it reports which credentials it used, and refuses a request to a host whose
//!   `require` credential it did not find.

use std::path::Path;
use std::process::{Command, Stdio};

use base64::Engine as _;
use cordon_policy::credentials::SECRET_MARK;
use cordon_policy::host::HostName;
use cordon_policy::{Credential, Injection, SecretSource};
use thiserror::Error;

/// The prefix of every placeholder.
pub const PLACEHOLDER_PREFIX: &str = "cordon-placeholder-";

/// A secret value. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps a value (tests and callers that read secrets their own way).
    pub fn new(value: impl Into<Vec<u8>>) -> Secret {
        Secret(value.into())
    }
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Error)]
pub enum SecretError {
    #[error("credential {name}: environment variable {var} is not set in cordon's environment")]
    EnvMissing { name: String, var: String },
    #[error("credential {name}: cannot read {path}: {source}")]
    File {
        name: String,
        path: String,
        source: std::io::Error,
    },
    #[error("credential {name}: cannot run {program}: {source}")]
    Spawn {
        name: String,
        program: String,
        source: std::io::Error,
    },
    #[error("credential {name}: {program} failed ({status})")]
    CommandFailed {
        name: String,
        program: String,
        status: String,
    },
    #[error("credential {name}: the secret is empty")]
    Empty { name: String },
    #[error("credential {name}: the secret contains control characters or non-ASCII bytes, which cannot go into an HTTP header")]
    Unprintable { name: String },
    #[error("credential {name}: the secret is shorter than 8 bytes, too short to scan for safely")]
    TooShort { name: String },
    #[error("cannot generate a placeholder: {0}")]
    Random(String),
}

fn trim_newline(mut v: Vec<u8>) -> Vec<u8> {
    if v.last() == Some(&b'\n') {
        v.pop();
        if v.last() == Some(&b'\r') {
            v.pop();
        }
    }
    v
}

/// Reads a credential's secret from its source (the supervisor does this at session start).
pub fn load_secret(cred: &Credential) -> Result<Secret, SecretError> {
    let name = cred.name.clone();
    let value = match &cred.source {
        SecretSource::Env(var) => match std::env::var_os(var) {
            Some(v) => v.into_encoded_bytes(),
            None => {
                return Err(SecretError::EnvMissing {
                    name,
                    var: var.clone(),
                })
            }
        },
        SecretSource::File(path) => {
            trim_newline(std::fs::read(path).map_err(|source| SecretError::File {
                name: name.clone(),
                path: path.display().to_string(),
                source,
            })?)
        }
        SecretSource::Command(argv) => {
            let program = argv.first().cloned().unwrap_or_default();
            let out = Command::new(Path::new(&program))
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .map_err(|source| SecretError::Spawn {
                    name: name.clone(),
                    program: program.clone(),
                    source,
                })?;
            if !out.status.success() {
                return Err(SecretError::CommandFailed {
                    name,
                    program,
                    status: out.status.to_string(),
                });
            }
            trim_newline(out.stdout)
        }
    };
    if value.is_empty() {
        return Err(SecretError::Empty { name });
    }
    if value.iter().any(|&b| !(0x20..0x7f).contains(&b)) {
        return Err(SecretError::Unprintable { name });
    }
    if value.len() < 8 {
        return Err(SecretError::TooShort { name });
    }
    Ok(Secret(value))
}

/// A fresh placeholder.
pub fn new_placeholder() -> Result<String, SecretError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| SecretError::Random(e.to_string()))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{PLACEHOLDER_PREFIX}{hex}"))
}

/// A credential of this session: the policy entry, its placeholder and its secret.
#[derive(Debug, Clone)]
pub struct LiveCredential {
    pub spec: Credential,
    pub placeholder: String,
    pub secret: Secret,
}

impl LiveCredential {
    fn formatted(&self) -> Vec<u8> {
        let (before, after) = self.spec.format.split_once(SECRET_MARK).unwrap_or(("", ""));
        let mut v = Vec::with_capacity(before.len() + self.secret.0.len() + after.len());
        v.extend_from_slice(before.as_bytes());
        v.extend_from_slice(&self.secret.0);
        v.extend_from_slice(after.as_bytes());
        v
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn replace_all(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len() + with.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            s[i],
            s.get(i + 1).and_then(|&b| hex(b)),
            s.get(i + 2).and_then(|&b| hex(b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn percent_encode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() * 3);
    for &b in s {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

/// A request after injection: the target to send and the header values to replace.
#[derive(Debug, Default)]
pub(crate) struct Injected {
    pub target: Option<Vec<u8>>,
    /// `(header index, new value)`.
    pub headers: Vec<(usize, Vec<u8>)>,
    /// Names of the credentials used.
    pub used: Vec<String>,
}

/// Swaps placeholders for secrets in a request to `host` with these `headers` (name, value; in
/// order, whichever HTTP version carried them) and `target`. `Err`: the name of a `require`
/// credential bound to the host that the request does not carry.
pub(crate) fn inject(
    creds: &[LiveCredential],
    host: &HostName,
    headers: &[(&[u8], &[u8])],
    target: &[u8],
) -> Result<Injected, String> {
    let mut out = Injected::default();
    let mut target_now = target.to_vec();
    for c in creds.iter().filter(|c| c.spec.bound_to(host)) {
        let ph = c.placeholder.as_bytes();
        let mut used = false;
        match &c.spec.inject {
            Injection::Header(name) => {
                for (i, &(n, v)) in headers.iter().enumerate() {
                    if n.eq_ignore_ascii_case(name.as_bytes()) && contains(v, ph) {
                        out.headers.push((i, c.formatted()));
                        used = true;
                    }
                }
            }
            Injection::AnyHeader => {
                for (i, &(_, v)) in headers.iter().enumerate() {
                    if contains(v, ph) {
                        out.headers.push((i, replace_all(v, ph, &c.secret.0)));
                        used = true;
                    }
                }
            }
            Injection::BasicAuth => {
                for (i, &(n, v)) in headers.iter().enumerate() {
                    if !n.eq_ignore_ascii_case(b"authorization") {
                        continue;
                    }
                    let Some(b64) = v
                        .strip_prefix(b"Basic ")
                        .or_else(|| v.strip_prefix(b"basic "))
                    else {
                        continue;
                    };
                    let engine = base64::engine::general_purpose::STANDARD;
                    let Ok(plain) = engine.decode(b64.trim_ascii()) else {
                        continue;
                    };
                    if contains(&plain, ph) {
                        let swapped = replace_all(&plain, ph, &c.secret.0);
                        let mut value = b"Basic ".to_vec();
                        value.extend_from_slice(engine.encode(swapped).as_bytes());
                        out.headers.push((i, value));
                        used = true;
                    }
                }
            }
            Injection::Query(param) => {
                if let Some(q) = target_now.iter().position(|&b| b == b'?') {
                    let (path, query) = target_now.split_at(q);
                    let mut rebuilt = path.to_vec();
                    rebuilt.push(b'?');
                    let mut first = true;
                    for pair in query[1..].split(|&b| b == b'&') {
                        if !first {
                            rebuilt.push(b'&');
                        }
                        first = false;
                        let (k, v) = match pair.iter().position(|&b| b == b'=') {
                            Some(e) => (&pair[..e], &pair[e + 1..]),
                            None => (pair, &b""[..]),
                        };
                        if percent_decode(k) == param.as_bytes() && contains(&percent_decode(v), ph)
                        {
                            rebuilt.extend_from_slice(k);
                            rebuilt.push(b'=');
                            rebuilt.extend_from_slice(&percent_encode(&c.formatted()));
                            used = true;
                        } else {
                            rebuilt.extend_from_slice(pair);
                        }
                    }
                    target_now = rebuilt;
                }
            }
        }
        if used {
            out.used.push(c.spec.name.clone());
        } else if c.spec.require {
            return Err(c.spec.name.clone());
        }
    }
    if target_now != target {
        out.target = Some(target_now);
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn cred(inject: Injection, format: &str, require: bool) -> LiveCredential {
        LiveCredential {
            spec: Credential {
                name: "gh".into(),
                hosts: vec![HostName::parse("api.github.com").unwrap()],
                inject,
                format: format.into(),
                source: SecretSource::Env("X".into()),
                env: "X".into(),
                require,
            },
            placeholder: "cordon-placeholder-00ff".into(),
            secret: Secret::new("ghp_REALSECRET"),
        }
    }

    fn head(text: &str) -> crate::h1::RequestHead {
        let mut buf = BytesMut::from(text.as_bytes());
        crate::h1::parse_request(&mut buf, &mut Vec::new())
            .unwrap()
            .unwrap()
    }

    fn fields(req: &crate::h1::RequestHead) -> Vec<(&[u8], &[u8])> {
        req.head.headers().collect()
    }

    fn gh() -> HostName {
        HostName::parse("api.github.com").unwrap()
    }

    #[test]
    fn a_header_credential_is_written_in_its_format() {
        let c = [cred(
            Injection::Header("Authorization".into()),
            "Bearer {secret}",
            false,
        )];
        let req = head("GET /zen HTTP/1.1\r\nHost: api.github.com\r\nAuthorization: token cordon-placeholder-00ff\r\n\r\n");
        let out = inject(&c, &gh(), &fields(&req), b"/zen").unwrap();
        assert_eq!(out.headers, vec![(1, b"Bearer ghp_REALSECRET".to_vec())]);
        assert_eq!(out.used, ["gh"]);
        // Another host: nothing is swapped.
        let other = HostName::parse("evil.com").unwrap();
        assert!(inject(&c, &other, &fields(&req), b"/zen")
            .unwrap()
            .headers
            .is_empty());
    }

    #[test]
    fn query_basic_and_any_header_credentials_are_swapped_in_place() {
        let c = [cred(Injection::Query("key".into()), "{secret}", false)];
        let req = head("GET /x?a=1&key=cordon-placeholder-00ff HTTP/1.1\r\nHost: h\r\n\r\n");
        let out = inject(
            &c,
            &gh(),
            &fields(&req),
            b"/x?a=1&key=cordon-placeholder-00ff",
        )
        .unwrap();
        assert_eq!(out.target.unwrap(), b"/x?a=1&key=ghp_REALSECRET".to_vec());

        let c = [cred(Injection::BasicAuth, "{secret}", false)];
        let b64 = base64::engine::general_purpose::STANDARD.encode("user:cordon-placeholder-00ff");
        let req = head(&format!(
            "GET / HTTP/1.1\r\nAuthorization: Basic {b64}\r\n\r\n"
        ));
        let out = inject(&c, &gh(), &fields(&req), b"/").unwrap();
        let want = base64::engine::general_purpose::STANDARD.encode("user:ghp_REALSECRET");
        assert_eq!(out.headers, vec![(0, format!("Basic {want}").into_bytes())]);

        let c = [cred(Injection::AnyHeader, "{secret}", false)];
        let req = head("GET / HTTP/1.1\r\nX-Api: k=cordon-placeholder-00ff;\r\n\r\n");
        let out = inject(&c, &gh(), &fields(&req), b"/").unwrap();
        assert_eq!(out.headers, vec![(0, b"k=ghp_REALSECRET;".to_vec())]);
    }

    #[test]
    fn require_refuses_a_request_without_the_placeholder() {
        let c = [cred(
            Injection::Header("Authorization".into()),
            "Bearer {secret}",
            true,
        )];
        let req = head("GET /zen HTTP/1.1\r\nHost: api.github.com\r\n\r\n");
        assert_eq!(inject(&c, &gh(), &fields(&req), b"/zen").unwrap_err(), "gh");
    }

    #[test]
    fn secrets_never_print_and_sources_are_checked() {
        let s = Secret::new("hunter2hunter2");
        assert_eq!(format!("{s:?}"), "Secret(..)");
        let mut c = cred(Injection::AnyHeader, "{secret}", false).spec;
        c.source = SecretSource::Env("CORDON_TEST_SURELY_UNSET_VAR".into());
        assert!(load_secret(&c)
            .unwrap_err()
            .to_string()
            .contains("is not set"));
        c.source = SecretSource::Command(vec!["/bin/echo".into(), "from-a-command".into()]);
        assert_eq!(load_secret(&c).unwrap().bytes(), b"from-a-command");
        c.source = SecretSource::Command(vec!["/bin/false".into()]);
        assert!(load_secret(&c).is_err());
        c.source = SecretSource::Command(vec!["/bin/echo".into(), "short".into()]);
        assert!(matches!(load_secret(&c), Err(SecretError::TooShort { .. })));
        let p = new_placeholder().unwrap();
        assert!(p.starts_with(PLACEHOLDER_PREFIX) && p.len() == PLACEHOLDER_PREFIX.len() + 32);
        assert_ne!(p, new_placeholder().unwrap());
    }
}
