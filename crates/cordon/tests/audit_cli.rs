//! `cordon audit` end to end: a store is built with the cordon-audit API in a temp dir, then the
//! real binary reads, exports, verifies, prunes and follows it.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cordon_audit::{
    Attribution, AuditWriter, Event, EventFilter, EventKind, EventRecord, Store, Timestamp, Verdict,
};
use serde_json::Value;

const ALPHA: &str = "01JTESTALPHA00000000000000";
const BETA: &str = "01JTESTBETA000000000000000";
const OLD: &str = "01JTESTOLD0000000000000000";
const DAY_MS: i64 = 86_400_000;

fn who(session: &str, user: &str) -> Attribution {
    Attribution {
        session_id: session.into(),
        user_id: user.into(),
        code_sha256: cordon_audit::sha256_hex(session.as_bytes()),
    }
}

fn event(who: &Attribution, kind: EventKind, fill: impl FnOnce(&mut Event)) -> Event {
    let mut e = who.event(kind);
    fill(&mut e);
    e
}

fn no_extra() -> serde_json::Map<String, Value> {
    serde_json::Map::new()
}

/// A store with three sessions, 13 records in all:
/// - OLD (carol, 100 days ago): start, an allowed connection, end — records 1..=3;
/// - ALPHA (alice, now): start, an allowed DNS query, an allowed connection with bytes, a
///   shadow-mode request, a blocked connect, end — records 4..=9;
/// - BETA (bob, now): start, a blocked connection, a blocked DNS query, end — records 10..=13.
fn build_store(dir: &Path) -> PathBuf {
    let path = dir.join("audit.db");
    let mut store = Store::open(&path).unwrap();

    let old = who(OLD, "carol");
    let long_ago = Timestamp::now().minus_millis(100 * DAY_MS);
    let mut old_events = vec![
        old.session_start(&["sh".into(), "old.sh".into()], no_extra()),
        event(&old, EventKind::Connection, |e| {
            e.host = Some("pypi.org".into());
            e.port = Some(443);
            e.verdict = Some(Verdict::Allow);
            e.rule = Some("allow pypi.org:443".into());
        }),
        old.session_end(Some(0), None, no_extra()),
    ];
    for e in &mut old_events {
        e.ts = long_ago;
    }
    store.append(&old_events).unwrap();

    let a = who(ALPHA, "alice");
    store
        .append(&[
            a.session_start(&["python3".into(), "fetch.py".into()], no_extra()),
            event(&a, EventKind::DnsQuery, |e| {
                e.host = Some("api.github.com".into());
                e.verdict = Some(Verdict::Allow);
                e.rule = Some("allow api.github.com:443".into());
            }),
            event(&a, EventKind::Connection, |e| {
                e.host = Some("api.github.com".into());
                e.ip = Some("140.82.112.5".parse().unwrap());
                e.port = Some(443);
                e.bytes_up = Some(100);
                e.bytes_down = Some(2048);
                e.duration_ms = Some(35);
                e.verdict = Some(Verdict::Allow);
                e.rule = Some("allow api.github.com:443".into());
                e.detail = serde_json::json!({"via": "connect"});
                e.process = Some(cordon_audit::ProcessInfo {
                    pid: 7,
                    exe: "/usr/bin/python3.11".into(),
                    cmdline: vec!["python3".into(), "fetch.py".into(), "a=b|c\\d".into()],
                });
            }),
            event(&a, EventKind::HttpRequest, |e| {
                e.host = Some("example.com".into());
                e.port = Some(80);
                e.method = Some("GET".into());
                e.path = Some("/shadow".into());
                e.verdict = Some(Verdict::ReportWouldBlock);
                e.reason = Some("host example.com is not in the allowlist".into());
            }),
            event(&a, EventKind::Blocked, |e| {
                e.ip = Some("1.2.3.4".parse().unwrap());
                e.port = Some(80);
                e.verdict = Some(Verdict::Block);
                e.reason = Some("address 1.2.3.4 is not in the allowlist".into());
            }),
            a.session_end(Some(0), None, no_extra()),
        ])
        .unwrap();

    let b = who(BETA, "bob");
    store
        .append(&[
            b.session_start(&["python3".into(), "injected.py".into()], no_extra()),
            event(&b, EventKind::Connection, |e| {
                e.host = Some("evil.test".into());
                e.port = Some(443);
                e.verdict = Some(Verdict::Block);
                e.reason = Some("host evil.test is not in the allowlist".into());
            }),
            event(&b, EventKind::DnsQuery, |e| {
                e.host = Some("c2VjcmV0.evil.test".into());
                e.verdict = Some(Verdict::Block);
                e.reason = Some("NXDOMAIN".into());
            }),
            b.session_end(Some(137), Some("timeout"), no_extra()),
        ])
        .unwrap();
    path
}

