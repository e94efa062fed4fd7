//! Export formats for SIEMs: severity levels and CEF lines (JSON lines are in [`crate::query`]).
//!
//! Guarantees:
//! - [`severity`] is one function of the event, used by the CEF export and the syslog sink
//!   alike, so a SIEM sees the same level on either path.
//! - [`cef_line`] writes one ArcSight CEF (version 0) line per record, escaped as the CEF
//!   specification says: in the header `\` and `|` are backslash-escaped; in extension values
//!   `\` and `=` are backslash-escaped and a line feed or carriage return becomes `\n` / `\r`, so
//!   nothing the sandboxed code controls (a host, a path, a command line) can end the line, add
//!   a field or forge a key. Absent values are left out rather than written empty.
//! - Field mapping (CEF key: audit field): `rt` ts (epoch ms), `externalId` id, `suser` user_id,
//!   `cs1` session_id, `cn1` session_seq, `cs2` code_sha256, `dhost` host, `dst` IPv4 address or
//!   `c6a3` IPv6 address, `dpt` port, `requestMethod` method, `request` path, `out` bytes_up,
//!   `in` bytes_down, `cn2` duration_ms, `act` verdict, `cs3` rule, `reason` reason, `spid` /
//!   `sproc` the sandbox process's pid and executable, `cs4` its command line, `cs5` detail
//!   (JSON), `cs6` the record's hash. Every `csN`/`cnN`/`c6a3` has its `…Label`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::event::{Event, EventKind, EventRecord, UnknownName, Verdict};

/// How much an event matters, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Session starts and ends, allowed traffic.
    Info,
    /// Traffic the policy would have blocked (report mode); a session ended by a limit.
    Notice,
    /// A blocked attempt or an exhausted budget.
    Warning,
    /// An alert raised by a detection rule (the default for alerts).
    High,
    /// An alert whose rule says so (`detail.severity = "critical"`, e.g. a canary token).
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 5] = [
        Severity::Info,
        Severity::Notice,
        Severity::Warning,
        Severity::High,
        Severity::Critical,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Notice => "notice",
            Severity::Warning => "warning",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    /// The CEF severity (0–10).
    pub const fn cef(self) -> u8 {
        match self {
            Severity::Info => 1,
            Severity::Notice => 3,
            Severity::Warning => 5,
            Severity::High => 8,
            Severity::Critical => 10,
        }
    }

    /// The syslog severity (RFC 5424: 0 emergency … 7 debug).
    pub const fn syslog(self) -> u8 {
        match self {
            Severity::Info => 6,
            Severity::Notice => 5,
            Severity::Warning => 4,
            Severity::High => 2,
            Severity::Critical => 1,
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Severity {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Severity::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "severity",
                name: s.to_owned(),
                expected: Severity::ALL.map(Severity::as_str).join(", "),
            })
    }
}

/// The severity of `event` (see [`Severity`]). An alert may carry its own level in
/// `detail.severity` (`high` or `critical`; anything lower is raised to `high`: an alert is
/// never routine).
pub fn severity(event: &Event) -> Severity {
    match event.kind {
        EventKind::Alert => match event
            .detail
            .get("severity")
            .and_then(serde_json::Value::as_str)
        {
            Some("critical") => Severity::Critical,
            _ => Severity::High,
        },
        _ if event.is_blocked() => Severity::Warning,
        _ if event.verdict == Some(Verdict::ReportWouldBlock) => Severity::Notice,
        EventKind::SessionEnd
            if event
                .detail
                .get(crate::event::detail_keys::LIMIT_HIT)
                .is_some_and(|v| !v.is_null()) =>
        {
            Severity::Notice
        }
        _ => Severity::Info,
    }
}

