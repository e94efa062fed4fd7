//! Several processes on one store, and a writer killed with SIGKILL.
//!
//! The test binary re-executes itself: with `CORDON_AUDIT_TEST_CHILD` set, the named test plays
//! the child's part instead of the parent's.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{check_sessions, sample_event};
use cordon_audit::{AuditWriter, EventFilter, SessionFilter, Store, WriterConfig};

const CHILD_ENV: &str = "CORDON_AUDIT_TEST_CHILD";

/// The child's orders: (index, store path, go file), if this process is a child.
fn child_orders() -> Option<(usize, PathBuf, PathBuf)> {
    let spec = std::env::var(CHILD_ENV).ok()?;
    let mut parts = spec.splitn(3, '\t');
    let index = parts.next()?.parse().ok()?;
    let path = PathBuf::from(parts.next()?);
    let go = PathBuf::from(parts.next()?);
    Some((index, path, go))
}

fn spawn_child(test_name: &str, index: usize, path: &Path, go: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        // The child's own test summary would read like extra results of this run.
        .stdout(std::process::Stdio::null())
        .env(
            CHILD_ENV,
            format!("{index}\t{}\t{}", path.display(), go.display()),
        )
        .spawn()
        .unwrap()
}

fn wait_for_file(go: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !go.exists() {
        assert!(Instant::now() < deadline, "parent never said go");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits for `child` until `deadline`; kills it (by its pid, through `Child::kill`) if it is late.
fn wait_or_kill(child: &mut Child, deadline: Instant) -> std::process::ExitStatus {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child {} did not finish in time", child.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

const PER_PROCESS: usize = 3000;

#[test]
fn three_processes_writing_one_store_lose_nothing_and_keep_one_chain() {
    if let Some((index, path, go)) = child_orders() {
        wait_for_file(&go);
        let config = WriterConfig {
            max_batch: 32,
            ..WriterConfig::default()
        };
        // Every child opens the fresh file at once: schema creation races too.
        let writer = AuditWriter::open_with(&path, config).unwrap();
        let session = format!("proc-{index}");
        for i in 0..PER_PROCESS {
            writer.record(sample_event(&session, i));
            if i % 100 == 99 {
                writer.flush().unwrap();
            }
        }
        writer.close().unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared/audit.db");
    let go = dir.path().join("go");
    let mut children: Vec<Child> = (0..3)
        .map(|i| {
            spawn_child(
                "three_processes_writing_one_store_lose_nothing_and_keep_one_chain",
                i,
                &path,
                &go,
            )
        })
        .collect();
    std::fs::write(&go, b"go").unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    for child in &mut children {
        let status = wait_or_kill(child, deadline);
        assert!(status.success(), "child failed: {status}");
    }
    check_sessions(&path, "proc-", 3, PER_PROCESS);
    // The processes really did write at the same time: sessions interleave in the chain.
    let store = Store::open_existing(&path).unwrap();
    let all = store.events(&EventFilter::default()).unwrap();
    let switches = all
        .windows(2)
        .filter(|w| w[0].event.session_id != w[1].event.session_id)
        .count();
    assert!(
        switches >= 3,
        "writers never interleaved ({switches} switches)"
    );
    let sessions = store.sessions(&SessionFilter::default()).unwrap();
    assert_eq!(sessions.len(), 3);
    assert!(sessions.iter().all(|s| s.events == PER_PROCESS as u64));
}

#[test]
fn a_writer_killed_with_sigkill_leaves_a_consistent_verifiable_store() {
    if let Some((_, path, go)) = child_orders() {
        wait_for_file(&go);
        let config = WriterConfig {
            max_batch: 64,
            ..WriterConfig::default()
        };
        let writer = AuditWriter::open_with(&path, config).unwrap();
        // Bounded: the parent kills us long before this ends.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut i = 0;
        while Instant::now() < deadline {
            writer.record(sample_event("crash", i));
            i += 1;
            if i % 50 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        writer.close().unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let go = dir.path().join("go");
    let mut child = spawn_child(
        "a_writer_killed_with_sigkill_leaves_a_consistent_verifiable_store",
        0,
        &path,
        &go,
    );
    std::fs::write(&go, b"go").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let written = Store::open_existing(&path)
            .ok()
            .and_then(|s| s.head().ok())
            .map_or(0, |h| h.seq);
        if written >= 2000 {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child wrote only {written} events in 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // std's Child::kill sends SIGKILL to this child's pid.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());

    let store = Store::open_existing(&path).unwrap();
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    let all = store.events(&EventFilter::default()).unwrap();
    assert!(all.len() >= 2000);
    let seqs: Vec<i64> = all.iter().map(|r| r.session_seq).collect();
    assert_eq!(seqs, (1..=all.len() as i64).collect::<Vec<_>>());
    // The summary was committed in the same transactions as the events.
    let summary = &store.sessions(&SessionFilter::default()).unwrap()[0];
    assert_eq!(summary.events, all.len() as u64);
}
