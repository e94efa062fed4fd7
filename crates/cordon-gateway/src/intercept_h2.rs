//! HTTP/2 on an intercepted connection: the sandbox's client picked `h2` by ALPN, and each of its
//! streams is one request, decided, scanned and swapped by the same [`Scope`] as an HTTP/1.1
//! request on the same host.
//!
//! Guarantees:
//! - Every stream is decided on its own: `:authority` (and a `Host` beside it, if any) must name
//!   the connection's host and port, `[[network.rules]]` apply to its method and normalised path,
//!   budgets are charged, its head is scanned before the swap, credentials are swapped in only
//!   for the host's credentials, and a placeholder left after the swap is refused
//!   ([`Scope::admit`], [`Scope::check_swapped`]). A refused stream gets its own response
//!   (`403`, or `400`/`413`/`502`) with `X-Cordon-Reason`; the connection's other streams go on.
//! - Request bodies: a body of known length up to 1 MiB is read and scanned whole before
//!   anything of the request goes upstream; any other is scanned as it streams, with the same
//!   hold-back and scan limit as HTTP/1.1, so no byte of a match is sent; request trailers are
//!   scanned too (they go upstream unchanged). A finding cancels the upstream request
//!   (`RST_STREAM` upstream on HTTP/2, a cut connection on HTTP/1.1) and the client gets `403`
//!   (`413` over the scan limit) on its stream, or `RST_STREAM` if its response had already
//!   begun.
//! - Responses: header values, the body (streaming, with hold-back) and trailers are redacted of
//!   the session's secret values (every decodable form, as on HTTP/1.1) before the sandbox sees
//!   them, with an `Alert` per credential; a header or trailer whose name holds one is dropped.
//!   A host that holds a credential is asked for `accept-encoding: identity`, and a response
//!   from it with a `content-encoding`, or a `transfer-encoding` other than `chunked` (from an
//!   HTTP/1.1 upstream), is refused (`502`, rule `response-encoded`), as on HTTP/1.1.
//! - A stream hyper's HTTP/2 layer refuses on its own (before it becomes a request) and a
//!   `GOAWAY` with an error are recorded from the frames that layer writes (`crate::h2frames`):
//!   a `Blocked` event, rule `h2-protocol`, with the stream id and error code.
//! - Each stream that reaches the decision produces exactly one `HttpRequest` event (when its
//!   response ends, fails, or the stream is abandoned) or one `Blocked` event (with an `Alert`
//!   for a finding; rule `abandoned` for a stream dropped before its request went upstream); a budget refusal is recorded as `BudgetExhausted`, as on HTTP/1.1. A body
//!   finding after the event was recorded (the upstream answered before the body ended) adds an
//!   `Alert`. The event's byte counts are the stream's body bytes (the connection's TLS bytes
//!   are charged to the budgets as on HTTP/1.1, but belong to no one stream).
//! - Upstream: the connection offers `h2` and `http/1.1` and uses what the server picks, verified
//!   and metered exactly as on HTTP/1.1. Over HTTP/2 every stream shares one connection; over
//!   HTTP/1.1 each stream in flight has a connection of its own, reused afterwards (at most
//!   [`MAX_CONCURRENT_STREAMS`] kept); past the first, each holds one of the session's
//!   `max_connections` slots while it lives (none left: the stream is refused as a budget hit).
//!   Upstream connections end with the client's connection.
//! - Bounds towards the sandbox: at most [`MAX_CONCURRENT_STREAMS`] streams at once, request
//!   header lists of at most [`MAX_HEADER_LIST_SIZE`] bytes, flow-control windows of
//!   [`STREAM_WINDOW`] per stream and [`CONNECTION_WINDOW`] per connection (what a client can
//!   make the gateway buffer), and a connection with no stream open or started for one to two
//!   header-read timeouts is closed (`GOAWAY`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, EXPECT, HOST, TE};
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::ConnCheck;
use crate::core::{elapsed_ms, BudgetHit};
use crate::dlp::{Finding, Stream};
use crate::event::{EventKind, NetEvent, Verdict};
use crate::h2frames::{code_name, FrameWatch, Refused};
use crate::intercept::{
    add_note, alert, merge_names, Admitted, HeadView, Refusal, Scope, PREREAD_MAX,
};