fn cordon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cordon"))
}

/// `cordon audit --audit PATH ARGS…`.
fn audit(path: &Path, args: &[&str]) -> Output {
    cordon()
        .arg("audit")
        .arg("--audit")
        .arg(path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "status {:?}, stderr: {}",
        o.status,
        stderr(o)
    );
    stdout(o)
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn records(text: &str) -> Vec<EventRecord> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn ids(records: &[EventRecord]) -> Vec<i64> {
    records.iter().map(|r| r.id).collect()
}

#[test]
fn sessions_lists_every_session_with_its_counts() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());

    let table = ok(&audit(&path, &["sessions"]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("SESSION"), "{table}");
    assert_eq!(lines.len(), 4, "{table}");
    let alpha = lines.iter().find(|l| l.starts_with(ALPHA)).expect(ALPHA);
    for part in ["alice", "python3 fetch.py", "2.0K"] {
        assert!(alpha.contains(part), "{part} missing from {alpha}");
    }
    let beta = lines.iter().find(|l| l.starts_with(BETA)).expect(BETA);
    for part in ["bob", "137 timeout", "python3 injected.py"] {
        assert!(beta.contains(part), "{part} missing from {beta}");
    }

    let json = json_lines(&ok(&audit(&path, &["sessions", "--json"])));
    assert_eq!(json.len(), 3);
    let by_id = |id: &str| json.iter().find(|s| s["id"] == id).unwrap().clone();
    let a = by_id(ALPHA);
    assert_eq!(
        (
            &a["user_id"],
            &a["events"],
            &a["blocked"],
            &a["would_block"],
            &a["bytes_up"],
            &a["bytes_down"],
            &a["exit_status"],
        ),
        (
            &Value::from("alice"),
            &Value::from(6),
            &Value::from(1),
            &Value::from(1),
            &Value::from(100),
            &Value::from(2048),
            &Value::from(0),
        )
    );
    let b = by_id(BETA);
    assert_eq!(
        (&b["events"], &b["blocked"]),
        (&Value::from(4), &Value::from(2))
    );
    assert_eq!(by_id(OLD)["events"], 3);
}

#[test]
fn sessions_filter_by_user_time_and_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());
    let ids_of = |args: &[&str]| -> Vec<String> {
        let mut full = vec!["sessions", "--json"];
        full.extend_from_slice(args);
        let mut ids: Vec<String> = json_lines(&ok(&audit(&path, &full)))
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids_of(&["--user", "bob"]), vec![BETA]);
    assert_eq!(ids_of(&["--since", "1h"]), vec![ALPHA, BETA]);
    assert_eq!(ids_of(&["--until", "1d"]), vec![OLD]);
    assert_eq!(ids_of(&["--limit", "0"]).len(), 3);

    let one = audit(&path, &["sessions", "--limit", "1"]);
    assert_eq!(ok(&one).lines().count(), 2, "header and one session");
    assert!(
        stderr(&one).contains("showing the 1 most recent sessions; --limit 0 lists all"),
        "{}",
        stderr(&one)
    );
    let none = ok(&audit(&path, &["sessions", "--user", "mallory"]));
    assert_eq!(none, "no sessions match\n");
}

#[test]
fn the_store_flag_is_accepted_after_the_subcommand_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());
    let out = cordon()
        .args(["audit", "sessions", "--json", "--audit"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(json_lines(&ok(&out)).len(), 3);
}

#[test]
fn events_of_a_session_by_unique_prefix_show_that_session_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());

    let table = ok(&audit(&path, &["events", "01JTESTA"]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with(&format!("session {ALPHA}  user alice  code ")),
        "{table}"
    );
    assert!(lines[0].ends_with("command python3 fetch.py"), "{table}");
    assert!(lines[1].starts_with("TIME (UTC)"), "{table}");
    assert_eq!(lines.len(), 2 + 6, "{table}");
    assert!(
        table.contains("api.github.com:443 (140.82.112.5)"),
        "{table}"
    );
    assert!(table.contains("1.2.3.4:80"), "{table}");
    assert!(table.contains("report-would-block"), "{table}");
    assert!(!table.contains("evil.test"), "{table}");

    let json = records(&ok(&audit(&path, &["events", "01JTESTA", "--json"])));
    assert_eq!(ids(&json), vec![4, 5, 6, 7, 8, 9]);
    assert!(json.iter().all(|r| r.event.session_id == ALPHA));
    let seqs: Vec<i64> = json.iter().map(|r| r.session_seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);

    // The full id works as well as a prefix.
    let full = records(&ok(&audit(&path, &["events", BETA, "--json"])));
    assert_eq!(ids(&full), vec![10, 11, 12, 13]);
}

