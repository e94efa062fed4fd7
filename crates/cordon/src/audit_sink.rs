//! Gateway events into the audit store.
//!
//! Guarantees: every [`NetEvent`] the gateway emits becomes exactly one audit [`Event`] with the
//! same attribution, destination, verdict, rule and reason; recording never blocks the data
//! path (the writer queues and commits on its own thread).

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use cordon_audit::{AuditWriter, Event, EventKind, Timestamp, Verdict};
use cordon_gateway::event::{self as gw, EventSink, NetEvent};

/// Records gateway events through an [`AuditWriter`].
pub struct AuditSink {
    writer: Arc<AuditWriter>,
}

impl AuditSink {
    pub fn new(writer: Arc<AuditWriter>) -> AuditSink {
        AuditSink { writer }
    }
}

/// The audit form of a gateway event.
pub fn to_audit(e: NetEvent) -> Event {
    let kind = match e.kind {
        gw::EventKind::DnsQuery => EventKind::DnsQuery,
        gw::EventKind::Connection => EventKind::Connection,
        gw::EventKind::HttpRequest => EventKind::HttpRequest,
        gw::EventKind::Blocked => EventKind::Blocked,
        gw::EventKind::BudgetExhausted => EventKind::BudgetExhausted,
        gw::EventKind::Alert => EventKind::Alert,
    };
    let mut ev = Event::new(kind, e.session.id, e.session.user, e.session.code_sha256);
    let ms =
        e.ts.duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
    ev.ts = Timestamp::from_millis(ms);
    ev.host = e.host;
    ev.ip = e.ip;
    ev.port = e.port;
    ev.method = e.method;
    ev.path = e.path;
    ev.bytes_up = Some(e.bytes_up);
    ev.bytes_down = Some(e.bytes_down);
    ev.duration_ms = Some(e.duration_ms);
    ev.verdict = Some(match e.verdict {
        gw::Verdict::Allow => Verdict::Allow,
        gw::Verdict::Block => Verdict::Block,
        gw::Verdict::ReportWouldBlock => Verdict::ReportWouldBlock,
    });
    ev.rule = Some(e.rule);
    ev.reason = e.reason;
    ev.detail = serde_json::json!({ "via": e.via });
    ev.process = e.process.map(|p| cordon_audit::ProcessInfo {
        pid: p.pid,
        exe: p.exe.clone(),
        cmdline: p.cmdline.clone(),
    });
    ev
}

impl EventSink for AuditSink {
    fn record(&self, e: NetEvent) {
        self.writer.record(to_audit(e));
    }
}
