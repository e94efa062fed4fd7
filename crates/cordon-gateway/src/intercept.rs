//! TLS interception: HTTPS to the hosts the session intercepts is terminated by the gateway,
//! decided request by request, scanned, has its credentials swapped in, and is re-encrypted to
//! the real server.
//!
//! Guarantees:
//! - Only hosts in [`InterceptConfig::hosts`] are intercepted, only when the connection's
//!   destination is that host by name (CONNECT target, or the synthetic address DNS gave out),
//!   and only after the ClientHello's SNI was checked against it. A connection to an intercepted
//!   host that does not speak TLS (or HTTP, handled by the plain HTTP path) is refused: a raw
//!   tunnel would bypass the rules and scanning the host was put under.
//! - The upstream connection goes to the addresses the route decided and checked, and its
//!   certificate is verified for the host name against the host's trust store (plus configured
//!   roots). A failed verification is a blocked request (`upstream-tls`, audited) answered with
//!   `502`; there is no fallback to an unverified or tunnelled connection.
//! - Every request on a kept-alive connection is decided again: its `Host` must name the
//!   connection's host, `[[network.rules]]` are applied to its method and normalised path
//!   (`cordon_policy::decide_request`), budgets are charged, and it is scanned.
//! - Outbound scanning: the request line and headers for the session's secret values, canaries
//!   and secret formats (before credentials are swapped in), then, after the swap, for any
//!   placeholder left (a placeholder anywhere but where its credential goes, or to a host it is
//!   not bound to); the body for all of them. A body of known length up to 1 MiB is read and
//!   scanned whole before anything of the request goes upstream; larger and chunked bodies are
//!   scanned as they stream, with a hold-back so no byte of a match is sent (on a finding the
//!   upstream connection is cut mid-body: the server sees an incomplete request). A finding
//!   refuses the request (`403`) and records a `Blocked` event and an `Alert` naming the
//!   pattern, never the value. A request body larger than the scan limit is refused.
//! - Responses are scanned for the session's secret values, which are redacted (same length) in
//!   the head and the body before the sandbox sees them, with an `Alert`.
//! - Each request produces one `HttpRequest` event (method, path, bytes, the credentials used by
//!   name) or one `Blocked` event.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use cordon_policy::decide_request;
use cordon_policy::host::HostName;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::budget::{ByteDirection, RateCheck};
use crate::config::InterceptConfig;
use crate::core::{elapsed_ms, BudgetHit, Ctx};
use crate::creds;
use crate::dlp::{Finding, Kind, Scanner, Stream};
use crate::event::{cut_path, EventKind, NetEvent, Verdict, Via};
use crate::h1::{self, BodyLen, Chunk, ChunkedDecoder, ClientEnd, RequestHead, RequestInfo};
use crate::io::{Meter, MeterTarget};
use crate::policy::{Dest, Verdicted};
use crate::route::{self, Route};
use crate::session::Session;
use crate::sni::{Peek, SniError};
use crate::tunnel::{check_first_bytes, emit_blocked};

const READ_CHUNK: usize = 64 * 1024;
/// Request bodies of a known length up to this size are read and scanned whole before anything
/// of the request goes upstream; larger and chunked bodies are scanned as they stream.
const PREREAD_MAX: u64 = 1024 * 1024;

/// Interception state for the gateway's life: the configuration and its compiled scanners.
pub(crate) struct Runtime {
    pub cfg: Arc<InterceptConfig>,
    /// Request heads before the swap: secret values, canaries, formats.
    head: Scanner,
    /// Request heads after the swap: placeholders.
    placeholders: Scanner,
    /// Request bodies: all of the above.
    body: Scanner,
    /// Responses: secret values (redacted).
    inbound: Option<Scanner>,
}

impl Runtime {
    /// `canaries`: the detection engine's honey tokens (`GatewayConfig::canaries`), also looked
    /// for in streamed bodies, where the engine's own check does not reach.
    pub fn new(cfg: Arc<InterceptConfig>, canaries: &[(String, String)]) -> Runtime {
        let secrets: Vec<_> = cfg
            .credentials
            .iter()
            .map(|c| {
                (
                    Kind::Secret,
                    format!("secret:{}", c.spec.name),
                    c.secret.bytes().to_vec(),
                )
            })
            .collect();
        let canaries: Vec<_> = canaries
            .iter()
            .map(|(n, v)| (Kind::Canary, format!("canary:{n}"), v.as_bytes().to_vec()))
            .collect();
        let placeholders: Vec<_> = cfg
            .credentials
            .iter()
            .map(|c| {
                (
                    Kind::Placeholder,
                    format!("placeholder:{}", c.spec.name),
                    c.placeholder.as_bytes().to_vec(),
                )
            })
            .collect();
        let head = Scanner::new(
            secrets.iter().chain(&canaries).cloned().collect(),
            /*formats*/ true,
        );
        let body = Scanner::new(
            secrets
                .iter()
                .chain(&canaries)
                .chain(&placeholders)
                .cloned()
                .collect(),
            /*formats*/ true,
        );
        let inbound =
            (!secrets.is_empty()).then(|| Scanner::new(secrets.clone(), /*formats*/ false));
        Runtime {
            head,
            placeholders: Scanner::new(placeholders, /*formats*/ false),
            body,
            inbound,
            cfg,
        }
    }

