//! The network decision: may the sandbox reach this destination?
//!
//! Guarantees: this is the only place a network verdict is made; every gateway path (explicit
//! proxy, CONNECT, transparent TCP, DNS) calls [`decide`] before resolving and
//! [`decide_resolved`] before connecting, and records the returned [`Decision`]. Both functions
//! are pure and total.
//!
//! - An address in a blocked range ([`crate::ssrf`]) is refused in every mode, including report
//!   mode, unless an `allow_private` entry names it (by address, CIDR, or the name it was resolved
//!   from) on that port.
//! - Otherwise the first `allow` entry that matches wins, then the first `allow_private` entry;
//!   with no match the verdict is `default-deny`.
//! - In report mode (`network.mode = "report"`) a default-deny is recorded but let through:
//!   `allowed` is true while `enforced_allowed` is false. Blocked ranges are never let through.
//!
//! The gateway must map its synthetic DNS answers (198.18.0.0/15) back to names before calling
//! these functions; a synthetic address given as an address is a blocked `benchmark` address.

use std::net::IpAddr;

use serde::Serialize;

use crate::allow::AllowEntry;
use crate::host::HostName;
use crate::ssrf::{blocked_range, BlockedRange};
use crate::{Enforcement, NetworkPolicy};

/// Where the sandbox wants to go: a host name, or an address it named directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    Name(&'a HostName),
    Addr(IpAddr),
}

/// A verdict and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// What happens: the connection goes ahead.
    pub allowed: bool,
    /// What enforcement decides (differs from `allowed` only in report mode).
    pub enforced_allowed: bool,
    /// The rule that decided: the allow entry as written, `allow_private:<entry>`,
    /// `default-deny`, or `ssrf:<range name>`.
    pub rule: String,
    /// A short human explanation when the destination is not allowed by enforcement.
    pub reason: Option<String>,
}

/// The rule id of a default-deny verdict.
pub const DEFAULT_DENY: &str = "default-deny";

/// Decides a name or address and port before any resolution.
pub fn decide(policy: &NetworkPolicy, target: Target<'_>, port: u16) -> Decision {
    if let Target::Addr(addr) = target {
        if let Some(range) = blocked_range(addr) {
            return private_verdict(policy, None, addr, port, range);
        }
    }
    allowlist_verdict(policy, target, port)
}

/// Decides the address a name resolved to (or the address the sandbox connected to, with
/// `name = None`), right before connecting. The address is checked against the blocked ranges
/// first; a public address is then held to the same allowlist decision as [`decide`], by name
/// when there is one.
pub fn decide_resolved(
    policy: &NetworkPolicy,
    name: Option<&HostName>,
    addr: IpAddr,
    port: u16,
) -> Decision {
    if let Some(range) = blocked_range(addr) {
        return private_verdict(policy, name, addr, port, range);
    }
    let target = match name {
        Some(name) => Target::Name(name),
        None => Target::Addr(addr),
    };
    allowlist_verdict(policy, target, port)
}

fn allowed(rule: String) -> Decision {
    Decision {
        allowed: true,
        enforced_allowed: true,
        rule,
        reason: None,
    }
}

fn private_rule(entry: &AllowEntry) -> String {
    format!("allow_private:{}", entry.raw())
}

/// A blocked-range address: only an `allow_private` entry naming it (or its name) lets it through.
fn private_verdict(
    policy: &NetworkPolicy,
    name: Option<&HostName>,
    addr: IpAddr,
    port: u16,
    range: BlockedRange,
) -> Decision {
    let exempt = policy.allow_private.iter().find(|entry| {
        entry.matches(Target::Addr(addr), port)
            || name.is_some_and(|name| entry.matches(Target::Name(name), port))
    });
    if let Some(entry) = exempt {
        return allowed(private_rule(entry));
    }
    let reason = match name {
        Some(name) => format!("{name} resolved to {addr}, which is private ({range})"),
        None => format!("address {addr} is private ({range})"),
    };
    Decision {
        allowed: false,
        enforced_allowed: false,
        rule: format!("ssrf:{}", range.name),
        reason: Some(reason),
    }
}

