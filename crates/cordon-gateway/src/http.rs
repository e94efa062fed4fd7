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
//! - The proxy token (`Proxy-Authorization`) and every other hop-by-hop header are stripped
//!   before a request goes upstream.
//! - Each request produces one event, emitted when its response ends (bytes and duration
//!   included), or one refusal event.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::authority::{parse_authority, Authority};
use crate::budget::{ConnCheck, RateCheck};
use crate::core::{elapsed_ms, BudgetHit, Ctx};
use crate::event::{cut_path, EventKind, NetEvent, SessionInfo, Verdict, Via};
use crate::io::{Counters, MeterTarget, Metered};
use crate::policy::{Dest, Verdicted};
use crate::route::{self, dest_for, Route, RouteError};
use crate::session::Session;
use crate::tokens::AuthFailure;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type Body = BoxBody<Bytes, BoxError>;

/// How a client connection's requests find their destination.
#[derive(Debug, Clone)]
pub(crate) enum ConnMode {
    /// Explicit proxy: from each request's absolute URI (or CONNECT authority).
    Proxy,
    /// Captured plain HTTP: always the connection's original destination.
    Transparent { dest: Dest, port: u16 },
}

struct Binding {
    session: Arc<Session>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// An upstream HTTP/1.1 connection kept for the next request to the same destination.
struct Upstream {
    dest: Dest,
    port: u16,
    addr: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<Body>,
    counters: Arc<Counters>,
}

/// State of one client connection.
pub(crate) struct ClientConn {
    mode: ConnMode,
    binding: Mutex<Option<Binding>>,
    upstream: tokio::sync::Mutex<Option<Upstream>>,
}

impl ClientConn {
    pub fn new(mode: ConnMode) -> Self {
        ClientConn {
            mode,
            binding: Mutex::new(None),
            upstream: tokio::sync::Mutex::new(None),
        }
    }

    /// A connection that already holds its session and slot (transparent capture).
    pub fn bound(
        mode: ConnMode,
        session: Arc<Session>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        let conn = Self::new(mode);
        *lock(&conn.binding) = Some(Binding {
            session,
            _permit: permit,
        });
        conn
    }

    fn via(&self) -> Via {
        match self.mode {
            ConnMode::Proxy => Via::Proxy,
            ConnMode::Transparent { .. } => Via::Transparent,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

pub(crate) fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn header_safe(reason: &str) -> HeaderValue {
    let cleaned: String = reason
        .chars()
        .take(300)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&cleaned).unwrap_or_else(|_| HeaderValue::from_static("blocked"))
}

/// The response the agent sees when something is refused.
pub(crate) fn refusal(status: StatusCode, reason: &str) -> Response<Body> {
    let mut resp = Response::new(full(format!("cordon: {reason}\n")));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert("x-cordon-reason", header_safe(reason));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        h.insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"cordon\""),
        );
    }
    resp
}

/// Serves one client connection with hyper until it closes or the gateway stops.
pub(crate) async fn serve_client<I>(ctx: Arc<Ctx>, io: I, conn: Arc<ClientConn>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let ctx = ctx.clone();
        service_fn(move |req: Request<Incoming>| {
            let ctx = ctx.clone();
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(handle_request(ctx, conn, req).await) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.shared.timeouts.header_read)
        .keep_alive(true)
        .max_buf_size(256 * 1024);
    let served = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::select! {
        res = served => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        }
        _ = ctx.cancel.cancelled() => {}
    }
}

/// Emits a refusal event and builds the matching response.
#[allow(clippy::too_many_arguments)]
fn refuse(
    ctx: &Ctx,
    session: &Session,
    via: Via,
    status: StatusCode,
    host: Option<String>,
    ip: Option<IpAddr>,
    port: Option<u16>,
    method: &Method,
    path: Option<&str>,
    v: &Verdicted,
) -> Response<Body> {
    let reason = v.reason.clone().unwrap_or_else(|| "blocked".into());
    let mut e = NetEvent::new(EventKind::Blocked, &session.info, via, Verdict::Block);
    e.host = host;
    e.ip = ip;
    e.port = port;
    e.method = Some(method.to_string());
    e.path = path.map(cut_path);
    e.rule = v.rule.clone();
    e.reason = Some(reason.clone());
    ctx.emit(session, e);
    refusal(status, &reason)
}

