//! Reading whole policy files: every field, defaults, the network-mode rule and the round trip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use cordon_policy::{AlertsPolicy, BlockedRule, CanaryRule, DetectPolicy, Response};
use cordon_policy::{
    AllowEntry, AuditPolicy, ByteSize, Credential, Enforcement, ExtraMount, HostName, HttpRule,
    Injection, InterceptHost, Layer, Limits, MinSeverity, NetworkMode, NetworkPolicy, OnExceed,
    Policy, RateLimits, SandboxPolicy, SecretSource, SyslogTarget, SyslogTransport,
};

const FULL: &str = r#"
[sandbox]
workspace = "./work"
timeout = "1h30m"
network = "gateway"
hostname = "box-1"
tty = true
host_uid = 1234567
host_gid = 7654321
allow_missing = ["landlock", "workspace_cap"]
env = { LANG = "C.UTF-8", PATH = "/usr/bin:/bin" }

[[sandbox.mounts]]
host = "/opt/data"
path = "/data"

[[sandbox.mounts]]
host = "/srv/out"
path = "/data/out"
writable = true

[limits]
memory = "1G"
pids = 128
cpu = 2
nofile = 1024
tmp = "128MiB"
workspace = "10GB"
file_size = 1048576

[network]
mode = "report"
allow = ["api.github.com", "api.github.com:8443", "*.githubusercontent.com:443", "example.org:*", "93.184.216.34:8080", "[2606:4700:4700::1111]:53"]
allow_private = ["10.0.0.5:8080", "198.51.100.0/24:443", "203.0.113.7:8080"]
intercept = ["example.org", "*.githubusercontent.com"]

[[network.rules]]
host = "api.github.com"
methods = ["GET"]
paths = ["/repos/*", "/zen"]

[[network.rules]]
host = "example.org"
methods = ["POST", "PUT"]

[network.rate]
requests_per_minute = 60
requests_per_minute_per_host = 30
max_connections = 8
max_bytes_out = "10M"
max_bytes_in = "2G"
on_exceed = "terminate"

[response]
terminate_after_blocked = 0

[audit]
syslog = "udp://127.0.0.1:5514"
syslog_min_severity = "high"

[detect.canary]
env = ["AWS_SECRET_ACCESS_KEY"]
files = [".env", ".aws/credentials", "deploy/.netrc", ".ssh/id_ed25519"]

[[credentials]]
name = "github"
hosts = ["api.github.com"]
header = "Authorization"
format = "Bearer {secret}"
from_env = "GITHUB_TOKEN"

[[credentials]]
name = "store"
hosts = ["example.org"]
query = "key"
from_command = ["/usr/bin/pass", "show", "store"]
env = "STORE_KEY"
require = true

[[credentials]]
name = "basic"
hosts = ["example.org"]
basic_auth = true
from_file = "/run/secrets/basic"
env = "BASIC_PASSWORD"

[[credentials]]
name = "anywhere"
hosts = ["api.github.com"]
any_header = true
from_env = "ANY"
"#;

fn entries(raw: &[&str]) -> Vec<AllowEntry> {
    raw.iter().map(|r| AllowEntry::parse(r).unwrap()).collect()
}

