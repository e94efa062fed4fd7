//! Reading a policy from TOML text.
//!
//! Guarantees: every table refuses keys it does not know (`deny_unknown_fields`); every error
//! carries the line and column of the bad key or value and its dotted key; every value goes
//! through [`crate::rules`] (credentials and HTTP rules through their own modules); a key that is absent keeps
//! its safe default. Values are read as `Spanned<toml::Value>` and checked here rather than typed
//! by serde, so that type errors name the key and say what was expected in plain words.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::{Spanned, Value};

use crate::credentials::{self, Credential, Injection, InterceptHost, SecretSource, SECRET_MARK};
use crate::decide::Target;
use crate::detect::{self, AlertsPolicy, DetectPolicy};
use crate::error::{Location, PolicyError};
use crate::host::HostName;
use crate::http_rules::{self, HttpRule};
use crate::model::{
    AuditPolicy, Enforcement, ExtraMount, Layer, Limits, MinSeverity, NetworkMode, NetworkPolicy,
    OnExceed, Policy, RateLimits, Response, SandboxPolicy,
};
use crate::rules::{self, ValueError};
use crate::size::ByteSize;

type Leaf = Option<Spanned<Value>>;
type List = Option<Vec<Spanned<Value>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a policy document")]
struct RawPolicy {
    sandbox: Option<RawSandbox>,
    limits: Option<RawLimits>,
    network: Option<RawNetwork>,
    /// The old home of `terminate_after_blocked`, read into `detect.blocked`.
    response: Option<RawResponse>,
    detect: Option<RawDetect>,
    alerts: Option<RawAlerts>,
    audit: Option<RawAudit>,
    credentials: Option<Vec<Spanned<RawCredential>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[credentials]] table")]
struct RawCredential {
    name: Leaf,
    hosts: List,
    header: Leaf,
    query: Leaf,
    basic_auth: Leaf,
    any_header: Leaf,
    format: Leaf,
    from_env: Leaf,
    from_file: Leaf,
    from_command: List,
    env: Leaf,
    require: Leaf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[network.rules]] table")]
struct RawRule {
    host: Leaf,
    methods: List,
    paths: List,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [sandbox] table")]
struct RawSandbox {
    workspace: Leaf,
    timeout: Leaf,
    network: Leaf,
    hostname: Leaf,
    tty: Leaf,
    host_uid: Leaf,
    host_gid: Leaf,
    allow_missing: List,
    env: Option<BTreeMap<Spanned<String>, Spanned<Value>>>,
    mounts: Option<Vec<Spanned<RawMount>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[sandbox.mounts]] table")]
struct RawMount {
    host: Leaf,
    path: Leaf,
    writable: Leaf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [limits] table")]
struct RawLimits {
    memory: Leaf,
    pids: Leaf,
    cpu: Leaf,
    nofile: Leaf,
    tmp: Leaf,
    workspace: Leaf,
    file_size: Leaf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [network] table")]
struct RawNetwork {
    mode: Leaf,
    allow: List,
    allow_private: List,
    intercept: List,
    rate: Option<RawRate>,
    rules: Option<Vec<Spanned<RawRule>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [network.rate] table")]
struct RawRate {
    requests_per_minute: Leaf,
    requests_per_minute_per_host: Leaf,
    max_connections: Leaf,
    max_bytes_out: Leaf,
    max_bytes_in: Leaf,
    on_exceed: Leaf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [response] table")]
struct RawResponse {
    terminate_after_blocked: Leaf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [detect] table")]
struct RawDetect {
    blocked: Option<Spanned<RawBlocked>>,
    dns_tunnel: Option<RawDnsTunnel>,
    exfil: Option<RawExfil>,
    sandbox: Option<RawSandboxRule>,
    canary: Option<RawCanary>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [detect.blocked] table")]
struct RawBlocked {
    enabled: Leaf,
    threshold: Leaf,
    window: Leaf,
    response: Leaf,
    alert: Leaf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [detect.dns_tunnel] table")]
struct RawDnsTunnel {
    enabled: Leaf,
    window: Leaf,
    distinct_names: Leaf,
    max_name_length: Leaf,
    long_names: Leaf,
    entropy: Leaf,
    high_entropy_labels: Leaf,
    queries: Leaf,
    nxdomain_ratio: Leaf,
    min_names: Leaf,
    other_types: Leaf,
    response: Leaf,
    alert: Leaf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [detect.exfil] table")]
struct RawExfil {
    enabled: Leaf,
    window: Leaf,
    bytes_out: Leaf,
    max_request_body: Leaf,
    small_requests: Leaf,
    small_request_size: Leaf,
    distinct_hosts: Leaf,
    response: Leaf,
    alert: Leaf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [detect.sandbox] table")]
struct RawSandboxRule {
    enabled: Leaf,
    limits: Leaf,
    lingering: Leaf,
    seccomp_denied: Leaf,
    response: Leaf,
    alert: Leaf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [detect.canary] table")]
struct RawCanary {
    env: List,
    files: List,
    response: Leaf,
    alert: Leaf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [alerts] table")]
struct RawAlerts {
    webhook: Leaf,
    timeout: Leaf,
    retries: Leaf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [audit] table")]
struct RawAudit {
    syslog: Leaf,
    syslog_min_severity: Leaf,
}

/// Parses and validates a policy; see the module documentation.
pub(crate) fn parse(text: &str, source: Option<&str>) -> Result<Policy, PolicyError> {
    let cx = Cx { text, source };
    let raw: RawPolicy = toml::from_str(text).map_err(|e| cx.toml_error(&e))?;
    let mut policy = Policy::default();
    if let Some(sandbox) = &raw.sandbox {
        cx.sandbox(sandbox, &mut policy.sandbox)?;
    }
    if let Some(limits) = &raw.limits {
        cx.limits(limits, &mut policy.limits)?;
    }
    if let Some(network) = &raw.network {
        cx.network(network, &mut policy.network)?;
    }
    if let Some(detect) = &raw.detect {
        cx.detect(detect, &policy.sandbox.env, &mut policy.detect)?;
    }
    if let Some(response) = &raw.response {
        cx.response(response, raw.detect.as_ref(), &mut policy.detect)?;
    }
    if let Some(alerts) = &raw.alerts {
        cx.alerts(alerts, &mut policy.alerts)?;
    }
    if let Some(audit) = &raw.audit {
        cx.audit(audit, &mut policy.audit)?;
    }
    if let Some(rules) = raw.network.as_ref().and_then(|n| n.rules.as_ref()) {
        cx.http_rules(rules, &mut policy.network)?;
    }
    if let Some(credentials) = &raw.credentials {
        cx.credentials(credentials, &mut policy)?;
    }
    // Every field was checked above with its position; this is the backstop for the rules that
    // span fields, so that no path builds a policy `validate` would refuse.
    policy.validate()?;
    Ok(policy)
}

struct Cx<'a> {
    text: &'a str,
    source: Option<&'a str>,
}

impl Cx<'_> {
    fn at(&self, span: Range<usize>) -> Location {
        Location::at(self.source, self.text, span.start)
    }

