//! Opening the SQLite store and appending to it.
//!
//! Guarantees:
//! - The file is created with mode 0600 and its missing parent directories with 0700; SQLite
//!   gives the `-wal` and `-shm` files the database file's mode.
//! - WAL mode and a busy timeout, so several cordon processes can read and write one file at once.
//! - [`Store::append`] writes a whole batch in one `BEGIN IMMEDIATE` transaction: it reads the
//!   chain head, assigns the global sequence (`id`) and each session's sequence, hashes and
//!   inserts every record, updates the session summaries and the chain head, then commits. The
//!   write lock is held from the head read to the commit, so concurrent writers — threads or
//!   processes — serialise and keep one valid chain, and a crash mid-batch leaves nothing of it.
//! - Every write applies the length cuts of [`Event::bounded`].

use std::collections::HashMap;
use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use crate::chain::{event_fields, record_hash_with, DerivedText, GENESIS_HASH, HASHED_COLUMNS};
use crate::event::{detail_keys, shell_quote, Event, EventKind, Verdict};
use crate::schema;

/// Why the store could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create audit store {path}: {source}")]
    CreateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no audit store at {path}")]
    NotFound { path: PathBuf },
    #[error("cannot open audit store {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "audit store {path} has schema version {found}; this cordon understands up to {supported}"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("audit store {path} cannot use WAL mode (journal_mode stays {mode}); is it on a network file system?")]
    NotWal { path: PathBuf, mode: String },
    #[error("audit store {path}: {step}: {source}")]
    Sql {
        path: PathBuf,
        step: &'static str,
        source: rusqlite::Error,
    },
    #[error("audit store {path}: record {id} cannot be read: {reason}")]
    BadRecord {
        path: PathBuf,
        id: i64,
        reason: String,
    },
    #[error("audit store {path}: refusing to prune, the hash chain is broken at record {id}: {reason} (run `cordon audit verify`)")]
    ChainBroken {
        path: PathBuf,
        id: i64,
        reason: String,
    },
    #[error("no session matches {prefix:?}")]
    NoSuchSession { prefix: String },
    #[error("{prefix:?} matches several sessions ({candidates}…); give more of the id")]
    AmbiguousSession { prefix: String, candidates: String },
    #[error("cannot write the export: {0}")]
    Export(#[source] std::io::Error),
    #[error("cannot encode record {id} as JSON: {source}")]
    Encode { id: i64, source: serde_json::Error },
}

/// How to open a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Create the file (and its parent directories) if missing. When false, a missing file is
    /// [`StoreError::NotFound`] — what `cordon audit` wants, rather than an empty new store.
    pub create: bool,
    /// `synchronous = FULL`: fsync the WAL at every commit, so a power loss cannot take back a
    /// committed batch. The default (`NORMAL`) is safe against process crashes, `kill -9`
    /// included, and may lose the last commits on power loss or an OS crash.
    pub synchronous_full: bool,
    /// How long to wait for another process's write lock before giving up on a transaction.
    pub busy_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            create: true,
            synchronous_full: false,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// The newest record of the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainHead {
    /// Its id (0 when nothing was ever written).
    pub seq: i64,
    /// Its hash ([`GENESIS_HASH`] when nothing was ever written).
    pub hash: String,
}

