//! The HTTP side of the gateway: the explicit proxy (absolute-form requests and CONNECT) and
//! plain HTTP captured by the transparent listener.
//!
//! Guarantees:
//! - Every request is decided on its own, including each request on a kept-alive client
//!   connection; an upstream connection is reused only for a request to the same destination,
//!   and even then the address it is connected to is decided again.
//! - Explicit proxy: the `Host` header must name the same host and port as the absolute-URI
//!   authority (after synthetic addresses are mapped to names), or the request gets 403.
//!   Captured HTTP: the `Host` header must name the host the connection's synthetic address maps
//!   to, or the request gets 403.
//! - Refusals are `403` with a short body and an `X-Cordon-Reason` header (`407` for a missing
//!   or bad proxy token in standalone mode); a refused CONNECT gets the same 403 before any
//!   tunnel exists.
//! - Framing is decided by `h1` (smuggling-shaped requests are refused before anything goes
//!   upstream), and both hops get heads re-serialised by the gateway: the proxy token
//!   (`Proxy-Authorization`) and every other hop-by-hop header are stripped.
//! - Heads are parsed in user space; bodies with a known length and chunked bodies are copied
//!   through a buffer of at most `BODY_CHUNK` bytes, a response read until upstream closes is
//!   spliced socket to socket (`crate::splice`); every upstream byte is metered either way.
//! - Each request produces one event, emitted when its response ends (bytes and duration
//!   included), or one refusal event. A request cut short (upstream failure, byte budget, client
//!   gone, gateway stopping) still produces its event, with the reason.
//! - A WebSocket handshake (`h1`: `GET`, `Upgrade: websocket`) to an allowed host is forwarded
//!   after the same decision as any request; if upstream answers `101`, the request's event is
//!   recorded at once and the connection becomes a byte stream between client and upstream,
//!   metered like every upstream byte (byte budgets, a detection rule's block), and recorded as
//!   one `connection` event when it closes. A WebSocket to a host whose traffic the gateway must
//!   inspect (interception, credentials, HTTP rules) is refused: its frames could not be.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use http::Uri;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::authority::{parse_authority, Authority};
use crate::budget::{ConnCheck, RateCheck};
use crate::core::{elapsed_ms, BudgetHit, Ctx};
use crate::event::{cut_path, EventKind, NetEvent, SessionInfo, Verdict, Via};
use crate::h1::{
    self, BodyLen, Chunk, ChunkedDecoder, ClientEnd, HeadError, RequestHead, RequestInfo,
};
use crate::io::{read_client, read_up, write_up, Counters, Meter, MeterTarget};
use crate::policy::{Dest, Verdicted};
use crate::route::{self, dest_for, Route, RouteError};
use crate::session::Session;
use crate::splice::{transfer, Pipe, TransferError, UpstreamEnd};
use crate::synthetic::is_synthetic;
use crate::tokens::AuthFailure;

/// Most bytes read from a socket into a buffer at once (heads, small bodies).
const READ_CHUNK: usize = 64 * 1024;
/// Most bytes of a Content-Length or chunked body read at once. Bodies are copied through
/// user space rather than spliced: on this project's 2-CPU loopback benchmark a 100 MiB
/// download ran 19-25 % faster this way than with `splice(2)` (docs/benchmarks.md).
const BODY_CHUNK: usize = 256 * 1024;

/// How a client connection's requests find their destination.
#[derive(Debug, Clone)]
pub(crate) enum ConnMode {
    /// Explicit proxy: from each request's absolute URI (or CONNECT authority).
    Proxy,
    /// Always one destination, decided before the first request: captured plain HTTP (`via`
    /// [`Via::Transparent`]) and plain HTTP inside a CONNECT tunnel (`via` [`Via::Connect`]).
    /// Each request's `Host` must still name it.
    Fixed { dest: Dest, port: u16, via: Via },
}

struct Binding {
    session: Arc<Session>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// An upstream HTTP/1.1 connection kept for the next request to the same destination.
struct UpstreamConn {
    dest: Dest,
    port: u16,
    addr: SocketAddr,
    /// The decision for this destination and address (`decide_dest` combined with
    /// `decide_resolved` for `addr`), taken when the connection was opened.
    verdict: Verdicted,
    stream: TcpStream,
    meter: Meter,
    /// Bytes read from upstream and not yet forwarded.
    buf: BytesMut,
    spans: h1::Spans,
}

/// The last request target decided on this connection, and what it was decided to be.
///
/// Parsing a target and deciding it are pure functions of the request's authority and `Host`
/// header: the policy never changes while the gateway runs, and a synthetic address keeps its
/// name once mapped (an unmapped one is never memoised, since DNS may map it later). So a
/// request whose authority and `Host` are byte-for-byte those of the previous one gets the same
/// answer without parsing and deciding again; anything else is parsed and decided afresh.
struct Memo {
    authority: Vec<u8>,
    host_header: Option<Vec<u8>>,
    dest: Dest,
    port: u16,
    host: String,
    pre: Verdicted,
}

impl Memo {
    fn matches(&self, authority: &[u8], host_header: Option<&[u8]>) -> bool {
        self.authority == authority && self.host_header.as_deref() == host_header
    }
}

/// One client connection: its socket, buffers, session binding and kept upstream.
pub(crate) struct ClientConn {
    mode: ConnMode,
    stream: TcpStream,
    buf: BytesMut,
    out: Vec<u8>,
    spans: h1::Spans,
    memo: Option<Memo>,
    /// The `Proxy-Authorization` value of the last request and the session it named: the next
    /// request with the same bytes names the same session unless its token was revoked since.
    auth: Option<(Vec<u8>, Arc<Session>)>,
    binding: Option<Binding>,
    /// Standalone mode: the connection's unauthenticated slot, held until a head names its
    /// session ([`crate::GatewayConfig::max_unauthenticated`]).
    unauthenticated: Option<OwnedSemaphorePermit>,
    upstream: Option<UpstreamConn>,
    /// The pipe of a response read until upstream closes (spliced).
    to_client: Option<Pipe>,
}

impl ClientConn {
    /// A connection whose first bytes (`initial`) were already read.
    pub fn new(mode: ConnMode, stream: TcpStream, initial: &[u8]) -> Self {
        let mut buf = BytesMut::with_capacity(initial.len().max(8 * 1024));
        buf.extend_from_slice(initial);
        ClientConn {
            mode,
            stream,
            buf,
            out: Vec::with_capacity(1024),
            spans: Vec::with_capacity(16),
            memo: None,
            auth: None,
            binding: None,
            unauthenticated: None,
            upstream: None,
            to_client: None,
        }
    }

