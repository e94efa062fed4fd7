//! Checking the hash chain, and pruning without breaking it.
//!
//! Guarantees:
//! - [`Store::verify`] walks every record in id order inside one read transaction and reports the
//!   first bad one: a gap in the ids (a deleted record), a `prev_hash` that is not the previous
//!   record's hash (a reordered, inserted or re-hashed record), a hash that does not match the
//!   record's contents as it reads back (an edited record, or an edited session id, user id or
//!   code hash in `sessions`), a record from before schema 3 whose session number points to
//!   another session, a record that the time index (`batches`) does not cover (time queries
//!   would miss it), or a chain that ends before or after the recorded chain head (records
//!   deleted from, or appended past, the end). It keeps walking after the first problem,
//!   re-synchronising on the stored hash, so `bad_records` counts them all. Both hash formats
//!   ([`crate::chain`]) are checked, each by its own rule.
//! - [`Store::prune_before`] deletes a prefix of the chain — every record up to (not including)
//!   the first one at or after the cutoff — and records an anchor holding the last deleted
//!   record's id and hash, in the same `BEGIN IMMEDIATE` transaction. Verification starts from
//!   the newest anchor, so the remaining chain still verifies. Pruning refuses to run on a chain
//!   that does not verify: it would otherwise destroy the evidence and bless what remains.
//! - The session summaries of the sessions that lost events are recomputed from what remains;
//!   sessions with no events left are removed, and so are the time index rows of deleted
//!   batches.

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use crate::chain::{
    hash_text, hash_value, record_hash_v1, record_hash_v2, unhex, Hash, GENESIS_HASH,
    HASHED_COLUMNS, V2_COLUMNS,
};
use crate::query::{RECORD_FROM, RECORD_SELECT};
use crate::schema::BLOCKED_SQL;
use crate::store::{read_head, ChainHead, Store, StoreError};
use crate::timestamp::Timestamp;

/// Where the remaining chain starts after a prune.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Anchor {
    /// Id of the last pruned record; the first remaining record has id `seq + 1`.
    pub seq: i64,
    /// Hash of the last pruned record: the first remaining record's `prev_hash`.
    pub hash: String,
    /// The prune removed records older than this.
    pub cutoff: Timestamp,
    /// When the prune ran.
    pub created: Timestamp,
    /// How many records that prune deleted.
    pub deleted: u64,
}

/// The outcome of [`Store::verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Records examined.
    pub checked: u64,
    /// The first bad record's id and what is wrong with it.
    pub first_bad: Option<(i64, String)>,
    /// How many problems were found in total.
    pub bad_records: u64,
    /// The anchor verification started from, if the store was ever pruned.
    pub anchor: Option<Anchor>,
    /// The chain head as recorded in the store.
    pub head: ChainHead,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// The outcome of [`Store::prune_before`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    pub deleted: u64,
    /// The anchor written by this prune (`None` when nothing was old enough).
    pub anchor: Option<Anchor>,
}

fn flag(report: &mut VerifyReport, id: i64, reason: String) {
    report.bad_records += 1;
    if report.first_bad.is_none() {
        report.first_bad = Some((id, reason));
    }
}

fn latest_anchor(conn: &Connection) -> rusqlite::Result<Option<Anchor>> {
    conn.query_row(
        "SELECT seq, hash, cutoff_ms, created_ms, deleted FROM anchors ORDER BY seq DESC LIMIT 1",
        [],
        |row| {
            Ok(Anchor {
                seq: row.get(0)?,
                hash: row.get(1)?,
                cutoff: Timestamp::from_millis(row.get(2)?),
                created: Timestamp::from_millis(row.get(3)?),
                deleted: u64::try_from(row.get::<_, i64>(4)?).unwrap_or(0),
            })
        },
    )
    .optional()
}

/// The columns a record from before schema 3 stores itself and hashes (chain v1), after
/// [`RECORD_SELECT`]: `session_id`, `user_id`, `code_sha256`, `ts`, then the session row's id.
const RAW_SELECT: &str = "e.session_id, e.user_id, e.code_sha256, e.ts, s.id";