    fn invalid(&self, span: Range<usize>, key: impl Into<String>, err: ValueError) -> PolicyError {
        PolicyError::Invalid {
            at: self.at(span),
            key: key.into(),
            message: err.to_string(),
        }
    }

    /// Runs `rule` on the value and places any error at the value.
    fn check<T>(
        &self,
        leaf: &Spanned<Value>,
        key: &str,
        rule: impl FnOnce(&Value) -> Result<T, ValueError>,
    ) -> Result<T, PolicyError> {
        rule(leaf.get_ref()).map_err(|e| self.invalid(leaf.span(), key, e))
    }

    fn toml_error(&self, err: &toml::de::Error) -> PolicyError {
        let span = err.span();
        let at = match &span {
            Some(span) => self.at(span.clone()),
            None => Location {
                source: self.source.map(str::to_owned),
                position: None,
            },
        };
        let mut message = err
            .message()
            .trim()
            .replacen("unknown field", "unknown key", 1);
        // The parser points at the repeated key but does not name it.
        if message == "duplicate key" {
            if let Some(name) = span.as_ref().and_then(|s| self.text.get(s.clone())) {
                message = format!("duplicate key {}", crate::error::quoted(name.trim()));
            }
        }
        let key = span.and_then(|span| key_path_at(self.text, &span));
        PolicyError::Syntax { at, key, message }
    }

