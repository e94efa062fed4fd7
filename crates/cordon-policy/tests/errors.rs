//! Every kind of bad policy input gets one clear line: file:line:col: key: what is wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cordon_policy::{Overrides, Policy, PolicyError};

fn error(text: &str) -> String {
    Policy::from_toml_str(text, Some("policy.toml"))
        .expect_err("the policy should be refused")
        .to_string()
}

fn assert_error(text: &str, expected: &str) {
    assert_eq!(error(text), expected, "policy:\n{text}");
}

#[test]
fn a_bad_size_names_file_line_column_and_key() {
    assert_error(
        "[sandbox]\n\n[limits]\nmemory = \"12X\"\n",
        "policy.toml:4:10: limits.memory: \"12X\" is not a size: expected a number with an optional K/M/G/T suffix",
    );
}

#[test]
fn without_a_file_name_the_position_is_spelled_out() {
    let err = Policy::from_toml_str("[limits]\npids = 0\n", None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 2, column 8: limits.pids: must be between 1 and 4194304, got 0"
    );
    assert_eq!(
        (err.line(), err.column(), err.key()),
        (Some(2), Some(8), Some("limits.pids"))
    );
}

#[test]
fn unknown_keys_are_errors_that_name_their_table() {
    let err = Policy::from_toml_str("[limits]\nmemroy = \"1G\"\n", Some("p.toml")).unwrap_err();
    assert!(matches!(err, PolicyError::Syntax { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("p.toml:2:1: limits: unknown key `memroy`, expected one of `memory`"),
        "{text}"
    );
    assert!(
        error("[sandbox.mounts]\n").starts_with("policy.toml:1:"),
        "{}",
        error("[sandbox.mounts]\n")
    );
    assert!(
        error("[sandboxx]\ntimeout = \"1s\"\n")
            .starts_with("policy.toml:1:2: unknown key `sandboxx`"),
        "{}",
        error("[sandboxx]\n")
    );
    assert!(error("[network.rate]\nrpm = 5\n")
        .starts_with("policy.toml:2:1: network.rate: unknown key `rpm`"));
    assert!(
        error("[[sandbox.mounts]]\nhost = \"/a\"\npath = \"/b\"\nrw = true\n")
            .starts_with("policy.toml:4:1: sandbox.mounts[0]: unknown key `rw`")
    );
}

#[test]
fn a_table_of_the_wrong_type_is_an_error() {
    assert_error(
        "limits = 5\n",
        "policy.toml:1:10: limits: invalid type: integer `5`, expected a [limits] table",
    );
}

#[test]
fn broken_toml_is_an_error_with_a_position() {
    let err = Policy::from_toml_str("[limits]\nmemory = \n", Some("policy.toml")).unwrap_err();
    assert!(matches!(err, PolicyError::Syntax { .. }));
    assert_eq!(err.line(), Some(2));
    assert_error(
        "[limits]\npids = 1\npids = 2\n",
        "policy.toml:3:1: duplicate key \"pids\"",
    );
}

const ALLOW: &str = "[network]\nallow = [\"api.github.com\", \"*.example.com\"]\n";

fn cred(body: &str) -> String {
    format!("{ALLOW}\n[[credentials]]\n{body}")
}

#[test]
fn every_bad_credential_value_is_an_error_at_its_position() {
    let ok = "name = \"gh\"\nhosts = [\"api.github.com\"]\nheader = \"Authorization\"\nformat = \"Bearer {secret}\"\nfrom_env = \"GITHUB_TOKEN\"\n";
    assert!(Policy::from_toml_str(&cred(ok), None).is_ok());
    let cases: &[(&str, &str)] = &[
        ("name = \"g h\"\nhosts = [\"api.github.com\"]\nheader = \"A\"\nfrom_env = \"T\"\n",
         "policy.toml:5:8: credentials[0].name: \"g h\" is not a credential name: 1 to 64 letters, digits, '-' or '_'"),
        ("name = \"g\"\nhosts = [\"evil.com\"]\nheader = \"A\"\nfrom_env = \"T\"\n",
         "policy.toml:6:10: credentials[0].hosts[0]: \"evil.com\" is not in network.allow, so the sandbox could never reach it"),
        ("name = \"g\"\nhosts = [\"a b\"]\nheader = \"A\"\nfrom_env = \"T\"\n",
         "policy.toml:6:10: credentials[0].hosts[0]: \"a b\" is not a host name: it contains ' '"),
        ("name = \"g\"\nhosts = []\nheader = \"A\"\nfrom_env = \"T\"\n",
         "policy.toml:4:1: credentials[0]: \"hosts\" is empty: bind the credential to at least one host"),
        ("name = \"g\"\nhosts = [\"api.github.com\"]\nheader = \"Host\"\nfrom_env = \"T\"\n",
         "policy.toml:7:10: credentials[0].header: \"Host\" frames or routes the request; a credential cannot go there"),
        ("name = \"g\"\nhosts = [\"api.github.com\"]\nquery = \"a&b\"\nfrom_env = \"T\"\n",
         "policy.toml:7:9: credentials[0].query: \"a&b\" is not a query parameter name: letters, digits, '-', '.', '_' or '~'"),
        ("name = \"g\"\nhosts = [\"api.github.com\"]\nfrom_env = \"T\"\n",
         "policy.toml:4:1: credentials[0]: say where the secret goes: one of \"header\", \"query\", \"basic_auth\" or \"any_header\""),
        ("name = \"g\"\nhosts = [\"api.github.com\"]\nheader = \"A\"\nquery = \"q\"\nfrom_env = \"T\"\n",
         "policy.toml:4:1: credentials[0]: give only one of \"header\", \"query\", \"basic_auth\" and \"any_header\""),
        ("name = \"g\"\nhosts = [\"api.github.com\"]\nbasic_auth = false\nfrom_env = \"T\"\n",
         "policy.toml:7:14: credentials[0].basic_auth: only `true` is meaningful; leave it out otherwise"),
        ("name = \"g\"\nhosts = [\"api.github.com\"]\nheader = \"A\"\nformat = \"Bearer\"\nfrom_env = \"T\"\n",
         "policy.toml:8:10: credentials[0].format: \"Bearer\" must contain {secret} exactly once"),
        ("name = \"g\"\nhosts = [\"api.github.com\"]\nbasic_auth = true\nformat = \"x{secret}\"\nfrom_env = \"T\"\n",
         "policy.toml:8:10: credentials[0].format: basic auth replaces the placeholder where the sandbox put it; \"format\" applies only to \"header\" and \"query\""),
        ("name = \"g\"\nhosts = [\"api.github.com\"]\nheader = \"A\"\n",
         "policy.toml:4:1: credentials[0]: say where the secret comes from: one of \"from_env\", \"from_file\" or \"from_command\""),
        ("name = \"g\"\nhosts = [\"api.github.com\"]\nheader = \"A\"\nfrom_env = \"T\"\nfrom_file = \"/s\"\n",
         "policy.toml:4:1: credentials[0]: give only one of \"from_env\", \"from_file\" and \"from_command\""),
        ("name = \"g\"\nhosts = [\"api.github.com\"]\nheader = \"A\"\nfrom_env = \"1T\"\n",
         "policy.toml:8:12: credentials[0].from_env: \"1T\" is not a valid environment variable name: use letters, digits and '_', not starting with a digit"),
        ("name = \"g\"\nhosts = [\"api.github.com\"]\nheader = \"A\"\nfrom_file = \"rel/path\"\nenv = \"T\"\n",
         "policy.toml:8:13: credentials[0].from_file: the host path \"rel/path\" must be an absolute path"),
        ("name = \"g\"\nhosts = [\"api.github.com\"]\nheader = \"A\"\nfrom_command = []\nenv = \"T\"\n",
         "policy.toml:4:1: credentials[0]: from_command: needs a program: [\"program\", \"arg\", ...]"),
        ("name = \"g\"\nhosts = [\"api.github.com\"]\nheader = \"A\"\nfrom_command = [\"/bin/pass\"]\n",
         "policy.toml:4:1: credentials[0]: missing \"env\": the sandbox variable that holds the placeholder"),
        ("name = \"g\"\nhosts = [\"api.github.com\"]\nheader = \"A\"\nfrom_env = \"T\"\nrequire = \"yes\"\n",
         "policy.toml:9:11: credentials[0].require: expected true or false, found a string"),
        ("hosts = [\"api.github.com\"]\nheader = \"A\"\nfrom_env = \"T\"\n",
         "policy.toml:4:1: credentials[0]: missing \"name\""),
        ("name = \"g\"\nheader = \"A\"\nfrom_env = \"T\"\n",
         "policy.toml:4:1: credentials[0]: missing \"hosts\""),
    ];
    let mut wrong = Vec::new();
    for (body, expected) in cases {
        let got = error(&cred(body));
        if got != *expected {
            wrong.push(format!("got:  {got}\nwant: {expected}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(
        error(&cred("name = \"g\"\nhost = \"api.github.com\"\n"))
            .starts_with("policy.toml:6:1: credentials[0]: unknown key `host`"),
        "{}",
        error(&cred("name = \"g\"\nhost = \"x\"\n"))
    );
}

#[test]
fn credential_names_and_placeholder_variables_are_unique() {
    let one = "[[credentials]]\nname = \"g\"\nhosts = [\"api.github.com\"]\nheader = \"A\"\nfrom_env = \"T\"\n";
    assert_error(
        &format!("{ALLOW}\n{one}{one}"),
        "policy.toml:10:8: credentials[1].name: another credential is already called \"g\"",
    );
    let other = "[[credentials]]\nname = \"h\"\nhosts = [\"api.github.com\"]\nheader = \"B\"\nfrom_file = \"/s\"\nenv = \"T\"\n";
    assert_error(
        &format!("{ALLOW}\n{one}{other}"),
        "policy.toml:14:7: credentials[1].env: \"T\" is already set by sandbox.env or another credential",
    );
}

#[test]
fn every_bad_http_rule_value_is_an_error_at_its_position() {
    let rule = |body: &str| format!("{ALLOW}\n[[network.rules]]\n{body}");
    assert!(Policy::from_toml_str(
        &rule("host = \"api.github.com\"\nmethods = [\"GET\"]\npaths = [\"/repos/*\"]\n"),
        None
    )
    .is_ok());
    let cases: &[(&str, &str)] = &[
        ("host = \"evil.com\"\nmethods = [\"GET\"]\n",
         "policy.toml:5:8: network.rules[0].host: \"evil.com\" is not in network.allow, so the sandbox could never reach it"),
        ("methods = [\"GET\"]\n", "policy.toml:4:1: network.rules[0]: missing \"host\""),
        ("host = \"api.github.com\"\n", "policy.toml:4:1: network.rules[0]: give \"methods\", \"paths\" or both"),
        ("host = \"api.github.com\"\nmethods = [\"get\"]\n",
         "policy.toml:6:12: network.rules[0].methods[0]: \"get\" is not an HTTP method: use upper-case letters like \"GET\", or \"*\""),
        ("host = \"api.github.com\"\nmethods = []\n", "policy.toml:4:1: network.rules[0]: \"methods\" is empty, so the rule allows nothing"),
        ("host = \"api.github.com\"\npaths = [\"repos\"]\n",
         "policy.toml:6:10: network.rules[0].paths[0]: \"repos\" must start with '/' (a path glob like \"/repos/*\")"),
        ("host = \"api.github.com\"\npaths = [\"/a%2Fb\"]\n",
         "policy.toml:6:10: network.rules[0].paths[0]: \"/a%2Fb\" must be written decoded, without '%', '?', '#' or '\\' (paths are percent-decoded before matching)"),
        ("host = \"api.github.com\"\npaths = [\"/a/../b\"]\n",
         "policy.toml:6:10: network.rules[0].paths[0]: \"/a/../b\" must be normalised: no \"//\", \".\" or \"..\" segments (requests are normalised before matching)"),
        ("host = \"api.github.com\"\npaths = [1]\n",
         "policy.toml:6:10: network.rules[0].paths[0]: expected a path glob like \"/repos/*\", found an integer"),
    ];
    for (body, expected) in cases {
        assert_error(&rule(body), expected);
    }
}

#[test]
fn bad_intercept_entries_are_errors_at_their_position() {
    assert_error(
        "[network]\nintercept = [\"ok.example.com\", \"*.com\"]\n",
        "policy.toml:2:32: network.intercept[1]: \"*.com\" is too broad: name a registered domain (\"*.example.com\")",
    );
    assert_error(
        "[network]\nintercept = [\"a/b\"]\n",
        "policy.toml:2:14: network.intercept[0]: \"a/b\" is not a host name: it contains '/'",
    );
}

#[test]
fn wrong_value_types_say_what_was_expected() {
    assert_error(
        "[limits]\npids = \"64\"\n",
        "policy.toml:2:8: limits.pids: expected an integer, found a string",
    );
    assert_error(
        "[limits]\nmemory = true\n",
        "policy.toml:2:10: limits.memory: expected a size like \"512M\", found a boolean",
    );
    assert_error(
        "[sandbox]\ntimeout = 60\n",
        "policy.toml:2:11: sandbox.timeout: expected a duration like \"60s\", found an integer",
    );
    assert_error(
        "[sandbox]\ntty = \"yes\"\n",
        "policy.toml:2:7: sandbox.tty: expected true or false, found a string",
    );
    assert_error(
        "[network]\nallow = [\"a.com\", 443]\n",
        "policy.toml:2:19: network.allow[1]: expected an allow entry like \"api.github.com:443\", found an integer",
    );
    assert!(error("[network]\nallow = \"a.com\"\n")
        .starts_with("policy.toml:2:9: network.allow: invalid type"));
}

#[test]
fn bad_durations_are_errors() {
    assert_error(
        "[sandbox]\ntimeout = \"60\"\n",
        "policy.toml:2:11: sandbox.timeout: \"60\" is not a duration: expected numbers with units (h, m, s, ms), like \"500ms\", \"60s\" or \"1h30m\"",
    );
    assert_error(
        "[sandbox]\ntimeout = \"0s\"\n",
        "policy.toml:2:11: sandbox.timeout: must be more than 0 and at most 24h, got 0s",
    );
    assert_error(
        "[sandbox]\ntimeout = \"25h\"\n",
        "policy.toml:2:11: sandbox.timeout: must be more than 0 and at most 24h, got 25h",
    );
}

#[test]
fn impossible_limits_are_errors() {
    assert_error(
        "[limits]\ncpu = -1\n",
        "policy.toml:2:7: limits.cpu: must be between 0.01 and 1024 cores, got -1",
    );
    assert_error(
        "[limits]\ncpu = 0.0\n",
        "policy.toml:2:7: limits.cpu: must be between 0.01 and 1024 cores, got 0",
    );
    assert_error(
        "[limits]\ncpu = nan\n",
        "policy.toml:2:7: limits.cpu: must be between 0.01 and 1024 cores, got NaN",
    );
    assert_error(
        "[limits]\nmemory = \"8M\"\n",
        "policy.toml:2:10: limits.memory: must be at least 16M, got 8M",
    );
    assert_error(
        "[limits]\nnofile = 15\n",
        "policy.toml:2:10: limits.nofile: must be between 16 and 1048576, got 15",
    );
    assert_error(
        "[limits]\npids = -3\n",
        "policy.toml:2:8: limits.pids: must be between 1 and 4194304, got -3",
    );
    assert_error(
        "[limits]\ntmp = 0\n",
        "policy.toml:2:7: limits.tmp: must be at least 1M, got 0",
    );
    assert_error(
        "[limits]\nworkspace = -1\n",
        "policy.toml:2:13: limits.workspace: must be a size of 0 bytes or more, got -1",
    );
    assert_error(
        "[network.rate]\nrequests_per_minute = 0\n",
        "policy.toml:2:23: network.rate.requests_per_minute: must be between 1 and 4294967295, got 0",
    );
    assert_error(
        "[network.rate]\nmax_bytes_out = \"0\"\n",
        "policy.toml:2:17: network.rate.max_bytes_out: must be at least 1 byte (there is no \"unlimited\"), got 0",
    );
    assert_error(
        "[response]\nterminate_after_blocked = -1\n",
        "policy.toml:2:27: response.terminate_after_blocked: must be between 0 and 4294967295, got -1",
    );
}

#[test]
fn host_root_and_minus_one_ids_are_refused() {
    assert_error(
        "[sandbox]\nhost_uid = 0\n",
        "policy.toml:2:12: sandbox.host_uid: must not be 0: the sandbox is never host root",
    );
    assert_error(
        "[sandbox]\nhost_gid = 4294967295\n",
        "policy.toml:2:12: sandbox.host_gid: must be between 1 and 4294967294, got 4294967295",
    );
}

#[test]
fn unknown_choices_list_the_allowed_ones() {
    assert_error(
        "[sandbox]\nnetwork = \"host\"\n",
        "policy.toml:2:11: sandbox.network: \"host\" is not one of: none, gateway",
    );
    assert_error(
        "[sandbox]\nallow_missing = [\"seccomp\", \"apparmor\"]\n",
        "policy.toml:2:29: sandbox.allow_missing[1]: \"apparmor\" is not one of: landlock, seccomp, cgroups, workspace_cap",
    );
    assert_error(
        "[network]\nmode = \"audit\"\n",
        "policy.toml:2:8: network.mode: \"audit\" is not one of: enforce, report",
    );
    assert_error(
        "[network.rate]\non_exceed = \"kill\"\n",
        "policy.toml:2:13: network.rate.on_exceed: \"kill\" is not one of: block, terminate",
    );
}

#[test]
fn bad_mounts_are_errors_at_the_mount() {
    assert_error(
        "[[sandbox.mounts]]\nhost = \"/opt\"\npath = \"/proc/x\"\n",
        "policy.toml:3:8: sandbox.mounts[0].path: \"/proc/x\" is at or under /proc, which cordon sets up itself",
    );
    assert_error(
        "[[sandbox.mounts]]\nhost = \"/opt\"\npath = \"data\"\n",
        "policy.toml:3:8: sandbox.mounts[0].path: the sandbox path \"data\" must be an absolute path",
    );
    assert_error(
        "[[sandbox.mounts]]\nhost = \"opt\"\npath = \"/data\"\n",
        "policy.toml:2:8: sandbox.mounts[0].host: the host path \"opt\" must be an absolute path",
    );
    assert_error(
        "[[sandbox.mounts]]\nhost = \"/opt\"\npath = \"/\"\n",
        "policy.toml:3:8: sandbox.mounts[0].path: a mount cannot cover the sandbox's root \"/\"",
    );
    assert_error(
        "[[sandbox.mounts]]\nhost = \"/opt\"\npath = \"/data/../workspace\"\n",
        "policy.toml:3:8: sandbox.mounts[0].path: the sandbox path \"/data/../workspace\" must not contain \"..\"",
    );
    assert_error(
        "[[sandbox.mounts]]\nhost = \"/opt\"\n",
        "policy.toml:1:1: sandbox.mounts[0]: missing \"path\"",
    );
    assert_error(
        "[[sandbox.mounts]]\nhost = \"/a\"\npath = \"/data\"\n[[sandbox.mounts]]\nhost = \"/b\"\npath = \"/data/\"\n",
        "policy.toml:6:8: sandbox.mounts[1].path: \"/data/\" is already mounted by sandbox.mounts[0]",
    );
    assert_error(
        "[[sandbox.mounts]]\nhost = \"/a\"\npath = \"/data/x\"\n[[sandbox.mounts]]\nhost = \"/b\"\npath = \"/data\"\n",
        "policy.toml:6:8: sandbox.mounts[1].path: \"/data\" is mounted after sandbox.mounts[0] (\"/data/x\"), which is inside it and would be hidden; list it first",
    );
}

#[test]
fn bad_environment_entries_are_errors() {
    assert_error(
        "[sandbox]\nenv = { HOME = \"/root\" }\n",
        "policy.toml:2:9: sandbox.env: HOME cannot be set: it is always /workspace",
    );
    assert_error(
        "[sandbox.env]\n\"1X\" = \"a\"\n",
        "policy.toml:2:1: sandbox.env: \"1X\" is not a valid environment variable name: use letters, digits and '_', not starting with a digit",
    );
    assert_error(
        "[sandbox.env]\nX = \"a\\u0000b\"\n",
        "policy.toml:2:5: sandbox.env.X: an environment value cannot contain a NUL character",
    );
    assert_error(
        "[sandbox.env]\nX = 1\n",
        "policy.toml:2:5: sandbox.env.X: expected a string, found an integer",
    );
}

#[test]
fn bad_allow_entries_are_errors_at_the_entry() {
    assert_error(
        "[network]\nallow = [\n  \"api.github.com\",\n  \"api.github.com:99999\",\n]\n",
        "policy.toml:4:3: network.allow[1]: \"api.github.com:99999\": \"99999\" is not a port: expected 1-65535 or *",
    );
    assert_error(
        "[network]\nallow = [\"*.com\"]\n",
        "policy.toml:2:10: network.allow[0]: \"*.com\": a wildcard must leave at least two labels (\"*.example.com\", not \"*.com\")",
    );
    assert_error(
        "[network]\nallow = [\"2852039166:80\"]\n",
        "policy.toml:2:10: network.allow[0]: \"2852039166:80\": write an IPv4 address as four decimal numbers, like 169.254.169.254",
    );
    assert_error(
        "[network]\nallow = [\"10.0.0.5:8080\"]\n",
        "policy.toml:2:10: network.allow[0]: \"10.0.0.5:8080\" is in a blocked range (private 10.0.0.0/8), so the gateway would never connect to it; list it in network.allow_private to reach it",
    );
    assert_error(
        "[network]\nallow_private = [\"10.0.0.0/8:x\"]\n",
        "policy.toml:2:18: network.allow_private[0]: \"10.0.0.0/8:x\": \"x\" is not a port: expected 1-65535 or *",
    );
}

#[test]
fn bad_hostname_and_workspace_are_errors() {
    assert_error(
        "[sandbox]\nhostname = \"a b\"\n",
        "policy.toml:2:12: sandbox.hostname: \"a b\" is not a valid hostname: use letters, digits, '-' and '.', at most 64 characters",
    );
    assert_error(
        "[sandbox]\nworkspace = \"\"\n",
        "policy.toml:2:13: sandbox.workspace: the workspace path cannot be empty",
    );
}

#[test]
fn columns_count_characters_not_bytes() {
    assert_error(
        "# ünïcödé\n[limits] # é\npids = 0 # ✓\n",
        "policy.toml:3:8: limits.pids: must be between 1 and 4194304, got 0",
    );
    assert_error(
        "[sandbox.env]\nA = \"é\"\nB = { x = 1 }\n",
        "policy.toml:3:5: sandbox.env.B: expected a string, found a table",
    );
}

#[test]
fn errors_never_echo_control_characters_or_unbounded_text() {
    let text = format!("[limits]\nmemory = \"\\u001b[31m{}\"\n", "9".repeat(10_000));
    let message = error(&text);
    assert!(!message.contains('\u{1b}'), "{message}");
    assert!(message.len() < 300, "{} bytes", message.len());
}

#[test]
fn override_errors_name_the_flag_and_change_nothing() {
    let mut policy = Policy::default();
    let before = policy.clone();
    let cases: Vec<(Overrides, &str)> = vec![
        (
            Overrides {
                memory: Some("12X".into()),
                ..Overrides::default()
            },
            "--memory: \"12X\" is not a size: expected a number with an optional K/M/G/T suffix",
        ),
        (
            Overrides {
                pids: Some(0),
                timeout: Some("10s".into()),
                ..Overrides::default()
            },
            "--pids: must be between 1 and 4194304, got 0",
        ),
        (
            Overrides {
                timeout: Some("10".into()),
                ..Overrides::default()
            },
            "--timeout: \"10\" is not a duration: expected numbers with units (h, m, s, ms), like \"500ms\", \"60s\" or \"1h30m\"",
        ),
        (
            Overrides {
                cpu: Some(f64::NAN),
                ..Overrides::default()
            },
            "--cpu: must be between 0.01 and 1024 cores, got NaN",
        ),
        (
            Overrides {
                host_uid: Some(0),
                ..Overrides::default()
            },
            "--host-uid: must not be 0: the sandbox is never host root",
        ),
        (
            Overrides {
                allow: vec!["api.github.com".into(), "bad host".into()],
                ..Overrides::default()
            },
            "--allow: \"bad host\": whitespace and control characters are not allowed",
        ),
        (
            Overrides {
                env: vec!["NOEQUALS".into()],
                ..Overrides::default()
            },
            "--env: \"NOEQUALS\" must be NAME=VALUE",
        ),
        (
            Overrides {
                env: vec!["HOME=/root".into()],
                ..Overrides::default()
            },
            "--env: HOME cannot be set: it is always /workspace",
        ),
        (
            Overrides {
                allow_missing: vec!["selinux".into()],
                ..Overrides::default()
            },
            "--allow-missing: \"selinux\" is not one of: landlock, seccomp, cgroups, workspace_cap",
        ),
        (
            Overrides {
                network: Some("host".into()),
                ..Overrides::default()
            },
            "--network: \"host\" is not one of: none, gateway",
        ),
        (
            Overrides {
                mode: Some("shadow".into()),
                ..Overrides::default()
            },
            "--mode: \"shadow\" is not one of: enforce, report",
        ),
        (
            Overrides {
                allow: vec!["api.github.com".into()],
                network: Some("none".into()),
                ..Overrides::default()
            },
            "--allow: the network is off (sandbox.network = \"none\"); add --network gateway to use the allowlist",
        ),
        (
            Overrides {
                workspace_size: Some("0".into()),
                ..Overrides::default()
            },
            "--workspace-size: must be at least 16M, got 0",
        ),
        (
            Overrides {
                file_size: Some("1".into()),
                ..Overrides::default()
            },
            "--file-size: must be at least 1K, got 1",
        ),
        (
            Overrides {
                tmp: Some("1T1".into()),
                ..Overrides::default()
            },
            "--tmp-size: \"1T1\" is not a size: expected a number with an optional K/M/G/T suffix",
        ),
        (
            Overrides {
                nofile: Some(2_000_000),
                ..Overrides::default()
            },
            "--nofile: must be between 16 and 1048576, got 2000000",
        ),
    ];
    for (overrides, expected) in cases {
        let err = policy.apply(&overrides).unwrap_err();
        assert_eq!(err.to_string(), expected);
        assert_eq!(policy, before, "a failed apply changed the policy");
    }
}

#[test]
fn a_non_utf8_workspace_flag_is_refused() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let mut policy = Policy::default();
    let overrides = Overrides {
        workspace: Some(OsStr::from_bytes(b"/tmp/\xff").into()),
        ..Overrides::default()
    };
    let err = policy.apply(&overrides).unwrap_err();
    assert!(err.to_string().starts_with("--workspace: "), "{err}");
    assert!(err.to_string().ends_with("is not valid UTF-8"), "{err}");
}

#[test]
fn validate_catches_bad_values_built_in_code() {
    let mut policy = Policy::default();
    policy.limits.pids = 0;
    assert_eq!(
        policy.validate().unwrap_err().to_string(),
        "limits.pids: must be between 1 and 4194304, got 0"
    );
    let mut policy = Policy::default();
    policy.sandbox.host_uid = 0;
    assert_eq!(
        policy.validate().unwrap_err().key(),
        Some("sandbox.host_uid")
    );
}

/// Every `[detect]` and `[alerts]` value that cannot be used, one line each.
const BAD_DETECT: &[(&str, &str)] = &[
    ("[detect.blocked]\nthreshold = 0\n", "policy.toml:2:13: detect.blocked.threshold: must be between 1 and 4294967295, got 0"),
    ("[detect.blocked]\nwindow = \"0s\"\n", "policy.toml:2:10: detect.blocked.window: must be more than 0 and at most 24h, got 0s"),
    ("[detect.blocked]\nwindow = \"25h\"\n", "policy.toml:2:10: detect.blocked.window: must be more than 0 and at most 24h, got 25h"),
    ("[detect.blocked]\nwindow = 10\n", "policy.toml:2:10: detect.blocked.window: expected a duration like \"10s\", found an integer"),
    ("[detect.blocked]\nresponse = \"kill\"\n", "policy.toml:2:12: detect.blocked.response: \"kill\" is not one of: log, block, terminate"),
    ("[detect.blocked]\nalert = \"yes\"\n", "policy.toml:2:9: detect.blocked.alert: expected true or false, found a string"),
    ("[detect.blocked]\nenabled = 1\n", "policy.toml:2:11: detect.blocked.enabled: expected true or false, found an integer"),
    ("[detect.blocked]\nthresold = 3\n", "policy.toml:2:1: detect.blocked: unknown key `thresold`, expected one of `enabled`, `threshold`, `window`, `response`, `alert`"),
    ("[detect.dns_tunnel]\ndistinct_names = -1\n", "policy.toml:2:18: detect.dns_tunnel.distinct_names: must be between 1 and 4294967295, got -1"),
    ("[detect.dns_tunnel]\nmax_name_length = 300\n", "policy.toml:2:19: detect.dns_tunnel.max_name_length: must be between 1 and 253 (the longest DNS name), got 300"),
    ("[detect.dns_tunnel]\nentropy = 0\n", "policy.toml:2:11: detect.dns_tunnel.entropy: must be more than 0 and at most 6 bits per character, got 0"),
    ("[detect.dns_tunnel]\nentropy = 7.5\n", "policy.toml:2:11: detect.dns_tunnel.entropy: must be more than 0 and at most 6 bits per character, got 7.5"),
    ("[detect.dns_tunnel]\nnxdomain_ratio = 1.5\n", "policy.toml:2:18: detect.dns_tunnel.nxdomain_ratio: must be more than 0 and at most 1, got 1.5"),
    ("[detect.dns_tunnel]\nnxdomain_ratio = nan\n", "policy.toml:2:18: detect.dns_tunnel.nxdomain_ratio: must be more than 0 and at most 1, got NaN"),
    ("[detect.dns_tunnel]\nwindow = \"10\"\n", "policy.toml:2:10: detect.dns_tunnel.window: \"10\" is not a duration: expected numbers with units (h, m, s, ms), like \"500ms\", \"60s\" or \"1h30m\""),
    ("[detect.dns_tunnel]\nother_types = 0\n", "policy.toml:2:15: detect.dns_tunnel.other_types: must be between 1 and 4294967295, got 0"),
    ("[detect.exfil]\nbytes_out = \"0\"\n", "policy.toml:2:13: detect.exfil.bytes_out: must be at least 1 byte (there is no \"unlimited\"), got 0"),
    ("[detect.exfil]\nmax_request_body = \"1.5M\"\n", "policy.toml:2:20: detect.exfil.max_request_body: \"1.5M\" is not a size: expected a number with an optional K/M/G/T suffix"),
    ("[detect.exfil]\nsmall_requests = 0\n", "policy.toml:2:18: detect.exfil.small_requests: must be between 1 and 4294967295, got 0"),
    ("[detect.exfil]\ndistinct_hosts = 0\n", "policy.toml:2:18: detect.exfil.distinct_hosts: must be between 1 and 4294967295, got 0"),
    ("[detect.sandbox]\nseccomp_denied = -1\n", "policy.toml:2:18: detect.sandbox.seccomp_denied: must be between 0 and 4294967295, got -1"),
    ("[detect.sandbox]\nlimits = \"on\"\n", "policy.toml:2:10: detect.sandbox.limits: expected true or false, found a string"),
    ("[detect.canary]\nenv = [\"1BAD\"]\n", "policy.toml:2:8: detect.canary.env[0]: \"1BAD\" is not a valid environment variable name: use letters, digits and '_', not starting with a digit"),
    ("[detect.canary]\nenv = [\"PATH\"]\n", "policy.toml:2:8: detect.canary.env[0]: \"PATH\" is set by cordon and cannot be a canary"),
    ("[detect.canary]\nenv = [\"A\", \"A\"]\n", "policy.toml:2:13: detect.canary.env[1]: \"A\" is listed twice"),
    ("[detect.canary]\nenv = \"A\"\n", "policy.toml:2:7: detect.canary.env: invalid type: string \"A\", expected a sequence"),
    ("[detect.canary]\nenv = [\"http_proxy\"]\n", "policy.toml:2:8: detect.canary.env[0]: \"http_proxy\" is set by cordon and cannot be a canary"),
    ("[detect.canary]\nfiles = [\"\"]\n", "policy.toml:2:10: detect.canary.files[0]: \"\" is not a canary file path: it is empty"),
    ("[detect.canary]\nfiles = [\"/etc/passwd\"]\n", "policy.toml:2:10: detect.canary.files[0]: \"/etc/passwd\" is not a canary file path: canary files live in /workspace; write a path relative to it, like \".env\""),
    ("[detect.canary]\nfiles = [\"/workspace/.env\"]\n", "policy.toml:2:10: detect.canary.files[0]: \"/workspace/.env\" is not a canary file path: write it relative to /workspace, like \".env\""),
    ("[detect.canary]\nfiles = [\"../.env\"]\n", "policy.toml:2:10: detect.canary.files[0]: \"../.env\" is not a canary file path: \"..\" would lead out of /workspace"),
    ("[detect.canary]\nfiles = [\".aws/../../x\"]\n", "policy.toml:2:10: detect.canary.files[0]: \".aws/../../x\" is not a canary file path: \"..\" would lead out of /workspace"),
    ("[detect.canary]\nfiles = [\"./.env\"]\n", "policy.toml:2:10: detect.canary.files[0]: \"./.env\" is not a canary file path: write it without \".\" components"),
    ("[detect.canary]\nfiles = [\".aws//credentials\"]\n", "policy.toml:2:10: detect.canary.files[0]: \".aws//credentials\" is not a canary file path: it has an empty component (a doubled or trailing '/')"),
    ("[detect.canary]\nfiles = [\".aws/\"]\n", "policy.toml:2:10: detect.canary.files[0]: \".aws/\" is not a canary file path: it has an empty component (a doubled or trailing '/')"),
    ("[detect.canary]\nfiles = [\"a\\nb\"]\n", "policy.toml:2:10: detect.canary.files[0]: \"a\\nb\" is not a canary file path: it contains control characters"),
    ("[detect.canary]\nfiles = [\"a/b/c/d/e/f/g/h/i\"]\n", "policy.toml:2:10: detect.canary.files[0]: \"a/b/c/d/e/f/g/h/i\" is not a canary file path: it is nested deeper than 8 levels"),
    ("[detect.canary]\nfiles = [\".env\", \".env\"]\n", "policy.toml:2:18: detect.canary.files[1]: \".env\" is listed twice"),
    ("[detect.canary]\nfiles = [\".aws\", \".aws/credentials\"]\n", "policy.toml:2:18: detect.canary.files[1]: \".aws/credentials\" is inside \".aws\", which is a canary file"),
    ("[detect.canary]\nfiles = [\".aws/credentials\", \".aws\"]\n", "policy.toml:2:30: detect.canary.files[1]: \".aws\" is a canary file and the directory of \".aws/credentials\""),
    ("[detect.canary]\nfiles = [1]\n", "policy.toml:2:10: detect.canary.files[0]: expected a path relative to /workspace, found an integer"),
    ("[detect.canary]\nfiles = \".env\"\n", "policy.toml:2:9: detect.canary.files: invalid type: string \".env\", expected a sequence"),
    ("[detect.canary]\nfile = [\".env\"]\n", "policy.toml:2:1: detect.canary: unknown key `file`, expected one of `env`, `files`, `response`, `alert`"),
    ("[detect]\nsandbox = 1\n", "policy.toml:2:11: detect.sandbox: invalid type: integer `1`, expected a [detect.sandbox] table"),
    ("[alerts]\nwebhook = \"https://siem.example/hook\"\n", "policy.toml:2:11: alerts.webhook: \"https://siem.example/hook\": https webhooks are not supported by this version of cordon; use http:// (for example a relay on the host)"),
    ("[alerts]\nwebhook = \"siem.example\"\n", "policy.toml:2:11: alerts.webhook: \"siem.example\" is not a webhook URL: expected http://host[:port]/path"),
    ("[alerts]\nwebhook = \"http://h:0/\"\n", "policy.toml:2:11: alerts.webhook: \"http://h:0/\" is not a webhook URL: the port must be 1-65535"),
    ("[alerts]\ntimeout = \"2m\"\n", "policy.toml:2:11: alerts.timeout: must be more than 0 and at most 1m, got 2m"),
    ("[alerts]\nretries = 11\n", "policy.toml:2:11: alerts.retries: must be between 0 and 10, got 11"),
    ("[response]\nterminate_after_blocked = 3\n[detect.blocked]\nthreshold = 4\n", "policy.toml:2:27: response.terminate_after_blocked: replaced by [detect.blocked] (threshold, window, response); set only [detect.blocked]"),
];

#[test]
fn every_bad_detect_and_alerts_value_names_its_key_and_position() {
    let mut wrong = Vec::new();
    for (text, expected) in BAD_DETECT {
        let got = error(text);
        if got != *expected {
            wrong.push(format!(
                "policy:\n{text}expected: {expected}\n     got: {got}\n"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn more_than_sixteen_canary_files_are_refused_at_the_seventeenth() {
    let list: Vec<String> = (0..17).map(|i| format!("\"f{i}\"")).collect();
    let text = format!("[detect.canary]\nfiles = [{}]\n", list.join(", "));
    let column = 10 + list[..16].iter().map(|q| q.len() + 2).sum::<usize>();
    assert_eq!(
        error(&text),
        format!("policy.toml:2:{column}: detect.canary.files[16]: at most 16 canary files")
    );
}

#[test]
fn validate_refuses_a_canary_file_path_built_in_code() {
    for (path, why) in [
        ("/etc/shadow", "canary files live in /workspace"),
        ("x/../../y", "would lead out of /workspace"),
    ] {
        let mut policy = Policy::default();
        policy.detect.canary.files = vec![".env".into(), path.into()];
        let err = policy.validate().unwrap_err();
        assert_eq!(err.key(), Some("detect.canary.files[1]"), "{err}");
        assert!(err.to_string().contains(why), "{err}");
    }
    let mut policy = Policy::default();
    policy.detect.canary.files = vec![".ssh/id_rsa".into(), ".ssh".into()];
    assert_eq!(
        policy.validate().unwrap_err().to_string(),
        "detect.canary.files[1]: \".ssh\" is a canary file and the directory of \".ssh/id_rsa\""
    );
}

#[test]
fn a_canary_also_set_in_sandbox_env_is_refused() {
    let text = "[sandbox]\nenv = { TOKEN = \"x\" }\n[detect.canary]\nenv = [\"TOKEN\"]\n";
    assert_eq!(
        error(text),
        "policy.toml:4:8: detect.canary.env[0]: \"TOKEN\" is also set in sandbox.env; a canary must be a value only cordon knows"
    );
}

#[test]
fn bad_audit_settings_name_file_line_column_and_key() {
    assert_error(
        "[audit]\nsyslog = \"syslog.example.com:514\"\n",
        "policy.toml:2:10: audit.syslog: \"syslog.example.com:514\" is not a syslog address: no scheme (expected udp://ADDRESS:PORT or tcp://ADDRESS:PORT with an IP address, like udp://127.0.0.1:514)",
    );
    assert_error(
        "\n[audit]\nsyslog = \"tls://127.0.0.1:6514\"\n",
        "policy.toml:3:10: audit.syslog: \"tls://127.0.0.1:6514\" is not a syslog address: the scheme must be udp or tcp (expected udp://ADDRESS:PORT or tcp://ADDRESS:PORT with an IP address, like udp://127.0.0.1:514)",
    );
    for (value, why) in [
        ("udp://logs.example.com:514", "not an IP address and port"),
        ("udp://127.0.0.1", "not an IP address and port"),
        ("tcp://::1:514", "not an IP address and port"),
        ("udp://127.0.0.1:0", "port 0"),
    ] {
        let text = error(&format!("[audit]\nsyslog = \"{value}\"\n"));
        assert!(
            text.starts_with(&format!(
                "policy.toml:2:10: audit.syslog: \"{value}\" is not a syslog address: {why} ("
            )),
            "{text}"
        );
    }
    assert_error(
        "[audit]\nsyslog = 514\n",
        "policy.toml:2:10: audit.syslog: expected a string like \"udp://127.0.0.1:514\", found an integer",
    );
    assert_error(
        "[audit]\nsyslog_min_severity = \"loud\"\n",
        "policy.toml:2:23: audit.syslog_min_severity: \"loud\" is not one of: info, notice, warning, high, critical",
    );
    assert!(error("[audit]\nsylog = \"udp://127.0.0.1:514\"\n")
        .starts_with("policy.toml:2:1: audit: unknown key `sylog`, expected `syslog`"));
}

#[test]
fn bad_audit_flags_name_the_flag() {
    let mut policy = Policy::default();
    let err = policy
        .apply(&Overrides {
            syslog: Some("udp://localhost:514".into()),
            ..Overrides::default()
        })
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("--syslog: \"udp://localhost:514\" is not a syslog address"),
        "{err}"
    );
    let err = policy
        .apply(&Overrides {
            syslog_min_severity: Some("debug".into()),
            ..Overrides::default()
        })
        .unwrap_err();
    assert!(
        err.to_string().starts_with("--syslog-min-severity: "),
        "{err}"
    );
    assert_eq!(policy, Policy::default());
}
