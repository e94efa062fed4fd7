//! cordon-gateway: the sandbox's only way out.
//!
//! The gateway serves four listeners, all handed to it already bound (inside the sandbox's
//! network namespace, in production):
//!
//! - `http`: an explicit HTTP proxy (absolute-form requests and CONNECT);
//! - `dns_udp` / `dns_tcp`: a DNS server that answers allowed names with synthetic addresses and
//!   everything else with NXDOMAIN, never asking upstream;
//! - `transparent`: TCP connections redirected by nftables, destination from `SO_ORIGINAL_DST`.
//!
//! Guarantees (each module states its own in detail):
//! - Every path ends in the same policy decision (`cordon_policy::decide`), default deny, and the
//!   same event call ([`EventSink`]); blocked attempts are always recorded.
//! - The gateway resolves names itself, checks every resolved address against the anti-SSRF
//!   ranges, and connects to exactly the address it checked.
//! - HTTP Host, absolute-URI authority, CONNECT target and TLS SNI must agree.
//! - Budgets (request rates, concurrent connections, bytes out/in) are per session, shared by all
//!   paths.
//! - [`Gateway::serve`] returns when its cancellation token fires, after every connection task has
//!   ended and recorded its event.
//!
//! Wiring it up (the supervisor's side):
//!
//! ```no_run
//! use std::sync::Arc;
//! use cordon_gateway::{ChannelSink, Gateway, GatewayConfig, Listeners, SessionInfo};
//! # async fn run(policy: cordon_policy::Policy, http: std::net::TcpListener,
//! #              dns_udp: std::net::UdpSocket, dns_tcp: std::net::TcpListener,
//! #              transparent: std::net::TcpListener) -> Result<(), Box<dyn std::error::Error>> {
//! let session = SessionInfo { id: "s-1".into(), user: "alice".into(), code_sha256: "…".into() };
//! let gateway = Gateway::new(GatewayConfig::new(policy.network, policy.detect, session))?;
//! let mut terminate = gateway.take_terminate_receiver().expect("taken once");
//! let (sink, events) = ChannelSink::new(); // drain `events` on the audit writer thread
//! let cancel = tokio_util::sync::CancellationToken::new();
//! let listeners = Listeners {
//!     http: Some(http),
//!     dns_udp: Some(dns_udp),
//!     dns_tcp: Some(dns_tcp),
//!     transparent: Some(transparent),
//! };
//! let served = tokio::spawn({
//!     let (gateway, cancel) = (gateway.clone(), cancel.clone());
//!     async move { gateway.serve(listeners, Arc::new(sink), cancel).await }
//! });
//! if let Some(request) = terminate.recv().await {
//!     eprintln!("ending session {}: {}", request.session.id, request.reason);
//! }
//! cancel.cancel();
//! let stats = served.await??;
//! # drop((events, stats)); Ok(())
//! # }
//! ```

pub mod authority;
mod budget;
pub mod config;
mod core;
pub mod creds;
pub mod detect;
pub mod dlp;
mod dns;
pub mod event;
mod h1;
mod h2frames;
pub mod hrr;
mod http;
mod intercept;
mod intercept_h2;
mod io;
pub mod origdst;
pub mod owner;
mod policy;
pub mod resolve;
mod route;
mod session;
pub mod sni;
mod splice;
mod stats;
pub mod synthetic;
pub mod tls;
mod tokens;
mod transparent;
mod tunnel;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::config::{
    Clients, GatewayConfig, InterceptConfig, Timeouts, Upstream, DEFAULT_MAX_SCAN_BYTES,
    DEFAULT_MAX_UNAUTHENTICATED,
};
pub use crate::core::TerminateRequest;
pub use crate::detect::{Detection, Evidence, Rule, Severity};
pub use crate::event::{
    ChannelSink, EventKind, EventSink, MemorySink, NetEvent, NoopSink, SessionInfo, Verdict, Via,
};
pub use crate::origdst::{FixedOriginalDst, OriginalDst, SoOriginalDst};
pub use crate::owner::{ProcessInfo, SocketOwners, Transport};
pub use crate::resolve::{Resolve, ResolveError, ResolveFuture, UpstreamResolver};
pub use crate::stats::GatewayStats;
pub use crate::tokens::{TokenError, TOKEN_USER};