    /// The host a connection to `dest` is intercepted for, if it is.
    pub fn intercepts(&self, dest: &Dest) -> Option<HostName> {
        dest.name().filter(|h| self.cfg.intercepts(h)).cloned()
    }

    /// A session placeholder, secret or canary in a DNS name or a plain-HTTP head, which never
    /// legitimately carries one. DNS names are lower case, so the check ignores case.
    pub fn leak_in(&self, data: &[u8]) -> Option<Finding> {
        let lower = data.to_ascii_lowercase();
        self.placeholders
            .find(&lower)
            .or_else(|| self.head.find(data))
    }
}

/// Records a high-severity alert alongside a refusal.
pub(crate) fn alert(
    ctx: &Ctx,
    session: &Session,
    via: Via,
    host: Option<String>,
    method: Option<&str>,
    path: Option<&str>,
    finding: &Finding,
) {
    let mut e = NetEvent::new(EventKind::Alert, &session.info, via, Verdict::Block);
    e.host = host;
    e.method = method.map(str::to_owned);
    e.path = path.map(cut_path);
    e.rule = alert_rule(finding);
    e.reason = Some(alert_reason(finding));
    ctx.emit(session, e);
}

fn alert_rule(f: &Finding) -> String {
    match f.kind {
        Kind::Placeholder => format!("placeholder-leak:{}", f.pattern),
        Kind::TooLarge => "dlp:too-large".to_owned(),
        _ => format!("dlp:{}", f.pattern),
    }
}

fn alert_reason(f: &Finding) -> String {
    match f.kind {
        Kind::Secret => format!(
            "a credential's real value ({}) in an outbound request",
            f.pattern
        ),
        Kind::Placeholder => format!(
            "a credential placeholder ({}) sent where its credential does not go",
            f.pattern
        ),
        Kind::Canary => format!("a canary token ({}) in an outbound request", f.pattern),
        Kind::Format => format!("secret-shaped data ({}) in an outbound request", f.pattern),
        Kind::TooLarge => f.pattern.clone(),
    }
}

