//! Plain-text tables for people (`cordon audit sessions`, `cordon audit events`).
//!
//! Guarantees:
//! - Fixed columns; long values (host, path, command, reason) are cut with `…` so a row stays
//!   one line. Widths count characters (wide CJK characters can still shift a row).
//! - Nothing the sandboxed code controls can drive the terminal: control characters (escape
//!   sequences, carriage returns, newlines) and bidirectional-override characters are replaced
//!   with `?` before a value is printed. The store and the JSON export keep the raw values.
//! - Times are UTC.

use std::fmt::Write as _;

use crate::event::EventRecord;
use crate::query::SessionSummary;
use crate::timestamp::Timestamp;
use crate::verify::VerifyReport;

/// `s` with every character that could control a terminal or reorder text replaced by `?`.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// `s` sanitised and cut to at most `width` characters, ending in `…` when cut.
pub fn cut(s: &str, width: usize) -> String {
    let clean = sanitize(s);
    if clean.chars().count() <= width {
        return clean;
    }
    let mut out: String = clean.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A byte count in IEC units: `0`, `512`, `1.5K`, `3.2M`, `1.0G`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["K", "M", "G", "T", "P", "E"];
    if n < 1024 {
        return n.to_string();
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// A duration in milliseconds, compactly: `850ms`, `12.3s`, `4m05s`, `2h03m`, `3d04h`.
pub fn human_duration(ms: i64) -> String {
    if ms < 0 {
        return "-".to_owned();
    }
    let s = ms / 1000;
    match ms {
        0..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..=86_399_999 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86_400, s / 3600 % 24),
    }
}

/// `2025-01-31 12:00:00` (UTC), to the second.
fn time_to_second(t: Timestamp) -> String {
    let full = t.to_rfc3339();
    full.get(..19).unwrap_or(&full).replacen('T', " ", 1)
}

/// `2025-01-31 12:00:00.123` (UTC), to the millisecond.
fn time_to_milli(t: Timestamp) -> String {
    let full = t.to_rfc3339();
    full.get(..23).unwrap_or(&full).replacen('T', " ", 1)
}

struct Column {
    title: &'static str,
    width: usize,
    right: bool,
}

const fn left(title: &'static str, width: usize) -> Column {
    Column {
        title,
        width,
        right: false,
    }
}

const fn right(title: &'static str, width: usize) -> Column {
    Column {
        title,
        width,
        right: true,
    }
}

/// One line: every cell cut to its column, padded, the last one left unpadded.
fn line(columns: &[Column], cells: &[String]) -> String {
    let mut out = String::new();
    for (i, (col, cell)) in columns.iter().zip(cells).enumerate() {
        let cell = cut(cell, col.width);
        let last = i + 1 == columns.len();
        if i > 0 {
            out.push_str("  ");
        }
        let width = col.width;
        // Writing to a String cannot fail.
        let _ = match (col.right, last) {
            (true, _) => write!(out, "{cell:>width$}"),
            (false, true) => write!(out, "{cell}"),
            (false, false) => write!(out, "{cell:<width$}"),
        };
    }
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

const SESSION_COLUMNS: [Column; 10] = [
    left("SESSION", 26),
    left("USER", 12),
    left("STARTED (UTC)", 19),
    right("DURATION", 8),
    right("EVENTS", 6),
    right("BLOCKED", 7),
    right("UP", 6),
    right("DOWN", 6),
    left("EXIT", 12),
    left("COMMAND", 48),
];

/// The header line of [`sessions_table`].
pub fn sessions_header() -> String {
    let titles: Vec<String> = SESSION_COLUMNS.iter().map(|c| c.title.to_owned()).collect();
    line(&SESSION_COLUMNS, &titles)
}

/// One session as a table row (ending in a newline).
pub fn session_row(s: &SessionSummary) -> String {
    let duration = match s.ended {
        Some(end) => human_duration(end.as_millis() - s.started.as_millis()),
        None => "-".to_owned(),
    };
    let exit = match (s.exit_status, &s.limit_hit) {
        (Some(code), Some(limit)) => format!("{code} {limit}"),
        (Some(code), None) => code.to_string(),
        (None, Some(limit)) => limit.clone(),
        (None, None) if s.ended.is_none() => "running?".to_owned(),
        (None, None) => "-".to_owned(),
    };
    line(
        &SESSION_COLUMNS,
        &[
            s.id.clone(),
            s.user_id.clone(),
            time_to_second(s.started),
            duration,
            s.events.to_string(),
            s.blocked.to_string(),
            human_bytes(s.bytes_up),
            human_bytes(s.bytes_down),
            exit,
            s.command.clone().unwrap_or_default(),
        ],
    )
}

/// Sessions as a table: a header line, then one line per session.
pub fn sessions_table(sessions: &[SessionSummary]) -> String {
    let mut out = sessions_header();
    for s in sessions {
        out.push_str(&session_row(s));
    }
    out
}

const EVENT_COLUMNS: [Column; 11] = [
    left("TIME (UTC)", 23),
    right("SEQ", 5),
    left("KIND", 16),
    left("VERDICT", 18),
    left("DESTINATION", 36),
    left("METHOD", 7),
    left("PATH", 32),
    right("UP", 6),
    right("DOWN", 6),
    left("PROCESS", 32),
    left("RULE / REASON", 60),
];

/// The header line of [`events_table`]; with `with_session`, a SESSION column comes first.
pub fn events_header(with_session: bool) -> String {
    let mut titles: Vec<String> = EVENT_COLUMNS.iter().map(|c| c.title.to_owned()).collect();
    if with_session {
        titles.insert(0, "SESSION".to_owned());
        return line(&event_columns_with_session(), &titles);
    }
    line(&EVENT_COLUMNS, &titles)
}

fn event_columns_with_session() -> Vec<Column> {
    let mut cols = vec![left("SESSION", 26)];
    cols.extend(EVENT_COLUMNS.iter().map(|c| Column {
        title: c.title,
        width: c.width,
        right: c.right,
    }));
    cols
}

/// `host:port (ip)`, `host:port`, or `ip:port` (IPv6 in brackets), from whatever is known.
fn destination(r: &EventRecord) -> String {
    let e = &r.event;
    let ip = e.ip.map(|ip| ip.to_string());
    let name = e.host.clone().or_else(|| match (e.ip, e.port) {
        (Some(std::net::IpAddr::V6(v6)), Some(_)) => Some(format!("[{v6}]")),
        (Some(ip), _) => Some(ip.to_string()),
        (None, _) => None,
    });
    let mut out = match (name, e.port) {
        (Some(name), Some(port)) => format!("{name}:{port}"),
        (Some(name), None) => name,
        (None, Some(port)) => format!(":{port}"),
        (None, None) => String::new(),
    };
    if let (Some(host), Some(ip)) = (&e.host, &ip) {
        if host != ip {
            out.push_str(&format!(" ({ip})"));
        }
    }
    out
}

/// `PID EXE ARGS…`: the pid in the sandbox, the executable's file name (what the kernel ran,
/// whatever `argv[0]` says), then the arguments after `argv[0]`.
pub fn process_cell(p: &crate::event::ProcessInfo) -> String {
    let exe = p.exe.rsplit('/').next().unwrap_or(&p.exe);
    let exe = if exe.is_empty() { "?" } else { exe };
    let mut out = format!("{} {exe}", p.pid);
    for arg in p.cmdline.iter().skip(1) {
        out.push(' ');
        out.push_str(&crate::event::shell_quote(arg));
    }
    out
}

/// One event as a table row (ending in a newline).
pub fn event_row(r: &EventRecord, with_session: bool) -> String {
    let e = &r.event;
    let opt_bytes = |n: Option<u64>| n.map(human_bytes).unwrap_or_default();
    let rule_reason = match (&e.rule, &e.reason) {
        (Some(rule), Some(reason)) => format!("{rule}: {reason}"),
        (Some(only), None) | (None, Some(only)) => only.clone(),
        (None, None) => String::new(),
    };
    let mut cells = vec![
        time_to_milli(e.ts),
        r.session_seq.to_string(),
        e.kind.as_str().to_owned(),
        e.verdict.map(|v| v.as_str().to_owned()).unwrap_or_default(),
        destination(r),
        e.method.clone().unwrap_or_default(),
        e.path.clone().unwrap_or_default(),
        opt_bytes(e.bytes_up),
        opt_bytes(e.bytes_down),
        e.process.as_ref().map(process_cell).unwrap_or_default(),
        rule_reason,
    ];
    if with_session {
        cells.insert(0, e.session_id.clone());
        return line(&event_columns_with_session(), &cells);
    }
    line(&EVENT_COLUMNS, &cells)
}

/// Events as a table: a header line, then one line per event.
pub fn events_table(events: &[EventRecord], with_session: bool) -> String {
    let mut out = events_header(with_session);
    for r in events {
        out.push_str(&event_row(r, with_session));
    }
    out
}

const HOST_COLUMNS: [Column; 7] = [
    left("  ALLOWED DESTINATION", 40),
    right("CONNS", 6),
    right("REQUESTS", 8),
    right("UP", 7),
    right("DOWN", 7),
    right("SESSIONS", 8),
    left("RULE", 40),
];

const BLOCKED_COLUMNS: [Column; 5] = [
    left("  BLOCKED DESTINATION", 40),
    right("ATTEMPTS", 8),
    right("SESSIONS", 8),
    left("LAST SEEN (UTC)", 19),
    left("LAST REASON", 60),
];

const TERMINATED_COLUMNS: [Column; 5] = [
    left("  SESSION", 28),
    left("USER", 12),
    left("ENDED (UTC)", 19),
    right("EXIT", 4),
    left("REASON", 80),
];

fn titles(columns: &[Column]) -> Vec<String> {
    columns.iter().map(|c| c.title.to_owned()).collect()
}

/// What `cordon audit report` prints: per user and policy the allowed destinations used and the
/// allowlist entries nothing used, then the top blocked destinations, then terminated sessions.
pub fn report_text(r: &crate::report::Report) -> String {
    let window = match (r.since, r.until) {
        (Some(s), Some(u)) => format!("{} to {}", time_to_second(s), time_to_second(u)),
        (Some(s), None) => format!("since {}", time_to_second(s)),
        (None, Some(u)) => format!("until {}", time_to_second(u)),
        (None, None) => "all time".to_owned(),
    };
    let mut out = format!(
        "audit report, {window} (UTC): {} sessions, {} events
",
        r.sessions, r.events
    );
    for g in &r.usage {
        let policy = g
            .policy_sha256
            .as_deref()
            .map(|p| cut(p, 12))
            .unwrap_or_else(|| "(not recorded)".to_owned());
        out.push_str(&format!(
            "
user {}, policy {policy}: {} session(s)
",
            sanitize(&g.user_id),
            g.sessions
        ));
        if g.hosts.is_empty() {
            out.push_str(
                "  no allowed connection or request
",
            );
        } else {
            out.push_str(&line(&HOST_COLUMNS, &titles(&HOST_COLUMNS)));
            for h in &g.hosts {
                out.push_str(&line(
                    &HOST_COLUMNS,
                    &[
                        format!("  {}", h.destination),
                        h.connections.to_string(),
                        h.requests.to_string(),
                        human_bytes(h.bytes_up),
                        human_bytes(h.bytes_down),
                        h.sessions.to_string(),
                        h.rules.join(", "),
                    ],
                ));
            }
        }
        if !g.unused_allow.is_empty() {
            let unused: Vec<String> = g.unused_allow.iter().map(|e| sanitize(e)).collect();
            out.push_str(&format!(
                "  never used (candidates to remove): {}
",
                unused.join(", ")
            ));
        }
    }
    out.push_str(&format!(
        "
top blocked destinations ({} distinct)
",
        r.blocked_destinations
    ));
    if r.top_blocked.is_empty() {
        out.push_str(
            "  none
",
        );
    } else {
        out.push_str(&line(&BLOCKED_COLUMNS, &titles(&BLOCKED_COLUMNS)));
        for b in &r.top_blocked {
            out.push_str(&line(
                &BLOCKED_COLUMNS,
                &[
                    format!("  {}", b.destination),
                    b.attempts.to_string(),
                    b.sessions.to_string(),
                    time_to_second(b.last_seen),
                    b.last_reason.clone().unwrap_or_default(),
                ],
            ));
        }
    }
    out.push_str(&format!(
        "
sessions terminated ({})
",
        r.terminated.len()
    ));
    if r.terminated.is_empty() {
        out.push_str(
            "  none
",
        );
    } else {
        out.push_str(&line(&TERMINATED_COLUMNS, &titles(&TERMINATED_COLUMNS)));
        for t in &r.terminated {
            out.push_str(&line(
                &TERMINATED_COLUMNS,
                &[
                    format!("  {}", t.session_id),
                    t.user_id.clone(),
                    time_to_second(t.ended),
                    t.exit_status.map(|c| c.to_string()).unwrap_or_default(),
                    t.reason.clone(),
                ],
            ));
        }
    }
    out
}

/// What `cordon audit verify` prints: one line when the chain is intact, the first bad record
/// and a count otherwise.
pub fn verify_summary(report: &VerifyReport) -> String {
    let anchor = report
        .anchor
        .as_ref()
        .map(|a| format!(", starting after prune anchor at record {}", a.seq))
        .unwrap_or_default();
    match &report.first_bad {
        None => format!(
            "ok: {} records verified{anchor}; chain head {} {}\n",
            report.checked, report.head.seq, report.head.hash
        ),
        Some((id, reason)) => format!(
            "FAILED: first bad record {id}: {}\n{} problem(s) in {} records{anchor}; chain head {} {}\n",
            sanitize(reason),
            report.bad_records,
            report.checked,
            report.head.seq,
            report.head.hash
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind, Verdict};

    fn record() -> EventRecord {
        let mut e = Event::new(EventKind::HttpRequest, "01JSESSION", "alice", "c0de");
        e.ts = Timestamp::from_millis(1_700_000_000_123);
        e.host = Some("api.github.com".into());
        e.ip = Some("198.18.0.7".parse().unwrap());
        e.port = Some(443);
        e.method = Some("GET".into());
        e.path = Some(format!("/repos/{}", "x".repeat(80)));
        e.bytes_up = Some(300);
        e.bytes_down = Some(5 * 1024 * 1024);
        e.verdict = Some(Verdict::Allow);
        e.rule = Some("allow api.github.com:443".into());
        EventRecord {
            id: 7,
            session_seq: 3,
            event: e,
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn escape_sequences_from_the_sandbox_never_reach_the_terminal() {
        assert_eq!(sanitize("a\x1b[2Jb\r\nc\u{202e}d"), "a?[2Jb??c?d");
        assert!(!event_row(
            &{
                let mut r = record();
                r.event.path = Some("/\x1b]0;owned\x07".into());
                r
            },
            false
        )
        .contains('\x1b'));
    }

    #[test]
    fn the_process_column_names_the_real_executable_then_the_arguments() {
        let mut r = record();
        r.event.process = Some(crate::event::ProcessInfo {
            pid: 42,
            exe: "/usr/bin/python3.11".into(),
            cmdline: vec!["sshd".into(), "injected.py".into(), "a b".into()],
        });
        let row = event_row(&r, false);
        let header = events_header(false);
        let col = header.find("PROCESS").unwrap();
        let at = row.find("42 python3.11 injected.py 'a b' ").unwrap();
        assert_eq!(row[..at].chars().count(), header[..col].chars().count());
        assert!(!row.contains("sshd"));
    }

    #[test]
    fn long_values_are_cut_with_an_ellipsis_to_the_column_width() {
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abcd", 4), "abcd");
        assert_eq!(cut("ééééé", 3), "éé…");
    }

    #[test]
    fn an_event_row_has_fixed_columns() {
        let header = events_header(false);
        let row = event_row(&record(), false);
        assert!(header.starts_with("TIME (UTC)"));
        assert!(row.starts_with("2023-11-14 22:13:20.123      3  http_request      allow"));
        assert!(row.contains("api.github.com:443 (198.18.0.7)"));
        assert!(row.contains(&format!("/repos/{}… ", "x".repeat(24))));
        assert!(row.contains("5.0M"));
        assert!(row.ends_with("allow api.github.com:443\n"));
        // Every column starts where the header says it does.
        let dest_col = header.find("DESTINATION").unwrap();
        assert_eq!(row.find("api.github.com").unwrap(), dest_col);
        let table = events_table(&[record(), record()], /*with_session*/ true);
        assert_eq!(table.lines().count(), 3);
        assert!(table.lines().nth(1).unwrap().starts_with("01JSESSION"));
    }

    #[test]
    fn a_session_row_shows_duration_counts_and_exit() {
        let s = SessionSummary {
            id: "01JSESSION".into(),
            user_id: "alice".into(),
            code_sha256: "c0de".into(),
            command: Some("python3 fetch.py".into()),
            started: Timestamp::from_millis(1_700_000_000_000),
            ended: Some(Timestamp::from_millis(1_700_000_062_000)),
            last_event: Timestamp::from_millis(1_700_000_062_000),
            exit_status: Some(137),
            limit_hit: Some("timeout".into()),
            events: 42,
            blocked: 3,
            would_block: 0,
            bytes_up: 1536,
            bytes_down: 0,
        };
        let table = sessions_table(&[s]);
        let row = table.lines().nth(1).unwrap();
        assert!(row.starts_with("01JSESSION"));
        for part in [
            "2023-11-14 22:13:20",
            "1m02s",
            "42",
            "3",
            "1.5K",
            "137 timeout",
            "python3 fetch.py",
        ] {
            assert!(row.contains(part), "{part} missing from {row}");
        }
    }

    #[test]
    fn byte_and_duration_units_are_compact() {
        assert_eq!(human_bytes(0), "0");
        assert_eq!(human_bytes(1023), "1023");
        assert_eq!(human_bytes(1024), "1.0K");
        assert_eq!(human_bytes(u64::MAX), "16.0E");
        assert_eq!(human_duration(850), "850ms");
        assert_eq!(human_duration(12_345), "12.3s");
        assert_eq!(human_duration(245_000), "4m05s");
        assert_eq!(human_duration(7_380_000), "2h03m");
        assert_eq!(human_duration(-5), "-");
    }
}
