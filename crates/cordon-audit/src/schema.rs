//! The on-disk schema.
//!
//! Guarantees:
//! - The schema is created idempotently inside one `BEGIN IMMEDIATE` transaction, so several
//!   processes opening a fresh file at once end up with exactly one schema.
//! - `PRAGMA user_version` records the schema version; a store written by a newer cordon is
//!   refused rather than misread.
//! - `events` is the record (hash-chained, see [`crate::chain`]). `sessions` is a summary kept in
//!   the same transactions as the events it summarises, so listing sessions never scans events;
//!   it is not covered by the chain.
//! - Version 2 added the process attribution columns `pid`, `exe` and `cmdline` (a JSON array of
//!   strings) to `events`. A version 1 store is migrated in place by [`MIGRATE_1_TO_2`], inside
//!   the same transaction that reads the version, so its records keep their hashes (see
//!   [`crate::chain`]) and every process sees either the old schema or the new one. `chain_head` holds the newest record's id and hash, so
//!   deleting records from the end of the chain is detectable. `anchors` holds one row per prune.

/// The schema version this code writes and understands.
pub(crate) const SCHEMA_VERSION: i64 = 2;

pub(crate) const CREATE: &str = "
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY,
    session_id  TEXT NOT NULL,
    session_seq INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    code_sha256 TEXT NOT NULL,
    ts          TEXT NOT NULL,
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
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_by_session ON events (session_id, session_seq);
CREATE INDEX IF NOT EXISTS events_by_time ON events (ts_ms);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, ts_ms);

CREATE TABLE IF NOT EXISTS sessions (
    id          TEXT PRIMARY KEY,
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
CREATE INDEX IF NOT EXISTS sessions_by_time ON sessions (first_ms);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_id, first_ms);

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

/// From version 1 to 2: the process attribution columns.
pub(crate) const MIGRATE_1_TO_2: &str = "
ALTER TABLE events ADD COLUMN pid INTEGER;
ALTER TABLE events ADD COLUMN exe TEXT;
ALTER TABLE events ADD COLUMN cmdline TEXT;
";

/// The SQL form of [`crate::Event::is_blocked`]; the query tests pin the two together.
pub(crate) const BLOCKED_SQL: &str =
    "(verdict = 'block' OR kind IN ('blocked', 'budget_exhausted'))";
