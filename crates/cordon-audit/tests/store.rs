//! The store: round trips, sessions, filters, export, prune.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{old_store, sample_event, sample_events, BASE_MS};
use cordon_audit::{
    Attribution, Event, EventFilter, EventKind, EventRecord, SessionFilter, Store, StoreError,
    Timestamp, Verdict,
};

fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("audit.db")).unwrap();
    (dir, store)
}

#[test]
fn events_written_are_read_back_exactly() {
    let (_dir, mut store) = temp_store();
    let written = sample_events("01JROUNDTRIP", 200);
    let head = store.append(&written).unwrap();
    assert_eq!(head.seq, 200);
    let read = store.events(&EventFilter::default()).unwrap();
    assert_eq!(read.len(), 200);
    for (i, (record, original)) in read.iter().zip(&written).enumerate() {
        assert_eq!(&record.event, original, "event {i} differs");
        assert_eq!(record.id, i as i64 + 1);
        assert_eq!(record.session_seq, i as i64 + 1);
        assert_eq!(record.hash.len(), 64);
    }
    assert_eq!(read[0].prev_hash, cordon_audit::GENESIS_HASH);
    for pair in read.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
    assert_eq!(store.head().unwrap().hash, read[199].hash);
}

#[test]
fn a_multibyte_path_is_stored_cut_to_100_characters() {
    let (_dir, mut store) = temp_store();
    let mut e = sample_event("s", 4);
    e.path = Some(format!("/{}€€€", "p".repeat(98)));
    store.append(&[e]).unwrap();
    let path = store.events(&EventFilter::default()).unwrap()[0]
        .event
        .path
        .clone()
        .unwrap();
    assert_eq!(path.chars().count(), 100);
    assert_eq!(path, format!("/{}€", "p".repeat(98)));
}

#[test]
fn session_sequence_numbers_continue_across_batches_and_handles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let mut a = Store::open(&path).unwrap();
    a.append(&sample_events("s1", 3)).unwrap();
    a.append(&sample_events("s2", 2)).unwrap();
    drop(a);
    let mut b = Store::open(&path).unwrap();
    b.append(&sample_events("s1", 2)).unwrap();
    let s1: Vec<i64> = b
        .events(&EventFilter {
            session: Some("s1".into()),
            ..EventFilter::default()
        })
        .unwrap()
        .iter()
        .map(|r| r.session_seq)
        .collect();
    assert_eq!(s1, vec![1, 2, 3, 4, 5]);
    let ids: Vec<i64> = b
        .events(&EventFilter::default())
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, (1..=7).collect::<Vec<_>>());
}

#[test]
fn the_store_file_is_private_and_its_new_parent_directories_are_0700() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/cordon/audit.db");
    let store = Store::open(&path).unwrap();
    drop(store);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&dir.path().join("state/cordon")), 0o700);
    assert_eq!(mode(&dir.path().join("state")), 0o700);
}

#[test]
fn opening_a_missing_store_for_reading_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope/audit.db");
    assert!(matches!(
        Store::open_existing(&path),
        Err(StoreError::NotFound { .. })
    ));
    assert!(!dir.path().join("nope").exists());
}