fn full_policy() -> Policy {
    Policy {
        sandbox: SandboxPolicy {
            workspace: Some(PathBuf::from("./work")),
            timeout: Duration::from_secs(5400),
            network: Some(NetworkMode::Gateway),
            hostname: "box-1".into(),
            tty: true,
            host_uid: 1_234_567,
            host_gid: 7_654_321,
            allow_missing: BTreeSet::from([Layer::Landlock, Layer::WorkspaceCap]),
            env: BTreeMap::from([
                ("LANG".to_owned(), "C.UTF-8".to_owned()),
                ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
            ]),
            mounts: vec![
                ExtraMount {
                    host: PathBuf::from("/opt/data"),
                    path: PathBuf::from("/data"),
                    writable: false,
                },
                ExtraMount {
                    host: PathBuf::from("/srv/out"),
                    path: PathBuf::from("/data/out"),
                    writable: true,
                },
            ],
        },
        limits: Limits {
            memory: ByteSize(1 << 30),
            pids: 128,
            cpu: 2.0,
            nofile: 1024,
            tmp: ByteSize(128 << 20),
            workspace: ByteSize(10_000_000_000),
            file_size: ByteSize(1 << 20),
        },
        network: NetworkPolicy {
            mode: Enforcement::Report,
            allow: entries(&[
                "api.github.com",
                "api.github.com:8443",
                "*.githubusercontent.com:443",
                "example.org:*",
                "93.184.216.34:8080",
                "[2606:4700:4700::1111]:53",
            ]),
            allow_private: entries(&["10.0.0.5:8080", "198.51.100.0/24:443", "203.0.113.7:8080"]),
            rate: RateLimits {
                requests_per_minute: 60,
                requests_per_minute_per_host: 30,
                max_connections: 8,
                max_bytes_out: ByteSize(10 << 20),
                max_bytes_in: ByteSize(2 << 30),
                on_exceed: OnExceed::Terminate,
            },
            intercept: vec![
                InterceptHost::parse("example.org").unwrap(),
                InterceptHost::parse("*.githubusercontent.com").unwrap(),
            ],
            rules: vec![
                HttpRule {
                    host: HostName::parse("api.github.com").unwrap(),
                    methods: vec!["GET".into()],
                    paths: vec!["/repos/*".into(), "/zen".into()],
                },
                HttpRule {
                    host: HostName::parse("example.org").unwrap(),
                    methods: vec!["POST".into(), "PUT".into()],
                    paths: vec!["/*".into()],
                },
            ],
        },
        // The old `[response] terminate_after_blocked = 0`: the blocked-attempts rule is off.
        detect: DetectPolicy {
            blocked: BlockedRule {
                enabled: false,
                window: Duration::from_secs(24 * 3600),
                ..BlockedRule::default()
            },
            canary: CanaryRule {
                env: vec!["AWS_SECRET_ACCESS_KEY".into()],
                files: vec![
                    ".env".into(),
                    ".aws/credentials".into(),
                    "deploy/.netrc".into(),
                    ".ssh/id_ed25519".into(),
                ],
                ..CanaryRule::default()
            },
            ..DetectPolicy::default()
        },
        alerts: AlertsPolicy::default(),
        audit: AuditPolicy {
            syslog: Some(SyslogTarget {
                transport: SyslogTransport::Udp,
                addr: "127.0.0.1:5514".parse().unwrap(),
            }),
            syslog_min_severity: MinSeverity::High,
        },
        credentials: vec![
            Credential {
                name: "github".into(),
                hosts: vec![HostName::parse("api.github.com").unwrap()],
                inject: Injection::Header("Authorization".into()),
                format: "Bearer {secret}".into(),
                source: SecretSource::Env("GITHUB_TOKEN".into()),
                env: "GITHUB_TOKEN".into(),
                require: false,
            },
            Credential {
                name: "store".into(),
                hosts: vec![HostName::parse("example.org").unwrap()],
                inject: Injection::Query("key".into()),
                format: "{secret}".into(),
                source: SecretSource::Command(vec![
                    "/usr/bin/pass".into(),
                    "show".into(),
                    "store".into(),
                ]),
                env: "STORE_KEY".into(),
                require: true,
            },
            Credential {
                name: "basic".into(),
                hosts: vec![HostName::parse("example.org").unwrap()],
                inject: Injection::BasicAuth,
                format: "{secret}".into(),
                source: SecretSource::File(PathBuf::from("/run/secrets/basic")),
                env: "BASIC_PASSWORD".into(),
                require: false,
            },
            Credential {
                name: "anywhere".into(),
                hosts: vec![HostName::parse("api.github.com").unwrap()],
                inject: Injection::AnyHeader,
                format: "{secret}".into(),
                source: SecretSource::Env("ANY".into()),
                env: "ANY".into(),
                require: false,
            },
        ],
    }
}

#[test]
fn every_field_of_a_full_policy_is_read() {
    let policy = Policy::from_toml_str(FULL, Some("full.toml")).unwrap();
    assert_eq!(policy, full_policy());
}

#[test]
fn an_empty_policy_is_the_safe_default() {
    let policy = Policy::from_toml_str("", None).unwrap();
    assert_eq!(policy, Policy::default());
    assert_eq!(policy.network_mode(), NetworkMode::None);
    assert_eq!(policy.sandbox.workspace, None);
    assert_eq!(policy.sandbox.timeout, Duration::from_secs(60));
    assert_eq!(policy.sandbox.hostname, "cordon");
    assert!(!policy.sandbox.tty);
    assert_eq!(
        (policy.sandbox.host_uid, policy.sandbox.host_gid),
        (1_900_000, 1_900_000)
    );
    assert!(policy.sandbox.allow_missing.is_empty());
    assert_eq!(
        policy.limits,
        Limits {
            memory: ByteSize(512 << 20),
            pids: 64,
            cpu: 0.5,
            nofile: 256,
            tmp: ByteSize(64 << 20),
            workspace: ByteSize(1 << 30),
            file_size: ByteSize(1 << 30),
        }
    );
    assert_eq!(
        policy.network.rate,
        RateLimits {
            requests_per_minute: 600,
            requests_per_minute_per_host: 300,
            max_connections: 32,
            max_bytes_out: ByteSize(10 << 20),
            max_bytes_in: ByteSize(1 << 30),
            on_exceed: OnExceed::Block,
        }
    );
    assert_eq!(policy.network.mode, Enforcement::Enforce);
    assert_eq!(
        policy.detect.blocked,
        BlockedRule {
            enabled: true,
            threshold: 5,
            window: Duration::from_secs(60),
            response: Response::Terminate,
            alert: true,
        }
    );
    assert_eq!(policy.alerts.webhook, None);
}

