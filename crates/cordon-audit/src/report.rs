//! The review report (`cordon audit report`): what each user's policies were used for.
//!
//! Guarantees:
//! - [`Store::report`] reads the events of the window in one streaming pass (one record in
//!   memory at a time, plus the aggregates), and looks up the `session_start` record of a
//!   session that started before the window, so every network event is attributed to its
//!   session's user and policy.
//! - A policy is identified by `detail.policy_sha256` of the session's start record (the SHA-256
//!   of the effective policy as JSON, which `cordon run` records); sessions recorded before it
//!   existed, or without a start record, are grouped under no policy (`None`).
//! - "Used" means an allowed connection or HTTP request whose deciding rule is the allowlist
//!   entry (`rule` equals the entry as written, or `allow_private:` + the entry). A DNS answer
//!   alone does not count: a name resolved and never contacted did not use the entry. The
//!   entries of a group that no allowed connection or request used are listed as candidates to
//!   remove; the list is only as good as the window: an entry used once a quarter looks unused
//!   in a 30-day report.
//! - Blocked destinations are counted per `host:port` (or address), from every event that
//!   counts as blocked ([`crate::Event::is_blocked`]), DNS refusals included.
//! - A session counts as terminated when its end record names a limit (`limit_hit`) or a
//!   termination reason (`detail.terminated`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::event::{detail_keys, Event, EventKind, Verdict};
use crate::query::EventFilter;
use crate::store::{Store, StoreError};
use crate::timestamp::Timestamp;

/// `detail` key of `session_start`: SHA-256 of the effective policy (JSON), hex.
pub const POLICY_SHA256: &str = "policy_sha256";
/// `detail` key of `session_start`: the allowlist entries, as written.
pub const ALLOW: &str = "allow";
/// `detail` key of `session_start`: the `allow_private` entries, as written.
pub const ALLOW_PRIVATE: &str = "allow_private";
/// `detail` key of `session_end`: why the supervisor ended the session early.
pub const TERMINATED: &str = "terminated";

/// What to report on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportOptions {
    /// Events at or after this time.
    pub since: Option<Timestamp>,
    /// Events strictly before this time.
    pub until: Option<Timestamp>,
    /// How many blocked destinations to list (the most attempted).
    pub top_blocked: usize,
}

/// The whole report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    /// Sessions with at least one event in the window.
    pub sessions: u64,
    /// Events in the window.
    pub events: u64,
    /// One entry per (user, policy), sorted by user then policy.
    pub usage: Vec<PolicyUsage>,
    /// The most attempted blocked destinations, most attempts first.
    pub top_blocked: Vec<BlockedDestination>,
    /// How many distinct blocked destinations there were in all.
    pub blocked_destinations: u64,
    /// Sessions that a limit or a detection rule ended, oldest first.
    pub terminated: Vec<TerminatedSession>,
}

/// What one user did under one policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyUsage {
    pub user_id: String,
    /// `detail.policy_sha256` of the sessions' start records.
    pub policy_sha256: Option<String>,
    pub sessions: u64,
    /// Allowed destinations contacted, most used first.
    pub hosts: Vec<HostUsage>,
    /// Allowlist entries (of any of these sessions' policies) that nothing used.
    pub unused_allow: Vec<String>,
}

/// One allowed destination.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostUsage {
    /// `host:port` (or `address:port`).
    pub destination: String,
    /// The allowlist entries that let it through.
    pub rules: Vec<String>,
    /// Tunnels (CONNECT or transparent TCP).
    pub connections: u64,
    /// HTTP requests (explicit proxy or captured plain HTTP).
    pub requests: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub sessions: u64,
}

/// One blocked destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedDestination {
    pub destination: String,
    pub attempts: u64,
    pub sessions: u64,
    pub users: Vec<String>,
    pub last_seen: Timestamp,
    /// The newest attempt's reason (or rule).
    pub last_reason: Option<String>,
}

/// A session a limit or a rule ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminatedSession {
    pub session_id: String,
    pub user_id: String,
    pub ended: Timestamp,
    pub exit_status: Option<i64>,
    /// `detail.terminated`, else the limit's name.
    pub reason: String,
}

/// What the report needs to know about a session, from its start record.
#[derive(Clone, Debug, Default)]
struct SessionMeta {
    user: String,
    policy: Option<String>,
    allow: Vec<String>,
}

