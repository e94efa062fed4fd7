//! Detection: per-session anomaly rules over the gateway's own events.
//!
//! Guarantees:
//! - Every rule sees what the audit sees: [`Detector::observe`] is called by `Ctx::emit` with
//!   each event of the session just before it goes to the sink, so a firing is never about
//!   traffic that is not recorded; the sink then gets the event with every honey token replaced
//!   by its name ([`Detector::redact_event`]). Honey tokens are also looked for in each
//!   plain-HTTP request head and the body bytes already read with it, before anything goes
//!   upstream ([`Detector::scan`]).
//! - Each rule fires at most once per session; after that it stops counting (so a flood after
//!   the firing costs nothing). A firing names the rule, the signal, the numbers and the
//!   threshold ([`Detection`]).
//! - State is bounded: every window keeps at most `window::MAX_ENTRIES` entries.
//! - Cheap: one uncontended mutex and a few hash/deque operations per event; nothing here
//!   allocates per event unless a new host or name is seen.
//!
//! What happens on a firing (log, block, terminate, alert) is decided by the rule's policy and
//! carried out by `Ctx::detected`.

pub mod canary;
mod window;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use cordon_policy::{DetectPolicy, Response};
use serde::Serialize;

use crate::event::{EventKind, NetEvent, SessionInfo, Verdict, Via};
use canary::{Canaries, Canary, CanarySource};
use window::{Distinct, Window};

/// The rules, as named in the policy (`[detect.<rule>]`) and in alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    Blocked,
    DnsTunnel,
    Exfil,
    Canary,
    Sandbox,
    /// A `[network.rate]` budget with `on_exceed = "terminate"`.
    Budget,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Blocked => "blocked",
            Rule::DnsTunnel => "dns_tunnel",
            Rule::Exfil => "exfil",
            Rule::Canary => "canary",
            Rule::Sandbox => "sandbox",
            Rule::Budget => "budget",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Medium,
    High,
    /// A honey token left: no benign explanation.
    Critical,
}

/// One value of a firing's evidence.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Evidence {
    Count(u64),
    Ratio(f64),
    Text(String),
}

impl From<u64> for Evidence {
    fn from(n: u64) -> Self {
        Evidence::Count(n)
    }
}
impl From<f64> for Evidence {
    fn from(r: f64) -> Self {
        Evidence::Ratio(r)
    }
}
impl From<String> for Evidence {
    fn from(s: String) -> Self {
        Evidence::Text(s)
    }
}
impl From<&str> for Evidence {
    fn from(s: &str) -> Self {
        Evidence::Text(s.to_owned())
    }
}

/// A rule firing: what the audit's `alert` event, the webhook and the result carry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    pub rule: Rule,
    /// Which signal of the rule crossed its threshold (`distinct_names`, `threshold`, …).
    pub signal: String,
    pub severity: Severity,
    /// What the session does about it.
    pub response: Response,
    /// Whether the rule's policy asks for an alert (webhook) besides the audit and stderr.
    pub alert: bool,
    /// One line for people: `dns tunnel suspected (41 distinct names under evil.test in 10s)`.
    pub summary: String,
    /// The numbers behind it, with the threshold.
    pub evidence: BTreeMap<String, Evidence>,
    #[serde(skip)]
    pub session: SessionInfo,
    #[serde(skip)]
    pub ts: SystemTime,
}

impl Detection {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rule: Rule,
        signal: &str,
        severity: Severity,
        response: Response,
        alert: bool,
        session: &SessionInfo,
        summary: String,
        evidence: impl IntoIterator<Item = (&'static str, Evidence)>,
    ) -> Detection {
        Detection {
            rule,
            signal: signal.to_owned(),
            severity,
            response,
            alert,
            summary,
            evidence: evidence
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            session: session.clone(),
            ts: SystemTime::now(),
        }
    }
}

