//! Byte tunnels: CONNECT through the explicit proxy, and captured non-HTTP TCP.
//!
//! Guarantees:
//! - A tunnel opens only after its destination was decided, resolved and every address checked.
//! - The client's first bytes are inspected before any byte of them goes upstream: a TLS
//!   ClientHello must name (SNI) the host the tunnel was decided for, or the tunnel is closed and
//!   nothing is sent upstream. A ClientHello without SNI is allowed (it cannot front another host
//!   by name); a malformed ClientHello is refused. A first line that is an HTTP request line
//!   (after any empty lines, whatever its method's case or length; see [`looks_like_http`]) is
//!   never tunnelled raw: the caller serves it as HTTP, so its `Host` is checked.
//! - A first line that has not ended when the first-bytes wait does (a client dribbling its
//!   request line, or a long one) is forwarded as it comes, but its line end is held back until
//!   the whole line is seen: if it turns out to be a request line the tunnel is closed
//!   (`late-http`) and the server never receives a complete request line.
//! - A client that says nothing within the first-bytes wait (a server-speaks-first protocol) gets
//!   the upstream connection, and what the server says is relayed, but its own first bytes are
//!   inspected when they come, exactly as above: a ClientHello naming another host is refused, and
//!   an HTTP request is handed back to the caller to be served as HTTP (or refused, `late-http`,
//!   if the server had already spoken). Waiting out the timer never opens a raw tunnel for bytes
//!   that would not have passed at once.
//! - A ClientHello that passed is not followed by a blind splice: until the server's first
//!   handshake message shows whether it is a TLS 1.3 HelloRetryRequest (`crate::hrr`), what the
//!   server says is relayed (metered) and every byte the client sends is held back (bounded; a
//!   client with more to say waits). Not a retry request (a ServerHello, TLS 1.2, an alert, the
//!   server closing): the held bytes go upstream and the tunnel splices. A retry request: the
//!   client's next handshake message (after any `change_cipher_spec` or early-data records) must
//!   be a well-formed ClientHello that passes the same SNI check within the first-bytes wait, or
//!   the tunnel is closed (`sni-mismatch`, `bad-client-hello`, reason "retried ClientHello") and
//!   none of it reaches the server, pipelined before the retry request or not. A ClientHello
//!   sharing its record with more handshake bytes is refused up front (`crate::sni`), and one
//!   sent after the server spoke first is refused (its answer could not be told apart). RFC 8446
//!   allows one retry, so the tunnel splices after the second ClientHello; TLS 1.2
//!   renegotiation is encrypted and not inspected. Intercepted hosts (`crate::intercept`) do
//!   not take this path: the gateway is their TLS server.
//! - Every tunnel produces one `Connection` event at close with the bytes that crossed and its
//!   duration, or one `Blocked` event.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cordon_policy::host::HostName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::authority::parse_authority;
use crate::budget::RateCheck;
use crate::core::{elapsed_ms, BudgetHit, Ctx};
use crate::event::{EventKind, NetEvent, Verdict, Via};
use crate::hrr::{retried_hello, Retried, ServerFirst, ServerHelloScan};
use crate::io::{read_until, relay_down, write_up, Meter, MeterTarget, Relayed};
use crate::policy::{Dest, Verdicted};
use crate::route::{self, dest_for, Route, RouteError};
use crate::session::Session;
use crate::sni::{client_hello_len, peek_client_hello, Peek, SniError, MAX_HANDSHAKE_LEN};
use crate::splice;

/// Most bytes read while looking for a complete ClientHello.
pub(crate) const MAX_PEEK: usize = MAX_HANDSHAKE_LEN + 5 * 8 + 64;

fn blocked(rule: &str, reason: String) -> Verdicted {
    Verdicted {
        verdict: Verdict::Block,
        rule: rule.to_owned(),
        reason: Some(reason),
    }
}

/// An HTTP request line that did not come at once (so it could not be served as HTTP).
fn late_http() -> Verdicted {
    blocked(
        "late-http",
        "an HTTP request line came after the tunnel opened (the client waited, or the server \
         spoke first): send requests at once so their Host can be checked"
            .into(),
    )
}

/// Records a refused tunnel.
pub(crate) fn emit_blocked(
    ctx: &Ctx,
    session: &Session,
    via: Via,
    host: Option<String>,
    ip: Option<IpAddr>,
    port: Option<u16>,
    v: &Verdicted,
) {
    let mut e = NetEvent::new(EventKind::Blocked, &session.info, via, Verdict::Block);
    e.host = host;
    e.ip = ip;
    e.port = port;
    if via == Via::Connect {
        e.method = Some("CONNECT".into());
    }
    e.rule = v.rule.clone();
    e.reason = v.reason.clone();
    ctx.emit(session, e);
}

