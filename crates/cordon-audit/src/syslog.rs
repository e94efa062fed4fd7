//! A live syslog sink: audit events forwarded to a receiver as RFC 5424 messages.
//!
//! Guarantees:
//! - **Never in the data path's way.** [`SyslogSink::offer`] checks the event's severity, copies
//!   it onto a bounded queue with `try_send` and returns; a dedicated thread formats and sends.
//!   When the queue is full (the receiver or the network is slow) the event is dropped and
//!   counted in [`SyslogStats::dropped`]; an event that cannot be sent (receiver down, TCP
//!   connection refused) is counted in [`SyslogStats::failed`]. The audit store is unaffected
//!   either way: it stays the record, syslog is a copy.
//! - **Transports.** UDP: one datagram per message (RFC 5426), cut to
//!   [`MAX_UDP_MESSAGE`] bytes. TCP: octet-counted framing, `LEN SP MESSAGE` (RFC 6587 section
//!   3.4.1), so a message may hold any byte; the connection is made on the first message and
//!   made again (at most once per message, with a bounded connect timeout) after an error.
//! - **Format** ([`format_message`]): `<PRI>1 TIMESTAMP HOSTNAME cordon PROCID MSGID
//!   [cordon@32473 …] MSG` with facility 13 (log audit), the severity from
//!   [`crate::export::severity`], MSGID the event kind, structured data holding the session,
//!   user, severity, verdict, destination and process (values escaped as RFC 5424 section 6.3.3
//!   says: `"`, `\` and `]` backslash-escaped), and MSG the event as one JSON object (the
//!   JSON-lines export's field names, without `id` and hashes, which only exist once the event
//!   is committed). Header fields the sandbox could influence never appear in the header: it
//!   holds only cordon's own values.
//! - [`SyslogSink::close`] sends what is queued (for at most the given time), stops the thread
//!   and returns the final counts, so a session can report its losses at its end.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::event::Event;
use crate::export::{severity, Severity};
use crate::writer::EventTap;

/// Facility 13: "log audit" (RFC 5424, table 1).
pub const FACILITY: u8 = 13;
/// The SD-ID of cordon's structured data. 32473 is the private enterprise number RFC 5612
/// reserves for documentation and examples.
pub const SD_ID: &str = "cordon@32473";
/// UDP messages are cut to this many bytes (a safe datagram size on any path).
pub const MAX_UDP_MESSAGE: usize = 8192;
/// How long a TCP connect may take before the message counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP write may block before the message counts as failed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The transport to the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Where and what to forward.
#[derive(Clone, Debug)]
pub struct SyslogConfig {
    pub transport: Transport,
    pub addr: SocketAddr,
    /// Events less severe than this are not forwarded.
    pub min_severity: Severity,
    /// Events the queue holds before [`SyslogSink::offer`] drops.
    pub capacity: usize,
    /// HOSTNAME in the header (default: this host's name).
    pub hostname: String,
}

impl SyslogConfig {
    pub fn new(transport: Transport, addr: SocketAddr, min_severity: Severity) -> SyslogConfig {
        SyslogConfig {
            transport,
            addr,
            min_severity,
            capacity: 4096,
            hostname: local_hostname(),
        }
    }
}

/// Counters, as of the moment they were read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SyslogStats {
    /// Messages handed to the transport.
    pub sent: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
    /// Messages that could not be sent (connect or write error).
    pub failed: u64,
    /// Events below the minimum severity (not forwarded, by design).
    pub filtered: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    filtered: AtomicU64,
}

impl Counters {
    fn stats(&self) -> SyslogStats {
        SyslogStats {
            sent: self.sent.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            filtered: self.filtered.load(Ordering::Relaxed),
        }
    }
}

/// Why the sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum SyslogError {
    #[error("cannot open a UDP socket for syslog to {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the syslog thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// The live sink. Share it with `Arc`; [`SyslogSink::offer`] is cheap and never blocks.
pub struct SyslogSink {
    tx: SyncSender<Box<Event>>,
    min_severity: Severity,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for SyslogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyslogSink")
            .field("stats", &self.counters.stats())
            .finish_non_exhaustive()
    }
}