/// Leftmost labels shorter than this are not judged for entropy.
pub const MIN_ENTROPY_LABEL: usize = 24;

/// The registrable domain of a name, without a public-suffix list: the last two labels, or the
/// last three when the second-level label is a common registry level under a two-letter country
/// code (`example.co.uk`).
pub fn registrable_domain(name: &str) -> &str {
    let name = name.trim_end_matches('.');
    let dots: Vec<usize> = name.rmatch_indices('.').map(|(i, _)| i).collect();
    let take = |n: usize| -> &str {
        match dots.get(n - 1) {
            Some(&i) => &name[i + 1..],
            None => name,
        }
    };
    let two = take(2);
    let tld = take(1);
    if tld.len() == 2 {
        let second = two.split('.').next().unwrap_or("");
        if matches!(
            second,
            "co" | "com" | "net" | "org" | "gov" | "ac" | "edu" | "ne" | "or"
        ) {
            return take(3);
        }
    }
    two
}

/// Shannon entropy of `s` in bits per character.
pub fn entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in s.bytes() {
        counts[usize::from(b.to_ascii_lowercase())] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

fn secs(d: Duration) -> String {
    cordon_policy::format_duration(d)
}

#[derive(Debug, Default)]
struct State {
    blocked: Window,
    dns_queries: Window,
    dns_names_seen: Distinct,
    dns_names_failed: Distinct,
    dns_long: Window,
    dns_entropy: Distinct,
    dns_other: Window,
    dns_names: HashMap<String, Distinct>,
    bytes_out: Window,
    small: HashMap<String, Window>,
    hosts: Distinct,
}

/// The detection state of one session.
#[derive(Debug)]
pub(crate) struct Detector {
    policy: DetectPolicy,
    canaries: Canaries,
    /// Where each token was placed, by token index.
    canary_sources: Vec<CanarySource>,
    fired: AtomicU8,
    state: Mutex<State>,
}

impl Detector {
    /// `canaries`: the honey tokens placed in the sandbox.
    pub fn new(policy: DetectPolicy, canaries: &[Canary]) -> Detector {
        let tokens: Vec<String> = canaries.iter().map(|c| c.token.clone()).collect();
        Detector {
            policy,
            canaries: Canaries::new(&tokens),
            canary_sources: canaries.iter().map(|c| c.source.clone()).collect(),
            fired: AtomicU8::new(0),
            state: Mutex::new(State::default()),
        }
    }

    fn has_fired(&self, rule: Rule) -> bool {
        self.fired.load(Ordering::Relaxed) & rule.bit() != 0
    }

    /// True the first time only.
    pub fn claim(&self, rule: Rule) -> bool {
        self.fired.fetch_or(rule.bit(), Ordering::AcqRel) & rule.bit() == 0
    }

    /// Looks for a honey token in outbound bytes (a request head, a body prefix, decrypted
    /// bytes). `where_` says where they were seen, for the evidence.
    pub fn scan(&self, session: &SessionInfo, bytes: &[u8], where_: &str) -> Option<Detection> {
        if self.canaries.is_empty() || self.has_fired(Rule::Canary) {
            return None;
        }
        let hit = self.canaries.scan(bytes)?;
        Some(self.canary_fired(session, hit.token, hit.encoding, where_))
    }

    /// Looks for a honey token in a host name: as is in any letter case, or base64-encoded in
    /// a name kept as the sandbox wrote it.
    fn scan_name(&self, session: &SessionInfo, name: &str, where_: &str) -> Option<Detection> {
        if self.canaries.is_empty() || self.has_fired(Rule::Canary) {
            return None;
        }
        let hit = self
            .canaries
            .scan_name(name)
            .or_else(|| self.canaries.scan(name.as_bytes()))?;
        Some(self.canary_fired(session, hit.token, hit.encoding, where_))
    }

    /// A token found by another scanner (the DLP's streaming body scan), reported under its
    /// pattern name ([`CanarySource::pattern_name`]).
    pub fn canary_seen(
        &self,
        session: &SessionInfo,
        pattern_name: &str,
        where_: &str,
    ) -> Option<Detection> {
        if self.has_fired(Rule::Canary) {
            return None;
        }
        let token = self
            .canary_sources
            .iter()
            .position(|s| s.pattern_name() == pattern_name)?;
        Some(self.canary_fired(session, token, canary::Encoding::Plain, where_))
    }

    fn canary_fired(
        &self,
        session: &SessionInfo,
        token: usize,
        encoding: canary::Encoding,
        where_: &str,
    ) -> Detection {
        let source = self
            .canary_sources
            .get(token)
            .cloned()
            .unwrap_or(CanarySource::Env(String::new()));
        let placed = match &source {
            CanarySource::Env(name) => ("variable", Evidence::from(name.as_str())),
            CanarySource::File(path) => ("file", Evidence::from(path.as_str())),
        };
        let c = &self.policy.canary;
        Detection::new(
            Rule::Canary,
            "token",
            Severity::Critical,
            c.response,
            c.alert,
            session,
            format!(
                "canary credential {} sent out ({where_})",
                source.describe()
            ),
            [
                placed,
                ("seen_in", where_.into()),
                ("encoding", encoding.as_str().into()),
            ],
        )
    }

    /// Feeds one event of the session; returns a firing, if this event made a rule fire.
    pub fn observe(&self, e: &NetEvent) -> Option<Detection> {
        self.observe_at(e, Instant::now()).map(|mut d| {
            for v in d.evidence.values_mut() {
                if let Evidence::Text(t) = v {
                    if let Some(r) = self.redact(t) {
                        *t = r;
                    }
                }
            }
            d
        })
    }

    /// `text` with every honey token in it (as is in any letter case, or base64-encoded)
    /// replaced by `[canary NAME]`, or `None` when it holds none: what the sandbox sent may be
    /// recorded, a token may not.
    pub fn redact(&self, text: &str) -> Option<String> {
        let found = self.canaries.occurrences(text);
        if found.is_empty() {
            return None;
        }
        Some(canary::replace_spans(text, &found, |token| {
            let name = match self.canary_sources.get(token) {
                Some(CanarySource::Env(n) | CanarySource::File(n)) => n.as_str(),
                None => "",
            };
            format!("[canary {name}]")
        }))
    }

    /// Redacts the fields of an event that carry what the sandbox sent (see [`Self::redact`]).
    pub fn redact_event(&self, e: &mut NetEvent) {
        if self.canaries.is_empty() {
            return;
        }
        for field in [&mut e.host, &mut e.path, &mut e.reason] {
            if let Some(r) = field.as_deref().and_then(|t| self.redact(t)) {
                *field = Some(r);
            }
        }
    }

    fn observe_at(&self, e: &NetEvent, now: Instant) -> Option<Detection> {
        let p = &self.policy;
        if let Some(host) = &e.host {
            // A name the sandbox asked for or connected to (a DNS query, a CONNECT authority,
            // a TLS SNI, a Host header), lower-cased by the time it is an event.
            let where_ = if e.via == Via::Dns {
                "dns name"
            } else {
                "destination name"
            };
            if let Some(d) = self.scan_name(&e.session, host, where_) {
                return Some(d);
            }
        }
        if e.via == Via::Dns {
            if !p.dns_tunnel.enabled || self.has_fired(Rule::DnsTunnel) {
                return None;
            }
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            return self.dns(&mut st, e, now);
        }
        // Budget refusals count too, as `terminate_after_blocked` always did; refusals that a
        // detection's own response causes (`detect`, `detect.canary`) do not, or a `block`
        // response would turn into a termination by the blocked-attempts rule.
        let blocked = e.verdict == Verdict::Block && !e.rule.starts_with("detect");
        if blocked && p.blocked.enabled && !self.has_fired(Rule::Blocked) {
            let b = &p.blocked;
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (n, _) = st.blocked.add(now, b.window, 0);
            if n >= u64::from(b.threshold) {
                let what = e.host.as_deref().unwrap_or("-");
                return Some(Detection::new(
                    Rule::Blocked,
                    "threshold",
                    Severity::Medium,
                    b.response,
                    b.alert,
                    &e.session,
                    format!(
                        "{n} blocked network attempts in {} (detect.blocked.threshold = {})",
                        secs(b.window),
                        b.threshold
                    ),
                    [
                        ("count", Evidence::from(n)),
                        ("threshold", u64::from(b.threshold).into()),
                        ("window", secs(b.window).into()),
                        ("last_host", what.into()),
                        ("last_rule", e.rule.as_str().into()),
                    ],
                ));
            }
            return None;
        }
        let carries = matches!(e.kind, EventKind::HttpRequest | EventKind::Connection)
            && e.verdict != Verdict::Block;
        if carries && p.exfil.enabled && !self.has_fired(Rule::Exfil) {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            return self.exfil(&mut st, e, now);
        }
        None
    }

    fn dns(&self, st: &mut State, e: &NetEvent, now: Instant) -> Option<Detection> {
        let t = &self.policy.dns_tunnel;
        let w = t.window;
        let name = e.host.as_deref().unwrap_or("");
        let fire = |signal: &str, summary: String, ev: Vec<(&'static str, Evidence)>| {
            let mut evidence = ev;
            evidence.push(("window", secs(w).into()));
            evidence.push(("last_name", name.into()));
            Some(Detection::new(
                Rule::DnsTunnel,
                signal,
                Severity::High,
                t.response,
                t.alert,
                &e.session,
                format!("dns tunnel suspected ({summary} in {})", secs(w)),
                evidence,
            ))
        };
        let (queries, _) = st.dns_queries.add(now, w, 0);
        let names = st.dns_names_seen.add(name, now, w);
        let failed = if e.verdict == Verdict::Block {
            st.dns_names_failed.add(name, now, w)
        } else {
            st.dns_names_failed.count(now, w)
        };
        let domain = registrable_domain(name);
        let distinct = st
            .dns_names
            .entry(domain.to_owned())
            .or_default()
            .add(name, now, w);
        if distinct >= u64::from(t.distinct_names) {
            return fire(
                "distinct_names",
                format!("{distinct} distinct names under {domain}"),
                vec![
                    ("distinct_names", distinct.into()),
                    ("threshold", u64::from(t.distinct_names).into()),
                    ("domain", domain.into()),
                ],
            );
        }
        if name.len() > t.max_name_length as usize {
            let (n, _) = st.dns_long.add(now, w, 0);
            if n >= u64::from(t.long_names) {
                return fire(
                    "long_names",
                    format!("{n} names longer than {} characters", t.max_name_length),
                    vec![
                        ("long_names", n.into()),
                        ("threshold", u64::from(t.long_names).into()),
                        ("longest_seen", (name.len() as u64).into()),
                    ],
                );
            }
        }
        let label = name.split('.').next().unwrap_or("");
        if label.len() >= MIN_ENTROPY_LABEL {
            let bits = entropy(label);
            if bits >= t.entropy {
                let n = st.dns_entropy.add(label, now, w);
                if n >= u64::from(t.high_entropy_labels) {
                    return fire(
                        "high_entropy_labels",
                        format!("{n} distinct high-entropy labels, last {bits:.2} bits/char"),
                        vec![
                            ("high_entropy_labels", n.into()),
                            ("threshold", u64::from(t.high_entropy_labels).into()),
                            ("entropy", ((bits * 100.0).round() / 100.0).into()),
                        ],
                    );
                }
            }
        }
        let qtype = e.method.as_deref().unwrap_or("");
        if qtype != "A" && qtype != "AAAA" {
            let (n, _) = st.dns_other.add(now, w, 0);
            if n >= u64::from(t.other_types) {
                return fire(
                    "other_types",
                    format!("{n} queries of types other than A/AAAA, last {qtype}"),
                    vec![
                        ("other_types", n.into()),
                        ("threshold", u64::from(t.other_types).into()),
                        ("last_type", qtype.into()),
                    ],
                );
            }
        }
        if queries >= u64::from(t.queries) {
            return fire(
                "queries",
                format!("{queries} queries"),
                vec![
                    ("queries", queries.into()),
                    ("threshold", u64::from(t.queries).into()),
                ],
            );
        }
        if names >= u64::from(t.min_names) {
            let ratio = failed as f64 / names as f64;
            if ratio >= t.nxdomain_ratio {
                return fire(
                    "nxdomain_ratio",
                    format!("{failed} of {names} names answered NXDOMAIN"),
                    vec![
                        ("nxdomain_names", failed.into()),
                        ("names", names.into()),
                        ("ratio", ((ratio * 100.0).round() / 100.0).into()),
                        ("threshold", t.nxdomain_ratio.into()),
                    ],
                );
            }
        }
        None
    }

    fn exfil(&self, st: &mut State, e: &NetEvent, now: Instant) -> Option<Detection> {
        let x = &self.policy.exfil;
        let w = x.window;
        let host = e.host.as_deref().unwrap_or("-");
        let fire = |signal: &str, summary: String, ev: Vec<(&'static str, Evidence)>| {
            let mut evidence = ev;
            evidence.push(("window", secs(w).into()));
            evidence.push(("host", host.into()));
            Some(Detection::new(
                Rule::Exfil,
                signal,
                Severity::Medium,
                x.response,
                x.alert,
                &e.session,
                format!("exfiltration suspected ({summary})"),
                evidence,
            ))
        };
        if e.bytes_up >= x.max_request_body.0 {
            return fire(
                "max_request_body",
                format!("{} bytes sent in one request to {host}", e.bytes_up),
                vec![
                    ("bytes", e.bytes_up.into()),
                    ("threshold", x.max_request_body.0.into()),
                ],
            );
        }
        let (_, sum) = st.bytes_out.add(now, w, e.bytes_up);
        if sum >= x.bytes_out.0 {
            return fire(
                "bytes_out",
                format!("{sum} bytes sent out in {}", secs(w)),
                vec![
                    ("bytes_out", sum.into()),
                    ("threshold", x.bytes_out.0.into()),
                ],
            );
        }
        let hosts = st.hosts.add(host, now, w);
        if hosts >= u64::from(x.distinct_hosts) {
            return fire(
                "distinct_hosts",
                format!("{hosts} distinct hosts in {}", secs(w)),
                vec![
                    ("distinct_hosts", hosts.into()),
                    ("threshold", u64::from(x.distinct_hosts).into()),
                ],
            );
        }
        let method = e.method.as_deref().unwrap_or("");
        let carries_data = !matches!(method, "GET" | "HEAD" | "OPTIONS")
            || e.path.as_deref().is_some_and(|p| p.contains('?'));
        if e.kind == EventKind::HttpRequest && carries_data && e.bytes_up <= x.small_request_size.0
        {
            let small = st.small.entry(host.to_owned()).or_default();
            let (n, bytes) = small.add(now, w, e.bytes_up);
            if n >= u64::from(x.small_requests) {
                return fire(
                    "small_requests",
                    format!(
                        "{n} small data-carrying requests to {host} in {}, {bytes} bytes",
                        secs(w)
                    ),
                    vec![
                        ("small_requests", n.into()),
                        ("bytes", bytes.into()),
                        ("threshold", u64::from(x.small_requests).into()),
                    ],
                );
            }
        }
        None
    }
}

#[cfg(test)]
mod tests;