/// Everything before a tunnel may open: the decision, the budgets, the resolution. `Err` carries
/// the refusal, already recorded, and the HTTP status to answer with.
pub(crate) async fn prepare(
    ctx: &Ctx,
    session: &Session,
    via: Via,
    dest: &Dest,
    port: u16,
) -> Result<Route, (u16, String)> {
    let host = dest.to_host_string();
    let pre = ctx.policy().decide_dest(dest, port);
    if pre.blocked() {
        emit_blocked(ctx, session, via, Some(host), None, Some(port), &pre);
        return Err((403, pre.reason.unwrap_or_default()));
    }
    let hit = BudgetHit {
        via,
        host: Some(host.clone()),
        ip: None,
        port: Some(port),
    };
    match session.budget.check_request(&host) {
        RateCheck::Ok => {}
        RateCheck::OverInReport(limit) => ctx.budget_refused(session, &limit, &hit, true),
        RateCheck::Refused(limit) => {
            ctx.budget_refused(session, &limit, &hit, false);
            return Err((403, limit.reason(Some(&host))));
        }
    }
    if session.budget.enforcing() {
        if let Some(limit) = session.budget.bytes_exhausted() {
            ctx.budget_refused(session, &limit, &hit, false);
            return Err((403, limit.reason(Some(&host))));
        }
    }
    match route::resolve_checked(ctx.policy(), &*ctx.shared.resolver, dest, port, pre).await {
        Ok(route) => Ok(route),
        Err(RouteError::Denied(v, ip)) => {
            emit_blocked(ctx, session, via, Some(host), ip, Some(port), &v);
            Err((403, v.reason.unwrap_or_default()))
        }
        Err(RouteError::Resolve(e)) => {
            let mut ev = NetEvent::new(EventKind::Connection, &session.info, via, Verdict::Allow);
            ev.host = Some(host);
            ev.port = Some(port);
            ev.rule = "upstream-error".into();
            ev.reason = Some(e.to_string());
            ctx.emit(session, ev);
            Err((502, e.to_string()))
        }
    }
}

/// `CONNECT host:port` on the explicit proxy, up to the decision: the target is parsed, decided,
/// budgeted and resolved. `Err`: the refusal (status, reason), already recorded.
pub(crate) async fn prepare_connect(
    ctx: &Ctx,
    session: &Session,
    raw: &str,
) -> Result<Route, (u16, String)> {
    let target = match parse_authority(raw, None) {
        Ok(t) => t,
        Err(e) => {
            let shown: String = raw.chars().take(100).collect();
            let v = blocked(
                "bad-target",
                format!("invalid CONNECT target {shown:?}: {e}"),
            );
            emit_blocked(ctx, session, Via::Connect, Some(shown), None, None, &v);
            return Err((403, v.reason.unwrap_or_else(|| "blocked".into())));
        }
    };
    let dest = dest_for(&target.host, &ctx.shared.synthetic);
    prepare(ctx, session, Via::Connect, &dest, target.port).await
}

/// Answers an allowed CONNECT with 200 and runs the tunnel. `leftover`: bytes the client sent
/// after the CONNECT head (the start of its stream).
pub(crate) async fn run_connect(
    ctx: &Arc<Ctx>,
    session: &Arc<Session>,
    mut client: TcpStream,
    leftover: Vec<u8>,
    route: Route,
) {
    let start = Instant::now();
    // Only the steps before the tunnel are cut short here; the tunnel ends on the token by
    // itself and records its event.
    let opened = async {
        client.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await?;
        peek_first(ctx, &mut client, leftover).await
    };
    let opened = tokio::select! {
        r = opened => r,
        _ = ctx.cancel.cancelled() => return,
    };
    match opened {
        Ok((first, peek)) if matches!(peek, Ok(Peek::NotTls)) && looks_like_http(&first) => {
            // Plain HTTP inside the tunnel is served like captured plain HTTP: every request on
            // it is parsed and decided, and its Host must name the tunnel's destination (no
            // domain fronting through a CONNECT to an allowed host).
            let to = (route.dest.clone(), route.port, Via::Connect);
            crate::http::serve_bound_http(ctx.clone(), session.clone(), to, client, &first, None)
                .await;
        }
        Ok((first, peek)) => {
            if let Some(rt) = ctx.shared.intercept.clone() {
                if let Some(host) = rt.intercepts(&route.dest) {
                    crate::intercept::serve(
                        ctx,
                        rt,
                        session,
                        Via::Connect,
                        client,
                        first,
                        peek,
                        route,
                        host,
                    )
                    .await;
                    return;
                }
            }
            let (dest, port) = (route.dest.clone(), route.port);
            let end = run_tunnel(
                ctx,
                session,
                Via::Connect,
                &mut client,
                first,
                peek,
                route,
                start,
            )
            .await;
            if let TunnelEnd::Http(first) = end {
                let to = (dest, port, Via::Connect);
                crate::http::serve_bound_http(
                    ctx.clone(),
                    session.clone(),
                    to,
                    client,
                    &first,
                    None,
                )
                .await;
            }
        }
        Err(e) => tracing::debug!(error = %e, "CONNECT tunnel did not open"),
    }
}