    fn sandbox(&self, raw: &RawSandbox, out: &mut SandboxPolicy) -> Result<(), PolicyError> {
        if let Some(v) = &raw.workspace {
            out.workspace = Some(self.check(v, "sandbox.workspace", |v| {
                rules::workspace(string(v, "a path")?)
            })?);
        }
        if let Some(v) = &raw.timeout {
            out.timeout = self.check(v, "sandbox.timeout", |v| {
                rules::timeout_text(string(v, "a duration like \"60s\"")?)
            })?;
        }
        if let Some(v) = &raw.network {
            out.network = Some(self.check(v, "sandbox.network", |v| {
                Ok(string(v, "\"none\" or \"gateway\"")?.parse::<NetworkMode>()?)
            })?);
        }
        if let Some(v) = &raw.hostname {
            out.hostname = self.check(v, "sandbox.hostname", |v| {
                rules::hostname(string(v, "a hostname")?)
            })?;
        }
        if let Some(v) = &raw.tty {
            out.tty = self.check(v, "sandbox.tty", boolean)?;
        }
        if let Some(v) = &raw.host_uid {
            out.host_uid = self.check(v, "sandbox.host_uid", |v| rules::host_id(integer(v)?))?;
        }
        if let Some(v) = &raw.host_gid {
            out.host_gid = self.check(v, "sandbox.host_gid", |v| rules::host_id(integer(v)?))?;
        }
        if let Some(list) = &raw.allow_missing {
            for (i, v) in list.iter().enumerate() {
                let layer = self.check(v, &format!("sandbox.allow_missing[{i}]"), |v| {
                    Ok(string(v, "a layer name")?.parse::<Layer>()?)
                })?;
                out.allow_missing.insert(layer);
            }
        }
        if let Some(env) = &raw.env {
            for (name, value) in env {
                rules::env_name(name.get_ref())
                    .map_err(|e| self.invalid(name.span(), "sandbox.env", e))?;
                let key = format!("sandbox.env.{}", name.get_ref());
                let value = self.check(value, &key, |v| {
                    let text = string(v, "a string")?;
                    rules::env_value(text)?;
                    Ok(text.to_owned())
                })?;
                out.env.insert(name.get_ref().clone(), value);
            }
        }
        if let Some(mounts) = &raw.mounts {
            self.mounts(mounts, out)?;
        }
        Ok(())
    }

    fn mounts(
        &self,
        mounts: &[Spanned<RawMount>],
        out: &mut SandboxPolicy,
    ) -> Result<(), PolicyError> {
        // Where to point an error about mount i as a whole: its `path`, else the table.
        let mut spans = Vec::with_capacity(mounts.len());
        for (i, mount) in mounts.iter().enumerate() {
            let key = format!("sandbox.mounts[{i}]");
            let raw = mount.get_ref();
            let missing = |field: &str| {
                self.invalid(
                    mount.span(),
                    key.clone(),
                    ValueError::Other(format!("missing \"{field}\"")),
                )
            };
            let host = raw.host.as_ref().ok_or_else(|| missing("host"))?;
            let path = raw.path.as_ref().ok_or_else(|| missing("path"))?;
            let host = self.check(host, &format!("{key}.host"), |v| {
                rules::mount_host(string(v, "an absolute path")?)
            })?;
            let path_value = path;
            let path = self.check(path, &format!("{key}.path"), |v| {
                rules::mount_path(string(v, "an absolute path")?)
            })?;
            let writable = match &raw.writable {
                Some(v) => self.check(v, &format!("{key}.writable"), boolean)?,
                None => false,
            };
            spans.push(path_value.span());
            out.mounts.push(ExtraMount {
                host,
                path,
                writable,
            });
        }
        rules::mounts_consistent(&out.mounts).map_err(|(i, e)| {
            let span = spans.get(i).cloned().unwrap_or(0..0);
            self.invalid(span, format!("sandbox.mounts[{i}].path"), e)
        })
    }

    fn limits(&self, raw: &RawLimits, out: &mut Limits) -> Result<(), PolicyError> {
        if let Some(v) = &raw.memory {
            out.memory = self.check(v, "limits.memory", |v| rules::memory(size(v)?))?;
        }
        if let Some(v) = &raw.pids {
            out.pids = self.check(v, "limits.pids", |v| rules::pids(integer(v)?))?;
        }
        if let Some(v) = &raw.cpu {
            out.cpu = self.check(v, "limits.cpu", |v| rules::cpu(number(v)?))?;
        }
        if let Some(v) = &raw.nofile {
            out.nofile = self.check(v, "limits.nofile", |v| rules::nofile(integer(v)?))?;
        }
        if let Some(v) = &raw.tmp {
            out.tmp = self.check(v, "limits.tmp", |v| rules::disk(size(v)?))?;
        }
        if let Some(v) = &raw.workspace {
            out.workspace =
                self.check(v, "limits.workspace", |v| rules::workspace_size(size(v)?))?;
        }
        if let Some(v) = &raw.file_size {
            out.file_size = self.check(v, "limits.file_size", |v| rules::file_size(size(v)?))?;
        }
        Ok(())
    }