#[test]
fn events_blocked_and_kind_filters_narrow_the_list() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());

    let blocked = records(&ok(&audit(
        &path,
        &["events", "01JTESTB", "--blocked", "--json"],
    )));
    assert_eq!(ids(&blocked), vec![11, 12]);
    assert!(blocked.iter().all(|r| r.event.is_blocked()));

    let alpha_blocked = records(&ok(&audit(
        &path,
        &["events", ALPHA, "--blocked", "--json"],
    )));
    assert_eq!(ids(&alpha_blocked), vec![8]);
    assert_eq!(alpha_blocked[0].event.kind, EventKind::Blocked);

    let dns = records(&ok(&audit(
        &path,
        &["events", ALPHA, "--kind", "dns_query", "--json"],
    )));
    assert_eq!(ids(&dns), vec![5]);

    let table = ok(&audit(&path, &["events", ALPHA, "--blocked"]));
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.contains("1.2.3.4:80"), "{table}");
    assert!(!table.contains("api.github.com"), "{table}");

    let none = ok(&audit(&path, &["events", OLD, "--blocked"]));
    assert!(none.ends_with("(no matching events)\n"), "{none}");
}

#[test]
fn export_round_trips_every_record_with_stable_field_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());
    let text = ok(&audit(&path, &["export"]));
    let exported = records(&text);
    let stored = Store::open_existing(&path)
        .unwrap()
        .events(&EventFilter::default())
        .unwrap();
    assert_eq!(exported.len(), 13);
    assert_eq!(exported, stored);

    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for key in [
        "id",
        "session_seq",
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
        "prev_hash",
        "hash",
    ] {
        assert!(first.get(key).is_some(), "key {key} missing from {first}");
    }
    // Every field of the event model is set in at least one exported record, so the equality
    // above covers each of them.
    let all: Vec<Value> = json_lines(&text);
    for key in first.as_object().unwrap().keys() {
        assert!(
            all.iter().any(|r| !r[key].is_null()),
            "no exported record sets {key}"
        );
    }
    assert_eq!(ok(&audit(&path, &["export", "--format", "jsonl"])), text);
}

#[test]
fn cef_export_writes_one_escaped_line_per_record_with_the_same_filters() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());
    let all = ok(&audit(&path, &["export", "--format", "cef"]));
    assert_eq!(all.lines().count(), 13);
    assert!(all.lines().all(|l| l.starts_with("CEF:0|cordon|cordon|")));
    let blocked = ok(&audit(
        &path,
        &["export", "--format", "cef", "--verdict", "block"],
    ));
    let ids: Vec<&str> = blocked
        .lines()
        .map(|l| {
            l.split(" externalId=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(ids, vec!["8", "11", "12"]);
    assert!(blocked.lines().all(|l| l.contains("|5|rt=")), "{blocked}");
    let attributed = ok(&audit(
        &path,
        &[
            "export",
            "--format",
            "cef",
            "--session",
            ALPHA,
            "--kind",
            "connection",
        ],
    ));
    assert_eq!(attributed.lines().count(), 1, "{attributed}");
    assert!(
        attributed.contains(r"spid=7 sproc=/usr/bin/python3.11 cs4Label=commandLine cs4=python3 fetch.py 'a\=b|c\\d'"),
        "{attributed}"
    );
    let since = ok(&audit(
        &path,
        &["export", "--format", "cef", "--until", "90d"],
    ));
    assert_eq!(since.lines().count(), 3);
}

#[test]
fn export_respects_since_until_session_user_and_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());
    let exported = |args: &[&str]| -> Vec<i64> {
        let mut full = vec!["export"];
        full.extend_from_slice(args);
        ids(&records(&ok(&audit(&path, &full))))
    };
    assert_eq!(exported(&["--since", "1h"]), (4..=13).collect::<Vec<_>>());
    assert_eq!(exported(&["--until", "90d"]), vec![1, 2, 3]);
    assert_eq!(exported(&["--session", "01JTESTB"]), vec![10, 11, 12, 13]);
    assert_eq!(exported(&["--user", "alice"]), (4..=9).collect::<Vec<_>>());
    assert_eq!(exported(&["--verdict", "report-would-block"]), vec![7]);
    assert_eq!(exported(&["--verdict", "block"]), vec![8, 11, 12]);
    assert_eq!(
        exported(&["--verdict", "allow", "--since", "1h", "--session", ALPHA]),
        vec![5, 6]
    );
    assert_eq!(exported(&["--kind", "session_end"]), vec![3, 9, 13]);
    assert_eq!(exported(&["--user", "mallory"]), Vec::<i64>::new());
}

