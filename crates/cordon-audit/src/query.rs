//! Reading the store: session summaries, filtered events, JSON-lines export.
//!
//! Guarantees:
//! - Every query runs in one read transaction, so it sees one consistent snapshot even while
//!   other processes write; readers never block writers (WAL).
//! - Listing sessions reads only the `sessions` summary table (indexed by time), never events.
//! - Events come back oldest first (by global sequence). With a `limit`, the newest `limit`
//!   matching events are returned, still oldest first — what `tail` wants.
//! - [`Store::export_jsonl`] streams: one record is in memory at a time, whatever the size of
//!   the result. Each line is one [`EventRecord`] with stable field names.
//! - A session filter is a prefix match; `*`, `?` and `[` in it are matched literally.
//! - A record reads back with its session's id, user id and code hash unless it stores its own
//!   ([`crate::schema`]): exactly the values the hash chain covers ([`crate::chain`]).
//! - Filters use the store's indexes: a session or user filter goes through `sessions` and the
//!   `(sid, session_seq)` index, a time filter becomes an id range through `batches`; no filter
//!   scans more than the id range its times allow.

use std::io::Write;

use rusqlite::types::Value;
use serde::{Deserialize, Serialize};

use crate::chain::{hash_text, V2_COLUMNS};
use crate::event::{Event, EventKind, EventRecord, Verdict};
use crate::schema::BLOCKED_SQL;
use crate::store::{Store, StoreError};
use crate::timestamp::Timestamp;

/// Which events to return. The default matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Session id prefix.
    pub session: Option<String>,
    pub user: Option<String>,
    pub kind: Option<EventKind>,
    pub verdict: Option<Verdict>,
    /// Only events that count as blocked ([`Event::is_blocked`]).
    pub blocked_only: bool,
    /// Events at or after this time.
    pub since: Option<Timestamp>,
    /// Events strictly before this time.
    pub until: Option<Timestamp>,
    /// Events with a global id greater than this (for `tail --follow`).
    pub after_id: Option<i64>,
    /// At most this many: the newest ones.
    pub limit: Option<usize>,
}

/// Which sessions to list. The default lists all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionFilter {
    /// Session id prefix.
    pub session: Option<String>,
    pub user: Option<String>,
    /// Sessions whose first event is at or after this time.
    pub since: Option<Timestamp>,
    /// Sessions whose first event is strictly before this time.
    pub until: Option<Timestamp>,
    /// At most this many: the most recent ones.
    pub limit: Option<usize>,
}

/// One session, as `cordon audit sessions` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSummary {
    pub id: String,
    pub user_id: String,
    pub code_sha256: String,
    /// From the `session_start` event's `detail.command`.
    pub command: Option<String>,
    /// The `session_start` event's time, or the first event's if there was none.
    pub started: Timestamp,
    /// The `session_end` event's time; `None` while running (or if the supervisor died).
    pub ended: Option<Timestamp>,
    pub last_event: Timestamp,
    pub exit_status: Option<i64>,
    pub limit_hit: Option<String>,
    pub events: u64,
    /// Events that count as blocked ([`Event::is_blocked`]).
    pub blocked: u64,
    /// Events with verdict `report-would-block` (shadow mode).
    pub would_block: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// `*`, `?` and `[` are GLOB metacharacters; wrap each in a bracket so it matches literally.
fn glob_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        match c {
            '*' | '?' | '[' => {
                out.push('[');
                out.push(c);
                out.push(']');
            }
            _ => out.push(c),
        }
    }
    out.push('*');
    out
}

fn limit_value(limit: usize) -> Value {
    Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX))
}

/// A record as it reads back: `id`, the values of [`V2_COLUMNS`] (the session's attribution
/// unless the record has its own), `prev_hash`, `hash`; from [`RECORD_FROM`].
pub(crate) const RECORD_SELECT: &str = "e.id, COALESCE(e.session_id, s.id), e.session_seq, \
    e.kind, COALESCE(e.user_id, s.user_id), COALESCE(e.code_sha256, s.code_sha256), e.ts_ms, \
    e.host, e.ip, e.port, e.method, e.path, e.bytes_up, e.bytes_down, e.duration_ms, e.verdict, \
    e.rule, e.reason, e.detail, e.pid, e.exe, e.cmdline, e.prev_hash, e.hash";

/// The tables [`RECORD_SELECT`] reads: a record without a session row still comes back (and
/// fails to load, rather than vanishing).
pub(crate) const RECORD_FROM: &str = "events e LEFT JOIN sessions s ON s.sid = e.sid";

