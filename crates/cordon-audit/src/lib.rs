//! cordon-audit: the audit store of cordon.
//!
//! Every network event of a sandboxed session — allowed or not — and every session start and end
//! is written here with its attribution (session, user, SHA-256 of the code), destination,
//! verdict and deciding rule. Guarantees, each detailed in its module:
//!
//! - **Never in the data path's way** ([`mod@writer`]): `record` never blocks; a writer thread commits
//!   batches; nothing is lost on a normal exit or `close`, and a `kill -9` loses at most one batch.
//! - **Tamper-evident** ([`chain`], [`mod@verify`]): one SHA-256 hash chain per store across every
//!   session and every writer process; `verify` names the first edited, deleted or reordered
//!   record; pruning leaves an anchor so what remains still verifies.
//! - **Shared safely** ([`mod@store`]): one SQLite file in WAL mode used by several processes at once;
//!   each batch is appended in one `BEGIN IMMEDIATE` transaction that reads the chain head.
//! - **Bounded input** ([`mod@event`]): what the sandboxed code controls (path, host, method) is cut
//!   to a fixed length before it is stored, and the tables in [`mod@format`] never print control
//!   characters.
//!
//! ```no_run
//! use cordon_audit::{Attribution, AuditWriter, EventFilter, EventKind, Store, Verdict};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let path = cordon_audit::default_path()?;
//! let writer = AuditWriter::open(&path)?;
//! let who = Attribution {
//!     session_id: "01JEXAMPLE".into(),
//!     user_id: "alice".into(),
//!     code_sha256: cordon_audit::sha256_hex(b"print('hi')"),
//! };
//! let mut event = who.event(EventKind::Connection);
//! event.host = Some("api.github.com".into());
//! event.port = Some(443);
//! event.verdict = Some(Verdict::Allow);
//! writer.record(event);
//! writer.close()?;
//!
//! let store = Store::open_existing(&path)?;
//! let filter = EventFilter { session: Some("01JEX".into()), ..EventFilter::default() };
//! print!("{}", cordon_audit::format::events_table(&store.events(&filter)?, false));
//! assert!(store.verify()?.is_ok());
//! # Ok(()) }
//! ```

pub mod chain;
pub mod event;
pub mod export;
pub mod format;
pub mod paths;
pub mod query;
pub mod report;
mod schema;
pub mod store;
pub mod syslog;
pub mod timestamp;
pub mod verify;
pub mod writer;

pub use chain::GENESIS_HASH;
pub use event::{
    sha256_hex, truncate_path, Attribution, Event, EventKind, EventRecord, ProcessInfo,
    UnknownName, Verdict, MAX_PATH_CHARS,
};
pub use export::{cef_line, severity, Severity};
pub use paths::{default_path, default_path_for, PathError};
pub use query::{EventFilter, SessionFilter, SessionSummary};
pub use report::{Report, ReportOptions};
pub use store::{ChainHead, Store, StoreError, StoreOptions, WAL_TIDY_BYTES};
pub use timestamp::{parse_age, parse_since, parse_since_at, TimeError, Timestamp};
pub use verify::{Anchor, PruneReport, VerifyReport};
pub use writer::{AuditWriter, EventTap, WriterConfig, WriterError, WriterStats};

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Writer(#[from] WriterError),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Time(#[from] TimeError),
}

/// Verifies the hash chain of `store` (the same as [`Store::verify`]).
pub fn verify(store: &Store) -> Result<VerifyReport, StoreError> {
    store.verify()
}