/// One row of `batches`.
struct Batch {
    first_id: i64,
    last_id: i64,
    min_ms: i64,
    max_ms: i64,
}

/// Walks the chain on `conn` (which the caller keeps inside one transaction).
fn verify_on(conn: &Connection) -> rusqlite::Result<VerifyReport> {
    let head = read_head(conn)?;
    let anchor = latest_anchor(conn)?;
    let (mut expected_id, start) = match &anchor {
        Some(a) => (a.seq + 1, a.hash.as_str()),
        None => (1, GENESIS_HASH),
    };
    // What the next record must link to; `None` when the stored link is not a hash at all.
    let mut expected_prev: Option<Hash> = unhex(start.as_bytes());
    let mut last_stored = start.to_owned();
    let mut report = VerifyReport {
        checked: 0,
        first_bad: None,
        bad_records: 0,
        anchor,
        head,
    };
    let mut batches_stmt =
        conn.prepare("SELECT first_id, last_id, min_ms, max_ms FROM batches ORDER BY first_id")?;
    let mut batches = batches_stmt.query_map([], |row| {
        Ok(Batch {
            first_id: row.get(0)?,
            last_id: row.get(1)?,
            min_ms: row.get(2)?,
            max_ms: row.get(3)?,
        })
    })?;
    let mut batch: Option<Batch> = None;
    let n = V2_COLUMNS.len();
    let sql = format!("SELECT {RECORD_SELECT}, {RAW_SELECT} FROM {RECORD_FROM} ORDER BY e.id");
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query([])?;
    let mut scratch = Vec::with_capacity(512);
    while let Some(row) = rows.next()? {
        report.checked += 1;
        let id: i64 = row.get(0)?;
        let ts_ms: Option<i64> = row.get(6)?;
        let prev = row.get_ref(n + 1)?;
        let stored = row.get_ref(n + 2)?;
        let stored_hash = hash_value(stored);
        while batch.as_ref().is_none_or(|b| b.last_id < id) {
            match batches.next().transpose()? {
                Some(b) => batch = Some(b),
                None => break,
            }
        }
        let covered = batch.as_ref().is_some_and(|b| {
            b.first_id <= id
                && id <= b.last_id
                && ts_ms.is_some_and(|t| b.min_ms <= t && t <= b.max_ms)
        });
        if id < expected_id {
            flag(
                &mut report,
                id,
                format!("record {id} precedes the start of the chain (expected {expected_id})"),
            );
        } else if id > expected_id {
            let missing = if id == expected_id + 1 {
                format!("record {expected_id} is missing (deleted)")
            } else {
                format!("records {expected_id}..={} are missing (deleted)", id - 1)
            };
            flag(&mut report, expected_id, missing);
        } else if expected_prev.is_none() || hash_value(prev) != expected_prev {
            flag(
                &mut report,
                id,
                format!(
                    "prev_hash does not match record {}'s hash: records were reordered, inserted, or re-hashed after an edit",
                    id - 1
                ),
            );
        } else if let Some(problem) = check_record(row, id, prev, stored, &mut scratch)? {
            flag(&mut report, id, problem);
        } else if !covered {
            flag(
                &mut report,
                id,
                format!("record {id} is not covered by the time index (batches): time filters would miss it"),
            );
        }
        // Re-synchronise on what is stored, so one problem is reported once.
        expected_id = id + 1;
        expected_prev = stored_hash;
        last_stored = hash_text(stored);
    }
    let last_id = expected_id - 1;
    let head = report.head.clone();
    if last_id < head.seq {
        let first_missing = last_id + 1;
        flag(
            &mut report,
            first_missing,
            format!(
                "records {first_missing}..={} are missing from the end (the chain head is {})",
                head.seq, head.seq
            ),
        );
    } else if last_id > head.seq {
        flag(
            &mut report,
            head.seq + 1,
            format!(
                "records past the chain head ({}) were added outside the writer",
                head.seq
            ),
        );
    } else if last_stored != head.hash {
        flag(
            &mut report,
            last_id,
            "the chain ends on a hash that differs from the recorded chain head".to_owned(),
        );
    }
    Ok(report)
}