#[test]
fn verify_passes_then_names_the_record_edited_in_the_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());
    let good = ok(&audit(&path, &["verify"]));
    assert!(
        good.starts_with("ok: 13 records verified; chain head 13 "),
        "{good}"
    );

    // An attacker hides where data went: the naive edit, straight into the database file.
    let raw = rusqlite::Connection::open(&path).unwrap();
    let changed = raw
        .execute(
            "UPDATE events SET host = 'innocent.example' WHERE id = 11",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(raw);

    let bad = audit(&path, &["verify"]);
    assert_eq!(bad.status.code(), Some(1), "{}", stderr(&bad));
    let text = stdout(&bad);
    assert!(
        text.starts_with("FAILED: first bad record 11: hash does not match the record's contents"),
        "{text}"
    );
    let json = audit(&path, &["verify", "--json"]);
    assert_eq!(json.status.code(), Some(1));
    let report: Value = serde_json::from_str(stdout(&json).trim()).unwrap();
    assert_eq!(report["first_bad"][0], 11);
    assert_eq!(report["checked"], 13);
}

#[test]
fn verify_catches_a_deleted_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute("DELETE FROM events WHERE id = 8", []).unwrap();
    drop(raw);
    let bad = audit(&path, &["verify"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stdout(&bad).starts_with("FAILED: first bad record 8: record 8 is missing (deleted)"),
        "{}",
        stdout(&bad)
    );
}

#[test]
fn verify_names_the_first_of_two_reordered_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());
    let raw = rusqlite::Connection::open(&path).unwrap();
    // Swap records 5 and 10 (an allowed connection moved after the blocked attempts).
    raw.execute_batch(
        "UPDATE events SET id = -1 WHERE id = 5;
         UPDATE events SET id = 5 WHERE id = 10;
         UPDATE events SET id = 10 WHERE id = -1;",
    )
    .unwrap();
    drop(raw);
    let bad = audit(&path, &["verify", "--json"]);
    assert_eq!(bad.status.code(), Some(1));
    let report: Value = serde_json::from_str(&stdout(&bad)).unwrap();
    assert_eq!(report["first_bad"][0], 5, "{report}");
    assert!(
        report["first_bad"][1]
            .as_str()
            .unwrap()
            .contains("reordered"),
        "{report}"
    );
    assert_eq!(report["checked"], 13);
}

#[test]
fn prune_drops_old_records_and_the_chain_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());

    let pruned = ok(&audit(&path, &["prune", "--older-than", "90d"]));
    assert!(
        pruned.starts_with("pruned 3 records older than "),
        "{pruned}"
    );
    assert!(pruned.contains("anchor record 3 "), "{pruned}");

    let verified = ok(&audit(&path, &["verify"]));
    assert!(
        verified.starts_with("ok: 10 records verified, starting after prune anchor at record 3"),
        "{verified}"
    );
    let remaining = ids(&records(&ok(&audit(&path, &["export"]))));
    assert_eq!(remaining, (4..=13).collect::<Vec<_>>());
    let sessions = ok(&audit(&path, &["sessions"]));
    assert!(!sessions.contains(OLD), "{sessions}");

    let again = ok(&audit(&path, &["prune", "--older-than", "90d", "--json"]));
    let report: Value = serde_json::from_str(again.trim()).unwrap();
    assert_eq!(report["deleted"], 0);
    assert!(report["anchor"].is_null());
    assert!(ok(&audit(&path, &["prune", "--older-than", "90d"])).starts_with("nothing older than "));
}

