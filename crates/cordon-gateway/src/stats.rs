//! Running totals of what the gateway saw, reported when it stops.
//!
//! Guarantees: every emitted event is counted exactly once, from the same event the sink gets, so
//! the totals agree with the audit.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::event::{EventKind, NetEvent, Verdict};

/// Totals over the gateway's life (all sessions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GatewayStats {
    /// Events by verdict.
    pub allowed: u64,
    pub blocked: u64,
    pub report_would_block: u64,
    /// Events by kind.
    pub dns_queries: u64,
    pub connections: u64,
    pub http_requests: u64,
    pub budget_exhausted: u64,
    /// Bytes sent upstream / received from upstream, over connection and request events.
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[derive(Debug, Default)]
pub(crate) struct StatsCounters {
    allowed: AtomicU64,
    blocked: AtomicU64,
    report_would_block: AtomicU64,
    dns_queries: AtomicU64,
    connections: AtomicU64,
    http_requests: AtomicU64,
    budget_exhausted: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

impl StatsCounters {
    pub fn count(&self, e: &NetEvent) {
        // An alert accompanies a `Blocked` event for the same request, which is what counts.
        if e.kind == EventKind::Alert {
            return;
        }
        let by_verdict = match e.verdict {
            Verdict::Allow => &self.allowed,
            Verdict::Block => &self.blocked,
            Verdict::ReportWouldBlock => &self.report_would_block,
        };
        by_verdict.fetch_add(1, Ordering::Relaxed);
        let by_kind = match e.kind {
            EventKind::DnsQuery => &self.dns_queries,
            EventKind::Connection => &self.connections,
            EventKind::HttpRequest => &self.http_requests,
            EventKind::BudgetExhausted => &self.budget_exhausted,
            EventKind::Blocked | EventKind::Alert => return,
        };
        by_kind.fetch_add(1, Ordering::Relaxed);
        if matches!(e.kind, EventKind::Connection | EventKind::HttpRequest) {
            self.bytes_up.fetch_add(e.bytes_up, Ordering::Relaxed);
            self.bytes_down.fetch_add(e.bytes_down, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> GatewayStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GatewayStats {
            allowed: get(&self.allowed),
            blocked: get(&self.blocked),
            report_would_block: get(&self.report_would_block),
            dns_queries: get(&self.dns_queries),
            connections: get(&self.connections),
            http_requests: get(&self.http_requests),
            budget_exhausted: get(&self.budget_exhausted),
            bytes_up: get(&self.bytes_up),
            bytes_down: get(&self.bytes_down),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{SessionInfo, Via};

    #[test]
    fn events_are_counted_by_verdict_kind_and_bytes() {
        let s = StatsCounters::default();
        let who = SessionInfo::unauthenticated();
        let mut conn = NetEvent::new(EventKind::Connection, &who, Via::Connect, Verdict::Allow);
        conn.bytes_up = 10;
        conn.bytes_down = 20;
        s.count(&conn);
        s.count(&NetEvent::new(
            EventKind::Blocked,
            &who,
            Via::Proxy,
            Verdict::Block,
        ));
        s.count(&NetEvent::new(
            EventKind::DnsQuery,
            &who,
            Via::Dns,
            Verdict::ReportWouldBlock,
        ));
        assert_eq!(
            s.snapshot(),
            GatewayStats {
                allowed: 1,
                blocked: 1,
                report_would_block: 1,
                dns_queries: 1,
                connections: 1,
                http_requests: 0,
                budget_exhausted: 0,
                bytes_up: 10,
                bytes_down: 20,
            }
        );
    }
}
