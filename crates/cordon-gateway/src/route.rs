//! From "the sandbox wants host:port" to a connected upstream socket, by one path for every
//! listener.
//!
//! Guarantees:
//! - A synthetic address (198.18.0.0/15) is mapped back to the name DNS handed it out for, and is
//!   decided as that name; an address the DNS never handed out stays an address and is refused as
//!   a blocked range.
//! - The destination is decided before anything is resolved; names that fail get no upstream
//!   query. IP literals are never resolved.
//! - Every resolved address is decided again (`decide_resolved`, which holds the anti-SSRF
//!   ranges), and the gateway connects only to addresses that passed, by address — it never
//!   resolves a second time.
//! - Mixed answers (some allowed, some in blocked ranges): the blocked addresses are dropped and
//!   only the allowed ones are tried, in the order upstream gave them (IPv4 first). If none is
//!   allowed, the destination is refused with the first blocked address's reason.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::authority::Host;
use crate::event::Verdict;
use crate::policy::{Dest, PolicyView, Verdicted};
use crate::resolve::{Resolve, ResolveError};
use crate::synthetic::{is_synthetic, SyntheticMap};

/// A destination that passed every check, with the addresses that may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub dest: Dest,
    pub port: u16,
    pub addrs: Vec<IpAddr>,
    pub verdict: Verdict,
    pub rule: String,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RouteError {
    /// The policy refused (the address that was refused, if the refusal is about one).
    Denied(Verdicted, Option<IpAddr>),
    /// The name could not be resolved; not a policy decision.
    Resolve(ResolveError),
}

/// The destination for a host the sandbox named, with synthetic addresses mapped back to names.
pub(crate) fn dest_for(host: &Host, synthetic: &SyntheticMap) -> Dest {
    match host {
        Host::Name(n) => Dest::Name(n.clone()),
        Host::Ip(ip) if is_synthetic(*ip) => match synthetic.lookup(*ip) {
            Some(name) => Dest::Name(name),
            None => Dest::Addr(*ip),
        },
        Host::Ip(ip) => Dest::Addr(*ip),
    }
}

/// Resolves (names only) and checks every address. `pre` is the already-made, non-blocking
/// decision for `dest:port`.
pub(crate) async fn resolve_checked(
    policy: &PolicyView,
    resolver: &dyn Resolve,
    dest: &Dest,
    port: u16,
    pre: Verdicted,
) -> Result<Route, RouteError> {
    let candidates = match dest {
        Dest::Addr(ip) => vec![*ip],
        Dest::Name(name) => {
            let mut addrs = resolver.resolve(name).await.map_err(RouteError::Resolve)?;
            // Stable: keeps upstream's order within each family.
            addrs.sort_by_key(|a| a.is_ipv6());
            addrs
        }
    };
    let mut allowed = Vec::new();
    let mut first_refusal = None;
    let mut verdict = pre.verdict;
    let mut rule = pre.rule.clone();
    let mut reason = pre.reason.clone();
    for addr in candidates {
        let v = policy.decide_addr(dest.name(), addr, port);
        if v.blocked() {
            if first_refusal.is_none() {
                first_refusal = Some((v, addr));
            }
            continue;
        }
        if allowed.is_empty() {
            // The rule that let the address through matters when it is an exemption.
            if v.rule.starts_with("allow_private:") && verdict == Verdict::Allow {
                rule = v.rule.clone();
            }
            if v.verdict == Verdict::ReportWouldBlock && verdict == Verdict::Allow {
                verdict = Verdict::ReportWouldBlock;
                rule = v.rule.clone();
                reason = v.reason.clone();
            }
        }
        allowed.push(addr);
    }
    if allowed.is_empty() {
        return Err(match first_refusal {
            Some((v, addr)) => RouteError::Denied(v, Some(addr)),
            None => RouteError::Resolve(ResolveError::NoAddresses {
                name: dest.to_host_string(),
            }),
        });
    }
    Ok(Route {
        dest: dest.clone(),
        port,
        addrs: allowed,
        verdict,
        rule,
        reason,
    })
}

/// Connects to the first address of `route` that answers, trying each in order.
pub(crate) async fn connect(
    route: &Route,
    timeout: Duration,
) -> io::Result<(TcpStream, SocketAddr)> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
    for ip in &route.addrs {
        let addr = SocketAddr::new(*ip, route.port);
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                // Small request/response traffic must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                return Ok((stream, addr));
            }
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {addr} timed out"),
                )
            }
        }
    }
    Err(last)
}