/// The SQL and parameters for `filter`: a pure function, pinned by tests.
pub(crate) fn events_sql(filter: &EventFilter) -> (String, Vec<Value>) {
    let mut clauses: Vec<String> = Vec::new();
    let mut params: Vec<Value> = Vec::new();
    // Every `?` of `clause` is the same new parameter.
    let mut param = |clause: &str, value: Value, clauses: &mut Vec<String>| {
        params.push(value);
        clauses.push(clause.replace('?', &format!("?{}", params.len())));
    };
    if let Some(session) = &filter.session {
        param(
            "e.sid IN (SELECT sid FROM sessions WHERE id GLOB ?)",
            Value::Text(glob_prefix(session)),
            &mut clauses,
        );
    }
    if let Some(user) = &filter.user {
        // The session's user, unless the record has its own.
        param(
            "((e.user_id IS NULL AND e.sid IN (SELECT sid FROM sessions WHERE user_id = ?)) \
             OR e.user_id = ?)",
            Value::Text(user.clone()),
            &mut clauses,
        );
    }
    if let Some(kind) = filter.kind {
        param(
            "e.kind = ?",
            Value::Text(kind.as_str().into()),
            &mut clauses,
        );
    }
    if let Some(verdict) = filter.verdict {
        param(
            "e.verdict = ?",
            Value::Text(verdict.as_str().into()),
            &mut clauses,
        );
    }
    // A record with `ts_ms >= since` lies in a batch whose newest time is `>= since`: the first
    // such batch bounds the ids from below (NULL when there is none: no record matches).
    if let Some(since) = filter.since {
        param(
            "e.ts_ms >= ? AND e.id >= (SELECT MIN(+first_id) FROM batches WHERE max_ms >= ?)",
            Value::Integer(since.as_millis()),
            &mut clauses,
        );
    }
    if let Some(until) = filter.until {
        param(
            "e.ts_ms < ? AND e.id <= (SELECT MAX(+last_id) FROM batches WHERE min_ms < ?)",
            Value::Integer(until.as_millis()),
            &mut clauses,
        );
    }
    if let Some(after) = filter.after_id {
        param("e.id > ?", Value::Integer(after), &mut clauses);
    }
    if filter.blocked_only {
        clauses.push(BLOCKED_SQL.to_owned());
    }
    let where_sql = if clauses.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", clauses.join(" AND "))
    };
    let sql = match filter.limit {
        None => format!("SELECT {RECORD_SELECT} FROM {RECORD_FROM}{where_sql} ORDER BY e.id"),
        Some(limit) => {
            params.push(limit_value(limit));
            format!(
                "SELECT * FROM (SELECT {RECORD_SELECT} FROM {RECORD_FROM}{where_sql} \
                 ORDER BY e.id DESC LIMIT ?{}) ORDER BY 1",
                params.len()
            )
        }
    };
    (sql, params)
}

fn sessions_sql(filter: &SessionFilter) -> (String, Vec<Value>) {
    let mut clauses: Vec<String> = Vec::new();
    let mut params: Vec<Value> = Vec::new();
    if let Some(session) = &filter.session {
        params.push(Value::Text(glob_prefix(session)));
        clauses.push(format!("id GLOB ?{}", params.len()));
    }
    if let Some(user) = &filter.user {
        params.push(Value::Text(user.clone()));
        clauses.push(format!("user_id = ?{}", params.len()));
    }
    if let Some(since) = filter.since {
        params.push(Value::Integer(since.as_millis()));
        clauses.push(format!("first_ms >= ?{}", params.len()));
    }
    if let Some(until) = filter.until {
        params.push(Value::Integer(until.as_millis()));
        clauses.push(format!("first_ms < ?{}", params.len()));
    }
    let where_sql = if clauses.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", clauses.join(" AND "))
    };
    let limit_sql = match filter.limit {
        Some(limit) => {
            params.push(limit_value(limit));
            format!(" LIMIT ?{}", params.len())
        }
        None => String::new(),
    };
    let sql = format!(
        "SELECT id, user_id, code_sha256, command, started_ms, ended_ms, exit_status, limit_hit, \
         first_ms, last_ms, events, blocked, would_block, bytes_up, bytes_down \
         FROM sessions{where_sql} ORDER BY first_ms DESC, id{limit_sql}"
    );
    (sql, params)
}

