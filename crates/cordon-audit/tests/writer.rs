//! The writer thread: batching, flush, close, drops, failures, concurrent writers.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_sessions, sample_events};
use cordon_audit::{AuditWriter, EventFilter, Store, StoreOptions, WriterConfig, WriterError};

fn count(path: &std::path::Path) -> usize {
    Store::open_existing(path)
        .unwrap()
        .events(&EventFilter::default())
        .unwrap()
        .len()
}

#[test]
fn a_flush_returns_only_once_everything_recorded_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let writer = AuditWriter::open(&path).unwrap();
    for e in sample_events("s", 1000) {
        writer.record(e);
    }
    writer.flush().unwrap();
    assert_eq!(count(&path), 1000);
    let stats = writer.stats();
    assert_eq!(
        (stats.recorded, stats.committed, stats.dropped),
        (1000, 1000, 0)
    );
    writer.close().unwrap();
}

#[test]
fn events_are_committed_in_batches_of_at_most_max_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let config = WriterConfig {
        max_batch: 10,
        // Long enough that only the batch size or the flush can end a batch.
        max_delay: Duration::from_secs(5),
        ..WriterConfig::default()
    };
    let writer = AuditWriter::open_with(&path, config).unwrap();
    for e in sample_events("s", 25) {
        writer.record(e);
    }
    writer.flush().unwrap();
    let stats = writer.stats();
    assert_eq!(stats.committed, 25);
    assert_eq!(stats.batches, 3, "{stats:?}");
    writer.close().unwrap();
}

#[test]
fn events_left_after_full_batches_are_committed_by_their_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let config = WriterConfig {
        max_batch: 10,
        max_delay: Duration::from_millis(100),
        ..WriterConfig::default()
    };
    let writer = AuditWriter::open_with(&path, config).unwrap();
    for e in sample_events("s", 15) {
        writer.record(e);
    }
    // No flush: the 5 events behind the full batch must not wait for a 20th.
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&path) < 15 {
        assert!(Instant::now() < deadline, "{:?}", writer.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = writer.stats();
    assert_eq!((stats.committed, stats.batches), (15, 2), "{stats:?}");
    writer.close().unwrap();
}

#[test]
fn a_lone_event_is_committed_after_max_delay_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let config = WriterConfig {
        max_delay: Duration::from_millis(20),
        ..WriterConfig::default()
    };
    let writer = AuditWriter::open_with(&path, config).unwrap();
    writer.record(sample_events("s", 1).remove(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&path) == 0 {
        assert!(Instant::now() < deadline, "event never committed");
        std::thread::sleep(Duration::from_millis(10));
    }
    writer.close().unwrap();
}

#[test]
fn events_survive_close_and_drop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let writer = AuditWriter::open(&path).unwrap();
    for e in sample_events("closed", 500) {
        writer.record(e);
    }
    let stats = writer.close().unwrap();
    assert_eq!(stats.committed, 500);
    assert_eq!(count(&path), 500);

    let writer = AuditWriter::open(&path).unwrap();
    for e in sample_events("dropped", 300) {
        writer.record(e);
    }
    drop(writer);
    assert_eq!(count(&path), 800);

    // The chain and the session sequence carry on across writers.
    let writer = AuditWriter::open(&path).unwrap();
    for e in sample_events("closed", 2) {
        writer.record(e);
    }
    writer.close().unwrap();
    let store = Store::open_existing(&path).unwrap();
    let seqs: Vec<i64> = store
        .events(&EventFilter {
            session: Some("closed".into()),
            limit: Some(3),
            ..Default::default()
        })
        .unwrap()
        .iter()
        .map(|r| r.session_seq)
        .collect();
    assert_eq!(seqs, vec![500, 501, 502]);
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn a_full_channel_drops_and_counts_instead_of_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let config = WriterConfig {
        capacity: 4,
        max_delay: Duration::ZERO,
        ..WriterConfig::default()
    };
    let writer = AuditWriter::open_with(&path, config).unwrap();
    // Hold the write lock so the writer thread stalls in its first commit.
    let mut blocker = rusqlite::Connection::open(&path).unwrap();
    let lock = blocker
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    let mut events = sample_events("s", 11).into_iter();
    writer.record(events.next().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    for e in events {
        writer.record(e);
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "record blocked"
    );
    assert_eq!(writer.dropped(), 6);
    lock.commit().unwrap();
    match writer.flush() {
        Err(WriterError::EventsLost {
            dropped: 6,
            failed: 0,
            ..
        }) => {}
        other => panic!("expected 6 dropped, got {other:?}"),
    }
    // Reported once: the next flush is clean.
    writer.flush().unwrap();
    assert_eq!(count(&path), 5);
    assert!(matches!(
        writer.close(),
        Err(WriterError::EventsLost { dropped: 6, .. })
    ));
}

#[test]
fn a_batch_that_cannot_be_committed_is_counted_as_failed_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let config = WriterConfig {
        retries: 1,
        store: StoreOptions {
            busy_timeout: Duration::from_millis(100),
            ..StoreOptions::default()
        },
        ..WriterConfig::default()
    };
    let writer = AuditWriter::open_with(&path, config).unwrap();
    let mut blocker = rusqlite::Connection::open(&path).unwrap();
    let lock = blocker
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    for e in sample_events("s", 3) {
        writer.record(e);
    }
    match writer.flush() {
        Err(WriterError::EventsLost {
            dropped: 0,
            failed: 3,
            last_error: Some(err),
        }) => assert!(err.contains("locked") || err.contains("busy"), "{err}"),
        other => panic!("expected 3 failed, got {other:?}"),
    }
    lock.rollback().unwrap();
    // The writer keeps working once the lock is gone.
    for e in sample_events("t", 2) {
        writer.record(e);
    }
    writer.flush().unwrap();
    assert_eq!(count(&path), 2);
    assert!(writer.close().is_err());
}

