//! `[detect]` and `[alerts]`: the anomaly rules, their thresholds, what each one does when it
//! fires, and where alerts go.
//!
//! Guarantees: every threshold has a default that a benign agent session (package downloads, a
//! few hundred API calls) stays under, and every value is checked by the functions here, shared
//! by the file reader and [`crate::Policy::validate`]: windows are more than 0 and at most 24h,
//! counts are positive, ratios lie in (0, 1], a webhook is a plain `http://` URL, a canary file
//! is a plain path inside `/workspace` (relative, no `.` or `..`, no empty component), listed
//! once, never the directory of another. Each rule carries its own `response` (`log` | `block`
//! | `terminate`) and `alert` switch.

use std::time::Duration;

use serde::Serialize;

use crate::error::quoted;
use crate::model::Response;
use crate::rules::ValueError;
use crate::size::ByteSize;

/// `[detect]`: one table per rule.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DetectPolicy {
    pub blocked: BlockedRule,
    pub dns_tunnel: DnsTunnelRule,
    pub exfil: ExfilRule,
    pub sandbox: SandboxRule,
    pub canary: CanaryRule,
}

/// `[detect.blocked]`: blocked network attempts (DNS refusals excluded) within a window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BlockedRule {
    pub enabled: bool,
    /// Fires when this many attempts are blocked within `window`.
    pub threshold: u32,
    #[serde(serialize_with = "crate::duration::serialize")]
    pub window: Duration,
    pub response: Response,
    pub alert: bool,
}

impl Default for BlockedRule {
    fn default() -> Self {
        BlockedRule {
            enabled: true,
            threshold: 5,
            window: Duration::from_secs(60),
            response: Response::Terminate,
            alert: true,
        }
    }
}

/// `[detect.dns_tunnel]`: the shapes of data smuggled out in DNS names. Every signal is counted
/// over the same sliding `window`; the first one to reach its threshold fires.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsTunnelRule {
    pub enabled: bool,
    #[serde(serialize_with = "crate::duration::serialize")]
    pub window: Duration,
    /// Distinct names queried under one registrable domain.
    pub distinct_names: u32,
    /// A name longer than this many characters is "long".
    pub max_name_length: u32,
    /// Long names queried.
    pub long_names: u32,
    /// Bits per character from which a leftmost label (of 24 characters or more) is
    /// "high-entropy".
    pub entropy: f64,
    /// Distinct high-entropy leftmost labels queried.
    pub high_entropy_labels: u32,
    /// Queries of any kind.
    pub queries: u32,
    /// Share of the distinct names queried that were answered NXDOMAIN (or refused) at or above
    /// which the rule fires, once at least `min_names` distinct names were queried in the
    /// window (a name asked again and again counts once: a retry loop is not a tunnel).
    pub nxdomain_ratio: f64,
    pub min_names: u32,
    /// Queries for record types other than A and AAAA.
    pub other_types: u32,
    pub response: Response,
    pub alert: bool,
}

impl Default for DnsTunnelRule {
    fn default() -> Self {
        DnsTunnelRule {
            enabled: true,
            window: Duration::from_secs(10),
            distinct_names: 20,
            max_name_length: 52,
            long_names: 3,
            entropy: 3.6,
            high_entropy_labels: 5,
            queries: 200,
            nxdomain_ratio: 0.8,
            min_names: 20,
            other_types: 10,
            response: Response::Terminate,
            alert: true,
        }
    }
}

/// `[detect.exfil]`: traffic shaped like data leaving through allowed destinations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExfilRule {
    pub enabled: bool,
    #[serde(serialize_with = "crate::duration::serialize")]
    pub window: Duration,
    /// Bytes sent upstream within the window, all destinations together.
    pub bytes_out: ByteSize,
    /// One HTTP request (or captured connection) that sent at least this much.
    pub max_request_body: ByteSize,
    /// Small data-carrying requests (a body or a query string, at most `small_request_size`
    /// sent) to one host within the window.
    pub small_requests: u32,
    pub small_request_size: ByteSize,
    /// Distinct destination hosts reached within the window.
    pub distinct_hosts: u32,
    pub response: Response,
    pub alert: bool,
}

impl Default for ExfilRule {
    fn default() -> Self {
        ExfilRule {
            enabled: true,
            window: Duration::from_secs(60),
            bytes_out: ByteSize::mib(5),
            max_request_body: ByteSize::mib(1),
            small_requests: 60,
            small_request_size: ByteSize::kib(4),
            distinct_hosts: 30,
            response: Response::Block,
            alert: true,
        }
    }
}

