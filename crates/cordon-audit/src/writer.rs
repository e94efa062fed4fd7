//! The audit writer: a dedicated thread that batches events into the store.
//!
//! Guarantees:
//! - [`AuditWriter::record`] never blocks on the store and never fails: it appends the event to
//!   an in-memory queue under a short lock (no system call in the common case). If
//!   [`WriterConfig::capacity`] events are already waiting (or the writer is closed) the event is
//!   counted in [`WriterStats::dropped`] — never silently lost. The writer sustains well over
//!   100 000 events/s (see `examples/insert_rate.rs`), so the queue only fills if the disk
//!   stalls or another process holds the write lock for a long time.
//! - The writer thread is not woken per event: the first event queued while it is idle wakes it,
//!   and it then sleeps until that event is [`WriterConfig::max_delay`] old, or until
//!   [`WriterConfig::max_batch`] events are waiting, or a flush or close arrives; then it takes
//!   everything queued and commits it, one transaction per [`WriterConfig::max_batch`] events.
//!   So no event waits more than `max_delay` (default 5 ms) before its commit starts, and a
//!   `kill -9` loses at most what was queued or in the open transaction: the events of about the
//!   last `max_delay` plus one commit. Everything committed before is in the file.
//! - The writer thread runs under `SCHED_BATCH` (same nice value, same share of CPU), so its
//!   commits do not preempt the threads that serve traffic when it wakes.
//! - [`AuditWriter::flush`] returns once everything recorded before the call is committed.
//!   [`AuditWriter::close`] and `Drop` commit everything recorded and join the thread, so a
//!   normal exit, or a signal handler that calls `close`, loses nothing.
//! - A batch whose commit fails (e.g. another process held the lock past the busy timeout) is
//!   retried with back-off; if it still fails its events are counted in [`WriterStats::failed`]
//!   and the error is kept in [`WriterStats::last_error`]. Flush and close report such losses.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
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
    /// Events the queue holds before [`AuditWriter::record`] starts dropping.
    pub capacity: usize,
    /// Most events in one transaction; this many waiting events also wake the writer before
    /// `max_delay` has passed.
    pub max_batch: usize,
    /// Longest time an event waits in the queue before its batch's commit starts.
    pub max_delay: Duration,
    /// Extra attempts for a batch whose commit failed, with doubling back-off from 50 ms.
    pub retries: u32,
    pub store: StoreOptions,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            capacity: 65_536,
            max_batch: 4096,
            // Short windows keep each commit burst short (the gateway's p99 on a 2-CPU
            // machine: docs/benchmarks.md) and bound what a `kill -9` can lose.
            max_delay: Duration::from_millis(5),
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
    /// Events refused because the queue was full or the writer was closed.
    pub dropped: u64,
    /// Events whose batch could not be committed after all retries.
    pub failed: u64,
    /// Transactions committed.
    pub batches: u64,
    /// The most recent commit error, if any.
    pub last_error: Option<String>,
}

/// What producers hand to the writer thread, under one mutex.
#[derive(Default)]
struct Queue {
    events: Vec<Event>,
    /// When the oldest queued event arrived (set by the push onto an empty queue).
    oldest: Option<Instant>,
    flushes: Vec<SyncSender<()>>,
    /// The writer is waiting for a first event with no deadline: the next push must wake it.
    idle: bool,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
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