/// A CEF header field: `\` and `|` escaped; line breaks (which no header field may hold) become
/// spaces.
pub fn cef_header_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '|' => out.push_str("\\|"),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A CEF extension value: `\`, `=`, line feed and carriage return escaped.
pub fn cef_value_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '=' => out.push_str("\\="),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// `record` as one CEF line, without the line break.
pub fn cef_line(record: &EventRecord) -> String {
    let e = &record.event;
    let sev = severity(e);
    let mut name = e.kind.as_str().to_owned();
    if let Some(v) = e.verdict {
        name.push(' ');
        name.push_str(v.as_str());
    }
    if e.kind == EventKind::Alert {
        if let Some(rule) = &e.rule {
            name.push(' ');
            name.push_str(rule);
        }
    }
    let mut out = format!(
        "CEF:0|cordon|cordon|{}|{}|{}|{}|",
        cef_header_escape(env!("CARGO_PKG_VERSION")),
        cef_header_escape(e.kind.as_str()),
        cef_header_escape(&name),
        sev.cef()
    );
    let mut ext = Extension(&mut out, true);
    ext.put("rt", &e.ts.as_millis().to_string());
    ext.put("externalId", &record.id.to_string());
    ext.put("suser", &e.user_id);
    ext.labelled("cs1", "sessionId", Some(&e.session_id));
    ext.labelled("cn1", "sessionSeq", Some(&record.session_seq.to_string()));
    ext.labelled("cs2", "codeSha256", Some(&e.code_sha256));
    ext.opt("dhost", e.host.as_deref());
    match e.ip {
        Some(IpAddr::V4(v4)) => ext.put("dst", &v4.to_string()),
        Some(IpAddr::V6(v6)) => ext.labelled("c6a3", "destinationIPv6", Some(&v6.to_string())),
        None => {}
    }
    ext.opt("dpt", e.port.map(|p| p.to_string()).as_deref());
    ext.opt("requestMethod", e.method.as_deref());
    ext.opt("request", e.path.as_deref());
    ext.opt("out", e.bytes_up.map(|n| n.to_string()).as_deref());
    ext.opt("in", e.bytes_down.map(|n| n.to_string()).as_deref());
    ext.labelled(
        "cn2",
        "durationMs",
        e.duration_ms.map(|n| n.to_string()).as_deref(),
    );
    ext.opt("act", e.verdict.map(Verdict::as_str));
    ext.labelled("cs3", "rule", e.rule.as_deref());
    ext.opt("reason", e.reason.as_deref());
    if let Some(p) = &e.process {
        ext.put("spid", &p.pid.to_string());
        ext.put("sproc", &p.exe);
        ext.labelled("cs4", "commandLine", Some(&p.command_line()));
    }
    let detail = match &e.detail {
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    };
    ext.labelled("cs5", "detail", detail.as_deref());
    ext.labelled("cs6", "hash", Some(&record.hash));
    out
}

/// Appends `key=value` pairs, space-separated.
struct Extension<'a>(&'a mut String, bool);

impl Extension<'_> {
    fn put(&mut self, key: &str, value: &str) {
        if !self.1 {
            self.0.push(' ');
        }
        self.1 = false;
        self.0.push_str(key);
        self.0.push('=');
        self.0.push_str(&cef_value_escape(value));
    }

    fn opt(&mut self, key: &str, value: Option<&str>) {
        if let Some(v) = value {
            self.put(key, v);
        }
    }

    fn labelled(&mut self, key: &str, label: &str, value: Option<&str>) {
        if let Some(v) = value {
            self.put(&format!("{key}Label"), label);
            self.put(key, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ProcessInfo;
    use crate::timestamp::Timestamp;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A CEF extension parser written from the specification: keys are `[A-Za-z0-9_]+`, a value
    /// runs to the next unescaped ` key=` or the end.
    fn parse_extension(ext: &str) -> BTreeMap<String, String> {
        let chars: Vec<char> = ext.chars().collect();
        let mut out = BTreeMap::new();
        let mut i = 0;
        while i < chars.len() {
            let key_start = i;
            while chars[i] != '=' {
                i += 1;
            }
            let key: String = chars[key_start..i].iter().collect();
            i += 1;
            let mut value = String::new();
            loop {
                if i >= chars.len() {
                    break;
                }
                match chars[i] {
                    '\\' => {
                        let next = chars[i + 1];
                        value.push(match next {
                            'n' => '\n',
                            'r' => '\r',
                            other => other,
                        });
                        i += 2;
                    }
                    ' ' if starts_key(&chars[i + 1..]) => {
                        i += 1;
                        break;
                    }
                    c => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
            out.insert(key, value);
        }
        out
    }

    fn starts_key(rest: &[char]) -> bool {
        let n = rest
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
            .count();
        n > 0 && rest.get(n) == Some(&'=')
    }

    /// Splits a CEF line into its 7 header fields (unescaped) and the extension.
    fn parse_line(line: &str) -> (Vec<String>, BTreeMap<String, String>) {
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while fields.len() < 7 {
            match chars.next() {
                Some('\\') => cur.push(chars.next().unwrap()),
                Some('|') => fields.push(std::mem::take(&mut cur)),
                Some(c) => cur.push(c),
                None => panic!("short header in {line}"),
            }
        }
        (fields, parse_extension(chars.as_str()))
    }

    fn record() -> EventRecord {
        let mut e = Event::new(EventKind::HttpRequest, "01JSESSION", "alice", "c0de");
        e.ts = Timestamp::from_millis(1_700_000_000_123);
        e.host = Some("api.github.com".into());
        e.ip = Some("198.18.0.7".parse().unwrap());
        e.port = Some(443);
        e.method = Some("GET".into());
        e.path = Some("/a=b\\c d\r\nsuser=root".into());
        e.bytes_up = Some(300);
        e.verdict = Some(Verdict::Allow);
        e.rule = Some("allow api.github.com:443".into());
        e.process = Some(ProcessInfo {
            pid: 12,
            exe: "/usr/bin/curl".into(),
            cmdline: vec!["curl".into(), "-d".into(), "x=1 y".into()],
        });
        e.detail = serde_json::json!({"via": "proxy"});
        EventRecord {
            id: 7,
            session_seq: 3,
            event: e,
            prev_hash: String::new(),
            hash: "ab".repeat(32),
        }
    }

    #[test]
    fn a_cef_line_has_the_documented_header_and_fields() {
        let line = cef_line(&record());
        assert!(
            line.starts_with(&format!(
                "CEF:0|cordon|cordon|{}|http_request|http_request allow|1|rt=1700000000123 externalId=7 suser=alice cs1Label=sessionId cs1=01JSESSION ",
                env!("CARGO_PKG_VERSION")
            )),
            "{line}"
        );
        assert!(!line.contains('\n') && !line.contains('\r'));
        let (header, ext) = parse_line(&line);
        assert_eq!(header.len(), 7);
        assert_eq!(ext["request"], "/a=b\\c d\r\nsuser=root");
        assert_eq!(ext["suser"], "alice");
        assert_eq!(ext["dst"], "198.18.0.7");
        assert_eq!(ext["dpt"], "443");
        assert_eq!(ext["act"], "allow");
        assert_eq!(ext["spid"], "12");
        assert_eq!(ext["sproc"], "/usr/bin/curl");
        assert_eq!(ext["cs4"], "curl -d 'x=1 y'");
        assert_eq!(ext["cs5"], r#"{"via":"proxy"}"#);
        assert_eq!(ext["cs6Label"], "hash");
        assert!(!ext.contains_key("in"), "absent values are left out");
    }

    #[test]
    fn an_ipv6_destination_goes_to_c6a3() {
        let mut r = record();
        r.event.ip = Some("2001:db8::7".parse().unwrap());
        let (_, ext) = parse_line(&cef_line(&r));
        assert_eq!(ext["c6a3"], "2001:db8::7");
        assert_eq!(ext["c6a3Label"], "destinationIPv6");
        assert!(!ext.contains_key("dst"));
    }

    #[test]
    fn header_fields_escape_pipes_and_backslashes() {
        assert_eq!(cef_header_escape(r"a|b\c"), r"a\|b\\c");
        assert_eq!(cef_header_escape("a\nb"), "a b");
        let mut r = record();
        r.event.kind = EventKind::Alert;
        r.event.rule = Some("dns|tunnel\\x".into());
        r.event.verdict = None;
        let line = cef_line(&r);
        assert!(line.contains(r"|alert dns\|tunnel\\x|8|"), "{line}");
        let (header, _) = parse_line(&line);
        assert_eq!(header[5], "alert dns|tunnel\\x");
    }

    #[test]
    fn extension_values_escape_exactly_the_specified_characters() {
        assert_eq!(cef_value_escape(r"a=b\c"), r"a\=b\\c");
        assert_eq!(cef_value_escape("l1\nl2\rl3"), r"l1\nl2\rl3");
        assert_eq!(cef_value_escape("a|b c"), "a|b c");
    }

    #[test]
    fn severities_follow_the_event() {
        let mut e = Event::new(EventKind::Connection, "s", "u", "c");
        e.verdict = Some(Verdict::Allow);
        assert_eq!(severity(&e), Severity::Info);
        e.verdict = Some(Verdict::ReportWouldBlock);
        assert_eq!(severity(&e), Severity::Notice);
        e.verdict = Some(Verdict::Block);
        assert_eq!(severity(&e), Severity::Warning);
        let mut a = Event::new(EventKind::Alert, "s", "u", "c");
        assert_eq!(severity(&a), Severity::High);
        a.detail = serde_json::json!({"severity": "critical"});
        assert_eq!(severity(&a), Severity::Critical);
        a.detail = serde_json::json!({"severity": "low"});
        assert_eq!(severity(&a), Severity::High);
        let end = session_end_by_limit();
        assert_eq!(severity(&end), Severity::Notice);
        assert!(Severity::Info < Severity::Critical);
        assert_eq!("warning".parse::<Severity>().unwrap(), Severity::Warning);
        assert!("loud".parse::<Severity>().is_err());
    }

    fn session_end_by_limit() -> Event {
        crate::event::Attribution {
            session_id: "s".into(),
            user_id: "u".into(),
            code_sha256: "c".into(),
        }
        .session_end(Some(137), Some("timeout"), serde_json::Map::new())
    }

    proptest! {
        #[test]
        fn any_value_survives_cef_escaping(path in "\\PC{0,40}|[=\\\\ \r\n|a-z]{0,40}", user in "[a-z=\\\\ ]{1,20}") {
            let mut r = record();
            r.event.path = Some(path.clone());
            r.event.user_id = user.clone();
            let line = cef_line(&r);
            prop_assert!(!line.contains('\n') && !line.contains('\r'));
            let (header, ext) = parse_line(&line);
            prop_assert_eq!(header.len(), 7);
            prop_assert_eq!(&ext["request"], &path);
            prop_assert_eq!(&ext["suser"], &user);
            prop_assert_eq!(&ext["cs1"], "01JSESSION");
        }
    }
}