/// A stream that first yields bytes already read from `inner` (the ClientHello).
struct Replay {
    first: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.first.len() {
            let n = (self.first.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.first[start..start + n]);
            self.pos += n;
            if self.pos == self.first.len() {
                self.first = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The upstream socket, charging every byte (TLS records included) to the session's budgets.
struct Metered {
    inner: TcpStream,
    meter: Meter,
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut tmp = [0u8; 16 * 1024];
        let want = buf.remaining().min(tmp.len());
        let allowed = match self.meter.reserve(ByteDirection::In, want) {
            Ok(n) => n,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let mut rb = ReadBuf::new(&mut tmp[..allowed]);
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_read(cx, &mut rb);
        let got = match res {
            Poll::Ready(Ok(())) => rb.filled().len(),
            _ => 0,
        };
        this.meter.settle(ByteDirection::In, allowed, got);
        if got > 0 {
            buf.put_slice(rb.filled());
        }
        res
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let allowed = match self.meter.reserve(ByteDirection::Out, buf.len()) {
            Ok(n) => n,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_write(cx, &buf[..allowed]);
        let sent = match &res {
            Poll::Ready(Ok(n)) => *n,
            _ => 0,
        };
        this.meter.settle(ByteDirection::Out, allowed, sent);
        res
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type ClientTls = tokio_rustls::server::TlsStream<Replay>;
type UpstreamTls = tokio_rustls::client::TlsStream<Metered>;

struct Upstream {
    tls: UpstreamTls,
    addr: SocketAddr,
    buf: BytesMut,
    counters: Arc<crate::io::Counters>,
}

struct Conn<'a> {
    ctx: &'a Arc<Ctx>,
    rt: &'a Runtime,
    session: &'a Arc<Session>,
    via: Via,
    host: HostName,
    route: Route,
    client: ClientTls,
    buf: BytesMut,
    out: Vec<u8>,
    upstream: Option<Upstream>,
}

/// Serves an intercepted connection: `first` holds the ClientHello already read, `peek` what it
/// said. Records its own events.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    ctx: &Arc<Ctx>,
    rt: &Runtime,
    session: &Arc<Session>,
    via: Via,
    client: TcpStream,
    first: Vec<u8>,
    peek: Result<Peek, SniError>,
    route: Route,
    host: HostName,
) {
    let port = route.port;
    let shown = host.to_string();
    let is_tls = matches!(peek, Ok(Peek::ClientHello { .. }));
    if let Err(v) = check_first_bytes(&route.dest, peek) {
        emit_blocked(ctx, session, via, Some(shown), None, Some(port), &v);
        return;
    }
    if !is_tls {
        let v = Verdicted {
            verdict: Verdict::Block,
            rule: "intercept-needs-tls".into(),
            reason: Some(format!(
                "{shown} is intercepted (credentials, rules or scanning): only TLS or HTTP may go there"
            )),
        };
        emit_blocked(ctx, session, via, Some(shown), None, Some(port), &v);
        return;
    }
    let server = match rt.cfg.ca.server_config(&host) {
        Ok(s) => s,
        Err(e) => {
            let v = Verdicted {
                verdict: Verdict::Block,
                rule: "intercept-error".into(),
                reason: Some(format!("cannot mint a certificate for {shown}: {e}")),
            };
            emit_blocked(ctx, session, via, Some(shown), None, Some(port), &v);
            return;
        }
    };
    let accept = TlsAcceptor::from(server).accept(Replay {
        first,
        pos: 0,
        inner: client,
    });
    let accepted = tokio::select! {
        r = tokio::time::timeout(ctx.shared.timeouts.header_read, accept) => r,
        _ = ctx.cancel.cancelled() => return,
    };
    let client = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            // Most often a client that does not trust the session CA (certificate pinning).
            let mut ev = NetEvent::new(EventKind::Connection, &session.info, via, Verdict::Allow);
            ev.host = Some(shown);
            ev.port = Some(port);
            ev.rule = "intercept-handshake".into();
            ev.reason = Some(format!(
                "the client's TLS handshake with the gateway failed: {e}"
            ));
            ctx.emit(session, ev);
            return;
        }
        Err(_) => return,
    };
    let mut conn = Conn {
        ctx,
        rt,
        session,
        via,
        host,
        route,
        client,
        buf: BytesMut::with_capacity(8 * 1024),
        out: Vec::with_capacity(1024),
        upstream: None,
    };
    let cancelled = ctx.cancel.cancelled();
    tokio::pin!(cancelled);
    loop {
        let head = tokio::select! {
            r = tokio::time::timeout(ctx.shared.timeouts.header_read, conn.read_head()) => r,
            _ = &mut cancelled => return,
        };
        let req = match head {
            Ok(Ok(Some(req))) => req,
            Ok(Ok(None)) | Err(_) => return,
            Ok(Err(e)) => {
                let _ = conn.reply(e.status(), &e.to_string(), true).await;
                return;
            }
        };
        let keep = tokio::select! {
            k = conn.request(req) => k,
            _ = &mut cancelled => return,
        };
        if !keep {
            let _ = conn.client.shutdown().await;
            return;
        }
    }
}

/// How a body transfer failed.
enum BodyError {
    Src(io::Error),
    Dst(io::Error),
    Found(Finding),
}

async fn fill<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
    buf.reserve(READ_CHUNK);
    s.read_buf(buf).await
}

/// Moves one body from `src` (`buf` holds what was already read) to `dst`, re-framed as
/// `framing` (chunked stays chunked; length stays length), through `scan` when given.
async fn relay_body<S, D>(
    src: &mut S,
    buf: &mut BytesMut,
    dst: &mut D,
    body: BodyLen,
    out_chunked: bool,
    mut scan: Option<&mut Stream<'_>>,
) -> Result<(), BodyError>
where
    S: AsyncRead + Unpin,
    D: AsyncWrite + Unpin,
{
    async fn emit<D: AsyncWrite + Unpin>(
        dst: &mut D,
        data: &[u8],
        chunked: bool,
    ) -> Result<(), BodyError> {
        if data.is_empty() {
            return Ok(());
        }
        if chunked {
            let mut head = Vec::with_capacity(12);
            h1::write_chunk_head(&mut head, data.len() as u64);
            dst.write_all(&head).await.map_err(BodyError::Dst)?;
            dst.write_all(data).await.map_err(BodyError::Dst)?;
            dst.write_all(b"\r\n").await.map_err(BodyError::Dst)
        } else {
            dst.write_all(data).await.map_err(BodyError::Dst)
        }
    }
    let pass = |data: &[u8], scan: &mut Option<&mut Stream<'_>>| -> Result<Vec<u8>, BodyError> {
        match scan {
            Some(s) => s.push(data).map_err(BodyError::Found),
            None => Ok(data.to_vec()),
        }
    };
    match body {
        BodyLen::Empty => {}
        BodyLen::Length(n) => {
            let mut left = n;
            while left > 0 {
                if buf.is_empty() && fill(src, buf).await.map_err(BodyError::Src)? == 0 {
                    return Err(BodyError::Src(io::ErrorKind::UnexpectedEof.into()));
                }
                let k = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let released = pass(&buf[..k], &mut scan)?;
                buf.advance(k);
                left -= k as u64;
                emit(dst, &released, out_chunked).await?;
            }
        }
        BodyLen::Chunked => {
            let mut dec = ChunkedDecoder::default();
            loop {
                let (used, what) = dec
                    .step(buf)
                    .map_err(|e| BodyError::Src(io::Error::new(io::ErrorKind::InvalidData, e)))?;
                match what {
                    Chunk::End => {
                        buf.advance(used);
                        break;
                    }
                    Chunk::Data(k) => {
                        let released = pass(&buf[..k], &mut scan)?;
                        buf.advance(used);
                        emit(dst, &released, out_chunked).await?;
                    }
                    Chunk::Framing => {
                        buf.advance(used);
                        if used == 0 && fill(src, buf).await.map_err(BodyError::Src)? == 0 {
                            return Err(BodyError::Src(io::ErrorKind::UnexpectedEof.into()));
                        }
                    }
                }
            }
        }
        BodyLen::UntilClose => loop {
            if buf.is_empty() && fill(src, buf).await.map_err(BodyError::Src)? == 0 {
                break;
            }
            let released = pass(buf, &mut scan)?;
            buf.clear();
            emit(dst, &released, out_chunked).await?;
        },
    }
    if let Some(s) = scan {
        let rest = s.finish().map_err(BodyError::Found)?;
        emit(dst, &rest, out_chunked).await?;
    }
    if out_chunked {
        dst.write_all(h1::LAST_CHUNK)
            .await
            .map_err(BodyError::Dst)?;
    }
    dst.flush().await.map_err(BodyError::Dst)
}

