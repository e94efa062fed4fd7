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

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use crate::chain::{
    event_fields, record_hash_v2, unhex, DerivedText, Hash, GENESIS_HASH, V2_COLUMNS,
};
use crate::event::{detail_keys, hex, shell_quote, Event, EventKind, Verdict};
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
    #[error("audit store {path}: the chain head's hash {hash:?} is not 64 hex digits; new records cannot be linked to it (run `cordon audit verify`)")]
    BadHead { path: PathBuf, hash: String },
    #[error("audit store {path}: cannot migrate to schema 3: {reason}; nothing was changed")]
    Migration { path: PathBuf, reason: String },
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

/// The write-ahead log size past which a writer that is done (a session's teardown, a stopping
/// standalone gateway) folds the log into the database ([`Store::checkpoint_if_wal_over`]).
pub const WAL_TIDY_BYTES: u64 = 256 * 1024;

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
        if (1..=2).contains(&version) {
            migrate_2_to_3(&tx, &path)?;
        }
        for sql in schema::CREATE {
            tx.execute_batch(sql).map_err(sql_err("create schema"))?;
        }
        tx.execute(
            "INSERT OR IGNORE INTO chain_head (id, seq, hash) VALUES (1, 0, ?1)",
            [GENESIS_HASH],
        )
        .map_err(sql_err("initialise chain head"))?;
        if version < schema::SCHEMA_VERSION {
            tx.pragma_update(None, "user_version", schema::SCHEMA_VERSION)
                .map_err(sql_err("write schema version"))?;
        }
        tx.commit().map_err(sql_err("commit schema"))?;
        if (1..=2).contains(&version) {
            // The rebuilt table went through the WAL: fold it into the database and truncate it
            // now, or every process opening the store would first read it all (a WAL as large
            // as the old table). Best effort: a reader holding a snapshot makes it a no-op, and
            // the automatic checkpoints catch up later.
            let _ = self.checkpoint_truncate();
        }
        Ok(())
    }

    /// Folds the write-ahead log back into the database when it has grown past `max_wal` bytes
    /// (writers call it with [`WAL_TIDY_BYTES`] once their events are committed),
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
        store
            .checkpoint_truncate()
            .map_err(store.sql_err("checkpoint the WAL"))
    }

    /// Folds the whole write-ahead log into the database and truncates it; `false` when another
    /// connection held it up (then nothing was truncated).
    fn checkpoint_truncate(&self) -> rusqlite::Result<bool> {
        // (busy, log frames, checkpointed frames); busy = 1 when another connection held it up.
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get(0))?;
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
        let head = read_head(&tx).map_err(sql_err("read chain head"))?;
        if events.is_empty() {
            return Ok(head);
        }
        let Some(mut prev) = unhex(head.hash.as_bytes()) else {
            return Err(StoreError::BadHead {
                path,
                hash: head.hash,
            });
        };
        let first_id = head.seq + 1;
        let mut id = head.seq;
        let mut sessions: Vec<SessionSlot<'_>> = Vec::new();
        let mut scratch = Vec::with_capacity(512);
        {
            let mut lookup = tx
                .prepare_cached(SESSION_LOOKUP_SQL)
                .map_err(sql_err("prepare session lookup"))?;
            let mut create = tx
                .prepare_cached(SESSION_CREATE_SQL)
                .map_err(sql_err("prepare session creation"))?;
            // First every record's place and hash, then the rows, several per statement. The
            // values are derived once and serve both the hash and the insert.
            let derived: Vec<DerivedText> = events.iter().map(DerivedText::of).collect();
            let mut rows: Vec<Row<'_>> = Vec::with_capacity(events.len());
            // Consecutive events nearly always belong to the same session.
            let mut current = usize::MAX;
            for (event, derived) in events.iter().zip(&derived) {
                if sessions
                    .get(current)
                    .is_none_or(|slot| slot.id != event.session_id)
                {
                    current = match sessions.iter().position(|s| s.id == event.session_id) {
                        Some(i) => i,
                        None => {
                            let slot = session_slot(&mut lookup, &mut create, event)
                                .map_err(sql_err("find or create the session"))?;
                            sessions.push(slot);
                            sessions.len() - 1
                        }
                    };
                }
                let slot = &mut sessions[current];
                slot.seq += 1;
                id += 1;
                let fields = event_fields(event, derived, slot.seq);
                let hash = record_hash_v2(&mut scratch, &prev, &fields, id);
                rows.push(Row {
                    event,
                    fields,
                    id,
                    sid: slot.sid,
                    own_user: event.user_id != slot.user_id,
                    own_code: event.code_sha256 != slot.code_sha256,
                    prev,
                    hash,
                });
                prev = hash;
                slot.delta
                    .get_or_insert_with(|| SessionDelta::starting(event))
                    .add(event, slot.seq);
            }
            let mut full = tx
                .prepare_cached(&INSERT_SQL[ROWS_PER_INSERT - 1])
                .map_err(sql_err("prepare insert"))?;
            for chunk in rows.chunks(ROWS_PER_INSERT) {
                let params = rusqlite::params_from_iter(chunk.iter().flat_map(Row::params));
                if chunk.len() == ROWS_PER_INSERT {
                    full.execute(params)
                } else {
                    tx.prepare_cached(&INSERT_SQL[chunk.len() - 1])
                        .and_then(|mut stmt| stmt.execute(params))
                }
                .map_err(sql_err("insert events"))?;
            }
        }
        {
            let mut update = tx
                .prepare_cached(SESSION_UPDATE_SQL)
                .map_err(sql_err("prepare session update"))?;
            // Every slot was made for an event of this batch, so each has its delta.
            for (slot, d) in sessions
                .iter()
                .filter_map(|s| s.delta.as_ref().map(|d| (s, d)))
            {
                update
                    .execute(rusqlite::params![
                        slot.sid,
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
        let (min_ms, max_ms) = events
            .iter()
            .map(|e| e.ts.as_millis())
            .fold((i64::MAX, i64::MIN), |(lo, hi), t| (lo.min(t), hi.max(t)));
        tx.prepare_cached(
            "INSERT INTO batches (first_id, last_id, min_ms, max_ms) VALUES (?1, ?2, ?3, ?4)",
        )
        .and_then(|mut stmt| stmt.execute(rusqlite::params![first_id, id, min_ms, max_ms]))
        .map_err(sql_err("record the batch"))?;
        let head = ChainHead {
            seq: id,
            hash: hex(&prev),
        };
        tx.prepare_cached("UPDATE chain_head SET seq = ?1, hash = ?2 WHERE id = 1")
            .and_then(|mut stmt| stmt.execute(rusqlite::params![head.seq, head.hash]))
            .map_err(sql_err("update chain head"))?;
        tx.commit().map_err(sql_err("commit append"))?;
        Ok(head)
    }
}

/// One record about to be inserted.
struct Row<'e> {
    event: &'e Event,
    /// The hashed values ([`event_fields`]), as hashed.
    fields: [ValueRef<'e>; 21],
    id: i64,
    sid: i64,
    /// The event's user id / code hash differ from its session's, so the row keeps its own.
    own_user: bool,
    own_code: bool,
    prev: Hash,
    hash: Hash,
}

impl Row<'_> {
    /// The values of the row, in [`insert_columns`] order.
    fn params(&self) -> impl Iterator<Item = ToSqlOutput<'_>> {
        let [_, seq, kind, _, _, ts_ms, rest @ ..] = self.fields;
        fn own(own: bool, value: &str) -> ValueRef<'_> {
            if own {
                ValueRef::Text(value.as_bytes())
            } else {
                ValueRef::Null
            }
        }
        [
            ValueRef::Integer(self.id),
            ValueRef::Integer(self.sid),
            seq,
            kind,
            ts_ms,
        ]
        .into_iter()
        .chain(rest)
        .chain([
            own(self.own_user, &self.event.user_id),
            own(self.own_code, &self.event.code_sha256),
            ValueRef::Blob(&self.prev),
            ValueRef::Blob(&self.hash),
        ])
        .map(ToSqlOutput::Borrowed)
    }
}