/// Streams a client may have open at once on one intercepted connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Largest request header list (HTTP/2's accounting: name + value + 32 per field).
pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Flow-control window of each stream: request body bytes a client may send ahead of the gateway.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// Flow-control window of a connection: request body bytes in flight over all its streams.
pub const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Response bytes buffered per stream before the gateway waits for the client's window.
const MAX_SEND_BUF: usize = 256 * 1024;
/// Largest upstream response header list: the HTTP/1.1 path's head limit.
const UPSTREAM_HEADER_LIST: u32 = crate::h1::MAX_HEAD as u32;

/// Runs hyper's connection and stream tasks on the gateway's task tracker, so shutting the
/// gateway down waits for them.
#[derive(Clone)]
struct Exec(TaskTracker);

impl<F> hyper::rt::Executor<F> for Exec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The upstream side of one client connection.
#[derive(Default)]
struct Upstreams {
    /// The shared HTTP/2 connection, once the server picked `h2`.
    h2: Mutex<Option<(client2::SendRequest<UpBody>, SocketAddr)>>,
    /// Idle HTTP/1.1 connections, once the server picked `http/1.1`.
    idle_h1: Mutex<Vec<H1Upstream>>,
    /// Held while the first connection is made (its protocol is not known yet), so concurrent
    /// first streams share one HTTP/2 connection instead of each opening one.
    first: tokio::sync::Mutex<()>,
    /// The server picked `http/1.1`: connections are made without waiting on `first`.
    h1_only: AtomicBool,
    /// HTTP/1.1 upstream connections alive now ([`H1Slot`]).
    h1_live: Arc<AtomicUsize>,
}