use crate::core::{Ctx, Shared};
use crate::detect::Detector;
use crate::policy::PolicyView;
use crate::session::Session;
use crate::synthetic::SyntheticMap;
use crate::tokens::Attribution;

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error(transparent)]
    Resolver(#[from] ResolveError),
    #[error("cannot use the {listener} listener: {source}")]
    Listener {
        listener: &'static str,
        source: std::io::Error,
    },
    #[error("the {0} listener needs a sandbox session; a token-authenticated (standalone) gateway serves only the HTTP proxy")]
    NeedsSession(&'static str),
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// Already-bound sockets to serve. Absent listeners are simply not served.
#[derive(Debug, Default)]
pub struct Listeners {
    pub http: Option<std::net::TcpListener>,
    pub dns_udp: Option<std::net::UdpSocket>,
    pub dns_tcp: Option<std::net::TcpListener>,
    pub transparent: Option<std::net::TcpListener>,
}

/// The egress gateway. Cheap to clone; clones share sessions, tokens and the synthetic map.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
    terminate_rx: Arc<Mutex<Option<mpsc::UnboundedReceiver<TerminateRequest>>>>,
    detections_rx: Arc<Mutex<Option<mpsc::UnboundedReceiver<Detection>>>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Builds a gateway. Fails only if the upstream resolver cannot be configured (for
    /// [`Upstream::System`], when `/etc/resolv.conf` cannot be read).
    pub fn new(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        let detect = config.detect.clone();
        let policy = PolicyView::new(config.policy);
        let limits = policy.budget_limits();
        let enforce = policy.enforcing();
        let resolver: Arc<dyn Resolve> = match config.upstream {
            Upstream::System => Arc::new(UpstreamResolver::from_system_conf()?),
            Upstream::Nameservers(servers) => {
                Arc::new(UpstreamResolver::with_nameservers(&servers)?)
            }
            Upstream::Custom(r) => r,
        };
        let unauthenticated = matches!(config.clients, Clients::Tokens).then(|| {
            Arc::new(tokio::sync::Semaphore::new(
                config
                    .max_unauthenticated
                    .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            ))
        });
        let attribution = match config.clients {
            Clients::Session(info) => {
                let detector = Detector::new(detect, &config.canaries);
                Attribution::Fixed(Arc::new(Session::new(info, limits, enforce, detector)))
            }
            Clients::Tokens => Attribution::Tokens {
                sessions: RwLock::new(HashMap::new()),
                limits,
                enforce,
                detect: Box::new(detect),
            },
        };
        let (terminate_tx, terminate_rx) = mpsc::unbounded_channel();
        let (detections_tx, detections_rx) = mpsc::unbounded_channel();
        Ok(Gateway {
            shared: Arc::new(Shared {
                policy,
                timeouts: config.timeouts,
                synthetic: SyntheticMap::with_capacity(config.max_synthetic_names),
                resolver,
                original_dst: config.original_dst,
                attribution,
                stats: Default::default(),
                intercept: config
                    .intercept
                    .map(|c| Arc::new(crate::intercept::Runtime::new(c, &config.canaries))),
                terminate_tx,
                detections_tx,
                // A token a process put on its own command line stays out of the events.
                owners: config
                    .owners
                    .map(|o| crate::detect::canary::redacting(o, &config.canaries)),
                unauthenticated,
                unauthenticated_refused: std::sync::Mutex::new((None, 0)),
            }),
            terminate_rx: Arc::new(Mutex::new(Some(terminate_rx))),
            detections_rx: Arc::new(Mutex::new(Some(detections_rx))),
        })
    }

    /// The channel on which the gateway asks the supervisor to end a session (budget exceeded
    /// with `on_exceed = "terminate"`, or `terminate_after_blocked` reached). Returns `Some` once.
    pub fn take_terminate_receiver(&self) -> Option<mpsc::UnboundedReceiver<TerminateRequest>> {
        match self.terminate_rx.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }

    /// The channel on which the gateway reports every detection-rule firing (after carrying
    /// out its block or terminate response), for the supervisor's alerts. Returns `Some` once.
    pub fn take_detection_receiver(&self) -> Option<mpsc::UnboundedReceiver<Detection>> {
        match self.detections_rx.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }

    /// Looks for the session's honey tokens in outbound bytes that the gateway has in the clear
    /// (the TLS-interception path calls this on decrypted request heads and body prefixes).
    /// A hit fires the canary rule with its response, exactly like a plain-HTTP hit; returns
    /// whether the bytes must not be forwarded.
    pub fn scan_outbound(&self, session_id: &str, bytes: &[u8], where_: &str) -> bool {
        let Some(session) = self.shared.attribution.by_id(session_id) else {
            return false;
        };
        match session.detector.scan(&session.info, bytes, where_) {
            Some(d) => {
                crate::core::detected(&self.shared, &session, d);
                true
            }
            None => false,
        }
    }

    /// Standalone mode: creates a session with its own budgets and returns the token its clients
    /// send as `Proxy-Authorization: Basic base64(cordon:<token>)` or `Bearer <token>`. In
    /// sandbox mode the token is returned but not needed (every request is the sandbox's).
    pub fn issue_token(&self, session: SessionInfo) -> Result<String, GatewayError> {
        Ok(self.shared.attribution.issue(session)?)
    }

    /// Forgets a token; its clients get 407 from then on. Returns whether it existed.
    pub fn revoke_token(&self, token: &str) -> bool {
        self.shared.attribution.revoke(token)
    }

    /// Totals so far.
    pub fn stats(&self) -> GatewayStats {
        self.shared.stats.snapshot()
    }

    /// Serves `listeners` until `cancel` fires, then waits for every connection to end and
    /// returns the totals. Events go to `sink`.
    pub async fn serve(
        &self,
        listeners: Listeners,
        sink: Arc<dyn EventSink>,
        cancel: CancellationToken,
    ) -> Result<GatewayStats, GatewayError> {
        let fixed = self.shared.attribution.fixed().cloned();
        let needs_session =
            |name: &'static str| fixed.clone().ok_or(GatewayError::NeedsSession(name));
        let tcp = |name: &'static str, l: std::net::TcpListener| {
            l.set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(l))
                .map_err(|source| GatewayError::Listener {
                    listener: name,
                    source,
                })
        };
        // Check and convert everything before serving anything, so a bad listener changes nothing.
        let http = listeners.http.map(|l| tcp("http", l)).transpose()?;
        let dns_udp = match listeners.dns_udp {
            Some(s) => {
                let session = needs_session("dns_udp")?;
                let socket = s
                    .set_nonblocking(true)
                    .and_then(|()| UdpSocket::from_std(s))
                    .map_err(|source| GatewayError::Listener {
                        listener: "dns_udp",
                        source,
                    })?;
                Some((socket, session))
            }
            None => None,
        };
        let dns_tcp = match listeners.dns_tcp {
            Some(l) => Some((tcp("dns_tcp", l)?, needs_session("dns_tcp")?)),
            None => None,
        };
        let transparent = match listeners.transparent {
            Some(l) => Some((tcp("transparent", l)?, needs_session("transparent")?)),
            None => None,
        };

        let tasks = TaskTracker::new();
        let ctx = Arc::new(Ctx {
            shared: self.shared.clone(),
            sink,
            cancel: cancel.clone(),
            tasks: tasks.clone(),
        });
        if let Some(l) = http {
            tasks.spawn(serve_proxy(ctx.clone(), l));
        }
        if let Some((s, session)) = dns_udp {
            tasks.spawn(dns::serve_udp(ctx.clone(), session, s));
        }
        if let Some((l, session)) = dns_tcp {
            tasks.spawn(dns::serve_tcp(ctx.clone(), session, l));
        }
        if let Some((l, session)) = transparent {
            tasks.spawn(transparent::serve(ctx.clone(), session, l));
        }
        cancel.cancelled().await;
        tasks.close();
        drop(ctx);
        tasks.wait().await;
        Ok(self.stats())
    }
}

async fn serve_proxy(ctx: Arc<Ctx>, listener: TcpListener) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::debug!(error = %e, "proxy accept");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = ctx.cancel.cancelled() => return,
        };
        let (stream, client) = stream;
        let _ = stream.set_nodelay(true);
        // Where the client's socket is connected: this listener, unless the connection was
        // redirected (then its original destination; the same call answers both).
        let server = ctx.shared.owners.as_ref().and_then(|_| {
            ctx.shared
                .original_dst
                .original_dst(&stream)
                .or_else(|_| stream.local_addr())
                .ok()
        });
        ctx.tasks.spawn(owner::with_owner(
            ctx.shared.owners.clone(),
            owner::Transport::Tcp,
            Some(client),
            server,
            http::serve_proxy_client(ctx.clone(), stream),
        ));
    }
}