/// A session seen in the batch being appended.
struct SessionSlot<'e> {
    id: &'e str,
    sid: i64,
    user_id: String,
    code_sha256: String,
    /// The last `session_seq` given out.
    seq: i64,
    /// What this batch adds to the session's summary.
    delta: Option<SessionDelta>,
}

/// The session of `event`, created (with the event's user id and code hash) if it is new.
fn session_slot<'e>(
    lookup: &mut rusqlite::CachedStatement<'_>,
    create: &mut rusqlite::CachedStatement<'_>,
    event: &'e Event,
) -> rusqlite::Result<SessionSlot<'e>> {
    let found = lookup
        .query_row([&event.session_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .optional()?;
    let (sid, user_id, code_sha256, seq) = match found {
        Some(found) => found,
        None => {
            let ts = event.ts.as_millis();
            let sid = create.insert(rusqlite::params![
                event.session_id,
                event.user_id,
                event.code_sha256,
                ts
            ])?;
            (sid, event.user_id.clone(), event.code_sha256.clone(), 0)
        }
    };
    Ok(SessionSlot {
        id: &event.session_id,
        sid,
        user_id,
        code_sha256,
        seq,
        delta: None,
    })
}

/// Version 2 (or 1, after its own step) to 3; see [`schema`]. Runs inside the caller's
/// transaction.
fn migrate_2_to_3(tx: &Connection, path: &Path) -> Result<(), StoreError> {
    let sql_err = |step| {
        let path = path.to_path_buf();
        move |source| StoreError::Sql { path, step, source }
    };
    for sql in schema::MIGRATE_2_TO_3_SESSIONS {
        tx.execute_batch(sql)
            .map_err(sql_err("migrate schema 2 to 3: sessions"))?;
    }
    for sql in schema::MIGRATE_2_TO_3_EVENTS_COPY {
        tx.execute_batch(sql)
            .map_err(sql_err("migrate schema 2 to 3: copy events"))?;
    }
    let (old, new): (i64, i64) = tx
        .query_row(
            "SELECT (SELECT COUNT(*) FROM events_v2), (SELECT COUNT(*) FROM events)",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .map_err(sql_err("migrate schema 2 to 3: count events"))?;
    if old != new {
        return Err(StoreError::Migration {
            path: path.to_path_buf(),
            reason: format!("{old} records before, {new} after copying"),
        });
    }
    for sql in schema::MIGRATE_2_TO_3_EVENTS_FINISH {
        tx.execute_batch(sql)
            .map_err(sql_err("migrate schema 2 to 3: finish"))?;
    }
    Ok(())
}

fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

pub(crate) fn read_head(conn: &Connection) -> rusqlite::Result<ChainHead> {
    // Cached: the writer reads the head at every commit.
    conn.prepare_cached("SELECT seq, hash FROM chain_head WHERE id = 1")?
        .query_row([], |row| {
            Ok(ChainHead {
                seq: row.get(0)?,
                hash: row.get(1)?,
            })
        })
}

/// The columns of an event row, in the order [`Row::params`] gives them: the record's place and
/// kind, the values of [`V2_COLUMNS`] from `host` on, what a record stores only when it differs
/// from its session, then the chain.
fn insert_columns() -> Vec<&'static str> {
    let mut columns = vec!["id", "sid", "session_seq", "kind", "ts_ms"];
    columns.extend_from_slice(&V2_COLUMNS[6..]);
    columns.extend_from_slice(&["user_id", "code_sha256", "prev_hash", "hash"]);
    columns
}

/// Most rows one `INSERT` statement carries: SQLite's per-statement work (reset, bind, halt) is
/// then shared by several rows (callgrind: about 1,200 fewer instructions per event with 8
/// than with 1; docs/benchmarks.md).
const ROWS_PER_INSERT: usize = 8;

/// `INSERT_SQL[k - 1]` inserts `k` rows.
static INSERT_SQL: std::sync::LazyLock<[String; ROWS_PER_INSERT]> =
    std::sync::LazyLock::new(|| {
        let columns = insert_columns();
        std::array::from_fn(|k| {
            let n = columns.len();
            let rows: Vec<String> = (0..=k)
                .map(|r| {
                    let values: Vec<String> = (1..=n).map(|c| format!("?{}", r * n + c)).collect();
                    format!("({})", values.join(", "))
                })
                .collect();
            format!(
                "INSERT INTO events ({}) VALUES {}",
                columns.join(", "),
                rows.join(", ")
            )
        })
    });

const SESSION_LOOKUP_SQL: &str =
    "SELECT sid, user_id, code_sha256, last_seq FROM sessions WHERE id = ?1";

/// A new session: its attribution, and an empty summary that [`SESSION_UPDATE_SQL`] fills.
const SESSION_CREATE_SQL: &str = "
INSERT INTO sessions (id, user_id, code_sha256, first_ms, last_ms, last_seq, events, blocked,
                      would_block, bytes_up, bytes_down)
VALUES (?1, ?2, ?3, ?4, ?4, 0, 0, 0, 0, 0, 0)";

const SESSION_UPDATE_SQL: &str = "
UPDATE sessions SET
    command     = COALESCE(?2, command),
    started_ms  = COALESCE(?3, started_ms),
    ended_ms    = COALESCE(?4, ended_ms),
    exit_status = COALESCE(?5, exit_status),
    limit_hit   = COALESCE(?6, limit_hit),
    first_ms    = MIN(first_ms, ?7),
    last_ms     = MAX(last_ms, ?8),
    last_seq    = MAX(last_seq, ?9),
    events      = events + ?10,
    blocked     = blocked + ?11,
    would_block = would_block + ?12,
    bytes_up    = bytes_up + ?13,
    bytes_down  = bytes_down + ?14
WHERE sid = ?1";

/// What one batch adds to one session's summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SessionDelta {
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

impl SessionDelta {
    /// An empty delta for a session whose first event in the batch is `event`.
    fn starting(event: &Event) -> SessionDelta {
        let ts = event.ts.as_millis();
        SessionDelta {
            first_ms: ts,
            last_ms: ts,
            ..SessionDelta::default()
        }
    }

    /// Adds one of the session's events (with its `session_seq`). Pure, so the summary logic
    /// is tested without a database.
    fn add(&mut self, event: &Event, session_seq: i64) {
        let ts = event.ts.as_millis();
        let d = self;
        d.first_ms = d.first_ms.min(ts);
        d.last_ms = d.last_ms.max(ts);
        d.last_seq = d.last_seq.max(session_seq);
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
        // Per session, in order of first appearance, as `append` groups them.
        fn session_deltas<'a>(batch: &[(&'a Event, i64)]) -> Vec<(&'a str, SessionDelta)> {
            let mut deltas: Vec<(&'a str, SessionDelta)> = Vec::new();
            for (event, seq) in batch {
                let i = match deltas.iter().position(|(id, _)| *id == event.session_id) {
                    Some(i) => i,
                    None => {
                        deltas.push((&event.session_id, SessionDelta::starting(event)));
                        deltas.len() - 1
                    }
                };
                deltas[i].1.add(event, *seq);
            }
            deltas
        }
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