#[test]
fn four_threads_sharing_one_writer_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let writer = Arc::new(AuditWriter::open(&path).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let writer = Arc::clone(&writer);
            std::thread::spawn(move || {
                for e in sample_events(&format!("shared-{t}"), 2000) {
                    writer.record(e);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let writer = Arc::into_inner(writer).unwrap();
    writer.close().unwrap();
    check_sessions(&path, "shared-", 4, 2000);
}

#[test]
fn four_threads_with_their_own_writers_on_one_file_keep_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let path = path.clone();
            std::thread::spawn(move || {
                let config = WriterConfig {
                    max_batch: 16,
                    ..WriterConfig::default()
                };
                let writer = AuditWriter::open_with(&path, config).unwrap();
                for (i, e) in sample_events(&format!("own-{t}"), 2000)
                    .into_iter()
                    .enumerate()
                {
                    writer.record(e);
                    if i % 100 == 99 {
                        writer.flush().unwrap();
                    }
                }
                writer.close().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    check_sessions(&path, "own-", 4, 2000);
}

#[test]
fn the_writer_thread_runs_under_sched_batch() {
    let dir = tempfile::tempdir().unwrap();
    let writer = AuditWriter::open(dir.path().join("audit.db")).unwrap();
    // The thread sets its policy as it starts: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut policies = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let task = task.unwrap().path();
            let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            if comm.trim() == "cordon-audit" {
                let stat = std::fs::read_to_string(task.join("stat")).unwrap();
                // Field 41 (policy), counted after the `(comm)` field, which may hold spaces.
                let after = &stat[stat.rfind(')').unwrap() + 2..];
                policies.push(after.split(' ').nth(38).unwrap().to_owned());
            }
        }
        // 3 is SCHED_BATCH; other tests' writers in this process may exist too.
        if !policies.is_empty() && policies.iter().all(|p| p == "3") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writer thread policies: {policies:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    writer.close().unwrap();
}
