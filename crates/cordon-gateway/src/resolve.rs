//! Upstream name resolution, done by the gateway itself (never by the sandbox).
//!
//! Guarantees:
//! - Only names that already passed the policy decision are resolved; IP literals never reach a
//!   resolver (callers parse them with `parse_ip_literal` first).
//! - Names are looked up fully qualified (`name.`), so the host's `search` domains are never
//!   appended and a sandbox cannot make the gateway query `<anything>.<host's domain>`.
//! - `/etc/hosts` is not consulted: what a name means is whatever the configured nameservers say,
//!   and every address they return is checked by the caller before use.
//! - The resolver is a trait ([`Resolve`]) so tests can count and script lookups.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use cordon_policy::host::HostName;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ResolveError {
    #[error("{name} does not exist (NXDOMAIN)")]
    NoSuchName { name: String },
    #[error("{name} has no addresses")]
    NoAddresses { name: String },
    #[error("could not resolve {name}: {message}")]
    Failed { name: String, message: String },
    #[error("cannot read the host's resolver configuration: {0}")]
    SystemConfig(String),
    #[error("cannot build the upstream resolver: {0}")]
    Build(String),
}

/// The boxed future [`Resolve::resolve`] returns.
pub type ResolveFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<IpAddr>, ResolveError>> + Send + 'a>>;

/// Resolves a policy-approved name to every address upstream gives for it.
pub trait Resolve: Send + Sync + 'static {
    fn resolve<'a>(&'a self, name: &'a HostName) -> ResolveFuture<'a>;
}

/// hickory-resolver against the host's `/etc/resolv.conf` or given nameservers.
pub struct UpstreamResolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for UpstreamResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamResolver").finish_non_exhaustive()
    }
}

fn options(mut opts: ResolverOpts) -> ResolverOpts {
    opts.use_hosts_file = ResolveHosts::Never;
    opts.timeout = Duration::from_secs(3);
    opts.attempts = 2;
    opts.ndots = 0;
    opts
}

impl UpstreamResolver {
    /// Nameservers from the host's `/etc/resolv.conf` (its search domains are ignored).
    pub fn from_system_conf() -> Result<Self, ResolveError> {
        let (config, opts) = hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| ResolveError::SystemConfig(e.to_string()))?;
        let (_, _, servers) = config.into_parts();
        Self::build(ResolverConfig::from_name_servers(servers), options(opts))
    }

    /// The given nameservers, over UDP with TCP fallback, each at its own port.
    pub fn with_nameservers(servers: &[SocketAddr]) -> Result<Self, ResolveError> {
        let servers = servers
            .iter()
            .map(|addr| {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                NameServerConfig::new(addr.ip(), /*trust_negative*/ true, vec![udp, tcp])
            })
            .collect();
        Self::build(
            ResolverConfig::from_name_servers(servers),
            options(ResolverOpts::default()),
        )
    }

    fn build(config: ResolverConfig, opts: ResolverOpts) -> Result<Self, ResolveError> {
        let mut builder =
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        *builder.options_mut() = opts;
        let inner = builder
            .build()
            .map_err(|e| ResolveError::Build(e.to_string()))?;
        Ok(UpstreamResolver { inner })
    }
}

impl Resolve for UpstreamResolver {
    fn resolve<'a>(&'a self, name: &'a HostName) -> ResolveFuture<'a> {
        Box::pin(async move {
            let fqdn = format!("{}.", name.as_str());
            match self.inner.lookup_ip(fqdn.as_str()).await {
                Ok(lookup) => {
                    let mut addrs: Vec<IpAddr> = lookup.iter().collect();
                    addrs.dedup();
                    if addrs.is_empty() {
                        Err(ResolveError::NoAddresses {
                            name: name.to_string(),
                        })
                    } else {
                        Ok(addrs)
                    }
                }
                Err(e) if e.is_nx_domain() => Err(ResolveError::NoSuchName {
                    name: name.to_string(),
                }),
                Err(e) if e.is_no_records_found() => Err(ResolveError::NoAddresses {
                    name: name.to_string(),
                }),
                Err(e) => Err(ResolveError::Failed {
                    name: name.to_string(),
                    message: e.to_string(),
                }),
            }
        })
    }
}
