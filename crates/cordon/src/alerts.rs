//! Alerts: what the supervisor does with every detection-rule firing.
//!
//! Guarantees:
//! - Every firing becomes one `alert` audit event (rule `detect.<rule>`, the summary as reason,
//!   signal, severity, response and evidence in `detail`) and one stderr line
//!   `cordon: alert: session <id>: <rule>: <summary> (response: <response>)`, whatever the rule's
//!   `alert` switch says; with `alert = true` and `[alerts] webhook` set it is also POSTed as
//!   JSON by the supervisor — never from inside the sandbox.
//! - [`Alerts::fire`] never blocks: webhook deliveries go through a bounded queue
//!   ([`QUEUE`] alerts) to their own thread; a full queue drops the delivery (the audit event and
//!   stderr line still exist) and says so on stderr.
//! - Each delivery is retried `retries` times with doubling back-off from 200 ms, each attempt
//!   bounded by `timeout`; at session end [`Alerts::finish`] waits at most one `timeout` (and
//!   never more than [`FINISH_MAX`]) for the queue to drain.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cordon_audit::{Attribution, AuditWriter, EventKind};
use cordon_gateway::Detection;
use cordon_policy::{AlertsPolicy, WebhookUrl};
use serde::Serialize;

/// Alerts waiting for the webhook at most.
pub const QUEUE: usize = 64;
/// Longest wait for pending webhook deliveries at session end.
pub const FINISH_MAX: Duration = Duration::from_secs(10);

/// A firing as the result object lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Fired {
    pub rule: String,
    pub signal: String,
    pub severity: String,
    pub response: String,
    pub summary: String,
    pub evidence: serde_json::Value,
}

/// The JSON body of a webhook delivery.
#[derive(Debug, Clone, Serialize)]
pub struct Payload {
    pub session: String,
    pub user: String,
    pub code_sha256: String,
    pub rule: String,
    pub signal: String,
    pub severity: String,
    pub response: String,
    pub summary: String,
    pub evidence: serde_json::Value,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
}

struct Webhook {
    tx: Option<SyncSender<Payload>>,
    done: Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
    timeout: Duration,
}

/// The alert side of one session.
pub struct Alerts {
    attribution: Attribution,
    writer: Mutex<Option<Arc<AuditWriter>>>,
    /// Alert events of a session without an audit writer (no network), written with its end.
    pending: Mutex<Vec<cordon_audit::Event>>,
    /// Set by [`Alerts::new`], started by [`Alerts::start`] (the supervisor may start no thread
    /// before the sandbox is spawned).
    config: Option<(WebhookUrl, Duration, u32)>,
    webhook: Mutex<Option<Webhook>>,
    fired: Mutex<Vec<Fired>>,
}