/// `[detect.sandbox]`: what the sandboxed processes do to their own walls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRule {
    pub enabled: bool,
    /// Fire on a limit the session ran into while running: pids, memory (OOM kill), disk.
    pub limits: bool,
    /// Fire when processes were still alive in the sandbox after the command exited (something
    /// tried to outlive its session; they are killed either way).
    pub lingering: bool,
    /// Fire when this many syscalls were denied by the seccomp filter; `0`: do not count (the
    /// kernel answers denials itself instead of the supervisor).
    pub seccomp_denied: u32,
    pub response: Response,
    pub alert: bool,
}

impl Default for SandboxRule {
    fn default() -> Self {
        SandboxRule {
            enabled: true,
            limits: true,
            lingering: true,
            seccomp_denied: 10,
            response: Response::Log,
            alert: true,
        }
    }
}

/// `[detect.canary]`: honey tokens. Each variable named in `env` gets a fresh random value in the
/// sandbox's environment, and each path in `files` becomes a credential-shaped file in
/// `/workspace` holding fresh random tokens; any of those values appearing in outbound traffic
/// fires the rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryRule {
    pub env: Vec<String>,
    /// Paths relative to `/workspace` (`.env`, `.aws/credentials`, …); the file's shape follows
    /// its name. Never committed back to a host workspace directory.
    pub files: Vec<String>,
    pub response: Response,
    pub alert: bool,
}

impl Default for CanaryRule {
    fn default() -> Self {
        CanaryRule {
            env: Vec::new(),
            files: Vec::new(),
            response: Response::Terminate,
            alert: true,
        }
    }
}

/// `[alerts]`: where rule firings go besides the audit store and stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsPolicy {
    /// `http://host[:port]/path`: each firing of a rule with `alert = true` is POSTed there as
    /// JSON by the supervisor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// One delivery attempt (connect, send, response).
    #[serde(serialize_with = "crate::duration::serialize")]
    pub timeout: Duration,
    /// Further attempts after a failed one, with doubling back-off from 200 ms.
    pub retries: u32,
}

impl Default for AlertsPolicy {
    fn default() -> Self {
        AlertsPolicy {
            webhook: None,
            timeout: Duration::from_secs(5),
            retries: 3,
        }
    }
}

/// Longest alert-delivery timeout.
pub(crate) const MAX_ALERT_TIMEOUT: Duration = Duration::from_secs(60);
/// Most retries of one alert.
pub(crate) const MAX_RETRIES: i128 = 10;

pub(crate) fn window(d: Duration) -> Result<Duration, ValueError> {
    crate::rules::timeout(d)
}

/// A threshold: at least 1.
pub(crate) fn threshold(n: i128) -> Result<u32, ValueError> {
    crate::rules::rate(n)
}

pub(crate) fn name_length(n: i128) -> Result<u32, ValueError> {
    if !(1..=253).contains(&n) {
        return Err(ValueError::Range {
            expected: "between 1 and 253 (the longest DNS name)".into(),
            got: n.to_string(),
        });
    }
    Ok(n as u32)
}

pub(crate) fn entropy(bits: f64) -> Result<f64, ValueError> {
    // A label's characters are letters, digits and '-': at most log2(37) ≈ 5.2 bits each.
    if !(bits > 0.0 && bits <= 6.0) {
        return Err(ValueError::Range {
            expected: "more than 0 and at most 6 bits per character".into(),
            got: bits.to_string(),
        });
    }
    Ok(bits)
}

pub(crate) fn ratio(r: f64) -> Result<f64, ValueError> {
    if !(r > 0.0 && r <= 1.0) {
        return Err(ValueError::Range {
            expected: "more than 0 and at most 1".into(),
            got: r.to_string(),
        });
    }
    Ok(r)
}

/// A byte threshold: at least 1 byte.
pub(crate) fn bytes(size: ByteSize) -> Result<ByteSize, ValueError> {
    crate::rules::traffic(size)
}

pub(crate) fn alert_timeout(d: Duration) -> Result<Duration, ValueError> {
    if d.is_zero() || d > MAX_ALERT_TIMEOUT {
        return Err(ValueError::Range {
            expected: "more than 0 and at most 1m".into(),
            got: crate::duration::format_duration(d),
        });
    }
    Ok(d)
}

pub(crate) fn retries(n: i128) -> Result<u32, ValueError> {
    if !(0..=MAX_RETRIES).contains(&n) {
        return Err(ValueError::Range {
            expected: format!("between 0 and {MAX_RETRIES}"),
            got: n.to_string(),
        });
    }
    Ok(n as u32)
}

/// The variables cordon points at the sandbox's trust bundle when it intercepts TLS.
pub const CA_BUNDLE_VARS: [&str; 6] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "PIP_CERT",
    "GIT_SSL_CAINFO",
];