/// Checks one record's own hash (its link was checked by the caller); `Some(problem)` if bad.
/// A hash stored as a BLOB is chain v2 over the values as they read back; as TEXT, chain v1
/// over the stored columns. Either way a session id stored in the record itself must be the
/// one its `sid` points to: the hash covers the stored id, but session filters go by `sid`.
fn check_record(
    row: &rusqlite::Row<'_>,
    id: i64,
    prev: ValueRef<'_>,
    stored: ValueRef<'_>,
    scratch: &mut Vec<u8>,
) -> rusqlite::Result<Option<String>> {
    let n = V2_COLUMNS.len();
    let edited = || {
        Some("hash does not match the record's contents: the record (or its session's attribution) was edited".to_owned())
    };
    // `session_id`, `user_id`, `code_sha256`, `ts` as stored, then the session's id.
    let raw = |i: usize| row.get_ref(n + 3 + i);
    let (session_id, session_of_sid) = (raw(0)?, raw(4)?);
    let moved = || {
        Some(format!(
            "record {id} belongs to session {} but its session number points to another session",
            String::from_utf8_lossy(session_id.as_bytes().unwrap_or_default())
        ))
    };
    match stored {
        ValueRef::Blob(stored) => {
            let fields = (1..=n)
                .map(|i| row.get_ref(i))
                .collect::<rusqlite::Result<Vec<ValueRef<'_>>>>()?;
            let Some(prev) = hash_value(prev) else {
                return Ok(edited());
            };
            if record_hash_v2(scratch, &prev, &fields, id)[..] != *stored {
                return Ok(edited());
            }
            // The writer leaves `session_id` NULL (the session row names it); one stored here
            // is hashed as the record's session, so it must be the session `sid` points to.
            if session_id != ValueRef::Null && session_id != session_of_sid {
                return Ok(moved());
            }
            Ok(None)
        }
        ValueRef::Text(stored) => {
            let fields = HASHED_COLUMNS
                .iter()
                .map(|column| match *column {
                    "session_id" => Ok(session_id),
                    "user_id" => raw(1),
                    "code_sha256" => raw(2),
                    "ts" => raw(3),
                    other => {
                        let i = V2_COLUMNS.iter().position(|c| *c == other).unwrap_or(0);
                        row.get_ref(i + 1)
                    }
                })
                .collect::<rusqlite::Result<Vec<ValueRef<'_>>>>()?;
            let prev_text = match prev {
                ValueRef::Text(t) => t,
                _ => &[][..],
            };
            if record_hash_v1(prev_text, &fields, id).as_bytes() != stored {
                return Ok(edited());
            }
            if session_id != session_of_sid {
                return Ok(moved());
            }
            Ok(None)
        }
        _ => Ok(edited()),
    }
}