fn allowlist_verdict(policy: &NetworkPolicy, target: Target<'_>, port: u16) -> Decision {
    if let Some(entry) = policy.allow.iter().find(|e| e.matches(target, port)) {
        return allowed(entry.raw().to_owned());
    }
    if let Some(entry) = policy
        .allow_private
        .iter()
        .find(|e| e.matches(target, port))
    {
        return allowed(private_rule(entry));
    }
    let host_known = policy
        .allow
        .iter()
        .chain(&policy.allow_private)
        .any(|e| e.matches_host(target));
    let shown = match target {
        Target::Name(name) => name.to_string(),
        Target::Addr(addr) => addr.to_string(),
    };
    let reason = if host_known {
        format!("port {port} is not allowed for {shown}")
    } else {
        match target {
            Target::Name(_) => format!("host {shown} is not in the allowlist"),
            Target::Addr(_) => format!("address {shown} is not in the allowlist"),
        }
    };
    Decision {
        allowed: policy.mode == Enforcement::Report,
        enforced_allowed: false,
        rule: DEFAULT_DENY.to_owned(),
        reason: Some(reason),
    }
}

/// The rule id of a request refused because rules exist for its host and none allows it.
pub const NO_HTTP_RULE: &str = "http-rules:default-deny";

/// The `[[network.rules]]` that apply to `host`: what [`decide_request`] matches against. A host
/// with any is one whose requests the gateway must be able to read.
pub fn rules_for<'a>(
    policy: &'a NetworkPolicy,
    host: &'a HostName,
) -> impl Iterator<Item = &'a crate::HttpRule> + 'a {
    policy.rules.iter().filter(move |r| r.host == *host)
}

