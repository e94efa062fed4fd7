//! Network events: what the gateway tells the audit about every attempt.
//!
//! Guarantees:
//! - Every decision the gateway takes (allowed, blocked, would-have-blocked) produces exactly one
//!   event carrying the session's attribution and the rule that decided; connection and request
//!   events are emitted when they end, with bytes and duration.
//! - Emitting never blocks the data path: [`EventSink::record`] implementations must return at
//!   once (the provided [`ChannelSink`] hands events to an unbounded channel that a writer thread
//!   drains).
//! - Paths are cut to [`MAX_PATH_CHARS`] characters before they leave the gateway.

use std::net::IpAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::owner::ProcessInfo;

/// Request paths in events are cut to this many characters.
pub const MAX_PATH_CHARS: usize = 100;

/// Who and what a network event is attributed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct SessionInfo {
    pub id: String,
    pub user: String,
    pub code_sha256: String,
}

impl SessionInfo {
    /// The attribution used for requests that presented no valid proxy token (standalone mode).
    pub fn unauthenticated() -> Self {
        SessionInfo {
            id: "unauthenticated".into(),
            user: String::new(),
            code_sha256: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    DnsQuery,
    Connection,
    HttpRequest,
    Blocked,
    BudgetExhausted,
    /// High severity: a secret, placeholder, canary or secret-shaped value seen leaving where it
    /// must not (the request itself is also recorded as `Blocked`). `rule` names the pattern.
    Alert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Block,
    /// Allowed because the policy is in report mode; enforcement would have blocked it.
    ReportWouldBlock,
}

/// Which path of the gateway saw the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// Explicit proxy, absolute-form HTTP request.
    Proxy,
    /// Explicit proxy, CONNECT tunnel.
    Connect,
    /// A TCP connection captured by the sandbox's nftables redirect.
    Transparent,
    Dns,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetEvent {
    pub kind: EventKind,
    pub session: SessionInfo,
    pub ts: SystemTime,
    pub host: Option<String>,
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    pub verdict: Verdict,
    pub rule: String,
    pub reason: Option<String>,
    pub via: Via,
    /// The sandbox process that owns the client socket, when the embedder looks it up
    /// ([`crate::owner`]).
    #[serde(serialize_with = "serialize_process")]
    pub process: Option<Arc<ProcessInfo>>,
}

fn serialize_process<S: serde::Serializer>(
    p: &Option<Arc<ProcessInfo>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    p.as_deref().serialize(s)
}

impl NetEvent {
    pub(crate) fn new(kind: EventKind, session: &SessionInfo, via: Via, verdict: Verdict) -> Self {
        NetEvent {
            kind,
            session: session.clone(),
            ts: SystemTime::now(),
            host: None,
            ip: None,
            port: None,
            method: None,
            path: None,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
            verdict,
            rule: String::new(),
            reason: None,
            via,
            process: crate::owner::current(),
        }
    }
}

/// Cuts a request path to [`MAX_PATH_CHARS`] characters (never inside a UTF-8 sequence).
pub fn cut_path(path: &str) -> String {
    path.chars().take(MAX_PATH_CHARS).collect()
}

/// Where the gateway sends its events. Implementations must not block.
pub trait EventSink: Send + Sync {
    fn record(&self, e: NetEvent);
}

/// Drops every event (benchmarks of the data path alone).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopSink;

impl EventSink for NoopSink {
    fn record(&self, _e: NetEvent) {}
}

/// Keeps every event in memory (tests, small tools).
#[derive(Debug, Default)]
pub struct MemorySink {
    events: Mutex<Vec<NetEvent>>,
}

impl MemorySink {
    pub fn new() -> Self {
        Self::default()
    }
    /// A copy of every event recorded so far, in order.
    pub fn events(&self) -> Vec<NetEvent> {
        match self.events.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl EventSink for MemorySink {
    fn record(&self, e: NetEvent) {
        match self.events.lock() {
            Ok(mut g) => g.push(e),
            Err(poisoned) => poisoned.into_inner().push(e),
        }
    }
}

/// Hands events to an unbounded channel: `record` never blocks and never drops an event while
/// the receiver lives. The receiving side (the audit writer thread) batches them into the store.
#[derive(Debug, Clone)]
pub struct ChannelSink {
    tx: mpsc::Sender<NetEvent>,
}

impl ChannelSink {
    pub fn new() -> (Self, mpsc::Receiver<NetEvent>) {
        let (tx, rx) = mpsc::channel();
        (ChannelSink { tx }, rx)
    }
}

impl EventSink for ChannelSink {
    fn record(&self, e: NetEvent) {
        // A closed receiver means the audit writer is gone; the session is ending and there is
        // nowhere left to write. Nothing on the data path may wait for it.
        if self.tx.send(e).is_err() {
            tracing::warn!("audit channel closed; network event dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cut_to_one_hundred_characters_on_char_boundaries() {
        let long = "é".repeat(150);
        let cut = cut_path(&long);
        assert_eq!(cut.chars().count(), MAX_PATH_CHARS);
        assert_eq!(cut_path("/short"), "/short");
    }

    #[test]
    fn the_channel_sink_delivers_events_in_order() {
        let (sink, rx) = ChannelSink::new();
        let s = SessionInfo::unauthenticated();
        for port in [1u16, 2, 3] {
            let mut e = NetEvent::new(EventKind::DnsQuery, &s, Via::Dns, Verdict::Allow);
            e.port = Some(port);
            sink.record(e);
        }
        let ports: Vec<_> = rx.try_iter().map(|e| e.port).collect();
        assert_eq!(ports, vec![Some(1), Some(2), Some(3)]);
    }
}
