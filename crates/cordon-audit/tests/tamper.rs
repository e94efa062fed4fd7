//! Tampering with the SQLite file directly: verify must name the first bad record.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use common::{old_store, sample_events};
use cordon_audit::Store;
use rusqlite::types::ValueRef;
use rusqlite::Connection;
use sha2::{Digest, Sha256};

/// A store with 20 records over two sessions, and a raw connection to the same file.
fn store_and_raw() -> (tempfile::TempDir, Store, Connection) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let mut store = Store::open(&path).unwrap();
    let mut events = sample_events("01JTAMPER-A", 10);
    events.extend(sample_events("01JTAMPER-B", 10));
    // Interleave the two sessions so records of one session are not adjacent.
    events.sort_by_key(|e| e.ts);
    store.append(&events[..7]).unwrap();
    store.append(&events[7..]).unwrap();
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "fresh store does not verify: {report:?}");
    assert_eq!(report.checked, 20);
    let raw = Connection::open(&path).unwrap();
    (dir, store, raw)
}

fn first_bad(store: &Store) -> (i64, String) {
    let report = store.verify().unwrap();
    report
        .first_bad
        .clone()
        .unwrap_or_else(|| panic!("tampering not detected: {report:?}"))
}

/// The values a schema 3 record hashes (chain v2), as it reads back: the attribution is the
/// session's unless the record stores its own.
const V2_VALUES: [&str; 21] = [
    "COALESCE(e.session_id, s.id)",
    "e.session_seq",
    "e.kind",
    "COALESCE(e.user_id, s.user_id)",
    "COALESCE(e.code_sha256, s.code_sha256)",
    "e.ts_ms",
    "e.host",
    "e.ip",
    "e.port",
    "e.method",
    "e.path",
    "e.bytes_up",
    "e.bytes_down",
    "e.duration_ms",
    "e.verdict",
    "e.rule",
    "e.reason",
    "e.detail",
    "e.pid",
    "e.exe",
    "e.cmdline",
];

fn canonical(h: &mut Sha256, value: ValueRef<'_>) {
    match value {
        ValueRef::Null => h.update([0u8]),
        ValueRef::Integer(n) => {
            h.update([1u8]);
            h.update(n.to_be_bytes());
        }
        ValueRef::Text(t) => {
            h.update([2u8]);
            h.update((t.len() as u64).to_be_bytes());
            h.update(t);
        }
        ValueRef::Real(r) => {
            h.update([3u8]);
            h.update(r.to_bits().to_be_bytes());
        }
        ValueRef::Blob(b) => {
            h.update([4u8]);
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        }
    }
}

/// The record hash exactly as the `chain` module documents it (v2), written independently here:
/// an outside verifier (or an attacker) can compute it from the docs alone.
fn documented_hash(raw: &Connection, id: i64) -> Vec<u8> {
    let sql = format!(
        "SELECT {}, e.prev_hash FROM events e LEFT JOIN sessions s ON s.sid = e.sid WHERE e.id = ?1",
        V2_VALUES.join(", ")
    );
    raw.query_row(&sql, [id], |row| {
        let mut h = Sha256::new();
        h.update(b"cordon-audit-chain-v2\n");
        let prev: Vec<u8> = row.get(V2_VALUES.len())?;
        assert_eq!(prev.len(), 32);
        h.update(&prev);
        for i in 0..V2_VALUES.len() {
            canonical(&mut h, row.get_ref(i)?);
        }
        h.update(id.to_be_bytes());
        Ok(h.finalize().to_vec())
    })
    .unwrap()
}

/// The columns a record written before schema 3 hashes (chain v1), as stored.
const V1_COLUMNS: [&str; 22] = [
    "session_id",
    "session_seq",
    "kind",
    "user_id",
    "code_sha256",
    "ts",
    "ts_ms",
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
    "pid",
    "exe",
    "cmdline",
];