    fn network(&self, raw: &RawNetwork, out: &mut NetworkPolicy) -> Result<(), PolicyError> {
        if let Some(v) = &raw.mode {
            out.mode = self.check(v, "network.mode", |v| {
                Ok(string(v, "\"enforce\" or \"report\"")?.parse::<Enforcement>()?)
            })?;
        }
        if let Some(list) = &raw.allow {
            for (i, v) in list.iter().enumerate() {
                out.allow
                    .push(self.check(v, &format!("network.allow[{i}]"), |v| {
                        rules::allow_entry(string(v, "an allow entry like \"api.github.com:443\"")?)
                    })?);
            }
        }
        if let Some(list) = &raw.allow_private {
            for (i, v) in list.iter().enumerate() {
                out.allow_private.push(self.check(
                    v,
                    &format!("network.allow_private[{i}]"),
                    |v| {
                        rules::allow_private_entry(string(
                            v,
                            "an allow entry like \"10.0.0.5:8080\"",
                        )?)
                    },
                )?);
            }
        }
        if let Some(list) = &raw.intercept {
            for (i, v) in list.iter().enumerate() {
                out.intercept
                    .push(self.check(v, &format!("network.intercept[{i}]"), |v| {
                        InterceptHost::parse(string(v, "a host name like \"api.example.com\"")?)
                            .map_err(ValueError::Other)
                    })?);
            }
        }
        if let Some(rate) = &raw.rate {
            self.rate(rate, &mut out.rate)?;
        }
        Ok(())
    }

    /// A host that must be reachable: a host name (no wildcard) some `network.allow` entry names.
    fn allowed_host(
        &self,
        v: &Spanned<Value>,
        key: &str,
        network: &NetworkPolicy,
    ) -> Result<HostName, PolicyError> {
        self.check(v, key, |v| {
            let text = string(v, "a host name like \"api.github.com\"")?;
            let host = HostName::parse(text).map_err(|e| ValueError::Other(e.to_string()))?;
            if !network
                .allow
                .iter()
                .any(|e| e.matches_host(Target::Name(&host)))
            {
                return Err(ValueError::Other(format!(
                    "{} is not in network.allow, so the sandbox could never reach it",
                    crate::error::quoted(text)
                )));
            }
            Ok(host)
        })
    }

    fn string_list(
        &self,
        list: &[Spanned<Value>],
        key: &str,
        expected: &'static str,
        rule: impl Fn(&str) -> Result<String, String>,
    ) -> Result<Vec<String>, PolicyError> {
        list.iter()
            .enumerate()
            .map(|(i, v)| {
                self.check(v, &format!("{key}[{i}]"), |v| {
                    rule(string(v, expected)?).map_err(ValueError::Other)
                })
            })
            .collect()
    }

    fn http_rules(
        &self,
        rules: &[Spanned<RawRule>],
        out: &mut NetworkPolicy,
    ) -> Result<(), PolicyError> {
        for (i, rule) in rules.iter().enumerate() {
            let key = format!("network.rules[{i}]");
            let raw = rule.get_ref();
            let whole = |message: &str| {
                self.invalid(
                    rule.span(),
                    key.clone(),
                    ValueError::Other(message.to_owned()),
                )
            };
            let host = raw.host.as_ref().ok_or_else(|| whole("missing \"host\""))?;
            let host = self.allowed_host(host, &format!("{key}.host"), out)?;
            if raw.methods.is_none() && raw.paths.is_none() {
                return Err(whole("give \"methods\", \"paths\" or both"));
            }
            let methods = match &raw.methods {
                Some(list) => self.string_list(
                    list,
                    &format!("{key}.methods"),
                    "a method like \"GET\"",
                    http_rules::method,
                )?,
                None => vec!["*".to_owned()],
            };
            let paths = match &raw.paths {
                Some(list) => self.string_list(
                    list,
                    &format!("{key}.paths"),
                    "a path glob like \"/repos/*\"",
                    http_rules::path_glob,
                )?,
                None => vec!["/*".to_owned()],
            };
            if methods.is_empty() {
                return Err(whole("\"methods\" is empty, so the rule allows nothing"));
            }
            if paths.is_empty() {
                return Err(whole("\"paths\" is empty, so the rule allows nothing"));
            }
            out.rules.push(HttpRule {
                host,
                methods,
                paths,
            });
        }
        Ok(())
    }

