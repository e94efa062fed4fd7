//! The policy model.
//!
//! Guarantees: `Default` is the safe default for every field (no network, no host directory,
//! small limits, every isolation layer required); the types serialize to exactly the TOML a policy
//! file is written in (`timeout = "60s"`, `memory = "512M"`, `allow = ["api.github.com"]`), so
//! the effective policy can be printed and read back unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use crate::allow::AllowEntry;
use crate::credentials::{Credential, InterceptHost};
use crate::detect::{AlertsPolicy, DetectPolicy};
use crate::error::quoted;
use crate::http_rules::HttpRule;
use crate::size::ByteSize;

/// A whole policy.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub sandbox: SandboxPolicy,
    pub limits: Limits,
    pub network: NetworkPolicy,
    /// `[detect]`: anomaly rules and how each one responds. The old `[response]
    /// terminate_after_blocked` key is read into `detect.blocked`.
    pub detect: DetectPolicy,
    /// `[alerts]`: where rule firings are sent besides the audit and stderr.
    pub alerts: AlertsPolicy,
    /// `[audit]`: where audit events go besides the store.
    pub audit: AuditPolicy,
    /// `[[credentials]]`: secrets the gateway injects; the sandbox sees only placeholders.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<Credential>,
}

/// `[sandbox]`: what the sandbox looks like from inside.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxPolicy {
    /// Host directory mounted read-write at /workspace; `None` means a throwaway workspace.
    /// Relative paths are kept as written; the CLI resolves them.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_opt_path"
    )]
    pub workspace: Option<PathBuf>,
    /// Wall-clock limit for the whole session.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub timeout: Duration,
    /// `None`: decided by [`crate::Policy::network_mode`] from the allowlist.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkMode>,
    pub hostname: String,
    /// Give the sandbox a pty as its controlling terminal.
    pub tty: bool,
    /// Host uid/gid that the sandbox's users map to when cordon runs as root. Never 0.
    pub host_uid: u32,
    pub host_gid: u32,
    /// Isolation layers that may be missing on this host ("lowering the bar"); empty = all
    /// required.
    pub allow_missing: BTreeSet<Layer>,
    /// Extra environment for the sandboxed program.
    pub env: BTreeMap<String, String>,
    /// Extra host directories mounted into the sandbox, in order.
    pub mounts: Vec<ExtraMount>,
}

/// The default host uid/gid the sandbox maps to.
pub const DEFAULT_HOST_ID: u32 = 1_900_000;

impl Default for SandboxPolicy {
    fn default() -> Self {
        SandboxPolicy {
            workspace: None,
            timeout: Duration::from_secs(60),
            network: None,
            hostname: "cordon".to_owned(),
            tty: false,
            host_uid: DEFAULT_HOST_ID,
            host_gid: DEFAULT_HOST_ID,
            allow_missing: BTreeSet::new(),
            env: BTreeMap::new(),
            mounts: Vec::new(),
        }
    }
}

fn serialize_opt_path<S: Serializer>(
    path: &Option<PathBuf>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match path {
        Some(path) => serialize_path(path, serializer),
        None => serializer.serialize_none(),
    }
}

/// Paths in a validated policy are UTF-8 (they come from TOML strings or are checked by
/// [`crate::Policy::apply`]); a lossy conversion keeps serialization infallible for values built
/// in code.
fn serialize_path<S: Serializer>(path: &Path, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&path.to_string_lossy())
}

/// An isolation layer that a policy may allow to be missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    Landlock,
    Seccomp,
    Cgroups,
    WorkspaceCap,
}

impl Layer {
    pub const ALL: [Layer; 4] = [
        Layer::Landlock,
        Layer::Seccomp,
        Layer::Cgroups,
        Layer::WorkspaceCap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Landlock => "landlock",
            Layer::Seccomp => "seccomp",
            Layer::Cgroups => "cgroups",
            Layer::WorkspaceCap => "workspace_cap",
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that is not one of the allowed choices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} is not one of: {expected}", quoted(.got))]
pub struct UnknownChoice {
    pub got: String,
    pub expected: &'static str,
}

impl FromStr for Layer {
    type Err = UnknownChoice;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Layer::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| UnknownChoice {
                got: s.to_owned(),
                expected: "landlock, seccomp, cgroups, workspace_cap",
            })
    }
}

/// An extra bind mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraMount {
    /// Absolute host path.
    #[serde(serialize_with = "serialize_path")]
    pub host: PathBuf,
    /// Absolute path inside the sandbox.
    #[serde(serialize_with = "serialize_path")]
    pub path: PathBuf,
    pub writable: bool,
}

/// How the sandbox reaches the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// Only `lo`, nothing listening: no network at all.
    None,
    /// Only through cordon's egress gateway.
    Gateway,
}

/// Whether network verdicts are enforced or only recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    #[default]
    Enforce,
    /// Shadow mode: default-deny verdicts are recorded but let through (blocked ranges never are).
    Report,
}

/// What happens when a rate limit is exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnExceed {
    /// Refuse the request or connection that exceeds the limit.
    #[default]
    Block,
    /// End the session.
    Terminate,
}

