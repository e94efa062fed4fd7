//! The audit writer: a dedicated thread that batches events into the store.
//!
//! Guarantees:
//! - [`AuditWriter::record`] never blocks and never fails: it puts the event on a bounded
//!   channel with `try_send`. If the channel is full (or the writer thread is gone) the event is
//!   counted in [`WriterStats::dropped`] — never silently lost. The channel holds
//!   [`WriterConfig::capacity`] events (default 65 536, about 1.5 MiB of slots since events are
//!   boxed); the writer sustains well over 100 000 events/s (see `examples/insert_rate.rs`), so
//!   the channel only fills if the disk stalls or another process holds the write lock for a
//!   long time.
//! - Events are committed in batches: one transaction per batch of up to
//!   [`WriterConfig::max_batch`] events, started by the first queued event and closed when the
//!   batch is full, when [`WriterConfig::max_delay`] has passed since it started, or at once on
//!   [`AuditWriter::flush`] or close. A `kill -9` therefore loses at most one batch (the events
//!   still queued or in the open transaction); everything committed before is in the file.
//! - [`AuditWriter::flush`] returns once everything recorded before the call is committed.
//!   [`AuditWriter::close`] and `Drop` commit everything recorded and join the thread, so a
//!   normal exit, or a signal handler that calls `close`, loses nothing.
//! - A batch whose commit fails (e.g. another process held the lock past the busy timeout) is
//!   retried with back-off; if it still fails its events are counted in [`WriterStats::failed`]
//!   and the error is kept in [`WriterStats::last_error`]. Flush and close report such losses.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::event::Event;
use crate::store::{Store, StoreError, StoreOptions};

/// Why the writer could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("cannot start the audit writer thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the audit writer thread is gone (it panicked)")]
    Gone,
    #[error("audit events were lost: {dropped} dropped (queue full), {failed} failed to commit{}",
        .last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    EventsLost {
        dropped: u64,
        failed: u64,
        last_error: Option<String>,
    },
}

/// Tuning for [`AuditWriter`]. The defaults suit the gateway.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Events the channel holds before [`AuditWriter::record`] starts dropping.
    pub capacity: usize,
    /// Most events in one transaction.
    pub max_batch: usize,
    /// Longest time an event waits for its batch to fill before it is committed.
    pub max_delay: Duration,
    /// Extra attempts for a batch whose commit failed, with doubling back-off from 50 ms.
    pub retries: u32,
    pub store: StoreOptions,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            capacity: 65_536,
            max_batch: 256,
            max_delay: Duration::from_millis(20),
            retries: 4,
            store: StoreOptions::default(),
        }
    }
}

/// Counters, as of the moment they were read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WriterStats {
    /// Events accepted by [`AuditWriter::record`].
    pub recorded: u64,
    /// Events committed to the store.
    pub committed: u64,
    /// Events refused because the channel was full or the writer was gone.
    pub dropped: u64,
    /// Events whose batch could not be committed after all retries.
    pub failed: u64,
    /// Transactions committed.
    pub batches: u64,
    /// The most recent commit error, if any.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Shared {
    recorded: AtomicU64,
    committed: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    batches: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn stats(&self) -> WriterStats {
        WriterStats {
            recorded: self.recorded.load(Ordering::Relaxed),
            committed: self.committed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            last_error: self.last_error.lock().map(|e| e.clone()).unwrap_or(None),
        }
    }
}

enum Msg {
    // Boxed so a channel slot is two words, not a whole event.
    Event(Box<Event>),
    Flush(SyncSender<()>),
}

/// Sees every event [`AuditWriter::record`] is given, before it is queued (a live sink such as
/// [`crate::syslog::SyslogSink`]). Implementations must return at once.
pub trait EventTap: Send + Sync {
    fn offer(&self, event: &Event);
}

/// Records events to an audit store without blocking the caller. Share it with `Arc`.
pub struct AuditWriter {
    tap: Option<Arc<dyn EventTap>>,
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    /// Losses already reported by a previous `flush`, so each is reported once.
    reported: Mutex<(u64, u64)>,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter")
            .field("stats", &self.shared.stats())
            .finish()
    }
}

impl AuditWriter {
    /// Opens (creating if needed) the store at `path` and starts the writer thread.
    pub fn open(path: impl AsRef<Path>) -> Result<AuditWriter, crate::Error> {
        AuditWriter::open_with(path, WriterConfig::default())
    }

    /// [`AuditWriter::open`] with explicit tuning.
    pub fn open_with(
        path: impl AsRef<Path>,
        config: WriterConfig,
    ) -> Result<AuditWriter, crate::Error> {
        // Opened here, so a bad path or a newer schema is the caller's error, not a dead thread.
        let store = Store::open_with(path, &config.store)?;
        Ok(AuditWriter::start(store, config)?)
    }

    /// Starts the writer thread on an already open store.
    pub fn start(store: Store, config: WriterConfig) -> Result<AuditWriter, WriterError> {
        let (tx, rx) = mpsc::sync_channel(config.capacity.max(1));
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("cordon-audit".into())
            .spawn(move || run(store, rx, &config, &thread_shared))
            .map_err(WriterError::Spawn)?;
        Ok(AuditWriter {
            tap: None,
            tx: Some(tx),
            thread: Some(thread),
            shared,
            reported: Mutex::new((0, 0)),
        })
    }

