//! The on-disk schema.
//!
//! Guarantees:
//! - The schema is created idempotently inside one `BEGIN IMMEDIATE` transaction, so several
//!   processes opening a fresh file at once end up with exactly one schema.
//! - `PRAGMA user_version` records the schema version; a store written by a newer cordon is
//!   refused rather than misread. An older store is migrated in place, inside the same
//!   transaction that reads the version, so every process sees either the old schema or the new
//!   one, and a failed migration changes nothing.
//! - `events` is the record (hash-chained, see [`crate::chain`]), one row per event. Since
//!   version 3 what is the same for every event of a session — its id, user id and code hash —
//!   is stored once, in `sessions`, and each event points to it by `sid`; an event whose user
//!   id or code hash differs from its session's stores its own in `user_id` / `code_sha256`. The
//!   chain covers these values as the event reads back (chain v2), so editing them in `sessions`
//!   is caught by verification. Rows written before version 3 keep every column they had
//!   (`session_id`, `user_id`, `code_sha256`, `ts` text) and their v1 hashes, and gain only
//!   `sid`.
//! - The rest of `sessions` (counts, bytes, times, command, exit status) is a summary kept in the
//!   same transactions as the events it summarises, so listing sessions never scans events; it
//!   is not covered by the chain.
//! - Events are indexed by session only (`sid, session_seq`), plus the few rows that carry their
//!   own user id. Time filters use `batches`: one row per appended batch with its id range and
//!   the smallest and largest `ts_ms` in it, so a time range becomes an id range on the table
//!   itself instead of a second index updated for every event. Every record lies in exactly one
//!   batch whose time range contains its time; verification checks that too.
//! - `chain_head` holds the newest record's id and hash (hex), so deleting records from the end
//!   of the chain is detectable. `anchors` holds one row per prune.

/// The schema version this code writes and understands.
pub(crate) const SCHEMA_VERSION: i64 = 3;

/// `sessions` as version 3 has it (idempotent).
pub(crate) const SESSIONS_TABLE: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    sid         INTEGER PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    user_id     TEXT NOT NULL,
    code_sha256 TEXT NOT NULL,
    command     TEXT,
    started_ms  INTEGER,
    ended_ms    INTEGER,
    exit_status INTEGER,
    limit_hit   TEXT,
    first_ms    INTEGER NOT NULL,
    last_ms     INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    events      INTEGER NOT NULL,
    blocked     INTEGER NOT NULL,
    would_block INTEGER NOT NULL,
    bytes_up    INTEGER NOT NULL,
    bytes_down  INTEGER NOT NULL
);
";

/// `events` as version 3 has it (idempotent). Rows written before version 3 also fill
/// `user_id`, `code_sha256`, `session_id` and `ts`, and hold hex TEXT hashes.
pub(crate) const EVENTS_TABLE: &str = "
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY,
    sid         INTEGER NOT NULL,
    session_seq INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    ts_ms       INTEGER NOT NULL,
    host        TEXT,
    ip          TEXT,
    port        INTEGER,
    method      TEXT,
    path        TEXT,
    bytes_up    INTEGER,
    bytes_down  INTEGER,
    duration_ms INTEGER,
    verdict     TEXT,
    rule        TEXT,
    reason      TEXT,
    detail      TEXT,
    pid         INTEGER,
    exe         TEXT,
    cmdline     TEXT,
    user_id     TEXT,
    code_sha256 TEXT,
    session_id  TEXT,
    ts          TEXT,
    prev_hash   NOT NULL,
    hash        NOT NULL
);
";

/// The time index (idempotent).
pub(crate) const BATCHES_TABLE: &str = "
CREATE TABLE IF NOT EXISTS batches (
    first_id INTEGER PRIMARY KEY,
    last_id  INTEGER NOT NULL,
    min_ms   INTEGER NOT NULL,
    max_ms   INTEGER NOT NULL
);
";