#[test]
fn prune_refuses_a_broken_chain_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute("UPDATE events SET rule = 'edited' WHERE id = 2", [])
        .unwrap();
    drop(raw);
    let out = audit(&path, &["prune", "--older-than", "90d"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("cordon: "), "{err}");
    assert!(
        err.contains("refusing to prune, the hash chain is broken at record 2"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let all = Store::open_existing(&path)
        .unwrap()
        .events(&EventFilter::default())
        .unwrap();
    assert_eq!(all.len(), 13);
}

#[test]
fn tail_prints_the_newest_events_of_all_sessions_or_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());
    let newest = records(&ok(&audit(&path, &["tail", "-n", "2", "--json"])));
    assert_eq!(ids(&newest), vec![12, 13]);
    let default = records(&ok(&audit(&path, &["tail", "--json"])));
    assert_eq!(ids(&default), (4..=13).collect::<Vec<_>>());
    let alpha = records(&ok(&audit(
        &path,
        &["tail", "--session", "01JTESTA", "-n", "3", "--json"],
    )));
    assert_eq!(ids(&alpha), vec![7, 8, 9]);

    let table = ok(&audit(&path, &["tail", "-n", "1"]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("SESSION"), "{table}");
    assert!(lines[1].starts_with(BETA), "{table}");
    assert_eq!(lines.len(), 2);
}

#[test]
fn a_session_whose_id_prefixes_another_means_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let mut store = Store::open(&path).unwrap();
    let short = who("01JPRE", "alice");
    let long = who("01JPREFIX", "bob");
    let host = |h: &str| {
        let h = h.to_owned();
        move |e: &mut Event| e.host = Some(h)
    };
    store
        .append(&[
            event(&short, EventKind::DnsQuery, host("short-1.example")),
            event(&short, EventKind::DnsQuery, host("short-2.example")),
            event(&short, EventKind::DnsQuery, host("short-3.example")),
            event(&long, EventKind::DnsQuery, host("long-1.example")),
            event(&long, EventKind::DnsQuery, host("long-2.example")),
        ])
        .unwrap();
    drop(store);

    let events = records(&ok(&audit(&path, &["events", "01JPRE", "--json"])));
    assert_eq!(ids(&events), vec![1, 2, 3]);
    let exported = records(&ok(&audit(&path, &["export", "--session", "01JPRE"])));
    assert_eq!(ids(&exported), vec![1, 2, 3]);
    // The other session's events are the newest: a plain LIMIT would return only them.
    let tail = records(&ok(&audit(
        &path,
        &["tail", "--session", "01JPRE", "-n", "2", "--json"],
    )));
    assert_eq!(ids(&tail), vec![2, 3]);
    // A prefix of both is ambiguous; the longer id is itself unique.
    expect_error(
        &path,
        &["events", "01JPR"],
        2,
        "\"01JPR\" matches several sessions",
    );
    let long_events = records(&ok(&audit(&path, &["events", "01JPREF", "--json"])));
    assert_eq!(ids(&long_events), vec![4, 5]);
}

/// A running `cordon audit … tail --follow`, killed by pid if the test fails.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Follower {
    fn start(path: &Path, args: &[&str]) -> Follower {
        let mut child = cordon()
            .arg("audit")
            .arg("--audit")
            .arg(path)
            .args(["tail", "--follow"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines }
    }

    /// The next line, within 10 s.
    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .expect("no line from tail --follow within 10 s")
    }

    /// Waits up to `limit` for the process to exit.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn interrupt(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
}

#[test]
fn tail_follow_prints_an_event_another_writer_appends_then_stops_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());
    let mut follower = Follower::start(&path, &["-n", "1", "--json"]);
    let first: EventRecord = serde_json::from_str(&follower.next_line()).unwrap();
    assert_eq!(first.id, 13);

    // Another process's writer would look the same to the store: a separate connection.
    let late = who("01JTESTLATE000000000000000", "dave");
    let writer = AuditWriter::open(&path).unwrap();
    writer.record(late.session_start(&["curl".into()], no_extra()));
    writer.record(event(&late, EventKind::Connection, |e| {
        e.host = Some("late.example".into());
        e.port = Some(443);
        e.verdict = Some(Verdict::Block);
    }));
    writer.close().unwrap();

    let start: EventRecord = serde_json::from_str(&follower.next_line()).unwrap();
    let conn: EventRecord = serde_json::from_str(&follower.next_line()).unwrap();
    assert_eq!((start.id, start.event.kind), (14, EventKind::SessionStart));
    assert_eq!(conn.id, 15);
    assert_eq!(conn.event.host.as_deref(), Some("late.example"));

    interrupt(&follower.child);
    let status = follower
        .wait_exit(Duration::from_secs(5))
        .expect("tail --follow still running 5 s after SIGINT");
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
    // Nothing more was printed, and nothing went wrong on the way out.
    assert!(follower
        .lines
        .recv_timeout(Duration::from_millis(200))
        .is_err());
    let mut err = String::new();
    follower
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(err, "");
}

