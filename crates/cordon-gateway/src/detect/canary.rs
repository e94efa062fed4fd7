//! Honey tokens: values only cordon and the sandbox know (placed in its environment or in files
//! of its workspace), looked for in outbound traffic.
//!
//! Guarantees: [`Canaries::scan`] finds a token written as is or base64-encoded at any
//! alignment (as in `Authorization: Basic …`), anywhere in the bytes it is given (a request
//! head, a body prefix, decrypted bytes); [`Canaries::scan_name`] finds a token in a DNS name
//! whatever its letter case (resolvers and the gateway lower-case names). Tokens are random, so
//! a match is not a coincidence: one hit is enough. Nothing here prints a token: [`Canary`]'s
//! `Debug` shows only where it was placed, and [`redacting`] replaces a token (as is in any case,
//! or base64-encoded: [`Canaries::occurrences`]) that a sandbox process put in its own command
//! line (or executable path) with `[canary NAME]` before the process is attached to any event.

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use base64::Engine as _;

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
/// (as is in any case, or base64-encoded: [`Canaries::occurrences`]) replaced by
/// `[canary NAME]` (`owners` itself when there are no canaries).
pub(crate) fn redacting(
    owners: std::sync::Arc<dyn crate::owner::SocketOwners>,
    canaries: &[Canary],
) -> std::sync::Arc<dyn crate::owner::SocketOwners> {
    if canaries.is_empty() {
        return owners;
    }
    let tokens: Vec<String> = canaries.iter().map(|c| c.token.clone()).collect();
    let names = canaries
        .iter()
        .map(|c| {
            let name = match &c.source {
                CanarySource::Env(n) | CanarySource::File(n) => n,
            };
            format!("[canary {name}]")
        })
        .collect();
    std::sync::Arc::new(Redacting {
        inner: owners,
        canaries: Canaries::new(&tokens),
        names,
    })
}

/// `text` with each of `spans` (from [`Canaries::occurrences`]) replaced by its token's name.
pub(crate) fn replace_spans(
    text: &str,
    spans: &[(usize, usize, usize)],
    name: impl Fn(usize) -> String,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for &(start, end, token) in spans {
        out.push_str(text.get(at..start).unwrap_or_default());
        out.push_str(&name(token));
        at = end;
    }
    out.push_str(text.get(at..).unwrap_or_default());
    out
}

/// See [`redacting`].
struct Redacting {
    inner: std::sync::Arc<dyn crate::owner::SocketOwners>,
    canaries: Canaries,
    /// What replaces token i.
    names: Vec<String>,
}