#[test]
fn a_store_from_a_newer_cordon_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    drop(Store::open(&path).unwrap());
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.pragma_update(None, "user_version", 99).unwrap();
    drop(raw);
    assert!(matches!(
        Store::open(&path),
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
}

/// A copy of a fixture store written by an older cordon (tests/fixtures), in a temp dir.
fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn schema_version(path: &std::path::Path) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

fn export(store: &Store) -> String {
    let mut out = Vec::new();
    store
        .export_jsonl(&EventFilter::default(), &mut out)
        .unwrap();
    String::from_utf8(out).unwrap()
}

// tests/fixtures/schema2.db was written by cordon-audit at commit 9128056 (schema 2): the
// sample events of sessions 01JOLD-A (12) and 01JOLD-B (8) interleaved by time, appended in
// three batches, then the two oldest records pruned (an anchor); schema2.jsonl is that
// cordon's `export_jsonl` of it and schema2.sessions.json its `sessions()`. schema1.db was
// written the same way as the schema 1 migration test of that commit: 12 sample events of
// 01JOLD without processes, then the process columns dropped and user_version set to 1;
// schema1.jsonl is the export made before the columns were dropped.

#[test]
fn a_schema_2_store_is_migrated_in_place_and_reads_back_exactly_as_before() {
    let (_dir, path) = old_store("schema2");
    assert_eq!(schema_version(&path), 2);
    let mut store = Store::open(&path).unwrap();
    assert_eq!(schema_version(&path), 3);
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.checked, 18);
    assert_eq!(report.anchor.as_ref().map(|a| a.seq), Some(2));
    // Every record, hash and link exports byte for byte as the old cordon exported it, and the
    // session summaries are the same.
    assert_eq!(export(&store), fixture_text("schema2.jsonl"));
    let sessions: serde_json::Value =
        serde_json::to_value(store.sessions(&SessionFilter::default()).unwrap()).unwrap();
    let before: serde_json::Value =
        serde_json::from_str(&fixture_text("schema2.sessions.json")).unwrap();
    assert_eq!(sessions, before);

    // New records continue the chain (and the old sessions' sequences) in the new format.
    let mut new = sample_events("01JOLD-A", 15)[12..].to_vec();
    new.extend(sample_events("01JNEW", 6));
    assert!(new.iter().any(|e| e.process.is_some()));
    store.append(&new).unwrap();
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.checked, 27);
    let a: Vec<i64> = store
        .events(&EventFilter {
            session: Some("01JOLD-A".into()),
            ..EventFilter::default()
        })
        .unwrap()
        .iter()
        .map(|r| r.session_seq)
        .collect();
    assert_eq!(a, (2..=15).collect::<Vec<_>>());
    let back: Vec<Event> = store
        .events(&EventFilter::default())
        .unwrap()
        .into_iter()
        .map(|r| r.event)
        .collect();
    let mut expected: Vec<Event> = fixture_text("schema2.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<EventRecord>(l).unwrap().event)
        .collect();
    expected.extend(new);
    assert_eq!(back, expected);
    // Reopening a migrated store changes nothing.
    drop(store);
    let store = Store::open(&path).unwrap();
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn a_schema_1_store_is_migrated_to_3_and_its_chain_still_verifies() {
    let (_dir, path) = old_store("schema1");
    assert_eq!(schema_version(&path), 1);
    let mut store = Store::open(&path).unwrap();
    assert_eq!(schema_version(&path), 3);
    assert!(store.verify().unwrap().is_ok());
    assert_eq!(export(&store), fixture_text("schema1.jsonl"));
    let new = sample_events("01JNEW", 6);
    store.append(&new).unwrap();
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.checked, 18);
}

#[test]
fn a_migration_that_fails_leaves_the_old_store_as_it_was() {
    let (_dir, path) = old_store("schema2");
    // A table the migration wants to create already exists: it fails half way.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE batches (x)")
        .unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(err.to_string().contains("migrate schema 2 to 3"), "{err}");
    assert_eq!(schema_version(&path), 2);
    let raw = rusqlite::Connection::open(&path).unwrap();
    let tables: Vec<String> = {
        let mut stmt = raw
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    };
    assert_eq!(
        tables,
        ["anchors", "batches", "chain_head", "events", "sessions"]
    );
    let (rows, session_ids): (i64, i64) = raw
        .query_row("SELECT COUNT(*), COUNT(session_id) FROM events", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((rows, session_ids), (18, 18));
}

#[test]
fn an_old_record_whose_session_summary_was_deleted_keeps_its_session() {
    let (_dir, path) = old_store("schema2");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("DELETE FROM sessions WHERE id = '01JOLD-B'", [])
        .unwrap();
    let store = Store::open(&path).unwrap();
    assert!(store.verify().unwrap().is_ok());
    assert_eq!(export(&store), fixture_text("schema2.jsonl"));
    let b = store
        .sessions(&SessionFilter {
            session: Some("01JOLD-B".into()),
            ..SessionFilter::default()
        })
        .unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].events, 7);
}