#[test]
fn tail_follow_of_one_session_skips_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());
    let mut follower = Follower::start(&path, &["--session", "01JTESTA", "-n", "0"]);
    assert!(
        follower.next_line().starts_with("TIME (UTC)"),
        "header first"
    );

    let mut store = Store::open(&path).unwrap();
    let b = who(BETA, "bob");
    let a = who(ALPHA, "alice");
    store
        .append(&[event(&b, EventKind::Blocked, |e| {
            e.host = Some("beta-late.example".into());
        })])
        .unwrap();
    store
        .append(&[event(&a, EventKind::Blocked, |e| {
            e.host = Some("alpha-late.example".into());
        })])
        .unwrap();
    let row = follower.next_line();
    assert!(row.contains("alpha-late.example"), "{row}");
    // BETA's event has the lower id, so it would have come first had it not been filtered.
    assert!(follower
        .lines
        .recv_timeout(Duration::from_millis(600))
        .is_err());

    follower.child.kill().unwrap();
    follower.wait_exit(Duration::from_secs(5)).unwrap();
}

#[test]
fn tail_follow_ends_quietly_when_its_reader_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());
    let mut child = cordon()
        .arg("audit")
        .arg("--audit")
        .arg(&path)
        .args(["tail", "--follow", "-n", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut header = String::new();
    out.read_line(&mut header).unwrap();
    assert!(header.starts_with("SESSION"), "{header}");
    drop(out);
    // No new event arrives: it must notice the closed pipe while idle.
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tail --follow kept running after its reader closed the pipe");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(err, "");
}

#[test]
fn export_into_a_reader_that_closes_early_stops_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.db");
    let mut store = Store::open(&path).unwrap();
    let s = who("01JTESTBIG0000000000000000", "erin");
    // About 1.5 MB of JSON lines: far more than a pipe buffer holds.
    let events: Vec<Event> = (0..3000)
        .map(|i| {
            event(&s, EventKind::HttpRequest, |e| {
                e.host = Some("api.github.com".into());
                e.path = Some(format!("/repos/{i}/{}", "x".repeat(80)));
                e.verdict = Some(Verdict::Allow);
            })
        })
        .collect();
    store.append(&events).unwrap();
    drop(store);

    let mut child = cordon()
        .arg("audit")
        .arg("--audit")
        .arg(&path)
        .arg("export")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let first: EventRecord = serde_json::from_str(&line).unwrap();
    assert_eq!(first.id, 1);
    drop(out);
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{:?}", output.status);
    assert_eq!(stderr(&output), "", "no panic, no error");
}

/// Runs `args`, expects exactly one stderr line starting with `message` and `status`, nothing on
/// stdout.
fn expect_error(path: &Path, args: &[&str], status: i32, message: &str) {
    let out = audit(path, args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(status), "{args:?}: {err}");
    assert!(
        err.starts_with(&format!("cordon: {message}")),
        "{args:?}: {err}"
    );
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.ends_with('\n'));
    assert_eq!(stdout(&out), "", "{args:?}");
}

