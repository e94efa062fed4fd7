//! HTTP/1.x on the wire, as the gateway reads and writes it: message heads, body framing, and
//! the chunked coding. Pure functions over byte buffers; the connection loop is in `http.rs`.
//!
//! Guarantees:
//! - Framing is unambiguous or the message is refused (request smuggling): a request with both
//!   `Content-Length` and `Transfer-Encoding`, a `Transfer-Encoding` other than exactly
//!   `chunked`, several `Transfer-Encoding` headers, or `Content-Length` values that are not one
//!   decimal number (repeated values must agree) is refused before anything goes upstream. Heads
//!   are parsed by `httparse` (strict: no obs-fold, no bare CR, tokens checked).
//! - What goes upstream and what goes back to the client is re-serialised from the parsed head,
//!   never copied as raw bytes: hop-by-hop headers (the fixed list plus every header the
//!   `Connection` header names), `Content-Length` and `Transfer-Encoding` are dropped and the
//!   framing header is written by the gateway from the framing it will actually use, so the two
//!   hops can never disagree about where a message ends.
//! - The chunked decoder accepts only `1*HEXDIG [ext] CRLF` size lines (no bare LF, no overflow,
//!   size lines and trailers bounded) and CRLF after every chunk; trailers are read and dropped.
//! - Heads are bounded: [`MAX_HEAD`] bytes and [`MAX_HEADERS`] header lines.
//! - The only protocol switch that crosses the gateway is a WebSocket opening handshake
//!   (RFC 6455): an HTTP/1.1 `GET` without a body whose `Upgrade` is exactly `websocket` and
//!   whose `Connection` names `upgrade`. Only then does the gateway write `Upgrade: websocket`
//!   upstream, and only to such a request is a `101` answer accepted, and only a `101` that
//!   switches to `websocket`; every other `Upgrade` is dropped like any hop-by-hop header and
//!   every other `101` is refused.

use std::fmt::Write as _;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use thiserror::Error;

/// Largest request or response head (request line plus headers) the gateway reads.
pub(crate) const MAX_HEAD: usize = 256 * 1024;
/// Most header lines in one head.
pub(crate) const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) and longest trailer section.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;

/// Headers that belong to one hop and never cross the gateway (besides those `Connection`
/// names). `content-length` and `transfer-encoding` are rewritten from the framing in use.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "transfer-encoding",
];

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum HeadError {
    #[error("malformed HTTP head: {0}")]
    Malformed(String),
    #[error("HTTP head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("Content-Length and Transfer-Encoding together")]
    LengthAndChunked,
    #[error("invalid Content-Length")]
    BadLength,
    #[error("unsupported Transfer-Encoding (only a single `chunked` is accepted)")]
    UnsupportedCoding,
    #[error("unexpected 101 Switching Protocols (the gateway asked for no upgrade, or not for this protocol)")]
    UnexpectedUpgrade,
}

impl HeadError {
    /// The status the client gets when its request head is refused.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            HeadError::UnsupportedCoding => 501,
            _ => 400,
        }
    }
}

/// Where a message body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLen {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// The chunked coding.
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

type Span = Range<usize>;

/// A parsed head: the raw bytes and where each part lies in them.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    raw: Bytes,
    headers: Vec<(Span, Span)>,
}

impl Head {
    fn slice(&self, s: &Span) -> &[u8] {
        &self.raw[s.clone()]
    }

    /// The head as received (request or status line and headers).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Every header as (name, value), in order.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (&self.raw[n.clone()], &self.raw[v.clone()]))
    }

    /// Every value of header `name`.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// Gives back the header position storage for the next parse.
    pub fn recycle(self) -> Spans {
        self.headers
    }

    pub fn first(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }
}

/// A request head.
#[derive(Debug, Clone)]
pub(crate) struct RequestHead {
    pub head: Head,
    method: Span,
    target: Span,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
}

impl RequestHead {
    pub fn method(&self) -> &str {
        // httparse accepts only token characters in the method: ASCII.
        std::str::from_utf8(self.head.slice(&self.method)).unwrap_or("")
    }

    pub fn target(&self) -> &[u8] {
        self.head.slice(&self.target)
    }

    /// The target as shared bytes (for `http::Uri` without a copy).
    pub fn target_bytes(&self) -> Bytes {
        self.head.raw.slice(self.target.clone())
    }
}

/// A response head.
#[derive(Debug, Clone)]
pub(crate) struct ResponseHead {
    pub head: Head,
    pub code: u16,
    reason: Span,
    pub minor: u8,
}

impl ResponseHead {
    pub fn reason(&self) -> &[u8] {
        self.head.slice(&self.reason)
    }
}