    /// Shows every event recorded from now on to `tap` as well.
    pub fn with_tap(mut self, tap: Arc<dyn EventTap>) -> AuditWriter {
        self.tap = Some(tap);
        self
    }

    /// Queues `event`; never blocks. See the module guarantees for what happens when full.
    pub fn record(&self, event: Event) {
        if let Some(tap) = &self.tap {
            tap.offer(&event);
        }
        let sent = match &self.tx {
            Some(tx) => match tx.try_send(Msg::Event(Box::new(event))) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
            None => false,
        };
        let counter = if sent {
            &self.shared.recorded
        } else {
            &self.shared.dropped
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Events dropped so far because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// The writer's counters.
    pub fn stats(&self) -> WriterStats {
        self.shared.stats()
    }

    /// Blocks until every event recorded before this call is committed. Errors if the writer
    /// thread is gone, or if events were dropped or failed since the last flush.
    pub fn flush(&self) -> Result<(), WriterError> {
        let tx = self.tx.as_ref().ok_or(WriterError::Gone)?;
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        tx.send(Msg::Flush(done_tx))
            .map_err(|_| WriterError::Gone)?;
        done_rx.recv().map_err(|_| WriterError::Gone)?;
        self.report_new_losses()
    }

    fn report_new_losses(&self) -> Result<(), WriterError> {
        let stats = self.stats();
        let mut reported = self
            .reported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let new_dropped = stats.dropped.saturating_sub(reported.0);
        let new_failed = stats.failed.saturating_sub(reported.1);
        *reported = (stats.dropped, stats.failed);
        if new_dropped == 0 && new_failed == 0 {
            Ok(())
        } else {
            Err(WriterError::EventsLost {
                dropped: new_dropped,
                failed: new_failed,
                last_error: stats.last_error,
            })
        }
    }

    /// Commits everything recorded, stops the thread and returns the final counters; errors if
    /// any event was lost over the writer's life.
    pub fn close(mut self) -> Result<WriterStats, WriterError> {
        self.shutdown()?;
        let stats = self.stats();
        if stats.dropped == 0 && stats.failed == 0 {
            Ok(stats)
        } else {
            Err(WriterError::EventsLost {
                dropped: stats.dropped,
                failed: stats.failed,
                last_error: stats.last_error,
            })
        }
    }

    fn shutdown(&mut self) -> Result<(), WriterError> {
        // Dropping the sender lets the thread drain what is queued, commit, and return.
        drop(self.tx.take());
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| WriterError::Gone),
            None => Ok(()),
        }
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        // Nothing to report to from here; `close` is the way to learn about losses.
        let _ = self.shutdown();
    }
}

/// The writer thread: collect a batch, commit it, answer flushes, until every sender is gone.
fn run(mut store: Store, rx: Receiver<Msg>, config: &WriterConfig, shared: &Shared) {
    let max_batch = config.max_batch.max(1);
    let mut batch: Vec<Event> = Vec::with_capacity(max_batch);
    let mut flushes: Vec<SyncSender<()>> = Vec::new();
    loop {
        // Wait for the first message of a batch.
        let first = match rx.recv() {
            Ok(msg) => msg,
            Err(_) => break,
        };
        let mut disconnected = false;
        match first {
            Msg::Event(event) => {
                batch.push(*event);
                let deadline = Instant::now() + config.max_delay;
                while batch.len() < max_batch {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(wait) {
                        Ok(Msg::Event(event)) => batch.push(*event),
                        Ok(Msg::Flush(done)) => {
                            flushes.push(done);
                            break;
                        }
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            disconnected = true;
                            break;
                        }
                    }
                }
            }
            Msg::Flush(done) => flushes.push(done),
        }
        commit(&mut store, &mut batch, config, shared);
        for done in flushes.drain(..) {
            // The flusher may have given up waiting; nothing to do then.
            let _ = done.send(());
        }
        if disconnected {
            break;
        }
    }
    // Senders are gone, but `recv` only reports that once the channel is empty, so every
    // recorded event has been committed by now.
    commit(&mut store, &mut batch, config, shared);
}

fn commit(store: &mut Store, batch: &mut Vec<Event>, config: &WriterConfig, shared: &Shared) {
    if batch.is_empty() {
        return;
    }
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 0;
    loop {
        match store.append(batch) {
            Ok(_) => {
                shared
                    .committed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                shared.batches.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Err(err) => {
                set_last_error(shared, &err);
                if attempt >= config.retries {
                    shared
                        .failed
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    break;
                }
                attempt += 1;
                std::thread::sleep(backoff);
                backoff = backoff.saturating_mul(2);
            }
        }
    }
    batch.clear();
}

fn set_last_error(shared: &Shared, err: &StoreError) {
    if let Ok(mut last) = shared.last_error.lock() {
        *last = Some(err.to_string());
    }
}