#[test]
fn every_bad_input_gets_one_line_and_the_documented_status() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_store(dir.path());
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["sessions", "--since", "yesterday"],
            2,
            "invalid --since \"yesterday\": expected an age (1h, 30m, 7d), an RFC 3339 timestamp or a date (2025-01-31)",
        ),
        (&["export", "--until", "2025-13-01"], 2, "invalid --until \"2025-13-01\""),
        (
            &["export", "--verdict", "maybe"],
            2,
            "invalid --verdict \"maybe\": expected one of allow, block, report-would-block",
        ),
        (&["events", ALPHA, "--kind", "exfil"], 2, "invalid --kind \"exfil\": expected one of "),
        (&["sessions", "--limit=-3"], 2, "invalid --limit \"-3\": expected a whole number"),
        (&["tail", "-n", "ten"], 2, "invalid --lines \"ten\": expected a whole number"),
        (
            &["export", "--format", "xml"],
            2,
            "invalid --format \"xml\": expected jsonl or cef",
        ),
        (&["prune"], 2, "--older-than is required (for example --older-than 90d)"),
        (
            &["prune", "--older-than", "90"],
            2,
            "invalid --older-than \"90\": expected a number and a unit",
        ),
        (
            &["events", "01JTEST"],
            2,
            "\"01JTEST\" matches several sessions (",
        ),
        (&["export", "--session", "01JTEST"], 2, "\"01JTEST\" matches several sessions ("),
        (
            &["events", "01JNOPE"],
            1,
            "no session matches \"01JNOPE\" (cordon audit sessions lists recent ones)",
        ),
        (&["export", "--session", "01JNOPE"], 1, "no session matches \"01JNOPE\""),
        (&["tail", "--session", "01JNOPE"], 1, "no session matches \"01JNOPE\""),
        // GLOB metacharacters are literal: `*` is not a wildcard.
        (&["events", "*"], 1, "no session matches \"*\""),
    ];
    for (args, status, message) in cases {
        expect_error(&path, args, *status, message);
    }
    // None of it changed the store.
    let report = Store::open_existing(&path).unwrap().verify().unwrap();
    assert!(report.is_ok());
    assert_eq!(report.checked, 13);
}

#[test]
fn a_missing_store_is_one_clear_line_and_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("never").join("audit.db");
    let message = format!(
        "no audit store at {} (nothing has been recorded yet; cordon run --allow ... records network events)",
        path.display()
    );
    for args in [
        &["sessions"][..],
        &["events", ALPHA],
        &["export"],
        &["verify"],
        &["prune", "--older-than", "90d"],
        &["tail"],
        &["tail", "--follow"],
    ] {
        expect_error(&path, args, 1, &message);
    }
    assert!(!path.exists());
    assert!(!path.parent().unwrap().exists());
}

/// A store for the review report: alice runs two sessions under policy P1 (api.github.com used
/// by a tunnel and a request, pypi.org only resolved, *.npmjs.org never touched) and one under
/// P2; bob's session under P1 is blocked three times and terminated; an old session of carol is
/// outside a 30-day window.
fn build_report_store(dir: &Path) -> PathBuf {
    let path = dir.join("audit.db");
    let mut store = Store::open(&path).unwrap();
    let start = |w: &Attribution, policy: &str, allow: &[&str]| {
        let mut extra = no_extra();
        extra.insert("policy_sha256".into(), serde_json::json!(policy));
        extra.insert("allow".into(), serde_json::json!(allow));
        w.session_start(&["python3".into(), "job.py".into()], extra)
    };
    let net = |w: &Attribution, kind: EventKind, host: &str, verdict: Verdict, rule: &str| {
        event(w, kind, |e| {
            e.host = Some(host.into());
            e.port = Some(443);
            e.verdict = Some(verdict);
            e.rule = Some(rule.into());
            e.bytes_up = Some(1000);
            e.bytes_down = Some(50_000);
            if verdict == Verdict::Block {
                e.reason = Some(format!("host {host} is not in the allowlist"));
            }
        })
    };
    let p1 = ["api.github.com:443", "pypi.org:443", "*.npmjs.org:443"];
    let old = who(OLD, "carol");
    let mut old_events = vec![
        start(&old, "P1", &p1),
        net(
            &old,
            EventKind::Connection,
            "registry.npmjs.org",
            Verdict::Allow,
            "*.npmjs.org:443",
        ),
    ];
    for e in &mut old_events {
        e.ts = Timestamp::now().minus_millis(100 * DAY_MS);
    }
    store.append(&old_events).unwrap();
    let a1 = who("01JREPORTA1000000000000000", "alice");
    let a2 = who("01JREPORTA2000000000000000", "alice");
    let a3 = who("01JREPORTA3000000000000000", "alice");
    let b = who("01JREPORTB1000000000000000", "bob");
    let mut end = b.session_end(Some(137), None, no_extra());
    end.detail["terminated"] =
        serde_json::json!("3 blocked network attempts (terminate_after_blocked = 3)");
    store
        .append(&[
            start(&a1, "P1", &p1),
            net(
                &a1,
                EventKind::Connection,
                "api.github.com",
                Verdict::Allow,
                "api.github.com:443",
            ),
            net(
                &a1,
                EventKind::DnsQuery,
                "pypi.org",
                Verdict::Allow,
                "pypi.org:443",
            ),
            start(&a2, "P1", &p1),
            net(
                &a2,
                EventKind::HttpRequest,
                "api.github.com",
                Verdict::Allow,
                "api.github.com:443",
            ),
            start(&a3, "P2", &["example.com:443"]),
            net(
                &a3,
                EventKind::HttpRequest,
                "example.com",
                Verdict::Allow,
                "example.com:443",
            ),
            start(&b, "P1", &p1),
            net(
                &b,
                EventKind::Blocked,
                "evil.test",
                Verdict::Block,
                "default-deny",
            ),
            net(
                &b,
                EventKind::Blocked,
                "evil.test",
                Verdict::Block,
                "default-deny",
            ),
            net(
                &b,
                EventKind::Blocked,
                "paste.test",
                Verdict::Block,
                "default-deny",
            ),
            end,
        ])
        .unwrap();
    path
}