fn offset(base: &[u8], part: &[u8]) -> Span {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

/// Header positions, written into `spans` (a recycled vector, so steady-state parsing does not
/// allocate).
fn header_spans(
    base: &[u8],
    headers: &[httparse::Header<'_>],
    mut spans: Vec<(Span, Span)>,
) -> Vec<(Span, Span)> {
    spans.clear();
    spans.extend(
        headers
            .iter()
            .map(|h| (offset(base, h.name.as_bytes()), offset(base, h.value))),
    );
    spans
}

/// Storage for parsed header positions, handed back by [`Head::recycle`].
pub(crate) type Spans = Vec<(Span, Span)>;

fn map_err(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        other => HeadError::Malformed(other.to_string()),
    }
}

/// Parses a request head from the front of `buf`. `Ok(None)`: incomplete, read more. On success
/// the head's bytes are split off `buf` (what follows stays in it). `spans`: storage to reuse.
pub(crate) fn parse_request(
    buf: &mut BytesMut,
    spans: &mut Spans,
) -> Result<Option<RequestHead>, HeadError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut storage);
    let parsed = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let base: &[u8] = buf;
            let method = offset(base, req.method.unwrap_or("").as_bytes());
            let target = offset(base, req.path.unwrap_or("").as_bytes());
            let minor = req.version.unwrap_or(1);
            let headers = header_spans(base, req.headers, std::mem::take(spans));
            Some((len, method, target, minor, headers))
        }
        Ok(httparse::Status::Partial) => None,
        Err(e) => return Err(map_err(e)),
    };
    match parsed {
        Some((len, method, target, minor, headers)) => {
            let raw = buf.split_to(len).freeze();
            Ok(Some(RequestHead {
                head: Head { raw, headers },
                method,
                target,
                minor,
            }))
        }
        None if buf.len() >= MAX_HEAD => Err(HeadError::TooLarge),
        None => Ok(None),
    }
}

/// Parses a response head from the front of `buf`, like [`parse_request`].
pub(crate) fn parse_response(
    buf: &mut BytesMut,
    spans: &mut Spans,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut storage);
    let parsed = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let base: &[u8] = buf;
            let reason = offset(base, resp.reason.unwrap_or("").as_bytes());
            let code = resp.code.unwrap_or(0);
            let minor = resp.version.unwrap_or(1);
            let headers = header_spans(base, resp.headers, std::mem::take(spans));
            Some((len, code, reason, minor, headers))
        }
        Ok(httparse::Status::Partial) => None,
        Err(e) => return Err(map_err(e)),
    };
    match parsed {
        Some((len, code, reason, minor, headers)) => {
            let raw = buf.split_to(len).freeze();
            Ok(Some(ResponseHead {
                head: Head { raw, headers },
                code,
                reason,
                minor,
            }))
        }
        None if buf.len() >= MAX_HEAD => Err(HeadError::TooLarge),
        None => Ok(None),
    }
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// What the `Connection` headers say.
#[derive(Debug, Default, Clone)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    /// Other tokens: names of headers that are hop-by-hop for this message.
    named: Vec<Span>,
}

fn connection_tokens(head: &Head) -> ConnectionTokens {
    let mut out = ConnectionTokens::default();
    for (n, v) in &head.headers {
        if !head.slice(n).eq_ignore_ascii_case(b"connection") {
            continue;
        }
        for t in tokens(head.slice(v)) {
            if t.eq_ignore_ascii_case(b"close") {
                out.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                out.keep_alive = true;
            } else if t.eq_ignore_ascii_case(b"upgrade") {
                // `Upgrade` is hop-by-hop anyway; remember that it was named.
                out.upgrade = true;
            } else {
                out.named.push(offset(&head.raw, t));
            }
        }
    }
    out
}

/// The single length all `Content-Length` values agree on, if any are present.
fn content_length(head: &Head) -> Result<Option<u64>, HeadError> {
    let mut found: Option<u64> = None;
    for v in head.values("content-length") {
        // Each value may itself be a list (`5, 5`), which some senders produce; all must agree.
        for t in v.split(|&b| b == b',').map(|t| t.trim_ascii()) {
            if t.is_empty() || t.len() > 19 || !t.iter().all(u8::is_ascii_digit) {
                return Err(HeadError::BadLength);
            }
            let n: u64 = std::str::from_utf8(t)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(HeadError::BadLength)?;
            match found {
                Some(prev) if prev != n => return Err(HeadError::BadLength),
                _ => found = Some(n),
            }
        }
    }
    Ok(found)
}