impl Redacting {
    fn redact(&self, text: &mut String) {
        let spans = self.canaries.occurrences(text);
        if !spans.is_empty() {
            *text = replace_spans(text, &spans, |i| {
                self.names.get(i).cloned().unwrap_or_default()
            });
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

/// The tokens of one session, ready to search for: two automata, so that one pass over the
/// bytes finds any of them however many tokens a session has.
#[derive(Default)]
pub struct Canaries {
    /// Every token as is and its base64 forms; pattern i is `exact_ids[i]`.
    exact: Option<AhoCorasick>,
    exact_ids: Vec<(usize, Encoding)>,
    /// Every token as is, matched without regard to ASCII case; pattern i is token
    /// `folded_ids[i]`.
    folded: Option<AhoCorasick>,
    folded_ids: Vec<usize>,
    /// The shortest pattern of each automaton: a text shorter than that cannot hold a token.
    exact_min: usize,
    folded_min: usize,
}

impl std::fmt::Debug for Canaries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the tokens themselves.
        f.debug_struct("Canaries")
            .field("needles", &self.exact_ids.len())
            .finish()
    }
}

/// An automaton over `patterns`. Building fails only past aho-corasick's pattern and state
/// limits, which a session's few dozen short tokens are far below.
fn automaton(patterns: &[Vec<u8>], any_case: bool) -> Option<AhoCorasick> {
    if patterns.is_empty() {
        return None;
    }
    AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        // A few dozen patterns make a small DFA: the fastest search, built once per session.
        .kind(Some(AhoCorasickKind::DFA))
        .ascii_case_insensitive(any_case)
        .build(patterns)
        .ok()
}

impl Canaries {
    pub fn new(tokens: &[String]) -> Canaries {
        let mut exact = Vec::new();
        let mut exact_ids = Vec::new();
        let mut folded = Vec::new();
        let mut folded_ids = Vec::new();
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
        for (i, token) in tokens.iter().enumerate() {
            if token.len() < 8 {
                continue;
            }
            folded.push(token.as_bytes().to_vec());
            folded_ids.push(i);
            exact.push(token.as_bytes().to_vec());
            exact_ids.push((i, Encoding::Plain));
            // The token at offset 0, 1 or 2 of a 3-byte group: the characters that encode only
            // token bytes are the same whatever surrounds it.
            for pad in 0..3usize {
                let mut input = vec![b'\0'; pad];
                input.extend_from_slice(token.as_bytes());
                let enc = b64.encode(&input);
                let start = if pad == 0 { 0 } else { 4 };
                let end = enc.len().saturating_sub(4);
                if end > start + 8 {
                    exact.push(enc.as_bytes()[start..end].to_vec());
                    exact_ids.push((i, Encoding::Base64));
                }
            }
        }
        let shortest = |v: &[Vec<u8>]| v.iter().map(Vec::len).min().unwrap_or(usize::MAX);
        Canaries {
            exact_min: shortest(&exact),
            folded_min: shortest(&folded),
            exact: automaton(&exact, false),
            exact_ids,
            folded: automaton(&folded, true),
            folded_ids,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.exact_ids.is_empty()
    }

    /// The first token found in a DNS name, compared without regard to letter case (a name is
    /// case-insensitive, and arrives lower-cased).
    pub fn scan_name(&self, name: &str) -> Option<CanaryHit> {
        // Most names and paths are shorter than any token: no search needed (a search costs a
        // few hundred instructions even on a short text, on every event of the session).
        if name.len() < self.folded_min {
            return None;
        }
        let m = self.folded.as_ref()?.find(name)?;
        Some(CanaryHit {
            token: *self.folded_ids.get(m.pattern().as_usize())?,
            encoding: Encoding::Plain,
        })
    }

    /// Every place a token occurs in `text` — as is in any letter case, or base64-encoded at
    /// any alignment (the characters that encode only token bytes) — as (start, end, token),
    /// in order, not overlapping: what a redaction must cover.
    pub fn occurrences(&self, text: &str) -> Vec<(usize, usize, usize)> {
        let mut found: Vec<(usize, usize, usize)> = Vec::new();
        if let Some(ac) = self
            .folded
            .as_ref()
            .filter(|_| text.len() >= self.folded_min)
        {
            found.extend(ac.find_iter(text).filter_map(|m| {
                let token = *self.folded_ids.get(m.pattern().as_usize())?;
                Some((m.start(), m.end(), token))
            }));
        }
        if let Some(ac) = self.exact.as_ref().filter(|_| text.len() >= self.exact_min) {
            found.extend(ac.find_iter(text).filter_map(|m| {
                match *self.exact_ids.get(m.pattern().as_usize())? {
                    (token, Encoding::Base64) => Some((m.start(), m.end(), token)),
                    // Plain forms are the folded automaton's, in any case.
                    (_, Encoding::Plain) => None,
                }
            }));
        }
        if found.len() < 2 {
            return found;
        }
        // Two searches: sort, and fold overlapping spans into one (the first token names it).
        found.sort_unstable();
        let mut merged: Vec<(usize, usize, usize)> = Vec::with_capacity(found.len());
        for (start, end, token) in found {
            match merged.last_mut() {
                Some(last) if start < last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end, token)),
            }
        }
        merged
    }