    /// A connection that already holds its session and slot (transparent capture).
    pub fn bound(
        mode: ConnMode,
        stream: TcpStream,
        initial: &[u8],
        session: Arc<Session>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        let mut conn = Self::new(mode, stream, initial);
        conn.binding = Some(Binding {
            session,
            _permit: permit,
        });
        conn
    }

    fn via(&self) -> Via {
        match self.mode {
            ConnMode::Proxy => Via::Proxy,
            ConnMode::Fixed { via, .. } => via,
        }
    }

    /// Writes the gateway's own answer.
    async fn reply(&mut self, status: u16, reason: &str, close: bool) -> io::Result<()> {
        self.out.clear();
        h1::write_refusal(&mut self.out, status, reason, close);
        self.stream.write_all(&self.out).await
    }
}

/// What happens to the client connection after a request.
enum Next {
    KeepAlive,
    Close,
    /// CONNECT was allowed: the connection becomes a tunnel to `route`.
    Tunnel(Arc<Session>, Route),
}

/// Serves a connection accepted by the explicit proxy. In sandbox mode it takes its session's
/// connection slot before anything of it is read, so connections that never finish a head
/// (up to 256 KiB buffered each for the head timeout) cannot pile up in the supervisor past
/// `max_connections`; one over the limit is answered `403` at once and closed. (A standalone
/// gateway learns the session from the first head's token.)
pub(crate) async fn serve_proxy_client(ctx: Arc<Ctx>, stream: TcpStream) {
    let Some(session) = ctx.shared.attribution.fixed().cloned() else {
        // Standalone: a connection is nobody's until a head names its session, so the
        // connections that have not done so yet are bounded on their own.
        let slot = match ctx.shared.unauthenticated.as_ref() {
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    refuse_unauthenticated(&ctx, stream).await;
                    return;
                }
            },
            None => None,
        };
        let mut conn = ClientConn::new(ConnMode::Proxy, stream, &[]);
        conn.unauthenticated = slot;
        serve_client(ctx, conn).await;
        return;
    };
    let permit = match take_slot(&ctx, &session, Via::Proxy) {
        Ok(p) => p,
        Err(reason) => {
            // Let the client finish sending its head (read and dropped, nothing kept; at most
            // the first-bytes wait) so it reads the refusal rather than a reset.
            let mut stream = stream;
            let _ =
                tokio::time::timeout(ctx.shared.timeouts.first_bytes, discard_head(&mut stream))
                    .await;
            let mut conn = ClientConn::new(ConnMode::Proxy, stream, &[]);
            let _ = conn.reply(403, &reason, /*close*/ true).await;
            return;
        }
    };
    serve_client(
        ctx,
        ClientConn::bound(ConnMode::Proxy, stream, &[], session, permit),
    )
    .await;
}

/// Takes one of `session`'s connection slots (`None` in report mode past the limit). `Err`: the
/// refusal's reason, already recorded.
fn take_slot(
    ctx: &Ctx,
    session: &Arc<Session>,
    via: Via,
) -> Result<Option<OwnedSemaphorePermit>, String> {
    let hit = BudgetHit {
        via,
        host: None,
        ip: None,
        port: None,
    };
    match session.budget.acquire_connection() {
        ConnCheck::Ok(p) => Ok(p),
        ConnCheck::OverInReport(limit) => {
            ctx.budget_refused(session, &limit, &hit, /*report*/ true);
            Ok(None)
        }
        ConnCheck::Refused(limit) => {
            ctx.budget_refused(session, &limit, &hit, /*report*/ false);
            Err(limit.reason(None))
        }
    }
}

/// Standalone mode, too many connections without a session: answered `503` at once (nothing of
/// the connection is read) and closed. Every refusal is counted in a `Blocked` event, but at
/// most one event a second is recorded (a flood of connections must not become a flood of
/// audit rows): refusals within a second of the last event wait for the next one, which a
/// timer writes if no later refusal does.
async fn refuse_unauthenticated(ctx: &Arc<Ctx>, stream: TcpStream) {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(1);
    let due = {
        let mut tally = ctx
            .shared
            .unauthenticated_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        tally.1 += 1;
        match tally.0 {
            Some(last) if last.elapsed() < EVERY => {
                // The first refusal held back sets the timer that records the batch.
                (tally.1 == 1).then(|| last + EVERY).map(Err)
            }
            _ => {
                let n = tally.1;
                *tally = (Some(Instant::now()), 0);
                Some(Ok(n))
            }
        }
    };
    match due {
        Some(Ok(n)) => record_unauthenticated_refusals(ctx, n),
        Some(Err(at)) => {
            let ctx2 = ctx.clone();
            ctx.tasks.spawn(async move {
                // On shutdown the held-back count is recorded at once.
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = ctx2.cancel.cancelled() => {}
                }
                let n = {
                    let mut tally = ctx2
                        .shared
                        .unauthenticated_refused
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    let n = tally.1;
                    *tally = (Some(Instant::now()), 0);
                    n
                };
                if n > 0 {
                    record_unauthenticated_refusals(&ctx2, n);
                }
            });
        }
        None => {}
    }
    let mut conn = ClientConn::new(ConnMode::Proxy, stream, &[]);
    let _ = conn
        .reply(
            503,
            "too many connections without a proxy token; try again",
            /*close*/ true,
        )
        .await;
}

fn record_unauthenticated_refusals(ctx: &Ctx, n: u64) {
    let mut e = NetEvent::new(
        EventKind::Blocked,
        &SessionInfo::unauthenticated(),
        Via::Proxy,
        Verdict::Block,
    );
    e.rule = "unauthenticated-limit".into();
    e.reason = Some(format!(
        "{n} client connection(s) refused: too many had not sent a request with a cordon token yet"
    ));
    ctx.emit_unattributed(e);
}

/// Reads and drops bytes until the end of a request head (or EOF), keeping only the last three.
async fn discard_head(stream: &mut TcpStream) -> io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let mut tail: Vec<u8> = Vec::with_capacity(4096 + 3);
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(());
        }
        let keep = tail.len().saturating_sub(3);
        tail.drain(..keep);
    }
}

/// Serves a captured or tunnelled connection whose first bytes (`first`) are an HTTP request,
/// every request's `Host` checked against `dest:port`; its events are labelled `via`.
pub(crate) async fn serve_bound_http(
    ctx: Arc<Ctx>,
    session: Arc<Session>,
    (dest, port, via): (Dest, u16, Via),
    stream: TcpStream,
    first: &[u8],
    permit: Option<OwnedSemaphorePermit>,
) {
    let conn = ClientConn::bound(
        ConnMode::Fixed { dest, port, via },
        stream,
        first,
        session,
        permit,
    );
    Box::pin(serve_client(ctx, conn)).await;
}

