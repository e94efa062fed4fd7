//! Honey tokens: values only cordon and the sandbox know (placed in its environment or in files
//! of its workspace), looked for in outbound traffic.
//!
//! Guarantees: [`Canaries::scan`] finds a token written as is or base64-encoded at any
//! alignment (as in `Authorization: Basic …`), anywhere in the bytes it is given (a request
//! head, a body prefix, decrypted bytes); [`Canaries::scan_name`] finds a token in a DNS name
//! whatever its letter case (resolvers and the gateway lower-case names). Tokens are random, so
//! a match is not a coincidence: one hit is enough. Nothing here prints a token: [`Canary`]'s
//! `Debug` shows only where it was placed, and [`redacting`] replaces a token that a sandbox
//! process put in its own command line (or executable path) with `[canary NAME]` before the
//! process is attached to any event.

use base64::Engine as _;
use memchr::memmem;

/// A fresh honey token: 40 random letters and digits, shaped like an API secret and saying
/// nothing about being a canary.
pub fn new_token() -> Result<String, getrandom::Error> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut raw = [0u8; 40];
    getrandom::fill(&mut raw)?;
    // 256 % 62 leaves a slight bias towards the first letters; irrelevant for a canary.
    Ok(raw
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect())
}

/// Where a honey token was placed in the sandbox: what an alert names instead of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CanarySource {
    /// An environment variable (`[detect.canary] env`).
    Env(String),
    /// A file in `/workspace`, by its path relative to it (`[detect.canary] files`).
    File(String),
}

impl CanarySource {
    /// How a firing's summary names it: `AWS_SECRET_ACCESS_KEY`, `from workspace file .env`.
    pub fn describe(&self) -> String {
        match self {
            CanarySource::Env(name) => name.clone(),
            CanarySource::File(path) => format!("from workspace file {path}"),
        }
    }

    /// The name the outbound scanner (DLP) reports it under, after `canary:`.
    pub fn pattern_name(&self) -> String {
        match self {
            CanarySource::Env(name) => name.clone(),
            CanarySource::File(path) => format!("file:{path}"),
        }
    }
}

/// One honey token and where it was placed.
#[derive(Clone, PartialEq, Eq)]
pub struct Canary {
    pub source: CanarySource,
    pub token: String,
}

impl std::fmt::Debug for Canary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token itself.
        f.debug_struct("Canary")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// `owners`, with every canary token in a found process's command line and executable path
/// replaced by `[canary NAME]` (`owners` itself when there are no canaries).
pub(crate) fn redacting(
    owners: std::sync::Arc<dyn crate::owner::SocketOwners>,
    canaries: &[Canary],
) -> std::sync::Arc<dyn crate::owner::SocketOwners> {
    if canaries.is_empty() {
        return owners;
    }
    let names = canaries
        .iter()
        .map(|c| {
            let name = match &c.source {
                CanarySource::Env(n) | CanarySource::File(n) => n,
            };
            (c.token.clone(), format!("[canary {name}]"))
        })
        .collect();
    std::sync::Arc::new(Redacting {
        inner: owners,
        names,
    })
}

/// See [`redacting`].
struct Redacting {
    inner: std::sync::Arc<dyn crate::owner::SocketOwners>,
    /// (token, what replaces it).
    names: Vec<(String, String)>,
}

impl Redacting {
    fn redact(&self, text: &mut String) {
        for (token, name) in &self.names {
            if text.contains(token.as_str()) {
                *text = text.replace(token.as_str(), name);
            }
        }
    }
}

impl crate::owner::SocketOwners for Redacting {
    fn owner(
        &self,
        transport: crate::owner::Transport,
        client: std::net::SocketAddr,
        server: Option<std::net::SocketAddr>,
    ) -> Option<crate::owner::ProcessInfo> {
        let mut found = self.inner.owner(transport, client, server)?;
        self.redact(&mut found.exe);
        for arg in &mut found.cmdline {
            self.redact(arg);
        }
        Some(found)
    }
}

/// How a token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Plain,
    Base64,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Plain => "plain",
            Encoding::Base64 => "base64",
        }
    }
}

/// A token found in traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryHit {
    /// Which token (index into the list given to [`Canaries::new`]).
    pub token: usize,
    pub encoding: Encoding,
}

/// The tokens of one session, ready to search for.
#[derive(Default)]
pub struct Canaries {
    needles: Vec<(usize, Encoding, memmem::Finder<'static>)>,
    /// Each token in lower case, for DNS names.
    lower: Vec<(usize, memmem::Finder<'static>)>,
}

impl std::fmt::Debug for Canaries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the tokens themselves.
        f.debug_struct("Canaries")
            .field("needles", &self.needles.len())
            .finish()
    }
}

