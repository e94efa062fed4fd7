//! The gateway's view of the policy: every verdict here comes from `cordon_policy::decide`'s two
//! functions; this module only maps their answers to event verdicts and budget limits.
//!
//! Guarantees:
//! - The gateway makes no allow/deny judgement of its own: a name for DNS is decided by calling
//!   `decide` with a port some entry naming it allows (so "allowed on some port" is still the one
//!   decision function's answer).
//! - `Decision { allowed: false }` is always [`Verdict::Block`]; `allowed` without
//!   `enforced_allowed` (report mode) is [`Verdict::ReportWouldBlock`].

use std::net::IpAddr;

use cordon_policy::allow::{PortSpec, DEFAULT_PORT};
use cordon_policy::decide::{decide, decide_resolved, Decision, Target};
use cordon_policy::host::HostName;
use cordon_policy::{Enforcement, NetworkPolicy, OnExceed};

use crate::budget::BudgetLimits;
use crate::config::OnExceedAction;
use crate::event::Verdict;

/// A decision, as the gateway records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdicted {
    pub verdict: Verdict,
    pub rule: String,
    pub reason: Option<String>,
}

impl Verdicted {
    pub fn blocked(&self) -> bool {
        self.verdict == Verdict::Block
    }
}

impl From<Decision> for Verdicted {
    fn from(d: Decision) -> Self {
        let verdict = match (d.allowed, d.enforced_allowed) {
            (false, _) => Verdict::Block,
            (true, true) => Verdict::Allow,
            (true, false) => Verdict::ReportWouldBlock,
        };
        Verdicted {
            verdict,
            rule: d.rule,
            reason: d.reason,
        }
    }
}

/// A destination after synthetic addresses were mapped back to names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Dest {
    Name(HostName),
    Addr(IpAddr),
}

impl Dest {
    pub fn target(&self) -> Target<'_> {
        match self {
            Dest::Name(n) => Target::Name(n),
            Dest::Addr(a) => Target::Addr(*a),
        }
    }
    pub fn name(&self) -> Option<&HostName> {
        match self {
            Dest::Name(n) => Some(n),
            Dest::Addr(_) => None,
        }
    }
    pub fn to_host_string(&self) -> String {
        match self {
            Dest::Name(n) => n.to_string(),
            Dest::Addr(a) => a.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct PolicyView {
    network: NetworkPolicy,
}

impl PolicyView {
    pub fn new(network: NetworkPolicy) -> Self {
        PolicyView { network }
    }

    /// Before resolution: may the sandbox go to `dest:port`?
    pub fn decide_dest(&self, dest: &Dest, port: u16) -> Verdicted {
        decide(&self.network, dest.target(), port).into()
    }

    /// Right before connecting: may the gateway connect to `addr:port` (resolved from `name`)?
    pub fn decide_addr(&self, name: Option<&HostName>, addr: IpAddr, port: u16) -> Verdicted {
        decide_resolved(&self.network, name, addr, port).into()
    }

    /// DNS: is `name` allowed on some port? Asks `decide` with the port of the first entry that
    /// names the host (443 when that entry allows any port, or when no entry names it, which
    /// yields the default-deny answer).
    pub fn decide_dns_name(&self, name: &HostName) -> Verdicted {
        let target = Target::Name(name);
        let port = self
            .network
            .allow
            .iter()
            .chain(&self.network.allow_private)
            .find(|e| e.matches_host(target))
            .map_or(DEFAULT_PORT, |e| match e.port() {
                PortSpec::Any => DEFAULT_PORT,
                PortSpec::One(p) => p,
            });
        decide(&self.network, target, port).into()
    }

    /// The network policy (for [`cordon_policy::decide_request`]).
    pub fn network(&self) -> &NetworkPolicy {
        &self.network
    }

    pub fn enforcing(&self) -> bool {
        self.network.mode == Enforcement::Enforce
    }

    /// The session budgets. A limit of 0 refuses everything (fail closed); the policy crate
    /// only accepts positive limits anyway.
    pub fn budget_limits(&self) -> BudgetLimits {
        let r = &self.network.rate;
        BudgetLimits {
            requests_per_minute: Some(r.requests_per_minute),
            requests_per_minute_per_host: Some(r.requests_per_minute_per_host),
            max_connections: Some(r.max_connections),
            max_bytes_out: Some(r.max_bytes_out.0),
            max_bytes_in: Some(r.max_bytes_in.0),
        }
    }

    pub fn on_exceed(&self) -> OnExceedAction {
        match self.network.rate.on_exceed {
            OnExceed::Block => OnExceedAction::Block,
            OnExceed::Terminate => OnExceedAction::Terminate,
        }
    }
}
