//! The result object of `cordon run --json`.
//!
//! Guarantees: one JSON object with stable field names; every layer that was applied is listed
//! with its version, and every layer the policy allowed to be missing and that was missing is
//! listed under `lowered`, so a weakened sandbox is never silent.

use serde::Serialize;

/// Which limit ended the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitHit {
    Timeout,
    Oom,
    Pids,
    Disk,
}

/// The layers applied to a session.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Layers {
    pub namespaces: Vec<&'static str>,
    pub uid_map: String,
    pub landlock_abi: u32,
    pub landlock_enforced: bool,
    pub seccomp: Option<SeccompInfo>,
    pub cgroup: Option<String>,
    pub no_new_privs: bool,
    pub workspace_cap: Option<String>,
    pub network: String,
    /// Layers the policy allowed to be missing and that were missing.
    pub lowered: Vec<String>,
}

/// The seccomp filter that was installed.
#[derive(Debug, Clone, Serialize)]
pub struct SeccompInfo {
    pub rules: usize,
    pub arch: String,
    pub default_errno: &'static str,
    /// The `EPERM` denials are answered (and counted) by the supervisor through a seccomp
    /// notification listener instead of by the kernel alone.
    pub denials_counted: bool,
}

/// How the command ended.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub session_id: String,
    pub user: String,
    pub command: Vec<String>,
    pub code_sha256: String,
    /// The exit status cordon itself exits with (the command's, or 128 + signal).
    pub exit_status: i32,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub limit: Option<LimitHit>,
    pub limits_hit: Vec<LimitHit>,
    pub wall_ms: u64,
    pub cpu_ms: Option<u64>,
    pub peak_memory_bytes: Option<u64>,
    pub workspace: String,
    pub layers: Layers,
    /// Network mode `gateway`: what the gateway allowed, blocked and dropped.
    pub network: Option<crate::gateway_run::NetworkSummary>,
    /// Why the gateway ended the session, when it did.
    pub terminated: Option<String>,
    /// Every detection-rule firing of the session, in order (also `alert` audit events).
    pub alerts: Vec<crate::alerts::Fired>,
    /// The session's honey tokens by name (variables, planted and skipped files); `null` when
    /// the policy has none. Never a token.
    pub canaries: Option<crate::canary::CanaryReport>,
    /// Syscalls the seccomp filter denied, when the supervisor counts them
    /// (`detect.sandbox.seccomp_denied` > 0); `null` otherwise.
    pub seccomp_denied: Option<u64>,
    /// Why the command could not run (exit status 126: cannot be executed, 127: not found);
    /// `null` when it ran. cordon's own failures (125) print an object with `exit_status`,
    /// `error` and the session's identity only.
    pub error: Option<String>,
}