/// Whether `Transfer-Encoding` is present, and if so that it is exactly one `chunked`.
fn chunked(head: &Head) -> Result<bool, HeadError> {
    let mut values = head.values("transfer-encoding");
    let Some(first) = values.next() else {
        return Ok(false);
    };
    if values.next().is_some() || !first.trim_ascii().eq_ignore_ascii_case(b"chunked") {
        return Err(HeadError::UnsupportedCoding);
    }
    Ok(true)
}

/// What the gateway needs to know about a request head.
#[derive(Debug, Clone)]
pub(crate) struct RequestInfo {
    pub body: BodyLen,
    /// The client wants the connection kept after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a 100 before sending its body.
    pub expect_continue: bool,
    /// A WebSocket opening handshake (see the module guarantees): `Upgrade: websocket` is
    /// forwarded and a `101` switching to it accepted.
    pub websocket: bool,
    conn: ConnectionTokens,
}

/// Decides a request's framing and connection handling. Errors are smuggling-shaped requests.
pub(crate) fn request_info(req: &RequestHead) -> Result<RequestInfo, HeadError> {
    let head = &req.head;
    let is_chunked = chunked(head)?;
    let length = content_length(head)?;
    let body = match (is_chunked, length) {
        (true, Some(_)) => return Err(HeadError::LengthAndChunked),
        (true, None) => BodyLen::Chunked,
        (false, Some(n)) => BodyLen::Length(n),
        (false, None) => BodyLen::Empty,
    };
    let conn = connection_tokens(head);
    let keep_alive = if req.minor >= 1 {
        !conn.close
    } else {
        conn.keep_alive && !conn.close
    };
    let expect_continue = head
        .values("expect")
        .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue"));
    let websocket = req.minor >= 1
        && req.method() == "GET"
        && body == BodyLen::Empty
        && conn.upgrade
        && upgrades_to_websocket(head);
    Ok(RequestInfo {
        body,
        keep_alive,
        expect_continue,
        websocket,
        conn,
    })
}

/// Whether `head` has exactly one `Upgrade` header and its value is exactly `websocket`.
fn upgrades_to_websocket(head: &Head) -> bool {
    let mut values = head.values("upgrade");
    matches!(
        (values.next(), values.next()),
        (Some(v), None) if v.trim_ascii().eq_ignore_ascii_case(b"websocket")
    )
}

/// What the gateway needs to know about a response head.
#[derive(Debug, Clone)]
pub(crate) struct ResponseInfo {
    pub body: BodyLen,
    /// 1xx other than 101: forwarded, then the real response follows.
    pub interim: bool,
    /// The upstream connection may carry another request after this response.
    pub reusable: bool,
    /// `Content-Length` of a body-less response to HEAD or 304 (what the body would have been).
    pub declared_length: Option<u64>,
    /// `101` to a WebSocket handshake: from here on the connection carries WebSocket frames.
    pub switching: bool,
    conn: ConnectionTokens,
}

/// Decides a response's framing (RFC 9112 section 6.3). `head_request`: the request was HEAD;
/// `websocket`: it was a WebSocket handshake ([`RequestInfo::websocket`]), the only request a
/// `101` may answer.
pub(crate) fn response_info(
    resp: &ResponseHead,
    head_request: bool,
    websocket: bool,
) -> Result<ResponseInfo, HeadError> {
    let head = &resp.head;
    let conn = connection_tokens(head);
    if resp.code == 101 {
        if !(websocket && upgrades_to_websocket(head)) {
            return Err(HeadError::UnexpectedUpgrade);
        }
        return Ok(ResponseInfo {
            body: BodyLen::Empty,
            interim: false,
            reusable: false,
            declared_length: None,
            switching: true,
            conn,
        });
    }
    let interim = (100..200).contains(&resp.code);
    let no_body = interim || head_request || resp.code == 204 || resp.code == 304;
    let is_chunked = chunked(head)?;
    let length = content_length(head)?;
    let mut reusable = if resp.minor >= 1 {
        !conn.close
    } else {
        conn.keep_alive && !conn.close
    };
    let (body, declared_length) = if no_body {
        (BodyLen::Empty, if resp.code == 204 { None } else { length })
    } else if is_chunked {
        // A sender that put both is broken or hostile: chunked wins and the connection is not
        // trusted for another message.
        if length.is_some() {
            reusable = false;
        }
        (BodyLen::Chunked, None)
    } else if let Some(n) = length {
        (BodyLen::Length(n), None)
    } else {
        reusable = false;
        (BodyLen::UntilClose, None)
    };
    Ok(ResponseInfo {
        body,
        interim,
        reusable,
        declared_length,
        switching: false,
        conn,
    })
}