impl Conn<'_> {
    async fn read_head(&mut self) -> Result<Option<RequestHead>, h1::HeadError> {
        let mut spans = Vec::new();
        loop {
            if let Some(req) = h1::parse_request(&mut self.buf, &mut spans)? {
                return Ok(Some(req));
            }
            match fill(&mut self.client, &mut self.buf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }

    async fn reply(&mut self, status: u16, reason: &str, close: bool) -> io::Result<()> {
        self.out.clear();
        h1::write_refusal(&mut self.out, status, reason, close);
        self.client.write_all(&self.out).await?;
        self.client.flush().await
    }

    fn event(&self, kind: EventKind, verdict: Verdict, method: &str, path: &str) -> NetEvent {
        let mut e = NetEvent::new(kind, &self.session.info, self.via, verdict);
        e.host = Some(self.host.to_string());
        e.port = Some(self.route.port);
        e.method = Some(method.to_owned());
        e.path = Some(cut_path(path));
        e
    }

    /// Refuses a request: records it (and an alert for a finding), answers, and says whether
    /// the connection may go on.
    #[allow(clippy::too_many_arguments)]
    async fn refuse(
        &mut self,
        info: Option<&RequestInfo>,
        method: &str,
        path: &str,
        status: u16,
        rule: String,
        reason: String,
        finding: Option<&Finding>,
    ) -> bool {
        if let Some(f) = finding {
            alert(
                self.ctx,
                self.session,
                self.via,
                Some(self.host.to_string()),
                Some(method),
                Some(path),
                f,
            );
        }
        let mut e = self.event(EventKind::Blocked, Verdict::Block, method, path);
        e.rule = rule;
        e.reason = Some(reason.clone());
        self.ctx.emit(self.session, e);
        let close = match info {
            Some(i) => !i.keep_alive || !matches!(i.body, BodyLen::Empty | BodyLen::Length(0)),
            None => true,
        };
        self.reply(status, &reason, close).await.is_ok() && !close
    }

    /// Handles one request; `true` to keep the connection.
    async fn request(&mut self, req: RequestHead) -> bool {
        let start = Instant::now();
        let method = req.method().to_owned();
        let target = req.target().to_vec();
        let path = String::from_utf8_lossy(&target).into_owned();
        let info = match h1::request_info(&req) {
            Ok(i) => i,
            Err(e) => {
                let status = e.status();
                return self
                    .refuse(
                        None,
                        &method,
                        &path,
                        status,
                        "bad-request".into(),
                        e.to_string(),
                        None,
                    )
                    .await;
            }
        };
        if method == "CONNECT" || !target.starts_with(b"/") {
            return self
                .refuse(
                    Some(&info),
                    &method,
                    &path,
                    400,
                    "bad-request".into(),
                    "an intercepted request must use an origin-form target (/path)".into(),
                    None,
                )
                .await;
        }
        // No domain fronting inside an intercepted connection.
        let hosts: Vec<&[u8]> = req.head.values("host").collect();
        let host_ok = hosts.len() == 1
            && std::str::from_utf8(hosts[0]).ok().is_some_and(|h| {
                match crate::authority::parse_authority(h, Some(self.route.port)) {
                    Ok(a) => {
                        a.port == self.route.port
                            && matches!(&a.host, crate::authority::Host::Name(n) if *n == self.host)
                    }
                    Err(_) => false,
                }
            });
        if !host_ok {
            let reason = format!(
                "the Host header must name {} exactly once on an intercepted connection",
                self.host
            );
            return self
                .refuse(
                    Some(&info),
                    &method,
                    &path,
                    403,
                    "host-mismatch".into(),
                    reason,
                    None,
                )
                .await;
        }
        // Method/path rules.
        let mut rule = self.route.rule.clone();
        let policy = self.ctx.policy();
        if let Some(d) = decide_request(policy.network(), &self.host, &method, &path) {
            let v: Verdicted = d.into();
            if v.blocked() {
                let reason = v.reason.unwrap_or_else(|| "blocked".into());
                return self
                    .refuse(Some(&info), &method, &path, 403, v.rule, reason, None)
                    .await;
            }
            rule = v.rule;
        }
        // Budgets.
        let host = self.host.to_string();
        let hit = BudgetHit {
            via: self.via,
            host: Some(host.clone()),
            ip: None,
            port: Some(self.route.port),
        };
        match self.session.budget.check_request(&host) {
            RateCheck::Ok => {}
            RateCheck::OverInReport(limit) => {
                self.ctx.budget_refused(self.session, &limit, &hit, true)
            }
            RateCheck::Refused(limit) => {
                self.ctx.budget_refused(self.session, &limit, &hit, false);
                let reason = limit.reason(Some(&host));
                let _ = self.reply(403, &reason, true).await;
                return false;
            }
        }
        // Scan the head as the sandbox wrote it.
        let mut raw_head = target.clone();
        raw_head.push(b'\n');
        for (n, v) in req.head.headers() {
            raw_head.extend_from_slice(n);
            raw_head.push(b':');
            raw_head.extend_from_slice(v);
            raw_head.push(b'\n');
        }
        // Honey tokens of the detection engine (`[detect.canary]`), in the decrypted head.
        if self
            .ctx
            .canary_in(self.session, &raw_head, "intercepted request head")
        {
            let reason = "a canary credential was in the request".to_owned();
            return self
                .refuse(
                    Some(&info),
                    &method,
                    &path,
                    403,
                    "detect.canary".into(),
                    reason,
                    None,
                )
                .await;
        }
        if let Some(f) = self.rt.head.find(&raw_head) {
            let reason = format!("blocked by outbound scanning: {}", alert_reason(&f));
            return self
                .refuse(
                    Some(&info),
                    &method,
                    &path,
                    403,
                    alert_rule(&f),
                    reason,
                    Some(&f),
                )
                .await;
        }
        // Swap credentials in.
        let injected = match creds::inject(&self.rt.cfg.credentials, &self.host, &req, &target) {
            Ok(i) => i,
            Err(name) => {
                let reason = format!(
                    "credential {name} is required for {}: the request does not carry its placeholder",
                    self.host
                );
                return self
                    .refuse(
                        Some(&info),
                        &method,
                        &path,
                        403,
                        format!("credential-required:{name}"),
                        reason,
                        None,
                    )
                    .await;
            }
        };
        let send_target = injected.target.as_deref().unwrap_or(&target);
        self.out.clear();
        h1::write_request_head_mapped(&mut self.out, &req, &info, send_target, None, |i, _, _| {
            injected
                .headers
                .iter()
                .find(|(j, _)| *j == i)
                .map(|(_, v)| v.clone())
        });
        if let Some(f) = self.rt.placeholders.find(&self.out) {
            self.out.clear();
            let reason = format!("blocked: {}", alert_reason(&f));
            return self
                .refuse(
                    Some(&info),
                    &method,
                    &path,
                    403,
                    alert_rule(&f),
                    reason,
                    Some(&f),
                )
                .await;
        }
        let head_out = std::mem::take(&mut self.out);
        if let BodyLen::Length(n) = info.body {
            if n > self.rt.cfg.max_scan_bytes {
                let f = Finding::too_large(self.rt.cfg.max_scan_bytes);
                return self
                    .refuse(
                        Some(&info),
                        &method,
                        &path,
                        413,
                        alert_rule(&f),
                        f.pattern.clone(),
                        None,
                    )
                    .await;
            }
        }
        // A small body is read and scanned before the request goes anywhere.
        let has_body = !matches!(info.body, BodyLen::Empty | BodyLen::Length(0));
        let mut continued = false;
        let mut preread: Option<BytesMut> = None;
        if let BodyLen::Length(n) = info.body {
            if n > 0 && n <= PREREAD_MAX {
                let n = n as usize;
                if info.expect_continue && self.buf.len() < n {
                    if self
                        .client
                        .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return false;
                    }
                    let _ = self.client.flush().await;
                    continued = true;
                }
                while self.buf.len() < n {
                    match fill(&mut self.client, &mut self.buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(_) => {}
                    }
                }
                let body = self.buf.split_to(n);
                if self
                    .ctx
                    .canary_in(self.session, &body, "intercepted request body")
                {
                    let reason = "a canary credential was in the request".to_owned();
                    return self
                        .refuse(
                            Some(&info),
                            &method,
                            &path,
                            403,
                            "detect.canary".into(),
                            reason,
                            None,
                        )
                        .await;
                }
                let mut scan = Stream::new(&self.rt.body, self.rt.cfg.max_scan_bytes, false);
                if let Some(f) = scan.push(&body).and_then(|_| scan.finish()).err() {
                    let reason = format!("blocked by outbound scanning: {}", alert_reason(&f));
                    return self
                        .refuse(
                            Some(&info),
                            &method,
                            &path,
                            403,
                            alert_rule(&f),
                            reason,
                            Some(&f),
                        )
                        .await;
                }
                preread = Some(body);
            }
        }
        // Upstream.
        if self.upstream.as_ref().is_some_and(|u| !u.buf.is_empty()) {
            self.upstream = None;
        }
        if self.upstream.is_none() {
            match self.connect().await {
                Ok(up) => self.upstream = Some(up),
                Err((rule, reason)) => {
                    let mut e = self.event(EventKind::Blocked, Verdict::Block, &method, &path);
                    e.rule = rule;
                    e.reason = Some(reason.clone());
                    self.ctx.emit(self.session, e);
                    let _ = self.reply(502, &reason, true).await;
                    return false;
                }
            }
        }
        let Some(mut up) = self.upstream.take() else {
            return false;
        };
        let before = up.counters.snapshot();
        let mut event = self.event(EventKind::HttpRequest, self.route.verdict, &method, &path);
        event.ip = Some(up.addr.ip());
        event.rule = rule;
        if !injected.used.is_empty() {
            event.reason = Some(format!("credential {} injected", injected.used.join(",")));
        }
        let finish =
            |ctx: &Ctx, session: &Session, mut e: NetEvent, up: &Upstream, note: Option<String>| {
                let after = up.counters.snapshot();
                e.bytes_up = after.0 - before.0;
                e.bytes_down = after.1 - before.1;
                e.duration_ms = elapsed_ms(start);
                if let Some(n) = note {
                    e.reason = Some(match e.reason.take() {
                        Some(r) => format!("{r}; {n}"),
                        None => n,
                    });
                }
                ctx.emit(session, e);
            };

        // Request: head, then the body through the scanner.
        if let Err(e) = up.tls.write_all(&head_out).await {
            let reason = format!("upstream request failed: {e}");
            finish(self.ctx, self.session, event, &up, Some(reason.clone()));
            let _ = self.reply(502, &reason, true).await;
            return false;
        }
        if has_body
            && info.expect_continue
            && !continued
            && preread.is_none()
            && self.buf.is_empty()
        {
            if self
                .client
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
            {
                return false;
            }
            let _ = self.client.flush().await;
        }
        let mut scan = Stream::new(&self.rt.body, self.rt.cfg.max_scan_bytes, false);
        let sent = match &preread {
            Some(body) => match up.tls.write_all(body).await {
                Ok(()) => up.tls.flush().await.map_err(BodyError::Dst),
                Err(e) => Err(BodyError::Dst(e)),
            },
            None => {
                relay_body(
                    &mut self.client,
                    &mut self.buf,
                    &mut up.tls,
                    info.body,
                    info.body == BodyLen::Chunked,
                    Some(&mut scan),
                )
                .await
            }
        };
        match sent {
            Ok(()) => {}
            Err(BodyError::Found(f)) => {
                // The upstream request is cut short mid-body: the connection is dropped, so the
                // server never sees a complete request.
                drop(up);
                event.verdict = Verdict::Block;
                event.kind = EventKind::Blocked;
                event.rule = alert_rule(&f);
                let reason = format!("blocked by outbound scanning: {}", alert_reason(&f));
                event.reason = Some(reason.clone());
                event.duration_ms = elapsed_ms(start);
                alert(
                    self.ctx,
                    self.session,
                    self.via,
                    Some(self.host.to_string()),
                    Some(&method),
                    Some(&path),
                    &f,
                );
                self.ctx.emit(self.session, event);
                let status = if f.kind == Kind::TooLarge { 413 } else { 403 };
                let _ = self.reply(status, &reason, true).await;
                return false;
            }
            Err(BodyError::Src(e)) => {
                finish(
                    self.ctx,
                    self.session,
                    event,
                    &up,
                    Some(format!("request not sent to the end: {e}")),
                );
                return false;
            }
            Err(BodyError::Dst(e)) => {
                let reason = format!("upstream request failed: {e}");
                finish(self.ctx, self.session, event, &up, Some(reason.clone()));
                let _ = self.reply(502, &reason, true).await;
                return false;
            }
        }

        // Response.
        let head_request = method == "HEAD";
        let (resp, rinfo) = loop {
            let mut spans = Vec::new();
            let parsed = h1::parse_response(&mut up.buf, &mut spans).and_then(|r| {
                // Intercepted hosts never get an upgrade: their streams could not be scanned.
                r.map(|r| h1::response_info(&r, head_request, false).map(|i| (r, i)))
                    .transpose()
            });
            match parsed {
                Ok(Some((resp, ri))) if ri.interim => {
                    self.out.clear();
                    h1::write_response_head(
                        &mut self.out,
                        &resp,
                        &ri,
                        BodyLen::Empty,
                        ClientEnd::KeepAlive,
                    );
                    if self.client.write_all(&self.out).await.is_err() {
                        return false;
                    }
                }
                Ok(Some(x)) => break x,
                Ok(None) => match fill(&mut up.tls, &mut up.buf).await {
                    Ok(0) | Err(_) => {
                        let reason = "upstream closed before a response".to_owned();
                        finish(self.ctx, self.session, event, &up, Some(reason.clone()));
                        let _ = self.reply(502, &reason, true).await;
                        return false;
                    }
                    Ok(_) => {}
                },
                Err(e) => {
                    let reason = format!("bad upstream response: {e}");
                    finish(self.ctx, self.session, event, &up, Some(reason.clone()));
                    let _ = self.reply(502, &reason, true).await;
                    return false;
                }
            }
        };
        let client_body = match rinfo.body {
            BodyLen::Chunked if req.minor == 0 => BodyLen::UntilClose,
            b => b,
        };
        let close = !info.keep_alive || client_body == BodyLen::UntilClose;
        let end = match (close, req.minor) {
            (true, _) => ClientEnd::Close,
            (false, 0) => ClientEnd::KeepAlive10,
            (false, _) => ClientEnd::KeepAlive,
        };
        self.out.clear();
        h1::write_response_head(&mut self.out, &resp, &rinfo, client_body, end);
        let mut redacted: Vec<String> = Vec::new();
        if let Some(inbound) = &self.rt.inbound {
            redacted = inbound.redact(&mut self.out);
        }
        if self.client.write_all(&self.out).await.is_err() {
            finish(
                self.ctx,
                self.session,
                event,
                &up,
                Some("client gone".into()),
            );
            return false;
        }
        let mut rscan = self
            .rt
            .inbound
            .as_ref()
            .map(|s| Stream::new(s, u64::MAX, /*redact*/ true));
        let relayed = relay_body(
            &mut up.tls,
            &mut up.buf,
            &mut self.client,
            rinfo.body,
            client_body == BodyLen::Chunked,
            rscan.as_mut(),
        )
        .await;
        if let Some(s) = &rscan {
            for name in s.redacted() {
                if !redacted.contains(name) {
                    redacted.push(name.clone());
                }
            }
        }
        for name in &redacted {
            let f = Finding {
                kind: Kind::Secret,
                pattern: name.clone(),
            };
            let mut e = self.event(EventKind::Alert, Verdict::Block, &method, &path);
            e.rule = format!("response-redacted:{name}");
            e.reason = Some(format!(
                "the response carried a credential's real value ({}); it was redacted before the sandbox saw it",
                f.pattern
            ));
            self.ctx.emit(self.session, e);
        }
        let note = (!redacted.is_empty()).then(|| format!("redacted {}", redacted.join(",")));
        match relayed {
            Ok(()) => {
                finish(self.ctx, self.session, event, &up, note);
                if rinfo.reusable && up.buf.is_empty() && !close {
                    self.upstream = Some(up);
                }
                !close
            }
            Err(BodyError::Src(e)) => {
                finish(
                    self.ctx,
                    self.session,
                    event,
                    &up,
                    Some(format!("response aborted: {e}")),
                );
                false
            }
            Err(BodyError::Dst(e)) => {
                finish(
                    self.ctx,
                    self.session,
                    event,
                    &up,
                    Some(format!("response not read to the end: {e}")),
                );
                false
            }
            Err(BodyError::Found(f)) => {
                finish(self.ctx, self.session, event, &up, Some(f.pattern));
                false
            }
        }
    }

    /// Opens the verified TLS connection upstream. `Err`: (rule, reason) of the refusal.
    async fn connect(&mut self) -> Result<Upstream, (String, String)> {
        let (tcp, addr) = route::connect(&self.route, self.ctx.shared.timeouts.connect)
            .await
            .map_err(|e| {
                (
                    "upstream-error".to_owned(),
                    format!("cannot connect to {}:{}: {e}", self.host, self.route.port),
                )
            })?;
        let meter = Meter::new(MeterTarget {
            ctx: self.ctx.clone(),
            session: self.session.clone(),
            hit: BudgetHit {
                via: self.via,
                host: Some(self.host.to_string()),
                ip: Some(addr.ip()),
                port: Some(self.route.port),
            },
        });
        let counters = meter.counters();
        let name = ServerName::try_from(self.host.to_string()).map_err(|e| {
            (
                "upstream-tls".to_owned(),
                format!("{} is not a TLS server name: {e}", self.host),
            )
        })?;
        let connector = TlsConnector::from(self.rt.cfg.upstream.clone());
        let handshake = connector.connect(name, Metered { inner: tcp, meter });
        let tls = tokio::time::timeout(self.ctx.shared.timeouts.connect, handshake)
            .await
            .map_err(|_| {
                (
                    "upstream-tls".to_owned(),
                    format!("TLS handshake with {} timed out", self.host),
                )
            })?
            .map_err(|e| {
                (
                    "upstream-tls".to_owned(),
                    format!(
                        "{} failed TLS verification ({e}); the request was not sent",
                        self.host
                    ),
                )
            })?;
        Ok(Upstream {
            tls,
            addr,
            buf: BytesMut::with_capacity(16 * 1024),
            counters,
        })
    }
}