/// Serves one client connection until it closes or the gateway stops.
pub(crate) async fn serve_client(ctx: Arc<Ctx>, mut conn: ClientConn) {
    // One cancellation waiter and one head timer for the connection's life, not per request.
    let cancelled = ctx.cancel.cancelled();
    tokio::pin!(cancelled);
    let head_timeout = ctx.shared.timeouts.header_read;
    let timer = tokio::time::sleep(head_timeout);
    tokio::pin!(timer);
    loop {
        let deadline = tokio::time::Instant::now() + head_timeout;
        let head = tokio::select! {
            r = read_request_head(&mut conn, timer.as_mut(), deadline) => r,
            _ = &mut cancelled => return,
        };
        let req = match head {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "bad request head");
                let _ = conn.reply(e.status(), &e.to_string(), true).await;
                return;
            }
        };
        // Cut short by the token: an in-flight request still records its event (on drop).
        let next = tokio::select! {
            n = handle_request(&ctx, &mut conn, &req) => n,
            _ = &mut cancelled => return,
        };
        conn.spans = req.head.recycle();
        match next {
            Next::KeepAlive => {}
            Next::Close => return,
            Next::Tunnel(session, route) => {
                // The connection slot stays held for the tunnel's life.
                let ClientConn {
                    stream,
                    buf,
                    binding,
                    ..
                } = conn;
                crate::tunnel::run_connect(&ctx, &session, stream, buf.to_vec(), route).await;
                drop(binding);
                return;
            }
        }
    }
}