    fn credentials(
        &self,
        list: &[Spanned<RawCredential>],
        out: &mut Policy,
    ) -> Result<(), PolicyError> {
        for (i, cred) in list.iter().enumerate() {
            let key = format!("credentials[{i}]");
            let raw = cred.get_ref();
            let whole = |message: String| {
                self.invalid(cred.span(), key.clone(), ValueError::Other(message))
            };
            let name_v = raw
                .name
                .as_ref()
                .ok_or_else(|| whole("missing \"name\"".into()))?;
            let name = self.check(name_v, &format!("{key}.name"), |v| {
                credentials::name(string(v, "a name")?).map_err(ValueError::Other)
            })?;
            if out.credentials.iter().any(|c| c.name == name) {
                return Err(self.invalid(
                    name_v.span(),
                    format!("{key}.name"),
                    ValueError::Other(format!(
                        "another credential is already called {}",
                        crate::error::quoted(&name)
                    )),
                ));
            }
            let hosts_v = raw
                .hosts
                .as_ref()
                .ok_or_else(|| whole("missing \"hosts\"".into()))?;
            if hosts_v.is_empty() {
                return Err(whole(
                    "\"hosts\" is empty: bind the credential to at least one host".into(),
                ));
            }
            let mut hosts = Vec::new();
            for (j, v) in hosts_v.iter().enumerate() {
                hosts.push(self.allowed_host(v, &format!("{key}.hosts[{j}]"), &out.network)?);
            }

            let mut injections = Vec::new();
            if let Some(v) = &raw.header {
                injections.push(self.check(v, &format!("{key}.header"), |v| {
                    Ok(Injection::Header(
                        credentials::header(string(v, "a header name")?)
                            .map_err(ValueError::Other)?,
                    ))
                })?);
            }
            if let Some(v) = &raw.query {
                injections.push(self.check(v, &format!("{key}.query"), |v| {
                    Ok(Injection::Query(
                        credentials::query(string(v, "a query parameter name")?)
                            .map_err(ValueError::Other)?,
                    ))
                })?);
            }
            for (field, v, inject) in [
                ("basic_auth", &raw.basic_auth, Injection::BasicAuth),
                ("any_header", &raw.any_header, Injection::AnyHeader),
            ] {
                if let Some(v) = v {
                    let on = self.check(v, &format!("{key}.{field}"), |v| match boolean(v)? {
                        true => Ok(true),
                        false => Err(ValueError::Other(
                            "only `true` is meaningful; leave it out otherwise".into(),
                        )),
                    })?;
                    if on {
                        injections.push(inject);
                    }
                }
            }
            let inject = match injections.len() {
                1 => injections.remove(0),
                0 => return Err(whole("say where the secret goes: one of \"header\", \"query\", \"basic_auth\" or \"any_header\"".into())),
                _ => return Err(whole("give only one of \"header\", \"query\", \"basic_auth\" and \"any_header\"".into())),
            };
            let format = match &raw.format {
                Some(v) => {
                    let f = self.check(v, &format!("{key}.format"), |v| {
                        credentials::format(string(v, "a string with {secret}")?)
                            .map_err(ValueError::Other)
                    })?;
                    if matches!(inject, Injection::BasicAuth | Injection::AnyHeader)
                        && f != SECRET_MARK
                    {
                        return Err(self.invalid(v.span(), format!("{key}.format"), ValueError::Other(format!("{inject} replaces the placeholder where the sandbox put it; \"format\" applies only to \"header\" and \"query\""))));
                    }
                    f
                }
                None => SECRET_MARK.to_owned(),
            };

            let mut sources = Vec::new();
            if let Some(v) = &raw.from_env {
                sources.push(self.check(v, &format!("{key}.from_env"), |v| {
                    let n = string(v, "an environment variable name")?;
                    rules::env_name_syntax(n)?;
                    Ok(SecretSource::Env(n.to_owned()))
                })?);
            }
            if let Some(v) = &raw.from_file {
                sources.push(self.check(v, &format!("{key}.from_file"), |v| {
                    Ok(SecretSource::File(rules::mount_host(string(
                        v,
                        "an absolute path",
                    )?)?))
                })?);
            }
            if let Some(list) = &raw.from_command {
                let argv =
                    self.string_list(list, &format!("{key}.from_command"), "a string", |s| {
                        Ok(s.to_owned())
                    })?;
                let argv =
                    credentials::command(&argv).map_err(|m| whole(format!("from_command: {m}")))?;
                sources.push(SecretSource::Command(argv));
            }
            let source = match sources.len() {
                1 => sources.remove(0),
                0 => return Err(whole("say where the secret comes from: one of \"from_env\", \"from_file\" or \"from_command\"".into())),
                _ => return Err(whole("give only one of \"from_env\", \"from_file\" and \"from_command\"".into())),
            };
            let env = match (&raw.env, &source) {
                (Some(v), _) => {
                    let name = self.check(v, &format!("{key}.env"), |v| {
                        let n = string(v, "an environment variable name")?;
                        rules::env_name(n)?;
                        Ok(n.to_owned())
                    })?;
                    let clash = out.credentials.iter().any(|c| c.env == name)
                        || out.sandbox.env.contains_key(&name);
                    if clash {
                        return Err(self.invalid(
                            v.span(),
                            format!("{key}.env"),
                            ValueError::Other(format!(
                                "{} is already set by sandbox.env or another credential",
                                crate::error::quoted(&name)
                            )),
                        ));
                    }
                    name
                }
                (None, SecretSource::Env(n)) => {
                    let clash = out.credentials.iter().any(|c| c.env == *n)
                        || out.sandbox.env.contains_key(n);
                    if clash {
                        return Err(whole(format!("{} is already set by sandbox.env or another credential; name the placeholder variable with \"env\"", crate::error::quoted(n))));
                    }
                    n.clone()
                }
                (None, _) => {
                    return Err(whole(
                        "missing \"env\": the sandbox variable that holds the placeholder".into(),
                    ))
                }
            };
            let require = match &raw.require {
                Some(v) => self.check(v, &format!("{key}.require"), boolean)?,
                None => false,
            };
            out.credentials.push(Credential {
                name,
                hosts,
                inject,
                format,
                source,
                env,
                require,
            });
        }
        Ok(())
    }

