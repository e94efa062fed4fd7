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
    let mut outcome = None;
    for addr in candidates {
        let v = policy.decide_addr(dest.name(), addr, port);
        if v.blocked() {
            if first_refusal.is_none() {
                first_refusal = Some((v, addr));
            }
            continue;
        }
        if outcome.is_none() {
            outcome = Some(combine(&pre, &v));
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
    let Some(outcome) = outcome else {
        return Err(RouteError::Resolve(ResolveError::NoAddresses {
            name: dest.to_host_string(),
        }));
    };
    Ok(Route {
        dest: dest.clone(),
        port,
        addrs: allowed,
        verdict: outcome.verdict,
        rule: outcome.rule,
        reason: outcome.reason,
    })
}

/// The event verdict for a destination decision `pre` and the (non-blocking) decision `addr` for
/// the address used: report-mode "would block" wins; otherwise an `allow_private` exemption is
/// named, because it is what let a private address through.
pub(crate) fn combine(pre: &Verdicted, addr: &Verdicted) -> Verdicted {
    if pre.verdict == Verdict::ReportWouldBlock {
        return pre.clone();
    }
    if addr.verdict == Verdict::ReportWouldBlock || addr.rule.starts_with("allow_private:") {
        return addr.clone();
    }
    pre.clone()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::ResolveFuture;
    use cordon_policy::host::HostName;
    use cordon_policy::{AllowEntry, Enforcement, NetworkPolicy};
    use std::sync::Mutex;

    /// Answers from a table and counts lookups.
    struct Scripted {
        answers: Vec<IpAddr>,
        asked: Mutex<Vec<String>>,
    }

    impl Resolve for Scripted {
        fn resolve<'a>(&'a self, name: &'a HostName) -> ResolveFuture<'a> {
            self.asked.lock().unwrap().push(name.to_string());
            let answers = self.answers.clone();
            Box::pin(async move { Ok(answers) })
        }
    }

    fn scripted(answers: &[&str]) -> Scripted {
        Scripted {
            answers: answers.iter().map(|a| a.parse().unwrap()).collect(),
            asked: Mutex::new(Vec::new()),
        }
    }

    fn view(allow: &[&str], allow_private: &[&str], mode: Enforcement) -> PolicyView {
        let parse = |v: &[&str]| v.iter().map(|a| AllowEntry::parse(a).unwrap()).collect();
        PolicyView::new(NetworkPolicy {
            mode,
            allow: parse(allow),
            allow_private: parse(allow_private),
            ..NetworkPolicy::default()
        })
    }

    fn name(s: &str) -> Dest {
        Dest::Name(HostName::parse(s).unwrap())
    }

    async fn route(
        p: &PolicyView,
        r: &Scripted,
        dest: &Dest,
        port: u16,
    ) -> Result<Route, RouteError> {
        let pre = p.decide_dest(dest, port);
        assert!(!pre.blocked(), "{pre:?}");
        resolve_checked(p, r, dest, port, pre).await
    }

    #[tokio::test]
    async fn mixed_answers_keep_only_the_allowed_addresses_ipv4_first() {
        let p = view(&["mixed.test"], &[], Enforcement::Enforce);
        let r = scripted(&[
            "10.0.0.5",
            "2001:4860::1",
            "1.2.3.4",
            "169.254.169.254",
            "5.6.7.8",
        ]);
        let route = route(&p, &r, &name("mixed.test"), 443).await.unwrap();
        let want: Vec<IpAddr> = ["1.2.3.4", "5.6.7.8", "2001:4860::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(route.addrs, want);
        assert_eq!(
            (route.verdict, route.rule.as_str()),
            (Verdict::Allow, "mixed.test")
        );
    }

    #[tokio::test]
    async fn all_refused_answers_refuse_the_destination_with_the_first_reason() {
        let p = view(&["private.test"], &[], Enforcement::Report);
        let r = scripted(&["10.0.0.5", "127.0.0.1"]);
        let err = route(&p, &r, &name("private.test"), 443).await.unwrap_err();
        let RouteError::Denied(v, ip) = err else {
            panic!("{err:?}")
        };
        assert_eq!(ip, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(v.rule, "ssrf:private");
        assert_eq!(v.verdict, Verdict::Block);
    }

    #[tokio::test]
    async fn address_destinations_are_never_resolved() {
        let p = view(&[], &["127.0.0.1/32:*"], Enforcement::Enforce);
        let r = scripted(&["1.2.3.4"]);
        let route = route(&p, &r, &Dest::Addr("127.0.0.1".parse().unwrap()), 80)
            .await
            .unwrap();
        assert_eq!(route.addrs, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(r.asked.lock().unwrap().is_empty());
    }

    #[test]
    fn synthetic_addresses_map_back_to_their_names_and_unknown_ones_stay_addresses() {
        let map = SyntheticMap::new();
        let n = HostName::parse("api.github.com").unwrap();
        let ip = map.assign(&n).unwrap();
        assert_eq!(dest_for(&Host::Ip(ip.into()), &map), Dest::Name(n.clone()));
        let other: IpAddr = "198.18.9.9".parse().unwrap();
        assert_eq!(dest_for(&Host::Ip(other), &map), Dest::Addr(other));
        assert_eq!(dest_for(&Host::Name(n.clone()), &map), Dest::Name(n));
    }

    #[test]
    fn combine_names_report_verdicts_and_private_exemptions() {
        let v = |verdict, rule: &str| Verdicted {
            verdict,
            rule: rule.into(),
            reason: None,
        };
        let pre = v(Verdict::Allow, "origin.test:*");
        assert_eq!(
            combine(&pre, &v(Verdict::Allow, "origin.test:*")).rule,
            "origin.test:*"
        );
        assert_eq!(
            combine(&pre, &v(Verdict::Allow, "allow_private:127.0.0.1/32:*")).rule,
            "allow_private:127.0.0.1/32:*"
        );
        let report = v(Verdict::ReportWouldBlock, "default-deny");
        assert_eq!(
            combine(&report, &v(Verdict::Allow, "allow_private:x")),
            report
        );
        assert_eq!(combine(&pre, &report), report);
    }
}