/// A canary variable name: a valid environment name, not one cordon or the policy sets.
pub(crate) fn canary_env(name: &str) -> Result<String, ValueError> {
    crate::rules::env_name(name)?;
    // Everything cordon itself puts in the sandbox's environment: a canary there would replace
    // it (the proxy variables, say) and break the session instead of watching it.
    const RESERVED: [&str; 14] = [
        "PATH",
        "USER",
        "LOGNAME",
        "LANG",
        "TERM",
        "TZ",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
    ];
    if RESERVED.contains(&name) || CA_BUNDLE_VARS.contains(&name) {
        return Err(ValueError::Other(format!(
            "{} is set by cordon and cannot be a canary",
            quoted(name)
        )));
    }
    Ok(name.to_owned())
}

/// Most canary files in one policy.
pub(crate) const MAX_CANARY_FILES: usize = 16;
/// Deepest canary file path, in components.
const MAX_CANARY_DEPTH: usize = 8;

/// A canary file path: relative to `/workspace`, made of plain names only, so that it can
/// never point outside the workspace however it is joined.
pub(crate) fn canary_file(path: &str) -> Result<String, ValueError> {
    let bad = |why: String| {
        ValueError::Other(format!("{} is not a canary file path: {why}", quoted(path)))
    };
    if path.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if path.chars().any(char::is_control) {
        return Err(bad("it contains control characters".into()));
    }
    if let Some(inside) = path.strip_prefix("/workspace/") {
        return Err(bad(format!(
            "write it relative to /workspace, like {}",
            quoted(inside)
        )));
    }
    if path.starts_with('/') {
        return Err(bad(
            "canary files live in /workspace; write a path relative to it, like \".env\"".into(),
        ));
    }
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts {
        match *part {
            "" => {
                return Err(bad(
                    "it has an empty component (a doubled or trailing '/')".into()
                ))
            }
            "." => return Err(bad("write it without \".\" components".into())),
            ".." => return Err(bad("\"..\" would lead out of /workspace".into())),
            p if p.len() > 255 => return Err(bad("a component is longer than 255 bytes".into())),
            _ => {}
        }
    }
    if parts.len() > MAX_CANARY_DEPTH {
        return Err(bad(format!(
            "it is nested deeper than {MAX_CANARY_DEPTH} levels"
        )));
    }
    Ok(path.to_owned())
}

/// Why `path` cannot join the canary files listed before it, if it cannot.
pub(crate) fn canary_file_clash(earlier: &[String], path: &str) -> Option<String> {
    if earlier.len() >= MAX_CANARY_FILES {
        return Some(format!("at most {MAX_CANARY_FILES} canary files"));
    }
    let under = |dir: &str, file: &str| {
        file.strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
    };
    earlier.iter().find_map(|e| {
        if e == path {
            Some(format!("{} is listed twice", quoted(path)))
        } else if under(e, path) {
            Some(format!(
                "{} is inside {}, which is a canary file",
                quoted(path),
                quoted(e)
            ))
        } else if under(path, e) {
            Some(format!(
                "{} is a canary file and the directory of {}",
                quoted(path),
                quoted(e)
            ))
        } else {
            None
        }
    })
}

/// The parts of a webhook URL the sender needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    /// `host:port` to connect to (a name, an IPv4 address, or `[v6]`).
    pub authority: String,
    pub host: String,
    pub port: u16,
    /// Starts with `/`.
    pub path: String,
}

impl WebhookUrl {
    /// Parses `http://host[:port][/path]`.
    pub fn parse(text: &str) -> Result<WebhookUrl, String> {
        let bad = |why: &str| format!("{} is not a webhook URL: {why}", quoted(text));
        if text.starts_with("https://") {
            return Err(format!(
                "{}: https webhooks are not supported by this version of cordon; use http:// (for example a relay on the host)",
                quoted(text)
            ));
        }
        let rest = text
            .strip_prefix("http://")
            .ok_or_else(|| bad("expected http://host[:port]/path"))?;
        if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("it contains whitespace or control characters"));
        }
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if path.contains('#') {
            return Err(bad("a fragment is not sent"));
        }
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        if authority.contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
            };
            addr.parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("not an IPv6 address in [ ]"))?;
            (format!("[{addr}]"), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (authority.to_owned(), None),
            }
        };
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("the port must be 1-65535"))?,
        };
        let host_ok = !host.is_empty()
            && (host.starts_with('[')
                || host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'));
        if !host_ok {
            return Err(bad("no valid host"));
        }
        Ok(WebhookUrl {
            authority: format!("{host}:{port}"),
            host,
            port,
            path,
        })
    }
}

pub(crate) fn webhook(text: &str) -> Result<String, ValueError> {
    WebhookUrl::parse(text)
        .map(|_| text.to_owned())
        .map_err(ValueError::Other)
}