    fn rate(&self, raw: &RawRate, out: &mut RateLimits) -> Result<(), PolicyError> {
        let rate = |v: &Value| rules::rate(integer(v)?);
        if let Some(v) = &raw.requests_per_minute {
            out.requests_per_minute = self.check(v, "network.rate.requests_per_minute", rate)?;
        }
        if let Some(v) = &raw.requests_per_minute_per_host {
            out.requests_per_minute_per_host =
                self.check(v, "network.rate.requests_per_minute_per_host", rate)?;
        }
        if let Some(v) = &raw.max_connections {
            out.max_connections = self.check(v, "network.rate.max_connections", rate)?;
        }
        if let Some(v) = &raw.max_bytes_out {
            out.max_bytes_out = self.check(v, "network.rate.max_bytes_out", |v| {
                rules::traffic(size(v)?)
            })?;
        }
        if let Some(v) = &raw.max_bytes_in {
            out.max_bytes_in =
                self.check(v, "network.rate.max_bytes_in", |v| rules::traffic(size(v)?))?;
        }
        if let Some(v) = &raw.on_exceed {
            out.on_exceed = self.check(v, "network.rate.on_exceed", |v| {
                Ok(string(v, "\"block\" or \"terminate\"")?.parse::<OnExceed>()?)
            })?;
        }
        Ok(())
    }

    /// `[response] terminate_after_blocked = N` is the old spelling of `[detect.blocked]`:
    /// N blocked attempts in the whole session (a 24h window, the longest session) end it; 0
    /// turns the rule off. Both spellings at once is an error that names the new one.
    fn response(
        &self,
        raw: &RawResponse,
        detect: Option<&RawDetect>,
        out: &mut DetectPolicy,
    ) -> Result<(), PolicyError> {
        let Some(v) = &raw.terminate_after_blocked else {
            return Ok(());
        };
        let key = "response.terminate_after_blocked";
        if detect.is_some_and(|d| d.blocked.is_some()) {
            return Err(self.invalid(
                v.span(),
                key,
                ValueError::Other(
                    "replaced by [detect.blocked] (threshold, window, response); set only [detect.blocked]"
                        .to_owned(),
                ),
            ));
        }
        let n = self.check(v, key, |v| rules::count(integer(v)?))?;
        let b = &mut out.blocked;
        b.enabled = n > 0;
        if n > 0 {
            b.threshold = n;
        }
        b.window = rules::MAX_TIMEOUT;
        b.response = Response::Terminate;
        Ok(())
    }

    fn enabled(&self, v: &Leaf, key: &str, out: &mut bool) -> Result<(), PolicyError> {
        if let Some(v) = v {
            *out = self.check(v, key, boolean)?;
        }
        Ok(())
    }

    fn response_of(&self, v: &Leaf, key: &str, out: &mut Response) -> Result<(), PolicyError> {
        if let Some(v) = v {
            *out = self.check(v, key, |v| {
                Ok(string(v, "\"log\", \"block\" or \"terminate\"")?.parse::<Response>()?)
            })?;
        }
        Ok(())
    }

    fn window(
        &self,
        v: &Leaf,
        key: &str,
        out: &mut std::time::Duration,
    ) -> Result<(), PolicyError> {
        if let Some(v) = v {
            *out = self.check(v, key, |v| {
                detect::window(crate::duration::parse_duration(string(
                    v,
                    "a duration like \"10s\"",
                )?)?)
            })?;
        }
        Ok(())
    }

    fn threshold(&self, v: &Leaf, key: &str, out: &mut u32) -> Result<(), PolicyError> {
        if let Some(v) = v {
            *out = self.check(v, key, |v| detect::threshold(integer(v)?))?;
        }
        Ok(())
    }

    fn bytes(&self, v: &Leaf, key: &str, out: &mut ByteSize) -> Result<(), PolicyError> {
        if let Some(v) = v {
            *out = self.check(v, key, |v| detect::bytes(size(v)?))?;
        }
        Ok(())
    }

