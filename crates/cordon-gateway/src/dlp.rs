//! Outbound scanning (DLP): the session's secret values, placeholders, canary tokens and common
//! secret formats in what the sandbox sends, and secret values in what comes back.
//!
//! Guarantees:
//! - A finding names the pattern (`aws_access_key_id`, `secret:github`, `placeholder:github`),
//!   never the bytes that matched.
//! - Streaming with a hold-back: [`Stream::push`] scans everything it has been given and returns
//!   only the bytes that can no longer be part of a match (all but the last
//!   [`Scanner::hold`] bytes), so nothing of a match is ever released before it is found —
//!   whatever the chunk boundaries. [`Stream::finish`] scans and releases the rest.
//! - Bounded: each stream scans at most its limit; past it, [`Stream::push`] fails with
//!   [`Finding::too_large`] (the caller refuses the message), never passes bytes unscanned.
//! - Redaction (responses) replaces each literal match with as many `*` as it had bytes, so
//!   message framing (`Content-Length`, chunk sizes) stays true.

use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use regex::bytes::RegexSet;

/// What a finding is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// The real value of a credential.
    Secret,
    /// The placeholder of a credential.
    Placeholder,
    /// A canary token.
    Canary,
    /// A well-known secret format.
    Format,
    /// More bytes than the scan limit.
    TooLarge,
}

/// A pattern that matched (never the matched bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: Kind,
    /// `secret:<credential>`, `placeholder:<credential>`, `canary:<name>`, a format name.
    pub pattern: String,
}

impl Finding {
    pub fn too_large(limit: u64) -> Finding {
        Finding {
            kind: Kind::TooLarge,
            pattern: format!("body larger than the {limit}-byte scan limit"),
        }
    }
}

/// Well-known secret formats: name and expression. Each has a short minimal match, so the
/// hold-back window covers it.
pub const FORMATS: &[(&str, &str)] = &[
    (
        "aws_access_key_id",
        r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b",
    ),
    (
        "private_key",
        r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?-----",
    ),
    (
        "github_token",
        r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}\b",
    ),
    ("github_pat", r"\bgithub_pat_[A-Za-z0-9_]{22,}"),
    ("slack_token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    (
        "slack_webhook",
        r"https://hooks\.slack\.com/services/T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]+",
    ),
    ("stripe_key", r"\b[sr]k_live_[A-Za-z0-9]{20,}"),
    ("google_api_key", r"\bAIza[0-9A-Za-z_-]{35}\b"),
    ("openai_api_key", r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{32,}"),
    (
        "jwt",
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    ),
];

/// Bytes held back at least: longer than every format's minimal match.
const MIN_HOLD: usize = 256;

/// A compiled set of patterns.
pub struct Scanner {
    literals: Option<AhoCorasick>,
    names: Vec<(Kind, String)>,
    /// Every format in one automaton: one pass over the data, whatever the number of formats.
    formats: Option<RegexSet>,
    hold: usize,
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the literals: they are secrets.
        f.debug_struct("Scanner")
            .field("literals", &self.names.len())
            .field("formats", &self.formats.as_ref().map_or(0, RegexSet::len))
            .finish()
    }
}

impl Scanner {
    /// Literal patterns `(kind, name, bytes)` and, when `formats`, every [`FORMATS`] entry.
    /// Empty literals are ignored.
    pub fn new(literals: Vec<(Kind, String, Vec<u8>)>, formats: bool) -> Scanner {
        let literals: Vec<_> = literals.into_iter().filter(|l| !l.2.is_empty()).collect();
        let longest = literals.iter().map(|l| l.2.len()).max().unwrap_or(0);
        let automaton = if literals.is_empty() {
            None
        } else {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(literals.iter().map(|l| l.2.as_slice()))
                .ok()
        };
        // The expressions are constants, compiled by the tests: a failure here cannot happen,
        // and would show up as no format being found, never as a crash.
        let formats = if formats {
            // ASCII word boundaries and classes (`(?-u)`): secrets are ASCII, and Unicode `\b`
            // keeps the regex engine off its fast DFA.
            RegexSet::new(FORMATS.iter().map(|(_, re)| format!("(?-u){re}"))).ok()
        } else {
            None
        };
        Scanner {
            literals: automaton,
            names: literals.into_iter().map(|(k, n, _)| (k, n)).collect(),
            formats,
            hold: longest.max(MIN_HOLD),
        }
    }