/// What the client's first bytes say about whether the tunnel may open.
pub(crate) fn check_first_bytes(
    dest: &Dest,
    peek: Result<Peek, SniError>,
) -> Result<(), Verdicted> {
    match peek {
        Ok(Peek::ClientHello { sni: Some(sni) }) => {
            let matches = match (HostName::parse(&sni), dest) {
                (Ok(name), Dest::Name(want)) => name == *want,
                _ => false,
            };
            if matches {
                Ok(())
            } else {
                Err(blocked(
                    "sni-mismatch",
                    format!(
                        "TLS server name {:?} does not match the destination {}",
                        sni.chars().take(100).collect::<String>(),
                        dest.to_host_string()
                    ),
                ))
            }
        }
        Ok(_) => Ok(()),
        Err(e) => Err(blocked(
            "bad-client-hello",
            format!("malformed TLS ClientHello: {e}"),
        )),
    }
}

/// Reads the client's first bytes: until a complete ClientHello, enough to see the stream is not
/// TLS, the cap, EOF, or the first-bytes timeout. Returns the bytes and what they are.
pub(crate) async fn peek_first(
    ctx: &Ctx,
    client: &mut TcpStream,
    initial: Vec<u8>,
) -> std::io::Result<(Vec<u8>, Result<Peek, SniError>)> {
    let mut first = initial;
    read_until(
        client,
        &mut first,
        MAX_PEEK,
        ctx.shared.timeouts.first_bytes,
        |b| !matches!(peek_client_hello(b), Ok(Peek::NeedMore)) && !request_line_undecided(b),
    )
    .await?;
    let peek = match peek_client_hello(&first) {
        // Still incomplete: the client went quiet or hit the cap mid-hello.
        Ok(Peek::NeedMore) if first.first() == Some(&0x16) => {
            Err(SniError::Malformed("incomplete ClientHello"))
        }
        Ok(Peek::NeedMore) => Ok(Peek::NotTls),
        other => other,
    };
    Ok((first, peek))
}

/// RFC 9110 `tchar`: the characters of a method (and of any token).
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// `b` without the empty lines (CR, LF) a server may skip before a request line.
fn skip_empty_lines(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !matches!(c, b'\r' | b'\n'));
    &b[start.unwrap_or(b.len())..]
}

/// True if `line` (no CR or LF) could be the start of an HTTP request line: a token, then
/// printable text.
fn request_line_prefix(line: &[u8]) -> bool {
    let method = line.iter().take_while(|&&c| is_tchar(c)).count();
    method > 0
        && line[method..]
            .iter()
            .all(|&c| c == b' ' || c == b'\t' || c == b'\r' || c >= 0x21)
}

/// Methods that make a line HTTP even without a version (HTTP/0.9 `GET /`, or a version the
/// classifier cannot see): a server that accepts them would read a Host header after them.
const METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT",
];

/// True if the complete first line `line` (no LF) is an HTTP request line: a token method and
/// at least one more word, and either a word starting with `HTTP/` (any case: servers differ)
/// or a well-known method. An SSH banner (`SSH-2.0-OpenSSH_9.2p1 Debian-2`), an SMTP or IMAP
/// command is not.
fn is_request_line(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if !request_line_prefix(line) {
        return false;
    }
    let mut words = line
        .split(|&c| c == b' ' || c == b'\t')
        .filter(|w| !w.is_empty());
    let Some(method) = words.next() else {
        return false;
    };
    if !method.iter().all(|&c| is_tchar(c)) {
        return false;
    }
    let rest: Vec<&[u8]> = words.collect();
    !rest.is_empty()
        && (METHODS.contains(&method)
            || rest
                .iter()
                .any(|w| w.len() >= 5 && w[..5].eq_ignore_ascii_case(b"HTTP/")))
}