#[test]
fn report_shows_usage_unused_entries_blocked_and_terminated_for_people() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_report_store(dir.path());
    let out = ok(&audit(&path, &["report"]));
    assert!(out.contains(": 4 sessions, 12 events"), "{out}");
    assert!(out.contains("user alice, policy P1: 2 session(s)"), "{out}");
    assert!(out.contains("user alice, policy P2: 1 session(s)"), "{out}");
    assert!(out.contains("user bob, policy P1: 1 session(s)"), "{out}");
    let github = out
        .lines()
        .find(|l| l.trim_start().starts_with("api.github.com:443"))
        .unwrap();
    let cells: Vec<&str> = github.split_whitespace().collect();
    assert_eq!(
        cells,
        vec![
            "api.github.com:443",
            "1",
            "1",
            "2.0K",
            "97.7K",
            "2",
            "api.github.com:443"
        ]
    );
    assert!(
        out.contains("never used (candidates to remove): *.npmjs.org:443, pypi.org:443"),
        "{out}"
    );
    let blocked = out
        .lines()
        .find(|l| l.trim_start().starts_with("evil.test:443"))
        .unwrap();
    assert!(
        blocked.contains("host evil.test is not in the allowlist"),
        "{blocked}"
    );
    assert_eq!(blocked.split_whitespace().nth(1), Some("2"));
    assert!(
        out.contains("top blocked destinations (2 distinct)"),
        "{out}"
    );
    assert!(out.contains("sessions terminated (1)"), "{out}");
    assert!(out.contains("3 blocked network attempts (terminate_after_blocked = 3)"));
    // carol's session is 100 days old: outside the default 30 days, inside --since 365d.
    assert!(!out.contains("carol"), "{out}");
    let year = ok(&audit(&path, &["report", "--since", "365d"]));
    assert!(
        year.contains("user carol, policy P1: 1 session(s)"),
        "{year}"
    );
}

#[test]
fn report_json_is_one_object_for_programs() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_report_store(dir.path());
    let out = ok(&audit(&path, &["report", "--json", "--top", "1"]));
    assert_eq!(out.lines().count(), 1);
    let r: cordon_audit::Report = serde_json::from_str(&out).unwrap();
    assert_eq!(r.sessions, 4);
    assert_eq!(r.blocked_destinations, 2);
    assert_eq!(r.top_blocked.len(), 1);
    assert_eq!(r.top_blocked[0].destination, "evil.test:443");
    assert_eq!(r.top_blocked[0].attempts, 2);
    let alice_p1 = r
        .usage
        .iter()
        .find(|g| g.user_id == "alice" && g.policy_sha256.as_deref() == Some("P1"))
        .unwrap();
    assert_eq!(alice_p1.hosts.len(), 1);
    assert_eq!(alice_p1.hosts[0].bytes_down, 100_000);
    assert_eq!(
        alice_p1.unused_allow,
        vec!["*.npmjs.org:443", "pypi.org:443"]
    );
    let bob = r.usage.iter().find(|g| g.user_id == "bob").unwrap();
    assert!(bob.hosts.is_empty());
    assert_eq!(bob.unused_allow.len(), 3);
    assert_eq!(r.terminated[0].user_id, "bob");
    assert_eq!(r.terminated[0].exit_status, Some(137));
    let empty = ok(&audit(&path, &["report", "--json", "--until", "365d"]));
    let none: cordon_audit::Report = serde_json::from_str(&empty).unwrap();
    assert_eq!((none.sessions, none.events), (0, 0));
}