/// The v1 hash of an old record as documented: the stored columns, the last three only when one
/// of them is not NULL, `prev_hash` as its hex text.
fn documented_v1_hash(raw: &Connection, id: i64) -> String {
    const BASE: usize = 19;
    let sql = format!(
        "SELECT {}, prev_hash FROM events WHERE id = ?1",
        V1_COLUMNS.join(", ")
    );
    raw.query_row(&sql, [id], |row| {
        let mut h = Sha256::new();
        h.update(b"cordon-audit-chain-v1\n");
        let prev: String = row.get(V1_COLUMNS.len())?;
        h.update(prev.as_bytes());
        let attributed =
            (BASE..V1_COLUMNS.len()).any(|i| !matches!(row.get_ref(i), Ok(ValueRef::Null)));
        let hashed = if attributed { V1_COLUMNS.len() } else { BASE };
        for i in 0..hashed {
            canonical(&mut h, row.get_ref(i)?);
        }
        h.update(id.to_be_bytes());
        Ok(h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>())
    })
    .unwrap()
}

#[test]
fn stored_hashes_follow_the_documented_format() {
    let (_dir, _store, raw) = store_and_raw();
    for id in 1..=20 {
        let stored: Vec<u8> = raw
            .query_row("SELECT hash FROM events WHERE id = ?1", [id], |r| r.get(0))
            .unwrap();
        assert_eq!(documented_hash(&raw, id), stored, "record {id}");
        // Each record links to the one before it.
        if id > 1 {
            let (prev, before): (Vec<u8>, Vec<u8>) = raw
                .query_row(
                    "SELECT (SELECT prev_hash FROM events WHERE id = ?1), (SELECT hash FROM events WHERE id = ?1 - 1)",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!(prev, before, "record {id}");
        }
    }
}

#[test]
fn records_migrated_from_schema_2_keep_their_documented_v1_hashes() {
    let (_dir, path) = old_store("schema2");
    let mut store = Store::open(&path).unwrap();
    store.append(&sample_events("01JNEW", 3)).unwrap();
    assert!(store.verify().unwrap().is_ok());
    let raw = Connection::open(&path).unwrap();
    let ids: Vec<(i64, bool)> = {
        let mut stmt = raw
            .prepare("SELECT id, typeof(hash) = 'text' FROM events ORDER BY id")
            .unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.map(Result::unwrap).collect()
    };
    assert_eq!(ids.iter().filter(|(_, v1)| *v1).count(), 18);
    assert_eq!(ids.iter().filter(|(_, v1)| !v1).count(), 3);
    for (id, v1) in ids {
        if v1 {
            let stored: String = raw
                .query_row("SELECT hash FROM events WHERE id = ?1", [id], |r| r.get(0))
                .unwrap();
            assert_eq!(documented_v1_hash(&raw, id), stored, "record {id}");
        } else {
            let stored: Vec<u8> = raw
                .query_row("SELECT hash FROM events WHERE id = ?1", [id], |r| r.get(0))
                .unwrap();
            assert_eq!(documented_hash(&raw, id), stored, "record {id}");
        }
    }
    // The first new record links to the last old one, whose hash is hex text.
    let (prev, last_old): (Vec<u8>, String) = raw
        .query_row(
            "SELECT (SELECT prev_hash FROM events WHERE id = 21), (SELECT hash FROM events WHERE id = 20)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let hex: String = prev.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, last_old);
}

#[test]
fn an_edited_old_record_is_named_by_verify_after_the_migration() {
    for edit in [
        "UPDATE events SET host = 'evil.example' WHERE id = 9",
        "UPDATE events SET ts = '2020-01-01T00:00:00.000Z' WHERE id = 9",
        "UPDATE events SET user_id = 'mallory' WHERE id = 9",
    ] {
        let (_dir, path) = old_store("schema2");
        let store = Store::open(&path).unwrap();
        let raw = Connection::open(&path).unwrap();
        raw.execute(edit, []).unwrap();
        let (id, reason) = first_bad(&store);
        assert_eq!(id, 9, "{edit}: {reason}");
    }
    // An old record stores its session id (hashed); the session number that queries use must
    // point to that session, or a session filter would show it under another one.
    let (_dir, path) = old_store("schema2");
    let store = Store::open(&path).unwrap();
    let raw = Connection::open(&path).unwrap();
    let id: i64 = raw
        .query_row(
            "SELECT id FROM events WHERE session_id = '01JOLD-A' AND session_seq = 10",
            [],
            |r| r.get(0),
        )
        .unwrap();
    raw.execute(
        "UPDATE events SET sid = (SELECT sid FROM sessions WHERE id = '01JOLD-B') WHERE id = ?1",
        [id],
    )
    .unwrap();
    let (bad, reason) = first_bad(&store);
    assert_eq!(bad, id);
    assert!(reason.contains("points to another session"), "{reason}");
}

#[test]
fn an_edited_field_is_named_by_verify() {
    let (_dir, store, raw) = store_and_raw();
    raw.execute("UPDATE events SET host = 'evil.example' WHERE id = 7", [])
        .unwrap();
    let (id, reason) = first_bad(&store);
    assert_eq!(id, 7);
    assert!(reason.contains("edited"), "{reason}");
}

#[test]
fn edits_that_keep_the_meaning_are_still_caught() {
    // Whitespace inside the JSON detail, and the same number stored as text.
    let (_dir, store, raw) = store_and_raw();
    raw.execute(
        "UPDATE events SET detail = ' ' || detail WHERE id = (SELECT MIN(id) FROM events WHERE detail IS NOT NULL)",
        [],
    )
    .unwrap();
    let expected: i64 = raw
        .query_row(
            "SELECT MIN(id) FROM events WHERE detail IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(first_bad(&store).0, expected);

    // The same time, one millisecond later.
    let (_dir, store, raw) = store_and_raw();
    raw.execute("UPDATE events SET ts_ms = ts_ms + 1 WHERE id = 3", [])
        .unwrap();
    assert_eq!(first_bad(&store).0, 3);
}

#[test]
fn an_edited_session_attribution_is_caught_at_every_record_that_uses_it() {
    // The session's user id, code hash and id are stored once, in `sessions`, and hashed into
    // every record of the session that does not store its own.
    for (edit, column) in [
        (
            "UPDATE sessions SET user_id = 'mallory' WHERE id = '01JTAMPER-B'",
            "user_id",
        ),
        (
            "UPDATE sessions SET code_sha256 = 'c0ffee' WHERE id = '01JTAMPER-B'",
            "code_sha256",
        ),
        (
            "UPDATE sessions SET id = '01JTAMPER-C' WHERE id = '01JTAMPER-B'",
            "session_id",
        ),
    ] {
        let (_dir, store, raw) = store_and_raw();
        let uses: Vec<i64> = {
            let mut stmt = raw
                .prepare(&format!(
                    "SELECT e.id FROM events e JOIN sessions s ON s.sid = e.sid
                     WHERE s.id = '01JTAMPER-B' AND e.{column} IS NULL ORDER BY e.id"
                ))
                .unwrap();
            let rows = stmt.query_map([], |r| r.get(0)).unwrap();
            rows.map(Result::unwrap).collect()
        };
        assert!(!uses.is_empty());
        raw.execute(edit, []).unwrap();
        let report = store.verify().unwrap();
        assert_eq!(
            report.first_bad.as_ref().map(|b| b.0),
            Some(uses[0]),
            "{edit}"
        );
        assert_eq!(report.bad_records, uses.len() as u64, "{edit}: {report:?}");
    }
}

#[test]
fn a_record_moved_to_another_session_is_named_by_verify() {
    let (_dir, store, raw) = store_and_raw();
    raw.execute(
        "UPDATE events SET sid = (SELECT sid FROM sessions WHERE id = '01JTAMPER-A'), session_seq = 99
         WHERE id = (SELECT MAX(e.id) FROM events e JOIN sessions s ON s.sid = e.sid WHERE s.id = '01JTAMPER-B')",
        [],
    )
    .unwrap();
    assert!(first_bad(&store).1.contains("edited"));
}

#[test]
fn a_record_moved_to_another_session_with_its_attribution_copied_in_is_named_by_verify() {
    // A new record's hash covers its session's id, user and code hash whether they come from
    // the session row or from the record's own columns. Copying them into the record and then
    // pointing `sid` elsewhere (here: at no session, so no sequence number can clash) keeps the
    // hash right, but session filters go by `sid`: the record would vanish from its session's
    // view.
    let (_dir, store, raw) = store_and_raw();
    let id: i64 = raw
        .query_row(
            "SELECT MAX(e.id) FROM events e JOIN sessions s ON s.sid = e.sid WHERE s.id = '01JTAMPER-B'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    raw.execute(
        "UPDATE events SET session_id = s.id, user_id = s.user_id, code_sha256 = s.code_sha256,
                sid = 999
         FROM sessions s WHERE s.sid = events.sid AND events.id = ?1",
        [id],
    )
    .unwrap();
    let (bad, reason) = first_bad(&store);
    assert_eq!(bad, id);
    assert!(reason.contains("points to another session"), "{reason}");
}

#[test]
fn a_record_the_time_index_does_not_cover_is_named_by_verify() {
    // Time filters go through `batches`; a doctored one would hide records from them.
    let (_dir, store, raw) = store_and_raw();
    raw.execute("DELETE FROM batches WHERE first_id = 8", [])
        .unwrap();
    let (id, reason) = first_bad(&store);
    assert_eq!(id, 8);
    assert!(reason.contains("time index"), "{reason}");
    let (_dir, store, raw) = store_and_raw();
    raw.execute("UPDATE batches SET max_ms = min_ms WHERE first_id = 1", [])
        .unwrap();
    assert!(first_bad(&store).1.contains("time index"));
}

#[test]
fn the_sample_has_records_with_and_without_a_process() {
    let (_dir, _store, raw) = store_and_raw();
    let (with, without): (i64, i64) = raw
        .query_row(
            "SELECT SUM(pid IS NOT NULL), SUM(pid IS NULL) FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(with > 0 && without > 0, "{with} {without}");
}

#[test]
fn an_edited_or_removed_process_attribution_is_named_by_verify() {
    let attributed = |raw: &Connection| -> i64 {
        raw.query_row(
            "SELECT MIN(id) FROM events WHERE pid IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    for edit in [
        "UPDATE events SET exe = '/usr/bin/pip' WHERE id = ?1",
        "UPDATE events SET pid = pid + 1 WHERE id = ?1",
        "UPDATE events SET cmdline = '[\"pip\",\"install\"]' WHERE id = ?1",
        "UPDATE events SET pid = NULL, exe = NULL, cmdline = NULL WHERE id = ?1",
    ] {
        let (_dir, store, raw) = store_and_raw();
        let id = attributed(&raw);
        raw.execute(edit, [id]).unwrap();
        let (bad, reason) = first_bad(&store);
        assert_eq!(bad, id, "{edit}");
        assert!(reason.contains("edited"), "{edit}: {reason}");
    }
    // Adding an attribution to a record that had none is an edit too.
    let (_dir, store, raw) = store_and_raw();
    let id: i64 = raw
        .query_row("SELECT MIN(id) FROM events WHERE pid IS NULL", [], |r| {
            r.get(0)
        })
        .unwrap();
    raw.execute("UPDATE events SET pid = 1 WHERE id = ?1", [id])
        .unwrap();
    assert_eq!(first_bad(&store).0, id);
}

#[test]
fn an_edit_with_a_recomputed_hash_is_caught_at_the_next_record() {
    let (_dir, store, raw) = store_and_raw();
    raw.execute("UPDATE events SET verdict = 'allow' WHERE id = 9", [])
        .unwrap();
    let forged = documented_hash(&raw, 9);
    raw.execute("UPDATE events SET hash = ?1 WHERE id = 9", [&forged])
        .unwrap();
    let (id, reason) = first_bad(&store);
    assert_eq!(id, 10);
    assert!(reason.contains("prev_hash"), "{reason}");
}

#[test]
fn a_deleted_record_is_named_by_verify() {
    let (_dir, store, raw) = store_and_raw();
    raw.execute("DELETE FROM events WHERE id = 7", []).unwrap();
    let (id, reason) = first_bad(&store);
    assert_eq!(id, 7);
    assert!(reason.contains("missing"), "{reason}");
}

#[test]
fn a_deleted_first_record_is_named_by_verify() {
    let (_dir, store, raw) = store_and_raw();
    raw.execute("DELETE FROM events WHERE id = 1", []).unwrap();
    assert_eq!(first_bad(&store).0, 1);
}

#[test]
fn records_deleted_from_the_end_are_caught_through_the_chain_head() {
    let (_dir, store, raw) = store_and_raw();
    raw.execute("DELETE FROM events WHERE id >= 19", [])
        .unwrap();
    let (id, reason) = first_bad(&store);
    assert_eq!(id, 19);
    assert!(reason.contains("end"), "{reason}");
}

#[test]
fn two_records_with_swapped_sequence_numbers_are_caught_at_the_first() {
    let (_dir, store, raw) = store_and_raw();
    raw.execute_batch(
        "UPDATE events SET id = -1 WHERE id = 4;
         UPDATE events SET id = 4 WHERE id = 12;
         UPDATE events SET id = 12 WHERE id = -1;",
    )
    .unwrap();
    let report = store.verify().unwrap();
    assert_eq!(
        report.first_bad.as_ref().map(|b| b.0),
        Some(4),
        "{report:?}"
    );
    assert_eq!(report.checked, 20);
}

#[test]
fn swapped_session_sequence_numbers_are_caught() {
    let (_dir, store, raw) = store_and_raw();
    let ids: Vec<i64> = {
        let mut stmt = raw
            .prepare("SELECT id FROM events WHERE sid = (SELECT sid FROM sessions WHERE id = '01JTAMPER-B') ORDER BY id LIMIT 2 OFFSET 3")
            .unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    };
    raw.execute_batch(&format!(
        "UPDATE events SET session_seq = -1 WHERE id = {a};
         UPDATE events SET session_seq = session_seq - 1 WHERE id = {b};
         UPDATE events SET session_seq = (SELECT session_seq + 1 FROM events WHERE id = {b}) WHERE id = {a};",
        a = ids[0],
        b = ids[1]
    ))
    .unwrap();
    assert_eq!(first_bad(&store).0, ids[0]);
}

#[test]
fn with_several_tampered_records_the_first_is_named_and_all_are_counted() {
    let (_dir, store, raw) = store_and_raw();
    raw.execute("UPDATE events SET port = 1 WHERE id = 15", [])
        .unwrap();
    raw.execute("UPDATE events SET user_id = 'mallory' WHERE id = 5", [])
        .unwrap();
    let report = store.verify().unwrap();
    assert_eq!(report.first_bad.as_ref().unwrap().0, 5);
    assert_eq!(report.bad_records, 2);
}

#[test]
fn a_record_appended_outside_the_writer_is_caught() {
    let (_dir, store, raw) = store_and_raw();
    raw.execute(
        "INSERT INTO events (id, sid, session_seq, kind, ts_ms, host, prev_hash, hash)
         SELECT 21, sid, 99, kind, ts_ms, host, hash, hash FROM events WHERE id = 20",
        [],
    )
    .unwrap();
    assert_eq!(first_bad(&store).0, 21);
}

/// The store of [`store_and_raw`] with its first 8 records pruned (an anchor at record 8).
fn pruned() -> (tempfile::TempDir, Store, Connection) {
    let (dir, mut store, raw) = store_and_raw();
    let cutoff: i64 = raw
        .query_row("SELECT ts_ms FROM events WHERE id = 9", [], |r| r.get(0))
        .unwrap();
    let report = store
        .prune_before(cordon_audit::Timestamp::from_millis(cutoff))
        .unwrap();
    assert_eq!(report.deleted, 8);
    assert!(store.verify().unwrap().is_ok());
    (dir, store, raw)
}

#[test]
fn a_deleted_anchor_leaves_the_pruned_records_missing() {
    let (_dir, store, raw) = pruned();
    raw.execute("DELETE FROM anchors", []).unwrap();
    let (id, reason) = first_bad(&store);
    assert_eq!(id, 1);
    assert!(reason.contains("1..=8 are missing"), "{reason}");
}

#[test]
fn an_edited_anchor_is_caught_at_the_first_remaining_record() {
    let (_dir, store, raw) = pruned();
    raw.execute("UPDATE anchors SET hash = ?1", [cordon_audit::GENESIS_HASH])
        .unwrap();
    assert_eq!(first_bad(&store).0, 9);
    let (_dir, store, raw) = pruned();
    raw.execute("UPDATE anchors SET seq = 7", []).unwrap();
    assert_eq!(first_bad(&store).0, 8);
}

#[test]
fn records_deleted_after_a_prune_are_still_named() {
    let (_dir, store, raw) = pruned();
    raw.execute("DELETE FROM events WHERE id = 12", []).unwrap();
    assert_eq!(first_bad(&store).0, 12);
    // Deleting the first remaining record looks like a gap right after the anchor.
    let (_dir, store, raw) = pruned();
    raw.execute("DELETE FROM events WHERE id = 9", []).unwrap();
    assert_eq!(first_bad(&store).0, 9);
}