/// A handle on one audit store file. Reads see a consistent snapshot per query; writes are
/// serialised with every other handle on the same file, in this or any other process.
pub struct Store {
    pub(crate) conn: Connection,
    pub(crate) path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store at `path` with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        Store::open_with(path, &StoreOptions::default())
    }

    /// Opens an existing store; a missing file is [`StoreError::NotFound`].
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        Store::open_with(
            path,
            &StoreOptions {
                create: false,
                ..StoreOptions::default()
            },
        )
    }

    /// Opens the store at `path` with `options`.
    pub fn open_with(path: impl AsRef<Path>, options: &StoreOptions) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        if options.create {
            create_file(&path)?;
        } else if !path.exists() {
            return Err(StoreError::NotFound { path });
        }
        // No SQLITE_OPEN_CREATE: the file exists by now, and if it vanished we want an error.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn =
            Connection::open_with_flags(&path, flags).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        let mut store = Store { conn, path };
        store.configure(options)?;
        store.create_schema()?;
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn sql_err(&self, step: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        let path = self.path.clone();
        move |source| StoreError::Sql { path, step, source }
    }

    fn configure(&mut self, options: &StoreOptions) -> Result<(), StoreError> {
        self.conn
            .busy_timeout(options.busy_timeout)
            .map_err(self.sql_err("set busy_timeout"))?;
        // A store someone else could write must not be able to run functions in our process
        // through triggers or views it defines.
        self.conn
            .pragma_update(None, "trusted_schema", "OFF")
            .map_err(self.sql_err("set trusted_schema"))?;
        self.enable_wal(options.busy_timeout)?;
        let sync = if options.synchronous_full {
            "FULL"
        } else {
            "NORMAL"
        };
        self.conn
            .pragma_update(None, "synchronous", sync)
            .map_err(self.sql_err("set synchronous"))?;
        // Every `cordon run` opens the store, appends a few events and closes it. By default the
        // last connection to close checkpoints the WAL into the database and fsyncs both, which
        // costs milliseconds per session; skip that and let the WAL's automatic checkpoint
        // (every 1000 pages) do the work. Durability is unchanged: a committed transaction is
        // in the WAL either way.
        self.conn
            .set_db_config(
                rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
                true,
            )
            .map_err(self.sql_err("set no_ckpt_on_close"))?;
        Ok(())
    }

    /// Switches the file to WAL mode (persistent, so only the first opener really switches).
    /// The switch needs an exclusive lock and SQLite does not run the busy handler for it, so
    /// when several processes open a fresh file at once the losers retry here until
    /// `busy_timeout` has passed.
    fn enable_wal(&mut self, busy_timeout: Duration) -> Result<(), StoreError> {
        let deadline = std::time::Instant::now() + busy_timeout;
        loop {
            let current: String = self
                .conn
                .pragma_query_value(None, "journal_mode", |row| row.get(0))
                .map_err(self.sql_err("read journal mode"))?;
            if current.eq_ignore_ascii_case("wal") {
                return Ok(());
            }
            match self
                .conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
            {
                Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
                Ok(mode) => {
                    return Err(StoreError::NotWal {
                        path: self.path.clone(),
                        mode,
                    })
                }
                Err(err) if is_busy(&err) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(err) => return Err(self.sql_err("switch to WAL mode")(err)),
            }
        }
    }

    fn create_schema(&mut self) -> Result<(), StoreError> {
        // The common case, every `cordon run`: the schema is current. Reading the version takes
        // no write lock, so opening a store never queues behind another session's commit.
        let current: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(self.sql_err("read schema version"))?;
        if current == schema::SCHEMA_VERSION {
            return Ok(());
        }
        let path = self.path.clone();
        let begin_err = self.sql_err("begin schema transaction");
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(begin_err)?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(|source| StoreError::Sql {
                path: path.clone(),
                step: "read schema version",
                source,
            })?;
        if version > schema::SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path,
                found: version,
                supported: schema::SCHEMA_VERSION,
            });
        }
        let sql_err = |step| {
            let path = path.clone();
            move |source| StoreError::Sql { path, step, source }
        };
        if version == 1 {
            tx.execute_batch(schema::MIGRATE_1_TO_2)
                .map_err(sql_err("migrate schema 1 to 2"))?;
        }
        tx.execute_batch(schema::CREATE)
            .map_err(sql_err("create schema"))?;
        tx.execute(
            "INSERT OR IGNORE INTO chain_head (id, seq, hash) VALUES (1, 0, ?1)",
            [GENESIS_HASH],
        )
        .map_err(sql_err("initialise chain head"))?;
        if version < schema::SCHEMA_VERSION {
            tx.pragma_update(None, "user_version", schema::SCHEMA_VERSION)
                .map_err(sql_err("write schema version"))?;
        }
        tx.commit().map_err(sql_err("commit schema"))
    }

    /// Folds the write-ahead log back into the database when it has grown past `max_wal` bytes,
    /// and truncates it; returns whether it did. Every process that opens the store after the
    /// last one closed rebuilds SQLite's WAL index by reading the whole log, so a log left to
    /// grow to its automatic checkpoint (about 4 MiB) costs every later `cordon run` a read of
    /// all of it. Sessions call this after their result is final (off the critical path). A
    /// busy store (another writer or a long reader) is left alone: this is housekeeping, the
    /// automatic checkpoint still bounds the log.
    pub fn checkpoint_if_wal_over(path: &Path, max_wal: u64) -> Result<bool, StoreError> {
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        match std::fs::metadata(&wal) {
            Ok(m) if m.len() > max_wal => {}
            _ => return Ok(false),
        }
        let store = Store::open_with(
            path,
            &StoreOptions {
                create: false,
                busy_timeout: Duration::from_millis(100),
                ..StoreOptions::default()
            },
        )?;
        // (busy, log frames, checkpointed frames); busy = 1 when another connection held it up.
        let busy: i64 = store
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get(0))
            .map_err(store.sql_err("checkpoint the WAL"))?;
        Ok(busy == 0)
    }

    /// The newest record's id and hash, as the chain head table records it.
    pub fn head(&self) -> Result<ChainHead, StoreError> {
        read_head(&self.conn).map_err(self.sql_err("read chain head"))
    }

    /// Appends `events` in one transaction (see the module guarantees) and returns the new head.
    /// The records get ids `head.seq - events.len() + 1 ..= head.seq`, in order.
    pub fn append(&mut self, events: &[Event]) -> Result<ChainHead, StoreError> {
        let path = self.path.clone();
        let sql_err = |step| {
            let path = path.clone();
            move |source| StoreError::Sql { path, step, source }
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err("begin append transaction"))?;
        let mut head = read_head(&tx).map_err(sql_err("read chain head"))?;
        if events.is_empty() {
            return Ok(head);
        }
        let mut session_seqs: HashMap<String, i64> = HashMap::new();
        let mut appended: Vec<(&Event, i64)> = Vec::with_capacity(events.len());
        let mut scratch = Vec::with_capacity(512);
        {
            let mut last_seq_stmt = tx
                .prepare_cached("SELECT last_seq FROM sessions WHERE id = ?1")
                .map_err(sql_err("prepare session lookup"))?;
            let mut insert = tx
                .prepare_cached(&insert_sql())
                .map_err(sql_err("prepare insert"))?;
            for event in events {
                let session_seq = if let Some(seq) = session_seqs.get_mut(&event.session_id) {
                    *seq += 1;
                    *seq
                } else {
                    let last: Option<i64> = last_seq_stmt
                        .query_row([&event.session_id], |row| row.get(0))
                        .optional()
                        .map_err(sql_err("read session sequence"))?;
                    let seq = last.unwrap_or(0) + 1;
                    session_seqs.insert(event.session_id.clone(), seq);
                    seq
                };
                let id = head.seq + 1;
                let derived = DerivedText::of(event);
                let fields = event_fields(event, &derived, session_seq);
                let hash = record_hash_with(&mut scratch, head.hash.as_bytes(), &fields, id);
                let mut params: [ToSqlOutput<'_>; HASHED_COLUMNS.len() + 3] =
                    std::array::from_fn(|_| ToSqlOutput::Borrowed(ValueRef::Null));
                params[0] = ToSqlOutput::Borrowed(ValueRef::Integer(id));
                for (slot, field) in params[1..].iter_mut().zip(fields) {
                    *slot = ToSqlOutput::Borrowed(field);
                }
                let n = HASHED_COLUMNS.len();
                params[n + 1] = ToSqlOutput::Borrowed(ValueRef::Text(head.hash.as_bytes()));
                params[n + 2] = ToSqlOutput::Borrowed(ValueRef::Text(hash.as_bytes()));
                insert
                    .execute(rusqlite::params_from_iter(params.iter()))
                    .map_err(sql_err("insert event"))?;
                head = ChainHead { seq: id, hash };
                appended.push((event, session_seq));
            }
        }
        {
            let mut upsert = tx
                .prepare_cached(UPSERT_SESSION_SQL)
                .map_err(sql_err("prepare session update"))?;
            for (id, d) in session_deltas(&appended) {
                upsert
                    .execute(rusqlite::params![
                        id,
                        d.user_id,
                        d.code_sha256,
                        d.command,
                        d.started_ms,
                        d.ended_ms,
                        d.exit_status,
                        d.limit_hit,
                        d.first_ms,
                        d.last_ms,
                        d.last_seq,
                        d.events,
                        d.blocked,
                        d.would_block,
                        d.bytes_up,
                        d.bytes_down,
                    ])
                    .map_err(sql_err("update session summary"))?;
            }
        }
        tx.execute(
            "UPDATE chain_head SET seq = ?1, hash = ?2 WHERE id = 1",
            rusqlite::params![head.seq, head.hash],
        )
        .map_err(sql_err("update chain head"))?;
        tx.commit().map_err(sql_err("commit append"))?;
        Ok(head)
    }
}

fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

pub(crate) fn read_head(conn: &Connection) -> rusqlite::Result<ChainHead> {
    conn.query_row("SELECT seq, hash FROM chain_head WHERE id = 1", [], |row| {
        Ok(ChainHead {
            seq: row.get(0)?,
            hash: row.get(1)?,
        })
    })
}

fn insert_sql() -> String {
    let placeholders: Vec<String> = (1..=HASHED_COLUMNS.len() + 3)
        .map(|i| format!("?{i}"))
        .collect();
    format!(
        "INSERT INTO events (id, {}, prev_hash, hash) VALUES ({})",
        HASHED_COLUMNS.join(", "),
        placeholders.join(", ")
    )
}

const UPSERT_SESSION_SQL: &str = "
INSERT INTO sessions (id, user_id, code_sha256, command, started_ms, ended_ms, exit_status,
                      limit_hit, first_ms, last_ms, last_seq, events, blocked, would_block,
                      bytes_up, bytes_down)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
ON CONFLICT (id) DO UPDATE SET
    command     = COALESCE(excluded.command, command),
    started_ms  = COALESCE(excluded.started_ms, started_ms),
    ended_ms    = COALESCE(excluded.ended_ms, ended_ms),
    exit_status = COALESCE(excluded.exit_status, exit_status),
    limit_hit   = COALESCE(excluded.limit_hit, limit_hit),
    first_ms    = MIN(first_ms, excluded.first_ms),
    last_ms     = MAX(last_ms, excluded.last_ms),
    last_seq    = MAX(last_seq, excluded.last_seq),
    events      = events + excluded.events,
    blocked     = blocked + excluded.blocked,
    would_block = would_block + excluded.would_block,
    bytes_up    = bytes_up + excluded.bytes_up,
    bytes_down  = bytes_down + excluded.bytes_down