fn is_hop_by_hop(name: &[u8], raw: &[u8], conn: &ConnectionTokens) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
        || conn
            .named
            .iter()
            .any(|s| name.eq_ignore_ascii_case(&raw[s.clone()]))
}

fn write_framing(out: &mut Vec<u8>, body: BodyLen) {
    match body {
        BodyLen::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyLen::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyLen::Empty | BodyLen::UntilClose => {}
    }
}

fn push_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Writes the request head the gateway sends upstream: `METHOD path HTTP/1.1`, the client's
/// end-to-end headers, `Host` (`host` when the client sent none), and the framing for `body`.
/// `Expect` is dropped when the gateway answers `100 Continue` itself.
pub(crate) fn write_request_head(
    out: &mut Vec<u8>,
    req: &RequestHead,
    info: &RequestInfo,
    path: &[u8],
    host: Option<&str>,
) {
    write_request_head_mapped(out, req, info, path, host, |_, _, _| HeaderOut::Same);
}

/// The hop-by-hop headers of a WebSocket handshake, written by the gateway on each hop.
const UPGRADE_WEBSOCKET: &[u8] = b"connection: upgrade\r\nupgrade: websocket\r\n";

/// What [`write_request_head_mapped`] sends for one of the client's headers.
pub(crate) enum HeaderOut {
    /// The header as the client wrote it.
    Same,
    /// Nothing.
    Skip,
    /// The header with this value.
    Value(Vec<u8>),
}

/// Like [`write_request_head`], for intercepted requests whose headers the gateway rewrites
/// (credential injection, [`crate::intercept::Scope::upstream_rewrite`]): `map(index, name,
/// value)` says what to send for the `index`-th header of `req` (counting every header).
pub(crate) fn write_request_head_mapped(
    out: &mut Vec<u8>,
    req: &RequestHead,
    info: &RequestInfo,
    path: &[u8],
    host: Option<&str>,
    mut map: impl FnMut(usize, &[u8], &[u8]) -> HeaderOut,
) {
    out.extend_from_slice(req.method().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let raw = &req.head.raw;
    for (i, (n, v)) in req.head.headers().enumerate() {
        if is_hop_by_hop(n, raw, &info.conn)
            || (info.expect_continue && n.eq_ignore_ascii_case(b"expect"))
        {
            continue;
        }
        let value = match map(i, n, v) {
            HeaderOut::Skip => continue,
            HeaderOut::Same => None,
            HeaderOut::Value(value) => Some(value),
        };
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_deref().unwrap_or(v));
        out.extend_from_slice(b"\r\n");
    }
    if let Some(h) = host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if info.websocket {
        out.extend_from_slice(UPGRADE_WEBSOCKET);
    }
    write_framing(out, info.body);
    out.extend_from_slice(b"\r\n");
}

/// How the client connection ends a forwarded response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientEnd {
    /// Kept alive (HTTP/1.1 default).
    KeepAlive,
    /// Kept alive, and the client is HTTP/1.0, so say so.
    KeepAlive10,
    /// Closed after this response.
    Close,
    /// Switched to WebSocket by this `101`.
    Upgrade,
}

/// Writes the response head the client gets: the status, upstream's end-to-end headers, and
/// the framing `body` the gateway will use towards the client.
pub(crate) fn write_response_head(
    out: &mut Vec<u8>,
    resp: &ResponseHead,
    info: &ResponseInfo,
    body: BodyLen,
    end: ClientEnd,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(resp.code));
    out.push(b' ');
    out.extend_from_slice(resp.reason());
    out.extend_from_slice(b"\r\n");
    let raw = &resp.head.raw;
    for (n, v) in resp.head.headers() {
        if is_hop_by_hop(n, raw, &info.conn) {
            continue;
        }
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    if info.interim {
        out.extend_from_slice(b"\r\n");
        return;
    }
    match (body, info.declared_length) {
        (BodyLen::Empty, Some(n)) => write_framing(out, BodyLen::Length(n)),
        _ => write_framing(out, body),
    }
    match end {
        ClientEnd::KeepAlive => {}
        ClientEnd::KeepAlive10 => out.extend_from_slice(b"connection: keep-alive\r\n"),
        ClientEnd::Close => out.extend_from_slice(b"connection: close\r\n"),
        ClientEnd::Upgrade => out.extend_from_slice(UPGRADE_WEBSOCKET),
    }
    out.extend_from_slice(b"\r\n");
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        407 => "Proxy Authentication Required",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        _ => "Error",
    }
}