/// Checks a whole `[detect]` and `[alerts]`, naming the key of the first bad value.
pub(crate) fn check(
    d: &DetectPolicy,
    a: &AlertsPolicy,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<(), (String, ValueError)> {
    fn at<T>(key: &str, r: Result<T, ValueError>) -> Result<T, (String, ValueError)> {
        r.map_err(|e| (key.to_owned(), e))
    }
    let n = |v: u32| i128::from(v);
    let b = &d.blocked;
    at("detect.blocked.threshold", threshold(n(b.threshold)))?;
    at("detect.blocked.window", window(b.window))?;
    let t = &d.dns_tunnel;
    at("detect.dns_tunnel.window", window(t.window))?;
    at(
        "detect.dns_tunnel.distinct_names",
        threshold(n(t.distinct_names)),
    )?;
    at(
        "detect.dns_tunnel.max_name_length",
        name_length(n(t.max_name_length)),
    )?;
    at("detect.dns_tunnel.long_names", threshold(n(t.long_names)))?;
    at("detect.dns_tunnel.entropy", entropy(t.entropy))?;
    at(
        "detect.dns_tunnel.high_entropy_labels",
        threshold(n(t.high_entropy_labels)),
    )?;
    at("detect.dns_tunnel.queries", threshold(n(t.queries)))?;
    at("detect.dns_tunnel.nxdomain_ratio", ratio(t.nxdomain_ratio))?;
    at("detect.dns_tunnel.min_names", threshold(n(t.min_names)))?;
    at("detect.dns_tunnel.other_types", threshold(n(t.other_types)))?;
    let x = &d.exfil;
    at("detect.exfil.window", window(x.window))?;
    at("detect.exfil.bytes_out", bytes(x.bytes_out))?;
    at("detect.exfil.max_request_body", bytes(x.max_request_body))?;
    at(
        "detect.exfil.small_requests",
        threshold(n(x.small_requests)),
    )?;
    at(
        "detect.exfil.small_request_size",
        bytes(x.small_request_size),
    )?;
    at(
        "detect.exfil.distinct_hosts",
        threshold(n(x.distinct_hosts)),
    )?;
    at(
        "detect.sandbox.seccomp_denied",
        crate::rules::count(n(d.sandbox.seccomp_denied)),
    )?;
    for (i, name) in d.canary.env.iter().enumerate() {
        let key = format!("detect.canary.env[{i}]");
        at(&key, canary_env(name))?;
        if d.canary.env[..i].contains(name) {
            return Err((
                key,
                ValueError::Other(format!("{} is listed twice", quoted(name))),
            ));
        }
        if env.contains_key(name) {
            return Err((
                key,
                ValueError::Other(format!(
                    "{} is also set in sandbox.env; a canary must be a value only cordon knows",
                    quoted(name)
                )),
            ));
        }
    }
    for (i, path) in d.canary.files.iter().enumerate() {
        let key = format!("detect.canary.files[{i}]");
        at(&key, canary_file(path))?;
        if let Some(why) = canary_file_clash(&d.canary.files[..i], path) {
            return Err((key, ValueError::Other(why)));
        }
    }
    if let Some(w) = &a.webhook {
        at("alerts.webhook", webhook(w))?;
    }
    at("alerts.timeout", alert_timeout(a.timeout))?;
    at("alerts.retries", retries(n(a.retries)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_parse_into_authority_and_path() {
        let w = WebhookUrl::parse("http://127.0.0.1:9000/hook?x=1").unwrap();
        assert_eq!(
            (w.authority.as_str(), w.port, w.path.as_str()),
            ("127.0.0.1:9000", 9000, "/hook?x=1")
        );
        let w = WebhookUrl::parse("http://alerts.example.com").unwrap();
        assert_eq!(
            (w.authority.as_str(), w.path.as_str()),
            ("alerts.example.com:80", "/")
        );
        let w = WebhookUrl::parse("http://[::1]:8080/a").unwrap();
        assert_eq!(w.authority, "[::1]:8080");
    }

    #[test]
    fn bad_webhook_urls_are_refused_with_the_reason() {
        for (url, why) in [
            ("https://x.example/", "https webhooks are not supported"),
            ("ftp://x/", "expected http://"),
            ("http://x:0/", "port must be 1-65535"),
            ("http://x:99999/", "port must be 1-65535"),
            ("http://u:p@x/", "credentials"),
            ("http:///path", "no valid host"),
            ("http://x y/", "whitespace"),
            ("http://[::1/", "unclosed"),
            ("http://x/#frag", "fragment"),
        ] {
            let e = WebhookUrl::parse(url).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
        }
    }
}
