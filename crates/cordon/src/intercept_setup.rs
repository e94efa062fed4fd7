//! Session set-up for TLS interception and credentials, in the supervisor before the sandbox is
//! spawned.
//!
//! Guarantees:
//! - Secrets are read here (`from_env`, `from_file`, `from_command`) and handed only to the
//!   gateway; the sandbox's environment gets each credential's placeholder instead, and errors
//!   name the credential and the source, never a value.
//! - The session CA is generated in memory; only its certificate leaves this module, inside the
//!   sandbox's trust bundle (the host's bundle plus the CA, written read-only into the sandbox's
//!   root), which the usual variables point at.
//! - Upstream servers are verified against the host's trust store, plus the CA file given with
//!   `--upstream-ca` (an explicit option, meant for tests with fake upstreams).
//! - A policy with nothing to intercept changes nothing: `Ok(None)`.

use std::path::Path;
use std::sync::Arc;

use cordon_gateway::creds::{load_secret, new_placeholder, LiveCredential};
use cordon_gateway::tls::{pem_certs, read_pem_certs, upstream_config, SessionCa, SYSTEM_BUNDLE};
use cordon_gateway::{InterceptConfig, DEFAULT_MAX_SCAN_BYTES};
use cordon_policy::{NetworkMode, Policy};
use cordon_sandbox::plan::CA_BUNDLE_PATH;

/// Variables pointed at the sandbox's trust bundle (canaries may not take these names).
pub const CA_VARS: [&str; 6] = cordon_policy::CA_BUNDLE_VARS;

/// What the session needs for interception.
pub struct Prepared {
    pub config: Arc<InterceptConfig>,
    /// The sandbox's trust bundle (PEM).
    pub bundle: String,
    /// Placeholders and trust-bundle variables for the sandbox.
    pub env: Vec<(String, String)>,
}

/// Removes `var` from cordon's environment and overwrites its value where the kernel shows it
/// (`/proc/PID/environ` reads the process's original environment block, which `remove_var`
/// alone leaves intact — and which the sandbox's init, a clone of this process, would inherit).
/// Must run while the process has one thread: nothing else may read the environment meanwhile.
fn scrub_env(var: &str) {
    let prefix = format!("{var}=");
    // SAFETY: `environ` is the C library's NULL-terminated array of NUL-terminated strings; the
    // supervisor is single-threaded here (it has spawned nothing yet), so no other thread reads
    // or changes the environment while the bytes are overwritten in place (same length, so
    // every string stays NUL-terminated where it was).
    unsafe {
        let mut entry = libc::environ;
        while !entry.is_null() && !(*entry).is_null() {
            let s = *entry;
            let text = std::ffi::CStr::from_ptr(s).to_bytes();
            if text.starts_with(prefix.as_bytes()) {
                for i in prefix.len()..text.len() {
                    *s.add(i) = b'*' as libc::c_char;
                }
            }
            entry = entry.add(1);
        }
    }
    std::env::remove_var(var);
}

/// Builds the interception set-up for `policy`, or `None` when it intercepts nothing.
pub fn prepare(
    policy: &Policy,
    session_id: &str,
    upstream_ca: Option<&Path>,
) -> Result<Option<Prepared>, String> {
    let n = &policy.network;
    let wanted = !policy.credentials.is_empty() || !n.rules.is_empty() || !n.intercept.is_empty();
    if !wanted {
        return Ok(None);
    }
    if policy.network_mode() != NetworkMode::Gateway {
        return Err(
            "[[credentials]], [[network.rules]] and network.intercept need the gateway, but sandbox.network is \"none\""
                .into(),
        );
    }
    let mut credentials = Vec::with_capacity(policy.credentials.len());
    let mut env = Vec::new();
    for spec in &policy.credentials {
        let secret = load_secret(spec).map_err(|e| e.to_string())?;
        if let cordon_policy::SecretSource::Env(var) = &spec.source {
            scrub_env(var);
        }
        let placeholder = new_placeholder().map_err(|e| e.to_string())?;
        env.push((spec.env.clone(), placeholder.clone()));
        credentials.push(LiveCredential {
            spec: spec.clone(),
            placeholder,
            secret,
        });
    }
    let hosts = InterceptConfig::hosts_for(n, &policy.credentials);
    let ca = SessionCa::generate(session_id, &hosts).map_err(|e| e.to_string())?;
    let host_bundle = std::fs::read_to_string(SYSTEM_BUNDLE).map_err(|e| {
        format!("cannot read the host trust store {SYSTEM_BUNDLE} (needed to verify upstream servers and to build the sandbox's bundle): {e}")
    })?;
    let system = read_pem_certs(SYSTEM_BUNDLE).map_err(|e| e.to_string())?;
    let extra = match upstream_ca {
        Some(path) => {
            let text = std::fs::read(path)
                .map_err(|e| format!("--upstream-ca {}: {e}", path.display()))?;
            let certs = pem_certs(&text);
            if certs.is_empty() {
                return Err(format!(
                    "--upstream-ca {}: no PEM certificate in it",
                    path.display()
                ));
            }
            certs
        }
        None => Vec::new(),
    };
    let upstream = upstream_config(&system, &extra).map_err(|e| e.to_string())?;
    let mut bundle = host_bundle;
    if !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str("# cordon session CA (name-constrained to this session's intercepted hosts)\n");
    bundle.push_str(ca.cert_pem());
    for var in CA_VARS {
        env.push((var.to_owned(), CA_BUNDLE_PATH.to_owned()));
    }
    let config = InterceptConfig {
        ca,
        hosts,
        credentials,
        upstream,
        max_scan_bytes: DEFAULT_MAX_SCAN_BYTES,
    };
    Ok(Some(Prepared {
        config: Arc::new(config),
        bundle,
        env,
    }))
}