fn text<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl Alerts {
    pub fn new(attribution: Attribution, policy: &AlertsPolicy) -> Arc<Alerts> {
        let config = policy.webhook.as_deref().and_then(|url| {
            // The policy reader validated it; an unparsable one here means a policy built in code.
            match WebhookUrl::parse(url) {
                Ok(url) => Some((url, policy.timeout, policy.retries)),
                Err(e) => {
                    eprintln!("cordon: warning: alerts.webhook: {e}");
                    None
                }
            }
        });
        Arc::new(Alerts {
            attribution,
            writer: Mutex::new(None),
            pending: Mutex::new(Vec::new()),
            config,
            webhook: Mutex::new(None),
            fired: Mutex::new(Vec::new()),
        })
    }

    /// Starts the webhook sender thread (if a webhook is configured). Call once the sandbox is
    /// spawned; firings before that are not sent to the webhook.
    pub fn start(&self) {
        if let (Some((url, timeout, retries)), Ok(mut w)) = (&self.config, self.webhook.lock()) {
            if w.is_none() {
                *w = Some(start_webhook(url.clone(), *timeout, *retries));
            }
        }
    }

    /// Where alert events are written (set once the session's audit writer is open).
    pub fn set_writer(&self, writer: Arc<AuditWriter>) {
        if let Ok(mut w) = self.writer.lock() {
            *w = Some(writer);
        }
    }

    /// Records a firing: audit event, stderr line, webhook (queued). Never blocks.
    pub fn fire(&self, d: &Detection) {
        let rule = d.rule.as_str();
        let response = text(&d.response);
        let evidence = serde_json::to_value(&d.evidence).unwrap_or_default();
        eprintln!(
            "cordon: alert: session {}: {rule}: {} (response: {response})",
            self.attribution.session_id, d.summary
        );
        let mut ev = self.attribution.event(EventKind::Alert);
        ev.rule = Some(format!("detect.{rule}"));
        ev.reason = Some(d.summary.clone());
        ev.detail = serde_json::json!({
            "signal": d.signal,
            "severity": d.severity,
            "response": response,
            "alert": d.alert,
            "evidence": evidence,
        });
        match self.writer.lock().ok().and_then(|w| w.clone()) {
            Some(w) => w.record(ev),
            None => {
                if let Ok(mut p) = self.pending.lock() {
                    p.push(ev);
                }
            }
        }
        let fired = Fired {
            rule: rule.to_owned(),
            signal: d.signal.clone(),
            severity: text(&d.severity),
            response: response.clone(),
            summary: d.summary.clone(),
            evidence: evidence.clone(),
        };
        if let Ok(mut f) = self.fired.lock() {
            f.push(fired);
        }
        if !d.alert {
            return;
        }
        let ts_ms =
            d.ts.duration_since(std::time::UNIX_EPOCH)
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0);
        let payload = Payload {
            session: self.attribution.session_id.clone(),
            user: self.attribution.user_id.clone(),
            code_sha256: self.attribution.code_sha256.clone(),
            rule: rule.to_owned(),
            signal: d.signal.clone(),
            severity: text(&d.severity),
            response,
            summary: d.summary.clone(),
            evidence,
            ts_ms,
        };
        if let Ok(w) = self.webhook.lock() {
            if let Some(tx) = w.as_ref().and_then(|w| w.tx.as_ref()) {
                match tx.try_send(payload) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => eprintln!(
                        "cordon: warning: alert webhook queue full ({QUEUE}); alert {rule} not sent (it is in the audit)"
                    ),
                    Err(TrySendError::Disconnected(_)) => {}
                }
            }
        }
    }

    /// Alert events not yet written (sessions without an audit writer).
    pub fn take_pending(&self) -> Vec<cordon_audit::Event> {
        self.pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    /// Every firing so far, in order.
    pub fn fired(&self) -> Vec<Fired> {
        self.fired.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Closes the webhook queue and waits, for at most one delivery timeout (capped at
    /// [`FINISH_MAX`]), for the deliveries still queued.
    pub fn finish(&self) {
        let Some(mut w) = self.webhook.lock().ok().and_then(|mut w| w.take()) else {
            return;
        };
        w.tx = None;
        let wait = w.timeout.min(FINISH_MAX);
        match w.done.recv_timeout(wait) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if let Some(t) = w.thread.take() {
                    let _ = t.join();
                }
            }
            // The thread is left to die with the process; its deliveries are in the audit.
            Err(RecvTimeoutError::Timeout) => eprintln!(
                "cordon: warning: alert webhook did not finish within {}ms; pending alerts dropped",
                wait.as_millis()
            ),
        }
    }
}

fn start_webhook(url: WebhookUrl, timeout: Duration, retries: u32) -> Webhook {
    let (tx, rx) = mpsc::sync_channel::<Payload>(QUEUE);
    let (done_tx, done) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("cordon-alerts".into())
        .spawn(move || {
            for payload in rx {
                deliver(&url, &payload, timeout, retries);
            }
            let _ = done_tx.send(());
        })
        .ok();
    Webhook {
        tx: Some(tx),
        done,
        thread,
        timeout,
    }
}