/// True while `b` (non-empty) could still become an HTTP request line whose first line has not
/// ended: reading goes on until the line ends, the cap, or the first-bytes timeout.
fn request_line_undecided(b: &[u8]) -> bool {
    if b.is_empty() {
        return false;
    }
    let rest = skip_empty_lines(b);
    rest.is_empty() || (!rest.contains(&b'\n') && request_line_prefix(rest))
}

/// True if the client's first bytes `b` must be served as HTTP (never tunnelled raw): their
/// first line, after any empty lines, is complete and a request line ([`is_request_line`]). A
/// line that has not ended yet is [`request_line_undecided`]; the tunnel watches it to its end.
pub(crate) fn looks_like_http(b: &[u8]) -> bool {
    let rest = skip_empty_lines(b);
    match rest.iter().position(|&c| c == b'\n') {
        Some(end) => is_request_line(&rest[..end]),
        None => false,
    }
}

/// How a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TunnelEnd {
    /// Refused by the first-bytes check; nothing went upstream.
    Refused,
    /// Opened (or failed to connect) and closed; the event is recorded.
    Closed,
    /// The client stayed silent past the first-bytes wait and then sent an HTTP request line
    /// (these bytes), before the server said anything: the caller serves the connection as
    /// HTTP (each request recorded). The upstream connection opened meanwhile was closed
    /// unused, and recorded as such.
    Http(Vec<u8>),
}

/// How much of a long first line is kept to classify it: its start (the method and, usually,
/// the whole line) and its end (the version of a request line with a very long target).
const LINE_HEAD: usize = 8 * 1024;
const LINE_TAIL: usize = 64;

/// The client's first line, seen as it streams past (leading empty lines skipped).
#[derive(Debug, Default)]
struct FirstLine {
    head: Vec<u8>,
    tail: Vec<u8>,
    len: usize,
}

impl FirstLine {
    /// Takes in client bytes; returns the index of the line feed that ends the first line, if
    /// it is in `b`.
    fn feed(&mut self, b: &[u8]) -> Option<usize> {
        for (i, &c) in b.iter().enumerate() {
            if self.len == 0 && (c == b'\r' || c == b'\n') {
                continue;
            }
            if c == b'\n' {
                return Some(i);
            }
            self.len += 1;
            if self.head.len() < LINE_HEAD {
                self.head.push(c);
            }
            self.tail.push(c);
            if self.tail.len() >= 2 * LINE_TAIL {
                self.tail.drain(..LINE_TAIL);
            }
        }
        None
    }

    /// Whether the completed line is an HTTP request line.
    fn is_request_line(&self) -> bool {
        if self.len <= self.head.len() {
            return is_request_line(&self.head);
        }
        // Longer than what was kept: a request line if it starts like one and ends with a
        // version.
        let tail = self.tail.strip_suffix(b"\r").unwrap_or(&self.tail);
        let last = tail
            .rsplit(|&c| c == b' ' || c == b'\t')
            .next()
            .unwrap_or(&[]);
        is_request_line(&self.head)
            || (request_line_prefix(&self.head)
                && last.len() >= 5
                && last[..5].eq_ignore_ascii_case(b"HTTP/"))
    }
}

/// What the client did while the gateway watched its first bytes (see [`guard`]).
enum Guarded {
    /// Silent client: it now has bytes to read; whether the server had spoken before.
    Spoke { server_spoke: bool },
    /// The first line ended and is not a request line; everything read was forwarded.
    LineDone,
    /// The first line ended and is a request line: nothing of its end was forwarded.
    LineIsHttp,
    /// The client closed its side.
    Eof,
    /// The gateway is shutting down.
    Cancelled,
}