impl Canaries {
    pub fn new(tokens: &[String]) -> Canaries {
        let mut needles = Vec::new();
        let mut lower = Vec::new();
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
        for (i, token) in tokens.iter().enumerate() {
            if token.len() < 8 {
                continue;
            }
            let folded = token.to_ascii_lowercase();
            lower.push((i, memmem::Finder::new(folded.as_bytes()).into_owned()));
            needles.push((
                i,
                Encoding::Plain,
                memmem::Finder::new(token.as_bytes()).into_owned(),
            ));
            // The token at offset 0, 1 or 2 of a 3-byte group: the characters that encode only
            // token bytes are the same whatever surrounds it.
            for pad in 0..3usize {
                let mut input = vec![b'\0'; pad];
                input.extend_from_slice(token.as_bytes());
                let enc = b64.encode(&input);
                let start = if pad == 0 { 0 } else { 4 };
                let end = enc.len().saturating_sub(4);
                if end > start + 8 {
                    let core = enc.as_bytes()[start..end].to_vec();
                    needles.push((i, Encoding::Base64, memmem::Finder::new(&core).into_owned()));
                }
            }
        }
        Canaries { needles, lower }
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// The first token found in a DNS name, compared without regard to letter case (a name is
    /// case-insensitive, and arrives lower-cased).
    pub fn scan_name(&self, name: &str) -> Option<CanaryHit> {
        let folded = name.to_ascii_lowercase();
        self.lower
            .iter()
            .find(|(_, f)| f.find(folded.as_bytes()).is_some())
            .map(|(token, _)| CanaryHit {
                token: *token,
                encoding: Encoding::Plain,
            })
    }

    /// Every place a token occurs in `text` as is, in any letter case: (start, end, token),
    /// in order, not overlapping.
    pub fn occurrences(&self, text: &str) -> Vec<(usize, usize, usize)> {
        if self.lower.is_empty() {
            return Vec::new();
        }
        // ASCII lower-casing keeps every byte offset of a UTF-8 string.
        let folded = text.to_ascii_lowercase();
        let mut found: Vec<(usize, usize, usize)> = self
            .lower
            .iter()
            .flat_map(|(token, f)| {
                let len = f.needle().len();
                f.find_iter(folded.as_bytes())
                    .map(move |at| (at, at + len, *token))
            })
            .collect();
        found.sort_unstable();
        let mut end = 0;
        found.retain(|(start, stop, _)| {
            let keep = *start >= end;
            if keep {
                end = *stop;
            }
            keep
        });
        found
    }

    /// The first token found in `bytes`, if any.
    pub fn scan(&self, bytes: &[u8]) -> Option<CanaryHit> {
        self.needles
            .iter()
            .find(|(_, _, f)| f.find(bytes).is_some())
            .map(|(token, encoding, _)| CanaryHit {
                token: *token,
                encoding: *encoding,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_plain_and_base64_encoded_at_every_alignment() {
        let token = new_token().unwrap();
        let c = Canaries::new(std::slice::from_ref(&token));
        let plain = format!("GET /x?k={token} HTTP/1.1\r\n");
        assert_eq!(
            c.scan(plain.as_bytes()).map(|h| h.encoding),
            Some(Encoding::Plain)
        );
        let b64 = base64::engine::general_purpose::STANDARD;
        for prefix in ["", "u:", "us:", "use:"] {
            let header = format!(
                "Authorization: Basic {}\r\n",
                b64.encode(format!("{prefix}{token}"))
            );
            assert_eq!(
                c.scan(header.as_bytes()).map(|h| h.encoding),
                Some(Encoding::Base64),
                "prefix {prefix:?}"
            );
        }
        assert_eq!(c.scan(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"), None);
    }

    #[test]
    fn a_mixed_case_token_is_found_in_a_lower_cased_dns_name() {
        let token = "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCd".to_owned();
        let c = Canaries::new(std::slice::from_ref(&token));
        let name = format!("{}.evil.test", token.to_lowercase());
        // Case matters in request bytes, so the exact-case scan misses it…
        assert_eq!(c.scan(name.as_bytes()), None);
        // …and the name scan finds it, in any case.
        assert_eq!(c.scan_name(&name).map(|h| h.token), Some(0));
        assert_eq!(
            c.scan_name(&format!("x.{token}.evil.test"))
                .map(|h| h.token),
            Some(0)
        );
        assert_eq!(c.scan_name("www.example.com"), None);
    }

    #[test]
    fn a_canary_never_shows_its_token_in_debug_output() {
        let token = new_token().unwrap();
        let c = Canary {
            source: CanarySource::File(".env".into()),
            token: token.clone(),
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains(&token), "{shown}");
        assert!(shown.contains(".env"), "{shown}");
    }

    #[test]
    fn a_token_in_a_process_command_line_is_replaced_by_its_name() {
        use crate::owner::{ProcessInfo, SocketOwners, Transport};
        struct Fixed(String);
        impl SocketOwners for Fixed {
            fn owner(
                &self,
                _: Transport,
                _: std::net::SocketAddr,
                _: Option<std::net::SocketAddr>,
            ) -> Option<ProcessInfo> {
                Some(ProcessInfo {
                    pid: 3,
                    exe: format!("/tmp/{}", self.0),
                    cmdline: vec!["curl".into(), format!("-HX-Key: {}", self.0)],
                })
            }
        }
        let token = new_token().unwrap();
        let canaries = [Canary {
            source: CanarySource::File(".aws/credentials".into()),
            token: token.clone(),
        }];
        let owners = redacting(std::sync::Arc::new(Fixed(token.clone())), &canaries);
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let p = owners.owner(Transport::Tcp, addr, None).unwrap();
        assert_eq!(p.exe, "/tmp/[canary .aws/credentials]");
        assert_eq!(p.cmdline, ["curl", "-HX-Key: [canary .aws/credentials]"]);
    }

    #[test]
    fn a_partial_token_is_not_a_hit() {
        let token = new_token().unwrap();
        let c = Canaries::new(std::slice::from_ref(&token));
        assert_eq!(c.scan(&token.as_bytes()[..30]), None);
    }

    #[test]
    fn new_tokens_are_random_and_shaped_like_secrets() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 40);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
    }
}