    /// The first token found in `bytes`, if any.
    pub fn scan(&self, bytes: &[u8]) -> Option<CanaryHit> {
        if bytes.len() < self.exact_min {
            return None;
        }
        let m = self.exact.as_ref()?.find(bytes)?;
        let (token, encoding) = *self.exact_ids.get(m.pattern().as_usize())?;
        Some(CanaryHit { token, encoding })
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

    /// The process `redacting` reports for one canary placed at `source`, when the sandbox
    /// process is `exe` with `cmdline`.
    fn redacted_owner(
        source: CanarySource,
        token: &str,
        exe: String,
        cmdline: Vec<String>,
    ) -> crate::owner::ProcessInfo {
        use crate::owner::{ProcessInfo, SocketOwners, Transport};
        struct Fixed(ProcessInfo);
        impl SocketOwners for Fixed {
            fn owner(
                &self,
                _: Transport,
                _: std::net::SocketAddr,
                _: Option<std::net::SocketAddr>,
            ) -> Option<ProcessInfo> {
                Some(self.0.clone())
            }
        }
        let canaries = [Canary {
            source,
            token: token.to_owned(),
        }];
        let found = ProcessInfo {
            pid: 3,
            exe,
            cmdline,
        };
        let owners = redacting(std::sync::Arc::new(Fixed(found)), &canaries);
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        owners.owner(Transport::Tcp, addr, None).unwrap()
    }

    #[test]
    fn a_token_in_a_process_command_line_is_replaced_by_its_name() {
        let token = new_token().unwrap();
        let p = redacted_owner(
            CanarySource::File(".aws/credentials".into()),
            &token,
            format!("/tmp/{token}"),
            vec!["curl".into(), format!("-HX-Key: {token}")],
        );
        assert_eq!(p.exe, "/tmp/[canary .aws/credentials]");
        assert_eq!(p.cmdline, ["curl", "-HX-Key: [canary .aws/credentials]"]);
    }

    #[test]
    fn a_base64_encoded_token_in_a_command_line_is_replaced_too() {
        let b64 = base64::engine::general_purpose::STANDARD;
        let token = new_token().unwrap();
        let args: Vec<String> = ["", "u:", "us:"]
            .iter()
            .map(|p| {
                format!(
                    "-HAuthorization: Basic {}",
                    b64.encode(format!("{p}{token}"))
                )
            })
            .collect();
        let p = redacted_owner(
            CanarySource::Env("API_KEY".into()),
            &token,
            "/usr/bin/curl".into(),
            args.clone(),
        );
        let scan = Canaries::new(std::slice::from_ref(&token));
        for (before, after) in args.iter().zip(&p.cmdline) {
            assert!(scan.scan(before.as_bytes()).is_some());
            assert_eq!(scan.scan(after.as_bytes()), None, "{after}");
            assert!(after.starts_with("-HAuthorization: Basic "), "{after}");
            assert!(after.contains("[canary API_KEY]"), "{after}");
        }
    }

    proptest::proptest! {
        /// Whatever surrounds them, tokens written as is (any case) or base64-encoded leave
        /// nothing a scan finds once their occurrences are replaced, and the occurrences come
        /// sorted and disjoint.
        #[test]
        fn replacing_the_occurrences_leaves_no_token(
            parts in proptest::collection::vec(("[ -~]{0,12}", 0u8..4, 0usize..3), 1..4),
        ) {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD;
            let tokens = [new_token().unwrap(), new_token().unwrap()];
            let c = Canaries::new(&tokens);
            let mut text = String::new();
            for (i, (filler, form, pad)) in parts.iter().enumerate() {
                text.push_str(filler);
                let t = &tokens[i % 2];
                match form {
                    0 => text.push_str(t),
                    1 => text.push_str(&t.to_lowercase()),
                    2 => text.push_str(&b64.encode(format!("{}{t}", "x".repeat(*pad)))),
                    _ => {}
                }
            }
            let spans = c.occurrences(&text);
            for w in spans.windows(2) {
                proptest::prop_assert!(w[0].1 <= w[1].0, "{:?}", spans);
            }
            let out = replace_spans(&text, &spans, |i| format!("[canary {i}]"));
            proptest::prop_assert_eq!(c.scan(out.as_bytes()), None, "{}", out);
            proptest::prop_assert_eq!(c.scan_name(&out), None, "{}", out);
        }
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