/// Reads the next request head, giving up at `deadline`. `Ok(None)`: the client closed, went
/// quiet past the deadline, or broke the connection. `timer` is the connection's one timer: it
/// is re-armed only when it fires before the current deadline, so a request costs no timer
/// registration.
async fn read_request_head(
    conn: &mut ClientConn,
    mut timer: std::pin::Pin<&mut tokio::time::Sleep>,
    deadline: tokio::time::Instant,
) -> Result<Option<RequestHead>, HeadError> {
    loop {
        if let Some(req) = h1::parse_request(&mut conn.buf, &mut conn.spans)? {
            return Ok(Some(req));
        }
        let read = loop {
            tokio::select! {
                biased;
                r = read_client(&mut conn.stream, &mut conn.buf, READ_CHUNK) => break r,
                () = timer.as_mut() => {
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(None);
                    }
                    timer.as_mut().reset(deadline);
                }
            }
        };
        match read {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Records a refusal.
#[allow(clippy::too_many_arguments)]
fn record_refusal(
    ctx: &Ctx,
    session: &Session,
    via: Via,
    host: Option<String>,
    ip: Option<IpAddr>,
    port: Option<u16>,
    method: &str,
    path: Option<&str>,
    v: &Verdicted,
) -> String {
    let reason = v.reason.clone().unwrap_or_else(|| "blocked".into());
    let mut e = NetEvent::new(EventKind::Blocked, &session.info, via, Verdict::Block);
    e.host = host;
    e.ip = ip;
    e.port = port;
    e.method = Some(method.to_owned());
    e.path = path.map(cut_path);
    e.rule = v.rule.clone();
    e.reason = Some(reason.clone());
    ctx.emit(session, e);
    reason
}

fn verdicted(rule: &str, reason: String) -> Verdicted {
    Verdicted {
        verdict: Verdict::Block,
        rule: rule.to_owned(),
        reason: Some(reason),
    }
}

/// Whether the request may still carry body bytes the gateway will not read: after a refusal
/// the connection must then close, or those bytes would be read as the next request.
fn unread_body(info: Option<&RequestInfo>) -> bool {
    match info {
        Some(i) => !matches!(i.body, BodyLen::Empty | BodyLen::Length(0)),
        None => true,
    }
}

/// The session this request belongs to, with its connection slot held. `Err`: the refusal
/// (status, reason), already recorded.
fn bind_session(
    ctx: &Ctx,
    conn: &mut ClientConn,
    req: &RequestHead,
) -> Result<Arc<Session>, (u16, String)> {
    let header = req.head.first("proxy-authorization");
    let remembered = match (&conn.auth, header) {
        (Some((bytes, session)), Some(h)) if bytes.as_slice() == h && !session.revoked() => {
            Some(session.clone())
        }
        _ => None,
    };
    let looked_up = match remembered {
        Some(s) => Ok(s),
        None => ctx.shared.attribution.session_for(header).inspect(|s| {
            if let Some(h) = header {
                conn.auth = Some((h.to_vec(), s.clone()));
            }
        }),
    };
    let session = match looked_up {
        Ok(s) => s,
        Err(failure) => {
            let reason = match failure {
                AuthFailure::Missing => {
                    "proxy authentication required (Proxy-Authorization with a cordon token)"
                }
                AuthFailure::Invalid => "invalid proxy token",
            };
            let mut e = NetEvent::new(
                EventKind::Blocked,
                &SessionInfo::unauthenticated(),
                conn.via(),
                Verdict::Block,
            );
            e.method = Some(req.method().to_owned());
            e.host = Uri::try_from(req.target_bytes().as_ref())
                .ok()
                .and_then(|u| u.host().map(str::to_owned));
            e.rule = "proxy-auth".into();
            e.reason = Some(reason.into());
            ctx.emit_unattributed(e);
            return Err((407, reason.into()));
        }
    };
    if let Some(b) = conn.binding.as_ref() {
        if Arc::ptr_eq(&b.session, &session) {
            return Ok(session);
        }
    }
    let permit = take_slot(ctx, &session, conn.via()).map_err(|reason| (403, reason))?;
    conn.binding = Some(Binding {
        session: session.clone(),
        _permit: permit,
    });
    // From here the session's own max_connections counts the connection.
    conn.unauthenticated = None;
    Ok(session)
}

/// Answers with a refusal; the connection stays open unless a body may follow.
async fn refuse_with(
    conn: &mut ClientConn,
    status: u16,
    reason: &str,
    info: Option<&RequestInfo>,
) -> Next {
    let close = unread_body(info) || info.is_some_and(|i| !i.keep_alive);
    match conn.reply(status, reason, close).await {
        Ok(()) if !close => Next::KeepAlive,
        _ => Next::Close,
    }
}

async fn handle_request(ctx: &Arc<Ctx>, conn: &mut ClientConn, req: &RequestHead) -> Next {
    let session = match bind_session(ctx, conn, req) {
        Ok(s) => s,
        Err((status, reason)) => {
            let info = h1::request_info(req).ok();
            return refuse_with(conn, status, &reason, info.as_ref()).await;
        }
    };
    let via = conn.via();
    // Honey tokens: looked for in what the gateway can read before anything goes upstream.
    if ctx.canary_in(&session, req.head.raw(), "request head")
        || ctx.canary_in(&session, &conn.buf, "request body")
    {
        let v = verdicted(
            "detect.canary",
            "a canary credential was in the request".into(),
        );
        let reason = record_refusal(ctx, &session, via, None, None, None, req.method(), None, &v);
        return refuse_with(conn, 403, &reason, None).await;
    }
    let info = match h1::request_info(req) {
        Ok(i) => i,
        Err(e) => {
            let v = verdicted("bad-request", e.to_string());
            let reason =
                record_refusal(ctx, &session, via, None, None, None, req.method(), None, &v);
            return refuse_with(conn, e.status(), &reason, None).await;
        }
    };
    if req.method() == "CONNECT" {
        return match conn.mode {
            ConnMode::Proxy => {
                let raw = String::from_utf8_lossy(req.target()).into_owned();
                match crate::tunnel::prepare_connect(ctx, &session, &raw).await {
                    Ok(route) if !unread_body(Some(&info)) => Next::Tunnel(session, route),
                    Ok(_) => {
                        // A CONNECT with a body is nonsense; the tunnel would start mid-body.
                        refuse_with(conn, 400, "CONNECT with a body", Some(&info)).await
                    }
                    Err((status, reason)) => refuse_with(conn, status, &reason, Some(&info)).await,
                }
            }
            ConnMode::Fixed { .. } => {
                let v = verdicted(
                    "method",
                    "CONNECT is only accepted by the explicit proxy".into(),
                );
                let reason =
                    record_refusal(ctx, &session, via, None, None, None, req.method(), None, &v);
                refuse_with(conn, 403, &reason, Some(&info)).await
            }
        };
    }
    let uri = match Uri::from_maybe_shared(req.target_bytes()) {
        Ok(u) => u,
        Err(e) => {
            let v = verdicted("bad-request", format!("invalid request target: {e}"));
            let reason =
                record_refusal(ctx, &session, via, None, None, None, req.method(), None, &v);
            return refuse_with(conn, 400, &reason, Some(&info)).await;
        }
    };
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let memo = match decide_target(ctx, conn, req, &uri) {
        Ok(m) => m,
        Err((status, v, host, port)) => {
            let reason = record_refusal(
                ctx,
                &session,
                via,
                host,
                None,
                port,
                req.method(),
                Some(path),
                &v,
            );
            return refuse_with(conn, status, &reason, Some(&info)).await;
        }
    };
    if ctx.shared.intercept.is_some() || !ctx.policy().network().rules.is_empty() {
        if let Some((status, reason)) =
            crate::intercept::check_plain(ctx, &session, via, &memo.dest, req, path)
        {
            return refuse_with(conn, status, &reason, Some(&info)).await;
        }
        if info.websocket && inspected(ctx, &memo.dest) {
            let v = verdicted(
                "websocket",
                format!(
                    "WebSocket to {} is refused: the gateway inspects this host's traffic and could not inspect the frames",
                    memo.host
                ),
            );
            let reason = record_refusal(
                ctx,
                &session,
                via,
                Some(memo.host.clone()),
                None,
                Some(memo.port),
                req.method(),
                Some(path),
                &v,
            );
            return refuse_with(conn, 403, &reason, Some(&info)).await;
        }
    }
    let next = forward(ctx, conn, &memo, session, via, path, req, &info).await;
    // An unmapped synthetic address may be mapped to a name later: decide it afresh each time.
    if !matches!(memo.dest, Dest::Addr(ip) if is_synthetic(ip)) {
        conn.memo = Some(memo);
    }
    next
}

/// Whether the gateway inspects `dest`'s traffic beyond the destination: TLS interception
/// (credentials, `network.intercept`) or method/path rules. Such a host gets no WebSocket.
fn inspected(ctx: &Ctx, dest: &Dest) -> bool {
    let Some(name) = dest.name() else {
        return false;
    };
    ctx.shared
        .intercept
        .as_deref()
        .is_some_and(|rt| rt.intercepts(dest).is_some())
        || cordon_policy::decide::rules_for(ctx.policy().network(), name)
            .next()
            .is_some()
}

/// A refused target: status, verdict, and the host and port to record.
type TargetRefusal = (u16, Verdicted, Option<String>, Option<u16>);

/// Parses, checks and decides (before resolution) the request's target, or takes the answer
/// from the connection's memo when the target is byte-for-byte the previous one.
fn decide_target(
    ctx: &Ctx,
    conn: &mut ClientConn,
    req: &RequestHead,
    uri: &Uri,
) -> Result<Memo, TargetRefusal> {
    let authority = match conn.mode {
        ConnMode::Proxy => uri.authority().map_or(&b""[..], |a| a.as_str().as_bytes()),
        ConnMode::Fixed { .. } => &b""[..],
    };
    let proxy_form_ok = match conn.mode {
        ConnMode::Proxy => uri
            .scheme_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("http")),
        ConnMode::Fixed { .. } => true,
    };
    // More than one Host header is refused below, never answered from the memo.
    if let (Some(memo), Ok(host_header)) = (conn.memo.take(), host_header(req)) {
        if proxy_form_ok && memo.matches(authority, host_header) {
            return Ok(memo);
        }
    }
    let (dest, port) = match &conn.mode {
        ConnMode::Proxy => {
            proxy_target(ctx, req, uri).map_err(|(status, v, host)| (status, v, host, None))?
        }
        ConnMode::Fixed { dest, port, .. } => {
            transparent_host_check(ctx, req, dest, *port)
                .map_err(|v| (403, v, Some(dest.to_host_string()), Some(*port)))?;
            (dest.clone(), *port)
        }
    };
    let host = dest.to_host_string();
    let pre = ctx.policy().decide_dest(&dest, port);
    if pre.blocked() {
        return Err((403, pre, Some(host), Some(port)));
    }
    Ok(Memo {
        authority: authority.to_vec(),
        host_header: host_header(req).ok().flatten().map(<[u8]>::to_vec),
        dest,
        port,
        host,
        pre,
    })
}

fn host_header(req: &RequestHead) -> Result<Option<&[u8]>, Verdicted> {
    let mut it = req.head.values("host");
    let first = it.next();
    if it.next().is_some() {
        return Err(verdicted(
            "host-mismatch",
            "more than one Host header".into(),
        ));
    }
    Ok(first)
}

/// The destination of an absolute-form request, with the Host header checked against it.
fn proxy_target(
    ctx: &Ctx,
    req: &RequestHead,
    uri: &Uri,
) -> Result<(Dest, u16), (u16, Verdicted, Option<String>)> {
    let bad = |reason: String| (400, verdicted("bad-request", reason), None);
    let scheme = uri.scheme_str().ok_or_else(|| {
        bad("not a proxy request: use an absolute URI (http://host/path) or CONNECT".into())
    })?;
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(bad(format!(
            "scheme {scheme} is not proxied as absolute-form; use CONNECT for TLS"
        )));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| bad("absolute URI without a host".into()))?;
    let target = parse_authority(authority.as_str(), Some(80)).map_err(|e| {
        (
            403,
            verdicted(
                "bad-target",
                format!(
                    "invalid request target {:?}: {e}",
                    truncate(authority.as_str())
                ),
            ),
            Some(truncate(authority.as_str())),
        )
    })?;
    let dest = dest_for(&target.host, &ctx.shared.synthetic);
    let mismatch = |h: &str, dest: &Dest| {
        (
            403,
            verdicted(
                "host-mismatch",
                format!(
                    "Host header {:?} does not match the request target {target}",
                    truncate(h)
                ),
            ),
            Some(dest.to_host_string()),
        )
    };
    match host_header(req) {
        Err(v) => return Err((403, v, Some(dest.to_host_string()))),
        Ok(None) => {}
        Ok(Some(value)) => {
            let text = std::str::from_utf8(value).map_err(|_| mismatch("<non-UTF-8>", &dest))?;
            match parse_authority(text, Some(80)) {
                Ok(h)
                    if dest_for(&h.host, &ctx.shared.synthetic) == dest
                        && h.port == target.port => {}
                _ => return Err(mismatch(text, &dest)),
            }
        }
    }
    Ok((dest, target.port))
}