#[test]
fn empty_tables_keep_the_defaults() {
    let text = "[sandbox]\n[limits]\n[network]\n[network.rate]\n[response]\n[detect]\n[detect.blocked]\n[detect.dns_tunnel]\n[detect.exfil]\n[detect.sandbox]\n[detect.canary]\n[alerts]\n";
    assert_eq!(
        Policy::from_toml_str(text, None).unwrap(),
        Policy::default()
    );
}

#[test]
fn network_mode_follows_the_allowlist_when_unset() {
    let policy = Policy::from_toml_str("[network]\nallow = [\"api.github.com\"]\n", None).unwrap();
    assert_eq!(policy.sandbox.network, None);
    assert_eq!(policy.network_mode(), NetworkMode::Gateway);

    let policy =
        Policy::from_toml_str("[network]\nallow_private = [\"10.0.0.5:80\"]\n", None).unwrap();
    assert_eq!(policy.network_mode(), NetworkMode::Gateway);

    let text = "[sandbox]\nnetwork = \"none\"\n[network]\nallow = [\"api.github.com\"]\n";
    assert_eq!(
        Policy::from_toml_str(text, None).unwrap().network_mode(),
        NetworkMode::None
    );

    let text = "[sandbox]\nnetwork = \"gateway\"\n";
    assert_eq!(
        Policy::from_toml_str(text, None).unwrap().network_mode(),
        NetworkMode::Gateway
    );
}

#[test]
fn the_full_policy_round_trips_through_its_toml_text() {
    let policy = full_policy();
    let text = policy.to_toml_string();
    assert_eq!(
        Policy::from_toml_str(&text, None).unwrap(),
        policy,
        "{text}"
    );
}

#[test]
fn the_default_policy_round_trips_and_spells_out_every_value() {
    let text = Policy::default().to_toml_string();
    assert_eq!(
        Policy::from_toml_str(&text, None).unwrap(),
        Policy::default()
    );
    for needle in [
        "timeout = \"1m\"",
        "memory = \"512M\"",
        "pids = 64",
        "cpu = 0.5",
        "on_exceed = \"block\"",
        "mode = \"enforce\"",
        "[detect.blocked]\nenabled = true\nthreshold = 5\nwindow = \"1m\"\nresponse = \"terminate\"\nalert = true",
        "[detect.dns_tunnel]",
        "nxdomain_ratio = 0.8",
        "max_request_body = \"1M\"",
        "[alerts]\ntimeout = \"5s\"\nretries = 3",
        "[detect.canary]\nenv = []\nfiles = []\nresponse = \"terminate\"",
        "host_uid = 1900000",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    // Unset optional values stay unset: no workspace path, no explicit network mode.
    let sandbox_part = text.split("[limits]").next().unwrap();
    assert!(!sandbox_part.contains("workspace"), "{text}");
    assert!(!sandbox_part.contains("network"), "{text}");
}

#[test]
fn a_policy_with_sub_second_parts_and_odd_sizes_round_trips() {
    let mut policy = Policy::default();
    policy.sandbox.timeout = Duration::new(3661, 1_500_000);
    policy.limits.memory = ByteSize(16 * 1024 * 1024 + 1);
    policy.limits.cpu = 0.1 + 0.2;
    policy
        .sandbox
        .env
        .insert("QUOTE".into(), "a \"b\" \\ c\n\u{1f600}".into());
    policy.sandbox.mounts.push(ExtraMount {
        host: PathBuf::from("/a b/ü"),
        path: PathBuf::from("/x"),
        writable: true,
    });
    let text = policy.to_toml_string();
    assert_eq!(
        Policy::from_toml_str(&text, None).unwrap(),
        policy,
        "{text}"
    );
}
