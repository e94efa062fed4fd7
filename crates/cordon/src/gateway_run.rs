//! The egress gateway of one `cordon run` session, and its audit trail.
//!
//! Guarantees: the gateway serves only the listening sockets the sandbox's init created inside
//! the sandbox's network namespace, so the sandbox reaches nothing but them; it is started
//! after the sandbox is spawned (the supervisor is single-threaded until then) and stopped
//! only after the sandbox is gone, so no connection outlives its session. If the gateway dies,
//! its sockets close with it and the sandbox is left with no network at all. Every gateway
//! event goes to the audit store with the session's attribution; a terminate request (budget,
//! detection rule with `response = "terminate"`) wakes the supervision loop through a pipe, and
//! every detection firing is handed to the session's [`Alerts`].

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use cordon_audit::AuditWriter;
use cordon_gateway::{Gateway, GatewayConfig, GatewayStats, Listeners, SessionInfo, Upstream};
use cordon_policy::Policy;

use crate::alerts::Alerts;
use cordon_sandbox::netns::{self, DropCounters, GatewaySockets};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// What the gateway saw during a session, for the result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NetworkSummary {
    pub allowed: u64,
    pub blocked: u64,
    pub report_would_block: u64,
    pub dns_queries: u64,
    pub connections: u64,
    pub http_requests: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Packets the sandbox's firewall dropped (UDP other than DNS, ICMP, IPv6, other).
    pub dropped: Option<DropCounters>,
}

/// A running gateway.
pub struct RunningGateway {
    rt: tokio::runtime::Runtime,
    served: tokio::task::JoinHandle<Result<GatewayStats, cordon_gateway::GatewayError>>,
    /// Forwards detections to the alerts; ends when the gateway is gone.
    forward: Option<tokio::task::JoinHandle<()>>,
    cancel: CancellationToken,
    wake_read: OwnedFd,
    reason: Arc<Mutex<Option<String>>>,
    netlink: OwnedFd,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .map_err(|e| format!("pipe: {e}"))
}

impl RunningGateway {
    /// Starts serving the sandbox's sockets.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        policy: &Policy,
        session: SessionInfo,
        sockets: GatewaySockets,
        upstream_dns: &[std::net::SocketAddr],
        intercept: Option<Arc<cordon_gateway::InterceptConfig>>,
        writer: Arc<AuditWriter>,
        canaries: Vec<cordon_gateway::detect::canary::Canary>,
        alerts: Arc<Alerts>,
        owners: Option<Arc<dyn cordon_gateway::SocketOwners>>,
    ) -> Result<RunningGateway, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cordon-gateway")
            .enable_all()
            .build()
            .map_err(|e| format!("gateway runtime: {e}"))?;
        let mut config = GatewayConfig::new(policy.network.clone(), policy.detect.clone(), session);
        config.canaries = canaries;
        config.owners = owners;
        if !upstream_dns.is_empty() {
            config.upstream = Upstream::Nameservers(upstream_dns.to_vec());
        }
        config.intercept = intercept;
        let gateway = {
            let _guard = rt.enter();
            Gateway::new(config).map_err(|e| format!("gateway: {e}"))?
        };
        let GatewaySockets {
            http,
            dns_udp,
            dns_tcp,
            transparent,
            netlink,
            // The supervisor's attribution holds its own copy (see session.rs).
            sock_diag: _,
        } = sockets;
        let listeners = Listeners {
            http: Some(std::net::TcpListener::from(http)),
            dns_udp: Some(std::net::UdpSocket::from(dns_udp)),
            dns_tcp: Some(std::net::TcpListener::from(dns_tcp)),
            transparent: Some(std::net::TcpListener::from(transparent)),
        };
        let cancel = CancellationToken::new();
        let sink = Arc::new(crate::audit_sink::AuditSink::new(writer));
        let served = rt.spawn({
            let (gateway, cancel) = (gateway.clone(), cancel.clone());
            async move { gateway.serve(listeners, sink, cancel).await }
        });
        let forward = gateway.take_detection_receiver().map(|mut rx| {
            rt.spawn(async move {
                while let Some(d) = rx.recv().await {
                    alerts.fire(&d);
                }
            })
        });
        let (wake_read, wake_write) = pipe()?;
        let reason = Arc::new(Mutex::new(None));
        if let Some(mut rx) = gateway.take_terminate_receiver() {
            let reason = reason.clone();
            rt.spawn(async move {
                if let Some(req) = rx.recv().await {
                    if let Ok(mut r) = reason.lock() {
                        r.get_or_insert(req.reason);
                    }
                    let _ = nix::unistd::write(&wake_write, b"t");
                }
            });
        }
        Ok(RunningGateway {
            rt,
            served,
            forward,
            cancel,
            wake_read,
            reason,
            netlink,
        })
    }

    /// A descriptor that becomes readable when the gateway asks for the session to end.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake_read.as_fd()
    }

    /// Why the gateway asked for the session to end, once it has.
    pub fn terminate_reason(&self) -> Option<String> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }

    /// Stops the gateway (after the sandbox is gone) and returns what it saw.
    pub fn stop(self) -> NetworkSummary {
        let dropped = netns::read_drop_counters(self.netlink.as_fd()).ok();
        self.cancel.cancel();
        let stats = self
            .rt
            .block_on(self.served)
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        // Every sender is gone with the gateway: the forwarder drains what is left and ends.
        if let Some(f) = self.forward {
            let _ = self.rt.block_on(f);
        }
        self.rt.shutdown_timeout(std::time::Duration::from_secs(2));
        let _ = self.wake_read.as_raw_fd();
        NetworkSummary {
            allowed: stats.allowed,
            blocked: stats.blocked,
            report_would_block: stats.report_would_block,
            dns_queries: stats.dns_queries,
            connections: stats.connections,
            http_requests: stats.http_requests,
            bytes_up: stats.bytes_up,
            bytes_down: stats.bytes_down,
            dropped,
        }
    }
}

/// The proxy variables set in a gateway-mode sandbox.
pub fn proxy_env() -> Vec<(String, String)> {
    let proxy = "http://127.0.0.1:3128";
    let mut env = Vec::new();
    for name in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        env.push((name.to_string(), proxy.to_string()));
        env.push((name.to_lowercase(), proxy.to_string()));
    }
    let no_proxy = "localhost,127.0.0.1,::1";
    env.push(("NO_PROXY".into(), no_proxy.into()));
    env.push(("no_proxy".into(), no_proxy.into()));
    env
}