/// A reason as it may appear in a header: printable ASCII, at most 300 characters.
pub(crate) fn header_safe(reason: &str) -> String {
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
    let trimmed = cleaned.trim();
    if trimmed.is_empty() {
        "blocked".into()
    } else {
        trimmed.to_owned()
    }
}

/// The body of the gateway's own answers, on every HTTP version.
pub(crate) fn refusal_body(reason: &str) -> String {
    format!("cordon: {reason}\n")
}

/// Writes the gateway's own answer (a refusal or an upstream failure): `status`, the reason in
/// `X-Cordon-Reason` and in a short body.
pub(crate) fn write_refusal(out: &mut Vec<u8>, status: u16, reason: &str, close: bool) {
    let body = refusal_body(reason);
    let _ = write!(
        StrBuf(out),
        "HTTP/1.1 {status} {}\r\nx-cordon-reason: {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
        status_text(status),
        header_safe(reason),
        body.len()
    );
    if status == 407 {
        out.extend_from_slice(b"proxy-authenticate: Basic realm=\"cordon\"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
}

/// `fmt::Write` into a byte vector.
struct StrBuf<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for StrBuf<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// The head of one chunk of `len` bytes, for re-encoding.
pub(crate) fn write_chunk_head(out: &mut Vec<u8>, len: u64) {
    let _ = write!(StrBuf(out), "{len:x}\r\n");
}

/// The end of a chunked body (no trailers).
pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum ChunkError {
    #[error("malformed chunk size line")]
    BadSize,
    #[error("chunk size line too long")]
    LineTooLong,
    #[error("missing CRLF after chunk data")]
    MissingCrlf,
    #[error("trailer section too large or malformed")]
    BadTrailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a size line.
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty line.
    Trailers,
    Done,
}

/// One step of the chunked decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Framing consumed (possibly nothing): feed more input if nothing was consumed.
    Framing,
    /// The first `n` bytes of the input are payload.
    Data(usize),
    /// The body is complete.
    End,
}

/// An incremental decoder for the chunked coding.
#[derive(Debug, Clone)]
pub(crate) struct ChunkedDecoder {
    state: ChunkState,
    trailer_bytes: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
            trailer_bytes: 0,
        }
    }
}

fn line_end(input: &[u8]) -> Option<usize> {
    input.windows(2).position(|w| w == b"\r\n")
}

impl ChunkedDecoder {
    /// Payload bytes left in the current chunk (0 outside chunk data).
    pub fn data_left(&self) -> u64 {
        match self.state {
            ChunkState::Data(n) => n,
            _ => 0,
        }
    }