impl SyslogSink {
    /// Starts the sending thread. A UDP socket is opened here (so a failure is the caller's
    /// error); a TCP connection is made when the first message is sent.
    pub fn start(config: SyslogConfig) -> Result<SyslogSink, SyslogError> {
        let udp = match config.transport {
            Transport::Udp => {
                let bind: SocketAddr = if config.addr.is_ipv4() {
                    "0.0.0.0:0".parse().unwrap_or(config.addr)
                } else {
                    "[::]:0".parse().unwrap_or(config.addr)
                };
                Some(UdpSocket::bind(bind).map_err(|source| SyslogError::Socket {
                    addr: config.addr,
                    source,
                })?)
            }
            Transport::Tcp => None,
        };
        let (tx, rx) = mpsc::sync_channel(config.capacity.max(1));
        let min_severity = config.min_severity;
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let counters = counters.clone();
            let stop = stop.clone();
            let procid = std::process::id();
            std::thread::Builder::new()
                .name("cordon-syslog".into())
                .spawn(move || {
                    let mut out = Sender {
                        config,
                        udp,
                        tcp: None,
                    };
                    pump(&rx, &mut out, &counters, &stop, procid);
                })
                .map_err(SyslogError::Spawn)?
        };
        Ok(SyslogSink {
            tx,
            min_severity,
            counters,
            stop,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Forwards `event` if it is severe enough; never blocks (see the module guarantees).
    pub fn offer(&self, event: &Event) {
        if severity(event) < self.min_severity {
            self.counters.filtered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.tx.try_send(Box::new(event.clone())) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn stats(&self) -> SyslogStats {
        self.counters.stats()
    }

    /// Sends what is queued, for at most `limit`, then stops; returns the final counts. Events
    /// still queued after `limit` count as dropped.
    pub fn close(&self, limit: Duration) -> SyslogStats {
        let deadline = Instant::now() + limit;
        let handle = match self.thread.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(handle) = handle {
            // Ask the thread to finish the queue; past the deadline it stops and counts the rest.
            self.stop.store(true, Ordering::Release);
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                let _ = handle.join();
            } else {
                // A receiver that blocks us past the deadline: leave the thread to its write
                // timeout; nothing waits for it.
                drop(handle);
            }
        }
        self.counters.stats()
    }
}

impl EventTap for SyslogSink {
    fn offer(&self, event: &Event) {
        SyslogSink::offer(self, event);
    }
}

struct Sender {
    config: SyslogConfig,
    udp: Option<UdpSocket>,
    tcp: Option<TcpStream>,
}

impl Sender {
    fn send(&mut self, message: &[u8]) -> std::io::Result<()> {
        match self.config.transport {
            Transport::Udp => {
                let socket = self
                    .udp
                    .as_ref()
                    .ok_or_else(|| std::io::Error::other("no UDP socket"))?;
                let cut = &message[..message.len().min(MAX_UDP_MESSAGE)];
                socket.send_to(cut, self.config.addr).map(drop)
            }
            Transport::Tcp => {
                let mut frame = Vec::with_capacity(message.len() + 8);
                frame.extend_from_slice(message.len().to_string().as_bytes());
                frame.push(b' ');
                frame.extend_from_slice(message);
                if let Some(stream) = &mut self.tcp {
                    if stream.write_all(&frame).is_ok() {
                        return Ok(());
                    }
                    self.tcp = None;
                }
                let mut stream = TcpStream::connect_timeout(&self.config.addr, CONNECT_TIMEOUT)?;
                stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
                stream.set_nodelay(true)?;
                stream.write_all(&frame)?;
                self.tcp = Some(stream);
                Ok(())
            }
        }
    }
}

fn pump(
    rx: &Receiver<Box<Event>>,
    out: &mut Sender,
    counters: &Counters,
    stop: &AtomicBool,
    procid: u32,
) {
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(event) => {
                let message = format_message(&event, &out.config.hostname, procid);
                match out.send(message.as_bytes()) {
                    Ok(()) => counters.sent.fetch_add(1, Ordering::Relaxed),
                    Err(_) => counters.failed.fetch_add(1, Ordering::Relaxed),
                };
            }
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::Acquire) => return,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// This host's name, or `-` (the RFC 5424 NILVALUE) when it has none.
fn local_hostname() -> String {
    nix_hostname().unwrap_or_else(|| "-".to_owned())
}

fn nix_hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = header_token(name.trim(), 255);
    (name != "-").then_some(name)
}

/// A header field: printable US-ASCII without spaces, at most `max` characters, `-` if empty.
fn header_token(s: &str, max: usize) -> String {
    let t: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if t.is_empty() {
        "-".to_owned()
    } else {
        t
    }
}

/// An SD-PARAM value: `"`, `\` and `]` escaped (RFC 5424 section 6.3.3).
pub fn sd_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `event` as one RFC 5424 message (see the module guarantees).
pub fn format_message(event: &Event, hostname: &str, procid: u32) -> String {
    let sev = severity(event);
    let pri = u16::from(FACILITY) * 8 + u16::from(sev.syslog());
    let mut out = format!(
        "<{pri}>1 {} {} cordon {procid} {} [{SD_ID}",
        event.ts.to_rfc3339(),
        header_token(hostname, 255),
        header_token(event.kind.as_str(), 32),
    );
    let mut param = |name: &str, value: &str| {
        let _ = write!(out, " {name}=\"{}\"", sd_escape(value));
    };
    param("session", &event.session_id);
    param("user", &event.user_id);
    param("severity", sev.as_str());
    if let Some(v) = event.verdict {
        param("verdict", v.as_str());
    }
    if let Some(host) = &event.host {
        param("host", host);
    }
    if let Some(port) = event.port {
        param("port", &port.to_string());
    }
    if let Some(rule) = &event.rule {
        param("rule", rule);
    }
    if let Some(p) = &event.process {
        param("pid", &p.pid.to_string());
        param("exe", &p.exe);
    }
    out.push_str("] ");
    // Serialising an event cannot fail (string keys, no non-finite floats).
    out.push_str(&serde_json::to_string(event).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventKind, ProcessInfo, Verdict};
    use crate::timestamp::Timestamp;

    fn event() -> Event {
        let mut e = Event::new(EventKind::Blocked, "01JS", "alice", "c0de");
        e.ts = Timestamp::from_millis(1_700_000_000_123);
        e.host = Some("evil\"].test".into());
        e.port = Some(443);
        e.verdict = Some(Verdict::Block);
        e.rule = Some("default-deny".into());
        e.process = Some(ProcessInfo {
            pid: 7,
            exe: "/usr/bin/curl".into(),
            cmdline: vec!["curl".into()],
        });
        e
    }

    #[test]
    fn a_message_has_the_rfc_5424_header_and_escaped_structured_data() {
        let m = format_message(&event(), "host a", 42);
        assert!(
            m.starts_with(
                "<108>1 2023-11-14T22:13:20.123Z hosta cordon 42 blocked [cordon@32473 session=\"01JS\" user=\"alice\" severity=\"warning\" verdict=\"block\" host=\"evil\\\"\\].test\" port=\"443\" rule=\"default-deny\" pid=\"7\" exe=\"/usr/bin/curl\"] {"
            ),
            "{m}"
        );
        let (_, json) = m.split_once("] ").unwrap();
        let json: Event = serde_json::from_str(json).unwrap();
        assert_eq!(json, event());
        assert!(!m.contains('\n'));
    }

    #[test]
    fn alerts_are_high_priority_and_info_is_informational() {
        let mut alert = event();
        alert.kind = EventKind::Alert;
        assert!(format_message(&alert, "h", 1).starts_with("<106>1 "));
        let mut allowed = event();
        allowed.kind = EventKind::Connection;
        allowed.verdict = Some(Verdict::Allow);
        assert!(format_message(&allowed, "h", 1).starts_with("<110>1 "));
        assert_eq!(header_token("", 5), "-");
        assert_eq!(header_token("a b\u{e9}c", 2), "ab");
        assert_eq!(sd_escape(r#"a"b\c]d"#), r#"a\"b\\c\]d"#);
    }
}
