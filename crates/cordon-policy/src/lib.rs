//! cordon's policy: the model, reading and validating it, and the network decision.
//!
//! Guarantees:
//!
//! - **Pure.** Nothing here does I/O: policies are parsed from `&str`, decisions are functions of
//!   their arguments.
//! - **Safe defaults, strict input.** [`Policy::default`] is the safe policy (no network, no host
//!   directory, small limits, every isolation layer required). Every table refuses unknown keys;
//!   every bad value is an error that names the file, line, column and key (or the command-line
//!   flag) — never a silent default.
//! - **Validated.** Every [`Policy`] returned by [`Policy::from_toml_str`] or changed by
//!   [`Policy::apply`] passes [`Policy::validate`]; `apply` changes nothing when it fails.
//! - **Round trip.** [`Policy::to_toml_string`] prints the effective policy as TOML that
//!   [`Policy::from_toml_str`] reads back to an equal policy.
//! - **One decision point.** [`decide::decide`], [`decide::decide_resolved`] and
//!   [`decide::decide_request`] (method/path rules) are the only network verdicts; they use [`host`], [`ip`], [`ssrf`] and [`allow`] and nothing else.

pub mod allow;
pub mod credentials;
pub mod decide;
pub mod duration;
pub mod error;
pub mod host;
pub mod http_rules;
pub mod ip;
pub mod size;
pub mod ssrf;

pub mod detect;
mod file;
mod model;
mod overrides;
mod rules;
pub use detect::{
    AlertsPolicy, BlockedRule, CanaryRule, DetectPolicy, DnsTunnelRule, ExfilRule, SandboxRule,
    WebhookUrl, CA_BUNDLE_VARS,
};

pub use allow::{AllowEntry, AllowError, AllowHost, PortSpec};
pub use credentials::{Credential, Injection, InterceptHost, SecretSource};
pub use decide::{decide, decide_request, decide_resolved, Decision, Target};
pub use duration::{format_duration, parse_duration, DurationError};
pub use error::{Location, PolicyError};
pub use host::{HostError, HostName};
pub use http_rules::{normalize_path, HttpRule, PathError};
pub use ip::{parse_ip_literal, IpLiteral, IpLiteralError};
pub use model::{
    AuditPolicy, Enforcement, ExtraMount, Layer, Limits, MinSeverity, NetworkMode, NetworkPolicy,
    OnExceed, Policy, RateLimits, Response, SandboxPolicy, SyslogTarget, SyslogTargetError,
    SyslogTransport, UnknownChoice, DEFAULT_HOST_ID,
};
pub use overrides::Overrides;
pub use size::{ByteSize, SizeError};
pub use ssrf::{blocked_range, BlockedRange, BLOCKED_RANGES};

impl Policy {
    /// Reads a policy from TOML text. `source` names the text in errors (usually its path):
    /// `policy.toml:3:10: limits.memory: "12X" is not a size: ...`.
    pub fn from_toml_str(text: &str, source: Option<&str>) -> Result<Policy, PolicyError> {
        file::parse(text, source)
    }

    /// Applies command-line overrides, then validates the result. On error `self` is unchanged
    /// and the error names the flag.
    pub fn apply(&mut self, overrides: &Overrides) -> Result<(), PolicyError> {
        let mut next = self.clone();
        overrides::apply(&mut next, overrides)?;
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// Checks every value of a policy, however it was built (a policy from
    /// [`Policy::from_toml_str`] or [`Policy::apply`] has already passed).
    pub fn validate(&self) -> Result<(), PolicyError> {
        rules::policy(self)
    }

    /// The effective policy as TOML, every value spelled out; [`Policy::from_toml_str`] reads it
    /// back to an equal policy. `sandbox.network` is left out when it is unset, so that the
    /// "decided by the allowlist" rule survives the round trip; [`Policy::network_mode`] gives
    /// the resolved mode.
    pub fn to_toml_string(&self) -> String {
        match toml::to_string_pretty(self) {
            Ok(text) => text,
            // Every field serializes to a TOML string, integer, float, boolean, array or table
            // (paths lossily), so this cannot happen; if it ever does, print something that
            // fails loudly when read back instead of a policy that silently differs.
            Err(e) => format!("!! cordon could not write this policy as TOML: {e}\n"),
        }
    }

    /// The network mode in force: `sandbox.network` when set; otherwise `gateway` if
    /// `network.allow` or `network.allow_private` names anything, else `none`.
    pub fn network_mode(&self) -> NetworkMode {
        self.sandbox.network.unwrap_or(
            if self.network.allow.is_empty() && self.network.allow_private.is_empty() {
                NetworkMode::None
            } else {
                NetworkMode::Gateway
            },
        )
    }
}
