//! The transparent listener: TCP connections the sandbox's nftables redirect sent here, from
//! clients that ignore proxy settings.
//!
//! Guarantees:
//! - The destination is the kernel's original destination (never client-supplied); a synthetic
//!   address is decided as the name it stands for, and a connection whose destination cannot be
//!   read is refused.
//! - A refused connection is reset (SO_LINGER 0), so the client sees ECONNRESET at once, and the
//!   attempt is recorded.
//! - Plain HTTP (a request line as the first line, on any port) is served request by request:
//!   each request's `Host` must name the destination and is decided on its own. TLS must carry
//!   the destination's name as SNI when it carries one. Anything else is decided on the
//!   destination alone; a client that waits for the server to speak, or dribbles its first
//!   line, still has its first bytes checked when they come (`crate::tunnel`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::authority::Host;
use crate::budget::ConnCheck;
use crate::core::{BudgetHit, Ctx};
use crate::event::Via;
use crate::http::serve_bound_http;
use crate::policy::Verdicted;
use crate::route::dest_for;
use crate::session::Session;
use crate::sni::Peek;
use crate::tunnel::{emit_blocked, looks_like_http, peek_first, prepare, run_tunnel, TunnelEnd};

pub(crate) async fn serve(ctx: Arc<Ctx>, session: Arc<Session>, listener: TcpListener) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "transparent accept");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = ctx.cancel.cancelled() => return,
        };
        let (stream, client) = stream;
        let ctx2 = ctx.clone();
        let session = session.clone();
        ctx.tasks.spawn(async move {
            // Not raced against the token from outside: every wait in `handle` ends on the
            // token (or a short timeout) by itself, so a running splice still records its event.
            let owners = ctx2.shared.owners.clone();
            // The client's socket is connected to where it meant to go, not to this listener.
            let server = match owners {
                Some(_) => ctx2.shared.original_dst.original_dst(&stream).ok(),
                None => None,
            };
            crate::owner::with_owner(
                owners,
                crate::owner::Transport::Tcp,
                Some(client),
                server,
                handle(&ctx2, &session, stream),
            )
            .await;
        });
    }
}

/// Closes `stream` with a TCP reset.
fn reset(stream: TcpStream) {
    // Linger 0 makes close() send RST instead of FIN.
    if let Err(e) = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "SO_LINGER");
    }
    drop(stream);
}

async fn handle(ctx: &Arc<Ctx>, session: &Arc<Session>, mut stream: TcpStream) {
    let start = Instant::now();
    let _ = stream.set_nodelay(true);
    let original = match ctx.shared.original_dst.original_dst(&stream) {
        Ok(a) => a,
        Err(e) => {
            let v = Verdicted {
                verdict: crate::event::Verdict::Block,
                rule: "no-original-destination".into(),
                reason: Some(format!(
                    "cannot read the connection's original destination: {e}"
                )),
            };
            emit_blocked(ctx, session, Via::Transparent, None, None, None, &v);
            reset(stream);
            return;
        }
    };
    let port = original.port();
    let dest = dest_for(&Host::Ip(original.ip()), &ctx.shared.synthetic);
    let host = dest.to_host_string();
    let ip = match &dest {
        crate::policy::Dest::Addr(a) => Some(*a),
        crate::policy::Dest::Name(_) => None,
    };

    // Refuse a destination the policy refuses before reading anything from the client.
    let pre = ctx.policy().decide_dest(&dest, port);
    if pre.blocked() {
        emit_blocked(
            ctx,
            session,
            Via::Transparent,
            Some(host),
            ip,
            Some(port),
            &pre,
        );
        reset(stream);
        return;
    }
    let permit = match session.budget.acquire_connection() {
        ConnCheck::Ok(p) => p,
        ConnCheck::OverInReport(limit) => {
            let hit = BudgetHit {
                via: Via::Transparent,
                host: Some(host.clone()),
                ip,
                port: Some(port),
            };
            ctx.budget_refused(session, &limit, &hit, true);
            None
        }
        ConnCheck::Refused(limit) => {
            let hit = BudgetHit {
                via: Via::Transparent,
                host: Some(host.clone()),
                ip,
                port: Some(port),
            };
            ctx.budget_refused(session, &limit, &hit, false);
            reset(stream);
            return;
        }
    };

    let (first, peek) = tokio::select! {
        r = peek_first(ctx, &mut stream, Vec::new()) => match r {
            Ok(x) => x,
            Err(_) => return,
        },
        _ = ctx.cancel.cancelled() => return,
    };
    if matches!(peek, Ok(Peek::NotTls)) && looks_like_http(&first) {
        serve_bound_http(
            ctx.clone(),
            session.clone(),
            (dest, port, Via::Transparent),
            stream,
            &first,
            permit,
        )
        .await;
        return;
    }
    let prepared = tokio::select! {
        r = prepare(ctx, session, Via::Transparent, &dest, port) => r,
        _ = ctx.cancel.cancelled() => return,
    };
    let route = match prepared {
        Ok(r) => r,
        Err(_) => {
            reset(stream);
            return;
        }
    };
    if let Some(rt) = ctx.shared.intercept.clone() {
        if let Some(host) = rt.intercepts(&route.dest) {
            crate::intercept::serve(
                ctx,
                rt,
                session,
                Via::Transparent,
                stream,
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
    match run_tunnel(
        ctx,
        session,
        Via::Transparent,
        &mut stream,
        first,
        peek,
        route,
        start,
    )
    .await
    {
        TunnelEnd::Refused => reset(stream),
        TunnelEnd::Closed => {}
        TunnelEnd::Http(first) => {
            serve_bound_http(
                ctx.clone(),
                session.clone(),
                (dest, port, Via::Transparent),
                stream,
                &first,
                permit,
            )
            .await;
        }
    }
}