/// Watches a tunnel's client until its first bytes are known while relaying what `upstream`
/// says (metered). With `line` `None` the client has said nothing yet and nothing of its is
/// read; with a line, client bytes are forwarded as they come up to the line feed that ends the
/// first line, which is forwarded only if the line is not an HTTP request line.
async fn guard(
    client: &TcpStream,
    upstream: &TcpStream,
    meter: &Meter,
    cancel: &CancellationToken,
    mut line: Option<&mut FirstLine>,
) -> std::io::Result<Guarded> {
    let mut server_spoke = false;
    let mut upstream_open = true;
    let mut down = vec![0u8; 16 * 1024];
    let mut up = vec![0u8; 16 * 1024];
    let mut probe = [0u8; 1];
    let scanning = line.is_some();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(Guarded::Cancelled),
            r = client.peek(&mut probe), if !scanning => {
                return Ok(match r? {
                    0 => Guarded::Eof,
                    _ => Guarded::Spoke { server_spoke },
                });
            }
            r = client.readable(), if scanning => {
                r?;
                let n = match client.try_read(&mut up) {
                    Ok(0) => return Ok(Guarded::Eof),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                };
                let ended = line.as_deref_mut().and_then(|l| l.feed(&up[..n]));
                if ended.is_some() && line.as_deref().is_some_and(FirstLine::is_request_line) {
                    return Ok(Guarded::LineIsHttp);
                }
                write_up(upstream, meter, &up[..n]).await?;
                if ended.is_some() {
                    return Ok(Guarded::LineDone);
                }
            }
            r = upstream.readable(), if upstream_open => {
                r?;
                match relay_down(upstream, client, meter, &mut down).await? {
                    Relayed::Eof => upstream_open = false,
                    Relayed::Data(_) => server_spoke = true,
                    Relayed::Nothing => {}
                }
            }
        }
    }
}

/// Most client bytes held back while the server's first answer to a ClientHello is awaited, or
/// while the client's retried ClientHello is read: room for a ClientHello, the records a client
/// may send before it (`change_cipher_spec`, early data), and one full read. A client with more to
/// say waits (TCP backpressure) until the server has answered.
const MAX_HELD: usize = 2 * MAX_PEEK;

/// How the watch for a HelloRetryRequest ended (see [`watch_hello_retry`]).
#[derive(Debug)]
enum Retry {
    /// The server's first answer was not a HelloRetryRequest: the held bytes may go upstream.
    NotRetried,
    /// A HelloRetryRequest, and the client's retried ClientHello passed the same SNI check as
    /// the first: the held bytes may go upstream.
    Checked,
    /// A HelloRetryRequest, and what the client sent after it is refused: nothing of it went
    /// upstream.
    Refused(Verdicted),
    /// The gateway is shutting down.
    Cancelled,
}

/// [`check_first_bytes`] for what the client sent after a HelloRetryRequest: the same rules and
/// rule names, the reason saying it was the retried ClientHello.
fn check_retried(dest: &Dest, peek: Result<Peek, SniError>) -> Result<(), Verdicted> {
    check_first_bytes(dest, peek).map_err(|mut v| {
        v.reason = v
            .reason
            .map(|r| format!("retried ClientHello (after a HelloRetryRequest): {r}"));
        v
    })
}

/// A refusal of what the client sent after a HelloRetryRequest.
fn retry_refused(dest: &Dest, e: SniError) -> Retry {
    match check_retried(dest, Err(e)) {
        Err(v) => Retry::Refused(v),
        Ok(()) => Retry::Refused(blocked(
            "bad-client-hello",
            "retried ClientHello (after a HelloRetryRequest) refused".into(),
        )),
    }
}

