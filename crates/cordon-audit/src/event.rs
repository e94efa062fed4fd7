//! The audit event model.
//!
//! Guarantees:
//! - Every event carries its attribution (session id, user id, SHA-256 of the code) and a
//!   timestamp; everything else is optional because not every path sees it (a DNS query has no
//!   port, a CONNECT tunnel no path).
//! - Field names are stable: they are the JSON-lines export format and the SQLite column names.
//!   Absent values serialise as `null`, never disappear, so a consumer can rely on the keys.
//! - What the sandboxed code controls is bounded before it is stored: the path is cut to
//!   [`MAX_PATH_CHARS`] characters (on a character boundary), host and method to
//!   [`MAX_HOST_CHARS`] / [`MAX_METHOD_CHARS`]. The store applies these cuts itself, so no caller
//!   can bypass them.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::timestamp::Timestamp;

/// Paths are cut to this many characters (issue 3).
pub const MAX_PATH_CHARS: usize = 100;
/// Host names longer than any valid DNS name are cut to this many characters.
pub const MAX_HOST_CHARS: usize = 255;
/// HTTP methods longer than this are cut (no real method comes close).
pub const MAX_METHOD_CHARS: usize = 32;
/// A process's executable path is cut to this many characters.
pub const MAX_EXE_CHARS: usize = 512;
/// A process's command line keeps at most this many arguments…
pub const MAX_CMDLINE_ARGS: usize = 64;
/// …and at most this many characters over all of them (later arguments are cut, then dropped).
pub const MAX_CMDLINE_CHARS: usize = 1024;

