//! Command-line overrides of a policy.
//!
//! Guarantees: a flag replaces the file's value (`--allow`, `--env` and `--allow-missing` add to
//! it); every flag value goes through the same [`crate::rules`] as the file, and an error names the
//! flag as typed (`--memory: "12X" is not a size: ...`); applying is all or nothing — on error the
//! policy is unchanged.

use std::path::PathBuf;

use crate::error::PolicyError;
use crate::model::{Enforcement, Layer, MinSeverity, NetworkMode, Policy};
use crate::rules::{self, ValueError};
use crate::size::ByteSize;

/// Values from command-line flags. `None` / empty leaves the policy's value. The flag each field
/// comes from is named in its documentation; errors use that name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `--workspace`: host directory for /workspace (kept as given; relative paths stay relative).
    pub workspace: Option<PathBuf>,
    /// `--timeout`, like `"60s"`.
    pub timeout: Option<String>,
    /// `--memory`, like `"512M"`.
    pub memory: Option<String>,
    /// `--pids`.
    pub pids: Option<u64>,
    /// `--cpu`, in cores.
    pub cpu: Option<f64>,
    /// `--nofile`.
    pub nofile: Option<u64>,
    /// `--tmp-size`, like `"64M"`.
    pub tmp: Option<String>,
    /// `--workspace-size`, like `"1G"`.
    pub workspace_size: Option<String>,
    /// `--file-size`, like `"1G"`.
    pub file_size: Option<String>,
    /// `--allow`, each like `"api.github.com:443"`; appended to `network.allow`.
    pub allow: Vec<String>,
    /// `--network`: `"none"` or `"gateway"`.
    pub network: Option<String>,
    /// `--env`, each `"NAME=VALUE"`; added to (or replacing in) `sandbox.env`.
    pub env: Vec<String>,
    /// `--tty`.
    pub tty: Option<bool>,
    /// `--host-uid`.
    pub host_uid: Option<u32>,
    /// `--host-gid`.
    pub host_gid: Option<u32>,
    /// `--allow-missing`, each a layer name; added to `sandbox.allow_missing`.
    pub allow_missing: Vec<String>,
    /// `--mode`: `"enforce"` or `"report"`.
    pub mode: Option<String>,
    /// `--syslog`: `"udp://ADDRESS:PORT"` or `"tcp://ADDRESS:PORT"`.
    pub syslog: Option<String>,
    /// `--syslog-min-severity`: `"info"` … `"critical"`.
    pub syslog_min_severity: Option<String>,
}

fn flag<T>(name: &str, result: Result<T, ValueError>) -> Result<T, PolicyError> {
    result.map_err(|e| PolicyError::Flag {
        flag: name.to_owned(),
        message: e.to_string(),
    })
}

fn size(text: &str) -> Result<ByteSize, ValueError> {
    Ok(ByteSize::parse(text)?)
}

/// Applies `o` to `p` in place; the caller works on a copy (see [`Policy::apply`]).
pub(crate) fn apply(p: &mut Policy, o: &Overrides) -> Result<(), PolicyError> {
    if let Some(path) = &o.workspace {
        let text = flag("--workspace", rules::utf8(path))?;
        p.sandbox.workspace = Some(flag("--workspace", rules::workspace(text))?);
    }
    if let Some(text) = &o.timeout {
        p.sandbox.timeout = flag("--timeout", rules::timeout_text(text))?;
    }
    if let Some(text) = &o.memory {
        p.limits.memory = flag("--memory", size(text).and_then(rules::memory))?;
    }
    if let Some(n) = o.pids {
        p.limits.pids = flag("--pids", rules::pids(i128::from(n)))?;
    }
    if let Some(cores) = o.cpu {
        p.limits.cpu = flag("--cpu", rules::cpu(cores))?;
    }
    if let Some(n) = o.nofile {
        p.limits.nofile = flag("--nofile", rules::nofile(i128::from(n)))?;
    }
    if let Some(text) = &o.tmp {
        p.limits.tmp = flag("--tmp-size", size(text).and_then(rules::disk))?;
    }
    if let Some(text) = &o.workspace_size {
        p.limits.workspace = flag(
            "--workspace-size",
            size(text).and_then(rules::workspace_size),
        )?;
    }
    if let Some(text) = &o.file_size {
        p.limits.file_size = flag("--file-size", size(text).and_then(rules::file_size))?;
    }
    for text in &o.allow {
        let entry = flag("--allow", rules::allow_entry(text))?;
        if !p.network.allow.iter().any(|e| e.raw() == entry.raw()) {
            p.network.allow.push(entry);
        }
    }
    if let Some(text) = &o.network {
        p.sandbox.network = Some(flag(
            "--network",
            text.parse::<NetworkMode>().map_err(ValueError::from),
        )?);
    }
    for pair in &o.env {
        let (name, value) = flag(
            "--env",
            pair.split_once('=').ok_or_else(|| {
                ValueError::Other(format!("{} must be NAME=VALUE", crate::error::quoted(pair)))
            }),
        )?;
        flag("--env", rules::env_name(name))?;
        flag("--env", rules::env_value(value))?;
        p.sandbox.env.insert(name.to_owned(), value.to_owned());
    }
    if let Some(tty) = o.tty {
        p.sandbox.tty = tty;
    }
    if let Some(uid) = o.host_uid {
        p.sandbox.host_uid = flag("--host-uid", rules::host_id(i128::from(uid)))?;
    }
    if let Some(gid) = o.host_gid {
        p.sandbox.host_gid = flag("--host-gid", rules::host_id(i128::from(gid)))?;
    }
    for name in &o.allow_missing {
        let layer = flag(
            "--allow-missing",
            name.parse::<Layer>().map_err(ValueError::from),
        )?;
        p.sandbox.allow_missing.insert(layer);
    }
    if let Some(text) = &o.syslog {
        p.audit.syslog = Some(flag("--syslog", rules::syslog(text))?);
    }
    if let Some(text) = &o.syslog_min_severity {
        p.audit.syslog_min_severity = flag(
            "--syslog-min-severity",
            text.parse::<MinSeverity>().map_err(ValueError::from),
        )?;
    }
    if let Some(text) = &o.mode {
        p.network.mode = flag(
            "--mode",
            text.parse::<Enforcement>().map_err(ValueError::from),
        )?;
    }
    if !o.allow.is_empty() && p.network_mode() == NetworkMode::None {
        return Err(PolicyError::Flag {
            flag: "--allow".to_owned(),
            message: "the network is off (sandbox.network = \"none\"); add --network gateway to use the allowlist".to_owned(),
        });
    }
    Ok(())
}