fn verdicted(rule: &str, reason: String) -> Verdicted {
    Verdicted {
        verdict: Verdict::Block,
        rule: rule.to_owned(),
        reason: Some(reason),
    }
}

/// The session this request belongs to, with its connection slot held.
fn bind_session(
    ctx: &Ctx,
    conn: &ClientConn,
    req: &Request<Incoming>,
) -> Result<Arc<Session>, Box<Response<Body>>> {
    let session = match ctx.shared.attribution.session_for(
        req.headers()
            .get(header::PROXY_AUTHORIZATION)
            .map(|v| v.as_bytes()),
    ) {
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
            e.method = Some(req.method().to_string());
            e.host = req.uri().host().map(str::to_owned);
            e.rule = "proxy-auth".into();
            e.reason = Some(reason.into());
            ctx.emit_unattributed(e);
            return Err(Box::new(refusal(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                reason,
            )));
        }
    };
    let mut binding = lock(&conn.binding);
    if let Some(b) = binding.as_ref() {
        if Arc::ptr_eq(&b.session, &session) {
            return Ok(session);
        }
    }
    let hit = BudgetHit {
        via: conn.via(),
        host: None,
        ip: None,
        port: None,
    };
    let permit = match session.budget.acquire_connection() {
        ConnCheck::Ok(p) => p,
        ConnCheck::OverInReport(limit) => {
            ctx.budget_refused(&session, &limit, &hit, /*report*/ true);
            None
        }
        ConnCheck::Refused(limit) => {
            ctx.budget_refused(&session, &limit, &hit, /*report*/ false);
            return Err(Box::new(refusal(
                StatusCode::FORBIDDEN,
                &limit.reason(None),
            )));
        }
    };
    *binding = Some(Binding {
        session: session.clone(),
        _permit: permit,
    });
    Ok(session)
}