/// Captured HTTP: the Host header must name the connection's destination.
fn transparent_host_check(
    ctx: &Ctx,
    req: &RequestHead,
    dest: &Dest,
    port: u16,
) -> Result<(), Verdicted> {
    if let Dest::Addr(_) = dest {
        // The sandbox connected to an address it named itself; that address is what is decided.
        return Ok(());
    }
    let value = host_header(req)?.ok_or_else(|| {
        verdicted(
            "host-mismatch",
            format!("request to {} without a Host header", dest.to_host_string()),
        )
    })?;
    let text = std::str::from_utf8(value).unwrap_or("<non-UTF-8>");
    match parse_authority(text, Some(port)) {
        Ok(Authority { host, port: p })
            if dest_for(&host, &ctx.shared.synthetic) == *dest && p == port =>
        {
            Ok(())
        }
        _ => Err(verdicted(
            "host-mismatch",
            format!(
                "Host header {:?} does not match the connection's destination {}:{port}",
                truncate(text),
                dest.to_host_string()
            ),
        )),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(100).collect()
}

/// Whether a kept upstream connection is still usable: the peer has not closed it and sent
/// nothing unasked. Costs a system call only when the driver saw the socket become readable.
fn still_open(stream: &TcpStream) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        std::task::Poll::Pending => true,
        std::task::Poll::Ready(Err(_)) => false,
        std::task::Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}

/// The `Host` value for a request that carried none.
fn host_for(dest: &Dest, port: u16) -> String {
    match (dest, port) {
        (Dest::Addr(IpAddr::V6(v6)), 80) => format!("[{v6}]"),
        (Dest::Addr(IpAddr::V6(v6)), p) => format!("[{v6}]:{p}"),
        (d, 80) => d.to_host_string(),
        (d, p) => format!("{}:{p}", d.to_host_string()),
    }
}

/// Budgets, resolves, connects (or reuses) and forwards one request whose target `memo`
/// allowed.
#[allow(clippy::too_many_arguments)]
async fn forward(
    ctx: &Arc<Ctx>,
    conn: &mut ClientConn,
    memo: &Memo,
    session: Arc<Session>,
    via: Via,
    path: &str,
    req: &RequestHead,
    info: &RequestInfo,
) -> Next {
    let method = req.method();
    let (dest, port, host, pre) = (&memo.dest, memo.port, &memo.host, &memo.pre);
    let hit = || BudgetHit {
        via,
        host: Some(host.clone()),
        ip: None,
        port: Some(port),
    };
    match session.budget.check_request(host) {
        RateCheck::Ok => {}
        RateCheck::OverInReport(limit) => ctx.budget_refused(&session, &limit, &hit(), true),
        RateCheck::Refused(limit) => {
            ctx.budget_refused(&session, &limit, &hit(), false);
            return refuse_with(conn, 403, &limit.reason(Some(host)), Some(info)).await;
        }
    }
    if session.budget.enforcing() {
        if let Some(limit) = session.budget.bytes_exhausted() {
            ctx.budget_refused(&session, &limit, &hit(), false);
            return refuse_with(conn, 403, &limit.reason(Some(host)), Some(info)).await;
        }
    }

    let start = Instant::now();
    // Reuse the kept-alive upstream only for the same destination; its address was decided when
    // it was opened, for exactly this destination (the decision is pure and the policy fixed).
    let kept = conn.upstream.take().filter(|up| {
        up.dest == *dest && up.port == port && up.buf.is_empty() && still_open(&up.stream)
    });
    let up = match kept {
        Some(up) => up,
        None => {
            let route = match route::resolve_checked(
                ctx.policy(),
                &*ctx.shared.resolver,
                dest,
                port,
                pre.clone(),
            )
            .await
            {
                Ok(r) => r,
                Err(RouteError::Denied(v, ip)) => {
                    let reason = record_refusal(
                        ctx,
                        &session,
                        via,
                        Some(host.clone()),
                        ip,
                        Some(port),
                        method,
                        Some(path),
                        &v,
                    );
                    return refuse_with(conn, 403, &reason, Some(info)).await;
                }
                Err(RouteError::Resolve(e)) => {
                    let failed = Failed {
                        host,
                        ip: None,
                        port,
                        method,
                        path,
                        start,
                    };
                    return upstream_failure(ctx, conn, &session, via, failed, e.to_string(), info)
                        .await;
                }
            };
            match open_upstream(ctx, &session, &route, pre, via).await {
                Ok(up) => up,
                Err(e) => {
                    let failed = Failed {
                        host,
                        ip: route.addrs.first().copied(),
                        port,
                        method,
                        path,
                        start,
                    };
                    return upstream_failure(ctx, conn, &session, via, failed, e, info).await;
                }
            }
        }
    };
    if up.verdict.blocked() {
        // Never: a connection is opened only to an address that passed.
        let reason = record_refusal(
            ctx,
            &session,
            via,
            Some(host.clone()),
            Some(up.addr.ip()),
            Some(port),
            method,
            Some(path),
            &up.verdict,
        );
        return refuse_with(conn, 403, &reason, Some(info)).await;
    }

    let mut e = NetEvent::new(
        EventKind::HttpRequest,
        &session.info,
        via,
        up.verdict.verdict,
    );
    e.host = Some(host.clone());
    e.ip = Some(up.addr.ip());
    e.port = Some(port);
    e.method = Some(method.to_owned());
    e.path = Some(cut_path(path));
    e.rule = up.verdict.rule.clone();
    e.reason = up.verdict.reason.clone();
    let counters = up.meter.counters();
    let before = counters.snapshot();
    let mut inflight = InFlight {
        ctx: ctx.clone(),
        session,
        counters,
        before,
        start,
        event: Some(e),
        on_drop: "ended before the response was complete",
    };
    exchange(conn, up, req, info, path, dest, port, &mut inflight).await
}

