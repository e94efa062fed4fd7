//! The gateway's shared state while it serves: sessions, the synthetic map, the resolver, the
//! event sink and the terminate channel, and the one function every path reports through.
//!
//! Guarantees:
//! - Every event goes through [`Ctx::emit`], which counts it in the stats, hands it to the sink,
//!   and feeds the session's detector; no path writes to the sink directly.
//! - A detection firing is carried out by [`detected`] exactly once per rule and session: `block`
//!   quarantines the session's egress, `terminate` also asks the supervisor to end it, and every
//!   firing goes to the detection channel for the supervisor's alerts.
//! - A [`TerminateRequest`] is sent at most once per session.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::{ByteDirection, Limit};
use crate::config::{OnExceedAction, Timeouts};
use crate::detect::{Detection, Evidence, Rule, Severity};
use crate::event::{EventKind, EventSink, NetEvent, Verdict, Via};
use crate::policy::PolicyView;
use crate::resolve::Resolve;
use crate::session::Session;
use crate::stats::StatsCounters;
use crate::synthetic::SyntheticMap;
use crate::tokens::Attribution;

/// Asks the supervisor to end a session (its sandbox is killed; the gateway keeps serving).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminateRequest {
    pub session: crate::event::SessionInfo,
    pub reason: String,
}

/// State that lives as long as the [`crate::Gateway`].
pub(crate) struct Shared {
    pub policy: PolicyView,
    pub timeouts: Timeouts,
    pub synthetic: SyntheticMap,
    pub resolver: Arc<dyn Resolve>,
    pub original_dst: Arc<dyn crate::origdst::OriginalDst>,
    pub attribution: Attribution,
    pub stats: StatsCounters,
    /// TLS interception, credentials and scanning, when the session has any.
    pub intercept: Option<Arc<crate::intercept::Runtime>>,
    pub terminate_tx: mpsc::UnboundedSender<TerminateRequest>,
    pub detections_tx: mpsc::UnboundedSender<Detection>,
    pub owners: Option<Arc<dyn crate::owner::SocketOwners>>,
    /// Standalone mode: one permit per client connection that has not named its session yet
    /// ([`crate::GatewayConfig::max_unauthenticated`]).
    pub unauthenticated: Option<Arc<tokio::sync::Semaphore>>,
    /// Connections refused past that bound: when the last refusal was recorded, and how many
    /// were refused since (recorded at most once a second, with the count, so a flood of
    /// connections cannot turn into a flood of audit rows).
    pub unauthenticated_refused: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

/// State for one `serve` call: the shared state plus the sink and the cancellation token.
pub(crate) struct Ctx {
    pub shared: Arc<Shared>,
    pub sink: Arc<dyn EventSink>,
    pub cancel: CancellationToken,
    pub tasks: TaskTracker,
}

/// Where a budget was hit, for the event.
#[derive(Debug, Clone)]
pub(crate) struct BudgetHit {
    pub via: Via,
    pub host: Option<String>,
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
}

impl Ctx {
    pub fn policy(&self) -> &PolicyView {
        &self.shared.policy
    }

    /// Records `e`: stats, sink, and the session's detector (which may fire a rule). A honey
    /// token in the event's host, path or reason is seen by the detector, then replaced by its
    /// name before the event is recorded.
    pub fn emit(&self, session: &Session, mut e: NetEvent) {
        self.shared.stats.count(&e);
        // An alert accompanies a `Blocked` event for the same request, which is what the
        // detection rules count.
        let fired = if e.kind == EventKind::Alert {
            None
        } else {
            session.detector.observe(&e)
        };
        session.detector.redact_event(&mut e);
        self.sink.record(e);
        if let Some(d) = fired {
            detected(&self.shared, session, d);
        }
    }

    /// Looks for honey tokens in bytes about to go upstream; `true` (the rule fired and was
    /// carried out) means they must not be sent.
    pub fn canary_in(&self, session: &Session, bytes: &[u8], where_: &str) -> bool {
        match session.detector.scan(&session.info, bytes, where_) {
            Some(d) => {
                detected(&self.shared, session, d);
                true
            }
            None => false,
        }
    }

    /// Fires the canary rule for a token another scanner found (the DLP's streaming body scan
    /// reports it by pattern name, `canary:<name>`).
    pub fn canary_seen(&self, session: &Session, pattern_name: &str, where_: &str) {
        if let Some(d) = session
            .detector
            .canary_seen(&session.info, pattern_name, where_)
        {
            detected(&self.shared, session, d);
        }
    }

    /// Records an event that belongs to no session (a request without a valid proxy token).
    pub fn emit_unattributed(&self, e: NetEvent) {
        self.shared.stats.count(&e);
        self.sink.record(e);
    }

