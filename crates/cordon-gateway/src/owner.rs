//! Which sandbox process opened a connection or sent a DNS query.
//!
//! Guarantees:
//! - The owner is found by whoever embeds the gateway (the `cordon run` supervisor), through
//!   [`SocketOwners`], from the client socket's address as the kernel reports it on the accepted
//!   connection (or the UDP datagram) — never from anything the client sent.
//! - The lookup runs once per accepted TCP connection and once per DNS datagram, on tokio's
//!   blocking pool, before the first byte of the connection (or the DNS answer) is handled: the
//!   client is still waiting for its answer, so its socket and process are still there. Every
//!   event of that connection carries the result (a task-local, so no path can forget it).
//! - Without a [`SocketOwners`] (the standalone gateway, which has no sandbox) nothing is looked
//!   up, nothing waits, and events carry no process.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

/// A sandbox process, as the supervisor found it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ProcessInfo {
    /// Its pid in the sandbox's pid namespace.
    pub pid: u32,
    /// The executable the kernel ran (`/proc/PID/exe`).
    pub exe: String,
    /// `/proc/PID/cmdline`, split at NUL bytes.
    pub cmdline: Vec<String>,
}

/// The transport of a client socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Udp,
}

/// Finds the process that owns a client socket of the sandbox. Implementations block (they read
/// `/proc`); the gateway calls them on the blocking pool.
pub trait SocketOwners: Send + Sync {
    /// The process whose socket has local address `client` (the peer address of the accepted
    /// connection, or the source of a datagram) and, when known, remote address `server` (the
    /// address the client connected to: the listener's, or the original destination of a
    /// captured connection), or `None` when it cannot be found (it exited, or `/proc` cannot be
    /// read).
    fn owner(
        &self,
        transport: Transport,
        client: SocketAddr,
        server: Option<SocketAddr>,
    ) -> Option<ProcessInfo>;
}

tokio::task_local! {
    static OWNER: Option<Arc<ProcessInfo>>;
}

/// The process of the connection being served, if it was looked up.
pub(crate) fn current() -> Option<Arc<ProcessInfo>> {
    OWNER.try_with(Clone::clone).ok().flatten()
}

/// Looks up the owner of `client` on the blocking pool.
pub(crate) async fn look_up(
    owners: &Arc<dyn SocketOwners>,
    transport: Transport,
    client: SocketAddr,
    server: Option<SocketAddr>,
) -> Option<Arc<ProcessInfo>> {
    let owners = owners.clone();
    match tokio::task::spawn_blocking(move || owners.owner(transport, client, server)).await {
        Ok(found) => found.map(Arc::new),
        Err(e) => {
            tracing::debug!(error = %e, "socket owner lookup failed");
            None
        }
    }
}

/// Runs `fut` with the owner of `client` as the current process (when there is a lookup).
pub(crate) async fn with_owner<F: std::future::Future>(
    owners: Option<Arc<dyn SocketOwners>>,
    transport: Transport,
    client: Option<SocketAddr>,
    server: Option<SocketAddr>,
    fut: F,
) -> F::Output {
    match (owners, client) {
        (Some(owners), Some(client)) => {
            let owner = look_up(&owners, transport, client, server).await;
            OWNER.scope(owner, fut).await
        }
        _ => fut.await,
    }
}

/// Runs `f` with `owner` as the current process.
pub(crate) fn sync_with<R>(owner: Option<Arc<ProcessInfo>>, f: impl FnOnce() -> R) -> R {
    OWNER.sync_scope(owner, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl SocketOwners for Fixed {
        fn owner(
            &self,
            transport: Transport,
            client: SocketAddr,
            _server: Option<SocketAddr>,
        ) -> Option<ProcessInfo> {
            (transport == Transport::Tcp).then(|| ProcessInfo {
                pid: u32::from(client.port()),
                exe: "/usr/bin/curl".into(),
                cmdline: vec!["curl".into()],
            })
        }
    }

    #[tokio::test]
    async fn the_owner_is_current_inside_the_connection_only() {
        let owners: Arc<dyn SocketOwners> = Arc::new(Fixed);
        let client: SocketAddr = "127.0.0.1:4242".parse().unwrap();
        let seen = with_owner(
            Some(owners.clone()),
            Transport::Tcp,
            Some(client),
            None,
            async { current().map(|p| p.pid) },
        )
        .await;
        assert_eq!(seen, Some(4242));
        assert_eq!(current(), None);
        let none = with_owner(None, Transport::Tcp, Some(client), None, async {
            current()
        })
        .await;
        assert_eq!(none, None);
        let udp = with_owner(Some(owners), Transport::Udp, Some(client), None, async {
            current()
        })
        .await;
        assert_eq!(udp, None);
        let p = Arc::new(ProcessInfo {
            pid: 3,
            exe: String::new(),
            cmdline: vec![],
        });
        assert_eq!(sync_with(Some(p.clone()), current), Some(p));
    }
}