#[test]
fn time_filters_match_every_record_in_the_window_even_out_of_order() {
    // Records are committed out of time order (long requests end after short ones, clocks of
    // several processes differ): the id range that `batches` gives must still hold them all.
    let (_dir, path) = old_store("schema2");
    let mut store = Store::open(&path).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for batch in 0..12 {
        let n = 1 + (next() % 9) as usize;
        let events: Vec<Event> = (0..n)
            .map(|i| {
                let mut e = sample_event(&format!("01JTIME-{}", batch % 3), batch * 10 + i);
                // Around the old records' times, up to a minute off either way.
                e.ts = Timestamp::from_millis(
                    BASE_MS + 20_000 + batch as i64 * 4_000 - 60_000 + (next() % 120_000) as i64,
                );
                e
            })
            .collect();
        store.append(&events).unwrap();
    }
    assert!(store.verify().unwrap().is_ok());
    let all = store.events(&EventFilter::default()).unwrap();
    let edges: Vec<i64> = (-70..=110)
        .step_by(9)
        .map(|s| BASE_MS + s * 1_000 + 7)
        .collect();
    let ids = |filter: &EventFilter| -> Vec<i64> {
        store.events(filter).unwrap().iter().map(|r| r.id).collect()
    };
    let mut nonempty = 0;
    for &since in &edges {
        let since = Timestamp::from_millis(since);
        let want: Vec<i64> = all
            .iter()
            .filter(|r| r.event.ts >= since)
            .map(|r| r.id)
            .collect();
        nonempty += usize::from(!want.is_empty());
        let filter = EventFilter {
            since: Some(since),
            ..EventFilter::default()
        };
        assert_eq!(ids(&filter), want, "since {since:?}");
        for &until in &edges {
            let until = Timestamp::from_millis(until);
            let want: Vec<i64> = all
                .iter()
                .filter(|r| r.event.ts >= since && r.event.ts < until)
                .map(|r| r.id)
                .collect();
            let filter = EventFilter {
                since: Some(since),
                until: Some(until),
                ..EventFilter::default()
            };
            assert_eq!(ids(&filter), want, "{since:?}..{until:?}");
        }
        let want: Vec<i64> = all
            .iter()
            .filter(|r| r.event.ts < since)
            .map(|r| r.id)
            .collect();
        let filter = EventFilter {
            until: Some(since),
            ..EventFilter::default()
        };
        assert_eq!(ids(&filter), want, "until {since:?}");
    }
    assert!(nonempty > 5);
}

#[test]
fn the_store_is_in_wal_mode() {
    let (_dir, store) = temp_store();
    let raw = rusqlite::Connection::open(store.path()).unwrap();
    let mode: String = raw
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

fn session_events(who: &Attribution, start_ms: i64, blocked: usize, allowed: usize) -> Vec<Event> {
    let mut out = Vec::new();
    let mut start = who.session_start(
        &["python3".into(), "fetch release.py".into()],
        serde_json::Map::new(),
    );
    start.ts = Timestamp::from_millis(start_ms);
    out.push(start);
    for i in 0..allowed {
        let mut e = who.event(EventKind::HttpRequest);
        e.ts = Timestamp::from_millis(start_ms + 10 + i as i64);
        e.verdict = Some(Verdict::Allow);
        e.bytes_up = Some(100);
        e.bytes_down = Some(1000);
        out.push(e);
    }
    for i in 0..blocked {
        let mut e = who.event(EventKind::Blocked);
        e.ts = Timestamp::from_millis(start_ms + 500 + i as i64);
        e.verdict = Some(Verdict::Block);
        out.push(e);
    }
    let mut end = who.session_end(Some(3), Some("timeout"), serde_json::Map::new());
    end.ts = Timestamp::from_millis(start_ms + 2000);
    out.push(end);
    out
}

fn who(session: &str, user: &str) -> Attribution {
    Attribution {
        session_id: session.into(),
        user_id: user.into(),
        code_sha256: cordon_audit::sha256_hex(session.as_bytes()),
    }
}

#[test]
fn sessions_are_listed_recent_first_with_counts() {
    let (_dir, mut store) = temp_store();
    store
        .append(&session_events(&who("01JAAA", "alice"), BASE_MS, 2, 3))
        .unwrap();
    store
        .append(&session_events(
            &who("01JBBB", "bob"),
            BASE_MS + 60_000,
            0,
            1,
        ))
        .unwrap();
    // A third session whose events arrive in two batches, without an end yet.
    let c = who("01JBBC", "alice");
    let all = session_events(&c, BASE_MS + 120_000, 1, 1);
    store.append(&all[..2]).unwrap();
    store.append(&all[2..3]).unwrap();

    let sessions = store.sessions(&SessionFilter::default()).unwrap();
    let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, vec!["01JBBC", "01JBBB", "01JAAA"]);
    let a = &sessions[2];
    assert_eq!(a.user_id, "alice");
    assert_eq!(a.events, 7);
    assert_eq!(a.blocked, 2);
    assert_eq!(a.bytes_up, 300);
    assert_eq!(a.bytes_down, 3000);
    assert_eq!(a.command.as_deref(), Some("python3 'fetch release.py'"));
    assert_eq!(a.started, Timestamp::from_millis(BASE_MS));
    assert_eq!(a.ended, Some(Timestamp::from_millis(BASE_MS + 2000)));
    assert_eq!(a.exit_status, Some(3));
    assert_eq!(a.limit_hit.as_deref(), Some("timeout"));
    assert_eq!(a.code_sha256, cordon_audit::sha256_hex(b"01JAAA"));
    let c = &sessions[0];
    assert_eq!((c.events, c.blocked, c.ended), (3, 1, None));

    let alice = store
        .sessions(&SessionFilter {
            user: Some("alice".into()),
            ..SessionFilter::default()
        })
        .unwrap();
    assert_eq!(alice.len(), 2);
    let one = store
        .sessions(&SessionFilter {
            limit: Some(1),
            ..SessionFilter::default()
        })
        .unwrap();
    assert_eq!(one[0].id, "01JBBC");
    let prefixed = store
        .sessions(&SessionFilter {
            session: Some("01JBB".into()),
            since: Some(Timestamp::from_millis(BASE_MS + 1)),
            ..SessionFilter::default()
        })
        .unwrap();
    assert_eq!(prefixed.len(), 2);

    assert_eq!(store.resolve_session("01JA").unwrap(), "01JAAA");
    assert_eq!(store.resolve_session("01JBBB").unwrap(), "01JBBB");
    assert!(matches!(
        store.resolve_session("01JB"),
        Err(StoreError::AmbiguousSession { .. })
    ));
    assert!(matches!(
        store.resolve_session("01JZ"),
        Err(StoreError::NoSuchSession { .. })
    ));
    // GLOB metacharacters do not widen the match.
    assert!(matches!(
        store.resolve_session("01J*"),
        Err(StoreError::NoSuchSession { .. })
    ));
}