fn non_negative(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl Store {
    /// Sessions matching `filter`, most recent first.
    pub fn sessions(&self, filter: &SessionFilter) -> Result<Vec<SessionSummary>, StoreError> {
        let (sql, params) = sessions_sql(filter);
        let mut stmt = self
            .conn
            .prepare(&sql)
            .map_err(self.sql_err("prepare session query"))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(params), |row| {
                let first_ms: i64 = row.get(8)?;
                let started_ms: Option<i64> = row.get(4)?;
                Ok(SessionSummary {
                    id: row.get(0)?,
                    user_id: row.get(1)?,
                    code_sha256: row.get(2)?,
                    command: row.get(3)?,
                    started: Timestamp::from_millis(started_ms.unwrap_or(first_ms)),
                    ended: row.get::<_, Option<i64>>(5)?.map(Timestamp::from_millis),
                    exit_status: row.get(6)?,
                    limit_hit: row.get(7)?,
                    last_event: Timestamp::from_millis(row.get(9)?),
                    events: non_negative(row.get(10)?),
                    blocked: non_negative(row.get(11)?),
                    would_block: non_negative(row.get(12)?),
                    bytes_up: non_negative(row.get(13)?),
                    bytes_down: non_negative(row.get(14)?),
                })
            })
            .map_err(self.sql_err("query sessions"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(self.sql_err("read session row"))
    }

    /// The one session whose id starts with `prefix` (an exact id always wins).
    pub fn resolve_session(&self, prefix: &str) -> Result<String, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM sessions WHERE id GLOB ?1 ORDER BY first_ms DESC LIMIT 5")
            .map_err(self.sql_err("prepare session lookup"))?;
        let ids = stmt
            .query_map([glob_prefix(prefix)], |row| row.get::<_, String>(0))
            .map_err(self.sql_err("look up session"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql_err("read session id"))?;
        if ids.iter().any(|id| id == prefix) {
            return Ok(prefix.to_owned());
        }
        match ids.as_slice() {
            [] => Err(StoreError::NoSuchSession {
                prefix: prefix.to_owned(),
            }),
            [only] => Ok(only.clone()),
            many => Err(StoreError::AmbiguousSession {
                prefix: prefix.to_owned(),
                candidates: many.join(", "),
            }),
        }
    }

    /// Events matching `filter`, oldest first (see the module guarantees for `limit`).
    pub fn events(&self, filter: &EventFilter) -> Result<Vec<EventRecord>, StoreError> {
        let mut out = Vec::new();
        self.for_each_event(filter, |record| {
            out.push(record);
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` on each event matching `filter`, oldest first, one at a time; stops at the first
    /// error `f` returns. Returns how many records were passed to `f`.
    pub fn for_each_event<F>(&self, filter: &EventFilter, mut f: F) -> Result<u64, StoreError>
    where
        F: FnMut(EventRecord) -> Result<(), StoreError>,
    {
        let (sql, params) = events_sql(filter);
        let mut stmt = self
            .conn
            .prepare(&sql)
            .map_err(self.sql_err("prepare event query"))?;
        let mut rows = stmt
            .query(rusqlite::params_from_iter(params))
            .map_err(self.sql_err("query events"))?;
        let mut count = 0;
        while let Some(row) = rows.next().map_err(self.sql_err("read event row"))? {
            f(self.record_from_row(row)?)?;
            count += 1;
        }
        Ok(count)
    }

    /// Writes each event matching `filter` to `out` as one JSON object per line, streaming.
    /// Returns how many lines were written.
    pub fn export_jsonl<W: Write>(&self, filter: &EventFilter, out: W) -> Result<u64, StoreError> {
        let mut out = std::io::BufWriter::new(out);
        let count = self.for_each_event(filter, |record| {
            serde_json::to_writer(&mut out, &record).map_err(|source| {
                if source.is_io() {
                    StoreError::Export(std::io::Error::from(source))
                } else {
                    StoreError::Encode {
                        id: record.id,
                        source,
                    }
                }
            })?;
            out.write_all(b"\n").map_err(StoreError::Export)
        })?;
        out.flush().map_err(StoreError::Export)?;
        Ok(count)
    }

    /// Builds a record from a row of [`RECORD_SELECT`].
    fn record_from_row(&self, row: &rusqlite::Row<'_>) -> Result<EventRecord, StoreError> {
        let id: i64 = row.get(0).map_err(self.sql_err("read event id"))?;
        let bad = |reason: String| StoreError::BadRecord {
            path: self.path.clone(),
            id,
            reason,
        };
        let col = |name: &str| -> Result<usize, StoreError> {
            V2_COLUMNS
                .iter()
                .position(|c| *c == name)
                .map(|i| i + 1)
                .ok_or_else(|| bad(format!("no column {name}")))
        };
        let text = |name: &str| -> Result<Option<String>, StoreError> {
            row.get::<_, Option<String>>(col(name)?)
                .map_err(|e| bad(format!("{name}: {e}")))
        };
        let int = |name: &str| -> Result<Option<i64>, StoreError> {
            row.get::<_, Option<i64>>(col(name)?)
                .map_err(|e| bad(format!("{name}: {e}")))
        };
        let required_text = |name: &str| -> Result<String, StoreError> {
            text(name)?.ok_or_else(|| bad(format!("{name} is NULL")))
        };
        let unsigned = |name: &str| -> Result<Option<u64>, StoreError> {
            int(name)?
                .map(|n| u64::try_from(n).map_err(|_| bad(format!("{name} is negative: {n}"))))
                .transpose()
        };
        let kind: EventKind = required_text("kind")?
            .parse()
            .map_err(|e: crate::event::UnknownName| bad(e.to_string()))?;
        let verdict = text("verdict")?
            .map(|v| v.parse::<Verdict>())
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        let ip = text("ip")?
            .map(|ip| ip.parse())
            .transpose()
            .map_err(|e| bad(format!("ip: {e}")))?;
        let port = int("port")?
            .map(u16::try_from)
            .transpose()
            .map_err(|e| bad(format!("port: {e}")))?;
        let detail = match text("detail")? {
            None => serde_json::Value::Null,
            Some(json) => serde_json::from_str(&json).map_err(|e| bad(format!("detail: {e}")))?,
        };
        let ts_ms = int("ts_ms")?.ok_or_else(|| bad("ts_ms is NULL".into()))?;
        let process = match int("pid")? {
            None => None,
            Some(pid) => Some(crate::event::ProcessInfo {
                pid: u32::try_from(pid).map_err(|e| bad(format!("pid: {e}")))?,
                exe: text("exe")?.unwrap_or_default(),
                cmdline: match text("cmdline")? {
                    None => Vec::new(),
                    Some(json) => {
                        serde_json::from_str(&json).map_err(|e| bad(format!("cmdline: {e}")))?
                    }
                },
            }),
        };
        let n = V2_COLUMNS.len();
        Ok(EventRecord {
            id,
            session_seq: int("session_seq")?.ok_or_else(|| bad("session_seq is NULL".into()))?,
            event: Event {
                kind,
                session_id: required_text("session_id")?,
                user_id: required_text("user_id")?,
                code_sha256: required_text("code_sha256")?,
                ts: Timestamp::from_millis(ts_ms),
                host: text("host")?,
                ip,
                port,
                method: text("method")?,
                path: text("path")?,
                bytes_up: unsigned("bytes_up")?,
                bytes_down: unsigned("bytes_down")?,
                duration_ms: unsigned("duration_ms")?,
                verdict,
                rule: text("rule")?,
                reason: text("reason")?,
                detail,
                process,
            },
            prev_hash: row
                .get_ref(n + 1)
                .map(hash_text)
                .map_err(|e| bad(format!("prev_hash: {e}")))?,
            hash: row
                .get_ref(n + 2)
                .map(hash_text)
                .map_err(|e| bad(format!("hash: {e}")))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_metacharacters_in_a_session_prefix_match_literally() {
        assert_eq!(glob_prefix("01J"), "01J*");
        assert_eq!(glob_prefix("a*b?c[d"), "a[*]b[?]c[[]d*");
    }

    #[test]
    fn an_empty_filter_selects_everything_in_order() {
        let (sql, params) = events_sql(&EventFilter::default());
        assert!(
            sql.ends_with("FROM events e LEFT JOIN sessions s ON s.sid = e.sid ORDER BY e.id"),
            "{sql}"
        );
        assert!(params.is_empty());
    }

    #[test]
    fn every_filter_field_becomes_one_numbered_parameter() {
        let filter = EventFilter {
            session: Some("s".into()),
            user: Some("u".into()),
            kind: Some(EventKind::Blocked),
            verdict: Some(Verdict::Block),
            blocked_only: true,
            since: Some(Timestamp::from_millis(1)),
            until: Some(Timestamp::from_millis(2)),
            after_id: Some(3),
            limit: Some(4),
        };
        let (sql, params) = events_sql(&filter);
        assert_eq!(
            params,
            vec![
                Value::Text("s*".into()),
                Value::Text("u".into()),
                Value::Text("blocked".into()),
                Value::Text("block".into()),
                Value::Integer(1),
                Value::Integer(2),
                Value::Integer(3),
                Value::Integer(4),
            ]
        );
        for fragment in [
            "e.sid IN (SELECT sid FROM sessions WHERE id GLOB ?1)",
            "((e.user_id IS NULL AND e.sid IN (SELECT sid FROM sessions WHERE user_id = ?2))",
            "OR e.user_id = ?2)",
            "e.kind = ?3",
            "e.verdict = ?4",
            "e.ts_ms >= ?5 AND e.id >= (SELECT MIN(+first_id) FROM batches WHERE max_ms >= ?5)",
            "e.ts_ms < ?6 AND e.id <= (SELECT MAX(+last_id) FROM batches WHERE min_ms < ?6)",
            "e.id > ?7",
            BLOCKED_SQL,
            "ORDER BY e.id DESC LIMIT ?8) ORDER BY 1",
        ] {
            assert!(sql.contains(fragment), "{fragment} missing from {sql}");
        }
    }
}