/// Sends the request, relays the response, records the event, keeps what can be kept.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    conn: &mut ClientConn,
    mut up: UpstreamConn,
    req: &RequestHead,
    info: &RequestInfo,
    path: &str,
    dest: &Dest,
    port: u16,
    inflight: &mut InFlight,
) -> Next {
    let head_request = req.method() == "HEAD";
    let started = match send_request(conn, &mut up, req, info, path, dest, port).await {
        Ok(()) => read_response_head(conn, &mut up, req.minor, head_request, info.websocket).await,
        Err(f) => Err(f),
    };
    let (resp, rinfo) = match started {
        Ok(r) => r,
        Err(Failure::Client(e)) => {
            inflight.finish(Some(format!("request not sent to the end: {e}")));
            return Next::Close;
        }
        Err(Failure::Upstream(e)) if is_budget(&e) => {
            // The meter already recorded the budget event.
            inflight.discard();
            return refuse_with(conn, 403, "byte budget exhausted", Some(info)).await;
        }
        Err(Failure::Upstream(e)) => {
            let reason = format!("upstream request failed: {e}");
            inflight.fail(&reason);
            return refuse_with(conn, 502, &reason, Some(info)).await;
        }
    };
    if rinfo.switching {
        conn.out.clear();
        h1::write_response_head(
            &mut conn.out,
            &resp,
            &rinfo,
            BodyLen::Empty,
            ClientEnd::Upgrade,
        );
        up.spans = resp.head.recycle();
        websocket(conn, up, inflight).await;
        return Next::Close;
    }
    let client_body = match rinfo.body {
        // An HTTP/1.0 client cannot read chunks: it gets the payload, ended by the close.
        BodyLen::Chunked if req.minor == 0 => BodyLen::UntilClose,
        b => b,
    };
    let close = !info.keep_alive || client_body == BodyLen::UntilClose;
    let end = match (close, req.minor) {
        (true, _) => ClientEnd::Close,
        (false, 0) => ClientEnd::KeepAlive10,
        (false, _) => ClientEnd::KeepAlive,
    };
    conn.out.clear();
    h1::write_response_head(&mut conn.out, &resp, &rinfo, client_body, end);
    up.spans = resp.head.recycle();
    // A response already complete in the buffer is recorded before the client sees any of it,
    // so no agent ever observes a response whose event is not yet in the audit.
    let in_hand = match rinfo.body {
        BodyLen::Empty => true,
        BodyLen::Length(n) => up.buf.len() as u64 >= n,
        BodyLen::Chunked | BodyLen::UntilClose => false,
    };
    if in_hand {
        inflight.finish(None);
    }
    let relayed = relay_response(conn, &mut up, rinfo.body, client_body).await;
    match relayed {
        Ok(()) => {
            inflight.finish(None);
            if rinfo.reusable && up.buf.is_empty() {
                conn.upstream = Some(up);
            }
            if close {
                Next::Close
            } else {
                Next::KeepAlive
            }
        }
        Err(Failure::Upstream(e)) => {
            inflight.finish(Some(format!("response aborted: {e}")));
            Next::Close
        }
        Err(Failure::Client(e)) => {
            inflight.finish(Some(format!("response not read to the end: {e}")));
            Next::Close
        }
    }
}

/// After a `101` to a WebSocket handshake (its head in `conn.out`): records the request, sends
/// the `101` and whatever either side already sent, then moves bytes both ways until either
/// side closes (or the gateway stops), metered by the upstream connection's meter, and records
/// the stream as one `connection` event (on drop too, if the exchange is cut short).
async fn websocket(conn: &mut ClientConn, mut up: UpstreamConn, inflight: &mut InFlight) {
    let Some(mut event) = inflight.event.clone() else {
        return;
    };
    inflight.finish(None);
    event.kind = EventKind::Connection;
    event.ts = std::time::SystemTime::now();
    let counters = up.meter.counters();
    let mut stream = InFlight {
        ctx: inflight.ctx.clone(),
        session: inflight.session.clone(),
        before: counters.snapshot(),
        counters,
        start: Instant::now(),
        event: Some(event),
        on_drop: "websocket cut short: the gateway stopped",
    };
    let moved = async {
        // Upstream's first frames arrived with the 101 (already metered when read).
        conn.out.extend_from_slice(&up.buf);
        up.buf.clear();
        conn.stream.write_all(&conn.out).await?;
        if !conn.buf.is_empty() {
            write_up(&up.stream, &up.meter, &conn.buf).await?;
            conn.buf.clear();
        }
        crate::splice::tunnel(&conn.stream, &up.stream, &up.meter, &stream.ctx.cancel).await
    }
    .await;
    stream.finish(moved.err().map(|e| format!("websocket: {e}")));
}

/// Which side broke an exchange.
enum Failure {
    Client(io::Error),
    Upstream(io::Error),
}

impl Failure {
    fn of_transfer(e: TransferError, upstream_is_source: bool) -> Failure {
        if e.at_source == upstream_is_source {
            Failure::Upstream(e.error)
        } else {
            Failure::Client(e.error)
        }
    }
}

fn is_budget(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Other && e.to_string() == "byte budget exhausted"
}

fn unexpected_eof(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("{what} closed early"))
}

fn pipe(slot: &mut Option<Pipe>) -> io::Result<&mut Pipe> {
    if slot.as_ref().is_some_and(Pipe::is_dirty) {
        *slot = None;
    }
    match slot {
        Some(p) => Ok(p),
        None => Ok(slot.insert(Pipe::new()?)),
    }
}