";

/// What one batch adds to one session's summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SessionDelta {
    pub user_id: String,
    pub code_sha256: String,
    pub command: Option<String>,
    pub started_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    pub exit_status: Option<i64>,
    pub limit_hit: Option<String>,
    pub first_ms: i64,
    pub last_ms: i64,
    pub last_seq: i64,
    pub events: i64,
    pub blocked: i64,
    pub would_block: i64,
    pub bytes_up: i64,
    pub bytes_down: i64,
}

/// Folds a batch of (event, session_seq) into one delta per session, in order of first
/// appearance. Pure, so the summary logic is tested without a database.
pub(crate) fn session_deltas(batch: &[(&Event, i64)]) -> Vec<(String, SessionDelta)> {
    let mut order: Vec<String> = Vec::new();
    let mut deltas: HashMap<String, SessionDelta> = HashMap::new();
    for (event, session_seq) in batch {
        let ts = event.ts.as_millis();
        let d = deltas.entry(event.session_id.clone()).or_insert_with(|| {
            order.push(event.session_id.clone());
            SessionDelta {
                user_id: event.user_id.clone(),
                code_sha256: event.code_sha256.clone(),
                first_ms: ts,
                last_ms: ts,
                ..SessionDelta::default()
            }
        });
        d.first_ms = d.first_ms.min(ts);
        d.last_ms = d.last_ms.max(ts);
        d.last_seq = d.last_seq.max(*session_seq);
        d.events += 1;
        d.blocked += i64::from(event.is_blocked());
        d.would_block += i64::from(event.verdict == Some(Verdict::ReportWouldBlock));
        d.bytes_up = d.bytes_up.saturating_add(saturate(event.bytes_up));
        d.bytes_down = d.bytes_down.saturating_add(saturate(event.bytes_down));
        match event.kind {
            EventKind::SessionStart => {
                d.started_ms = Some(ts);
                d.command = event
                    .detail
                    .get(detail_keys::COMMAND)
                    .and_then(command_text);
            }
            EventKind::SessionEnd => {
                d.ended_ms = Some(ts);
                d.exit_status = event
                    .detail
                    .get(detail_keys::EXIT_STATUS)
                    .and_then(serde_json::Value::as_i64);
                d.limit_hit = event
                    .detail
                    .get(detail_keys::LIMIT_HIT)
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned);
            }
            _ => {}
        }
    }
    order
        .into_iter()
        .filter_map(|id| deltas.remove(&id).map(|d| (id, d)))
        .collect()
}