/// Plain HTTP (proxy or captured): the method/path rules and the leak check of the head. `None`:
/// the request may go on.
pub(crate) fn check_plain(
    ctx: &Ctx,
    session: &Session,
    via: Via,
    dest: &Dest,
    req: &RequestHead,
    path: &str,
) -> Option<(u16, String)> {
    let method = req.method();
    if let Some(rt) = ctx.shared.intercept.as_deref() {
        let mut raw = req.target().to_vec();
        raw.push(b'\n');
        for (n, v) in req.head.headers() {
            raw.extend_from_slice(n);
            raw.push(b':');
            raw.extend_from_slice(v);
            raw.push(b'\n');
        }
        if let Some(f) = rt.leak_in(&raw) {
            let host = Some(dest.to_host_string());
            alert(
                ctx,
                session,
                via,
                host.clone(),
                Some(method),
                Some(path),
                &f,
            );
            let reason = format!("blocked: {} (plain HTTP)", alert_reason(&f));
            let mut e = NetEvent::new(EventKind::Blocked, &session.info, via, Verdict::Block);
            e.host = host;
            e.method = Some(method.to_owned());
            e.path = Some(cut_path(path));
            e.rule = alert_rule(&f);
            e.reason = Some(reason.clone());
            ctx.emit(session, e);
            return Some((403, reason));
        }
    }
    let name = dest.name()?;
    let d = decide_request(ctx.policy().network(), name, method, path)?;
    let v: Verdicted = d.into();
    if !v.blocked() {
        return None;
    }
    let reason = v.reason.clone().unwrap_or_else(|| "blocked".into());
    let mut e = NetEvent::new(EventKind::Blocked, &session.info, via, Verdict::Block);
    e.host = Some(name.to_string());
    e.method = Some(method.to_owned());
    e.path = Some(cut_path(path));
    e.rule = v.rule;
    e.reason = Some(reason.clone());
    ctx.emit(session, e);
    Some((403, reason))
}