/// Indexes, the chain head and the anchors (idempotent).
const REST: &str = "
CREATE INDEX IF NOT EXISTS sessions_by_time ON sessions (first_ms);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_id, first_ms);
CREATE UNIQUE INDEX IF NOT EXISTS events_by_session ON events (sid, session_seq);
CREATE INDEX IF NOT EXISTS events_by_own_user ON events (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS batches_by_max ON batches (max_ms);
CREATE INDEX IF NOT EXISTS batches_by_min ON batches (min_ms);

CREATE TABLE IF NOT EXISTS chain_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS anchors (
    seq        INTEGER PRIMARY KEY,
    hash       TEXT NOT NULL,
    cutoff_ms  INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    deleted    INTEGER NOT NULL
);
";

/// Version 3, for a new store or after a migration: every statement is idempotent, run in
/// this order.
pub(crate) const CREATE: [&str; 4] = [SESSIONS_TABLE, EVENTS_TABLE, BATCHES_TABLE, REST];

/// From version 1 to 2: the process attribution columns.
pub(crate) const MIGRATE_1_TO_2: &str = "
ALTER TABLE events ADD COLUMN pid INTEGER;
ALTER TABLE events ADD COLUMN exe TEXT;
ALTER TABLE events ADD COLUMN cmdline TEXT;
";

/// From version 2 to 3, first step: `sessions` gains its number `sid`. A session that has
/// events but no summary row (only in a doctored store) gets one rebuilt from its events, so no
/// record is left without a session.
pub(crate) const MIGRATE_2_TO_3_SESSIONS: [&str; 3] = [
    "ALTER TABLE sessions RENAME TO sessions_v2;
     DROP INDEX IF EXISTS sessions_by_time;
     DROP INDEX IF EXISTS sessions_by_user;",
    SESSIONS_TABLE,
    "
INSERT INTO sessions (id, user_id, code_sha256, command, started_ms, ended_ms, exit_status,
                      limit_hit, first_ms, last_ms, last_seq, events, blocked, would_block,
                      bytes_up, bytes_down)
    SELECT id, user_id, code_sha256, command, started_ms, ended_ms, exit_status, limit_hit,
           first_ms, last_ms, last_seq, events, blocked, would_block, bytes_up, bytes_down
    FROM sessions_v2 ORDER BY first_ms, id;
INSERT INTO sessions (id, user_id, code_sha256, first_ms, last_ms, last_seq, events, blocked,
                      would_block, bytes_up, bytes_down)
    SELECT session_id, MIN(user_id), MIN(code_sha256), MIN(ts_ms), MAX(ts_ms), MAX(session_seq),
           COUNT(*),
           SUM(verdict = 'block' OR kind IN ('blocked', 'budget_exhausted')),
           SUM(verdict = 'report-would-block'),
           COALESCE(SUM(bytes_up), 0), COALESCE(SUM(bytes_down), 0)
    FROM events WHERE session_id NOT IN (SELECT id FROM sessions)
    GROUP BY session_id;
DROP TABLE sessions_v2;
",
];

/// From version 2 to 3, second step: `events` is rebuilt with the version 3 columns (SQLite
/// cannot drop a NOT NULL constraint in place). Every row is copied as it was, with its
/// session's `sid` added; [`crate::store`] checks that the copy has every row before the old
/// table is dropped.
pub(crate) const MIGRATE_2_TO_3_EVENTS_COPY: [&str; 3] = [
    "ALTER TABLE events RENAME TO events_v2;
     DROP INDEX IF EXISTS events_by_session;
     DROP INDEX IF EXISTS events_by_time;
     DROP INDEX IF EXISTS events_by_user;",
    EVENTS_TABLE,
    "
INSERT INTO events (id, sid, session_seq, kind, ts_ms, host, ip, port, method, path, bytes_up,
                    bytes_down, duration_ms, verdict, rule, reason, detail, pid, exe, cmdline,
                    user_id, code_sha256, session_id, ts, prev_hash, hash)
    SELECT e.id, s.sid, e.session_seq, e.kind, e.ts_ms, e.host, e.ip, e.port, e.method, e.path,
           e.bytes_up, e.bytes_down, e.duration_ms, e.verdict, e.rule, e.reason, e.detail,
           e.pid, e.exe, e.cmdline, e.user_id, e.code_sha256, e.session_id, e.ts, e.prev_hash,
           e.hash
    FROM events_v2 e JOIN sessions s ON s.id = e.session_id
    ORDER BY e.id;
",
];

/// From version 2 to 3, last step (after the row counts were compared): the old table goes, and
/// the old records are covered by `batches` in groups of 1024 ids.
pub(crate) const MIGRATE_2_TO_3_EVENTS_FINISH: [&str; 3] = [
    "DROP TABLE events_v2;",
    BATCHES_TABLE,
    "INSERT INTO batches (first_id, last_id, min_ms, max_ms)
     SELECT MIN(id), MAX(id), MIN(ts_ms), MAX(ts_ms) FROM events GROUP BY id >> 10;",
];

/// The SQL form of [`crate::Event::is_blocked`]; the query tests pin the two together.
pub(crate) const BLOCKED_SQL: &str =
    "(verdict = 'block' OR kind IN ('blocked', 'budget_exhausted'))";