    /// The queue; a producer that panicked while holding it left it consistent (every
    /// operation under the lock is a push, a swap or a flag), so poisoning is ignored.
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sees every event [`AuditWriter::record`] is given, before it is queued (a live sink such as
/// [`crate::syslog::SyslogSink`]). Implementations must return at once.
pub trait EventTap: Send + Sync {
    fn offer(&self, event: &Event);
}

/// Records events to an audit store without blocking the caller. Share it with `Arc`.
pub struct AuditWriter {
    tap: Option<Arc<dyn EventTap>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    capacity: usize,
    max_batch: usize,
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
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        let capacity = config.capacity.max(1);
        let max_batch = config.max_batch.max(1);
        let thread = std::thread::Builder::new()
            .name("cordon-audit".into())
            .spawn(move || run(store, &config, &thread_shared))
            .map_err(WriterError::Spawn)?;
        Ok(AuditWriter {
            tap: None,
            thread: Some(thread),
            shared,
            capacity,
            max_batch,
            reported: Mutex::new((0, 0)),
        })
    }

    /// Shows every event recorded from now on to `tap` as well.
    pub fn with_tap(mut self, tap: Arc<dyn EventTap>) -> AuditWriter {
        self.tap = Some(tap);
        self
    }

    /// Queues `event`; never blocks on the store. See the module guarantees for what happens
    /// when the queue is full.
    pub fn record(&self, event: Event) {
        if let Some(tap) = &self.tap {
            tap.offer(&event);
        }
        let mut q = self.shared.queue();
        if q.closed || q.events.len() >= self.capacity {
            drop(q);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if q.events.is_empty() {
            q.oldest = Some(Instant::now());
        }
        q.events.push(event);
        // Wake the writer only when it waits for a first event, or when a whole batch is
        // waiting; otherwise it wakes on its own when the oldest event is `max_delay` old.
        let wake = std::mem::take(&mut q.idle) || q.events.len() == self.max_batch;
        drop(q);
        self.shared.recorded.fetch_add(1, Ordering::Relaxed);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Events dropped so far because the queue was full.
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
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        {
            let mut q = self.shared.queue();
            if q.closed {
                return Err(WriterError::Gone);
            }
            q.flushes.push(done_tx);
        }
        self.shared.wake.notify_one();
        // The writer drops the sender without answering only if it panicked.
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
        // Closing lets the thread take what is queued, commit, and return.
        self.shared.queue().closed = true;
        self.shared.wake.notify_one();
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

/// Marks the queue closed if the writer thread unwinds, so producers count drops and flushes
/// fail instead of waiting for a thread that is gone.
struct CloseOnPanic<'a>(&'a Shared);

impl Drop for CloseOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut q = self.0.queue();
            q.closed = true;
            // Dropping the senders wakes every flusher with an error.
            q.flushes.clear();
        }
    }
}

/// The writer thread: wait for a batch, take it, commit it, answer flushes, until closed.
fn run(mut store: Store, config: &WriterConfig, shared: &Shared) {
    let _guard = CloseOnPanic(shared);
    batch_scheduling();
    let max_batch = config.max_batch.max(1);
    let mut batch: Vec<Event> = Vec::new();
    let mut flushes: Vec<SyncSender<()>> = Vec::new();
    loop {
        let closed = {
            let mut q = shared.queue();
            // Idle: nothing queued; the next push wakes us.
            while q.events.is_empty() && q.flushes.is_empty() && !q.closed {
                q.idle = true;
                q = shared.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
            q.idle = false;
            // Let the batch fill until its oldest event is `max_delay` old.
            if let Some(oldest) = q.oldest {
                let deadline = oldest + config.max_delay;
                while q.events.len() < max_batch && q.flushes.is_empty() && !q.closed {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    q = shared
                        .wake
                        .wait_timeout(q, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
            let full = q.events.len() / max_batch * max_batch;
            let due = !q.flushes.is_empty()
                || q.closed
                || q.oldest
                    .is_some_and(|t| t + config.max_delay <= Instant::now());
            if due || full == q.events.len() {
                std::mem::swap(&mut batch, &mut q.events);
                q.oldest = None;
            } else {
                // Woken by full batches before the deadline: take those, leave the rest to
                // fill (their deadline stays the oldest event's, which is earlier: safe).
                let rest = q.events.split_off(full);
                batch = std::mem::replace(&mut q.events, rest);
            }
            flushes.append(&mut q.flushes);
            q.closed
        };
        for chunk in batch.chunks(max_batch) {
            commit(&mut store, chunk, config, shared);
        }
        batch.clear();
        // Keep a large buffer around only while the load needs it.
        if batch.capacity() > 4 * max_batch {
            batch.shrink_to(max_batch);
        }
        for done in flushes.drain(..) {
            // The flusher may have given up waiting; nothing to do then.
            let _ = done.send(());
        }
        if closed {
            // `record` refuses once `closed` is set, so the batch just taken was the last.
            break;
        }
    }
}

/// Puts the calling thread under `SCHED_BATCH`: the same fair share of CPU as before (same
/// nice value, so the writer keeps up exactly as well), but it no longer preempts a
/// latency-sensitive thread (the gateway's workers, their clients) when it wakes. Best effort:
/// a failure leaves the thread as it was.
fn batch_scheduling() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `sched_setscheduler` with pid 0 changes only the calling thread's policy; `param`
    // is a valid, initialised `sched_param` that outlives the call.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
}

fn commit(store: &mut Store, batch: &[Event], config: &WriterConfig, shared: &Shared) {
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
}

fn set_last_error(shared: &Shared, err: &StoreError) {
    if let Ok(mut last) = shared.last_error.lock() {
        *last = Some(err.to_string());
    }
}
