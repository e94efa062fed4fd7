//! Command-line flags override the policy file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use cordon_policy::{
    AllowEntry, ByteSize, Enforcement, Layer, MinSeverity, NetworkMode, Overrides, Policy,
};

const FILE: &str = r#"
[sandbox]
timeout = "60s"
allow_missing = ["cgroups"]
env = { LANG = "C.UTF-8", KEEP = "1" }
[limits]
memory = "512M"
[network]
allow = ["api.github.com"]
"#;

#[test]
fn every_flag_replaces_or_extends_the_file_value() {
    let mut policy = Policy::from_toml_str(FILE, Some("p.toml")).unwrap();
    let overrides = Overrides {
        workspace: Some(PathBuf::from("rel/dir")),
        timeout: Some("2m".into()),
        memory: Some("1G".into()),
        pids: Some(10),
        cpu: Some(1.5),
        nofile: Some(64),
        tmp: Some("8M".into()),
        workspace_size: Some("2G".into()),
        file_size: Some("64k".into()),
        allow: vec!["example.org:*".into(), "api.github.com".into()],
        network: Some("gateway".into()),
        env: vec!["LANG=en_US.UTF-8".into(), "EMPTY=".into(), "EQ=a=b".into()],
        tty: Some(true),
        host_uid: Some(2000),
        host_gid: Some(3000),
        allow_missing: vec!["landlock".into()],
        mode: Some("report".into()),
        syslog: Some("tcp://[::1]:6514".into()),
        syslog_min_severity: Some("warning".into()),
    };
    policy.apply(&overrides).unwrap();

    let mut expected = Policy::from_toml_str(FILE, None).unwrap();
    expected.sandbox.workspace = Some(PathBuf::from("rel/dir"));
    expected.sandbox.timeout = Duration::from_secs(120);
    expected.limits.memory = ByteSize(1 << 30);
    expected.limits.pids = 10;
    expected.limits.cpu = 1.5;
    expected.limits.nofile = 64;
    expected.limits.tmp = ByteSize(8 << 20);
    expected.limits.workspace = ByteSize(2 << 30);
    expected.limits.file_size = ByteSize(64 << 10);
    // Appended, and the duplicate api.github.com is not added twice.
    expected.network.allow = vec![
        AllowEntry::parse("api.github.com").unwrap(),
        AllowEntry::parse("example.org:*").unwrap(),
    ];
    expected.sandbox.network = Some(NetworkMode::Gateway);
    expected
        .sandbox
        .env
        .insert("LANG".into(), "en_US.UTF-8".into());
    expected.sandbox.env.insert("EMPTY".into(), String::new());
    expected.sandbox.env.insert("EQ".into(), "a=b".into());
    expected.audit.syslog = Some("tcp://[::1]:6514".parse().unwrap());
    expected.audit.syslog_min_severity = MinSeverity::Warning;
    expected.sandbox.tty = true;
    expected.sandbox.host_uid = 2000;
    expected.sandbox.host_gid = 3000;
    expected.sandbox.allow_missing = BTreeSet::from([Layer::Cgroups, Layer::Landlock]);
    expected.network.mode = Enforcement::Report;
    assert_eq!(policy, expected);
    assert_eq!(
        expected.sandbox.env.get("KEEP").map(String::as_str),
        Some("1")
    );
}

#[test]
fn no_flags_change_nothing() {
    let mut policy = Policy::from_toml_str(FILE, None).unwrap();
    let before = policy.clone();
    policy.apply(&Overrides::default()).unwrap();
    assert_eq!(policy, before);
}

#[test]
fn allow_on_the_command_line_turns_the_gateway_on_when_the_file_is_silent() {
    let mut policy = Policy::default();
    assert_eq!(policy.network_mode(), NetworkMode::None);
    policy
        .apply(&Overrides {
            allow: vec!["api.github.com:443".into()],
            ..Overrides::default()
        })
        .unwrap();
    assert_eq!(policy.network_mode(), NetworkMode::Gateway);
}

#[test]
fn network_none_on_the_command_line_turns_an_allowlist_off() {
    let mut policy = Policy::from_toml_str(FILE, None).unwrap();
    policy
        .apply(&Overrides {
            network: Some("none".into()),
            ..Overrides::default()
        })
        .unwrap();
    assert_eq!(policy.network_mode(), NetworkMode::None);
}

#[test]
fn the_overridden_policy_round_trips() {
    let mut policy = Policy::from_toml_str(FILE, None).unwrap();
    policy
        .apply(&Overrides {
            timeout: Some("1h1ms".into()),
            cpu: Some(0.25),
            env: vec!["X=y z".into()],
            ..Overrides::default()
        })
        .unwrap();
    let text = policy.to_toml_string();
    assert_eq!(
        Policy::from_toml_str(&text, None).unwrap(),
        policy,
        "{text}"
    );
}
