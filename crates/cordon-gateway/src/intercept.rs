//! TLS interception: HTTPS to the hosts the session intercepts is terminated by the gateway,
//! decided request by request, scanned, has its credentials swapped in, and is re-encrypted to
//! the real server.
//!
//! Guarantees:
//! - Only hosts in [`InterceptConfig::hosts`] are intercepted, only when the connection's
//!   destination is that host by name (CONNECT target, or the synthetic address DNS gave out),
//!   and only after the ClientHello's SNI was checked against it. The gateway's own TLS server
//!   terminates the handshake, so a second ClientHello after a HelloRetryRequest is read by it,
//!   never by the real server: the upstream connection goes to the route's host whatever the
//!   retried hello names (unlike a tunnel, which must inspect it, see `crate::tunnel`). A connection to an intercepted
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
//! - Responses are scanned for the session's secret values in every form a client could decode
//!   (as is, base64 at any alignment, percent-encoded, JSON-escaped: `LiveCredential::echo_forms`),
//!   which are redacted (same length) in the head (interim `1xx` heads too) and the body before
//!   the sandbox sees them, with an `Alert`. A host that holds a credential is asked for `Accept-Encoding: identity`, and a
//!   response from it with any `Content-Encoding` is refused (`502`, rule `response-encoded`):
//!   compressed bytes would carry the secret past the scan.
//! - Each request produces one `HttpRequest` event (method, path, bytes, the credentials used by
//!   name) or one `Blocked` event (rule `abandoned` when the client leaves after the decision,
//!   before anything of the request went upstream).
//! - HTTP/1.1 and HTTP/2: the leaf offers `h2` and `http/1.1` by ALPN. A client that picks `h2`
//!   is served by `intercept_h2`, where every stream is one request held to each guarantee
//!   above through the same [`Scope`] (decision, scans, swap, events); the HTTP/1.1 loop here
//!   goes upstream over HTTP/1.1 only, exactly as before.

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
pub(crate) const PREREAD_MAX: u64 = 1024 * 1024;

/// Interception state for the gateway's life: the configuration and its compiled scanners.
pub(crate) struct Runtime {
    pub cfg: Arc<InterceptConfig>,
    /// Request heads before the swap: secret values, canaries, formats.
    head: Arc<Scanner>,
    /// Request heads after the swap: placeholders.
    placeholders: Arc<Scanner>,
    /// Request bodies: all of the above.
    body: Arc<Scanner>,
    /// Responses: secret values (redacted).
    inbound: Option<Arc<Scanner>>,
    /// Upstream TLS for HTTP/2 clients: `cfg.upstream` offering `h2` and `http/1.1` by ALPN
    /// (the HTTP/1.1 path keeps `cfg.upstream`, which offers only `http/1.1`).
    pub upstream_h2: Arc<rustls::ClientConfig>,
}