/// One live HTTP/1.1 upstream connection, held by its connection task. The client connection's
/// own `max_connections` slot covers one upstream connection; every further one holds a slot
/// of its own (`permit`), so streams in flight cannot multiply the sandbox's connections out.
struct H1Slot {
    live: Arc<AtomicUsize>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for H1Slot {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An HTTP/1.1 upstream connection and the address it went to.
type H1Upstream = (client1::SendRequest<UpBody>, SocketAddr);

enum Sender {
    H2(client2::SendRequest<UpBody>),
    H1(client1::SendRequest<UpBody>),
}

struct H2Conn {
    s: Arc<Scope>,
    up: Upstreams,
    /// Streams being served (until their response ends) and streams started so far: a
    /// connection with neither for a while is idle.
    active: AtomicUsize,
    started: AtomicU64,
    /// Cancelled when the client connection ends or the gateway stops.
    done: CancellationToken,
}

/// Counts a stream as active while it lives.
struct Active(Arc<H2Conn>);

impl Active {
    fn new(conn: Arc<H2Conn>) -> Active {
        conn.started.fetch_add(1, Ordering::Relaxed);
        conn.active.fetch_add(1, Ordering::Relaxed);
        Active(conn)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves HTTP/2 on an intercepted connection until the client closes it, it idles out, or the
/// gateway stops.
pub(crate) async fn serve<IO>(s: Arc<Scope>, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let done = s.ctx.cancel.child_token();
    let conn = Arc::new(H2Conn {
        s: s.clone(),
        up: Upstreams::default(),
        active: AtomicUsize::new(0),
        started: AtomicU64::new(0),
        done: done.clone(),
    });
    let svc_conn = conn.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let conn = svc_conn.clone();
        async move { Ok::<_, Infallible>(conn.stream(req).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(Exec(s.ctx.tasks.clone()));
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .adaptive_window(false)
        .max_send_buf_size(MAX_SEND_BUF);
    // Streams hyper refuses on its own (malformed, over the limits) never reach `stream`: the
    // frames it writes tell, and each refusal is recorded.
    let reporter = s.clone();
    let io = FrameWatch::new(io, Box::new(move |r| record_layer_refusal(&reporter, r)));
    let served = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(served);
    let idle = s.ctx.shared.timeouts.header_read;
    let mut seen = 0;
    let mut closing = false;
    loop {
        tokio::select! {
            _ = &mut served => break,
            _ = s.ctx.cancel.cancelled() => break,
            _ = tokio::time::sleep(idle), if !closing => {
                let started = conn.started.load(Ordering::Relaxed);
                if conn.active.load(Ordering::Relaxed) == 0 && started == seen {
                    served.as_mut().graceful_shutdown();
                    closing = true;
                }
                seen = started;
            }
        }
    }
    done.cancel();
}

/// Records what the HTTP/2 layer refused without a handler: a `Blocked` event (rule
/// `h2-protocol`) naming the stream and the error code. Method and path are unknown: the layer
/// did not accept the request head.
fn record_layer_refusal(s: &Scope, r: Refused) {
    let mut e = NetEvent::new(EventKind::Blocked, &s.session.info, s.via, Verdict::Block);
    e.host = Some(s.host.to_string());
    e.port = Some(s.route.port);
    e.rule = "h2-protocol".into();
    e.reason = Some(match r {
        Refused::Stream { id, code } => format!(
            "the HTTP/2 layer refused stream {id} ({}) before it became a request: a malformed \
             head (connection-specific header, bad pseudo-header or :path, header list over the \
             bound) or too many streams at once",
            code_name(code)
        ),
        Refused::Connection { code } => format!(
            "the HTTP/2 layer closed the connection ({}): the client broke the protocol",
            code_name(code)
        ),
    });
    s.ctx.emit(&s.session, e);
}

/// The gateway's own answer on one stream: `status`, the reason in `X-Cordon-Reason` and in a
/// short body.
fn refusal_response(status: u16, reason: &str) -> Response<OutBody> {
    let mut r = Response::new(OutBody::Own(Some(Bytes::from(crate::h1::refusal_body(
        reason,
    )))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
    let shown = HeaderValue::from_str(&crate::h1::header_safe(reason))
        .unwrap_or_else(|_| HeaderValue::from_static("blocked"));
    r.headers_mut().insert("x-cordon-reason", shown);
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Connection-specific headers, which never cross the gateway (HTTP/2 forbids them; an
/// HTTP/1.1 upstream's are its own), besides those `Connection` names.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "transfer-encoding",
    "upgrade",
    "te",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    for n in HOP_BY_HOP.iter().map(|s| s.to_string()).chain(named) {
        headers.remove(n.as_str());
    }
}

impl H2Conn {
    /// One stream: its response, or the gateway's refusal. Gives up when the connection ends.
    async fn stream(self: Arc<Self>, req: Request<Incoming>) -> Response<OutBody> {
        let active = Active::new(self.clone());
        let done = self.done.clone();
        // Boxed: hyper moves the stream's future into a task of its own, and a small future
        // is cheaper to move than this large one.
        let work = Box::pin(self.handle(req, active));
        tokio::select! {
            r = work => r,
            _ = done.cancelled() => refusal_response(503, "the connection is closing"),
        }
    }

    fn refuse(&self, method: &str, path: &str, r: Refusal) -> Response<OutBody> {
        self.s.record(method, path, &r);
        refusal_response(r.status(), r.reason())
    }

    async fn handle(self: &Arc<Self>, req: Request<Incoming>, active: Active) -> Response<OutBody> {
        let start = Instant::now();
        let s = &self.s;
        let m: Method = req.method().clone();
        let method = m.as_str().to_owned();
        let target = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let fields: Vec<(HeaderName, HeaderValue)> = req
            .headers()
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let admitted = {
            let pairs: Vec<(&[u8], &[u8])> = fields
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
                .collect();
            s.admit(&HeadView {
                method: &method,
                target: target.as_bytes(),
                authority: req.uri().authority().map(|a| a.as_str().as_bytes()),
                headers: &pairs,
            })
        };
        let Admitted { rule, injected } = match admitted {
            Ok(a) => a,
            Err(r) => return self.refuse(&method, &target, r),
        };
        // From here the stream has passed the decision (its budget is charged): until its
        // `Finish` exists, ending in any way records one event.
        let mut pending = Pending {
            s: s.clone(),
            method: method.clone(),
            path: target.clone(),
            armed: true,
        };
        // The head that goes upstream: the client's fields with the credentials swapped in,
        // without connection-specific ones; the authority is the gateway's own (checked equal).
        let send_target = injected
            .target
            .clone()
            .unwrap_or_else(|| target.as_bytes().to_vec());
        let mut headers = HeaderMap::with_capacity(fields.len());
        for (i, (n, v)) in fields.iter().enumerate() {
            if *n == HOST || *n == EXPECT || (HOP_BY_HOP.contains(&n.as_str()) && *n != TE) {
                continue;
            }
            match s.upstream_rewrite(n.as_str().as_bytes()) {
                None => {}
                Some(None) => continue,
                Some(Some(value)) => {
                    headers.append(n.clone(), HeaderValue::from_static(value));
                    continue;
                }
            }
            let value = match injected.headers.iter().find(|(j, _)| *j == i) {
                Some((_, swapped)) => match HeaderValue::from_bytes(swapped) {
                    Ok(v) => v,
                    Err(_) => {
                        let r = Refusal::new(
                            400,
                            "bad-request",
                            "a header with a credential swapped in is not a valid header value",
                        );
                        return pending.refuse(r);
                    }
                },
                None => v.clone(),
            };
            headers.append(n.clone(), value);
        }
        let swapped = headers
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
        if let Err(r) = s.check_swapped(&send_target, swapped) {
            return pending.refuse(r);
        }
        let Ok(pq) = PathAndQuery::try_from(send_target.as_slice()) else {
            let r = Refusal::new(400, "bad-request", "the request target is not a valid path");
            return pending.refuse(r);
        };
        // The body: read and scanned whole when small and of known length, else streamed
        // through the scanner.
        let mut body = req.into_body();
        let declared = body.size_hint().exact();
        if let Some(n) = declared {
            if let Err(r) = s.check_length(n) {
                return pending.refuse(r);
            }
        }
        let state = Arc::new(StreamState {
            s: s.clone(),
            method: method.clone(),
            path: target.clone(),
            shared: Mutex::new(Shared::default()),
            sent: AtomicU64::new(0),
        });
        let up_body = if body.is_end_stream() {
            UpBody::whole(Bytes::new(), None, state.clone())
        } else if let Some(n) = declared.filter(|n| *n > 0 && *n <= PREREAD_MAX) {
            let (data, trailers) = match read_whole(&mut body, n).await {
                Ok(x) => x,
                Err(e) => {
                    // The client reset its stream or broke the framing: nothing was sent
                    // upstream.
                    let reason = format!("the request body did not arrive: {e}");
                    return pending.refuse(Refusal::new(400, "bad-request", reason));
                }
            };
            if let Err(r) = s.check_body(&data) {
                return pending.refuse(r);
            }
            if let Some(t) = &trailers {
                if let Err(f) = s.check_fields(fields_of(t)) {
                    return pending.refuse(Refusal::finding(f));
                }
            }
            UpBody::whole(data, trailers, state.clone())
        } else {
            UpBody::streaming(body, s.body_scan(), state.clone())
        };

        // Upstream.
        let (sender, addr) = match self.sender().await {
            Ok(x) => x,
            Err(r) => return pending.refuse(r),
        };
        let authority = if s.route.port == 443 {
            s.host.to_string()
        } else {
            format!("{}:{}", s.host, s.route.port)
        };
        let mut up = Request::new(up_body);
        *up.method_mut() = m;
        *up.headers_mut() = headers;
        let uri = match &sender {
            Sender::H2(_) => {
                *up.version_mut() = Version::HTTP_2;
                Uri::builder()
                    .scheme(Scheme::HTTPS)
                    .authority(authority.as_str())
                    .path_and_query(pq)
                    .build()
            }
            Sender::H1(_) => {
                *up.version_mut() = Version::HTTP_11;
                up.headers_mut().remove(TE);
                if let Ok(h) = HeaderValue::from_str(&authority) {
                    up.headers_mut().insert(HOST, h);
                }
                Ok(Uri::from(pq))
            }
        };
        match uri {
            Ok(u) => *up.uri_mut() = u,
            Err(e) => {
                let r = Refusal::new(400, "bad-request", format!("bad request target: {e}"));
                return pending.refuse(r);
            }
        }
        let mut event = s.event(EventKind::HttpRequest, s.route.verdict, &method, &target);
        event.ip = Some(addr.ip());
        event.rule = rule;
        if !injected.used.is_empty() {
            event.reason = Some(format!("credential {} injected", injected.used.join(",")));
        }
        pending.armed = false;
        let mut fin = Finish {
            event: Some(event),
            start,
            state: state.clone(),
            received: 0,
            redacted: Vec::new(),
            _active: active,
        };
        let (sent, h1_back) = match sender {
            Sender::H2(mut send) => (send.send_request(up).await, None),
            Sender::H1(mut send) => {
                let r = match send.ready().await {
                    Ok(()) => send.send_request(up).await,
                    Err(e) => Err(e),
                };
                (r, Some((send, addr)))
            }
        };
        // A finding in the request body wins over whatever upstream said.
        if let Some(r) = state.found() {
            fin.done(None);
            return refusal_response(r.status(), r.reason());
        }
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                let reason = match state.client_abort() {
                    Some(why) => format!("request not sent to the end: {why}"),
                    None => format!("upstream request failed: {e}"),
                };
                fin.done(Some(reason.clone()));
                return refusal_response(502, &reason);
            }
        };
        let (mut parts, body) = resp.into_parts();
        // hyper's HTTP/1.1 client takes `Transfer-Encoding: gzip, chunked` and undoes only the
        // chunking; the transfer-encoding header is dropped below, so a coding named there
        // would reach the client as unscanned bytes: it counts like a content-encoding.
        let transfer: Vec<&[u8]> = parts
            .headers
            .get_all(http::header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|c| !c.eq_ignore_ascii_case(b"chunked"))
            .collect();
        let codings = parts
            .headers
            .get_all(http::header::CONTENT_ENCODING)
            .iter()
            .map(HeaderValue::as_bytes)
            .chain(transfer.iter().copied());
        if let Some(reason) = s.unscannable_coding(codings) {
            // gzip (or any coding) would carry an echoed secret past the redaction: refused.
            if let Some(e) = fin.event.as_mut() {
                e.verdict = Verdict::Block;
                e.rule = crate::intercept::RESPONSE_ENCODED.into();
            }
            fin.done(Some(reason.clone()));
            return refusal_response(502, &reason);
        }
        strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_2;
        redact_fields(s, &mut parts.headers, &mut fin.redacted);
        let down = DownBody {
            inner: body,
            scan: s.response_scan(),
            queue: VecDeque::new(),
            ended: false,
            fin: Some(fin),
            h1_back: h1_back.map(|b| (b, self.clone())),
        };
        Response::from_parts(parts, OutBody::Relay(Box::new(down)))
    }

    /// A ready upstream sender, connecting when there is none.
    async fn sender(&self) -> Result<(Sender, SocketAddr), Refusal> {
        if let Some(x) = self.ready_sender() {
            return Ok(x);
        }
        let h1_known = self.up.h1_only.load(Ordering::Acquire);
        let mut first = if h1_known {
            None
        } else {
            Some(self.up.first.lock().await)
        };
        if let Some(x) = self.ready_sender() {
            return Ok(x);
        }
        // Loaded again: a stream that waited above while the first connection found an
        // HTTP/1.1-only server must take its slot before it connects, like any later one (else
        // it would open TCP and TLS past `max_connections` before being refused). Connections
        // are then made in parallel.
        let h1_known = h1_known || self.up.h1_only.load(Ordering::Acquire);
        if h1_known {
            drop(first.take());
        }
        // Over HTTP/1.1 the slot is taken before connecting; the first connection's protocol
        // is not known yet (over HTTP/2 it is the only one).
        let early_slot = if h1_known {
            Some(self.h1_slot()?)
        } else {
            None
        };
        let v = self
            .s
            .connect(self.s.rt.upstream_h2.clone())
            .await
            .map_err(|(rule, reason)| Refusal::new(502, rule, reason))?;
        let addr = v.addr;
        let picked_h2 = v.tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2);
        let io = TokioIo::new(v.tls);
        let failed = |e: hyper::Error| {
            Refusal::new(
                502,
                "upstream-error",
                format!("HTTP handshake with {} failed: {e}", self.s.host),
            )
        };
        let done = self.done.clone();
        if picked_h2 {
            let mut b = client2::Builder::new(Exec(self.s.ctx.tasks.clone()));
            b.initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .adaptive_window(false)
                .max_header_list_size(UPSTREAM_HEADER_LIST)
                .max_send_buf_size(MAX_SEND_BUF);
            let (send, conn) = b.handshake(io).await.map_err(failed)?;
            self.s.ctx.tasks.spawn(async move {
                tokio::select! {
                    _ = conn => {}
                    _ = done.cancelled() => {}
                }
            });
            *lock(&self.up.h2) = Some((send.clone(), addr));
            Ok((Sender::H2(send), addr))
        } else {
            self.up.h1_only.store(true, Ordering::Release);
            let slot = match early_slot {
                Some(slot) => slot,
                None => self.h1_slot()?,
            };
            let (send, conn) = client1::Builder::new()
                .max_headers(crate::h1::MAX_HEADERS)
                .handshake(io)
                .await
                .map_err(failed)?;
            self.s.ctx.tasks.spawn(async move {
                // The slot is free again when the connection is gone.
                let _slot = slot;
                tokio::select! {
                    _ = conn => {}
                    _ = done.cancelled() => {}
                }
            });
            Ok((Sender::H1(send), addr))
        }
    }

    /// Counts one more live HTTP/1.1 upstream connection; past the first, it takes one of the
    /// session's `max_connections` slots or is refused as a budget hit (recorded).
    fn h1_slot(&self) -> Result<H1Slot, Refusal> {
        let before = self.up.h1_live.fetch_add(1, Ordering::AcqRel);
        let mut slot = H1Slot {
            live: self.up.h1_live.clone(),
            _permit: None,
        };
        if before == 0 {
            return Ok(slot);
        }
        let s = &self.s;
        let host = s.host.to_string();
        let hit = BudgetHit {
            via: s.via,
            host: Some(host.clone()),
            ip: None,
            port: Some(s.route.port),
        };
        match s.session.budget.acquire_connection() {
            ConnCheck::Ok(permit) => {
                slot._permit = permit;
                Ok(slot)
            }
            ConnCheck::OverInReport(limit) => {
                s.ctx.budget_refused(&s.session, &limit, &hit, true);
                Ok(slot)
            }
            ConnCheck::Refused(limit) => {
                s.ctx.budget_refused(&s.session, &limit, &hit, false);
                Err(Refusal::Budget {
                    reason: limit.reason(Some(&host)),
                })
            }
        }
    }

    fn ready_sender(&self) -> Option<(Sender, SocketAddr)> {
        {
            let mut h2 = lock(&self.up.h2);
            if let Some((send, addr)) = h2.as_ref() {
                if !send.is_closed() {
                    return Some((Sender::H2(send.clone()), *addr));
                }
                *h2 = None;
            }
        }
        let mut idle = lock(&self.up.idle_h1);
        while let Some((send, addr)) = idle.pop() {
            if send.is_ready() {
                return Some((Sender::H1(send), addr));
            }
        }
        None
    }

    /// Keeps an HTTP/1.1 upstream connection whose exchange ended cleanly, for the next stream.
    fn give_back(&self, send: client1::SendRequest<UpBody>, addr: SocketAddr) {
        let mut idle = lock(&self.up.idle_h1);
        if !send.is_closed() && idle.len() < MAX_CONCURRENT_STREAMS as usize {
            idle.push((send, addr));
        }
    }
}

/// Replaces the session's secret values in a header value (same length); records which.
fn redact_value(s: &Scope, v: &mut HeaderValue, names: &mut Vec<String>) {
    let mut bytes = v.as_bytes().to_vec();
    let hit = s.redact(&mut bytes);
    if hit.is_empty() {
        return;
    }
    // `*` for visible bytes keeps the value valid.
    *v = HeaderValue::from_bytes(&bytes).unwrap_or_else(|_| HeaderValue::from_static(""));
    merge_names(names, &hit);
}

/// Redacts the session's secret values in response header or trailer fields; records which.
/// A field whose name holds a secret form is dropped: a masked name would be another name
/// (HTTP/1.1 masks the whole head, names included, so there the field arrives under a name of
/// `*`s; here it does not arrive at all).
fn redact_fields(s: &Scope, h: &mut HeaderMap, names: &mut Vec<String>) {
    let hidden: Vec<HeaderName> = h
        .keys()
        .filter(|n| {
            let mut bytes = n.as_str().as_bytes().to_vec();
            let hit = s.redact(&mut bytes);
            merge_names(names, &hit);
            !hit.is_empty()
        })
        .cloned()
        .collect();
    for n in &hidden {
        h.remove(n);
    }
    for v in h.values_mut() {
        redact_value(s, v, names);
    }
}

fn fields_of(h: &HeaderMap) -> impl Iterator<Item = (&[u8], &[u8])> {
    h.iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
}

/// Reads a body of declared length `n` (HTTP/2 holds the client to it) and its trailers.
async fn read_whole(body: &mut Incoming, n: u64) -> io::Result<(Bytes, Option<HeaderMap>)> {
    let mut buf = BytesMut::with_capacity(usize::try_from(n).unwrap_or(0));
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(io::Error::other)?;
        match frame.into_data() {
            Ok(d) => {
                if (buf.len() + d.len()) as u64 > n {
                    return Err(io::ErrorKind::InvalidData.into());
                }
                buf.extend_from_slice(&d);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok((buf.freeze(), trailers))
}

/// Why a request body stopped before its end.
enum Abort {
    Found(Finding),
    Client(String),
}

#[derive(Default)]
struct Shared {
    abort: Option<Abort>,
    /// The stream's event was recorded.
    recorded: bool,
}

/// What a stream's request body and its response share.
struct StreamState {
    s: Arc<Scope>,
    method: String,
    path: String,
    shared: Mutex<Shared>,
    /// Request body bytes released upstream.
    sent: AtomicU64,
}

impl StreamState {
    /// The refusal for a finding in the request body, if there was one.
    fn found(&self) -> Option<Refusal> {
        match &lock(&self.shared).abort {
            Some(Abort::Found(f)) => Some(Refusal::finding(f.clone())),
            _ => None,
        }
    }

    fn client_abort(&self) -> Option<String> {
        match &lock(&self.shared).abort {
            Some(Abort::Client(why)) => Some(why.clone()),
            _ => None,
        }
    }

    /// The request body stopped: a finding after the stream's event was recorded gets an alert
    /// of its own.
    fn abort(&self, a: Abort) {
        let mut sh = lock(&self.shared);
        if sh.abort.is_some() {
            return;
        }
        if let (true, Abort::Found(f)) = (sh.recorded, &a) {
            alert(
                &self.s.ctx,
                &self.s.session,
                self.s.via,
                Some(self.s.host.to_string()),
                Some(&self.method),
                Some(&self.path),
                f,
            );
            self.s.streamed_body_finding(f);
        }
        sh.abort = Some(a);
    }
}

/// A stream that passed the decision but has no [`Finish`] yet: refused through it, or dropped
/// (the client reset the stream during the body pre-read or the upstream connect, or the
/// connection went away), it records one `Blocked` event.
struct Pending {
    s: Arc<Scope>,
    method: String,
    path: String,
    /// Cleared once the stream's `Finish` takes over.
    armed: bool,
}

impl Pending {
    fn refuse(mut self, r: Refusal) -> Response<OutBody> {
        self.armed = false;
        self.s.record(&self.method, &self.path, &r);
        refusal_response(r.status(), r.reason())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.armed {
            let r = Refusal::new(
                400,
                crate::intercept::ABANDONED,
                "the stream was abandoned before it was sent upstream",
            );
            self.s.record(&self.method, &self.path, &r);
        }
    }
}

/// A stream's event, recorded exactly once: when its response ends or fails, or when it is
/// dropped unfinished (the client reset the stream, or the connection went away).
struct Finish {
    event: Option<NetEvent>,
    start: Instant,
    state: Arc<StreamState>,
    received: u64,
    redacted: Vec<String>,
    _active: Active,
}

impl Finish {
    /// `note`: why the exchange did not end normally.
    fn done(&mut self, note: Option<String>) {
        let Some(mut e) = self.event.take() else {
            return;
        };
        let st = &self.state;
        let s = &st.s;
        let mut sh = lock(&st.shared);
        sh.recorded = true;
        e.bytes_up = st.sent.load(Ordering::Relaxed);
        e.bytes_down = self.received;
        e.duration_ms = elapsed_ms(self.start);
        if let Some(Abort::Found(f)) = &sh.abort {
            let r = Refusal::finding(f.clone());
            s.record_as(e, &st.method, &st.path, &r);
            s.streamed_body_finding(f);
            return;
        }
        s.record_redactions(&st.method, &st.path, &self.redacted);
        let note = note.or_else(|| {
            (!self.redacted.is_empty()).then(|| format!("redacted {}", self.redacted.join(",")))
        });
        add_note(&mut e, note);
        s.ctx.emit(&s.session, e);
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.done(Some(
            "the stream was abandoned before its response ended".into(),
        ));
    }
}

/// The request body going upstream: whole (already scanned) or streamed through the scanner.
pub(crate) struct UpBody {
    inner: Option<(Incoming, Stream)>,
    queue: VecDeque<Frame<Bytes>>,
    ended: bool,
    len: Option<u64>,
    state: Arc<StreamState>,
}

impl UpBody {
    fn whole(data: Bytes, trailers: Option<HeaderMap>, state: Arc<StreamState>) -> UpBody {
        let len = data.len() as u64;
        let mut queue = VecDeque::new();
        if !data.is_empty() {
            queue.push_back(Frame::data(data));
        }
        if let Some(t) = trailers {
            queue.push_back(Frame::trailers(t));
        }
        UpBody {
            inner: None,
            queue,
            ended: true,
            len: Some(len),
            state,
        }
    }

    fn streaming(body: Incoming, scan: Stream, state: Arc<StreamState>) -> UpBody {
        UpBody {
            len: body.size_hint().exact(),
            inner: Some((body, scan)),
            queue: VecDeque::new(),
            ended: false,
            state,
        }
    }

    fn fail(&mut self, a: Abort) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.state.abort(a);
        self.ended = true;
        self.queue.clear();
        self.inner = None;
        Poll::Ready(Some(Err(io::Error::other(
            "the request was stopped by the gateway",
        ))))
    }

    fn release(&mut self, data: Vec<u8>) {
        if !data.is_empty() {
            self.queue.push_back(Frame::data(Bytes::from(data)));
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(frame) = this.queue.pop_front() {
                if let Some(d) = frame.data_ref() {
                    this.state.sent.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            let Some((inner, scan)) = this.inner.as_mut() else {
                this.ended = true;
                continue;
            };
            match ready!(Pin::new(inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => match scan.push(&d) {
                        Ok(out) => this.release(out),
                        Err(f) => return this.fail(Abort::Found(f)),
                    },
                    Err(frame) => {
                        let Ok(t) = frame.into_trailers() else {
                            continue;
                        };
                        match scan.finish() {
                            Ok(rest) => this.release(rest),
                            Err(f) => return this.fail(Abort::Found(f)),
                        }
                        if let Err(f) = this.state.s.check_fields(fields_of(&t)) {
                            return this.fail(Abort::Found(f));
                        }
                        this.queue.push_back(Frame::trailers(t));
                        this.ended = true;
                    }
                },
                Some(Err(e)) => return this.fail(Abort::Client(e.to_string())),
                None => {
                    match scan.finish() {
                        Ok(rest) => this.release(rest),
                        Err(f) => return this.fail(Abort::Found(f)),
                    }
                    this.ended = true;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.queue.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        match self.len {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The upstream response body going to the client, redacted as it streams.
pub(crate) struct DownBody {
    inner: Incoming,
    scan: Option<Stream>,
    queue: VecDeque<Frame<Bytes>>,
    ended: bool,
    fin: Option<Finish>,
    /// An HTTP/1.1 upstream connection, kept for reuse if the exchange ends cleanly.
    h1_back: Option<(H1Upstream, Arc<H2Conn>)>,
}

impl DownBody {
    fn flush_scan(&mut self) {
        if let Some(scan) = self.scan.as_mut() {
            // Redaction never reports a finding: it replaces.
            if let Ok(rest) = scan.finish() {
                if !rest.is_empty() {
                    self.queue.push_back(Frame::data(Bytes::from(rest)));
                }
            }
        }
    }

    fn finish(&mut self, note: Option<String>) {
        let Some(mut fin) = self.fin.take() else {
            return;
        };
        if let Some(scan) = &self.scan {
            merge_names(&mut fin.redacted, scan.redacted());
        }
        let clean = note.is_none();
        fin.done(note);
        if let (true, Some(((send, addr), conn))) = (clean, self.h1_back.take()) {
            conn.give_back(send, addr);
        }
    }
}

impl Body for DownBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(frame) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if this.ended {
                this.finish(None);
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => {
                        if let Some(fin) = this.fin.as_mut() {
                            fin.received += d.len() as u64;
                        }
                        match this.scan.as_mut() {
                            Some(scan) => {
                                let out = scan.push(&d).unwrap_or_default();
                                if !out.is_empty() {
                                    this.queue.push_back(Frame::data(Bytes::from(out)));
                                }
                            }
                            None => this.queue.push_back(Frame::data(d)),
                        }
                    }
                    Err(frame) => {
                        let Ok(mut t) = frame.into_trailers() else {
                            continue;
                        };
                        this.flush_scan();
                        if let Some(fin) = this.fin.as_mut() {
                            let s = fin.state.s.clone();
                            redact_fields(&s, &mut t, &mut fin.redacted);
                        }
                        this.queue.push_back(Frame::trailers(t));
                        this.ended = true;
                    }
                },
                Some(Err(e)) => {
                    // The upstream stream failed (or the gateway cancelled it for a finding in
                    // the request body): the client's stream is reset.
                    this.finish(Some(format!("response aborted: {e}")));
                    this.ended = true;
                    this.queue.clear();
                    return Poll::Ready(Some(Err(io::Error::other(e))));
                }
                None => {
                    this.flush_scan();
                    this.ended = true;
                }
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        // Redaction keeps lengths.
        self.inner.size_hint()
    }
}

/// What a stream answers with: the gateway's own body, or upstream's, relayed.
pub(crate) enum OutBody {
    Own(Option<Bytes>),
    Relay(Box<DownBody>),
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            OutBody::Own(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            OutBody::Relay(down) => Pin::new(down.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Own(data) => data.is_none(),
            OutBody::Relay(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Own(Some(d)) => SizeHint::with_exact(d.len() as u64),
            OutBody::Own(None) => SizeHint::with_exact(0),
            OutBody::Relay(down) => down.size_hint(),
        }
    }
}
