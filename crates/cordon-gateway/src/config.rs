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
    /// Honey tokens placed in the sandbox (variable name, value); sandbox mode only.
    pub canaries: Vec<(String, String)>,
    pub clients: Clients,
    pub upstream: Upstream,
    /// How the transparent listener learns where a connection was going.
    pub original_dst: Arc<dyn OriginalDst>,
    pub timeouts: Timeouts,
    /// Largest number of names the DNS server maps to synthetic addresses (at most 2^17 - 2).
    pub max_synthetic_names: u32,
    /// Finds the sandbox process behind each connection and DNS query ([`crate::owner`]);
    /// `None` (the default) attributes events to the session only.
    pub owners: Option<Arc<dyn SocketOwners>>,
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
            owners: None,
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
            .field("owners", &self.owners.is_some())
            .finish_non_exhaustive()
    }
}
