//! Helpers shared by the integration tests.
#![allow(dead_code)]
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use cordon_audit::{Event, EventFilter, EventKind, ProcessInfo, Store, Timestamp, Verdict};

/// Millisecond timestamp of 2023-11-14T22:13:20Z, a fixed base for deterministic events.
pub const BASE_MS: i64 = 1_700_000_000_000;

/// A varied, deterministic event: every kind and verdict, optional fields present or not,
/// multibyte text, JSON detail.
pub fn sample_event(session: &str, i: usize) -> Event {
    let kind = EventKind::ALL[i % EventKind::ALL.len()];
    let mut e = Event::new(kind, session, format!("user{}", i % 3), "ab".repeat(32));
    e.ts = Timestamp::from_millis(BASE_MS + i as i64 * 1000);
    if !i.is_multiple_of(4) {
        e.host = Some(format!("host{i}.example.com"));
        e.port = Some(443);
    }
    if i % 5 == 1 {
        e.ip = Some(if i.is_multiple_of(2) {
            "198.18.0.7".parse().unwrap()
        } else {
            "2001:db8::7".parse().unwrap()
        });
    }
    if kind == EventKind::HttpRequest {
        e.method = Some("GET".into());
        e.path = Some(format!("/déjà/vu/{i}?q=✓"));
    }
    e.bytes_up = i.is_multiple_of(2).then_some(i as u64 * 10);
    e.bytes_down = i.is_multiple_of(3).then_some(i as u64 * 1000);
    e.duration_ms = i.is_multiple_of(7).then_some(i as u64);
    e.verdict = match i % 4 {
        0 => None,
        1 => Some(Verdict::Allow),
        2 => Some(Verdict::Block),
        _ => Some(Verdict::ReportWouldBlock),
    };
    if e.verdict.is_some() {
        e.rule = Some(format!("allow host{i}.example.com:443"));
    }
    if e.verdict == Some(Verdict::Block) {
        e.reason = Some(format!("host host{i}.example.com is not in the allowlist"));
    }
    if i.is_multiple_of(6) {
        e.detail = serde_json::json!({"n": i, "nested": {"z": [1, 2, 3], "a": "ü"}});
    }
    if i % 3 == 1 {
        e.process = Some(ProcessInfo {
            pid: 10 + i as u32,
            exe: "/usr/bin/python3.11".into(),
            cmdline: vec![
                "python3".into(),
                "-c".into(),
                format!("print('{i}', \"ü\")"),
            ],
        });
    }
    e
}

pub fn sample_events(session: &str, n: usize) -> Vec<Event> {
    (0..n).map(|i| sample_event(session, i)).collect()
}

/// Every session `{prefix}{0..sessions}` has exactly `per_session` records numbered 1..=n, the
/// global ids are 1..=total, and the chain verifies.
pub fn check_sessions(path: &std::path::Path, prefix: &str, sessions: usize, per_session: usize) {
    let store = Store::open_existing(path).unwrap();
    let all = store.events(&EventFilter::default()).unwrap();
    assert_eq!(all.len(), sessions * per_session);
    let ids: Vec<i64> = all.iter().map(|r| r.id).collect();
    assert_eq!(ids, (1..=all.len() as i64).collect::<Vec<_>>());
    for s in 0..sessions {
        let id = format!("{prefix}{s}");
        let seqs: Vec<i64> = all
            .iter()
            .filter(|r| r.event.session_id == id)
            .map(|r| r.session_seq)
            .collect();
        assert_eq!(seqs, (1..=per_session as i64).collect::<Vec<_>>(), "{id}");
    }
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.checked, all.len() as u64);
}

/// A copy of `tests/fixtures/NAME.db` (a store written by an older cordon) in a fresh temp dir:
/// (the dir, to keep alive, and the copy's path).
#[allow(dead_code)]
pub fn old_store(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    std::fs::copy(
        format!("{}/tests/fixtures/{name}.db", env!("CARGO_MANIFEST_DIR")),
        &path,
    )
    .unwrap();
    (dir, path)
}
