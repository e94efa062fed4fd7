//! Byte tunnels: CONNECT through the explicit proxy, and captured non-HTTP TCP.
//!
//! Guarantees:
//! - A tunnel opens only after its destination was decided, resolved and every address checked.
//! - The client's first bytes are inspected before any byte goes upstream: a TLS ClientHello must
//!   name (SNI) the host the tunnel was decided for, or the tunnel is closed and nothing is sent
//!   upstream. A ClientHello without SNI is allowed (it cannot front another host by name); a
//!   malformed ClientHello is refused. Clients that do not speak first within the first-bytes
//!   timeout are decided on the destination alone.
//! - Every tunnel produces one `Connection` event at close with the bytes that crossed and its
//!   duration, or one `Blocked` event.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use cordon_policy::host::HostName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::authority::parse_authority;
use crate::budget::RateCheck;
use crate::core::{elapsed_ms, BudgetHit, Ctx};
use crate::event::{EventKind, NetEvent, Verdict, Via};
use crate::io::{read_until, write_up, Meter, MeterTarget};
use crate::policy::{Dest, Verdicted};
use crate::route::{self, dest_for, Route, RouteError};
use crate::session::Session;
use crate::sni::{peek_client_hello, Peek, SniError, MAX_HANDSHAKE_LEN};
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
            let conn = crate::http::ClientConn::bound(
                crate::http::ConnMode::Fixed {
                    dest: route.dest.clone(),
                    port: route.port,
                    via: Via::Connect,
                },
                client,
                &first,
                session.clone(),
                None,
            );
            Box::pin(crate::http::serve_client(ctx.clone(), conn)).await;
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
            run_tunnel(
                ctx,
                session,
                Via::Connect,
                &client,
                first,
                peek,
                route,
                start,
            )
            .await;
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
        |b| !matches!(peek_client_hello(b), Ok(Peek::NeedMore)) && !partial_request_line(b),
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

/// True while `b` could still be the start of an HTTP request line whose method is not complete.
fn partial_request_line(b: &[u8]) -> bool {
    b.len() < 16 && !b.is_empty() && b.iter().all(|c| c.is_ascii_uppercase())
}

/// True if `b` starts like an HTTP/1 request line (`METHOD SP`).
pub(crate) fn looks_like_http(b: &[u8]) -> bool {
    let method_len = b.iter().take_while(|c| c.is_ascii_uppercase()).count();
    (3..=10).contains(&method_len) && b.get(method_len) == Some(&b' ')
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TunnelEnd {
    /// Refused by the first-bytes check; nothing went upstream.
    Refused,
    /// Opened (or failed to connect) and closed; the event is recorded.
    Closed,
}

/// Checks the first bytes (SNI), connects, sends `first` and splices; records the outcome.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_tunnel(
    ctx: &Arc<Ctx>,
    session: &Arc<Session>,
    via: Via,
    client: &TcpStream,
    first: Vec<u8>,
    peek: Result<Peek, SniError>,
    route: Route,
    start: Instant,
) -> TunnelEnd {
    let host = route.dest.to_host_string();
    if let Err(v) = check_first_bytes(&route.dest, peek) {
        emit_blocked(ctx, session, via, Some(host), None, Some(route.port), &v);
        return TunnelEnd::Refused;
    }
    let connected = tokio::select! {
        r = route::connect(&route, ctx.shared.timeouts.connect) => r,
        // Shutting down before the tunnel opened: nothing moved, nothing to record.
        _ = ctx.cancel.cancelled() => return TunnelEnd::Closed,
    };
    let (mut stream, addr): (TcpStream, SocketAddr) = match connected {
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
    if !first.is_empty() {
        if let Err(e) = write_up(&mut stream, &meter, &first).await {
            error = Some(e.to_string());
        }
    }
    if error.is_none() {
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