    /// How many trailing bytes a stream holds back.
    pub fn hold(&self) -> usize {
        self.hold
    }

    /// The first pattern found in `data`, if any.
    pub fn find(&self, data: &[u8]) -> Option<Finding> {
        if let Some(ac) = &self.literals {
            if let Some(m) = ac.find(data) {
                let (kind, name) = &self.names[m.pattern().as_usize()];
                return Some(Finding {
                    kind: kind.clone(),
                    pattern: name.clone(),
                });
            }
        }
        let set = self.formats.as_ref()?;
        let first = set.matches(data).into_iter().next()?;
        FORMATS.get(first).map(|(name, _)| Finding {
            kind: Kind::Format,
            pattern: (*name).to_owned(),
        })
    }

    /// Replaces every literal match in `data` with `*`s; returns the names that matched.
    pub fn redact(&self, data: &mut [u8]) -> Vec<String> {
        let mut hits = Vec::new();
        let Some(ac) = &self.literals else {
            return hits;
        };
        let spans: Vec<_> = ac
            .find_iter(&*data)
            .map(|m| (m.pattern(), m.range()))
            .collect();
        for (p, range) in spans {
            data[range].fill(b'*');
            let name = &self.names[p.as_usize()].1;
            if !hits.contains(name) {
                hits.push(name.clone());
            }
        }
        hits
    }
}

/// A scan over one message body (or any byte stream), with hold-back and a size limit. It owns a
/// handle on its scanner, so it can live in a body that a connection task polls.
pub struct Stream {
    scanner: Arc<Scanner>,
    pending: Vec<u8>,
    seen: u64,
    limit: u64,
    redact: bool,
    redacted: Vec<String>,
}

impl Stream {
    /// `redact`: literal matches are replaced rather than reported (formats are then not
    /// looked for).
    pub fn new(scanner: Arc<Scanner>, limit: u64, redact: bool) -> Self {
        Stream {
            scanner,
            pending: Vec::new(),
            seen: 0,
            limit,
            redact,
            redacted: Vec::new(),
        }
    }