#[test]
fn event_filters_select_exactly_the_matching_events() {
    let (_dir, mut store) = temp_store();
    let mut written = sample_events("01JFILTER-A", 60);
    written.extend(sample_events("01JFILTER-B", 40));
    store.append(&written).unwrap();
    check_filters(&store, "01JFILTER");
}

#[test]
fn event_filters_select_exactly_the_matching_events_of_old_and_new_records() {
    // A migrated schema 2 store: old records keep their own attribution columns, new ones take
    // their session's unless they differ.
    let (_dir, path) = old_store("schema2");
    let mut store = Store::open(&path).unwrap();
    let mut written = sample_events("01JOLD-A", 40)[12..].to_vec();
    written.extend(sample_events("01JOLD-C", 30));
    for chunk in written.chunks(7) {
        store.append(chunk).unwrap();
    }
    check_filters(&store, "01JOLD");
}

/// Every filter of [`EventFilter`], alone and combined, selects exactly the records the
/// predicate over all records selects. `prefix` is what every session id starts with.
fn check_filters(store: &Store, prefix: &str) {
    let all = store.events(&EventFilter::default()).unwrap();
    let first = all[0].event.session_id.clone();
    let check = |filter: EventFilter, pred: &dyn Fn(&EventRecord) -> bool| {
        let got: Vec<i64> = store
            .events(&filter)
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        let want: Vec<i64> = all.iter().filter(|r| pred(r)).map(|r| r.id).collect();
        assert!(
            !want.is_empty(),
            "filter {filter:?} matches nothing: a vacuous check"
        );
        assert_eq!(got, want, "filter {filter:?}");
    };
    check(
        EventFilter {
            session: Some(first.clone()),
            ..Default::default()
        },
        &|r| r.event.session_id == first,
    );
    check(
        EventFilter {
            session: Some(prefix.into()),
            ..Default::default()
        },
        &|_| true,
    );
    for user in ["user0", "user1", "user2"] {
        check(
            EventFilter {
                user: Some(user.into()),
                ..Default::default()
            },
            &|r| r.event.user_id == user,
        );
    }
    for kind in EventKind::ALL {
        check(
            EventFilter {
                kind: Some(kind),
                ..Default::default()
            },
            &|r| r.event.kind == kind,
        );
    }
    for verdict in Verdict::ALL {
        check(
            EventFilter {
                verdict: Some(verdict),
                ..Default::default()
            },
            &|r| r.event.verdict == Some(verdict),
        );
    }
    // The SQL blocked predicate and Event::is_blocked agree.
    check(
        EventFilter {
            blocked_only: true,
            ..Default::default()
        },
        &|r| r.event.is_blocked(),
    );
    let since = Timestamp::from_millis(BASE_MS + 10_000);
    let until = Timestamp::from_millis(BASE_MS + 20_000);
    check(
        EventFilter {
            since: Some(since),
            until: Some(until),
            ..Default::default()
        },
        &|r| r.event.ts >= since && r.event.ts < until,
    );
    let after = all[all.len() - 10].id;
    check(
        EventFilter {
            after_id: Some(after),
            ..Default::default()
        },
        &|r| r.id > after,
    );
    check(
        EventFilter {
            session: Some(first.clone()),
            blocked_only: true,
            user: Some("user2".into()),
            ..Default::default()
        },
        &|r| r.event.session_id == first && r.event.is_blocked() && r.event.user_id == "user2",
    );
}