impl Runtime {
    /// `canaries`: the detection engine's honey tokens (`GatewayConfig::canaries`), also looked
    /// for in streamed bodies, where the engine's own check does not reach.
    pub fn new(cfg: Arc<InterceptConfig>, canaries: &[crate::detect::canary::Canary]) -> Runtime {
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
            .map(|c| {
                (
                    Kind::Canary,
                    format!("canary:{}", c.source.pattern_name()),
                    c.token.as_bytes().to_vec(),
                )
            })
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
        // Responses: every decodable form of each secret (base64, percent-encoding, JSON).
        let echoes: Vec<_> = cfg
            .credentials
            .iter()
            .flat_map(|c| {
                let name = format!("secret:{}", c.spec.name);
                c.echo_forms()
                    .into_iter()
                    .map(move |f| (Kind::Secret, name.clone(), f))
            })
            .collect();
        let inbound =
            (!echoes.is_empty()).then(|| Arc::new(Scanner::new(echoes, /*formats*/ false)));
        Runtime {
            head: Arc::new(head),
            placeholders: Arc::new(Scanner::new(placeholders, /*formats*/ false)),
            body: Arc::new(body),
            inbound,
            upstream_h2: crate::tls::offering_h2(&cfg.upstream),
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
pub(crate) struct Metered {
    inner: TcpStream,
    meter: Meter,
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let want = buf.remaining();
        let allowed = match self.meter.reserve(ByteDirection::In, want) {
            Ok(n) => n,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let this = &mut *self;
        if allowed == want {
            // The usual case: the budget grants all, and the read goes straight into `buf`.
            let before = buf.filled().len();
            let res = Pin::new(&mut this.inner).poll_read(cx, buf);
            let got = match res {
                Poll::Ready(Ok(())) => buf.filled().len() - before,
                _ => 0,
            };
            this.meter.settle(ByteDirection::In, allowed, got);
            return res;
        }
        // The budget grants less: read at most that through a scratch buffer.
        let mut tmp = vec![0u8; allowed];
        let mut rb = ReadBuf::new(&mut tmp);
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
pub(crate) type UpstreamTls = tokio_rustls::client::TlsStream<Metered>;

/// An upstream connection, verified, with its byte counters.
pub(crate) struct Verified {
    pub tls: UpstreamTls,
    pub addr: SocketAddr,
    pub counters: Arc<crate::io::Counters>,
}

struct Upstream {
    tls: UpstreamTls,
    addr: SocketAddr,
    buf: BytesMut,
    counters: Arc<crate::io::Counters>,
}

/// One intercepted connection: what each of its requests is decided against, whichever
/// protocol (HTTP/1.1 here, HTTP/2 in `intercept_h2`) carries them.
pub(crate) struct Scope {
    pub ctx: Arc<Ctx>,
    pub rt: Arc<Runtime>,
    pub session: Arc<Session>,
    pub via: Via,
    /// The host the connection was intercepted for (its SNI and destination).
    pub host: HostName,
    pub route: Route,
    /// A credential of this session is bound to `host` (so its secret may come back in a
    /// response): such a host is asked for unencoded responses. Fixed for the connection.
    pub holds_secret: bool,
}

/// A request head as either protocol delivers it, before anything is swapped in.
pub(crate) struct HeadView<'a> {
    pub method: &'a str,
    /// The target as the client sent it (origin form: path and query).
    pub target: &'a [u8],
    /// HTTP/2's `:authority`; `None` on HTTP/1.1, where `Host` is the only authority.
    pub authority: Option<&'a [u8]>,
    /// Every header field, in order (HTTP/2: no pseudo-header).
    pub headers: &'a [(&'a [u8], &'a [u8])],
}

/// A request that passed the head checks: the rule that allowed it and the credential swap.
pub(crate) struct Admitted {
    pub rule: String,
    pub injected: creds::Injected,
}

/// The rule of a response refused for its content coding (see [`Scope::unscannable_coding`]).
pub(crate) const RESPONSE_ENCODED: &str = "response-encoded";
/// The rule of a request's `Blocked` event when the client left after the decision but before
/// the request went upstream.
pub(crate) const ABANDONED: &str = "abandoned";

/// Why a request is refused.
pub(crate) enum Refusal {
    /// Recorded by [`Scope::record`] (a `Blocked` event, and an `Alert` for a finding); the
    /// client gets `status` with the reason.
    Request {
        status: u16,
        rule: String,
        reason: String,
        finding: Option<Finding>,
    },
    /// A budget refusal, already recorded by the budget code: the client gets `403`.
    Budget { reason: String },
}

impl Refusal {
    pub fn new(status: u16, rule: impl Into<String>, reason: impl Into<String>) -> Refusal {
        Refusal::Request {
            status,
            rule: rule.into(),
            reason: reason.into(),
            finding: None,
        }
    }

    /// A scanning finding: `413` for a body over the scan limit, `403` otherwise.
    pub fn finding(f: Finding) -> Refusal {
        let status = if f.kind == Kind::TooLarge { 413 } else { 403 };
        Refusal::Request {
            status,
            rule: alert_rule(&f),
            reason: format!("blocked by outbound scanning: {}", alert_reason(&f)),
            finding: Some(f),
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Refusal::Request { status, .. } => *status,
            Refusal::Budget { .. } => 403,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Refusal::Request { reason, .. } | Refusal::Budget { reason } => reason,
        }
    }
}

/// `target` and every header as `name:value` lines: what the head scanners look at.
fn scan_text<'a>(target: &[u8], headers: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Vec<u8> {
    let mut raw = target.to_vec();
    raw.push(b'\n');
    for (n, v) in headers {
        raw.extend_from_slice(n);
        raw.push(b':');
        raw.extend_from_slice(v);
        raw.push(b'\n');
    }
    raw
}

impl Scope {
    /// A request event for this connection.
    pub fn event(&self, kind: EventKind, verdict: Verdict, method: &str, path: &str) -> NetEvent {
        let mut e = NetEvent::new(kind, &self.session.info, self.via, verdict);
        e.host = Some(self.host.to_string());
        e.port = Some(self.route.port);
        e.method = Some(method.to_owned());
        e.path = Some(cut_path(path));
        e
    }

    /// Records a refusal: a `Blocked` event, preceded by an `Alert` for a finding. A budget
    /// refusal was recorded when it was decided.
    pub fn record(&self, method: &str, path: &str, refusal: &Refusal) {
        let e = self.event(EventKind::Blocked, Verdict::Block, method, path);
        self.record_as(e, method, path, refusal);
    }

    /// Like [`Scope::record`], turning `e` (a request's event, with what it already counted)
    /// into the `Blocked` event.
    pub fn record_as(&self, mut e: NetEvent, method: &str, path: &str, refusal: &Refusal) {
        let Refusal::Request {
            rule,
            reason,
            finding,
            ..
        } = refusal
        else {
            return;
        };
        if let Some(f) = finding {
            alert(
                &self.ctx,
                &self.session,
                self.via,
                Some(self.host.to_string()),
                Some(method),
                Some(path),
                f,
            );
        }
        e.kind = EventKind::Blocked;
        e.verdict = Verdict::Block;
        e.rule = rule.clone();
        e.reason = Some(reason.clone());
        self.ctx.emit(&self.session, e);
    }

    /// A finding in a streamed request body: a honey token there is the canary rule's too,
    /// with its response (the detection engine's own check reads only heads and pre-read
    /// bodies).
    pub fn streamed_body_finding(&self, f: &Finding) {
        if let (Kind::Canary, Some(name)) = (&f.kind, f.pattern.strip_prefix("canary:")) {
            self.ctx
                .canary_seen(&self.session, name, "intercepted request body");
        }
    }

    /// Records an `Alert` for each credential whose real value was redacted from a response.
    pub fn record_redactions(&self, method: &str, path: &str, names: &[String]) {
        for name in names {
            let mut e = self.event(EventKind::Alert, Verdict::Block, method, path);
            e.rule = format!("response-redacted:{name}");
            e.reason = Some(format!(
                "the response carried a credential's real value ({name}); it was redacted before the sandbox saw it"
            ));
            self.ctx.emit(&self.session, e);
        }
    }

    /// Whether `authority` (a `Host` value or `:authority`) names this connection's host and
    /// port exactly.
    fn names_this_host(&self, authority: &[u8]) -> bool {
        std::str::from_utf8(authority).ok().is_some_and(
            |h| match crate::authority::parse_authority(h, Some(self.route.port)) {
                Ok(a) => {
                    a.port == self.route.port
                        && matches!(&a.host, crate::authority::Host::Name(n) if *n == self.host)
                }
                Err(_) => false,
            },
        )
    }

    /// The checks on a request head, in order: origin-form target, no domain fronting, the
    /// method/path rules, the budgets, the head scan as the sandbox wrote it, and the credential
    /// swap (with `require`). Nothing is recorded for a refusal: the caller does, with
    /// [`Scope::record`], once it knows how it answers.
    pub fn admit(&self, head: &HeadView<'_>) -> Result<Admitted, Refusal> {
        let method = head.method;
        let path = String::from_utf8_lossy(head.target);
        if method == "CONNECT" || !head.target.starts_with(b"/") {
            return Err(Refusal::new(
                400,
                "bad-request",
                "an intercepted request must use an origin-form target (/path)",
            ));
        }
        // No domain fronting inside an intercepted connection: HTTP/1.1 names the host in
        // exactly one `Host`; HTTP/2 in `:authority`, and a `Host` beside it must agree.
        let hosts: Vec<&[u8]> = head
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"host"))
            .map(|(_, v)| *v)
            .collect();
        let host_ok = match head.authority {
            None => hosts.len() == 1 && self.names_this_host(hosts[0]),
            Some(a) => {
                hosts.len() <= 1 && hosts.iter().chain([&a]).all(|h| self.names_this_host(h))
            }
        };
        if !host_ok {
            let which = if head.authority.is_some() {
                "the :authority (and any Host header)"
            } else {
                "the Host header"
            };
            return Err(Refusal::new(
                403,
                "host-mismatch",
                format!(
                    "{which} must name {} exactly once on an intercepted connection",
                    self.host
                ),
            ));
        }
        // Method/path rules.
        let mut rule = self.route.rule.clone();
        if let Some(d) = decide_request(self.ctx.policy().network(), &self.host, method, &path) {
            let v: Verdicted = d.into();
            if v.blocked() {
                let reason = v.reason.unwrap_or_else(|| "blocked".into());
                return Err(Refusal::new(403, v.rule, reason));
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
                self.ctx.budget_refused(&self.session, &limit, &hit, true)
            }
            RateCheck::Refused(limit) => {
                self.ctx.budget_refused(&self.session, &limit, &hit, false);
                return Err(Refusal::Budget {
                    reason: limit.reason(Some(&host)),
                });
            }
        }
        // Scan the head as the sandbox wrote it.
        let raw_head = scan_text(head.target, head.headers.iter().copied());
        // Honey tokens of the detection engine (`[detect.canary]`), in the decrypted head.
        if self
            .ctx
            .canary_in(&self.session, &raw_head, "intercepted request head")
        {
            return Err(Refusal::new(
                403,
                "detect.canary",
                "a canary credential was in the request",
            ));
        }
        if let Some(f) = self.rt.head.find(&raw_head) {
            return Err(Refusal::finding(f));
        }
        // Swap credentials in.
        let injected = creds::inject(
            &self.rt.cfg.credentials,
            &self.host,
            head.headers,
            head.target,
        )
        .map_err(|name| {
            Refusal::new(
                403,
                format!("credential-required:{name}"),
                format!(
                    "credential {name} is required for {}: the request does not carry its placeholder",
                    self.host
                ),
            )
        })?;
        Ok(Admitted { rule, injected })
    }

    /// The head that will go upstream (after the swap), as `target` and headers: a placeholder
    /// left in it is going where its credential does not go.
    pub fn check_swapped<'a>(
        &self,
        target: &[u8],
        headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<(), Refusal> {
        self.check_swapped_raw(&scan_text(target, headers))
    }

    fn check_swapped_raw(&self, raw: &[u8]) -> Result<(), Refusal> {
        match self.rt.placeholders.find(raw) {
            Some(f) => Err(Refusal::Request {
                status: 403,
                rule: alert_rule(&f),
                reason: format!("blocked: {}", alert_reason(&f)),
                finding: Some(f),
            }),
            None => Ok(()),
        }
    }

    /// Header fields that go upstream as they are (request trailers): every body pattern.
    pub fn check_fields<'a>(
        &self,
        fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<(), Finding> {
        match self.rt.body.find(&scan_text(b"", fields)) {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    /// A declared body length over the scan limit is refused before any of it is read.
    pub fn check_length(&self, len: u64) -> Result<(), Refusal> {
        if len <= self.rt.cfg.max_scan_bytes {
            return Ok(());
        }
        let f = Finding::too_large(self.rt.cfg.max_scan_bytes);
        Err(Refusal::new(413, alert_rule(&f), f.pattern))
    }

    /// A whole (pre-read) body: the detection engine's honey tokens, then every scanner.
    pub fn check_body(&self, body: &[u8]) -> Result<(), Refusal> {
        if self
            .ctx
            .canary_in(&self.session, body, "intercepted request body")
        {
            return Err(Refusal::new(
                403,
                "detect.canary",
                "a canary credential was in the request",
            ));
        }
        let mut scan = self.body_scan();
        match scan.push(body).and_then(|_| scan.finish()) {
            Ok(_) => Ok(()),
            Err(f) => Err(Refusal::finding(f)),
        }
    }

    /// A streaming scan of one request body (limit: the scan limit).
    pub fn body_scan(&self) -> Stream {
        Stream::new(self.rt.body.clone(), self.rt.cfg.max_scan_bytes, false)
    }

    /// Why a response whose `Content-Encoding` values (and transfer codings other than
    /// `chunked`, which HTTP/2 relays decoded of the chunking only) are `content_encoding` must
    /// not be relayed: the host holds a credential and the coding is not `identity`, and compressed
    /// bytes would carry an echoed secret past the redaction. Such a response is answered `502`
    /// and its event gets rule [`RESPONSE_ENCODED`].
    pub fn unscannable_coding<'v>(
        &self,
        content_encoding: impl Iterator<Item = &'v [u8]>,
    ) -> Option<String> {
        if self.rt.inbound.is_none() || !self.holds_secret {
            return None;
        }
        let codings: Vec<String> = content_encoding
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|c| String::from_utf8_lossy(c.trim_ascii()).to_ascii_lowercase())
            .filter(|c| !c.is_empty() && c != "identity")
            .collect();
        (!codings.is_empty()).then(|| {
            format!(
                "the response from {} has the content or transfer coding {:?}, which cannot \
                 be scanned for the credential it holds; it was not relayed",
                self.host,
                codings.join(", ")
            )
        })
    }

    /// What goes upstream instead of the client's header `name` (any case) on this
    /// connection: `None` keeps it, `Some(None)` drops it, `Some(Some(v))` sends `v`. A host
    /// that holds a credential is asked for unencoded responses (an encoded one cannot be
    /// scanned for the secret) and for whole ones: a `Range` answer could hand back slices of
    /// an echoed secret that no redaction form matches, a few bytes per request.
    pub fn upstream_rewrite(&self, name: &[u8]) -> Option<Option<&'static str>> {
        if !self.holds_secret {
            return None;
        }
        if name.eq_ignore_ascii_case(b"accept-encoding") {
            Some(Some("identity"))
        } else if name.eq_ignore_ascii_case(b"range") || name.eq_ignore_ascii_case(b"if-range") {
            Some(None)
        } else {
            None
        }
    }