macro_rules! choice {
    ($ty:ty, $expected:literal, $($variant:path => $text:literal),+ $(,)?) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $($variant => $text),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = UnknownChoice;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($variant),)+
                    _ => Err(UnknownChoice { got: s.to_owned(), expected: $expected }),
                }
            }
        }
    };
}

choice!(NetworkMode, "none, gateway", NetworkMode::None => "none", NetworkMode::Gateway => "gateway");
choice!(Enforcement, "enforce, report", Enforcement::Enforce => "enforce", Enforcement::Report => "report");
choice!(MinSeverity, "info, notice, warning, high, critical",
    MinSeverity::Info => "info", MinSeverity::Notice => "notice", MinSeverity::Warning => "warning",
    MinSeverity::High => "high", MinSeverity::Critical => "critical");
choice!(OnExceed, "block, terminate", OnExceed::Block => "block", OnExceed::Terminate => "terminate");
choice!(Response, "log, block, terminate", Response::Log => "log", Response::Block => "block", Response::Terminate => "terminate");

/// What a detection rule does when it fires, from mildest to strongest.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Record the firing (an `alert` audit event); nothing else changes.
    #[default]
    Log,
    /// Deny all further egress of the session; the code keeps running.
    Block,
    /// Kill the whole sandbox now.
    Terminate,
}

/// `[limits]`: resource limits for everything in the sandbox.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub memory: ByteSize,
    pub pids: u64,
    /// CPU cores (cgroup quota / period).
    pub cpu: f64,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// Size of the /tmp tmpfs.
    pub tmp: ByteSize,
    /// Disk cap of the workspace.
    pub workspace: ByteSize,
    /// RLIMIT_FSIZE.
    pub file_size: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: ByteSize::mib(512),
            pids: 64,
            cpu: 0.5,
            nofile: 256,
            tmp: ByteSize::mib(64),
            workspace: ByteSize::gib(1),
            file_size: ByteSize::gib(1),
        }
    }
}

/// `[network]`: where the sandbox may connect through the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    pub mode: Enforcement,
    pub allow: Vec<AllowEntry>,
    /// The only way to reach an address in a blocked range (see [`crate::ssrf`]).
    pub allow_private: Vec<AllowEntry>,
    /// Hosts whose TLS the gateway terminates even without credentials or rules.
    pub intercept: Vec<InterceptHost>,
    pub rate: RateLimits,
    /// `[[network.rules]]`: method/path rules per host.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<HttpRule>,
}

/// `[network.rate]`: per-session traffic limits. Every limit is a positive number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    pub requests_per_minute: u32,
    pub requests_per_minute_per_host: u32,
    pub max_connections: u32,
    pub max_bytes_out: ByteSize,
    pub max_bytes_in: ByteSize,
    pub on_exceed: OnExceed,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            requests_per_minute: 600,
            requests_per_minute_per_host: 300,
            max_connections: 32,
            max_bytes_out: ByteSize::mib(10),
            max_bytes_in: ByteSize::gib(1),
            on_exceed: OnExceed::Block,
        }
    }
}

/// `[audit]`: where audit events go besides the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuditPolicy {
    /// Forward every event, as it is recorded, to this syslog receiver (RFC 5424).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_opt_display"
    )]
    pub syslog: Option<SyslogTarget>,
    /// Forward only events at least this severe (`info` forwards everything; alerts are
    /// `high` or `critical`).
    pub syslog_min_severity: MinSeverity,
}

/// How much an event must matter to be forwarded, lowest first (the audit's severities).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MinSeverity {
    #[default]
    Info,
    Notice,
    Warning,
    High,
    Critical,
}

/// The transport of a syslog receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyslogTransport {
    /// One datagram per message (RFC 5426).
    Udp,
    /// Octet-counted framing over a stream (RFC 6587, section 3.4.1).
    Tcp,
}

/// `udp://ADDRESS:PORT` or `tcp://ADDRESS:PORT`, with an IP address (`[::1]:514` for IPv6):
/// the receiver is fixed when the policy is read, never resolved through DNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SyslogTarget {
    pub transport: SyslogTransport,
    pub addr: std::net::SocketAddr,
}

impl fmt::Display for SyslogTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.transport {
            SyslogTransport::Udp => "udp",
            SyslogTransport::Tcp => "tcp",
        };
        write!(f, "{scheme}://{}", self.addr)
    }
}

/// Why a syslog address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{got:?} is not a syslog address: {why} (expected udp://ADDRESS:PORT or tcp://ADDRESS:PORT with an IP address, like udp://127.0.0.1:514)")]
pub struct SyslogTargetError {
    pub got: String,
    pub why: &'static str,
}

impl FromStr for SyslogTarget {
    type Err = SyslogTargetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| SyslogTargetError {
            got: s.to_owned(),
            why,
        };
        let (scheme, rest) = s.split_once("://").ok_or_else(|| err("no scheme"))?;
        let transport = match scheme {
            "udp" => SyslogTransport::Udp,
            "tcp" => SyslogTransport::Tcp,
            _ => return Err(err("the scheme must be udp or tcp")),
        };
        let addr: std::net::SocketAddr = rest
            .parse()
            .map_err(|_| err("not an IP address and port"))?;
        if addr.port() == 0 {
            return Err(err("port 0"));
        }
        Ok(SyslogTarget { transport, addr })
    }
}

fn serialize_opt_display<S: serde::Serializer, T: fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}