    fn detect(
        &self,
        raw: &RawDetect,
        sandbox_env: &BTreeMap<String, String>,
        out: &mut DetectPolicy,
    ) -> Result<(), PolicyError> {
        if let Some(b) = &raw.blocked {
            let (b, o) = (b.get_ref(), &mut out.blocked);
            self.enabled(&b.enabled, "detect.blocked.enabled", &mut o.enabled)?;
            self.threshold(&b.threshold, "detect.blocked.threshold", &mut o.threshold)?;
            self.window(&b.window, "detect.blocked.window", &mut o.window)?;
            self.response_of(&b.response, "detect.blocked.response", &mut o.response)?;
            self.enabled(&b.alert, "detect.blocked.alert", &mut o.alert)?;
        }
        if let Some(t) = &raw.dns_tunnel {
            let o = &mut out.dns_tunnel;
            let k = |name: &str| format!("detect.dns_tunnel.{name}");
            self.enabled(&t.enabled, &k("enabled"), &mut o.enabled)?;
            self.window(&t.window, &k("window"), &mut o.window)?;
            self.threshold(
                &t.distinct_names,
                &k("distinct_names"),
                &mut o.distinct_names,
            )?;
            if let Some(v) = &t.max_name_length {
                o.max_name_length = self.check(v, &k("max_name_length"), |v| {
                    detect::name_length(integer(v)?)
                })?;
            }
            self.threshold(&t.long_names, &k("long_names"), &mut o.long_names)?;
            if let Some(v) = &t.entropy {
                o.entropy = self.check(v, &k("entropy"), |v| detect::entropy(number(v)?))?;
            }
            self.threshold(
                &t.high_entropy_labels,
                &k("high_entropy_labels"),
                &mut o.high_entropy_labels,
            )?;
            self.threshold(&t.queries, &k("queries"), &mut o.queries)?;
            if let Some(v) = &t.nxdomain_ratio {
                o.nxdomain_ratio =
                    self.check(v, &k("nxdomain_ratio"), |v| detect::ratio(number(v)?))?;
            }
            self.threshold(&t.min_names, &k("min_names"), &mut o.min_names)?;
            self.threshold(&t.other_types, &k("other_types"), &mut o.other_types)?;
            self.response_of(&t.response, &k("response"), &mut o.response)?;
            self.enabled(&t.alert, &k("alert"), &mut o.alert)?;
        }
        if let Some(x) = &raw.exfil {
            let o = &mut out.exfil;
            let k = |name: &str| format!("detect.exfil.{name}");
            self.enabled(&x.enabled, &k("enabled"), &mut o.enabled)?;
            self.window(&x.window, &k("window"), &mut o.window)?;
            self.bytes(&x.bytes_out, &k("bytes_out"), &mut o.bytes_out)?;
            self.bytes(
                &x.max_request_body,
                &k("max_request_body"),
                &mut o.max_request_body,
            )?;
            self.threshold(
                &x.small_requests,
                &k("small_requests"),
                &mut o.small_requests,
            )?;
            self.bytes(
                &x.small_request_size,
                &k("small_request_size"),
                &mut o.small_request_size,
            )?;
            self.threshold(
                &x.distinct_hosts,
                &k("distinct_hosts"),
                &mut o.distinct_hosts,
            )?;
            self.response_of(&x.response, &k("response"), &mut o.response)?;
            self.enabled(&x.alert, &k("alert"), &mut o.alert)?;
        }
        if let Some(s) = &raw.sandbox {
            let o = &mut out.sandbox;
            let k = |name: &str| format!("detect.sandbox.{name}");
            self.enabled(&s.enabled, &k("enabled"), &mut o.enabled)?;
            self.enabled(&s.limits, &k("limits"), &mut o.limits)?;
            self.enabled(&s.lingering, &k("lingering"), &mut o.lingering)?;
            if let Some(v) = &s.seccomp_denied {
                o.seccomp_denied =
                    self.check(v, &k("seccomp_denied"), |v| rules::count(integer(v)?))?;
            }
            self.response_of(&s.response, &k("response"), &mut o.response)?;
            self.enabled(&s.alert, &k("alert"), &mut o.alert)?;
        }
        if let Some(c) = &raw.canary {
            let o = &mut out.canary;
            if let Some(list) = &c.env {
                for (i, v) in list.iter().enumerate() {
                    let key = format!("detect.canary.env[{i}]");
                    let name = self.check(v, &key, |v| {
                        detect::canary_env(string(v, "an environment variable name")?)
                    })?;
                    let quoted = crate::error::quoted(&name);
                    let clash = if o.env.contains(&name) {
                        Some(format!("{quoted} is listed twice"))
                    } else if sandbox_env.contains_key(&name) {
                        Some(format!("{quoted} is also set in sandbox.env; a canary must be a value only cordon knows"))
                    } else {
                        None
                    };
                    if let Some(message) = clash {
                        return Err(self.invalid(v.span(), key, ValueError::Other(message)));
                    }
                    o.env.push(name);
                }
            }
            if let Some(list) = &c.files {
                for (i, v) in list.iter().enumerate() {
                    let key = format!("detect.canary.files[{i}]");
                    let path = self.check(v, &key, |v| {
                        detect::canary_file(string(v, "a path relative to /workspace")?)
                    })?;
                    if let Some(why) = detect::canary_file_clash(&o.files, &path) {
                        return Err(self.invalid(v.span(), key, ValueError::Other(why)));
                    }
                    o.files.push(path);
                }
            }
            self.response_of(&c.response, "detect.canary.response", &mut o.response)?;
            self.enabled(&c.alert, "detect.canary.alert", &mut o.alert)?;
        }
        Ok(())
    }