    /// Scans `data` after what came before; returns the bytes now safe to release.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<u8>, Finding> {
        self.seen += data.len() as u64;
        if self.seen > self.limit {
            return Err(Finding::too_large(self.limit));
        }
        self.pending.extend_from_slice(data);
        self.scan()?;
        let keep = self.scanner.hold().min(self.pending.len());
        let release = self.pending.len() - keep;
        Ok(self.pending.drain(..release).collect())
    }

    /// The end: scans and releases the rest.
    pub fn finish(&mut self) -> Result<Vec<u8>, Finding> {
        self.scan()?;
        Ok(std::mem::take(&mut self.pending))
    }

    fn scan(&mut self) -> Result<(), Finding> {
        if self.redact {
            for name in self.scanner.redact(&mut self.pending) {
                if !self.redacted.contains(&name) {
                    self.redacted.push(name);
                }
            }
            return Ok(());
        }
        match self.scanner.find(&self.pending) {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    /// The literal patterns redacted so far.
    pub fn redacted(&self) -> &[String] {
        &self.redacted
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn scanner() -> Arc<Scanner> {
        Arc::new(Scanner::new(
            vec![
                (
                    Kind::Secret,
                    "secret:gh".into(),
                    b"s3cr3t-value-0123456789".to_vec(),
                ),
                (
                    Kind::Placeholder,
                    "placeholder:gh".into(),
                    b"cordon-placeholder-abc".to_vec(),
                ),
            ],
            true,
        ))
    }

    #[test]
    fn every_format_compiles() {
        assert!(RegexSet::new(FORMATS.iter().map(|(_, re)| format!("(?-u){re}"))).is_ok());
        assert_eq!(
            Scanner::new(Vec::new(), true).formats.map(|s| s.len()),
            Some(FORMATS.len())
        );
    }

    #[test]
    fn formats_and_literals_are_named_never_shown() {
        let s = scanner();
        let cases: &[(&[u8], &str)] = &[
            (b"key=AKIAIOSFODNN7EXAMPLE&x", "aws_access_key_id"),
            (b"-----BEGIN RSA PRIVATE KEY-----\nMII", "private_key"),
            (b"-----BEGIN OPENSSH PRIVATE KEY-----", "private_key"),
            (b"token ghp_0123456789abcdefghijABCDEFGHIJ012345", "github_token"),
            (b"xoxb-1234567890-abcdefghij", "slack_token"),
            (b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "jwt"),
            (b"sk_live_0123456789abcdefghijk", "stripe_key"),
            (b"AIzaSyA-0123456789abcdefghijklmnopqrstu", "google_api_key"),
            (b"x s3cr3t-value-0123456789 y", "secret:gh"),
            (b"cordon-placeholder-abc", "placeholder:gh"),
        ];
        for (data, name) in cases {
            let f = s.find(data).unwrap_or_else(|| panic!("{name} not found"));
            assert_eq!(f.pattern, *name);
        }
        assert_eq!(s.find(b"GET /repos/a HTTP/1.1 nothing here"), None);
    }

    #[test]
    fn a_match_split_across_chunks_is_found_before_any_of_it_is_released() {
        let s = scanner();
        let body = b"aaaaaaaaaa s3cr3t-value-0123456789 bbbbb".to_vec();
        for cut in 1..body.len() {
            let mut st = Stream::new(s.clone(), 1 << 20, false);
            let mut released = Vec::new();
            let mut found = None;
            for part in [&body[..cut], &body[cut..]] {
                match st.push(part) {
                    Ok(r) => released.extend(r),
                    Err(f) => {
                        found = Some(f);
                        break;
                    }
                }
            }
            if found.is_none() {
                found = st.finish().err();
            }
            assert_eq!(found.unwrap().pattern, "secret:gh", "cut {cut}");
            assert!(!released.windows(3).any(|w| w == b"s3c"), "cut {cut}");
        }
    }

    #[test]
    fn clean_streams_pass_through_unchanged() {
        let s = scanner();
        let body: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut st = Stream::new(s.clone(), 1 << 20, false);
        let mut out = Vec::new();
        for chunk in body.chunks(777) {
            out.extend(st.push(chunk).unwrap());
        }
        out.extend(st.finish().unwrap());
        assert_eq!(out, body);
    }

    #[test]
    fn the_scan_limit_refuses_rather_than_passes_unscanned() {
        let s = scanner();
        let mut st = Stream::new(s.clone(), 10, false);
        assert!(st.push(b"12345").is_ok());
        assert_eq!(st.push(b"678901").unwrap_err().kind, Kind::TooLarge);
    }

    #[test]
    fn redaction_keeps_lengths_and_names_what_it_hid() {
        let s = scanner();
        let mut st = Stream::new(s.clone(), 1 << 20, true);
        let body = b"{\"echo\":\"s3cr3t-value-0123456789\"}";
        let mut out = st.push(&body[..15]).unwrap();
        out.extend(st.push(&body[15..]).unwrap());
        out.extend(st.finish().unwrap());
        assert_eq!(out.len(), body.len());
        assert_eq!(&out[..], &b"{\"echo\":\"***********************\"}"[..]);
        assert_eq!(st.redacted(), ["secret:gh"]);
    }
}