/// Decides one HTTP request the gateway can read (plain HTTP, or TLS it intercepted) against
/// `[[network.rules]]`, after the connection's destination was allowed by [`decide`]. `target`
/// is the request target as sent (origin form); it is normalised
/// ([`crate::http_rules::normalize_path`]) before matching, and a target that cannot be
/// normalised is refused whenever rules exist for the host. A host with no rules: `None` (the
/// destination's own decision stands).
pub fn decide_request(
    policy: &NetworkPolicy,
    host: &HostName,
    method: &str,
    target: &str,
) -> Option<Decision> {
    let mut rules = rules_for(policy, host).peekable();
    rules.peek()?;
    let refuse = |reason: String| Decision {
        allowed: policy.mode == Enforcement::Report,
        enforced_allowed: false,
        rule: NO_HTTP_RULE.to_owned(),
        reason: Some(reason),
    };
    let path = match crate::http_rules::normalize_path(target) {
        Ok(p) => p,
        Err(e) => {
            let mut d = refuse(format!("request path refused for {host}: {e}"));
            // An unreadable path is never let through, even in report mode: there is nothing
            // sound to compare with the rules.
            d.allowed = false;
            return Some(d);
        }
    };
    if let Some(rule) = rules.find(|r| r.allows(method, &path)) {
        return Some(allowed(rule.id()));
    }
    let shown: String = path.chars().take(100).collect();
    Some(refuse(format!(
        "no rule for {host} allows {method} {shown:?}"
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], allow_private: &[&str], mode: Enforcement) -> NetworkPolicy {
        NetworkPolicy {
            mode,
            allow: allow
                .iter()
                .map(|a| AllowEntry::parse(a).unwrap())
                .collect(),
            allow_private: allow_private
                .iter()
                .map(|a| AllowEntry::parse(a).unwrap())
                .collect(),
            ..NetworkPolicy::default()
        }
    }

    fn name(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    fn deny(allowed: bool, rule: &str, reason: &str) -> Decision {
        Decision {
            allowed,
            enforced_allowed: false,
            rule: rule.into(),
            reason: Some(reason.into()),
        }
    }

    fn allow(rule: &str) -> Decision {
        Decision {
            allowed: true,
            enforced_allowed: true,
            rule: rule.into(),
            reason: None,
        }
    }

    fn with_rules() -> NetworkPolicy {
        let mut p = policy(&["api.github.com", "other.com"], &[], Enforcement::Enforce);
        p.rules = vec![crate::HttpRule {
            host: name("api.github.com"),
            methods: vec!["GET".into()],
            paths: vec!["/repos/*".into(), "/zen".into()],
        }];
        p
    }

    #[test]
    fn http_rules_allow_only_their_methods_and_paths() {
        let p = with_rules();
        let gh = name("api.github.com");
        assert_eq!(
            decide_request(&p, &gh, "GET", "/zen"),
            Some(allow("rules:api.github.com GET /repos/*,/zen"))
        );
        assert!(
            decide_request(&p, &gh, "GET", "/repos/a/b?x=1")
                .unwrap()
                .allowed
        );
        for (method, target) in [("POST", "/zen"), ("GET", "/user"), ("GET", "/zen/x")] {
            let d = decide_request(&p, &gh, method, target).unwrap();
            assert!(!d.allowed, "{method} {target}");
            assert_eq!(d.rule, NO_HTTP_RULE);
        }
        assert_eq!(decide_request(&p, &name("other.com"), "DELETE", "/x"), None);
    }

    #[test]
    fn http_rules_hold_against_encoded_and_dot_segment_paths() {
        let p = with_rules();
        let gh = name("api.github.com");
        for target in [
            "/repos/../user",
            "/repos/%2e%2e/user",
            "/repos%2F..%2Fuser",
            "/repos/..%5Cuser",
            "//repos/../../user",
            "/repos/%252e%252e/user",
            "/repos/a%00",
            "/repos/%zz",
        ] {
            let d = decide_request(&p, &gh, "GET", target).unwrap();
            assert!(!d.allowed, "{target} must be refused: {d:?}");
        }
        assert!(decide_request(&p, &gh, "GET", "/%7Aen").unwrap().allowed);
        assert!(decide_request(&p, &gh, "GET", "//zen").unwrap().allowed);
        assert!(
            decide_request(&p, &gh, "GET", "/repos/./a")
                .unwrap()
                .allowed
        );
    }

    #[test]
    fn http_rules_in_report_mode_record_but_never_pass_an_unreadable_path() {
        let mut p = with_rules();
        p.mode = Enforcement::Report;
        let gh = name("api.github.com");
        let d = decide_request(&p, &gh, "POST", "/zen").unwrap();
        assert!(d.allowed && !d.enforced_allowed);
        assert!(!decide_request(&p, &gh, "GET", "/%zz").unwrap().allowed);
    }

    #[test]
    fn an_allowlisted_name_and_port_is_allowed_by_its_entry() {
        let p = policy(
            &["api.github.com", "*.githubusercontent.com:*"],
            &[],
            Enforcement::Enforce,
        );
        assert_eq!(
            decide(&p, Target::Name(&name("api.github.com")), 443),
            allow("api.github.com")
        );
        assert_eq!(
            decide(&p, Target::Name(&name("raw.githubusercontent.com")), 8080),
            allow("*.githubusercontent.com:*")
        );
    }

    #[test]
    fn an_unlisted_host_is_denied_by_default() {
        let p = policy(&["api.github.com"], &[], Enforcement::Enforce);
        assert_eq!(
            decide(&p, Target::Name(&name("example.com")), 443),
            deny(
                false,
                "default-deny",
                "host example.com is not in the allowlist"
            )
        );
        assert_eq!(
            decide(&p, Target::Addr("93.184.216.34".parse().unwrap()), 443),
            deny(
                false,
                "default-deny",
                "address 93.184.216.34 is not in the allowlist"
            )
        );
    }

    #[test]
    fn a_listed_host_on_another_port_names_the_port() {
        let p = policy(&["api.github.com"], &[], Enforcement::Enforce);
        assert_eq!(
            decide(&p, Target::Name(&name("api.github.com")), 22),
            deny(
                false,
                "default-deny",
                "port 22 is not allowed for api.github.com"
            )
        );
    }

    #[test]
    fn report_mode_lets_default_deny_through_but_records_it() {
        let p = policy(&[], &[], Enforcement::Report);
        assert_eq!(
            decide(&p, Target::Name(&name("example.com")), 443),
            deny(
                true,
                "default-deny",
                "host example.com is not in the allowlist"
            )
        );
    }

    #[test]
    fn private_address_literals_are_blocked_even_in_report_mode() {
        for mode in [Enforcement::Enforce, Enforcement::Report] {
            let p = policy(&["0.0.0.0/0:*"], &[], mode);
            assert_eq!(
                decide(&p, Target::Addr("10.0.0.5".parse().unwrap()), 8080),
                deny(
                    false,
                    "ssrf:private",
                    "address 10.0.0.5 is private (private 10.0.0.0/8)"
                )
            );
            assert_eq!(
                decide(&p, Target::Addr("169.254.169.254".parse().unwrap()), 80),
                deny(
                    false,
                    "ssrf:metadata",
                    "address 169.254.169.254 is private (metadata 169.254.169.254/32)"
                )
            );
        }
    }

    #[test]
    fn allow_private_entries_open_exactly_their_address_and_port() {
        let p = policy(
            &[],
            &["10.0.0.5:8080", "192.168.0.0/16:*"],
            Enforcement::Enforce,
        );
        assert_eq!(
            decide(&p, Target::Addr("10.0.0.5".parse().unwrap()), 8080),
            allow("allow_private:10.0.0.5:8080")
        );
        assert_eq!(
            decide(&p, Target::Addr("10.0.0.5".parse().unwrap()), 22).rule,
            "ssrf:private"
        );
        assert_eq!(
            decide(&p, Target::Addr("10.0.0.6".parse().unwrap()), 8080).rule,
            "ssrf:private"
        );
        assert_eq!(
            decide_resolved(&p, None, "192.168.7.7".parse().unwrap(), 5432),
            allow("allow_private:192.168.0.0/16:*")
        );
    }

    #[test]
    fn a_name_that_resolves_to_a_private_address_is_blocked() {
        let p = policy(&["internal.example.com"], &[], Enforcement::Report);
        let n = name("internal.example.com");
        assert_eq!(
            decide(&p, Target::Name(&n), 443),
            allow("internal.example.com")
        );
        assert_eq!(
            decide_resolved(&p, Some(&n), "127.0.0.1".parse().unwrap(), 443),
            deny(
                false,
                "ssrf:loopback",
                "internal.example.com resolved to 127.0.0.1, which is private (loopback 127.0.0.0/8)"
            )
        );
    }

    #[test]
    fn allow_private_can_name_the_host_whose_address_is_private() {
        let p = policy(&[], &["db.corp.example:5432"], Enforcement::Enforce);
        let n = name("db.corp.example");
        assert_eq!(
            decide(&p, Target::Name(&n), 5432),
            allow("allow_private:db.corp.example:5432")
        );
        assert_eq!(
            decide_resolved(&p, Some(&n), "10.1.2.3".parse().unwrap(), 5432),
            allow("allow_private:db.corp.example:5432")
        );
        assert_eq!(
            decide_resolved(&p, Some(&n), "10.1.2.3".parse().unwrap(), 22).rule,
            "ssrf:private"
        );
    }

    #[test]
    fn a_public_resolved_address_is_held_to_the_name_rules() {
        let p = policy(&["api.github.com"], &[], Enforcement::Enforce);
        let n = name("api.github.com");
        let public: IpAddr = "140.82.112.3".parse().unwrap();
        assert_eq!(
            decide_resolved(&p, Some(&n), public, 443),
            allow("api.github.com")
        );
        assert_eq!(
            decide_resolved(&p, Some(&n), public, 80).reason.as_deref(),
            Some("port 80 is not allowed for api.github.com")
        );
        assert_eq!(
            decide_resolved(&p, None, public, 443).reason.as_deref(),
            Some("address 140.82.112.3 is not in the allowlist")
        );
    }

    #[test]
    fn mapped_and_embedded_ipv4_forms_of_metadata_are_blocked() {
        let p = policy(&["0.0.0.0/0:*", "[::/0]:*"], &[], Enforcement::Enforce);
        for addr in [
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "fd00:ec2::254",
        ] {
            let d = decide(&p, Target::Addr(addr.parse().unwrap()), 80);
            assert!(!d.allowed && !d.enforced_allowed, "{addr}: {d:?}");
            assert!(d.rule.starts_with("ssrf:"), "{addr}: {d:?}");
        }
    }

    #[test]
    fn a_synthetic_address_given_as_an_address_is_blocked() {
        let p = policy(&["api.github.com"], &[], Enforcement::Report);
        assert_eq!(
            decide(&p, Target::Addr("198.18.0.7".parse().unwrap()), 443).rule,
            "ssrf:benchmark"
        );
    }
}