    /// Records `n` payload bytes of the current chunk that were moved without passing through
    /// [`ChunkedDecoder::step`] (spliced). `n` must not exceed [`ChunkedDecoder::data_left`].
    pub fn skip_data(&mut self, n: u64) {
        if let ChunkState::Data(left) = self.state {
            let left = left.saturating_sub(n);
            self.state = if left == 0 {
                ChunkState::DataEnd
            } else {
                ChunkState::Data(left)
            };
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes from the front of `input`. Returns how many bytes were consumed and what they
    /// were. `(0, Chunk::Framing)` means more input is needed.
    pub fn step(&mut self, input: &[u8]) -> Result<(usize, Chunk), ChunkError> {
        match self.state {
            ChunkState::Done => Ok((0, Chunk::End)),
            ChunkState::Data(left) => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                if n == 0 {
                    return Ok((0, Chunk::Framing));
                }
                self.skip_data(n as u64);
                Ok((n, Chunk::Data(n)))
            }
            ChunkState::DataEnd => {
                if input.len() < 2 {
                    if input.first().is_some_and(|&b| b != b'\r') {
                        return Err(ChunkError::MissingCrlf);
                    }
                    return Ok((0, Chunk::Framing));
                }
                if &input[..2] != b"\r\n" {
                    return Err(ChunkError::MissingCrlf);
                }
                self.state = ChunkState::Size;
                Ok((2, Chunk::Framing))
            }
            ChunkState::Size => {
                let Some(end) = line_end(input) else {
                    if input.len() > MAX_CHUNK_LINE {
                        return Err(ChunkError::LineTooLong);
                    }
                    // A bare LF can never become valid: refuse it now rather than wait.
                    if input.contains(&b'\n') {
                        return Err(ChunkError::BadSize);
                    }
                    return Ok((0, Chunk::Framing));
                };
                if end > MAX_CHUNK_LINE {
                    return Err(ChunkError::LineTooLong);
                }
                let size = parse_chunk_size(&input[..end])?;
                self.state = if size == 0 {
                    ChunkState::Trailers
                } else {
                    ChunkState::Data(size)
                };
                Ok((end + 2, Chunk::Framing))
            }
            ChunkState::Trailers => {
                let Some(end) = line_end(input) else {
                    if self.trailer_bytes + input.len() > MAX_TRAILERS || input.contains(&b'\n') {
                        return Err(ChunkError::BadTrailers);
                    }
                    return Ok((0, Chunk::Framing));
                };
                self.trailer_bytes += end + 2;
                if self.trailer_bytes > MAX_TRAILERS || input[..end].contains(&b'\n') {
                    return Err(ChunkError::BadTrailers);
                }
                if end == 0 {
                    self.state = ChunkState::Done;
                    return Ok((2, Chunk::End));
                }
                Ok((end + 2, Chunk::Framing))
            }
        }
    }
}

/// `1*HEXDIG [ BWS ";" extensions ]` (extensions are dropped, but must not hold CR/LF).
fn parse_chunk_size(line: &[u8]) -> Result<u64, ChunkError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(ChunkError::BadSize);
    }
    let rest = &line[digits..];
    let rest_ok = rest.is_empty()
        || (rest.trim_ascii_start().first() == Some(&b';')
            && rest
                .iter()
                .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80));
    if !rest_ok {
        return Err(ChunkError::BadSize);
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| ChunkError::BadSize)?;
    u64::from_str_radix(text, 16).map_err(|_| ChunkError::BadSize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(s: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(&mut BytesMut::from(s), &mut Vec::new())
    }

    fn info(s: &str) -> Result<RequestInfo, HeadError> {
        request_info(&req(s)?.expect("complete head"))
    }

    #[test]
    fn a_request_head_is_split_off_and_the_rest_stays_in_the_buffer() {
        let mut buf =
            BytesMut::from("GET http://a.test/x?y HTTP/1.1\r\nHost: a.test\r\nX-A: 1\r\n\r\nBODY");
        let r = parse_request(&mut buf, &mut Vec::new()).unwrap().unwrap();
        assert_eq!(r.method(), "GET");
        assert_eq!(r.target(), b"http://a.test/x?y");
        assert_eq!(r.minor, 1);
        assert_eq!(r.head.first("host"), Some(&b"a.test"[..]));
        assert_eq!(r.head.first("X-a"), Some(&b"1"[..]));
        assert_eq!(&buf[..], b"BODY");
    }

    #[test]
    fn an_incomplete_head_asks_for_more_and_an_endless_one_is_refused() {
        assert!(req("GET / HTTP/1.1\r\nHost: a").unwrap().is_none());
        let mut big = String::from("GET / HTTP/1.1\r\n");
        while big.len() < MAX_HEAD {
            big.push_str(&format!("X-Filler: {}\r\n", "a".repeat(8000)));
        }
        assert_eq!(req(&big).unwrap_err(), HeadError::TooLarge);
    }

    #[test]
    fn smuggling_shaped_framing_is_refused() {
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
        ] {
            assert!(info(bad).is_err(), "{bad:?} was accepted");
        }
        // httparse refuses obs-fold and bare CR in header values.
        assert!(req("GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n").is_err());
        assert!(req("GET / HTTP/1.1\r\nX: a\rb\r\n\r\n").is_err());
    }

    #[test]
    fn request_framing_and_keep_alive_follow_the_version_and_connection() {
        let i = info("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert_eq!((i.body, i.keep_alive), (BodyLen::Length(5), true));
        let i = info("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n")
            .unwrap();
        assert_eq!((i.body, i.keep_alive), (BodyLen::Chunked, false));
        let i = info("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!((i.body, i.keep_alive), (BodyLen::Empty, false));
        let i = info("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap();
        assert!(i.keep_alive);
        let i =
            info("PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n").unwrap();
        assert!(i.expect_continue);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_never_go_upstream() {
        let r = req("GET http://a.test/p HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nProxy-Authorization: Basic x\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: websocket\r\nKeep-Alive: 5\r\nTrailer: x\r\nX-Keep: k\r\nContent-Length: 3\r\n\r\n")
            .unwrap()
            .unwrap();
        let i = request_info(&r).unwrap();
        let mut out = Vec::new();
        write_request_head(&mut out, &r, &i, b"/p", None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p HTTP/1.1\r\nHost: a.test\r\nX-Keep: k\r\ncontent-length: 3\r\n\r\n"
        );
    }

    #[test]
    fn a_missing_host_is_added_and_expect_is_dropped_when_answered_here() {
        let r =
            req("POST /u HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap()
                .unwrap();
        let i = request_info(&r).unwrap();
        let mut out = Vec::new();
        write_request_head(&mut out, &r, &i, b"/u", Some("a.test:8080"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /u HTTP/1.1\r\nhost: a.test:8080\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    fn resp(s: &str, head_request: bool) -> Result<ResponseInfo, HeadError> {
        let r = parse_response(&mut BytesMut::from(s), &mut Vec::new())?.expect("complete");
        response_info(&r, head_request, false)
    }

    #[test]
    fn only_a_bodyless_http_1_1_get_upgrading_to_websocket_alone_is_a_websocket_handshake() {
        let ws = |extra: &str| {
            info(&format!(
                "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
            ))
            .unwrap()
            .websocket
        };
        assert!(ws(""));
        assert!(ws("Sec-WebSocket-Version: 13\r\n"));
        assert!(!ws("Content-Length: 3\r\n"));
        assert!(!ws("Upgrade: h2c\r\n"));
        let other = |head: &str| info(head).unwrap().websocket;
        assert!(!other(
            "POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        ));
        assert!(!other(
            "GET / HTTP/1.0\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        ));
        assert!(!other(
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
        ));
        assert!(!other(
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive\r\n\r\n"
        ));
        // Only a handshake gets the upgrade headers upstream.
        let head = |s: &str| {
            let r = req(s).unwrap().unwrap();
            let i = request_info(&r).unwrap();
            let mut out = Vec::new();
            write_request_head(&mut out, &r, &i, b"/", None);
            String::from_utf8(out).unwrap()
        };
        let up = head("GET http://a/ HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Hop\r\nX-Hop: 1\r\n\r\n");
        assert!(
            up.contains("connection: upgrade\r\nupgrade: websocket\r\n"),
            "{up}"
        );
        assert!(!up.contains("X-Hop"), "{up}");
        let up = head(
            "GET http://a/ HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        );
        assert!(!up.to_ascii_lowercase().contains("upgrade"), "{up}");
    }

    #[test]
    fn a_101_is_accepted_only_as_the_answer_to_a_websocket_handshake() {
        let switch =
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let r = |s: &str, websocket: bool| {
            let r = parse_response(&mut BytesMut::from(s), &mut Vec::new())
                .unwrap()
                .unwrap();
            response_info(&r, false, websocket)
        };
        let ok = r(switch, true).unwrap();
        assert!(ok.switching && !ok.reusable && ok.body == BodyLen::Empty);
        assert_eq!(r(switch, false).unwrap_err(), HeadError::UnexpectedUpgrade);
        let h2c = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n";
        assert_eq!(r(h2c, true).unwrap_err(), HeadError::UnexpectedUpgrade);
        assert!(
            !r(
                "HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n",
                true
            )
            .unwrap()
            .switching
        );
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let r = resp("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", false).unwrap();
        assert_eq!((r.body, r.reusable), (BodyLen::Length(10), true));
        let r = resp("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true).unwrap();
        assert_eq!((r.body, r.declared_length), (BodyLen::Empty, Some(10)));
        let r = resp(
            "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!((r.body, r.declared_length), (BodyLen::Empty, None));
        let r = resp("HTTP/1.1 304 Not Modified\r\n\r\n", false).unwrap();
        assert_eq!(r.body, BodyLen::Empty);
        let r = resp("HTTP/1.1 100 Continue\r\n\r\n", false).unwrap();
        assert!(r.interim);
        let r = resp("HTTP/1.1 200 OK\r\n\r\n", false).unwrap();
        assert_eq!((r.body, r.reusable), (BodyLen::UntilClose, false));
        let r = resp(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!((r.body, r.reusable), (BodyLen::Chunked, false));
        let r = resp("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).unwrap();
        assert!(!r.reusable);
        let r = resp(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(!r.reusable);
        assert_eq!(
            resp("HTTP/1.1 101 Switching Protocols\r\n\r\n", false).unwrap_err(),
            HeadError::UnexpectedUpgrade
        );
        assert!(resp(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false
        )
        .is_err());
    }

    #[test]
    fn the_client_gets_upstreams_end_to_end_headers_and_the_gateways_framing() {
        let mut buf = BytesMut::from("HTTP/1.1 200 Fine\r\nConnection: x-hop\r\nX-Hop: 1\r\nServer: s\r\nTransfer-Encoding: chunked\r\nKeep-Alive: timeout=5\r\n\r\n");
        let r = parse_response(&mut buf, &mut Vec::new()).unwrap().unwrap();
        let i = response_info(&r, false, false).unwrap();
        let mut out = Vec::new();
        write_response_head(&mut out, &r, &i, BodyLen::UntilClose, ClientEnd::Close);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 Fine\r\nServer: s\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn a_refusal_carries_the_reason_in_a_header_and_the_body() {
        let mut out = Vec::new();
        write_refusal(&mut out, 403, "host x is not\r\nin the allowlist", false);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
        assert!(
            text.contains("x-cordon-reason: host x is not??in the allowlist\r\n"),
            "{text}"
        );
        assert!(
            text.ends_with("\r\n\r\ncordon: host x is not\r\nin the allowlist\n"),
            "{text}"
        );
        let body_len = "cordon: host x is not\r\nin the allowlist\n".len();
        assert!(text.contains(&format!("content-length: {body_len}\r\n")));
    }

    /// Feeds `input` in pieces of `piece` bytes; returns the payload or the error.
    fn decode(input: &[u8], piece: usize) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut dec = ChunkedDecoder::default();
        let mut buf = Vec::new();
        let mut fed = 0;
        let mut out = Vec::new();
        loop {
            let (n, what) = dec.step(&buf)?;
            match what {
                Chunk::Data(k) => out.extend_from_slice(&buf[..k]),
                Chunk::End => {
                    buf.drain(..n);
                    return Ok((out, buf.len() + input.len() - fed));
                }
                Chunk::Framing => {}
            }
            buf.drain(..n);
            if n == 0 {
                if fed == input.len() {
                    return Err(ChunkError::BadSize);
                }
                let take = piece.min(input.len() - fed);
                buf.extend_from_slice(&input[fed..fed + take]);
                fed += take;
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers_dropped() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        assert_eq!(decode(body, 3).unwrap(), (b"hello world".to_vec(), 4));
    }

    #[test]
    fn malformed_chunk_framing_is_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"x\r\n",
            b"11111111111111111\r\n",
            b"-1\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"0\r\nX: 1\n\r\n",
        ] {
            assert!(
                decode(bad, 64).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest! {
        #[test]
        fn chunked_encoding_round_trips_whatever_the_read_sizes(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
            piece in 1usize..50,
        ) {
            let mut wire = Vec::new();
            for c in &chunks {
                write_chunk_head(&mut wire, c.len() as u64);
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(LAST_CHUNK);
            let (payload, rest) = decode(&wire, piece).unwrap();
            prop_assert_eq!(payload, chunks.concat());
            prop_assert_eq!(rest, 0);
        }

        #[test]
        fn the_chunked_decoder_never_panics_or_overruns(input in proptest::collection::vec(any::<u8>(), 0..512), piece in 1usize..64) {
            if let Ok((payload, rest)) = decode(&input, piece) {
                prop_assert!(payload.len() + rest <= input.len());
            }
        }

        #[test]
        fn request_heads_never_panic_and_accepted_framing_is_unambiguous(
            lines in proptest::collection::vec(
                prop_oneof![
                    Just("Content-Length: 5".to_owned()),
                    Just("Content-Length: 6".to_owned()),
                    Just("Transfer-Encoding: chunked".to_owned()),
                    Just("Transfer-Encoding: identity".to_owned()),
                    Just("Connection: close, x-a".to_owned()),
                    Just("X-A: 1".to_owned()),
                    "[ -~]{0,20}".prop_map(|s| s),
                ],
                0..6,
            )
        ) {
            let text = format!("POST http://a.test/ HTTP/1.1\r\n{}\r\n\r\n", lines.join("\r\n"));
            if let Ok(Some(r)) = req(&text) {
                if let Ok(i) = request_info(&r) {
                    let cl: Vec<_> = r.head.values("content-length").collect();
                    let te = r.head.values("transfer-encoding").count();
                    prop_assert!(te == 0 || cl.is_empty());
                    match i.body {
                        BodyLen::Chunked => prop_assert_eq!(te, 1),
                        BodyLen::Length(_) => prop_assert!(te == 0 && !cl.is_empty()),
                        BodyLen::Empty => prop_assert_eq!(te, 0),
                        BodyLen::UntilClose => prop_assert!(false, "requests never run until close"),
                    }
                    let mut out = Vec::new();
                    write_request_head(&mut out, &r, &i, b"/", None);
                    let mut again = BytesMut::from(&out[..]);
                    let back = parse_request(&mut again, &mut Vec::new()).unwrap().unwrap();
                    let back_info = request_info(&back).unwrap();
                    prop_assert_eq!(back_info.body, i.body);
                    let names_x_a = r
                        .head
                        .values("connection")
                        .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(b"x-a")));
                    if names_x_a {
                        prop_assert!(back.head.first("x-a").is_none());
                    }
                }
            }
        }
    }
}