    /// A streaming redaction of one response body, when the session has secrets.
    pub fn response_scan(&self) -> Option<Stream> {
        self.rt
            .inbound
            .as_ref()
            .map(|s| Stream::new(s.clone(), u64::MAX, /*redact*/ true))
    }

    /// Redacts the session's secret values in `data`; returns the credentials redacted.
    pub fn redact(&self, data: &mut [u8]) -> Vec<String> {
        match &self.rt.inbound {
            Some(s) => s.redact(data),
            None => Vec::new(),
        }
    }

    /// Opens the verified TLS connection upstream with `config` (its ALPN offer decides the
    /// protocols). `Err`: (rule, reason) of the refusal.
    pub async fn connect(
        &self,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<Verified, (String, String)> {
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
        let connector = TlsConnector::from(config);
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
        Ok(Verified {
            tls,
            addr,
            counters,
        })
    }
}

struct Conn<'a> {
    s: &'a Scope,
    client: ClientTls,
    buf: BytesMut,
    out: Vec<u8>,
    upstream: Option<Upstream>,
}

/// Serves an intercepted connection: `first` holds the ClientHello already read, `peek` what it
/// said. Records its own events. A client that picks `h2` by ALPN is served by
/// `intercept_h2`; any other by the HTTP/1.1 loop here.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    ctx: &Arc<Ctx>,
    rt: Arc<Runtime>,
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
    let holds_secret = rt.cfg.credentials.iter().any(|c| c.spec.bound_to(&host));
    let scope = Scope {
        ctx: ctx.clone(),
        rt,
        session: session.clone(),
        via,
        host,
        route,
        holds_secret,
    };
    if client.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
        crate::intercept_h2::serve(Arc::new(scope), client).await;
        return;
    }
    let mut conn = Conn {
        s: &scope,
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
    mut scan: Option<&mut Stream>,
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
    let pass = |data: &[u8], scan: &mut Option<&mut Stream>| -> Result<Vec<u8>, BodyError> {
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

    /// Refuses a request: records it, answers, and says whether the connection may go on.
    async fn refuse(
        &mut self,
        info: Option<&RequestInfo>,
        method: &str,
        path: &str,
        refusal: Refusal,
    ) -> bool {
        self.s.record(method, path, &refusal);
        let close = match (info, &refusal) {
            (_, Refusal::Budget { .. }) | (None, _) => true,
            (Some(i), _) => !i.keep_alive || !matches!(i.body, BodyLen::Empty | BodyLen::Length(0)),
        };
        self.reply(refusal.status(), refusal.reason(), close)
            .await
            .is_ok()
            && !close
    }

    /// Handles one request; `true` to keep the connection.
    async fn request(&mut self, req: RequestHead) -> bool {
        let start = Instant::now();
        let s = self.s;
        let method = req.method().to_owned();
        let target = req.target().to_vec();
        let path = String::from_utf8_lossy(&target).into_owned();
        let info = match h1::request_info(&req) {
            Ok(i) => i,
            Err(e) => {
                let r = Refusal::new(e.status(), "bad-request", e.to_string());
                return self.refuse(None, &method, &path, r).await;
            }
        };
        let headers: Vec<(&[u8], &[u8])> = req.head.headers().collect();
        let view = HeadView {
            method: &method,
            target: &target,
            authority: None,
            headers: &headers,
        };
        let Admitted { rule, injected } = match s.admit(&view) {
            Ok(a) => a,
            Err(r) => return self.refuse(Some(&info), &method, &path, r).await,
        };
        let send_target = injected.target.as_deref().unwrap_or(&target);
        self.out.clear();
        h1::write_request_head_mapped(&mut self.out, &req, &info, send_target, None, |i, n, _| {
            if let Some((_, v)) = injected.headers.iter().find(|(j, _)| *j == i) {
                return h1::HeaderOut::Value(v.clone());
            }
            match s.upstream_rewrite(n) {
                None => h1::HeaderOut::Same,
                Some(None) => h1::HeaderOut::Skip,
                Some(Some(v)) => h1::HeaderOut::Value(v.as_bytes().to_vec()),
            }
        });
        if let Err(r) = s.check_swapped_raw(&self.out) {
            self.out.clear();
            return self.refuse(Some(&info), &method, &path, r).await;
        }
        let head_out = std::mem::take(&mut self.out);
        if let BodyLen::Length(n) = info.body {
            if let Err(r) = s.check_length(n) {
                return self.refuse(Some(&info), &method, &path, r).await;
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
                        s.record(&method, &path, &abandoned());
                        return false;
                    }
                    let _ = self.client.flush().await;
                    continued = true;
                }
                while self.buf.len() < n {
                    match fill(&mut self.client, &mut self.buf).await {
                        Ok(0) | Err(_) => {
                            // Decided (and charged), never sent: still one event.
                            s.record(&method, &path, &abandoned());
                            return false;
                        }
                        Ok(_) => {}
                    }
                }
                let body = self.buf.split_to(n);
                if let Err(r) = s.check_body(&body) {
                    return self.refuse(Some(&info), &method, &path, r).await;
                }
                preread = Some(body);
            }
        }
        // Upstream.
        if self.upstream.as_ref().is_some_and(|u| !u.buf.is_empty()) {
            self.upstream = None;
        }
        if self.upstream.is_none() {
            match s.connect(s.rt.cfg.upstream.clone()).await {
                Ok(v) => {
                    self.upstream = Some(Upstream {
                        tls: v.tls,
                        addr: v.addr,
                        buf: BytesMut::with_capacity(16 * 1024),
                        counters: v.counters,
                    })
                }
                Err((rule, reason)) => {
                    let mut e = s.event(EventKind::Blocked, Verdict::Block, &method, &path);
                    e.rule = rule;
                    e.reason = Some(reason.clone());
                    s.ctx.emit(&s.session, e);
                    let _ = self.reply(502, &reason, true).await;
                    return false;
                }
            }
        }
        let Some(mut up) = self.upstream.take() else {
            return false;
        };
        let before = up.counters.snapshot();
        let mut event = s.event(EventKind::HttpRequest, s.route.verdict, &method, &path);
        event.ip = Some(up.addr.ip());
        event.rule = rule;
        if !injected.used.is_empty() {
            event.reason = Some(format!("credential {} injected", injected.used.join(",")));
        }
        let finish = |mut e: NetEvent, up: &Upstream, note: Option<String>| {
            let after = up.counters.snapshot();
            e.bytes_up = after.0 - before.0;
            e.bytes_down = after.1 - before.1;
            e.duration_ms = elapsed_ms(start);
            add_note(&mut e, note);
            s.ctx.emit(&s.session, e);
        };

        // Request: head, then the body through the scanner.
        if let Err(e) = up.tls.write_all(&head_out).await {
            let reason = format!("upstream request failed: {e}");
            finish(event, &up, Some(reason.clone()));
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
                finish(event, &up, Some("client gone".into()));
                return false;
            }
            let _ = self.client.flush().await;
        }
        let mut scan = s.body_scan();
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
                let r = Refusal::finding(f.clone());
                event.duration_ms = elapsed_ms(start);
                s.record_as(event, &method, &path, &r);
                s.streamed_body_finding(&f);
                let _ = self.reply(r.status(), r.reason(), true).await;
                return false;
            }
            Err(BodyError::Src(e)) => {
                finish(
                    event,
                    &up,
                    Some(format!("request not sent to the end: {e}")),
                );
                return false;
            }
            Err(BodyError::Dst(e)) => {
                let reason = format!("upstream request failed: {e}");
                finish(event, &up, Some(reason.clone()));
                let _ = self.reply(502, &reason, true).await;
                return false;
            }
        }

        // Response.
        let head_request = method == "HEAD";
        // Interim heads (`103 Early Hints` with its `Link`s) are redacted like the final one.
        let mut interim_redacted = Vec::new();
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
                    merge_names(&mut interim_redacted, &s.redact(&mut self.out));
                    if self.client.write_all(&self.out).await.is_err() {
                        s.record_redactions(&method, &path, &interim_redacted);
                        finish(event, &up, Some("client gone".into()));
                        return false;
                    }
                }
                Ok(Some(x)) => break x,
                Ok(None) => match fill(&mut up.tls, &mut up.buf).await {
                    Ok(0) | Err(_) => {
                        let reason = "upstream closed before a response".to_owned();
                        finish(event, &up, Some(reason.clone()));
                        let _ = self.reply(502, &reason, true).await;
                        return false;
                    }
                    Ok(_) => {}
                },
                Err(e) => {
                    let reason = format!("bad upstream response: {e}");
                    finish(event, &up, Some(reason.clone()));
                    let _ = self.reply(502, &reason, true).await;
                    return false;
                }
            }
        };
        if let Some(reason) = s.unscannable_coding(resp.head.values("content-encoding")) {
            // gzip (or any coding) would carry an echoed secret past the redaction: refused.
            event.verdict = Verdict::Block;
            event.rule = RESPONSE_ENCODED.into();
            finish(event, &up, Some(reason.clone()));
            let _ = self.reply(502, &reason, true).await;
            return false;
        }
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
        let mut redacted = interim_redacted;
        merge_names(&mut redacted, &s.redact(&mut self.out));
        if self.client.write_all(&self.out).await.is_err() {
            finish(event, &up, Some("client gone".into()));
            return false;
        }
        let mut rscan = s.response_scan();
        let relayed = relay_body(
            &mut up.tls,
            &mut up.buf,
            &mut self.client,
            rinfo.body,
            client_body == BodyLen::Chunked,
            rscan.as_mut(),
        )
        .await;
        if let Some(r) = &rscan {
            merge_names(&mut redacted, r.redacted());
        }
        s.record_redactions(&method, &path, &redacted);
        let note = (!redacted.is_empty()).then(|| format!("redacted {}", redacted.join(",")));
        match relayed {
            Ok(()) => {
                finish(event, &up, note);
                if rinfo.reusable && up.buf.is_empty() && !close {
                    self.upstream = Some(up);
                }
                !close
            }
            Err(BodyError::Src(e)) => {
                finish(event, &up, Some(format!("response aborted: {e}")));
                false
            }
            Err(BodyError::Dst(e)) => {
                finish(
                    event,
                    &up,
                    Some(format!("response not read to the end: {e}")),
                );
                false
            }
            Err(BodyError::Found(f)) => {
                finish(event, &up, Some(f.pattern));
                false
            }
        }
    }
}