    fn audit(&self, raw: &RawAudit, out: &mut AuditPolicy) -> Result<(), PolicyError> {
        if let Some(v) = &raw.syslog {
            out.syslog = Some(self.check(v, "audit.syslog", |v| {
                rules::syslog(string(v, "a string like \"udp://127.0.0.1:514\"")?)
            })?);
        }
        if let Some(v) = &raw.syslog_min_severity {
            out.syslog_min_severity = self.check(v, "audit.syslog_min_severity", |v| {
                Ok(string(v, "a severity name")?.parse::<MinSeverity>()?)
            })?;
        }
        Ok(())
    }

    fn alerts(&self, raw: &RawAlerts, out: &mut AlertsPolicy) -> Result<(), PolicyError> {
        if let Some(v) = &raw.webhook {
            out.webhook = Some(self.check(v, "alerts.webhook", |v| {
                detect::webhook(string(v, "a URL like \"http://127.0.0.1:9000/alerts\"")?)
            })?);
        }
        if let Some(v) = &raw.timeout {
            out.timeout = self.check(v, "alerts.timeout", |v| {
                detect::alert_timeout(crate::duration::parse_duration(string(
                    v,
                    "a duration like \"5s\"",
                )?)?)
            })?;
        }
        if let Some(v) = &raw.retries {
            out.retries = self.check(v, "alerts.retries", |v| detect::retries(integer(v)?))?;
        }
        Ok(())
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

fn string<'v>(v: &'v Value, expected: &'static str) -> Result<&'v str, ValueError> {
    v.as_str().ok_or(ValueError::Type {
        expected,
        found: kind(v),
    })
}

fn integer(v: &Value) -> Result<i128, ValueError> {
    v.as_integer().map(i128::from).ok_or(ValueError::Type {
        expected: "an integer",
        found: kind(v),
    })
}

fn number(v: &Value) -> Result<f64, ValueError> {
    match v {
        Value::Float(f) => Ok(*f),
        // Cores are small numbers; every integer the rules accept is exact in f64.
        Value::Integer(i) => Ok(*i as f64),
        _ => Err(ValueError::Type {
            expected: "a number",
            found: kind(v),
        }),
    }
}

fn boolean(v: &Value) -> Result<bool, ValueError> {
    v.as_bool().ok_or(ValueError::Type {
        expected: "true or false",
        found: kind(v),
    })
}

/// A size: text like `"512M"`, or a non-negative integer number of bytes.
fn size(v: &Value) -> Result<ByteSize, ValueError> {
    match v {
        Value::String(text) => Ok(ByteSize::parse(text)?),
        Value::Integer(n) => u64::try_from(*n)
            .map(ByteSize)
            .map_err(|_| ValueError::Range {
                expected: "a size of 0 bytes or more".to_owned(),
                got: n.to_string(),
            }),
        _ => Err(ValueError::Type {
            expected: "a size like \"512M\"",
            found: kind(v),
        }),
    }
}

/// The dotted key a toml error span points at: for a span on a key (an unknown key), the table
/// holding it; for a span on a value (a table of the wrong type), the key of that value. `None`
/// for the top level, or if the text does not parse on its own.
fn key_path_at(text: &str, span: &Range<usize>) -> Option<String> {
    let root = DeTable::parse(text).ok()?;
    let found = find_in_table(root.get_ref(), "", span)?;
    (!found.is_empty()).then_some(found)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn find_in_table(table: &DeTable<'_>, prefix: &str, span: &Range<usize>) -> Option<String> {
    for (key, value) in table.iter() {
        if key.span() == *span {
            return Some(prefix.to_owned());
        }
        let path = join(prefix, key.get_ref());
        if value.span() == *span {
            return Some(path);
        }
        if let Some(found) = find_in_value(value.get_ref(), &path, span) {
            return Some(found);
        }
    }
    None
}

fn find_in_value(value: &DeValue<'_>, path: &str, span: &Range<usize>) -> Option<String> {
    match value {
        DeValue::Table(table) => find_in_table(table, path, span),
        DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let item_path = format!("{path}[{i}]");
            if item.span() == *span {
                return Some(item_path);
            }
            find_in_value(item.get_ref(), &item_path, span)
        }),
        _ => None,
    }
}