/// Writes the request head (and whatever body bytes are already buffered) upstream, then the
/// rest of the body.
#[allow(clippy::too_many_arguments)]
async fn send_request(
    conn: &mut ClientConn,
    up: &mut UpstreamConn,
    req: &RequestHead,
    info: &RequestInfo,
    path: &str,
    dest: &Dest,
    port: u16,
) -> Result<(), Failure> {
    let fallback = match req.head.first("host") {
        Some(_) => None,
        None => Some(host_for(dest, port)),
    };
    // Origin-form only upstream; an asterisk-form target becomes `/`.
    let path = if path.starts_with('/') { path } else { "/" };
    conn.out.clear();
    h1::write_request_head(
        &mut conn.out,
        req,
        info,
        path.as_bytes(),
        fallback.as_deref(),
    );
    let has_body = unread_body(Some(info));
    if has_body && info.expect_continue && conn.buf.is_empty() {
        // The client waits for this before sending its body; upstream never saw the Expect.
        conn.stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(Failure::Client)?;
    }
    match info.body {
        BodyLen::Empty | BodyLen::UntilClose | BodyLen::Length(0) => {
            write_up(&up.stream, &up.meter, &conn.out)
                .await
                .map_err(Failure::Upstream)
        }
        BodyLen::Length(n) => {
            let k = usize::try_from(n).unwrap_or(usize::MAX).min(conn.buf.len());
            conn.out.extend_from_slice(&conn.buf[..k]);
            conn.buf.advance(k);
            write_up(&up.stream, &up.meter, &conn.out)
                .await
                .map_err(Failure::Upstream)?;
            let mut ends = Ends {
                client: &mut conn.stream,
                client_buf: &mut conn.buf,
                upstream: &mut up.stream,
                upstream_buf: &mut up.buf,
                meter: &up.meter,
                to_upstream: true,
            };
            ends.exact(n - k as u64).await
        }
        BodyLen::Chunked => {
            write_up(&up.stream, &up.meter, &conn.out)
                .await
                .map_err(Failure::Upstream)?;
            let mut ends = Ends {
                client: &mut conn.stream,
                client_buf: &mut conn.buf,
                upstream: &mut up.stream,
                upstream_buf: &mut up.buf,
                meter: &up.meter,
                to_upstream: true,
            };
            ends.chunked(/*rechunk*/ true).await
        }
    }
}

/// Reads upstream's response head, relaying interim (1xx) responses to the client.
async fn read_response_head(
    conn: &mut ClientConn,
    up: &mut UpstreamConn,
    client_minor: u8,
    head_request: bool,
    websocket: bool,
) -> Result<(h1::ResponseHead, h1::ResponseInfo), Failure> {
    loop {
        let parsed = h1::parse_response(&mut up.buf, &mut up.spans)
            .and_then(|r| {
                r.map(|r| h1::response_info(&r, head_request, websocket).map(|i| (r, i)))
                    .transpose()
            })
            .map_err(|e| Failure::Upstream(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        match parsed {
            Some((resp, info)) if info.interim => {
                if client_minor >= 1 {
                    conn.out.clear();
                    h1::write_response_head(
                        &mut conn.out,
                        &resp,
                        &info,
                        BodyLen::Empty,
                        ClientEnd::KeepAlive,
                    );
                    conn.stream
                        .write_all(&conn.out)
                        .await
                        .map_err(Failure::Client)?;
                }
                up.spans = resp.head.recycle();
            }
            Some(done) => return Ok(done),
            None => {
                let n = read_up(&mut up.stream, &up.meter, &mut up.buf, READ_CHUNK)
                    .await
                    .map_err(Failure::Upstream)?;
                if n == 0 {
                    return Err(Failure::Upstream(unexpected_eof(
                        "upstream connection before the response",
                    )));
                }
            }
        }
    }
}

/// Writes the response head in `conn.out` (with the body bytes already buffered, when the body
/// has a length) and relays the body.
async fn relay_response(
    conn: &mut ClientConn,
    up: &mut UpstreamConn,
    body: BodyLen,
    client_body: BodyLen,
) -> Result<(), Failure> {
    if let BodyLen::Length(n) = body {
        let k = usize::try_from(n).unwrap_or(usize::MAX).min(up.buf.len());
        conn.out.extend_from_slice(&up.buf[..k]);
        up.buf.advance(k);
        conn.stream
            .write_all(&conn.out)
            .await
            .map_err(Failure::Client)?;
        let mut ends = Ends {
            client: &mut conn.stream,
            client_buf: &mut conn.buf,
            upstream: &mut up.stream,
            upstream_buf: &mut up.buf,
            meter: &up.meter,
            to_upstream: false,
        };
        return ends.exact(n - k as u64).await;
    }
    conn.stream
        .write_all(&conn.out)
        .await
        .map_err(Failure::Client)?;
    let mut ends = Ends {
        client: &mut conn.stream,
        client_buf: &mut conn.buf,
        upstream: &mut up.stream,
        upstream_buf: &mut up.buf,
        meter: &up.meter,
        to_upstream: false,
    };
    match body {
        BodyLen::Empty | BodyLen::Length(_) => Ok(()),
        BodyLen::Chunked => ends.chunked(client_body == BodyLen::Chunked).await,
        BodyLen::UntilClose => ends.until_close(&mut conn.to_client).await,
    }
}

/// Both ends of a body relay, in one direction.
struct Ends<'a> {
    client: &'a mut TcpStream,
    client_buf: &'a mut BytesMut,
    upstream: &'a mut TcpStream,
    upstream_buf: &'a mut BytesMut,
    meter: &'a Meter,
    /// The body goes client → upstream (a request) rather than upstream → client.
    to_upstream: bool,
}

impl Ends<'_> {
    fn src_failure(&self, e: io::Error) -> Failure {
        if self.to_upstream {
            Failure::Client(e)
        } else {
            Failure::Upstream(e)
        }
    }

    fn dst_failure(&self, e: io::Error) -> Failure {
        if self.to_upstream {
            Failure::Upstream(e)
        } else {
            Failure::Client(e)
        }
    }

    fn src_buf_len(&self) -> usize {
        if self.to_upstream {
            self.client_buf.len()
        } else {
            self.upstream_buf.len()
        }
    }

    /// Reads at most `max` more bytes from the source into its buffer; EOF is an error.
    async fn read_src(&mut self, max: usize) -> Result<(), Failure> {
        let n = if self.to_upstream {
            read_client(self.client, self.client_buf, max).await
        } else {
            read_up(self.upstream, self.meter, self.upstream_buf, max).await
        }
        .map_err(|e| self.src_failure(e))?;
        if n == 0 {
            return Err(self.src_failure(unexpected_eof(if self.to_upstream {
                "client connection in the request body"
            } else {
                "upstream connection in the response body"
            })));
        }
        Ok(())
    }

    async fn write_dst(&mut self, data: &[u8]) -> Result<(), Failure> {
        let res = if self.to_upstream {
            write_up(self.upstream, self.meter, data).await
        } else {
            self.client.write_all(data).await
        };
        res.map_err(|e| self.dst_failure(e))
    }

    /// Moves the first `k` buffered source bytes to the destination.
    async fn flush_buffered(&mut self, k: usize) -> Result<(), Failure> {
        if k == 0 {
            return Ok(());
        }
        let chunk = if self.to_upstream {
            self.client_buf.split_to(k)
        } else {
            self.upstream_buf.split_to(k)
        };
        self.write_dst(&chunk).await
    }

    /// Moves exactly `n` bytes from the source socket to the destination socket.
    async fn exact(&mut self, n: u64) -> Result<(), Failure> {
        let mut left = n;
        let k = usize::try_from(left)
            .unwrap_or(usize::MAX)
            .min(self.src_buf_len());
        self.flush_buffered(k).await?;
        left -= k as u64;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(BODY_CHUNK);
            self.read_src(want).await?;
            let k = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(self.src_buf_len());
            self.flush_buffered(k).await?;
            left -= k as u64;
        }
        Ok(())
    }

    /// Relays a chunked body, re-chunked (`rechunk`) or as its bare payload.
    async fn chunked(&mut self, rechunk: bool) -> Result<(), Failure> {
        let mut dec = ChunkedDecoder::default();
        let mut out = Vec::new();
        loop {
            // Decode everything buffered.
            loop {
                let buf: &[u8] = if self.to_upstream {
                    &self.client_buf[..]
                } else {
                    &self.upstream_buf[..]
                };
                let (used, what) = dec
                    .step(buf)
                    .map_err(|e| self.src_failure(io::Error::new(io::ErrorKind::InvalidData, e)))?;
                match what {
                    Chunk::Data(k) => {
                        if rechunk {
                            h1::write_chunk_head(&mut out, k as u64);
                        }
                        out.extend_from_slice(&buf[..k]);
                        if rechunk {
                            out.extend_from_slice(b"\r\n");
                        }
                    }
                    Chunk::End => {
                        if rechunk {
                            out.extend_from_slice(h1::LAST_CHUNK);
                        }
                    }
                    Chunk::Framing => {}
                }
                if self.to_upstream {
                    self.client_buf.advance(used);
                } else {
                    self.upstream_buf.advance(used);
                }
                if dec.is_done() {
                    return self.write_dst(&out).await;
                }
                if used == 0 {
                    break;
                }
            }
            if !out.is_empty() {
                self.write_dst(&out).await?;
                out.clear();
            }
            let want = usize::try_from(dec.data_left())
                .unwrap_or(usize::MAX)
                .clamp(READ_CHUNK, BODY_CHUNK);
            self.read_src(want).await?;
        }
    }

    /// Relays a response body that ends when upstream closes.
    async fn until_close(&mut self, slot: &mut Option<Pipe>) -> Result<(), Failure> {
        let k = self.src_buf_len();
        self.flush_buffered(k).await?;
        let p = pipe(slot).map_err(|e| self.dst_failure(e))?;
        transfer(
            p,
            self.upstream,
            self.client,
            None,
            self.meter,
            UpstreamEnd::Source,
        )
        .await
        .map_err(|e| Failure::of_transfer(e, true))?;
        Ok(())
    }
}