    /// Records a refused (or, in report mode, would-be-refused) attempt because of `limit`, and
    /// asks for termination if the policy says so.
    pub fn budget_refused(&self, session: &Session, limit: &Limit, hit: &BudgetHit, report: bool) {
        let verdict = if report {
            Verdict::ReportWouldBlock
        } else {
            Verdict::Block
        };
        let mut e = NetEvent::new(EventKind::BudgetExhausted, &session.info, hit.via, verdict);
        e.host = hit.host.clone();
        e.ip = hit.ip;
        e.port = hit.port;
        e.rule = limit.rule().to_owned();
        e.reason = Some(limit.reason(hit.host.as_deref()));
        self.emit(session, e);
        if !report
            && self.shared.policy.on_exceed() == OnExceedAction::Terminate
            && !matches!(limit, Limit::Quarantined)
        {
            let d = Detection::new(
                Rule::Budget,
                limit.rule(),
                Severity::Medium,
                cordon_policy::Response::Terminate,
                /*alert*/ true,
                &session.info,
                format!("budget exceeded: {}", limit.rule()),
                [
                    ("limit", Evidence::from(limit.rule())),
                    ("reason", limit.reason(hit.host.as_deref()).into()),
                ],
            );
            detected(&self.shared, session, d);
        }
    }

    /// Called by a metered stream the moment a byte budget runs out mid-transfer.
    pub fn budget_exhausted_mid_stream(
        &self,
        session: &Session,
        hit: &BudgetHit,
        direction: ByteDirection,
        report: bool,
    ) {
        let limits = session.budget.limits();
        let limit = match direction {
            _ if session.budget.quarantined() => Limit::Quarantined,
            ByteDirection::Out => Limit::BytesOut(limits.max_bytes_out.unwrap_or(0)),
            ByteDirection::In => Limit::BytesIn(limits.max_bytes_in.unwrap_or(0)),
        };
        self.budget_refused(session, &limit, hit, report);
    }
}

/// Sends a terminate request for `session` unless one was already sent.
pub(crate) fn terminate(shared: &Shared, session: &Session, reason: String) {
    if session.claim_terminate() {
        tracing::warn!(session = %session.info.id, %reason, "asking the supervisor to terminate the session");
        // The receiver may be gone (nobody listens, e.g. standalone benchmarks); the request is
        // also visible in the audit as the event that caused it.
        let _ = shared.terminate_tx.send(TerminateRequest {
            session: session.info.clone(),
            reason,
        });
    }
}

/// Carries out a rule firing, once per rule and session: `block` stops the session's egress
/// (new requests and connections are refused, open ones stop moving bytes), `terminate` does
/// that and asks the supervisor to kill the sandbox; then the firing goes to the supervisor.
pub(crate) fn detected(shared: &Shared, session: &Session, d: Detection) {
    if !session.detector.claim(d.rule) {
        return;
    }
    tracing::warn!(session = %session.info.id, rule = d.rule.as_str(), summary = %d.summary, "detection rule fired");
    match d.response {
        cordon_policy::Response::Log => {}
        cordon_policy::Response::Block => session.budget.quarantine(),
        cordon_policy::Response::Terminate => {
            session.budget.quarantine();
            terminate(shared, session, d.summary.clone());
        }
    }
    let _ = shared.detections_tx.send(d);
}

/// Milliseconds since `start`, saturating.
pub(crate) fn elapsed_ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Builders for unit tests that need a live context.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use cordon_policy::host::HostName;

    use super::{BudgetHit, Ctx};
    use crate::budget::BudgetLimits;
    use crate::event::{MemorySink, SessionInfo, Via};
    use crate::io::{Meter, MeterTarget};
    use crate::resolve::{Resolve, ResolveError, ResolveFuture};
    use crate::session::Session;
    use crate::{Gateway, GatewayConfig, Upstream};

    struct NoResolver;

    impl Resolve for NoResolver {
        fn resolve<'a>(&'a self, name: &'a HostName) -> ResolveFuture<'a> {
            let name = name.to_string();
            Box::pin(async move { Err(ResolveError::NoSuchName { name }) })
        }
    }

    /// Both ends of a TCP connection on loopback.
    pub async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}"));
        let a = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        let (b, _) = l.accept().await.unwrap_or_else(|e| panic!("accept: {e}"));
        (a, b)
    }

    /// A context over a default-deny gateway whose events go to a [`MemorySink`].
    pub fn ctx() -> (Arc<Ctx>, Arc<MemorySink>) {
        let mut config = GatewayConfig::new(
            Default::default(),
            Default::default(),
            SessionInfo::unauthenticated(),
        );
        config.upstream = Upstream::Custom(Arc::new(NoResolver));
        let gateway = Gateway::new(config).unwrap_or_else(|e| panic!("test gateway: {e}"));
        let sink = Arc::new(MemorySink::new());
        let ctx = Arc::new(Ctx {
            shared: gateway.shared.clone(),
            sink: sink.clone(),
            cancel: Default::default(),
            tasks: Default::default(),
        });
        (ctx, sink)
    }

    /// A meter over a fresh session with these byte budgets (`None`: unlimited), enforcing.
    pub fn meter_with_budget(out: Option<u64>, inbound: Option<u64>) -> (Meter, Arc<MemorySink>) {
        let (ctx, sink) = ctx();
        let limits = BudgetLimits {
            max_bytes_out: out,
            max_bytes_in: inbound,
            ..BudgetLimits::default()
        };
        let detector = crate::detect::Detector::new(Default::default(), &[]);
        let session = Arc::new(Session::new(
            SessionInfo::unauthenticated(),
            limits,
            true,
            detector,
        ));
        let meter = Meter::new(MeterTarget {
            ctx,
            session,
            hit: BudgetHit {
                via: Via::Connect,
                host: None,
                ip: None,
                port: None,
            },
        });
        (meter, sink)
    }
}