#[test]
fn a_limit_returns_the_newest_events_oldest_first() {
    let (_dir, mut store) = temp_store();
    store.append(&sample_events("s", 30)).unwrap();
    let got: Vec<i64> = store
        .events(&EventFilter {
            limit: Some(5),
            ..Default::default()
        })
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(got, vec![26, 27, 28, 29, 30]);
}

#[test]
fn jsonl_export_round_trips_through_serde_with_stable_keys() {
    let (_dir, mut store) = temp_store();
    store.append(&sample_events("01JEXPORT", 50)).unwrap();
    let mut out = Vec::new();
    let n = store
        .export_jsonl(&EventFilter::default(), &mut out)
        .unwrap();
    assert_eq!(n, 50);
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 50);
    let parsed: Vec<EventRecord> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(parsed, store.events(&EventFilter::default()).unwrap());
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let keys: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
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
    ];
    let mut keys_sorted = keys.clone();
    keys_sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(keys_sorted, expected);
    assert_eq!(first["ts"], "2023-11-14T22:13:20.000Z");
}

/// A writer that fails once it has taken `left` bytes, like a closed pipe.
struct FailingWriter {
    left: usize,
}

impl std::io::Write for FailingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "closed",
            ));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn an_export_to_a_closed_pipe_is_an_error_not_a_panic() {
    let (_dir, mut store) = temp_store();
    store.append(&sample_events("s", 500)).unwrap();
    let err = store
        .export_jsonl(&EventFilter::default(), FailingWriter { left: 10_000 })
        .unwrap_err();
    assert!(matches!(err, StoreError::Export(_)), "{err}");
}

#[test]
fn pruning_deletes_old_records_and_the_rest_still_verifies() {
    let (_dir, mut store) = temp_store();
    // Session "old" lies entirely before the cutoff, "mid" straddles it, "new" is after it.
    let old = session_events(&who("old", "u"), BASE_MS, 1, 2);
    let mid = session_events(&who("mid", "u"), BASE_MS + 100_000, 1, 2);
    let new = session_events(&who("new", "u"), BASE_MS + 200_000, 0, 1);
    store.append(&old).unwrap();
    store.append(&mid).unwrap();
    store.append(&new).unwrap();
    let total = old.len() + mid.len() + new.len();
    // Cut inside "mid": after its start and 2 allowed requests, before its blocked event.
    let cutoff = Timestamp::from_millis(BASE_MS + 100_000 + 100);
    let report = store.prune_before(cutoff).unwrap();
    let expected_deleted = old.len() + 3;
    assert_eq!(report.deleted, expected_deleted as u64);
    let anchor = report.anchor.unwrap();
    assert_eq!(anchor.seq, expected_deleted as i64);

    let verify = store.verify().unwrap();
    assert!(verify.is_ok(), "{verify:?}");
    assert_eq!(verify.checked, (total - expected_deleted) as u64);
    assert_eq!(verify.anchor.as_ref().unwrap().seq, anchor.seq);
    let remaining = store.events(&EventFilter::default()).unwrap();
    assert_eq!(remaining[0].id, anchor.seq + 1);
    assert_eq!(remaining[0].prev_hash, anchor.hash);

    // Summaries: "old" is gone, "mid" recounted, "new" untouched.
    let sessions = store.sessions(&SessionFilter::default()).unwrap();
    let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, vec!["new", "mid"]);
    let mid_summary = &sessions[1];
    assert_eq!(mid_summary.events, 2);
    assert_eq!(mid_summary.blocked, 1);
    assert_eq!(mid_summary.bytes_up, 0);

    // The chain goes on after a prune, and a second prune stacks a second anchor.
    store.append(&sample_events("later", 5)).unwrap();
    assert!(store.verify().unwrap().is_ok());
    let again = store
        .prune_before(Timestamp::from_millis(BASE_MS + 200_000))
        .unwrap();
    assert_eq!(again.deleted, 2);
    let verify = store.verify().unwrap();
    assert!(verify.is_ok(), "{verify:?}");
    assert_eq!(verify.anchor.unwrap().seq, anchor.seq + 2);

    // Nothing old enough: no anchor.
    let none = store.prune_before(Timestamp::from_millis(0)).unwrap();
    assert_eq!((none.deleted, none.anchor), (0, None));
}