async fn handle_request(
    ctx: Arc<Ctx>,
    conn: Arc<ClientConn>,
    req: Request<Incoming>,
) -> Response<Body> {
    let session = match bind_session(&ctx, &conn, &req) {
        Ok(s) => s,
        Err(resp) => return *resp,
    };
    if req.method() == Method::CONNECT {
        return match conn.mode {
            ConnMode::Proxy => crate::tunnel::handle_connect(ctx, session, req).await,
            ConnMode::Transparent { .. } => {
                let v = verdicted(
                    "method",
                    "CONNECT is only accepted by the explicit proxy".into(),
                );
                refuse(
                    &ctx,
                    &session,
                    Via::Transparent,
                    StatusCode::FORBIDDEN,
                    None,
                    None,
                    None,
                    req.method(),
                    None,
                    &v,
                )
            }
        };
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
    let (dest, port, via) = match &conn.mode {
        ConnMode::Proxy => match proxy_target(&ctx, &req) {
            Ok((d, p)) => (d, p, Via::Proxy),
            Err((status, v, host)) => {
                return refuse(
                    &ctx,
                    &session,
                    Via::Proxy,
                    status,
                    host,
                    None,
                    None,
                    req.method(),
                    Some(&path),
                    &v,
                )
            }
        },
        ConnMode::Transparent { dest, port } => {
            if let Err(v) = transparent_host_check(&ctx, &req, dest, *port) {
                return refuse(
                    &ctx,
                    &session,
                    Via::Transparent,
                    StatusCode::FORBIDDEN,
                    Some(dest.to_host_string()),
                    None,
                    Some(*port),
                    req.method(),
                    Some(&path),
                    &v,
                );
            }
            (dest.clone(), *port, Via::Transparent)
        }
    };
    forward(ctx, conn, session, dest, port, via, path, req).await
}

fn host_headers(req: &Request<Incoming>) -> Result<Option<&HeaderValue>, Verdicted> {
    let mut it = req.headers().get_all(header::HOST).iter();
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
    req: &Request<Incoming>,
) -> Result<(Dest, u16), (StatusCode, Verdicted, Option<String>)> {
    let uri = req.uri();
    let bad = |reason: String| {
        (
            StatusCode::BAD_REQUEST,
            verdicted("bad-request", reason),
            None,
        )
    };
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
            StatusCode::FORBIDDEN,
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
    let shown = Some(dest.to_host_string());
    let mismatch = |h: &str| {
        (
            StatusCode::FORBIDDEN,
            verdicted(
                "host-mismatch",
                format!(
                    "Host header {:?} does not match the request target {target}",
                    truncate(h)
                ),
            ),
            shown.clone(),
        )
    };
    match host_headers(req) {
        Err(v) => return Err((StatusCode::FORBIDDEN, v, shown.clone())),
        Ok(None) => {}
        Ok(Some(value)) => {
            let text = value.to_str().map_err(|_| mismatch("<non-ASCII>"))?;
            match parse_authority(text, Some(80)) {
                Ok(h)
                    if dest_for(&h.host, &ctx.shared.synthetic) == dest
                        && h.port == target.port => {}
                _ => return Err(mismatch(text)),
            }
        }
    }
    Ok((dest, target.port))
}

/// Captured HTTP: the Host header must name the connection's destination.
fn transparent_host_check(
    ctx: &Ctx,
    req: &Request<Incoming>,
    dest: &Dest,
    port: u16,
) -> Result<(), Verdicted> {
    if let Dest::Addr(_) = dest {
        // The sandbox connected to an address it named itself; that address is what is decided.
        return Ok(());
    }
    let value = host_headers(req)?.ok_or_else(|| {
        verdicted(
            "host-mismatch",
            format!("request to {} without a Host header", dest.to_host_string()),
        )
    })?;
    let text = value.to_str().unwrap_or("<non-ASCII>");
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

/// Decides, budgets, resolves, connects (or reuses) and forwards one request.
#[allow(clippy::too_many_arguments)]
async fn forward(
    ctx: Arc<Ctx>,
    conn: Arc<ClientConn>,
    session: Arc<Session>,
    dest: Dest,
    port: u16,
    via: Via,
    path: String,
    req: Request<Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    let host = dest.to_host_string();
    let pre = ctx.policy().decide_dest(&dest, port);
    if pre.blocked() {
        return refuse(
            &ctx,
            &session,
            via,
            StatusCode::FORBIDDEN,
            Some(host),
            None,
            Some(port),
            &method,
            Some(&path),
            &pre,
        );
    }
    let hit = BudgetHit {
        via,
        host: Some(host.clone()),
        ip: None,
        port: Some(port),
    };
    match session.budget.check_request(&host) {
        RateCheck::Ok => {}
        RateCheck::OverInReport(limit) => ctx.budget_refused(&session, &limit, &hit, true),
        RateCheck::Refused(limit) => {
            ctx.budget_refused(&session, &limit, &hit, false);
            return refusal(StatusCode::FORBIDDEN, &limit.reason(Some(&host)));
        }
    }
    if session.budget.enforcing() {
        if let Some(limit) = session.budget.bytes_exhausted() {
            ctx.budget_refused(&session, &limit, &hit, false);
            return refusal(StatusCode::FORBIDDEN, &limit.reason(Some(&host)));
        }
    }

    let start = Instant::now();
    let mut slot = conn.upstream.lock().await;
    // Reuse the kept-alive upstream only for the same destination, and decide its address again.
    let mut reuse = None;
    if let Some(mut up) = slot.take() {
        if up.dest == dest
            && up.port == port
            && !up.sender.is_closed()
            && up.sender.ready().await.is_ok()
        {
            let v = ctx.policy().decide_addr(dest.name(), up.addr.ip(), port);
            if v.blocked() {
                return refuse(
                    &ctx,
                    &session,
                    via,
                    StatusCode::FORBIDDEN,
                    Some(host),
                    Some(up.addr.ip()),
                    Some(port),
                    &method,
                    Some(&path),
                    &v,
                );
            }
            reuse = Some((up, route::combine(&pre, &v)));
        }
    }
    let (mut up, verdict, rule, reason) = match reuse {
        Some((up, v)) => (up, v.verdict, v.rule, v.reason),
        None => {
            let route =
                match route::resolve_checked(ctx.policy(), &*ctx.shared.resolver, &dest, port, pre)
                    .await
                {
                    Ok(r) => r,
                    Err(RouteError::Denied(v, ip)) => {
                        return refuse(
                            &ctx,
                            &session,
                            via,
                            StatusCode::FORBIDDEN,
                            Some(host),
                            ip,
                            Some(port),
                            &method,
                            Some(&path),
                            &v,
                        )
                    }
                    Err(RouteError::Resolve(e)) => {
                        return upstream_failure(
                            &ctx,
                            &session,
                            via,
                            &host,
                            None,
                            port,
                            &method,
                            &path,
                            e.to_string(),
                            start,
                        )
                    }
                };
            match open_upstream(&ctx, &session, &route, via).await {
                Ok(up) => (up, route.verdict, route.rule, route.reason),
                Err(e) => {
                    return upstream_failure(
                        &ctx,
                        &session,
                        via,
                        &host,
                        route.addrs.first().copied(),
                        port,
                        &method,
                        &path,
                        e,
                        start,
                    )
                }
            }
        }
    };

    let outgoing = match upstream_request(req, &dest, port) {
        Ok(r) => r,
        Err(e) => {
            let v = verdicted("bad-request", e);
            return refuse(
                &ctx,
                &session,
                via,
                StatusCode::BAD_REQUEST,
                Some(host),
                None,
                Some(port),
                &method,
                Some(&path),
                &v,
            );
        }
    };
    let before = up.counters.snapshot();
    let ip = up.addr.ip();
    let sent = up.sender.send_request(outgoing).await;
    let counters = up.counters.clone();
    match sent {
        Ok(resp) => {
            *slot = Some(up);
            drop(slot);
            let mut e = NetEvent::new(EventKind::HttpRequest, &session.info, via, verdict);
            e.host = Some(host);
            e.ip = Some(ip);
            e.port = Some(port);
            e.method = Some(method.to_string());
            e.path = Some(cut_path(&path));
            e.rule = rule;
            e.reason = reason;
            let pending = PendingEvent {
                ctx: ctx.clone(),
                session,
                event: e,
                counters,
                before,
                start,
            };
            downstream_response(resp, pending)
        }
        Err(err) => {
            drop(slot);
            if session.budget.enforcing() && session.budget.bytes_exhausted().is_some() {
                // The metered stream already recorded the budget event.
                return refusal(StatusCode::FORBIDDEN, "byte budget exhausted");
            }
            upstream_failure(
                &ctx,
                &session,
                via,
                &host,
                Some(ip),
                port,
                &method,
                &path,
                format!("upstream request failed: {err}"),
                start,
            )
        }
    }
}

/// A request the policy allowed but upstream could not serve: 502, recorded as allowed with the
/// failure as its reason.
#[allow(clippy::too_many_arguments)]
fn upstream_failure(
    ctx: &Ctx,
    session: &Session,
    via: Via,
    host: &str,
    ip: Option<IpAddr>,
    port: u16,
    method: &Method,
    path: &str,
    reason: String,
    start: Instant,
) -> Response<Body> {
    let mut e = NetEvent::new(EventKind::HttpRequest, &session.info, via, Verdict::Allow);
    e.host = Some(host.to_owned());
    e.ip = ip;
    e.port = Some(port);
    e.method = Some(method.to_string());
    e.path = Some(cut_path(path));
    e.rule = "upstream-error".into();
    e.reason = Some(reason.clone());
    e.duration_ms = elapsed_ms(start);
    ctx.emit(session, e);
    refusal(StatusCode::BAD_GATEWAY, &reason)
}

async fn open_upstream(
    ctx: &Arc<Ctx>,
    session: &Arc<Session>,
    route: &Route,
    via: Via,
) -> Result<Upstream, String> {
    let (stream, addr): (TcpStream, SocketAddr) =
        route::connect(route, ctx.shared.timeouts.connect)
            .await
            .map_err(|e| {
                format!(
                    "cannot connect to {}:{}: {e}",
                    route.dest.to_host_string(),
                    route.port
                )
            })?;
    let target = Arc::new(MeterTarget {
        ctx: ctx.clone(),
        session: session.clone(),
        hit: BudgetHit {
            via,
            host: Some(route.dest.to_host_string()),
            ip: Some(addr.ip()),
            port: Some(route.port),
        },
    });
    let metered = Metered::new(stream, target);
    let counters = metered.counters();
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(256 * 1024)
        .handshake(TokioIo::new(metered))
        .await
        .map_err(|e| format!("HTTP handshake with {addr} failed: {e}"))?;
    let cancel = ctx.cancel.clone();
    ctx.tasks.spawn(async move {
        tokio::select! {
            res = connection => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
            }
            _ = cancel.cancelled() => {}
        }
    });
    Ok(Upstream {
        dest: route.dest.clone(),
        port: route.port,
        addr,
        sender,
        counters,
    })
}

/// Headers that belong to one hop and never cross the gateway.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn upstream_request(
    req: Request<Incoming>,
    dest: &Dest,
    port: u16,
) -> Result<Request<Body>, String> {
    let (mut parts, body) = req.into_parts();
    let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let pq = if pq.starts_with('/') { pq } else { "/" };
    parts.uri = pq
        .parse::<Uri>()
        .map_err(|e| format!("invalid request path: {e}"))?;
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST) {
        let host = match (dest, port) {
            (Dest::Addr(IpAddr::V6(v6)), 80) => format!("[{v6}]"),
            (Dest::Addr(IpAddr::V6(v6)), p) => format!("[{v6}]:{p}"),
            (d, 80) => d.to_host_string(),
            (d, p) => format!("{}:{p}", d.to_host_string()),
        };
        let value = HeaderValue::from_str(&host).map_err(|e| format!("invalid host: {e}"))?;
        parts.headers.insert(header::HOST, value);
    }
    Ok(Request::from_parts(
        parts,
        body.map_err(BoxError::from).boxed(),
    ))
}