fn saturate(n: Option<u64>) -> i64 {
    n.map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX))
}

/// A command from `detail.command` as one line: a string as is, an array of strings joined by
/// spaces with arguments that need it single-quoted.
fn command_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => Some(
            items
                .iter()
                .map(|item| match item.as_str() {
                    Some(s) => shell_quote(s),
                    None => item.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    }
}

fn create_file(path: &Path) -> Result<(), StoreError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|source| StoreError::CreateDir {
                path: parent.to_path_buf(),
                source,
            })?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|source| StoreError::CreateFile {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timestamp::Timestamp;

    fn ev(kind: EventKind, session: &str, ts: i64) -> Event {
        let mut e = Event::new(kind, session, "alice", "c0de");
        e.ts = Timestamp::from_millis(ts);
        e
    }

    #[test]
    fn session_deltas_fold_counts_bytes_and_lifecycle_per_session() {
        let mut start = ev(EventKind::SessionStart, "s1", 100);
        start.detail = serde_json::json!({"command": ["python3", "-c", "print('hi')"]});
        let mut conn = ev(EventKind::Connection, "s1", 150);
        conn.verdict = Some(Verdict::Allow);
        conn.bytes_up = Some(10);
        conn.bytes_down = Some(20);
        let mut blocked = ev(EventKind::Blocked, "s2", 120);
        blocked.verdict = Some(Verdict::Block);
        let mut shadow = ev(EventKind::HttpRequest, "s1", 160);
        shadow.verdict = Some(Verdict::ReportWouldBlock);
        let mut end = ev(EventKind::SessionEnd, "s1", 200);
        end.detail = serde_json::json!({"exit_status": 137, "limit_hit": "timeout"});
        let batch = vec![
            (&start, 1),
            (&blocked, 4),
            (&conn, 2),
            (&shadow, 3),
            (&end, 4),
        ];
        let deltas = session_deltas(&batch);
        assert_eq!(deltas.len(), 2);
        assert_eq!(deltas[0].0, "s1");
        assert_eq!(
            deltas[0].1,
            SessionDelta {
                user_id: "alice".into(),
                code_sha256: "c0de".into(),
                command: Some("python3 -c 'print('\\''hi'\\'')'".into()),
                started_ms: Some(100),
                ended_ms: Some(200),
                exit_status: Some(137),
                limit_hit: Some("timeout".into()),
                first_ms: 100,
                last_ms: 200,
                last_seq: 4,
                events: 4,
                blocked: 0,
                would_block: 1,
                bytes_up: 10,
                bytes_down: 20,
            }
        );
        assert_eq!(deltas[1].0, "s2");
        assert_eq!(deltas[1].1.blocked, 1);
        assert_eq!(deltas[1].1.events, 1);
        assert_eq!(deltas[1].1.started_ms, None);
    }

    #[test]
    fn a_string_command_is_kept_verbatim() {
        assert_eq!(
            command_text(&serde_json::json!("curl -s https://x")),
            Some("curl -s https://x".into())
        );
        assert_eq!(command_text(&serde_json::json!(42)), None);
        assert_eq!(shell_quote(""), "''");
    }
}