/// After a ClientHello went upstream: relays (metered) what the server says until its first
/// handshake message shows whether it is a HelloRetryRequest, holding back in `held` every byte
/// the client sends meanwhile. On a HelloRetryRequest, the client's next handshake message must
/// be a ClientHello that passes [`check_first_bytes`] for `dest`, within `wait` of the retry
/// request being seen; a second retry request is impossible (RFC 8446 §4.1.4), so nothing is
/// watched after it. Returns with `held` still unsent: the caller sends it unless refused.
async fn watch_hello_retry(
    client: &TcpStream,
    upstream: &TcpStream,
    meter: &Meter,
    cancel: &CancellationToken,
    dest: &Dest,
    held: &mut Vec<u8>,
    wait: Duration,
) -> std::io::Result<Retry> {
    let mut scan = ServerHelloScan::default();
    let mut down = vec![0u8; 16 * 1024];
    let mut up = vec![0u8; 16 * 1024];
    let (mut client_open, mut upstream_open) = (true, true);
    // Set once a HelloRetryRequest was seen: when the retried ClientHello must be complete.
    let mut deadline: Option<tokio::time::Instant> = None;
    // What `held` and the client were like when the retried hello was last judged.
    let mut judged: Option<(usize, bool)> = None;
    loop {
        // Judged again only when something changed: more client bytes, or the client closed.
        let state = (held.len(), client_open);
        if deadline.is_some() && judged != Some(state) {
            judged = Some(state);
            match retried_hello(held) {
                Ok(Retried::ClientHello { sni, .. }) => {
                    return Ok(match check_retried(dest, Ok(Peek::ClientHello { sni })) {
                        Ok(()) => Retry::Checked,
                        Err(v) => Retry::Refused(v),
                    });
                }
                Ok(Retried::NeedMore) if held.len() >= MAX_HELD => {
                    return Ok(retry_refused(dest, SniError::TooLarge(held.len())));
                }
                Ok(Retried::NeedMore) if !client_open => {
                    if held.is_empty() {
                        // The client gave up after the retry request: nothing to check.
                        return Ok(Retry::Checked);
                    }
                    return Ok(retry_refused(
                        dest,
                        SniError::Malformed("incomplete ClientHello"),
                    ));
                }
                Ok(Retried::NeedMore) => {}
                Err(e) => return Ok(retry_refused(dest, e)),
            }
        }
        let room = MAX_HELD.saturating_sub(held.len()).min(up.len());
        let timer = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(Retry::Cancelled),
            _ = timer => {
                return Ok(retry_refused(
                    dest,
                    SniError::Malformed("no complete ClientHello within the first-bytes wait"),
                ));
            }
            r = client.readable(), if client_open && room > 0 => {
                r?;
                match client.try_read(&mut up[..room]) {
                    Ok(0) => client_open = false,
                    Ok(n) => held.extend_from_slice(&up[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            r = upstream.readable(), if upstream_open => {
                r?;
                let n = match relay_down(upstream, client, meter, &mut down).await? {
                    Relayed::Nothing => continue,
                    Relayed::Eof => {
                        upstream_open = false;
                        if deadline.is_none() {
                            // The server closed without asking for a retry.
                            return Ok(Retry::NotRetried);
                        }
                        continue;
                    }
                    Relayed::Data(n) => n,
                };
                if deadline.is_none() {
                    match scan.feed(&down[..n]) {
                        ServerFirst::Pending => {}
                        ServerFirst::NotRetry(_) => return Ok(Retry::NotRetried),
                        ServerFirst::HelloRetry => {
                            deadline = Some(tokio::time::Instant::now() + wait);
                        }
                    }
                }
            }
        }
    }
}

/// Checks the first bytes (SNI), connects, sends `first` and splices; records the outcome.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_tunnel(
    ctx: &Arc<Ctx>,
    session: &Arc<Session>,
    via: Via,
    client: &mut TcpStream,
    mut first: Vec<u8>,
    peek: Result<Peek, SniError>,
    route: Route,
    start: Instant,
) -> TunnelEnd {
    let host = route.dest.to_host_string();
    // Nothing within the first-bytes wait: a server-first protocol, or a client waiting out the
    // timer. Its first bytes are checked when they come (below).
    let silent = first.is_empty() && matches!(peek, Ok(Peek::NotTls));
    // A first line still open when the wait ended: watched until it ends.
    let mut pending_line = matches!(peek, Ok(Peek::NotTls)) && request_line_undecided(&first);
    // A ClientHello: the server's answer is watched for a HelloRetryRequest before splicing.
    let mut hello = matches!(peek, Ok(Peek::ClientHello { .. }));
    if let Err(v) = check_first_bytes(&route.dest, peek) {
        emit_blocked(ctx, session, via, Some(host), None, Some(route.port), &v);
        return TunnelEnd::Refused;
    }
    let connected = tokio::select! {
        r = route::connect(&route, ctx.shared.timeouts.connect) => r,
        // Shutting down before the tunnel opened: nothing moved, nothing to record.
        _ = ctx.cancel.cancelled() => return TunnelEnd::Closed,
    };
    let (stream, addr): (TcpStream, SocketAddr) = match connected {
        Ok(x) => x,
        Err(e) => {
            let mut ev = NetEvent::new(EventKind::Connection, &session.info, via, route.verdict);
            ev.host = Some(host.clone());
            ev.ip = route.addrs.first().copied();
            ev.port = Some(route.port);
            ev.rule = "upstream-error".into();
            ev.reason = Some(format!("cannot connect to {host}:{}: {e}", route.port));
            ev.duration_ms = elapsed_ms(start);
            ctx.emit(session, ev);
            return TunnelEnd::Closed;
        }
    };
    let meter = Meter::new(MeterTarget {
        ctx: ctx.clone(),
        session: session.clone(),
        hit: BudgetHit {
            via,
            host: Some(host.clone()),
            ip: Some(addr.ip()),
            port: Some(route.port),
        },
    });
    let counters = meter.counters();
    let mut error = None;
    let mut refusal = None;
    let mut cancelled = false;
    if silent {
        match guard(client, &stream, &meter, &ctx.cancel, None).await {
            Ok(Guarded::Spoke { server_spoke }) => {
                match peek_first(ctx, client, Vec::new()).await {
                    Ok((bytes, peek)) => {
                        let http = matches!(peek, Ok(Peek::NotTls)) && looks_like_http(&bytes);
                        if http && !server_spoke {
                            // A slow HTTP client: served as HTTP, on its own upstream
                            // connections, each request's Host checked. The connection opened
                            // for the silent client is recorded, unused, before it goes.
                            let mut ev = NetEvent::new(
                                EventKind::Connection,
                                &session.info,
                                via,
                                route.verdict,
                            );
                            ev.host = Some(host);
                            ev.ip = Some(addr.ip());
                            ev.port = Some(route.port);
                            if via == Via::Connect {
                                ev.method = Some("CONNECT".to_owned());
                            }
                            (ev.bytes_up, ev.bytes_down) = counters.snapshot();
                            ev.duration_ms = elapsed_ms(start);
                            ev.rule = route.rule;
                            ev.reason = Some(
                                "opened while the client was silent; closed unused when it sent \
                                 HTTP, which is served (and recorded) request by request"
                                    .to_owned(),
                            );
                            ctx.emit(session, ev);
                            return TunnelEnd::Http(bytes);
                        }
                        pending_line =
                            matches!(peek, Ok(Peek::NotTls)) && request_line_undecided(&bytes);
                        hello = matches!(peek, Ok(Peek::ClientHello { .. }));
                        refusal = if http {
                            Some(late_http())
                        } else if hello && server_spoke {
                            // The server's answer to this ClientHello could not be told from
                            // what it said before, so a HelloRetryRequest could not be seen.
                            Some(blocked(
                                "bad-client-hello",
                                "a TLS ClientHello came after the server had spoken: send it at \
                                 once so the server's answer can be checked"
                                    .into(),
                            ))
                        } else {
                            check_first_bytes(&route.dest, peek).err()
                        };
                        first = bytes;
                    }
                    Err(e) => error = Some(e.to_string()),
                }
            }
            Ok(Guarded::Cancelled) => cancelled = true,
            Ok(_) => {}
            Err(e) => error = Some(e.to_string()),
        }
    }
    // Whatever the client sent after its ClientHello waits for the server's answer.
    let mut held = match hello.then(|| client_hello_len(&first)).flatten() {
        Some(end) => first.split_off(end),
        None => Vec::new(),
    };
    if refusal.is_none() && error.is_none() && !cancelled && !first.is_empty() {
        if let Err(e) = write_up(&stream, &meter, &first).await {
            error = Some(e.to_string());
        }
    }
    if hello && refusal.is_none() && error.is_none() && !cancelled {
        let wait = ctx.shared.timeouts.first_bytes;
        let watched = watch_hello_retry(
            client,
            &stream,
            &meter,
            &ctx.cancel,
            &route.dest,
            &mut held,
            wait,
        );
        match watched.await {
            Ok(Retry::NotRetried | Retry::Checked) => {
                if let Err(e) = write_up(&stream, &meter, &held).await {
                    error = Some(e.to_string());
                }
            }
            Ok(Retry::Refused(v)) => refusal = Some(v),
            Ok(Retry::Cancelled) => cancelled = true,
            Err(e) => error = Some(e.to_string()),
        }
    }
    if pending_line && refusal.is_none() && error.is_none() && !cancelled {
        let mut line = FirstLine::default();
        line.feed(&first);
        match guard(client, &stream, &meter, &ctx.cancel, Some(&mut line)).await {
            Ok(Guarded::LineIsHttp) => refusal = Some(late_http()),
            Ok(Guarded::Cancelled) => cancelled = true,
            Ok(_) => {}
            Err(e) => error = Some(e.to_string()),
        }
    }
    if let Some(v) = refusal {
        // The upstream connection existed and may have carried bytes (a server's banner, the
        // start of a line): the refusal records what moved.
        let (up, down) = counters.snapshot();
        let mut ev = NetEvent::new(EventKind::Blocked, &session.info, via, Verdict::Block);
        ev.host = Some(host);
        ev.ip = Some(addr.ip());
        ev.port = Some(route.port);
        if via == Via::Connect {
            ev.method = Some("CONNECT".into());
        }
        ev.bytes_up = up;
        ev.bytes_down = down;
        ev.duration_ms = elapsed_ms(start);
        ev.rule = v.rule;
        ev.reason = v.reason;
        ctx.emit(session, ev);
        return TunnelEnd::Refused;
    }
    if error.is_none() && !cancelled {
        if let Err(e) = splice::tunnel(client, &stream, &meter, &ctx.cancel).await {
            error = Some(e.to_string());
        }
    }
    let (up, down) = counters.snapshot();
    let mut ev = NetEvent::new(EventKind::Connection, &session.info, via, route.verdict);
    ev.host = Some(host);
    ev.ip = Some(addr.ip());
    ev.port = Some(route.port);
    if via == Via::Connect {
        ev.method = Some("CONNECT".to_owned());
    }
    ev.bytes_up = up;
    ev.bytes_down = down;
    ev.duration_ms = elapsed_ms(start);
    ev.rule = route.rule;
    ev.reason = match (route.reason, error) {
        (Some(r), Some(e)) => Some(format!("{r}; {e}")),
        (r, e) => r.or(e),
    };
    ctx.emit(session, ev);
    TunnelEnd::Closed
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_lines_are_http_in_any_shape_a_server_accepts() {
        for b in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"\r\n\r\nGET / HTTP/1.1\r\n",
            b"\nPOST /x HTTP/1.0\n",
            b"get / HTTP/1.1\r\n",
            b"MKWORKSPACE /x HTTP/1.1\r\n",
            b"VERSION-CONTROL /x HTTP/1.1\r\n",
            b"GET  /a b  http/1.1\r\n",
            b"GET / HTTP/1.1 trailing\r\n",
            b"GET /\r\n",
        ] {
            assert!(looks_like_http(b), "{:?}", String::from_utf8_lossy(b));
        }
        // Not a complete line yet: watched to its end, never called another protocol.
        for b in [
            &b"G"[..],
            b"\r\n",
            b"XYZ /incomplete",
            b"aaaa",
            b"GET / HTTP/1.1",
        ] {
            assert!(!looks_like_http(b), "{:?}", String::from_utf8_lossy(b));
            assert!(
                request_line_undecided(b),
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
    }

    #[test]
    fn a_first_line_fed_in_pieces_is_judged_when_it_ends() {
        let mut l = FirstLine::default();
        assert_eq!(l.feed(b"\r\n\r\nG"), None);
        assert_eq!(l.feed(b"ET /x HTTP/1.1\r"), None);
        assert_eq!(l.feed(b"\nHost: evil.test\r\n"), Some(0));
        assert!(l.is_request_line());

        let mut l = FirstLine::default();
        assert_eq!(l.feed(b"SSH-2.0-OpenSSH_9.2p1 "), None);
        assert_eq!(l.feed(b"Debian-2\r\nrest"), Some(9));
        assert!(!l.is_request_line());

        // Longer than what is kept of it: judged by its start and its version.
        let mut l = FirstLine::default();
        l.feed(b"GET /");
        l.feed(&vec![b'a'; 100_000]);
        assert_eq!(l.feed(b" HTTP/1.1\r\n"), Some(10));
        assert!(l.is_request_line());
        let mut l = FirstLine::default();
        l.feed(&vec![b'a'; 100_000]);
        assert_eq!(l.feed(b"\n"), Some(0));
        assert!(!l.is_request_line());
    }

    #[test]
    fn other_protocols_are_not_http() {
        for b in [
            &b""[..],
            b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n",
            b"SSH-2.0-Go\r\n",
            b"EHLO x\r\n",
            b"a001 LOGIN user pass\r\n",
            b"get key\r\n",
            b"*1\r\n$4\r\nPING\r\n",
            b"AMQP\x00\x00\x09\x01",
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
            b"\x16\x03\x01",
            b"PING\r\n",
        ] {
            assert!(!looks_like_http(b), "{:?}", String::from_utf8_lossy(b));
        }
    }

    proptest! {
        /// However a request line is cut, the peek either keeps reading or calls it HTTP: no
        /// prefix of a request is ever tunnelled raw.
        #[test]
        fn no_prefix_of_a_request_is_taken_for_another_protocol(
            empty_lines in "(\r\n|\n){0,3}",
            method in "[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,20}",
            target in "/[!-~]{0,30}",
            version in "(HTTP|http)/1\\.[01]",
            cut in 1usize..200,
        ) {
            let req = format!("{empty_lines}{method} {target} {version}\r\nHost: evil.test\r\n\r\n");
            let b = &req.as_bytes()[..cut.min(req.len())];
            prop_assert!(
                request_line_undecided(b) || looks_like_http(b),
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }

        #[test]
        fn classifying_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = (looks_like_http(&b), request_line_undecided(&b));
        }
    }
}