fn downstream_response(resp: Response<Incoming>, pending: PendingEvent) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = EventBody {
        inner: body.map_err(BoxError::from).boxed(),
        pending: Some(pending),
    };
    Response::from_parts(parts, BodyExt::boxed(body))
}

/// The event of a request in flight; emitted once, when its response body ends or is dropped.
struct PendingEvent {
    ctx: Arc<Ctx>,
    session: Arc<Session>,
    event: NetEvent,
    counters: Arc<Counters>,
    before: (u64, u64),
    start: Instant,
}

impl PendingEvent {
    fn finish(self, error: Option<String>) {
        let (up, down) = self.counters.snapshot();
        let mut e = self.event;
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
}

struct EventBody {
    inner: Body,
    pending: Option<PendingEvent>,
}

impl HttpBody for EventBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        match &res {
            Poll::Ready(None) => {
                if let Some(p) = self.pending.take() {
                    p.finish(None);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(p) = self.pending.take() {
                    p.finish(Some(format!("response aborted: {e}")));
                }
            }
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for EventBody {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            // hyper drops a body it knows is empty without polling it; that is a complete
            // response, not an aborted one.
            let error =
                (!self.inner.is_end_stream()).then(|| "response not read to the end".to_owned());
            p.finish(error);
        }
    }
}
