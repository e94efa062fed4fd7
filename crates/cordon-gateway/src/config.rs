//! How a gateway is configured.
//!
//! Guarantees: every field has a safe default; a gateway is always built from a policy (default
//! deny), never from an empty allow-all configuration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cordon_policy::{DetectPolicy, NetworkPolicy};

use crate::event::SessionInfo;
use crate::origdst::{OriginalDst, SoOriginalDst};
use crate::owner::SocketOwners;
use crate::resolve::Resolve;

/// Who the traffic belongs to.
#[derive(Clone, Debug)]
pub enum Clients {
    /// Sandbox mode: every connection on every listener is this session's.
    Session(SessionInfo),
    /// Standalone mode (`cordon gateway`): each request names its session with a
    /// `Proxy-Authorization` token from [`crate::Gateway::issue_token`]; requests without a valid
    /// token get 407. Only the `http` listener may be used.
    Tokens,
}

/// Where the gateway resolves real addresses.
#[derive(Clone)]
pub enum Upstream {
    /// The nameservers in the host's `/etc/resolv.conf`.
    System,
    /// These nameservers (UDP, TCP fallback).
    Nameservers(Vec<SocketAddr>),
    /// A resolver of the caller's (tests).
    Custom(Arc<dyn Resolve>),
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upstream::System => f.write_str("System"),
            Upstream::Nameservers(s) => f.debug_tuple("Nameservers").field(s).finish(),
            Upstream::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// What to do when a budget is exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnExceedAction {
    Block,
    Terminate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect to an upstream address (each address tried).
    pub connect: Duration,
    /// How long a captured connection or CONNECT tunnel waits for the client's first bytes
    /// (ClientHello or request line) before it is treated as a server-speaks-first protocol and
    /// decided on its destination alone.
    pub first_bytes: Duration,
    /// Reading an HTTP request head.
    pub header_read: Duration,
    /// An idle DNS-over-TCP connection.
    pub dns_tcp_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            first_bytes: Duration::from_secs(1),
            header_read: Duration::from_secs(30),
            dns_tcp_idle: Duration::from_secs(10),
        }
    }
}

/// Everything [`crate::Gateway::new`] needs.
#[derive(Clone)]
pub struct GatewayConfig {
    pub policy: NetworkPolicy,
    /// The detection rules of every session.
    pub detect: DetectPolicy,
    /// Honey tokens placed in the sandbox (its environment, its workspace); sandbox mode only.
    pub canaries: Vec<crate::detect::canary::Canary>,
    pub clients: Clients,
    pub upstream: Upstream,
    /// How the transparent listener learns where a connection was going.
    pub original_dst: Arc<dyn OriginalDst>,
    pub timeouts: Timeouts,
    /// Largest number of names the DNS server maps to synthetic addresses (at most 2^17 - 2).
    pub max_synthetic_names: u32,
    /// TLS interception, credentials and DLP; `None`: no interception (TLS is tunnelled).
    pub intercept: Option<Arc<InterceptConfig>>,
    /// Finds the sandbox process behind each connection and DNS query ([`crate::owner`]);
    /// `None` (the default) attributes events to the session only.
    pub owners: Option<Arc<dyn SocketOwners>>,
    /// Standalone mode: most client connections at once that have not yet named a session
    /// with a valid token (each may buffer up to 256 KiB of head for the head timeout). Past
    /// it a new connection is answered `503` and closed (a `Blocked` event, rule
    /// `unauthenticated-limit`). Sandbox mode charges every connection to its session's
    /// `max_connections` instead.
    pub max_unauthenticated: usize,
}

/// Default of [`GatewayConfig::max_unauthenticated`].
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 256;

/// What the gateway needs to intercept TLS: built by the supervisor for one session.
pub struct InterceptConfig {
    /// The session CA: leaf certificates for intercepted hosts.
    pub ca: crate::tls::SessionCa,
    /// Hosts whose TLS is terminated: the policy's `network.intercept`, plus every host a
    /// credential or an HTTP rule names.
    pub hosts: Vec<cordon_policy::InterceptHost>,
    /// Credentials with their placeholders and secrets.
    pub credentials: Vec<crate::creds::LiveCredential>,
    /// Verification of upstream servers: the host's trust store plus any extra roots the
    /// operator configured (see [`crate::tls::upstream_config`]).
    pub upstream: Arc<rustls::ClientConfig>,
    /// Largest request body scanned; a larger request body is refused.
    pub max_scan_bytes: u64,
}

/// Default for [`InterceptConfig::max_scan_bytes`].
pub const DEFAULT_MAX_SCAN_BYTES: u64 = 16 * 1024 * 1024;

impl InterceptConfig {
    /// The hosts a session intercepts: `network.intercept`, credential hosts and rule hosts.
    pub fn hosts_for(
        network: &NetworkPolicy,
        credentials: &[cordon_policy::Credential],
    ) -> Vec<cordon_policy::InterceptHost> {
        use cordon_policy::InterceptHost;
        let mut hosts: Vec<InterceptHost> = network.intercept.clone();
        let named = credentials
            .iter()
            .flat_map(|c| c.hosts.iter())
            .chain(network.rules.iter().map(|r| &r.host));
        for h in named {
            let entry = InterceptHost::Name(h.clone());
            if !hosts.contains(&entry) {
                hosts.push(entry);
            }
        }
        hosts
    }

    /// True if the gateway terminates TLS for `host`.
    pub fn intercepts(&self, host: &cordon_policy::host::HostName) -> bool {
        self.hosts.iter().any(|h| h.matches(host))
    }
}

impl std::fmt::Debug for InterceptConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets: names only.
        f.debug_struct("InterceptConfig")
            .field("hosts", &self.hosts)
            .field(
                "credentials",
                &self
                    .credentials
                    .iter()
                    .map(|c| &c.spec.name)
                    .collect::<Vec<_>>(),
            )
            .field("max_scan_bytes", &self.max_scan_bytes)
            .finish_non_exhaustive()
    }
}

impl GatewayConfig {
    /// A sandbox-mode gateway for `session`: system resolver, `SO_ORIGINAL_DST`, default timeouts.
    pub fn new(policy: NetworkPolicy, detect: DetectPolicy, session: SessionInfo) -> Self {
        GatewayConfig {
            policy,
            detect,
            canaries: Vec::new(),
            clients: Clients::Session(session),
            upstream: Upstream::System,
            original_dst: Arc::new(SoOriginalDst),
            timeouts: Timeouts::default(),
            max_synthetic_names: 1 << 16,
            intercept: None,
            owners: None,
            max_unauthenticated: DEFAULT_MAX_UNAUTHENTICATED,
        }
    }

    /// A standalone gateway whose clients authenticate with tokens.
    pub fn standalone(policy: NetworkPolicy, detect: DetectPolicy) -> Self {
        GatewayConfig {
            clients: Clients::Tokens,
            ..Self::new(policy, detect, SessionInfo::unauthenticated())
        }
    }
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("policy", &self.policy)
            .field("detect", &self.detect)
            .field("canaries", &self.canaries.len())
            .field("clients", &self.clients)
            .field("upstream", &self.upstream)
            .field("timeouts", &self.timeouts)
            .field("max_synthetic_names", &self.max_synthetic_names)
            .field("intercept", &self.intercept)
            .field("owners", &self.owners.is_some())
            .field("max_unauthenticated", &self.max_unauthenticated)
            .finish_non_exhaustive()
    }
}