/// Conventional `detail` keys that the store reads to keep the sessions table.
pub mod detail_keys {
    /// `session_start`: the command, a string or an array of strings.
    pub const COMMAND: &str = "command";
    /// `session_end`: the exit status, an integer.
    pub const EXIT_STATUS: &str = "exit_status";
    /// `session_end`: which limit ended the session (`timeout`, `memory`, a rule name…), a string.
    pub const LIMIT_HIT: &str = "limit_hit";
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    SessionStart,
    SessionEnd,
    DnsQuery,
    Connection,
    HttpRequest,
    Blocked,
    BudgetExhausted,
    /// Raised by detection rules (issue 4); the rule goes in `rule`, the evidence in `detail`.
    Alert,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::SessionStart,
        EventKind::SessionEnd,
        EventKind::DnsQuery,
        EventKind::Connection,
        EventKind::HttpRequest,
        EventKind::Blocked,
        EventKind::BudgetExhausted,
        EventKind::Alert,
    ];

    /// The stable name, as stored and exported.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::SessionStart => "session_start",
            EventKind::SessionEnd => "session_end",
            EventKind::DnsQuery => "dns_query",
            EventKind::Connection => "connection",
            EventKind::HttpRequest => "http_request",
            EventKind::Blocked => "blocked",
            EventKind::BudgetExhausted => "budget_exhausted",
            EventKind::Alert => "alert",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of [`EventKind::ALL`] or [`Verdict::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {name:?} (expected one of: {expected})")]
pub struct UnknownName {
    pub what: &'static str,
    pub name: String,
    pub expected: String,
}

impl FromStr for EventKind {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "event kind",
                name: s.to_owned(),
                expected: EventKind::ALL.map(EventKind::as_str).join(", "),
            })
    }
}

/// What the policy decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Allow,
    Block,
    /// Shadow mode: allowed, but enforcement would have blocked it.
    ReportWouldBlock,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Allow, Verdict::Block, Verdict::ReportWouldBlock];

    /// The stable name, as stored and exported.
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Block => "block",
            Verdict::ReportWouldBlock => "report-would-block",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Verdict {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Verdict::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "verdict",
                name: s.to_owned(),
                expected: Verdict::ALL.map(Verdict::as_str).join(", "),
            })
    }
}

/// Who and what caused events: fixed for a whole session.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attribution {
    pub session_id: String,
    pub user_id: String,
    /// SHA-256 of the code, lower-case hex.
    pub code_sha256: String,
}

impl Attribution {
    /// A new event of `kind` attributed to this session, stamped now.
    pub fn event(&self, kind: EventKind) -> Event {
        Event::new(
            kind,
            self.session_id.clone(),
            self.user_id.clone(),
            self.code_sha256.clone(),
        )
    }

    /// A `session_start` event whose detail holds the command plus `extra` (policy summary,
    /// layers applied, …).
    pub fn session_start(
        &self,
        command: &[String],
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Event {
        let mut detail = extra;
        detail.insert(detail_keys::COMMAND.to_owned(), serde_json::json!(command));
        let mut event = self.event(EventKind::SessionStart);
        event.detail = serde_json::Value::Object(detail);
        event
    }

    /// A `session_end` event whose detail holds the exit status, the limit that ended the session
    /// if any, plus `extra`.
    pub fn session_end(
        &self,
        exit_status: Option<i64>,
        limit_hit: Option<&str>,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Event {
        let mut detail = extra;
        detail.insert(
            detail_keys::EXIT_STATUS.to_owned(),
            serde_json::json!(exit_status),
        );
        detail.insert(
            detail_keys::LIMIT_HIT.to_owned(),
            serde_json::json!(limit_hit),
        );
        let mut event = self.event(EventKind::SessionEnd);
        event.detail = serde_json::Value::Object(detail);
        event
    }
}

/// One audited event, as the gateway and the supervisor record it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub session_id: String,
    pub user_id: String,
    /// SHA-256 of the code, lower-case hex.
    pub code_sha256: String,
    pub ts: Timestamp,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub ip: Option<IpAddr>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub method: Option<String>,
    /// Cut to [`MAX_PATH_CHARS`] characters when stored.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub bytes_up: Option<u64>,
    #[serde(default)]
    pub bytes_down: Option<u64>,
    #[serde(default)]
    pub duration_ms: Option<u64>,
    #[serde(default)]
    pub verdict: Option<Verdict>,
    /// The policy rule that decided, as text (`allow api.github.com:443`, `ssrf: private range`).
    #[serde(default)]
    pub rule: Option<String>,
    /// The human-readable reason (what the agent saw in `X-Cordon-Reason`).
    #[serde(default)]
    pub reason: Option<String>,
    /// Anything else, as JSON (`null` when there is nothing). See [`detail_keys`].
    #[serde(default)]
    pub detail: serde_json::Value,
    /// The sandbox process that made the network request, found by the supervisor from the
    /// socket's owner (never from anything the sandboxed code says); `None` for events that are
    /// not network events, for standalone-gateway events, and when the owner was gone before it
    /// could be found. See [`ProcessInfo`].
    #[serde(default)]
    pub process: Option<ProcessInfo>,
}

/// A sandbox process, as the supervisor saw it in `/proc` when the connection (or DNS query)
/// arrived.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Its pid inside the sandbox's pid namespace (what `ps` in the sandbox shows).
    pub pid: u32,
    /// The executable the kernel ran (`/proc/PID/exe`), as a path inside the sandbox; the
    /// process cannot change it by rewriting `argv[0]` or `prctl(PR_SET_NAME)`. Cut to
    /// [`MAX_EXE_CHARS`] characters.
    pub exe: String,
    /// Its command line (`/proc/PID/cmdline`): what the process says about itself, so it can
    /// lie; bounded by [`MAX_CMDLINE_ARGS`] and [`MAX_CMDLINE_CHARS`].
    pub cmdline: Vec<String>,
}

impl ProcessInfo {
    /// The same process with the length bounds applied.
    pub fn bounded(mut self) -> Self {
        self.exe = cut_chars(&self.exe, MAX_EXE_CHARS).to_owned();
        let mut left = MAX_CMDLINE_CHARS;
        let mut args = Vec::with_capacity(self.cmdline.len().min(MAX_CMDLINE_ARGS));
        for arg in self.cmdline.into_iter().take(MAX_CMDLINE_ARGS) {
            if left == 0 {
                break;
            }
            let cut = cut_chars(&arg, left);
            left -= cut.chars().count();
            args.push(cut.to_owned());
        }
        self.cmdline = args;
        self
    }

    /// The command line as one line: arguments joined by spaces, quoted where needed.
    pub fn command_line(&self) -> String {
        self.cmdline
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `s` as a shell word: as is when it is plain, otherwise single-quoted.
pub(crate) fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

impl Event {
    /// A new event with only its attribution, stamped now.
    pub fn new(
        kind: EventKind,
        session_id: impl Into<String>,
        user_id: impl Into<String>,
        code_sha256: impl Into<String>,
    ) -> Self {
        Event {
            kind,
            session_id: session_id.into(),
            user_id: user_id.into(),
            code_sha256: code_sha256.into(),
            ts: Timestamp::now(),
            host: None,
            ip: None,
            port: None,
            method: None,
            path: None,
            bytes_up: None,
            bytes_down: None,
            duration_ms: None,
            verdict: None,
            rule: None,
            reason: None,
            detail: serde_json::Value::Null,
            process: None,
        }
    }

    /// Whether this event counts as blocked: the verdict was `block`, or the event is itself a
    /// `blocked` / `budget_exhausted` record. The store's SQL filter is the same predicate
    /// ([`crate::query`] tests pin the two together).
    pub fn is_blocked(&self) -> bool {
        self.verdict == Some(Verdict::Block)
            || matches!(self.kind, EventKind::Blocked | EventKind::BudgetExhausted)
    }

    /// The event as the store keeps it: the length cuts applied.
    pub fn bounded(mut self) -> Self {
        self.host = self.host.map(|h| cut_chars(&h, MAX_HOST_CHARS).to_owned());
        self.method = self
            .method
            .map(|m| cut_chars(&m, MAX_METHOD_CHARS).to_owned());
        self.path = self.path.map(|p| truncate_path(&p).to_owned());
        self.process = self.process.map(ProcessInfo::bounded);
        self
    }
}

/// A stored event: the event plus its place in the store and the hash chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Global sequence number: position in the hash chain, unique across all sessions and
    /// writer processes, starting at 1.
    pub id: i64,
    /// Position within the session, starting at 1.
    pub session_seq: i64,
    #[serde(flatten)]
    pub event: Event,
    /// Hash of the record before this one (64 zeros for the first record ever written).
    pub prev_hash: String,
    /// SHA-256 over `prev_hash`, this record's fields and `id` (see [`crate::chain`]).
    pub hash: String,
}

/// `path` cut to at most [`MAX_PATH_CHARS`] characters, on a character boundary.
pub fn truncate_path(path: &str) -> &str {
    cut_chars(path, MAX_PATH_CHARS)
}

/// The longest prefix of `s` with at most `max` characters.
pub(crate) fn cut_chars(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((byte_index, _)) => &s[..byte_index],
        None => s,
    }
}

/// Lower-case hex SHA-256 of `bytes`: how callers fill `code_sha256`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0x0f)]);
    }
    // Only ASCII hex digits were written.
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_multibyte_path_is_cut_at_100_characters_on_a_char_boundary() {
        // 99 ASCII characters, then 3-byte and 4-byte characters straddling the limit.
        let path = format!("/{}€𝄞tail", "a".repeat(98));
        let cut = truncate_path(&path);
        assert_eq!(cut.chars().count(), 100);
        assert!(cut.ends_with('€'));
        assert_eq!(cut.len(), 99 + '€'.len_utf8());
        let all_emoji = "𝄞".repeat(150);
        assert_eq!(truncate_path(&all_emoji), "𝄞".repeat(100));
        assert_eq!(truncate_path("/short"), "/short");
    }

    #[test]
    fn bounded_applies_every_cut() {
        let mut e = Event::new(EventKind::HttpRequest, "s", "u", "c");
        e.path = Some("é".repeat(300));
        e.host = Some("h".repeat(1000));
        e.method = Some("M".repeat(1000));
        let e = e.bounded();
        assert_eq!(e.path.unwrap().chars().count(), MAX_PATH_CHARS);
        assert_eq!(e.host.unwrap().len(), MAX_HOST_CHARS);
        assert_eq!(e.method.unwrap().len(), MAX_METHOD_CHARS);
    }

    #[test]
    fn kinds_and_verdicts_round_trip_through_their_names() {
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>().unwrap(), k);
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
        for v in Verdict::ALL {
            assert_eq!(v.as_str().parse::<Verdict>().unwrap(), v);
            assert_eq!(
                serde_json::to_string(&v).unwrap(),
                format!("\"{}\"", v.as_str())
            );
        }
        assert!("exfiltrate".parse::<EventKind>().is_err());
        assert!("maybe".parse::<Verdict>().is_err());
    }

    #[test]
    fn sha256_hex_matches_a_known_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn absent_fields_serialize_as_null_so_keys_are_stable() {
        let e = Event::new(EventKind::DnsQuery, "s", "u", "c");
        let v = serde_json::to_value(&e).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for key in [
            "kind",
            "session_id",
            "user_id",
            "code_sha256",
            "ts",
            "host",
            "ip",
            "port",
            "method",
            "path",
            "bytes_up",
            "bytes_down",
            "duration_ms",
            "verdict",
            "rule",
            "reason",
            "detail",
            "process",
        ] {
            assert!(keys.contains(&key), "missing key {key}");
        }
        assert!(v["host"].is_null());
    }

    #[test]
    fn a_long_command_line_is_bounded_in_arguments_and_characters() {
        let p = ProcessInfo {
            pid: 7,
            exe: "x".repeat(2000),
            cmdline: vec!["a".repeat(600), "b".repeat(600), "c".into()],
        }
        .bounded();
        assert_eq!(p.exe.len(), MAX_EXE_CHARS);
        assert_eq!(p.cmdline.len(), 2);
        assert_eq!(p.cmdline[1].len(), MAX_CMDLINE_CHARS - 600);
        let many = ProcessInfo {
            pid: 7,
            exe: "/bin/sh".into(),
            cmdline: vec!["x".into(); 1000],
        }
        .bounded();
        assert_eq!(many.cmdline.len(), MAX_CMDLINE_ARGS);
        assert_eq!(
            ProcessInfo {
                pid: 1,
                exe: "/usr/bin/python3".into(),
                cmdline: vec!["python3".into(), "-c".into(), "print('hi')".into()],
            }
            .command_line(),
            "python3 -c 'print('\\''hi'\\'')'"
        );
    }

    proptest! {
        #[test]
        fn truncation_is_a_prefix_on_a_char_boundary(s in "\\PC{0,300}") {
            let cut = truncate_path(&s);
            prop_assert!(s.starts_with(cut));
            prop_assert_eq!(cut.chars().count(), s.chars().count().min(MAX_PATH_CHARS));
        }
    }
}