/// The refusal recorded for a request the client left after the decision, before anything of
/// it went upstream.
fn abandoned() -> Refusal {
    Refusal::new(
        400,
        ABANDONED,
        "the client left before the request was sent upstream",
    )
}

/// Appends `note` to the event's reason.
pub(crate) fn add_note(e: &mut NetEvent, note: Option<String>) {
    if let Some(n) = note {
        e.reason = Some(match e.reason.take() {
            Some(r) => format!("{r}; {n}"),
            None => n,
        });
    }
}

/// Adds the names in `more` that `names` does not hold yet.
pub(crate) fn merge_names(names: &mut Vec<String>, more: &[String]) {
    for name in more {
        if !names.contains(name) {
            names.push(name.clone());
        }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::core::testing::meter_with_budget;
    use crate::core::testing::tcp_pair;

    #[tokio::test]
    async fn the_metered_upstream_reads_no_more_than_the_inbound_budget_then_fails() {
        let (mut peer, inner) = tcp_pair().await;
        let (meter, _sink) = meter_with_budget(None, Some(10));
        let counters = meter.counters();
        let mut up = Metered { inner, meter };
        peer.write_all(&[b'x'; 100]).await.unwrap();
        let mut buf = [0u8; 64];
        let mut got = 0;
        loop {
            match up.read(&mut buf).await {
                Ok(0) => panic!("eof before the budget ran out"),
                Ok(n) => got += n,
                Err(e) => {
                    assert!(e.to_string().contains("byte budget exhausted"), "{e}");
                    break;
                }
            }
        }
        assert_eq!(got, 10);
        assert_eq!(counters.snapshot().1, 10);
    }

    #[tokio::test]
    async fn the_metered_upstream_counts_what_it_reads_and_writes() {
        let (mut peer, inner) = tcp_pair().await;
        let (meter, _sink) = meter_with_budget(None, None);
        let counters = meter.counters();
        let mut up = Metered { inner, meter };
        up.write_all(b"hello").await.unwrap();
        let mut five = [0u8; 5];
        peer.read_exact(&mut five).await.unwrap();
        peer.write_all(&[b'y'; 3000]).await.unwrap();
        drop(peer);
        let mut all = Vec::new();
        up.read_to_end(&mut all).await.unwrap();
        assert_eq!(all.len(), 3000);
        assert_eq!(counters.snapshot(), (5, 3000));
    }
}