/// Where an upstream failure happened, for its event.
struct Failed<'a> {
    host: &'a str,
    ip: Option<IpAddr>,
    port: u16,
    method: &'a str,
    path: &'a str,
    start: Instant,
}

/// A request the policy allowed but upstream could not serve: 502, recorded as allowed with the
/// failure as its reason.
async fn upstream_failure(
    ctx: &Ctx,
    conn: &mut ClientConn,
    session: &Session,
    via: Via,
    f: Failed<'_>,
    reason: String,
    info: &RequestInfo,
) -> Next {
    let mut e = NetEvent::new(EventKind::HttpRequest, &session.info, via, Verdict::Allow);
    e.host = Some(f.host.to_owned());
    e.ip = f.ip;
    e.port = Some(f.port);
    e.method = Some(f.method.to_owned());
    e.path = Some(cut_path(f.path));
    e.rule = "upstream-error".into();
    e.reason = Some(reason.clone());
    e.duration_ms = elapsed_ms(f.start);
    ctx.emit(session, e);
    refuse_with(conn, 502, &reason, Some(info)).await
}

async fn open_upstream(
    ctx: &Arc<Ctx>,
    session: &Arc<Session>,
    route: &Route,
    pre: &Verdicted,
    via: Via,
) -> Result<UpstreamConn, String> {
    let (stream, addr) = route::connect(route, ctx.shared.timeouts.connect)
        .await
        .map_err(|e| {
            format!(
                "cannot connect to {}:{}: {e}",
                route.dest.to_host_string(),
                route.port
            )
        })?;
    let meter = Meter::new(MeterTarget {
        ctx: ctx.clone(),
        session: session.clone(),
        hit: BudgetHit {
            via,
            host: Some(route.dest.to_host_string()),
            ip: Some(addr.ip()),
            port: Some(route.port),
        },
    });
    // The decision for the address actually connected to (one of the route's checked ones).
    let verdict = route::combine(
        pre,
        &ctx.policy()
            .decide_addr(route.dest.name(), addr.ip(), route.port),
    );
    Ok(UpstreamConn {
        dest: route.dest.clone(),
        port: route.port,
        addr,
        verdict,
        stream,
        meter,
        buf: BytesMut::with_capacity(16 * 1024),
        spans: Vec::with_capacity(16),
    })
}

/// The event of a request in flight: emitted exactly once, when the exchange ends or, if the
/// exchange is dropped (the gateway stopping), on drop.
struct InFlight {
    ctx: Arc<Ctx>,
    session: Arc<Session>,
    counters: Arc<Counters>,
    before: (u64, u64),
    start: Instant,
    event: Option<NetEvent>,
    /// The reason recorded when the exchange is dropped before it finished.
    on_drop: &'static str,
}

impl InFlight {
    fn finish(&mut self, error: Option<String>) {
        let Some(mut e) = self.event.take() else {
            return;
        };
        let (up, down) = self.counters.snapshot();
        e.bytes_up = up.saturating_sub(self.before.0);
        e.bytes_down = down.saturating_sub(self.before.1);
        e.duration_ms = elapsed_ms(self.start);
        if let Some(err) = error {
            e.reason = Some(match e.reason {
                Some(r) => format!("{r}; {err}"),
                None => err,
            });
        }
        self.ctx.emit(&self.session, e);
    }

    /// Records the request as an upstream failure (allowed, rule `upstream-error`).
    fn fail(&mut self, reason: &str) {
        if let Some(e) = self.event.as_mut() {
            e.verdict = Verdict::Allow;
            e.rule = "upstream-error".into();
            e.reason = None;
        }
        self.finish(Some(reason.to_owned()));
    }

    /// Drops the event (its refusal was recorded otherwise).
    fn discard(&mut self) {
        self.event = None;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.finish(Some(self.on_drop.to_owned()));
    }
}