fn meta_of(start: &Event) -> SessionMeta {
    let list = |key: &str| -> Vec<String> {
        start
            .detail
            .get(key)
            .and_then(serde_json::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut allow = list(ALLOW);
    allow.extend(list(ALLOW_PRIVATE).into_iter().map(|e| private_rule(&e)));
    SessionMeta {
        user: start.user_id.clone(),
        policy: start
            .detail
            .get(POLICY_SHA256)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned),
        allow,
    }
}

/// The rule text the policy gives an `allow_private` entry.
fn private_rule(entry: &str) -> String {
    format!("allow_private:{entry}")
}

fn destination(e: &Event) -> String {
    let name = e
        .host
        .clone()
        .or_else(|| {
            e.ip.map(|ip| match ip {
                std::net::IpAddr::V6(v6) if e.port.is_some() => format!("[{v6}]"),
                other => other.to_string(),
            })
        })
        .unwrap_or_else(|| "?".to_owned());
    match e.port {
        Some(port) => format!("{name}:{port}"),
        None => name,
    }
}

#[derive(Default)]
struct HostAcc {
    rules: BTreeSet<String>,
    connections: u64,
    requests: u64,
    bytes_up: u64,
    bytes_down: u64,
    sessions: BTreeSet<String>,
}

#[derive(Default)]
struct GroupAcc {
    sessions: BTreeSet<String>,
    allow: BTreeSet<String>,
    used: BTreeSet<String>,
    hosts: HashMap<String, HostAcc>,
}

struct BlockedAcc {
    attempts: u64,
    sessions: BTreeSet<String>,
    users: BTreeSet<String>,
    last_seen: Timestamp,
    last_reason: Option<String>,
}

/// Folds events into a report. Pure: the store only feeds it.
#[derive(Default)]
struct Builder {
    metas: HashMap<String, SessionMeta>,
    groups: BTreeMap<(String, Option<String>), GroupAcc>,
    blocked: HashMap<String, BlockedAcc>,
    terminated: Vec<TerminatedSession>,
    sessions: BTreeSet<String>,
    events: u64,
}

impl Builder {
    fn needs_meta(&self, session: &str) -> bool {
        !self.metas.contains_key(session)
    }

    fn add(&mut self, e: &Event) {
        self.events += 1;
        self.sessions.insert(e.session_id.clone());
        if e.kind == EventKind::SessionStart {
            self.metas.insert(e.session_id.clone(), meta_of(e));
        }
        let meta = self
            .metas
            .entry(e.session_id.clone())
            .or_insert_with(|| SessionMeta {
                user: e.user_id.clone(),
                ..SessionMeta::default()
            })
            .clone();
        let group = self
            .groups
            .entry((meta.user.clone(), meta.policy.clone()))
            .or_default();
        group.sessions.insert(e.session_id.clone());
        group.allow.extend(meta.allow.iter().cloned());

        let network = matches!(e.kind, EventKind::Connection | EventKind::HttpRequest);
        if network && e.verdict == Some(Verdict::Allow) {
            let host = group.hosts.entry(destination(e)).or_default();
            if let Some(rule) = &e.rule {
                host.rules.insert(rule.clone());
                group.used.insert(rule.clone());
            }
            match e.kind {
                EventKind::Connection => host.connections += 1,
                _ => host.requests += 1,
            }
            host.bytes_up = host.bytes_up.saturating_add(e.bytes_up.unwrap_or(0));
            host.bytes_down = host.bytes_down.saturating_add(e.bytes_down.unwrap_or(0));
            host.sessions.insert(e.session_id.clone());
        }
        if e.is_blocked() {
            let b = self
                .blocked
                .entry(destination(e))
                .or_insert_with(|| BlockedAcc {
                    attempts: 0,
                    sessions: BTreeSet::new(),
                    users: BTreeSet::new(),
                    last_seen: e.ts,
                    last_reason: None,
                });
            b.attempts += 1;
            b.sessions.insert(e.session_id.clone());
            b.users.insert(e.user_id.clone());
            if e.ts >= b.last_seen {
                b.last_seen = e.ts;
                b.last_reason = e.reason.clone().or_else(|| e.rule.clone());
            }
        }
        if e.kind == EventKind::SessionEnd {
            let terminated = e.detail.get(TERMINATED).and_then(serde_json::Value::as_str);
            let limit = e
                .detail
                .get(detail_keys::LIMIT_HIT)
                .and_then(serde_json::Value::as_str);
            if let Some(reason) = terminated.or(limit) {
                self.terminated.push(TerminatedSession {
                    session_id: e.session_id.clone(),
                    user_id: e.user_id.clone(),
                    ended: e.ts,
                    exit_status: e
                        .detail
                        .get(detail_keys::EXIT_STATUS)
                        .and_then(serde_json::Value::as_i64),
                    reason: reason.to_owned(),
                });
            }
        }
    }

    fn finish(self, options: &ReportOptions) -> Report {
        let usage = self
            .groups
            .into_iter()
            .map(|((user_id, policy_sha256), g)| {
                let mut hosts: Vec<HostUsage> = g
                    .hosts
                    .into_iter()
                    .map(|(destination, h)| HostUsage {
                        destination,
                        rules: h.rules.into_iter().collect(),
                        connections: h.connections,
                        requests: h.requests,
                        bytes_up: h.bytes_up,
                        bytes_down: h.bytes_down,
                        sessions: h.sessions.len() as u64,
                    })
                    .collect();
                hosts.sort_by(|a, b| {
                    (b.connections + b.requests)
                        .cmp(&(a.connections + a.requests))
                        .then_with(|| a.destination.cmp(&b.destination))
                });
                PolicyUsage {
                    user_id,
                    policy_sha256,
                    sessions: g.sessions.len() as u64,
                    hosts,
                    unused_allow: g.allow.difference(&g.used).cloned().collect(),
                }
            })
            .collect();
        let blocked_destinations = self.blocked.len() as u64;
        let mut top_blocked: Vec<BlockedDestination> = self
            .blocked
            .into_iter()
            .map(|(destination, b)| BlockedDestination {
                destination,
                attempts: b.attempts,
                sessions: b.sessions.len() as u64,
                users: b.users.into_iter().collect(),
                last_seen: b.last_seen,
                last_reason: b.last_reason,
            })
            .collect();
        top_blocked.sort_by(|a, b| {
            b.attempts
                .cmp(&a.attempts)
                .then_with(|| a.destination.cmp(&b.destination))
        });
        top_blocked.truncate(options.top_blocked);
        Report {
            since: options.since,
            until: options.until,
            sessions: self.sessions.len() as u64,
            events: self.events,
            usage,
            top_blocked,
            blocked_destinations,
            terminated: self.terminated,
        }
    }
}

impl Store {
    /// The review report over the events in the window of `options` (see the module
    /// guarantees).
    pub fn report(&self, options: &ReportOptions) -> Result<Report, StoreError> {
        let filter = EventFilter {
            since: options.since,
            until: options.until,
            ..EventFilter::default()
        };
        let mut builder = Builder::default();
        self.for_each_event(&filter, |record| {
            let e = &record.event;
            if e.kind != EventKind::SessionStart && builder.needs_meta(&e.session_id) {
                if let Some(start) = self.session_start(&e.session_id)? {
                    builder.metas.insert(e.session_id.clone(), meta_of(&start));
                }
            }
            builder.add(e);
            Ok(())
        })?;
        Ok(builder.finish(options))
    }

    /// The `session_start` record of session `id`, wherever it is in the store.
    fn session_start(&self, id: &str) -> Result<Option<Event>, StoreError> {
        let filter = EventFilter {
            session: Some(id.to_owned()),
            kind: Some(EventKind::SessionStart),
            ..EventFilter::default()
        };
        let mut found = None;
        self.for_each_event(&filter, |r| {
            if found.is_none() && r.event.session_id == id {
                found = Some(r.event);
            }
            Ok(())
        })?;
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Attribution;

    fn start(who: &Attribution, policy: &str, allow: &[&str]) -> Event {
        let mut extra = serde_json::Map::new();
        extra.insert(POLICY_SHA256.into(), serde_json::json!(policy));
        extra.insert(ALLOW.into(), serde_json::json!(allow));
        extra.insert(ALLOW_PRIVATE.into(), serde_json::json!(["10.0.0.5:8080"]));
        who.session_start(&["python3".into()], extra)
    }

    fn who(s: &str, u: &str) -> Attribution {
        Attribution {
            session_id: s.into(),
            user_id: u.into(),
            code_sha256: "c".into(),
        }
    }

    fn net(who: &Attribution, kind: EventKind, host: &str, verdict: Verdict, rule: &str) -> Event {
        let mut e = who.event(kind);
        e.host = Some(host.into());
        e.port = Some(443);
        e.verdict = Some(verdict);
        e.rule = Some(rule.into());
        e.bytes_up = Some(10);
        e.bytes_down = Some(100);
        e
    }

    #[test]
    fn usage_unused_entries_blocked_and_terminated_are_folded_per_user_and_policy() {
        let a = who("s1", "alice");
        let b = who("s2", "alice");
        let c = who("s3", "bob");
        let allow = ["api.github.com:443", "pypi.org:443", "*.npmjs.org:443"];
        let mut end = c.session_end(Some(137), None, serde_json::Map::new());
        end.detail["terminated"] = serde_json::json!("dns tunnel suspected");
        let events = vec![
            start(&a, "p1", &allow),
            net(
                &a,
                EventKind::Connection,
                "api.github.com",
                Verdict::Allow,
                "api.github.com:443",
            ),
            net(
                &a,
                EventKind::DnsQuery,
                "pypi.org",
                Verdict::Allow,
                "pypi.org:443",
            ),
            start(&b, "p1", &allow),
            net(
                &b,
                EventKind::HttpRequest,
                "api.github.com",
                Verdict::Allow,
                "api.github.com:443",
            ),
            net(
                &b,
                EventKind::Blocked,
                "evil.test",
                Verdict::Block,
                "default",
            ),
            start(&c, "p2", &["example.com:443"]),
            net(
                &c,
                EventKind::Blocked,
                "evil.test",
                Verdict::Block,
                "default",
            ),
            net(&c, EventKind::DnsQuery, "x.evil.test", Verdict::Block, "nx"),
            end,
        ];
        let mut builder = Builder::default();
        for e in &events {
            builder.add(e);
        }
        let r = builder.finish(&ReportOptions {
            top_blocked: 10,
            ..ReportOptions::default()
        });
        assert_eq!(r.sessions, 3);
        assert_eq!(r.events, 10);
        assert_eq!(r.usage.len(), 2);
        let alice = &r.usage[0];
        assert_eq!(
            (alice.user_id.as_str(), alice.policy_sha256.as_deref()),
            ("alice", Some("p1"))
        );
        assert_eq!(alice.sessions, 2);
        assert_eq!(
            alice.hosts,
            vec![HostUsage {
                destination: "api.github.com:443".into(),
                rules: vec!["api.github.com:443".into()],
                connections: 1,
                requests: 1,
                bytes_up: 20,
                bytes_down: 200,
                sessions: 2,
            }]
        );
        // A DNS answer alone does not use pypi.org:443.
        assert_eq!(
            alice.unused_allow,
            vec![
                "*.npmjs.org:443".to_owned(),
                "allow_private:10.0.0.5:8080".into(),
                "pypi.org:443".into()
            ]
        );
        let bob = &r.usage[1];
        assert!(bob.hosts.is_empty());
        assert_eq!(bob.unused_allow.len(), 2);
        assert_eq!(r.blocked_destinations, 2);
        assert_eq!(r.top_blocked[0].destination, "evil.test:443");
        assert_eq!(r.top_blocked[0].attempts, 2);
        assert_eq!(r.top_blocked[0].sessions, 2);
        assert_eq!(r.top_blocked[0].users, vec!["alice", "bob"]);
        assert_eq!(r.terminated.len(), 1);
        assert_eq!(r.terminated[0].reason, "dns tunnel suspected");
        assert_eq!(r.terminated[0].exit_status, Some(137));
    }

    #[test]
    fn the_blocked_list_is_cut_to_the_top_n() {
        let a = who("s1", "alice");
        let mut builder = Builder::default();
        for (i, n) in [3, 1, 2].into_iter().enumerate() {
            for _ in 0..n {
                builder.add(&net(
                    &a,
                    EventKind::Blocked,
                    &format!("h{i}.test"),
                    Verdict::Block,
                    "default",
                ));
            }
        }
        let r = builder.finish(&ReportOptions {
            top_blocked: 2,
            ..ReportOptions::default()
        });
        let top: Vec<(&str, u64)> = r
            .top_blocked
            .iter()
            .map(|b| (b.destination.as_str(), b.attempts))
            .collect();
        assert_eq!(top, vec![("h0.test:443", 3), ("h2.test:443", 2)]);
        assert_eq!(r.blocked_destinations, 3);
        // A session without a start record is grouped under no policy.
        assert_eq!(r.usage[0].policy_sha256, None);
    }
}