/// POSTs with retries; reports the final failure on stderr.
fn deliver(url: &WebhookUrl, payload: &Payload, timeout: Duration, retries: u32) {
    let body = match serde_json::to_vec(payload) {
        Ok(b) => b,
        Err(_) => return,
    };
    let mut backoff = Duration::from_millis(200);
    let mut last = String::new();
    for attempt in 0..=retries {
        if attempt > 0 {
            std::thread::sleep(backoff);
            backoff = backoff.saturating_mul(2);
        }
        match post(url, &body, timeout) {
            Ok(status) if (200..300).contains(&status) => return,
            Ok(status) => last = format!("HTTP {status}"),
            Err(e) => last = e.to_string(),
        }
    }
    eprintln!(
        "cordon: warning: alert webhook http://{}{}: {last} after {} attempts",
        url.authority,
        url.path,
        retries + 1
    );
}

/// One HTTP/1.1 POST; returns the response status.
fn post(url: &WebhookUrl, body: &[u8], timeout: Duration) -> std::io::Result<u16> {
    let started = Instant::now();
    let addr = url
        .authority
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("the webhook host has no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    let left = |started: Instant| {
        timeout
            .checked_sub(started.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))
    };
    s.set_write_timeout(Some(left(started)?))?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: cordon\r\n\r\n",
        url.path,
        url.host,
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        s.set_read_timeout(Some(left(started)?))?;
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(2).any(|w| w == b"\r\n") || buf.len() > 4096 {
            break;
        }
    }
    let line = String::from_utf8_lossy(&buf);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status line in the webhook's answer"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn hook(status: u16, fail_first: usize) -> (WebhookUrl, Receiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut n = 0;
            for s in l.incoming() {
                let mut s = s.unwrap();
                n += 1;
                if n <= fail_first {
                    drop(s);
                    continue;
                }
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !String::from_utf8_lossy(&got).contains("}") {
                    let k = s.read(&mut buf).unwrap();
                    if k == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..k]);
                }
                tx.send(String::from_utf8_lossy(&got).into_owned()).unwrap();
                let _ = write!(s, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
            }
        });
        (
            WebhookUrl::parse(&format!("http://127.0.0.1:{port}/hook")).unwrap(),
            rx,
        )
    }

    fn payload() -> Payload {
        Payload {
            session: "s".into(),
            user: "u".into(),
            code_sha256: "c".into(),
            rule: "dns_tunnel".into(),
            signal: "distinct_names".into(),
            severity: "high".into(),
            response: "terminate".into(),
            summary: "x".into(),
            evidence: serde_json::json!({"n": 1}),
            ts_ms: 1,
        }
    }

    #[test]
    fn a_delivery_is_a_json_post_to_the_path() {
        let (url, rx) = hook(200, 0);
        deliver(&url, &payload(), Duration::from_secs(2), 0);
        let req = rx.recv_timeout(Duration::from_secs(2)).unwrap();
        assert!(req.starts_with("POST /hook HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Content-Type: application/json"), "{req}");
        assert!(req.contains("\"rule\":\"dns_tunnel\""), "{req}");
    }

    #[test]
    fn a_failed_delivery_is_retried_with_backoff() {
        let (url, rx) = hook(200, 2);
        let t = Instant::now();
        deliver(&url, &payload(), Duration::from_secs(2), 3);
        assert!(rx.recv_timeout(Duration::from_secs(2)).is_ok());
        // 200 ms + 400 ms of back-off before the third attempt.
        assert!(
            t.elapsed() >= Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn delivery_gives_up_after_the_retries() {
        let (url, rx) = hook(500, 0);
        deliver(&url, &payload(), Duration::from_secs(2), 1);
        assert_eq!(rx.try_iter().count(), 2);
    }
}