impl Store {
    /// Verifies the whole chain (see the module guarantees).
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        // A read transaction, so the walk sees one snapshot while writers carry on.
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(self.sql_err("begin verify transaction"))?;
        let report = verify_on(&tx).map_err(self.sql_err("verify chain"))?;
        tx.commit()
            .map_err(self.sql_err("end verify transaction"))?;
        Ok(report)
    }

    /// Deletes every record up to the first one at or after `cutoff` and anchors the rest (see the
    /// module guarantees). Refuses with [`StoreError::ChainBroken`] if the chain does not verify.
    pub fn prune_before(&mut self, cutoff: Timestamp) -> Result<PruneReport, StoreError> {
        let path = self.path.clone();
        let sql_err = |step| {
            let path = path.clone();
            move |source| StoreError::Sql { path, step, source }
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err("begin prune transaction"))?;
        let report = verify_on(&tx).map_err(sql_err("verify before pruning"))?;
        if let Some((id, reason)) = report.first_bad {
            return Err(StoreError::ChainBroken { path, id, reason });
        }
        let start = report.anchor.as_ref().map_or(0, |a| a.seq);
        let first_kept: Option<i64> = tx
            .query_row(
                "SELECT MIN(id) FROM events WHERE ts_ms >= ?1
                 AND id >= (SELECT MIN(+first_id) FROM batches WHERE max_ms >= ?1)",
                [cutoff.as_millis()],
                |row| row.get(0),
            )
            .map_err(sql_err("find the first record to keep"))?;
        let last_pruned = match first_kept {
            Some(id) => id - 1,
            None => report.head.seq,
        };
        if last_pruned <= start {
            return Ok(PruneReport {
                deleted: 0,
                anchor: None,
            });
        }
        let hash: String = tx
            .query_row(
                "SELECT hash FROM events WHERE id = ?1",
                [last_pruned],
                |row| row.get_ref(0).map(hash_text),
            )
            .map_err(sql_err("read the last pruned record"))?;
        tx.execute(
            "CREATE TEMP TABLE IF NOT EXISTS pruned_sessions (sid INTEGER PRIMARY KEY)",
            [],
        )
        .map_err(sql_err("create pruned session list"))?;
        tx.execute("DELETE FROM temp.pruned_sessions", [])
            .map_err(sql_err("clear pruned session list"))?;
        tx.execute(
            "INSERT OR IGNORE INTO temp.pruned_sessions SELECT sid FROM events WHERE id <= ?1",
            [last_pruned],
        )
        .map_err(sql_err("list pruned sessions"))?;
        let deleted = tx
            .execute("DELETE FROM events WHERE id <= ?1", [last_pruned])
            .map_err(sql_err("delete old records"))?;
        let deleted = u64::try_from(deleted).unwrap_or(u64::MAX);
        tx.execute("DELETE FROM batches WHERE last_id <= ?1", [last_pruned])
            .map_err(sql_err("delete old time index rows"))?;
        let anchor = Anchor {
            seq: last_pruned,
            hash,
            cutoff,
            created: Timestamp::now(),
            deleted,
        };
        tx.execute(
            "INSERT INTO anchors (seq, hash, cutoff_ms, created_ms, deleted) VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![
                anchor.seq,
                anchor.hash,
                anchor.cutoff.as_millis(),
                anchor.created.as_millis(),
                i64::try_from(anchor.deleted).unwrap_or(i64::MAX),
            ],
        )
        .map_err(sql_err("write anchor"))?;
        tx.execute_batch(&format!(
            "UPDATE sessions SET
                events      = (SELECT COUNT(*) FROM events e WHERE e.sid = sessions.sid),
                blocked     = (SELECT COUNT(*) FROM events e WHERE e.sid = sessions.sid AND {BLOCKED_SQL}),
                would_block = (SELECT COUNT(*) FROM events e WHERE e.sid = sessions.sid AND verdict = 'report-would-block'),
                bytes_up    = (SELECT COALESCE(SUM(bytes_up), 0) FROM events e WHERE e.sid = sessions.sid),
                bytes_down  = (SELECT COALESCE(SUM(bytes_down), 0) FROM events e WHERE e.sid = sessions.sid),
                first_ms    = COALESCE((SELECT MIN(ts_ms) FROM events e WHERE e.sid = sessions.sid), first_ms)
             WHERE sid IN (SELECT sid FROM temp.pruned_sessions);
             DELETE FROM sessions WHERE events = 0 AND sid IN (SELECT sid FROM temp.pruned_sessions);
             DELETE FROM temp.pruned_sessions;"
        ))
        .map_err(sql_err("recompute session summaries"))?;
        tx.commit().map_err(sql_err("commit prune"))?;
        Ok(PruneReport {
            deleted,
            anchor: Some(anchor),
        })
    }
}