#[test]
fn pruning_everything_leaves_an_empty_chain_that_verifies_and_continues() {
    let (_dir, mut store) = temp_store();
    store.append(&sample_events("s", 10)).unwrap();
    let report = store
        .prune_before(Timestamp::from_millis(i64::MAX))
        .unwrap();
    assert_eq!(report.deleted, 10);
    let verify = store.verify().unwrap();
    assert!(verify.is_ok(), "{verify:?}");
    assert_eq!(verify.checked, 0);
    assert!(store
        .sessions(&SessionFilter::default())
        .unwrap()
        .is_empty());
    store.append(&sample_events("t", 3)).unwrap();
    let verify = store.verify().unwrap();
    assert!(verify.is_ok(), "{verify:?}");
    assert_eq!(verify.checked, 3);
}

#[test]
fn pruning_stops_at_the_first_record_to_keep_even_if_later_ones_are_older() {
    let (_dir, mut store) = temp_store();
    let events: Vec<Event> = [1, 2, 10, 3, 4]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut e = sample_event("s", i);
            e.ts = Timestamp::from_millis(s * 1000);
            e
        })
        .collect();
    store.append(&events).unwrap();
    let report = store.prune_before(Timestamp::from_millis(5000)).unwrap();
    assert_eq!(report.deleted, 2);
    let ids: Vec<i64> = store
        .events(&EventFilter::default())
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, vec![3, 4, 5]);
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn pruning_a_tampered_chain_is_refused_and_deletes_nothing() {
    let (_dir, mut store) = temp_store();
    store.append(&sample_events("s", 10)).unwrap();
    let raw = rusqlite::Connection::open(store.path()).unwrap();
    raw.execute("UPDATE events SET host = 'x' WHERE id = 2", [])
        .unwrap();
    let err = store
        .prune_before(Timestamp::from_millis(i64::MAX))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::ChainBroken { id: 2, .. }),
        "{err}"
    );
    assert_eq!(store.events(&EventFilter::default()).unwrap().len(), 10);
}

#[test]
fn a_long_write_ahead_log_is_folded_back_and_the_chain_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let wal = dir.path().join("audit.db-wal");
    {
        let mut store = Store::open(&path).unwrap();
        // One batch per append: each commit adds frames to the log.
        for i in 0..40 {
            store
                .append(&sample_events(&format!("01JWAL{i:04}"), 20))
                .unwrap();
        }
    }
    let before = std::fs::metadata(&wal).unwrap().len();
    assert!(before > 64 * 1024, "the log should have grown: {before}");
    // Under the threshold: nothing happens.
    assert!(!Store::checkpoint_if_wal_over(&path, before + 1).unwrap());
    assert_eq!(std::fs::metadata(&wal).unwrap().len(), before);
    // Over it: folded back and truncated.
    assert!(Store::checkpoint_if_wal_over(&path, 64 * 1024).unwrap());
    assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0);
    let store = Store::open_existing(&path).unwrap();
    assert_eq!(store.events(&EventFilter::default()).unwrap().len(), 800);
    assert!(store.verify().unwrap().is_ok());
    // A missing store is an error, not a new empty file.
    let missing = dir.path().join("none.db");
    std::fs::write(dir.path().join("none.db-wal"), vec![0u8; 200_000]).unwrap();
    assert!(Store::checkpoint_if_wal_over(&missing, 1024).is_err());
    assert!(!missing.exists());
}
